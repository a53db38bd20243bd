"""ServerApp: the label-routing task under rcsr_flower's routed strategy and runner.

``run_routed`` does the rest: metrics.jsonl, federated and central evaluation, a
checkpoint after every round, ``resume-from`` and result.json in
``<output-dir>/<run-name>``.
"""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from label_routing.task import LabelRoutingTask, TaskConfig, central_evaluation, initial_arrays
from rcsr_flower.routing.runner import run_routed
from rcsr_flower.routing.strategy import RoutingOptions

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = TaskConfig.from_run_config(rc)
    nodes = int(rc["min-nodes"])
    run_routed(
        grid,
        context,
        LabelRoutingTask(cfg.num_classes, cfg.prior_momentum),
        initial_arrays(cfg),
        num_clients=cfg.num_clients,
        options=RoutingOptions(seed=cfg.seed, min_valid_replies=nodes),
        evaluate_fn=central_evaluation(cfg),
        fraction_train=float(rc["fraction-train"]),
        fraction_evaluate=float(rc["fraction-evaluate"]),
        min_available_nodes=nodes,
        min_train_nodes=nodes,
        min_evaluate_nodes=nodes,
    )
