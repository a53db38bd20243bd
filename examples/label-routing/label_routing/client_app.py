"""ClientApp: messages in, calls into ``label_routing.task``, messages out."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from label_routing.task import LABELS, PRIOR, TaskConfig, evaluate_client, train_client

app = ClientApp()


def _setup(context: Context) -> tuple[TaskConfig, int]:
    """The task config and this node's partition id, which must be below num-clients."""
    cfg = TaskConfig.from_run_config(context.run_config)
    partitions = int(context.node_config["num-partitions"])
    if partitions != cfg.num_clients:
        raise ValueError(
            f"run-config 'num-clients' = {cfg.num_clients}, but the federation has "
            f"{partitions} partitions (SuperNodes): run with -c num-clients={partitions}"
        )
    return cfg, int(context.node_config["partition-id"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, partition_id = _setup(context)
    prior = None  # sent by the routed strategy; FedAvg mode has none
    if PRIOR in msg.content.array_records:
        prior = torch.from_numpy(msg.content[PRIOR][PRIOR].numpy())
    config = msg.content["config"]
    params, metrics, hist = train_client(
        cfg, msg.content["arrays"], prior, partition_id, int(config["server-round"])
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(params),
            "metrics": MetricRecord(metrics),
            LABELS: ArrayRecord({"histogram": hist}),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, partition_id = _setup(context)
    metrics = evaluate_client(cfg, msg.content["arrays"], partition_id)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
