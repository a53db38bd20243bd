"""The ServerApp's work: set up the run, bootstrap, run the strategy, write results.

``server_app.py`` only hands Flower's ``grid`` and ``context`` to :func:`run_server`.
A run: resolve config (and the checkpoint to resume, if any) -> run dir -> a QUERY
round in which every node reports its partition and paired nodes their group centroids
(§3 bootstrap), while the server's backbone and global test split load in a thread
-> partition and prototype bank ->
``strategy.start`` with centralised zero-shot evaluation at round 0 and a checkpoint
after every round -> final adapters, bank, router and ``result.json`` -> the nodes drop
their resume snapshots. A resumed run restores the checkpoint instead of bootstrapping
and continues at the next round (docs/faults-and-resume.md). The task-neutral part —
run dir, ``result.json``, ``metrics.jsonl``, checkpoints, resume, the final state — is
``rcsr_flower.routing.runner.RoutedRun``, the same for every routed app; this module adds the
retrieval config, data and bootstrap around it. The grid it talks through, the waits for
nodes and the queries outside the rounds are ``rcsr_flower.server.grid``.
"""

from __future__ import annotations

import logging
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid

from rcsr_flower.backbones.clip import Backbone
from rcsr_flower.config import RESUME_MAY_CHANGE, RunConfig
from rcsr_flower.embedded.assets import cache_root, load_model
from rcsr_flower.federation import (
    global_test_set,
    load_partition,
    partition_mismatches,
    reported_partition,
)
from rcsr_flower.heap import releasing_freed_memory
from rcsr_flower.modality import Modality
from rcsr_flower.retrieval.evaluation import SplitTensors, evaluate_retrieval, preprocess_split
from rcsr_flower.retrieval.metrics import summary_table
from rcsr_flower.retrieval.prototypes import PrototypeBank
from rcsr_flower.retrieval.zero_shot import ZeroShotMemo
from rcsr_flower.routing.checkpoint import Checkpoint
from rcsr_flower.routing.local_only import LocalOnlyStrategy
from rcsr_flower.routing.outputs import resolve_output_path, write_json
from rcsr_flower.routing.runner import RoutedRun
from rcsr_flower.routing.strategy import RCSRStrategy, RoutingOptions
from rcsr_flower.server.grid import (
    NodeWaitTimeout,
    PartitionOrderedGrid,
    query_nodes,
    release_client_state,
    strategy_grid,
    wait_for_federation,
    wire_grid,
)
from rcsr_flower.server.retrieval_task import (
    TOWER_GROUPS,
    PersonalizedRetrieval,
    RetrievalTask,
    RouterBetas,
    make_evaluate_fn,
)

log = logging.getLogger(__name__)


def personal_collapse_warning(cfg: RunConfig, nodes: list[dict]) -> str | None:
    """A warning when personal adapters will learn from anchoring alone on some client.

    A unimodal client's only loss is prototype anchoring, which carries no cross-modal
    signal of the client's own; its personal adapters are never averaged, so they follow
    it wherever it leads (with ``ce``, every sample of a slot to one point), and that
    client's personalised retrieval falls (docs/algorithm.md, "Personal adapters and
    unimodal clients"). Allowed, as the ablation it is, but nobody should find it out
    from the numbers."""
    if not (cfg.uses_personal_adapters and cfg.uses_anchoring and cfg.personal_unimodal):
        return None
    unimodal = sorted(
        int(n["partition-id"])
        for n in nodes
        if Modality.from_code(int(n.get("modality", 0))) != Modality.PAIRED  # a node's code
    )
    if not unimodal:
        return None
    return (
        f"personal-unimodal = true with anchoring on and {len(unimodal)} unimodal client(s) "
        f"(partitions {unimodal}): their personal adapters learn from prototype anchoring "
        'alone, which lowers their personalised retrieval (docs/algorithm.md, "Personal '
        'adapters and unimodal clients"); set personal-unimodal=false (the default) unless '
        "that is what you are measuring"
    )


PROBLEMS_SHOWN = 10  # a partition problem of 1,000 clients is one line, not 1,000


def log_problems(problems: list[str], shown: int = PROBLEMS_SHOWN) -> None:
    """The first ``shown`` of the partition's problems, then how many more there are."""
    for problem in problems[:shown]:
        log.warning("partition: %s", problem)
    if len(problems) > shown:
        log.warning("partition: %d more like these", len(problems) - shown)


