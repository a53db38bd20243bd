"""The ServerApp's work: set up the run, bootstrap, run the strategy, write results.

``server_app.py`` only hands Flower's ``grid`` and ``context`` to :func:`run_server`.
A run: resolve config (and the checkpoint to resume, if any) -> run dir -> assets and
backbone -> a QUERY round in which every node reports its partition and paired nodes
their group centroids (SPEC §3 bootstrap) -> partition and prototype bank ->
``strategy.start`` with centralised zero-shot evaluation at round 0 and a checkpoint
after every round -> final adapters, bank, router and ``result.json`` -> the nodes drop
their resume snapshots. A resumed run restores the checkpoint instead of bootstrapping
and continues at the next round (docs/faults-and-resume.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import traceback
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import save_file

from rcsr_flower.backbones.clip import load_backbone
from rcsr_flower.checkpoint import Checkpoint, checkpoint_to_resume, restore_rng, save_checkpoint
from rcsr_flower.config import ConfigError, RunConfig
from rcsr_flower.faults import ServerKillGrid
from rcsr_flower.federation import (
    global_test_set,
    load_partition,
    partition_mismatches,
    reported_partition,
)
from rcsr_flower.local_only import LocalOnlyStrategy
from rcsr_flower.outputs import MetricsLog, run_dir, summary_table, write_json
from rcsr_flower.prototypes import PrototypeBank
from rcsr_flower.retrieval_task import RetrievalTask, RouterBetas
from rcsr_flower.strategy import RCSRStrategy, RoutingOptions, make_evaluate_fn, unanswered
from rcsr_flower.task import evaluate_retrieval, preprocess_split

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


def wait_for_federation(grid: Grid, cfg: RunConfig, timeout: float = 600.0) -> list[int]:
    """Wait for ``min-available-nodes``; fail fast when the federation is too small.

    As soon as one node is up, it is asked for ``num-partitions`` (the federation's size;
    the node answers without loading anything): minimums above it would make Flower's
    sampling wait forever, so they stop the run here with one line naming the key.
    """
    start, checked = time.monotonic(), False
    while True:
        nodes = list(grid.get_node_ids())
        if nodes and not checked:
            sized = query_nodes(grid, cfg, "size", nodes[:1])
            if sized:
                cfg.check_federation(int(sized[0]["num-partitions"]))
                checked = True
        if checked and len(nodes) >= cfg.min_available_nodes:
            return nodes
        if time.monotonic() - start > timeout:
            raise RuntimeError(
                f"only {len(nodes)} nodes connected after {timeout:.0f} s; "
                f"min-available-nodes is {cfg.min_available_nodes}"
            )
        time.sleep(1.0)


def release_client_state(grid: Grid, cfg: RunConfig, state_key: str) -> None:
    """Tell every node the run is over: it deletes its resume snapshots (client.py)."""
    nodes = list(grid.get_node_ids())
    replies = _query(grid, nodes, {"kind": "release-state", "state-key": state_key}, cfg)
    released = sum(not r.has_error() for r in replies)
    if released < len(nodes):
        log.warning("client state kept on %d of %d nodes", len(nodes) - released, len(nodes))


class PartitionOrderedGrid:
    """The run's grid, listing nodes in partition order.

    SuperNode ids are random per launch and Flower samples with ``random.sample`` over
    ``get_node_ids()``: ordered by partition id, the seeded sample picks the same clients
    in every launch. Everything else is delegated to the real grid.
    """

    def __init__(self, grid: Grid, partition_of: dict[int, int]) -> None:
        self._grid = grid
        self._partition_of = partition_of

    def get_node_ids(self) -> list[int]:
        unknown = 1 << 62  # nodes that joined after the query round go last
        return sorted(
            self._grid.get_node_ids(), key=lambda n: (self._partition_of.get(n, unknown), n)
        )

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The real grid's, then a warning naming every node that did not answer."""
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg, why in unanswered(messages, replies):
            node = msg.metadata.dst_node_id
            config = msg.content.config_records.get("config")
            server_round = config.get("server-round") if config is not None else None
            what = msg.metadata.message_type
            if server_round is not None:
                what += f" round {server_round}"
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


def bootstrap_bank(nodes: list[dict], cfg: RunConfig) -> PrototypeBank:
    """SPEC §3: count-weighted k-means over the paired clients' group centroids."""
    groups = [n["groups"] for n in nodes if "groups" in n]
    return PrototypeBank.bootstrap(
        [g["image_means"] for g in groups],
        [g["text_means"] for g in groups],
        [g["counts"] for g in groups],
        cfg.prototype_slots,
        seed=cfg.seed,
    )


