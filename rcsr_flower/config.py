"""The one run-config schema: every hyperparameter of docs/algorithm.md, typed and validated.

Flower hands the app a flat ``run_config`` with kebab-case keys (``[tool.flwr.app.config]``
in pyproject.toml, overridden with ``flwr run . -c "key=value"``). ``RunConfig.from_flower``
turns it into a frozen dataclass and rejects bad input *before* any training, with one line
that names the key and the allowed values. The dataclass defaults equal the pyproject table
(a test keeps them in sync), so library users and the Flower app see the same defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rcsr_flower.faults import GRAMMAR as FAULT_GRAMMAR
from rcsr_flower.faults import FaultPlan
from rcsr_flower.modality import MODALITIES
from rcsr_flower.routing.errors import ConfigError

# Keys a resumed run may set differently from the checkpointed run: where things live,
# how long to wait, and the test-only faults. Everything else must match.
RESUME_MAY_CHANGE = frozenset(
    {
        "resume-from",
        "run-name",
        "output-dir",
        "cache-dir",
        "client-state-dir",
        "round-timeout",
        "node-wait-timeout",
        "fault-injection",
        "zero-shot-cache",  # a remembered result is the one recomputing gives
    }
)


# Keys added after runs were recorded, with the value that reproduces what those runs did
# (their config.json lacks the key). A new key whose default changes behaviour belongs
# here, or a suite would take an old run for one with the new default.
# A callable takes the old run's config and returns that value, or None where the key
# changes nothing for such a run.
def _personal_unimodal_before(ran: dict) -> bool | None:
    """Every client kept personal adapters; that mattered only where RCSR kept them."""
    return True if ran.get("strategy") == "rcsr" and ran.get("personal-adapters") else None


BEFORE_KEY_EXISTED: dict[str, Any] = {
    "local-test-items": "0",  # the held-out tenth alone
    "personal-unimodal": _personal_unimodal_before,
}


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    return {"range": (lo, hi, lo_open)}


# node_config key (a SuperNode's --node-config): seconds the node's warm worker waits
# for its next message (client/node_worker.py; 0 = no worker)
WORKER_IDLE_KEY = "worker-idle-s"

# string keys that may not be empty: there is no default to fall back on
_NON_EMPTY = ("model-name", "dataset", "output-dir", "partition-by")

EMBEDDED = "embedded"
"""``model-name`` and ``dataset`` of the project's own tiny CLIP and corpus (``assets``)."""
EMBEDDED_CONTENT = "color"
EMBEDDED_LOCAL_TEST = 50  # local-test-items = "auto" on the embedded benchmark
EMBEDDED_TRAIN_ITEMS = 6000  # the embedded corpus's own training items (CorpusSpec().n_train)
"""The embedded corpus's content groups for ``partition-by = "auto"``: the object colour,
the attribute its captions and the frozen tiny CLIP depend on most (docs/algorithm.md)."""