def bootstrap_bank(nodes: list[dict], cfg: RunConfig) -> PrototypeBank:
    """§3: count-weighted k-means over the paired clients' group centroids."""
    groups = [n["groups"] for n in nodes if "groups" in n]
    return PrototypeBank.bootstrap(
        [g["image_means"] for g in groups],
        [g["text_means"] for g in groups],
        [g["counts"] for g in groups],
        cfg.prototype_slots,
        seed=cfg.seed,
    )


def run_server(grid: Grid, context: Context) -> None:
    """The retrieval ServerApp: its config and data around the generic :class:`RoutedRun`
    (run dir, ``result.json``, ``metrics.jsonl``, checkpoints, resume, final state)."""
    # deployed: replies pulled every 0.2 s instead of 3 s, the adapters one array a message
    grid = wire_grid(grid)
    with RoutedRun(context.run_config, arrays_file="adapters", state_file="prototypes") as run:
        try:
            cfg = RunConfig.from_flower(context.run_config)
            run.open(cfg.to_flower(), RESUME_MAY_CHANGE)  # bad resumes stop here
            rows = _run(grid, cfg, run)
        except NodeWaitTimeout as exc:  # one line that says why and how to go on
            log.error("run failed: %s", exc)
            raise
        final = next((r["global"] for r in reversed(rows) if "global" in r), None)
        run.complete(
            strategy=cfg.strategy,
            zero_shot_global=rows[0].get("global") if rows else None,
            final_global=final,
        )
    print(f"\nrcsr-flower run finished: {run.out}\n{summary_table(rows)}", flush=True)


def _run(grid: Grid, cfg: RunConfig, run: RoutedRun) -> list[dict]:
    """The run itself, fresh or resumed; returns the rows written to ``metrics.jsonl``."""
    out, resume = run.out, run.resume
    random.seed(cfg.seed)  # Flower samples nodes with the global `random`
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    # the backbone and the global test split load while the nodes start and answer the
    # query round: mostly importing the CLIP model code, seconds of one core that would
    # otherwise stand between "federation up" and the first message
    with ThreadPoolExecutor(1, thread_name_prefix="server-evaluation") as pool:
        evaluation = pool.submit(_load_evaluation, cfg)
        try:
            node_ids = wait_for_federation(grid, cfg)
        except NodeWaitTimeout as exc:
            raise NodeWaitTimeout(f"{exc}. {continue_hint(cfg, out, resume, None)}") from None
        if evaluation.done():  # failed already (a model that is not there): say so now
            evaluation.result()
        # a resumed run has its prototype bank: no bootstrap, only who is who
        bootstrap = cfg.routed and resume is None
        kind = "bootstrap" if bootstrap else "describe"
        nodes = query_nodes(PartitionOrderedGrid(grid, {}), cfg, kind, node_ids)
        backbone, test = evaluation.result()  # its error (a missing model...) is raised here
    return _run_federation(grid, cfg, run, backbone, test, nodes)


def _load_evaluation(cfg: RunConfig) -> tuple[Backbone, SplitTensors]:
    """The server's backbone and its preprocessed global test split."""
    backbone = load_model(cfg.model_name, cache_dir=cfg.cache_dir or None)
    return backbone, preprocess_split(backbone, global_test_set(cfg), workers=cfg.loader_workers)


