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
retrieval config, data, bootstrap and node handling around it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from rcsr_flower.backbones.clip import Backbone
from rcsr_flower.config import RESUME_MAY_CHANGE, RunConfig
from rcsr_flower.embedded.assets import cache_root, load_model
from rcsr_flower.faults import ServerKillGrid
from rcsr_flower.federation import (
    global_test_set,
    load_partition,
    partition_mismatches,
    reported_partition,
)
from rcsr_flower.modality import Modality
from rcsr_flower.packing import PackingGrid
from rcsr_flower.retrieval.evaluation import SplitTensors, evaluate_retrieval, preprocess_split
from rcsr_flower.retrieval.metrics import summary_table
from rcsr_flower.retrieval.prototypes import PrototypeBank
from rcsr_flower.retrieval.zero_shot import ZeroShotMemo
from rcsr_flower.routing.aggregation import unanswered
from rcsr_flower.routing.checkpoint import Checkpoint
from rcsr_flower.routing.grid import prompt_grid
from rcsr_flower.routing.local_only import LocalOnlyStrategy
from rcsr_flower.routing.outputs import resolve_output_path, write_json
from rcsr_flower.routing.runner import RoutedRun
from rcsr_flower.routing.strategy import RCSRStrategy, RoutingOptions
from rcsr_flower.server.retrieval_task import (
    TOWER_GROUPS,
    PersonalizedRetrieval,
    RetrievalTask,
    RouterBetas,
    make_evaluate_fn,
)

log = logging.getLogger(__name__)


def query_nodes(grid: Grid, cfg: RunConfig, kind: str, node_ids: list[int]) -> list[dict]:
    """One QUERY round (``kind``: bootstrap, describe); failures are logged and skipped."""
    replies = _query(grid, node_ids, {"kind": kind, "prototype-slots": cfg.prototype_slots}, cfg)
    info = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d failed the query round: %s", node, reply.error.reason)
            continue
        entry = {"node_id": node, **dict(reply.content["metrics"])}
        if "groups" in reply.content.array_records:
            entry["groups"] = reply.content["groups"].to_torch_state_dict()
        info.append(entry)
    return sorted(info, key=lambda d: d["partition-id"])