def run_server(grid: Grid, context: Context) -> None:
    raw = context.run_config
    # the run dir comes first, so even a bad config leaves a result.json that says why;
    # the pid says which process to stop (or, in the resume tests, what was killed)
    out = run_dir(str(raw.get("output-dir", "outputs")), str(raw.get("run-name", "")))
    write_json(out / "result.json", {"status": "running", "pid": os.getpid()})
    started = time.time()
    try:
        cfg = RunConfig.from_flower(raw)
        resume = checkpoint_to_resume(cfg, out)  # before any training: bad resumes stop here
        write_json(out / "config.json", cfg.to_flower())
        rows = _run(grid, cfg, out, resume)
    except BaseException as exc:
        write_json(
            out / "result.json",
            {
                "status": "failed",
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
                "seconds": round(time.time() - started, 1),
            },
        )
        raise
    final = next((r["global"] for r in reversed(rows) if "global" in r), None)
    write_json(
        out / "result.json",
        {
            "status": "completed",
            "seconds": round(time.time() - started, 1),
            "rounds": cfg.num_server_rounds,
            "resumed_after_round": resume.round if resume is not None else None,
            "strategy": cfg.strategy,
            "zero_shot_global": rows[0].get("global") if rows else None,
            "final_global": final,
        },
    )
    print(f"\nrcsr-flower run finished: {out}\n{summary_table(rows)}", flush=True)


def _run(grid: Grid, cfg: RunConfig, out: Path, resume: Checkpoint | None) -> list[dict]:
    """The run itself, fresh or resumed; returns the rows written to ``metrics.jsonl``."""
    random.seed(cfg.seed)  # Flower samples nodes with the global `random`
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    node_ids = wait_for_federation(grid, cfg)
    backbone = load_backbone(cfg.model_name, cache_dir=cfg.cache_dir or None)
    # a resumed run has its prototype bank: no bootstrap, only who is who
    bootstrap = cfg.routed and resume is None
    kind = "bootstrap" if bootstrap else "describe"
    nodes = query_nodes(PartitionOrderedGrid(grid, {}), cfg, kind, node_ids)
    if not nodes:
        raise RuntimeError("no node answered the query round; nothing to train")
    num_partitions = int(nodes[0]["num-partitions"])
    if resume is not None and resume.num_clients != num_partitions:
        raise ConfigError(
            f"run-config 'resume-from' = {cfg.resume_from!r}: the checkpointed run had "
            f"{resume.num_clients} clients, this federation has {num_partitions}"
        )
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

    test = preprocess_split(backbone, global_test_set(cfg), workers=cfg.loader_workers)
    template = backbone.new_adapters(
        cfg.adapter_layers, cfg.adapter_bottleneck, cfg.adapter_init_std
    )
    initial = ArrayRecord({k: v.detach().cpu() for k, v in template.state_dict().items()})

    def evaluate(arrays: ArrayRecord) -> dict:
        template.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return evaluate_retrieval(
            backbone, test, template, protocol=cfg.eval_protocol, batch_size=cfg.eval_batch_size
        )

    # clients keep resume snapshots of their state under this key (client.py)
    state_key = resume.state_key if resume is not None else uuid.uuid4().hex
    metrics_log = MetricsLog(out / "metrics.jsonl", resume.rows if resume is not None else [])
    strategy = (LocalOnlyStrategy if cfg.strategy == "local" else RCSRStrategy)(
        task,
        RoutingOptions(
            mode=cfg.strategy,
            router=cfg.router,
            minimax=cfg.minimax,
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
                "state-key": state_key,
            },
        ),
        num_clients=num_partitions,
        metrics_log=metrics_log,
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_train_nodes,
        min_evaluate_nodes=cfg.min_evaluate_nodes,
        min_available_nodes=cfg.min_available_nodes,
    )

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        save_checkpoint(
            out,
            server_round,
            arrays,
            strategy.state_for_checkpoint(),
            metrics_log.rows,
            config=cfg.to_flower(),
            state_key=state_key,
            num_clients=num_partitions,
        )

    run_grid = PartitionOrderedGrid(grid, {n["node_id"]: int(n["partition-id"]) for n in nodes})
    if cfg.faults.server_kill_round is not None:
        run_grid = ServerKillGrid(run_grid, cfg.faults.server_kill_round)
    first_round = 1
    if resume is not None:
        strategy.restore_from_checkpoint(resume.strategy_tensors, resume.strategy_meta)
        initial = resume.arrays
        first_round = resume.round + 1
        restore_rng(resume)  # last: setup above drew from the global RNGs
    result = strategy.start(
        grid=run_grid,
        initial_arrays=initial,
        num_rounds=cfg.num_server_rounds,
        timeout=cfg.round_timeout,
        evaluate_config=ConfigRecord({"state-key": state_key}),
        evaluate_fn=make_evaluate_fn(cfg.num_server_rounds, cfg.eval_every, metrics_log, evaluate),
        first_round=first_round,
        on_round_end=checkpoint,
    )
    save_state(out, result.arrays or initial, strategy)
    release_client_state(grid, cfg, state_key)
    return metrics_log.rows


def save_state(out: Path, arrays: ArrayRecord, strategy: RCSRStrategy) -> None:
    """Final adapters, prototype bank and router (safetensors) + minimax state (JSON)."""
    save_file(
        {k: v.contiguous() for k, v in arrays.to_torch_state_dict().items()},
        str(out / "adapters.safetensors"),
    )
    if strategy.task is not None:
        save_file(
            {k: v.contiguous() for k, v in strategy.task.bank.to_tensors().items()},
            str(out / "prototypes.safetensors"),
        )
    if strategy.router is not None:
        save_file(
            {k: v.contiguous() for k, v in strategy.router.state_dict().items()},
            str(out / "router.safetensors"),
        )
    if strategy.minimax is not None:
        write_json(out / "minimax.json", strategy.minimax.state())
    write_json(out / "history.json", json.loads(json.dumps(strategy.history, default=float)))