@dataclass(frozen=True)
class RunConfig:
    """Run configuration; field ``foo_bar`` is run-config key ``foo-bar``."""

    # data and backbone (§1, §2)
    model_name: str = EMBEDDED
    dataset: str = EMBEDDED
    data_dir: str = ""
    dataset_format: str = field(default="auto", metadata=_choice("auto", "karpathy", "hf"))
    image_column: str = "image"
    caption_column: str = "caption"
    split_column: str = ""
    cache_dir: str = ""
    eval_max_images: int = field(default=1000, metadata=_range(0))
    train_max_items: int = field(default=750, metadata=_range(0))
    # the embedded corpus's training items: its own 6000, or more for many clients (the
    # same corpus with items appended: embedded.corpus.ExtendedCorpusSpec)
    embedded_train_items: int = field(
        default=EMBEDDED_TRAIN_ITEMS,
        metadata={
            **_range(EMBEDDED_TRAIN_ITEMS),
            "fix": "the embedded corpus has its 6000 training items or more; to train "
            "on fewer, set train-max-items",
        },
    )
    loader_workers: int = field(default=0, metadata=_range(0))
    data_cache_gb: float = field(default=4.0, metadata=_range(0.0))
    # partition (§1)
    partitioning: str = field(default="dirichlet", metadata=_choice("dirichlet", "iid"))
    # what the Dirichlet splits over: "kmeans" (clusters of caption embeddings), the name
    # of a content attribute the dataset records per item, or "auto" (partition_attribute)
    partition_by: str = "auto"
    partition_sizes: str = field(default="equal", metadata=_choice("dirichlet", "equal"))
    partition_clusters: int = field(default=50, metadata=_range(1))
    alpha: float = field(default=0.1, metadata=_range(0.0, lo_open=True))
    missing_rate: float = field(default=0.5, metadata=_range(0.0, 1.0))
    local_test_fraction: float = field(default=0.1, metadata=_range(0.0, 0.9))
    # a number: each client's local test split topped up to this many items with unused
    # ones (0 = the held-out part alone); "auto": local_test_size
    local_test_items: str = "auto"
    # federation (§1)
    num_server_rounds: int = field(default=20, metadata=_range(1))
    fraction_train: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))
    fraction_evaluate: float = field(default=1.0, metadata=_range(0.0, 1.0))
    min_train_nodes: int = field(default=2, metadata=_range(1))
    min_evaluate_nodes: int = field(default=2, metadata=_range(0))
    min_available_nodes: int = field(default=2, metadata=_range(1))
    round_timeout: float = field(default=3600.0, metadata=_range(0.0, lo_open=True))
    node_wait_timeout: float = field(default=600.0, metadata=_range(0.0, lo_open=True))
    max_update_norm: float = field(default=0.0, metadata=_range(0.0))  # 0 = no bound
    local_epochs: int = field(default=1, metadata=_range(1))
    local_steps: int = field(default=10, metadata=_range(0))  # > 0: overrides local-epochs
    batch_size: int = field(default=64, metadata=_range(2))
    lr: float = field(default=1e-3, metadata=_range(0.0, lo_open=True))
    weight_decay: float = field(default=0.01, metadata=_range(0.0))
    warmup_rounds: int = field(default=10, metadata=_range(0))
    min_lr_ratio: float = field(default=0.01, metadata=_range(0.0, 1.0))
    # model (§2)
    adapter_layers: str = "all"
    adapter_bottleneck: int = field(default=64, metadata=_range(1))
    adapter_init_std: float = field(default=0.02, metadata=_range(0.0))
    prefix_cache: bool = True  # frozen prefixes: training (adapter-layers = L), evaluation
    zero_shot_cache: bool = True  # round 0 and the bootstrap: the frozen backbone's results
    # prototypes (§3)
    prototype_slots: int = field(default=32, metadata=_range(1))
    prototype_momentum: float = field(default=0.95, metadata=_range(0.0, 1.0))
    prototype_samples: int = field(default=512, metadata=_range(1))
    # client loss (§4)
    temperature: float = field(default=0.07, metadata=_range(0.0, lo_open=True))
    proto_temperature: float = field(default=0.07, metadata=_range(0.0, lo_open=True))
    lambda_anchor: float = field(default=1.0, metadata=_range(0.0))
    lambda_align: float = field(default=0.1, metadata=_range(0.0))
    lambda_stab: float = field(default=0.01, metadata=_range(0.0))
    anchoring_loss: str = field(default="soft", metadata=_choice("soft", "ce"))
    # server (§5)
    strategy: str = field(
        default="rcsr", metadata=_choice("rcsr", "fedavg", "fedprox", "fedper", "local")
    )
    router: bool = True
    minimax: bool = True
    # prototype anchoring (unimodal clients' loss, L_proto on paired ones): off by default,
    # because anchored updates carry nothing the paired clients share and cost the global
    # model where clients do not drift (docs/algorithm.md, "Anchoring off by default")
    anchoring: bool = False
    personal_adapters: bool = False
    # unimodal clients keep personal adapters too (RCSR only): they have no pairs to
    # personalise the alignment with, only anchoring, and measured it lowers their own
    # retrieval (docs/algorithm.md, "Personal adapters and unimodal clients")
    personal_unimodal: bool = False
    prox: bool = True
    tower_aggregation: bool = True  # §5 step 5 (ours, revised); every strategy
    aggregate_unimodal: bool = True  # false: only paired clients' updates are averaged
    server_lr: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    proximal_mu: float = field(default=0.01, metadata=_range(0.0))
    router_hidden: int = field(default=128, metadata=_range(1))
    router_heads: int = field(default=4, metadata=_range(1))
    router_blocks: int = field(default=2, metadata=_range(0))
    router_dropout: float = field(default=0.1, metadata=_range(0.0, 1.0))
    router_lr: float = field(default=1e-3, metadata=_range(0.0))
    beta_image: float = 1.0
    beta_text: float = 1.0
    beta_entropy: float = 0.1
    beta_axis: float = 0.3
    minimax_eta: float = field(default=0.1, metadata=_range(0.0))
    minimax_tau: float = field(default=0.1, metadata=_range(0.0))
    # evaluation and outputs (§6)
    eval_every: int = field(default=1, metadata=_range(0))
    eval_protocol: str = field(default="standard", metadata=_choice("standard", "paired"))
    eval_batch_size: int = field(default=256, metadata=_range(1))
    seed: int = 0
    run_name: str = ""
    output_dir: str = "outputs"
    # faults and resume (docs/faults-and-resume.md)
    resume_from: str = ""
    client_state_dir: str = ""
    fault_injection: str = ""  # test-only

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_flower(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's kebab-case ``run_config``; unknown keys are an error."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in fields:
                known = [k.replace("_", "-") for k in fields]
                close = difflib.get_close_matches(key, known, n=3) or [
                    k for k in known if k.split("-")[0] == key.split("-")[0]
                ]
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ConfigError(
                    f"unknown run-config key '{key}'{hint}; see docs/configuration.md"
                )
            values[name] = _coerce(key, value, fields[name])
        config = cls(**values)
        config.validate()
        return config

    def to_flower(self) -> dict[str, Any]:
        """The kebab-case mapping, e.g. for ``resolved_config.json``."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def validate(self) -> None:
        """Check every choice and range; raise ``ConfigError`` naming the key."""
        for f in dataclasses.fields(self):
            _check_field("run-config", f.name.replace("_", "-"), getattr(self, f.name), f.metadata)
        if self.adapter_layers != "all" and not (
            self.adapter_layers.isdigit() and int(self.adapter_layers) > 0
        ):
            raise ConfigError(
                f"run-config 'adapter-layers' = {self.adapter_layers!r}: "
                "allowed values are 'all' or a positive number of last blocks, e.g. '4'"
            )
        if self.local_test_items != "auto" and not self.local_test_items.isdigit():
            raise ConfigError(
                f"run-config 'local-test-items' = {self.local_test_items!r}: allowed values "
                "are 'auto' or a number of items >= 0, e.g. 50"
            )
        if self.embedded_train_items != EMBEDDED_TRAIN_ITEMS and not self.embedded:
            raise ConfigError(
                f"run-config 'embedded-train-items' = {self.embedded_train_items} sizes the "
                f"embedded corpus, and dataset = {self.dataset!r}: leave it at "
                f"{EMBEDDED_TRAIN_ITEMS} (cap another dataset with train-max-items)"
            )
        for key in _NON_EMPTY:
            if not getattr(self, key.replace("-", "_")).strip():
                raise ConfigError(f"run-config '{key}' is empty: allowed is any non-empty string")
        if self.router_hidden % self.router_heads:
            raise ConfigError(
                f"run-config 'router-heads' = {self.router_heads} does not divide "
                f"'router-hidden' = {self.router_hidden}: allowed are its divisors"
            )
        try:
            FaultPlan.parse(self.fault_injection)
        except ValueError as exc:
            raise ConfigError(
                f"run-config 'fault-injection' = {self.fault_injection!r}: {exc}; "
                f"allowed are '' or {FAULT_GRAMMAR}"
            ) from None

    def check_federation(self, num_clients: int) -> None:
        """The federation must have the clients the minimums ask for: Flower's sampling
        would otherwise wait forever for nodes that do not exist."""
        needs = {
            "min-available-nodes": self.min_available_nodes,
            "min-train-nodes": self.min_train_nodes,
        }
        if self.fraction_evaluate > 0:
            needs["min-evaluate-nodes"] = self.min_evaluate_nodes
        for key, value in needs.items():
            if value > num_clients:
                raise ConfigError(
                    f"run-config '{key}' = {value} but the federation has {num_clients} "
                    f"clients (num-partitions): allowed [1, {num_clients}]"
                )

    # ------------------------------------------------------------- derived
    @property
    def embedded(self) -> bool:
        """Whether the run uses the project's embedded offline benchmark."""
        return self.dataset == "embedded"

    @property
    def local_test_size(self) -> int:
        """What ``local-test-items`` means for this dataset: ``"auto"`` tops the embedded
        benchmark's local test splits up to ``EMBEDDED_LOCAL_TEST`` items and leaves any
        other dataset's held-out split alone (a real dataset's k-means partition cannot
        place unused items in its clients' mixes)."""
        if self.local_test_items != "auto":
            return int(self.local_test_items)
        return EMBEDDED_LOCAL_TEST if self.embedded else 0

    @property
    def partition_attribute(self) -> str:
        """What ``partition-by`` means for this dataset: ``"auto"`` is the embedded
        corpus's content groups (``EMBEDDED_CONTENT``) and k-means of caption embeddings
        for any other dataset, which records no such groups."""
        if self.partition_by != "auto":
            return self.partition_by
        return EMBEDDED_CONTENT if self.embedded else "kmeans"

    @property
    def routed(self) -> bool:
        """RCSR proper (router, minimax, prototypes) rather than a baseline."""
        return self.strategy == "rcsr"

    @property
    def faults(self) -> FaultPlan:
        """The test-only ``fault-injection`` plan (empty in real runs)."""
        return FaultPlan.parse(self.fault_injection)

    @property
    def eval_prefix_bytes(self) -> float:
        """What an evaluation split's cached frozen prefix may take (0 = not cached):
        ``prefix-cache`` turns it on and off, ``data-cache-gb`` bounds it."""
        return self.data_cache_gb * 2**30 if self.prefix_cache else 0.0

    @property
    def uses_anchoring(self) -> bool:
        return self.routed and self.anchoring

    @property
    def uses_personal_adapters(self) -> bool:
        return self.strategy == "fedper" or (self.routed and self.personal_adapters)

    @property
    def client_prox_mu(self) -> float:
        """The proximal coefficient a client applies: λ_stab (RCSR), μ (FedProx), or 0."""
        if self.strategy == "fedprox":
            return self.proximal_mu
        return self.lambda_stab if self.routed and self.prox else 0.0

    def lr_at(self, server_round: int) -> float:
        """§1 schedule: linear warm-up, then cosine to ``min_lr_ratio`` of the base lr.

        Warm-up lasts ``warmup_rounds`` capped at a tenth of the rounds.
        """
        import math

        total = self.num_server_rounds
        warmup = min(self.warmup_rounds, total // 10)
        if warmup > 0 and server_round <= warmup:
            return self.lr * server_round / warmup
        span = max(total - warmup, 1)
        progress = min(max(server_round - warmup - 1, 0) / max(span - 1, 1), 1.0)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _check_field(source: str, key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """A value against its field's choices and range; ``ConfigError`` naming the key, and
    the field's ``fix`` where it has one. A ranged NaN is out of range (it compares false
    with every bound)."""
    fix = f"; {meta['fix']}" if "fix" in meta else ""
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{source} '{key}' = {value!r}: allowed values are {allowed}{fix}")
    if "range" in meta:
        lo, hi, lo_open = meta["range"]
        bad_lo = lo is not None and not (value > lo if lo_open else value >= lo)
        bad_hi = hi is not None and not value <= hi
        if bad_lo or bad_hi:
            left = "(" if lo_open else "["
            lo_s = "-inf" if lo is None else f"{lo:g}"
            hi_s = "inf)" if hi is None else f"{hi:g}]"
            raise ConfigError(
                f"{source} '{key}' = {value!r} is out of range: allowed {left}{lo_s}, {hi_s}{fix}"
            )


_PARTITION_FIX = (
    'start each SuperNode with --node-config "partition-id=<i> num-partitions=<N>" '
    "(integers, 0 <= i < N)"
)
_IDLE_FIX = (
    "set it to how long the node's worker waits for a message before it exits "
    f'(e.g. --node-config "... {WORKER_IDLE_KEY}=600"), or 0 for no worker'
)


def _location(name: str) -> Any:
    """A node_config field that replaces run-config field ``name`` on the node: unset
    (None) keeps the run config's value; a set one obeys the run config's choices."""
    meta = RunConfig.__dataclass_fields__[name].metadata
    return field(default=None, metadata={**meta, "location": True})


@dataclass(frozen=True)
class NodeConfig:
    """One SuperNode's ``node_config``: who it is in the federation, where its data is,
    whether it keeps a warm worker. Field ``foo_bar`` is key ``foo-bar``.

    In simulation Flower sets ``partition-id`` and ``num-partitions`` and nothing else; a
    deployed SuperNode gets what its ``--node-config`` says. ``from_flower`` is the only
    reader of that mapping, so a typo'd key or a wrong value stops the node's first message
    with one line naming the key, the value and the fix, as ``RunConfig`` does for the run.
    """

    partition_id: int = field(metadata={**_range(0), "fix": _PARTITION_FIX})
    num_partitions: int = field(metadata={**_range(1), "fix": _PARTITION_FIX})
    # true: the node's dataset is its own shard, not a copy of the whole (federation.py)
    shard: bool = field(
        default=False, metadata={"fix": "shard=true (own shard) or shard=false (a copy)"}
    )
    # shard only: the modality this node holds; None: what missing-rate and seed give it
    modality: str | None = field(default=None, metadata=_choice(*MODALITIES))
    worker_idle_s: float = field(default=0.0, metadata={**_range(0.0), "fix": _IDLE_FIX})
    # where this node's data and checkpoint are: they replace the run config's values,
    # which describe the server's machine
    dataset: str | None = _location("dataset")
    data_dir: str | None = _location("data_dir")
    dataset_format: str | None = _location("dataset_format")
    image_column: str | None = _location("image_column")
    caption_column: str | None = _location("caption_column")
    split_column: str | None = _location("split_column")
    model_name: str | None = _location("model_name")
    cache_dir: str | None = _location("cache_dir")

    @classmethod
    def from_flower(cls, node_config: Mapping[str, Any]) -> NodeConfig:
        """Build from Flower's kebab-case ``node_config``; unknown keys are an error."""
        fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in node_config.items():
            if key not in fields:
                raise ConfigError(_unknown_node_key(key, list(fields)))
            values[fields[key].name] = _node_value(key, value, fields[key])
        for key in ("partition-id", "num-partitions"):
            if fields[key].name not in values:
                raise ConfigError(f"node_config has no '{key}': {_PARTITION_FIX}")
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Check every choice and range, and how the keys go together."""
        for f in dataclasses.fields(self):
            key, value = f.name.replace("_", "-"), getattr(self, f.name)
            if value is None:
                continue
            _check_field("node_config", key, value, f.metadata)
            if key in _NON_EMPTY and not value.strip():
                raise ConfigError(
                    f"node_config '{key}' is empty: allowed is any non-empty string, "
                    f"or leave {key} out for the run config's"
                )
        if self.partition_id >= self.num_partitions:
            raise ConfigError(
                f"node_config 'partition-id' = {self.partition_id} is out of range: allowed "
                f"[0, {self.num_partitions}) (num-partitions = {self.num_partitions}); "
                "set partition-id and num-partitions consistently for every SuperNode"
            )
        if self.modality is not None and not self.shard:
            raise ConfigError(
                f"node_config 'modality' = {self.modality!r} is allowed only with shard=true "
                "(a copy holds the modality missing-rate and seed give it): add shard=true "
                "or leave modality out"
            )
        if self.shard and self.dataset is None:
            raise ConfigError(
                "node_config shard=true needs the node's own dataset: add dataset='/path/...'"
            )

    @property
    def locations(self) -> dict[str, str]:
        """The run-config fields this node replaces, by field name. A node that names its
        own ``dataset`` without a ``data-dir`` gets ``data_dir = ""`` (images next to its
        JSON), not the server's image root."""
        changes = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get("location") and getattr(self, f.name) is not None
        }
        if self.dataset is not None and self.data_dir is None:
            changes["data_dir"] = ""
        return changes

    def apply(self, cfg: RunConfig) -> RunConfig:
        """The run config as this node sees it: its locations in place of the server's
        (``cfg`` itself when it sets none, as in simulation)."""
        changes = self.locations
        return cfg.replace(**changes) if changes else cfg


def _unknown_node_key(key: str, known: list[str]) -> str:
    """The error for a key NodeConfig lacks: the close ones, or where a run-config key goes."""
    run_keys = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    if key in run_keys:
        nodes = ", ".join(k for k in known if k in run_keys)
        hint = (
            f": '{key}' is a run-config key, the same for every node "
            f'(flwr run -c "{key}=..."); of those a node may replace only {nodes}'
        )
    else:
        close = difflib.get_close_matches(key, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else f"; allowed: {', '.join(known)}"
    return f"unknown node_config key '{key}'{hint}; see docs/configuration.md, \"Per node\""


def _node_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    """TOML's value for a NodeConfig field, or a ``ConfigError`` that says how to write it."""
    kind = {"int": int, "float": float, "bool": bool, "str | None": str}[f.type]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and number and isinstance(value, int):
        return value
    if kind is float and number:
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is str:
        fix = f"quote it, --node-config \"... {key}='{value}'\""
    else:
        fix = f.metadata.get("fix", "")
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    raise ConfigError(f"node_config '{key}' = {value!r} must be {words[kind]}: {fix}")


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Accept TOML's types; ints for floats; reject anything else with a clear message."""
    kind = (
        f.type
        if isinstance(f.type, type)
        else {"str": str, "int": int, "float": float, "bool": bool}[f.type]
    )
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
        numeric = ("adapter_layers", "local_test_items")  # str fields that take a number too
        if isinstance(value, int) and not isinstance(value, bool) and f.name in numeric:
            return str(value)
    raise ConfigError(
        f"run-config '{key}' = {value!r} has type {type(value).__name__}; expected {kind.__name__}"
    )
