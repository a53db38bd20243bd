"""Client-side work behind the ClientApp handlers (SPEC §3, §4, §6).

``client_app.py`` hands each message's records and the node's ``Context`` to these
functions and wraps what they return into a reply. Everything heavy (backbone, the
node's preprocessed data) is loaded once per process; what must outlive a process —
personal adapters and the previous update — lives in ``context.state`` and never
leaves the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from rcsr_flower.backbones.adapters import AdapterSet
from rcsr_flower.backbones.clip import Backbone, load_backbone
from rcsr_flower.config import RunConfig
from rcsr_flower.federation import node_data
from rcsr_flower.prototypes import PrototypeBank
from rcsr_flower.task import (
    ClientData,
    TrainSettings,
    bootstrap_groups,
    client_statistics,
    evaluate_retrieval,
    load_client_data,
    local_train,
)

log = logging.getLogger(__name__)

MODALITY_CODES = {"paired": 0, "image-only": 1, "text-only": 2}
PERSONAL_KEY = "personal-adapters"
PREVIOUS_DELTA_KEY = "previous-update"


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
            "modality": MODALITY_CODES[self.data.modality],
            "num-train": len(self.data.train),
            "num-test": len(self.data.test),
            "shard": int(self.shard),
        }

    def seed(self, server_round: int, salt: int = 0) -> int:
        return self.cfg.seed * 1_000_003 + server_round * 10_007 + self.partition_id * 101 + salt

    # -------------------------------------------------------------- personal state
    def personal(self, state: RecordDict) -> AdapterSet | None:
        """This node's personal adapters (created on first use), or None when off."""
        if not self.cfg.uses_personal_adapters:
            return None
        if PERSONAL_KEY in state.array_records:
            return self.adapters(state.array_records[PERSONAL_KEY].to_torch_state_dict())
        torch.manual_seed(self.seed(0, salt=7))
        return self.adapters()


def setup(run_config, node_config) -> ClientNode:
    """Config, backbone and data for this node (cached per process).

    Data locations come from the run config, overridden by the node's ``node_config``
    in deployment (``dataset``, ``data-dir``, ``shard``, ...: ``federation.node_data``).
    """
    source = node_data(RunConfig.from_flower(run_config), node_config)
    cfg = source.cfg
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as exc:
        raise KeyError(
            f"node_config has no {exc}: start each SuperNode with "
            '--node-config "partition-id=<i> num-partitions=<N>"'
        ) from None
    backbone = load_backbone(cfg.model_name, cache_dir=cfg.cache_dir or None)
    data = load_client_data(
        cfg, backbone, partition_id, num_partitions, shard=source.shard, modality=source.modality
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
    """Bootstrap (SPEC §3): describe the node; paired nodes add their group centroids."""
    out: dict = {"describe": node.describe()}
    if config.get("kind") == "bootstrap":
        groups = bootstrap_groups(
            node.backbone,
            node.data,
            int(config["prototype-slots"]),
            node.cfg.prototype_samples,
            node.seed(0),
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
    )


def handle_train(
    node: ClientNode,
    arrays: ArrayRecord,
    config: ConfigRecord,
    prototypes: ArrayRecord | None,
    state: RecordDict,
) -> dict:
    """One client round (SPEC §4): train, then the update's statistics.

    Returns ``{"arrays": θ_k, "metrics": {...}, "stats": {...} | None}``; personal
    adapters and ``Δ`` go to ``state`` only.
    """
    server_round = int(config["server-round"])
    global_state = arrays.to_torch_state_dict()
    shared = node.adapters(global_state)
    personal = node.personal(state)
    bank = None
    if prototypes is not None:
        bank = PrototypeBank.from_tensors(prototypes.to_torch_state_dict()).to(node.backbone.device)
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
    delta = {k: trained[k] - global_state[k].cpu() for k in trained}

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
    state[PREVIOUS_DELTA_KEY] = ArrayRecord({k: v.contiguous() for k, v in delta.items()})
    if personal is not None:
        state[PERSONAL_KEY] = ArrayRecord(
            {k: v.detach().cpu().contiguous() for k, v in personal.state_dict().items()}
        )
    metrics = {
        "num-examples": int(result["num_examples"]),
        "train-loss": float(result["loss"]),
        "steps": int(result["steps"]),
        "partition-id": node.partition_id,
        "modality": MODALITY_CODES[node.data.modality],
    }
    return {"arrays": trained, "metrics": metrics, "stats": stats}


def handle_evaluate(node: ClientNode, arrays: ArrayRecord, state: RecordDict) -> dict:
    """Personalised retrieval (SPEC §6) on the local test split: shared + personal."""
    metrics: dict = {
        "num-examples": len(node.data.test),
        "modality": MODALITY_CODES[node.data.modality],
        "partition-id": node.partition_id,
    }
    if len(node.data.test) >= 2:
        shared = node.adapters(arrays.to_torch_state_dict())
        recall = evaluate_retrieval(
            node.backbone,
            node.data.test,
            shared,
            node.personal(state),
            protocol=node.cfg.eval_protocol,
            batch_size=node.cfg.eval_batch_size,
        )
        metrics.update({k: v for k, v in recall.items() if isinstance(v, float)})
    return metrics
