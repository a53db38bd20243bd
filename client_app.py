"""Flower ClientApp entry point: messages in, calls into ``rcsr_flower.client``, messages out."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    from rcsr_flower.client import handle_query, light_query, setup

    light = light_query(context.run_config, context.node_config, msg.content["config"])
    if light is not None:  # no backbone, no data
        return Message(RecordDict({"metrics": MetricRecord(light)}), reply_to=msg)
    node = setup(context.run_config, context.node_config)
    out = handle_query(node, msg.content["config"])
    content = RecordDict({"metrics": MetricRecord(out["describe"])})
    if "groups" in out:
        content["groups"] = ArrayRecord(out["groups"])
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    from rcsr_flower.client import handle_train, setup

    node = setup(context.run_config, context.node_config)
    prototypes = msg.content.array_records.get("prototypes")
    out = handle_train(
        node, msg.content["arrays"], msg.content["config"], prototypes, context.state
    )
    content = RecordDict(
        {"arrays": ArrayRecord(out["arrays"]), "metrics": MetricRecord(out["metrics"])}
    )
    if out["stats"] is not None:
        content["stats"] = ArrayRecord(out["stats"])
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    from rcsr_flower.client import handle_evaluate, setup

    node = setup(context.run_config, context.node_config)
    metrics = handle_evaluate(
        node, msg.content["arrays"], context.state, msg.content.config_records.get("config")
    )
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