def _run_federation(
    grid: Grid,
    cfg: RunConfig,
    run: RoutedRun,
    backbone: Backbone,
    test: SplitTensors,
    nodes: list[dict],
) -> list[dict]:
    """Partition, prototype bank and strategy, once the nodes have answered the query."""
    out, resume = run.out, run.resume
    if not nodes:
        raise RuntimeError("no node answered the query round; nothing to train")
    num_partitions = int(nodes[0]["num-partitions"])
    run.check_num_clients(num_partitions)
    if warning := personal_collapse_warning(cfg, nodes):
        log.warning(warning)
    if any(n.get("shard") for n in nodes):  # nodes hold their own data: record what they hold
        write_json(out / "partition.json", reported_partition(nodes))
        log.info("nodes hold their own shards: %s", [n["num-train"] for n in nodes])
    else:
        partition = load_partition(cfg, backbone, num_partitions)
        partition.to_json(out / "partition.json")
        log.info("partition (%d clients):\n%s", num_partitions, partition.summary())
        log_problems(partition.problems(cfg.batch_size))
        log_problems(partition_mismatches(partition, nodes))

    task = None
    if cfg.routed:
        if resume is not None:
            bank = PrototypeBank.from_tensors(resume.task_tensors())
        else:
            bank = bootstrap_bank(nodes, cfg)
            log.info(
                "prototype bank: %d slots from %d paired clients",
                bank.slots,
                sum("groups" in n for n in nodes),
            )
        task = RetrievalTask(
            bank,
            RouterBetas(cfg.beta_image, cfg.beta_text, cfg.beta_entropy, cfg.beta_axis),
            momentum=cfg.prototype_momentum,
        )

    template = backbone.new_adapters(
        cfg.adapter_layers, cfg.adapter_bottleneck, cfg.adapter_init_std
    )
    initial = ArrayRecord({k: v.detach().cpu() for k, v in template.state_dict().items()})

    memo = (
        ZeroShotMemo(cache_root(cfg.cache_dir or None) / "zero-shot")
        if cfg.zero_shot_cache
        else None
    )

    @releasing_freed_memory  # the evaluation's tensors, freed, back to the system
    def evaluate(arrays: ArrayRecord) -> dict:
        template.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return evaluate_retrieval(
            backbone,
            test,
            template,
            protocol=cfg.eval_protocol,
            batch_size=cfg.eval_batch_size,
            memo=memo,
            prefix_bytes=cfg.eval_prefix_bytes,
        )

    state_key = run.state_key  # clients keep resume snapshots of their state under it
    strategy = (LocalOnlyStrategy if cfg.strategy == "local" else RCSRStrategy)(
        task,
        RoutingOptions(
            mode=cfg.strategy,
            router=cfg.router,
            minimax=cfg.minimax,
            tower_aggregation=cfg.tower_aggregation,
            groups=TOWER_GROUPS,
            aggregate_unimodal=cfg.aggregate_unimodal,
            server_lr=cfg.server_lr,
            router_hidden=cfg.router_hidden,
            router_heads=cfg.router_heads,
            router_blocks=cfg.router_blocks,
            router_dropout=cfg.router_dropout,
            router_lr=cfg.router_lr,
            minimax_eta=cfg.minimax_eta,
            minimax_tau=cfg.minimax_tau,
            min_valid_replies=cfg.min_train_nodes,
            max_update_norm=cfg.max_update_norm,
            seed=cfg.seed,
            lr_schedule=cfg.lr_at,
            client_config={
                "anchoring": cfg.uses_anchoring,
                "prox-mu": cfg.client_prox_mu,
                "lambda-anchor": cfg.lambda_anchor,
                "lambda-align": cfg.lambda_align,
                "anchoring-loss": cfg.anchoring_loss,
                "state-key": state_key,
            },
        ),
        num_clients=num_partitions,
        metrics_log=run.metrics_log,
        evaluation=PersonalizedRetrieval(),
        evaluate_every=cfg.eval_every,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
    )

    partition_of = {n["node_id"]: int(n["partition-id"]) for n in nodes}
    try:
        run.start(
            strategy,
            strategy_grid(grid, cfg, partition_of),
            initial,
            num_clients=num_partitions,
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
            evaluate_config={"state-key": state_key},
            # the global metrics join the row as "global" (make_evaluate_fn writes them)
            evaluate_fn=make_evaluate_fn(run.metrics_log, evaluate),
            central_key=None,
        )
    except NodeWaitTimeout as exc:
        last = run.checkpointed[-1] if run.checkpointed else None
        raise NodeWaitTimeout(f"{exc}. {continue_hint(cfg, out, resume, last)}") from None
    release_client_state(grid, cfg, state_key)
    return run.metrics_log.rows


def continue_hint(
    cfg: RunConfig, out: Path, resume: Checkpoint | None, checkpointed: int | None
) -> str:
    """How to go on after a run that gave up waiting for nodes: which checkpoint is
    intact and the ``resume-from`` that continues it (one sentence)."""
    if checkpointed is None and resume is not None:  # nothing new since the resumed one
        checkpointed, out = resume.round, resolve_output_path(cfg.resume_from)
    if checkpointed is None:
        return "Nothing was trained: submit the run again once the nodes are up"
    return (
        f"Round {checkpointed} is the last complete round, checkpointed in {out}: once the "
        f"nodes are back, continue with -c 'resume-from=\"{out}\"'"
    )