def _query(grid: Grid, node_ids: list[int], config: dict, cfg: RunConfig) -> list[Message]:
    messages = [
        Message(
            RecordDict({"config": ConfigRecord(config)}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    return list(grid.send_and_receive(messages, timeout=cfg.round_timeout))


class NodeWaitTimeout(RuntimeError):
    """Fewer nodes than the run's minimum stayed connected for ``node-wait-timeout`` s."""


WAIT_LOG_EVERY = 30.0  # seconds between "waiting for nodes" lines


def nodes_needed(cfg: RunConfig) -> dict[str, int]:
    """The minimums that make Flower wait for nodes, by run-config key."""
    needs = {
        "min-available-nodes": cfg.min_available_nodes,
        "min-train-nodes": cfg.min_train_nodes,
    }
    if cfg.fraction_evaluate > 0:
        needs["min-evaluate-nodes"] = cfg.min_evaluate_nodes
    return needs


class NodeWait:
    """One bounded wait for nodes: how long it has lasted, a progress line every 30 s,
    and :class:`NodeWaitTimeout` (one line: who is missing) when ``timeout`` is up."""

    def __init__(self, needs: dict[str, int], timeout: float, where: str) -> None:
        self.needs = needs
        self.needed = max(needs.values())
        self.timeout = timeout
        self.where = where
        self.started = time.monotonic()
        self.logged: float | None = None  # the first check logs

    def due(self) -> bool:
        """Whether :meth:`check` will log or raise now."""
        now = time.monotonic()
        if self.logged is None or now - self.started >= self.timeout:
            return True
        return now - self.logged >= WAIT_LOG_EVERY

    def check(self, connected: int, missing: str) -> None:
        """Log progress, or raise once the time is up."""
        now = time.monotonic()
        waited = now - self.started
        if waited >= self.timeout:
            raise NodeWaitTimeout(
                f"waited {waited:.0f} s (node-wait-timeout) for nodes {self.where}: "
                f"{self._status(connected, missing)}"
            )
        if self.logged is None or now - self.logged >= WAIT_LOG_EVERY:
            self.logged = now
            self._log(connected, missing)

    def _log(self, connected: int, missing: str) -> None:
        left = max(0.0, self.timeout - (time.monotonic() - self.started))
        log.warning(
            "waiting for nodes %s: %s; the run ends in %.0f s unless they connect",
            self.where,
            self._status(connected, missing),
            left,
        )

    def _status(self, connected: int, missing: str) -> str:
        keys = ", ".join(f"{k} {v}" for k, v in self.needs.items() if v == self.needed)
        return f"{connected} connected, {self.needed} needed ({keys}){missing}"


def wait_for_federation(grid: Grid, cfg: RunConfig, timeout: float | None = None) -> list[int]:
    """Wait for ``min-available-nodes``, at most ``node-wait-timeout`` s (or ``timeout``);
    fail fast when the federation is too small.

    As soon as one node is up, it is asked for ``num-partitions`` (the federation's size;
    the node answers without loading anything): minimums above it would make Flower's
    sampling wait forever, so they stop the run here with one line naming the key. While
    the wait lasts, every 30 s the new nodes are asked who they are, so the log names the
    partitions that are still missing.
    """
    wait = NodeWait(
        {"min-available-nodes": cfg.min_available_nodes},
        cfg.node_wait_timeout if timeout is None else timeout,
        "to start the run",
    )
    checked, partition_of, num_partitions = False, {}, None
    while True:
        nodes = list(grid.get_node_ids())
        if nodes and not checked:
            sized = query_nodes(grid, cfg, "size", nodes[:1])
            if sized:
                num_partitions = int(sized[0]["num-partitions"])
                cfg.check_federation(num_partitions)
                partition_of[sized[0]["node_id"]] = int(sized[0]["partition-id"])
                checked = True
        if checked and len(nodes) >= cfg.min_available_nodes:
            return nodes
        if wait.due():  # about to log or give up: who is here?
            new = [n for n in nodes if n not in partition_of]
            if new:
                for entry in query_nodes(grid, cfg, "size", new):
                    partition_of[entry["node_id"]] = int(entry["partition-id"])
        wait.check(len(nodes), _missing(partition_of, nodes, num_partitions))
        time.sleep(1.0)


def _missing(partition_of: dict[int, int], nodes: list[int], num_partitions: int | None) -> str:
    """``"; partitions not connected: 1, 3"`` (those known to the run), else ``""``."""
    here = {partition_of[n] for n in nodes if n in partition_of}
    if num_partitions is not None:
        missing = sorted(set(range(num_partitions)) - here)
    else:
        missing = sorted(set(partition_of.values()) - here)
    if not missing:
        return ""
    shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
    return f"; partitions not connected: {shown}"


def release_client_state(grid: Grid, cfg: RunConfig, state_key: str) -> None:
    """Tell every node the run is over: it deletes its resume snapshots (client/handlers.py)."""
    nodes = list(grid.get_node_ids())
    replies = _query(grid, nodes, {"kind": "release-state", "state-key": state_key}, cfg)
    released = sum(not r.has_error() for r in replies)
    if released < len(nodes):
        log.warning("client state kept on %d of %d nodes", len(nodes) - released, len(nodes))


class PartitionOrderedGrid:
    """The run's grid, listing nodes in partition order, and bounding Flower's waits.

    SuperNode ids are random per launch and Flower samples with ``random.sample`` over
    ``get_node_ids()``: ordered by partition id, the seeded sample picks the same clients
    in every launch.

    Flower's ``sample_nodes`` polls ``get_node_ids()`` once a second, without end, while
    fewer nodes are connected than the strategy's minimum. With ``needs`` (the minimums,
    :func:`nodes_needed`) and ``wait_timeout``, the polling is timed here: once it has
    seen too few nodes for ``wait_timeout`` seconds with no message sent in between, it
    raises :class:`NodeWaitTimeout` out of the strategy (every 30 s before that it logs
    who is missing). Everything else is delegated to the real grid.
    """

    def __init__(
        self,
        grid: Grid,
        partition_of: dict[int, int],
        *,
        needs: dict[str, int] | None = None,
        wait_timeout: float | None = None,
    ) -> None:
        self._grid = grid
        self._partition_of = partition_of
        self._needs = needs or {}
        self._wait_timeout = wait_timeout
        self._wait: NodeWait | None = None
        self._last_sent: str | None = None  # where the run is, for the wait's log lines

    def get_node_ids(self) -> list[int]:
        unknown = 1 << 62  # nodes that joined after the query round go last
        nodes = sorted(
            self._grid.get_node_ids(), key=lambda n: (self._partition_of.get(n, unknown), n)
        )
        self._time_wait(nodes)
        return nodes

    def _time_wait(self, nodes: list[int]) -> None:
        if self._wait_timeout is None or not self._needs or len(nodes) >= max(self._needs.values()):
            self._wait = None
            return
        missing = _missing(self._partition_of, nodes, None)
        if self._wait is None:  # Flower may be about to wait: it polls again if so
            where = f"after {self._last_sent}" if self._last_sent else "before the first round"
            self._wait = NodeWait(self._needs, self._wait_timeout, where)
        else:
            self._wait.check(len(nodes), missing)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The real grid's, then a warning naming every node that did not answer."""
        messages = list(messages)
        self._wait = None  # Flower sends only once it has its nodes: no wait in progress
        if messages:
            self._last_sent = _describe(messages[0])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg, why in unanswered(messages, replies):
            node = msg.metadata.dst_node_id
            what = _describe(msg)
            waited = f"{timeout:.0f} s" if timeout is not None else "the round"
            outcome = f"failed: {why.rstrip('.')}" if why else f"sent no reply within {waited}"
            log.warning(
                "%s: node %d (partition %s) %s; going on with the others",
                what,
                node,
                self._partition_of.get(node, "?"),
                outcome,
            )
        return replies

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


def _describe(msg: Message) -> str:
    """``"train round 3"``, ``"query"``: a message's type and round, for log lines."""
    config = msg.content.config_records.get("config")
    server_round = config.get("server-round") if config is not None else None
    what = msg.metadata.message_type
    return what if server_round is None else f"{what} round {server_round}"


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
    grid = prompt_grid(grid, PackingGrid)
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
        for problem in partition.problems(cfg.batch_size):
            log.warning("partition: %s", problem)
        for problem in partition_mismatches(partition, nodes):
            log.warning("partition: %s", problem)

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

    run_grid = PartitionOrderedGrid(
        grid,
        {n["node_id"]: int(n["partition-id"]) for n in nodes},
        needs=nodes_needed(cfg),
        wait_timeout=cfg.node_wait_timeout,
    )
    if cfg.faults.server_kill_round is not None:
        run_grid = ServerKillGrid(run_grid, cfg.faults.server_kill_round)
    try:
        run.start(
            strategy,
            run_grid,
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
