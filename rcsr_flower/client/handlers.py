"""Client-side work behind the ClientApp handlers (§3, §4, §6).

``client_app.py`` hands each message's records and the node's ``Context`` to these
functions and wraps what they return into a reply. Everything heavy (backbone, the
node's preprocessed data) is loaded once per process; what must outlive a process —
personal adapters and the previous update — lives in ``context.state`` and never
leaves the node. ``context.state`` lasts one Flower run, so a node also keeps it on its
own disk, per round (:class:`ClientStateStore`), for a resumed run to continue from.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from safetensors.torch import load_file, save_file

from rcsr_flower.backbones.adapters import AdapterSet
from rcsr_flower.backbones.clip import Backbone
from rcsr_flower.client.data import ClientData, load_client_data
from rcsr_flower.client.training import (
    TrainSettings,
    bootstrap_groups,
    client_statistics,
    local_train,
)
from rcsr_flower.config import NodeConfig, RunConfig
from rcsr_flower.embedded.assets import cache_root, load_model
from rcsr_flower.faults import before_training, corrupt_reply
from rcsr_flower.federation import node_data
from rcsr_flower.heap import releasing_freed_memory
from rcsr_flower.modality import Modality
from rcsr_flower.retrieval.evaluation import evaluate_retrieval
from rcsr_flower.retrieval.prototypes import PrototypeBank
from rcsr_flower.retrieval.zero_shot import ZeroShotMemo
from rcsr_flower.routing.outputs import durable_replace
from rcsr_flower.runtime.processes import process_age

log = logging.getLogger(__name__)
# A child of Flower's logger: its console handler puts INFO lines into the SuperNode's log
startup_log = logging.getLogger("flwr").getChild(__name__)
_STARTUP_LOGGED = False

PERSONAL_KEY = "personal-adapters"
LOCAL_KEY = "local-adapters"  # strategy="local": this node's own shared adapters
PREVIOUS_DELTA_KEY = "previous-update"
STAMP_KEY = "state-stamp"  # which snapshot context.state holds: {"state-key", "round"}
STATE_KEY_PATTERN = re.compile(r"[0-9a-f]{32}")  # it names a directory: nothing else


class ClientStateStore:
    """This node's ``context.state``, kept on its own disk round by round.

    A resumed run is a new Flower run, and its nodes start with an empty
    ``context.state``. So after each train round a node writes its state (previous update,
    personal adapters) to ``<client-state-dir>/<state-key>/partition-<id>/round-<r>
    .safetensors``; a handler of round ``r`` whose ``context.state`` is empty, or ahead
    (a round the killed server never checkpointed), first loads the newest snapshot before
    ``r``. Two snapshots are kept: the server starts round ``r`` only after checkpointing
    ``r−1``, so no resume needs an older one. The files never leave the node.
    """

    def __init__(self, root: Path, state_key: str, partition_id: int) -> None:
        if not STATE_KEY_PATTERN.fullmatch(state_key):
            raise ValueError(f"state-key {state_key!r} is not 32 lowercase hex digits")
        self.state_key = state_key
        self.dir = root / state_key / f"partition-{partition_id}"

    def snapshots(self) -> dict[int, Path]:
        return {
            int(p.name[6:11]): p
            for p in self.dir.glob("round-*.safetensors")
            if re.fullmatch(r"round-\d{5}\.safetensors", p.name)
        }

    def sync(self, state: RecordDict, upto: int) -> None:
        """Make ``state`` this node's state after round ``upto``, from disk if needed."""
        stamp = state.config_records.get(STAMP_KEY)
        if stamp is not None and stamp["state-key"] == self.state_key and stamp["round"] <= upto:
            return  # the live state of this run: nothing to load
        for key in list(state.array_records):
            del state[key]
        snapshots = self.snapshots()
        loaded = max((r for r in snapshots if r <= upto), default=0)
        if loaded:
            records: dict[str, dict[str, torch.Tensor]] = {}
            for name, tensor in load_file(str(snapshots[loaded])).items():
                record, _, key = name.partition("/")
                records.setdefault(record, {})[key] = tensor
            for record, arrays in records.items():
                state[record] = ArrayRecord(arrays)
            startup_log.info("restored client state after round %d from %s", loaded, self.dir)
        state[STAMP_KEY] = ConfigRecord({"state-key": self.state_key, "round": loaded})

    def save(self, server_round: int, state: RecordDict) -> None:
        """Write ``state`` as the state after ``server_round`` (atomically)."""
        tensors = {
            f"{record}/{key}": value.contiguous()
            for record in state.array_records
            for key, value in state[record].to_torch_state_dict().items()
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"round-{server_round:05d}.safetensors"
        tmp = self.dir / f".round-{server_round:05d}.tmp"
        save_file(tensors, str(tmp))
        durable_replace(tmp, path)  # a resume reads it after any crash
        state[STAMP_KEY] = ConfigRecord({"state-key": self.state_key, "round": server_round})
        snapshots = self.snapshots()
        for r in sorted(r for r in snapshots if r < server_round)[:-1]:  # keep the newest
            snapshots[r].unlink(missing_ok=True)

    def release(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # the run's directory, once every partition is gone
            self.dir.parent.rmdir()


def client_state_root(cfg: RunConfig) -> Path:
    """``client-state-dir``, or ``client-state/`` in the cache directory."""
    if cfg.client_state_dir:
        return Path(cfg.client_state_dir).expanduser()
    return cache_root(cfg.cache_dir or None) / "client-state"


@dataclass
class ClientNode:
    cfg: RunConfig
    backbone: Backbone
    data: ClientData
    partition_id: int
    num_partitions: int
    shard: bool = False  # the node's own dataset is its share (federation docstring)

    def adapters(self, state: dict[str, torch.Tensor] | None = None) -> AdapterSet:
        """A fresh adapter set on this backbone, loaded from ``state`` when given."""
        cfg = self.cfg
        adapters = self.backbone.new_adapters(
            cfg.adapter_layers, cfg.adapter_bottleneck, cfg.adapter_init_std
        )
        if state is not None:
            adapters.load_state_dict(
                {k: v.to(self.backbone.device) for k, v in state.items()}, strict=True
            )
        return adapters

    def describe(self) -> dict[str, int]:
        return {
            "partition-id": self.partition_id,
            "num-partitions": self.num_partitions,
            "modality": Modality(self.data.modality).code,
            "num-train": len(self.data.train),
            "num-test": len(self.data.test),
            "shard": int(self.shard),
        }

    def state_store(self, config: ConfigRecord) -> ClientStateStore | None:
        """The durable copy of this node's state, when the server names one."""
        if "state-key" not in config:
            return None
        return ClientStateStore(
            client_state_root(self.cfg), str(config["state-key"]), self.partition_id
        )

    @property
    def memo(self) -> ZeroShotMemo | None:
        """Where this node keeps the frozen backbone's results (``zero-shot-cache``)."""
        if not self.cfg.zero_shot_cache:
            return None
        return ZeroShotMemo(cache_root(self.cfg.cache_dir or None) / "zero-shot")

    def seed(self, server_round: int, salt: int = 0) -> int:
        return self.cfg.seed * 1_000_003 + server_round * 10_007 + self.partition_id * 101 + salt

    # -------------------------------------------------------------- personal state
    def starting_adapters(self, arrays: ArrayRecord, state: RecordDict) -> dict[str, torch.Tensor]:
        """The shared adapters a round starts from: the server's; with ``strategy =
        "local"`` (no aggregation, ``rcsr_flower.routing.local_only``) this node's own from
        ``context.state``, once it has trained (before that, the server's initial ones)."""
        if self.cfg.strategy == "local" and LOCAL_KEY in state.array_records:
            return state.array_records[LOCAL_KEY].to_torch_state_dict()
        return arrays.to_torch_state_dict()

    @property
    def keeps_personal_adapters(self) -> bool:
        """Whether this node has personal adapters: on with ``personal-adapters`` (or
        FedPer), except on an RCSR client missing a modality unless ``personal-unimodal``:
        with no pairs, its personal adapters could only learn prototype anchoring."""
        cfg = self.cfg
        if not cfg.uses_personal_adapters:
            return False
        unimodal = Modality(self.data.modality) is not Modality.PAIRED
        return not (cfg.routed and unimodal and not cfg.personal_unimodal)

    def personal(self, state: RecordDict) -> AdapterSet | None:
        """This node's personal adapters (created on first use), or None when it has none
        (``keeps_personal_adapters``): then it trains and scores the shared ones alone."""
        if not self.keeps_personal_adapters:
            return None
        if PERSONAL_KEY in state.array_records:
            return self.adapters(state.array_records[PERSONAL_KEY].to_torch_state_dict())
        torch.manual_seed(self.seed(0, salt=7))
        return self.adapters()


def setup(run_config, node_config, *, keep_data: bool = True) -> ClientNode:
    """Config, backbone and data for this node (cached per process; the data not when
    ``keep_data`` is false: :func:`load_client_data`'s ``remember``).

    Data locations come from the run config, overridden by the node's ``node_config``
    in deployment (``dataset``, ``data-dir``, ``shard``, ...: ``config.NodeConfig``).
    """
    node = NodeConfig.from_flower(node_config)  # before anything is loaded
    source = node_data(RunConfig.from_flower(run_config), node)
    cfg = source.cfg
    partition_id, num_partitions = node.partition_id, node.num_partitions
    started = time.perf_counter()
    backbone = load_model(cfg.model_name, cache_dir=cfg.cache_dir or None)
    loaded = time.perf_counter()
    data = load_client_data(
        cfg,
        backbone,
        partition_id,
        num_partitions,
        shard=source.shard,
        modality=source.modality,
        remember=keep_data,
    )
    global _STARTUP_LOGGED
    if not _STARTUP_LOGGED:  # once per process: in a deployment, once per message
        _STARTUP_LOGGED = True
        age = process_age()
        startup_log.info(
            "ClientApp start-up (partition %d): process started %s s before setup; "
            "backbone %.1f s, data %.1f s",
            partition_id,
            "?" if age is None else f"{age - (time.perf_counter() - started):.1f}",
            loaded - started,
            time.perf_counter() - loaded,
        )
    if len(data.train) < 2:
        log.warning(
            "client %d holds %d training examples: too few to train; it replies "
            "num-examples=%d and the server leaves it out",
            partition_id,
            len(data.train),
            len(data.train),
        )
    return ClientNode(cfg, backbone, data, partition_id, num_partitions, source.shard)


def handle_query(node: ClientNode, config: ConfigRecord) -> dict:
    """Bootstrap (§3): describe the node; paired nodes add their group centroids."""
    out: dict = {"describe": node.describe()}
    if config.get("kind") == "bootstrap":
        groups = bootstrap_groups(
            node.backbone,
            node.data,
            int(config["prototype-slots"]),
            node.cfg.prototype_samples,
            node.seed(0),
            memo=node.memo,
        )
        if groups is not None:
            out["groups"] = groups
    return out


def settings_from(node: ClientNode, config: ConfigRecord) -> TrainSettings:
    cfg = node.cfg
    return TrainSettings(
        lr=float(config.get("lr", cfg.lr)),
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        weight_decay=cfg.weight_decay,
        temperature=cfg.temperature,
        proto_temperature=cfg.proto_temperature,
        lambda_anchor=float(config.get("lambda-anchor", cfg.lambda_anchor)),
        lambda_align=float(config.get("lambda-align", cfg.lambda_align)),
        prox_mu=float(config.get("prox-mu", cfg.client_prox_mu)),
        anchoring=bool(config.get("anchoring", cfg.uses_anchoring)),
        anchoring_loss=str(config.get("anchoring-loss", cfg.anchoring_loss)),
        steps=cfg.local_steps,
    )


def handle_train(
    node: ClientNode,
    arrays: ArrayRecord,
    config: ConfigRecord,
    prototypes: ArrayRecord | None,
    state: RecordDict,
) -> dict:
    """One client round (§4): train, then the update's statistics.

    Returns ``{"arrays": θ_k, "metrics": {...}, "stats": {...} | None}``; personal
    adapters and ``Δ`` go to ``state`` only.
    """
    server_round = int(config["server-round"])
    before_training(  # test-only
        node.cfg.faults, node.partition_id, server_round, node.cfg.round_timeout
    )
    store = node.state_store(config)
    if store is not None:
        store.sync(state, upto=server_round - 1)
    global_state = node.starting_adapters(arrays, state)
    shared = node.adapters(global_state)
    personal = node.personal(state)
    bank = None
    if prototypes is not None:
        bank = PrototypeBank.from_tensors(prototypes.to_torch_state_dict()).to(node.backbone.device)
    started = time.perf_counter()
    result = local_train(
        node.backbone,
        shared,
        personal,
        node.data,
        bank,
        settings_from(node, config),
        seed=node.seed(server_round),
    )
    trained = {k: v.detach().cpu() for k, v in shared.state_dict().items()}
    trained = corrupt_reply(node.cfg.faults, node.partition_id, server_round, trained)  # test-only
    delta = {k: trained[k] - global_state[k].cpu() for k in trained}
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    stats = None
    if bank is not None:
        previous = (
            state.array_records[PREVIOUS_DELTA_KEY].to_torch_state_dict()
            if PREVIOUS_DELTA_KEY in state.array_records
            else None
        )
        stats = client_statistics(
            node.backbone,
            node.data,
            shared,
            bank,
            delta,
            previous,
            node.cfg.prototype_samples,
            node.seed(server_round, 1),
        )
    if all(torch.isfinite(v).all() for v in delta.values()):
        state[PREVIOUS_DELTA_KEY] = ArrayRecord({k: v.contiguous() for k, v in delta.items()})
    elif PREVIOUS_DELTA_KEY in state.array_records:
        # a diverged round must not poison cos(Δ, Δ_prev), and with it every later reply
        del state[PREVIOUS_DELTA_KEY]
    if node.cfg.strategy == "local":
        state[LOCAL_KEY] = ArrayRecord({k: v.contiguous() for k, v in trained.items()})
    if personal is not None:
        state[PERSONAL_KEY] = ArrayRecord(
            {k: v.detach().cpu().contiguous() for k, v in personal.state_dict().items()}
        )
    statistics_seconds = time.perf_counter() - started
    if store is not None:
        store.save(server_round, state)
    metrics = {
        "num-examples": int(result["num_examples"]),
        "train-loss": float(result["loss"]),
        "steps": int(result["steps"]),
        "partition-id": node.partition_id,
        "modality": Modality(node.data.modality).code,
        # the client's own compute, for the round row's "seconds" (issue: where time goes)
        "train-seconds": round(train_seconds, 4),
        "statistics-seconds": round(statistics_seconds, 4),
    }
    return {"arrays": trained, "metrics": metrics, "stats": stats}


def handle_evaluate(
    node: ClientNode, arrays: ArrayRecord, state: RecordDict, config: ConfigRecord | None = None
) -> dict:
    """Personalised retrieval (§6) on the local test split: shared + personal."""
    store = node.state_store(config) if config is not None else None
    if store is not None:
        store.sync(state, upto=int(config["server-round"]))
    metrics: dict = {
        "num-examples": len(node.data.test),
        "modality": Modality(node.data.modality).code,
        "partition-id": node.partition_id,
    }
    if len(node.data.test) >= 2:
        started = time.perf_counter()
        shared = node.adapters(node.starting_adapters(arrays, state))
        recall = evaluate_retrieval(
            node.backbone,
            node.data.test,
            shared,
            node.personal(state),
            protocol=node.cfg.eval_protocol,
            batch_size=node.cfg.eval_batch_size,
            memo=node.memo,
            prefix_bytes=node.cfg.eval_prefix_bytes,
        )
        metrics.update({k: v for k, v in recall.items() if isinstance(v, float)})
        metrics["evaluate-seconds"] = round(time.perf_counter() - started, 4)
    return metrics


def light_query(run_config, node_config, config: ConfigRecord) -> dict | None:
    """QUERY kinds answered without the backbone or the data (None for the others):

    - ``size``: the federation's size, so a ServerApp can refuse minimums above it
      before anything is loaded;
    - ``release-state``: the run is over, delete this node's resume snapshots.
    """
    kind = config.get("kind")
    if kind not in ("size", "release-state"):
        return None
    node = NodeConfig.from_flower(node_config)
    if kind == "size":
        return {"partition-id": node.partition_id, "num-partitions": node.num_partitions}
    cfg = node.apply(RunConfig.from_flower(run_config))  # where setup's node kept its state
    ClientStateStore(client_state_root(cfg), str(config["state-key"]), node.partition_id).release()
    return {"released": 1}


# ------------------------------------------------------------------ message content
# What each ClientApp handler replies, from the message's content and the node's Context:
# client_app.py runs these in its own process, or hands them to the node's warm worker
# (rcsr_flower.client.node_worker), which runs the same functions.
def query_reply(content: RecordDict, context: Context) -> RecordDict:
    config = content["config"]
    light = light_query(context.run_config, context.node_config, config)
    if light is not None:  # no backbone, no data
        return RecordDict({"metrics": MetricRecord(light)})
    # every node answers the query round once: its data is not kept in the worker (a
    # simulation worker serves many clients), only on the node's disk for its first round
    node = setup(context.run_config, context.node_config, keep_data=False)
    out = handle_query(node, config)
    reply = RecordDict({"metrics": MetricRecord(out["describe"])})
    if "groups" in out:
        reply["groups"] = ArrayRecord(out["groups"])
    return reply


def train_reply(content: RecordDict, context: Context) -> RecordDict:
    node = setup(context.run_config, context.node_config)
    prototypes = content.array_records.get("prototypes")
    out = handle_train(node, content["arrays"], content["config"], prototypes, context.state)
    reply = RecordDict(
        {"arrays": ArrayRecord(out["arrays"]), "metrics": MetricRecord(out["metrics"])}
    )
    if out["stats"] is not None:
        reply["stats"] = ArrayRecord(out["stats"])
    return reply


def evaluate_reply(content: RecordDict, context: Context) -> RecordDict:
    node = setup(context.run_config, context.node_config)
    config = content.config_records.get("config")
    metrics = handle_evaluate(node, content["arrays"], context.state, config)
    return RecordDict({"metrics": MetricRecord(metrics)})


# each followed by giving what the message freed back to the system (rcsr_flower.heap): a
# Ray actor serves many clients, and its heaps would otherwise stay at the largest one's
REPLIES = {
    kind: releasing_freed_memory(fn)
    for kind, fn in {"query": query_reply, "train": train_reply, "evaluate": evaluate_reply}.items()
}
