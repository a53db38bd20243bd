"""Semantic non-IID partition of a training set over federated clients (§1).

Real image-text corpora have no class labels, so "label skew" is made semantic: the caller
embeds every training caption with the frozen backbone, :func:`semantic_clusters` k-means
those embeddings into ``partition-clusters`` pseudo-labels, and Flower Datasets'
``DirichletPartitioner`` splits the items by Dirichlet(``alpha``) over those labels (IID:
``IidPartitioner``). Then a ``missing-rate`` share of clients loses one modality
(:func:`assign_modalities`) and every client sets aside a local test split that keeps both
modalities (the modality flag only restricts what the client trains on).

The result is a plain, JSON-serialisable :class:`Partition` of indices, identical for identical
inputs and seed, so runs can cache it and reviewers can read it.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rcsr_flower.modality import MODALITIES, Modality

__all__ = [
    "MODALITIES",
    "PARTITIONINGS",
    "ClientPartition",
    "Modality",
    "Partition",
    "assign_modalities",
    "content_labels",
    "make_partition",
    "semantic_clusters",
    "shard_partition",
    "split_by_label",
    "split_by_label_equal",
    "split_iid",
    "top_up_local_tests",
]

PARTITIONINGS = ("dirichlet", "iid")
KMEANS = "kmeans"  # partition-by: pseudo-labels from k-means over caption embeddings
FILE_FORMAT = "rcsr-flower-partition"
FILE_VERSION = 1

# Independent random streams per step, so e.g. changing missing-rate does not move items.
_STREAM_MODALITY = 1
_STREAM_LOCAL_TEST = 2
_STREAM_EQUAL = 3
_STREAM_TEST_POOL = 4


@dataclass(frozen=True)
class ClientPartition:
    """One client's share: ``train`` is used under ``modality``; ``test`` keeps both."""

    client_id: int
    modality: Modality
    train: tuple[int, ...]
    test: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.train) + len(self.test)


@dataclass(frozen=True)
class Partition:
    """Clients' index sets into the dataset the partition was made from, plus provenance."""

    clients: tuple[ClientPartition, ...]
    cluster_labels: tuple[int, ...] | None
    settings: dict

    @property
    def num_partitions(self) -> int:
        return len(self.clients)

    @property
    def num_items(self) -> int:
        return int(self.settings["num_items"])

    # ---- serialisation -------------------------------------------------------------------

    def to_json(self, path: str | os.PathLike) -> None:
        """Write atomically (tmp file + ``os.replace``): a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(self._dumps())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def _dumps(self) -> str:
        """One line per client, header fields first: readable and byte-deterministic."""
        lines = [
            "{",
            f'  "format": "{FILE_FORMAT}",',
            f'  "version": {FILE_VERSION},',
            f'  "settings": {json.dumps(self.settings, sort_keys=True)},',
            '  "clients": [',
        ]
        for k, c in enumerate(self.clients):
            entry = {
                "client_id": c.client_id,
                "modality": c.modality,
                "num_train": len(c.train),
                "num_test": len(c.test),
                "train": list(c.train),
                "test": list(c.test),
            }
            comma = "," if k < len(self.clients) - 1 else ""
            lines.append(f"    {json.dumps(entry)}{comma}")
        lines.append("  ],")
        labels = None if self.cluster_labels is None else list(self.cluster_labels)
        lines.append(f'  "cluster_labels": {json.dumps(labels)}')
        lines.append("}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> Partition:
        """Read and validate a file written by :meth:`to_json`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"partition file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(
                f"partition file {path} is not valid JSON ({e}); delete it to recompute the "
                "partition"
            ) from e
        return _partition_from_dict(data, f"partition file {path}")

    # ---- reports ---------------------------------------------------------------------------

    def summary(self) -> str:
        """A table per client: modality, sizes, clusters present and the top cluster's share."""
        s = self.settings
        head = (
            f"partition: {s.get('partitioning')}, {self.num_partitions} clients, "
            f"{s.get('num_items')} items"
        )
        if self.cluster_labels is not None:
            head += f", {s.get('num_clusters_used')} clusters (alpha={s.get('alpha')})"
        head += (
            f", missing-rate={s.get('missing_rate')}, "
            f"local-test-fraction={s.get('local_test_fraction')}, seed={s.get('seed')}"
        )
        columns = ("client", "modality", "#train", "#test", "#clusters", "top cluster")
        rows = [head, "{:>6}  {:<10}  {:>7}  {:>6}  {:>9}  {:>11}".format(*columns)]
        for c in self.clients:
            if self.cluster_labels is None or c.size == 0:
                n_clusters, top = "-", "-"
            else:
                labels = self.cluster_labels
                counts = Counter(labels[i] for i in (*c.train, *c.test) if i < len(labels))
                n_clusters = str(len(counts))
                top = f"{100.0 * max(counts.values()) / counts.total():.1f}%"
            rows.append(
                f"{c.client_id:>6}  {c.modality:<10}  {len(c.train):>7}  {len(c.test):>6}  "
                f"{n_clusters:>9}  {top:>11}"
            )
        n_train = sum(len(c.train) for c in self.clients)
        n_test = sum(len(c.test) for c in self.clients)
        rows.append(f"{'total':>6}  {'':<10}  {n_train:>7}  {n_test:>6}")
        return "\n".join(rows)

    def problems(self, batch_size: int) -> list[str]:
        """Clients that cannot train or be evaluated as configured, one sentence each.

        An empty local test split is only reported when ``local_test_fraction`` > 0.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch-size must be an integer >= 1, got {batch_size!r}")
        check_test = float(self.settings.get("local_test_fraction", 1.0)) > 0
        out = []
        for c in self.clients:
            who = f"client {c.client_id} ({c.modality})"
            if c.size == 0:
                out.append(f"{who}: no data at all (empty train and local test split)")
                continue
            if not c.train:
                out.append(f"{who}: empty train split")
            elif len(c.train) < batch_size:
                out.append(
                    f"{who}: {len(c.train)} train example{'s' if len(c.train) > 1 else ''}, "
                    f"fewer than one batch (batch-size {batch_size})"
                )
            if check_test and not c.test:
                out.append(f"{who}: empty local test split")
        return out


# --------------------------------------------------------------------------------------------
# Building blocks


def semantic_clusters(embeddings: np.ndarray, num_clusters: int, seed: int) -> np.ndarray:
    """k-means pseudo-labels of L2-normalised rows (cosine geometry, like CLIP retrieval).

    ``num_clusters`` is clamped to the number of distinct rows, so tiny inputs neither fail
    nor warn. Deterministic by ``seed``.
    """
    from sklearn.cluster import KMeans

    x = _check_embeddings(embeddings)
    _check_int("partition-clusters", num_clusters, 1)
    _check_seed(seed)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    k = min(num_clusters, _count_distinct_rows(x))
    if k <= 1:
        return np.zeros(len(x), dtype=np.int64)
    # One k-means++ init (sklearn's own default for it): ~30 s for COCO's 113k x 512 on 2 cores.
    km = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed)
    return km.fit_predict(x).astype(np.int64)


def split_by_label(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[list[int]]:
    """Dirichlet label-skew split with Flower Datasets' ``DirichletPartitioner``.

    Driven so it never raises for valid input: ``min_partition_size=0`` (no resampling loop,
    whose 10 failed tries would raise for small data / small alpha), ``self_balancing=False``
    (plain Dirichlet proportions, as specified), ``shuffle=False`` (we sort indices anyway). The
    partitioner refuses more partitions than rows, so with ``num_partitions > len(labels)``
    only the first ``len(labels)`` partitions are drawn and the rest stay empty.
    """
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    y = _label_split_input(labels, num_partitions, alpha, seed)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    if y.size == 0:
        return parts
    # Arrow format: column reads inside the partitioner and below are one columnar copy, not a
    # Python loop over rows (the default Column iteration takes ~20 s for COCO's 113k rows).
    ds = datasets.Dataset.from_dict(
        {"idx": np.arange(len(y), dtype=np.int64), "cluster": y.astype(np.int64)}
    ).with_format("arrow")
    partitioner = DirichletPartitioner(
        num_partitions=min(num_partitions, len(y)),
        partition_by="cluster",
        alpha=float(alpha),
        min_partition_size=0,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = ds
    for i in range(partitioner.num_partitions):
        parts[i] = _indices(partitioner.load_partition(i))
    return parts


def split_by_label_equal(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[list[int]]:
    """Dirichlet label skew with *equal* client sizes (§1's equal-size option).

    Each client draws its mix ``q_k ~ Dir(alpha)`` over the labels, as in
    :func:`split_by_label`, but every client gets ``n // N`` items (the first ``n % N``
    one more). In a seeded random order, each client in turn fills its whole quota, one
    item at a time, a label drawn by its ``q_k`` among the labels that still have items.
    Filling a client at once keeps its mix: clients that took turns item by item raced for
    the popular labels and ended with every client holding two to four of eight labels;
    filled in turn, a client's draw concentrates on its own labels, and the last ones take
    the labels the others left, which are few by then. Sizes are equal, so equal local work
    (``local-steps``) no longer lets large clients dominate, while the mix stays skewed.
    """
    y = _label_split_input(labels, num_partitions, alpha, seed)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    if y.size == 0:
        return parts
    rng = np.random.default_rng([_STREAM_EQUAL, seed])
    values = np.unique(y)
    pools = [list(rng.permutation(np.flatnonzero(y == v))) for v in values]
    mix = rng.dirichlet(np.full(len(values), float(alpha)), size=num_partitions)
    base, extra = divmod(len(y), num_partitions)
    left = np.array([len(p) for p in pools], dtype=np.float64)
    for k in rng.permutation(num_partitions):
        for _ in range(base + (k < extra)):
            p = mix[k] * (left > 0)
            if p.sum() <= 0:  # the client's labels are used up (or underflowed to 0)
                p = left.copy()
            g = int(rng.choice(len(values), p=p / p.sum()))
            parts[k].append(int(pools[g].pop()))
            left[g] -= 1
    return [sorted(p) for p in parts]


def content_labels(
    attributes: Sequence[dict | None], key: str, names: Sequence[str] | None = None
) -> np.ndarray:
    """Integer labels of a content attribute (``partition-by``) that the dataset records
    per item, e.g. the embedded corpus's object ``color``: label-skew over content groups,
    as label-Dirichlet splits do in classification benchmarks.

    The labels index ``names`` (default: the sorted values present); a value outside the
    given ``names`` gets -1, so items outside a partition can be labelled in its groups."""
    values = []
    for i, attrs in enumerate(attributes):
        if not attrs or key not in attrs:
            known = sorted(attrs) if attrs else []
            raise ValueError(
                f"partition-by = {key!r}: item {i} of the training split records no such "
                f"attribute (it records {known or 'none'}); use partition-by = '{KMEANS}' "
                "(clusters of caption embeddings) or one of the recorded attributes"
            )
        values.append(str(attrs[key]))
    index = {v: j for j, v in enumerate(sorted(set(values)) if names is None else names)}
    return np.array([index.get(v, -1) for v in values], dtype=np.int64)


def split_iid(n: int, num_partitions: int, seed: int) -> list[list[int]]:
    """IID split with Flower Datasets' ``IidPartitioner`` over a seeded permutation.

    ``IidPartitioner`` shards contiguously, so the rows are permuted by ``seed`` first.
    """
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    _check_int("num_items", n, 0)
    _check_int("num_partitions", num_partitions, 1)
    _check_seed(seed)
    parts: list[list[int]] = [[] for _ in range(num_partitions)]
    if n == 0:
        return parts
    perm = np.random.default_rng(seed).permutation(n).astype(np.int64)
    partitioner = IidPartitioner(num_partitions=min(num_partitions, n))  # shard needs <= n
    partitioner.dataset = datasets.Dataset.from_dict({"idx": perm}).with_format("arrow")
    for i in range(partitioner.num_partitions):
        parts[i] = _indices(partitioner.load_partition(i))
    return parts


def assign_modalities(num_partitions: int, missing_rate: float, seed: int) -> list[Modality]:
    """Which clients lose a modality: ``round(missing_rate * N)`` of them (half up).

    Half of those are image-only and half text-only; with an odd count the extra one is
    image-only (N=10, rate 0.5 -> 5 paired, 3 image-only, 2 text-only). Which clients, by seed.
    """
    _check_int("num_partitions", num_partitions, 1)
    _check_rate("missing-rate", missing_rate, hi_open=False)
    _check_seed(seed)
    n_missing = min(num_partitions, math.floor(missing_rate * num_partitions + 0.5 + 1e-9))
    n_image_only = (n_missing + 1) // 2
    order = np.random.default_rng([_STREAM_MODALITY, seed]).permutation(num_partitions)
    out: list[Modality] = ["paired"] * num_partitions
    for rank, client in enumerate(order[:n_missing]):
        out[int(client)] = "image-only" if rank < n_image_only else "text-only"
    return out


def make_partition(
    embeddings: np.ndarray | None,
    num_items: int,
    num_partitions: int,
    *,
    partitioning: str = "dirichlet",
    num_clusters: int = 50,
    alpha: float = 0.1,
    missing_rate: float = 0.5,
    local_test_fraction: float = 0.1,
    seed: int = 0,
    labels: np.ndarray | None = None,
    equal_sizes: bool = False,
) -> Partition:
    """The full §1 partition: clusters -> Dirichlet (or IID) -> modalities -> local test.

    ``embeddings`` (one row per item, e.g. mean caption embedding) are required for
    ``"dirichlet"`` unless ``labels`` (content groups, :func:`content_labels`) are given,
    and ignored (but shape-checked) for ``"iid"``. ``equal_sizes`` draws the Dirichlet mix
    with equal client sizes (:func:`split_by_label_equal`). Empty clients are allowed;
    :meth:`Partition.problems` reports them.
    """
    if partitioning not in PARTITIONINGS:
        raise ValueError(
            f"partitioning must be one of {', '.join(map(repr, PARTITIONINGS))}, "
            f"got {partitioning!r}"
        )
    _check_int("num_items", num_items, 0)
    _check_int("num_partitions", num_partitions, 1)
    _check_int("partition-clusters", num_clusters, 1)
    _check_alpha(alpha)
    _check_rate("missing-rate", missing_rate, hi_open=False)
    _check_rate("local-test-fraction", local_test_fraction, hi_open=True)
    _check_seed(seed)
    if embeddings is not None:
        rows = np.shape(embeddings)[0] if np.ndim(embeddings) else None
        if rows != num_items:
            raise ValueError(
                f"embeddings have {rows} rows but num_items is {num_items}; pass one embedding "
                "row per dataset item"
            )
    elif partitioning == "dirichlet" and labels is None:
        raise ValueError(
            "partitioning 'dirichlet' needs the caption embeddings of every item or content "
            "labels (embeddings=None is only valid with partitioning 'iid')"
        )
    given = labels is not None
    if given:
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (num_items,):
            raise ValueError(f"labels have shape {labels.shape}, expected ({num_items},)")
    if partitioning != "dirichlet":
        labels = None

    if partitioning == "dirichlet" and num_items > 0:
        if not given:
            labels = semantic_clusters(embeddings, num_clusters, seed)
        split = split_by_label_equal if equal_sizes else split_by_label
        splits = split(labels, num_partitions, alpha, seed)
    elif partitioning == "dirichlet":
        labels = np.zeros(0, dtype=np.int64)
        splits = [[] for _ in range(num_partitions)]
    else:
        splits = split_iid(num_items, num_partitions, seed)

    modalities = assign_modalities(num_partitions, missing_rate, seed)
    clients = []
    for cid, items in enumerate(splits):
        train, test = _local_test_split(items, local_test_fraction, seed, cid)
        clients.append(ClientPartition(cid, modalities[cid], train, test))

    settings: dict[str, Any] = {
        "partitioning": partitioning,
        "num_items": int(num_items),
        "num_partitions": int(num_partitions),
        "num_clusters": int(num_clusters),
        "num_clusters_used": None if labels is None else len(np.unique(labels)),
        "alpha": float(alpha),
        "missing_rate": float(missing_rate),
        "local_test_fraction": float(local_test_fraction),
        "seed": int(seed),
    }
    if given:
        settings["labels"] = "given"
    if equal_sizes:
        settings["equal_sizes"] = True
    return Partition(
        clients=tuple(clients),
        cluster_labels=None if labels is None else tuple(int(v) for v in labels),
        settings=settings,
    )


def top_up_local_tests(
    partition: Partition,
    items: int,
    pool: Sequence[int],
    pool_labels: Sequence[int] | None = None,
    seed: int = 0,
) -> Partition:
    """Each client's local test split topped up to ``items`` from ``pool``: dataset items
    that no client holds (those past ``train-max-items``).

    Why: a held-out tenth of a data-limited client is a handful of items, too few to tell
    one method's client-level retrieval from another's. The extra items follow the
    client's own data: with ``pool_labels`` (the pool's content groups, as the partition's
    ``cluster_labels``; -1 = none of them) each client draws in the proportions of its
    training items' groups, without them uniformly (an IID partition). No pool item goes
    to two clients; training splits are untouched, so training is the same as without.
    """
    _check_int("local-test-items", items, 0)
    _check_seed(seed)
    pool = [int(v) for v in pool]
    if any(v < partition.num_items for v in pool) or len(set(pool)) != len(pool):
        raise ValueError(
            f"the test pool must hold distinct items past the partition's {partition.num_items}"
        )
    labelled = pool_labels is not None
    if labelled:
        if partition.cluster_labels is None:
            raise ValueError("pool_labels need a partition with content labels (cluster_labels)")
        pool_labels = [int(v) for v in pool_labels]
        if len(pool_labels) != len(pool):
            raise ValueError(f"{len(pool_labels)} pool labels for {len(pool)} pool items")
    order = np.random.default_rng([_STREAM_TEST_POOL, seed]).permutation(len(pool))
    buckets: dict[int, list[int]] = {}
    for j in order.tolist():
        group = pool_labels[j] if labelled else 0
        if group >= 0:
            buckets.setdefault(group, []).append(pool[j])
    taken = dict.fromkeys(buckets, 0)
    clients = []
    for c in partition.clients:
        need = items - len(c.test)
        if need <= 0 or not c.train:
            clients.append(c)
            continue
        if labelled:
            mix = Counter(partition.cluster_labels[i] for i in c.train)
        else:
            mix = Counter({0: len(c.train)})
        extra: list[int] = []
        for group, quota in _quotas(mix, need).items():
            bucket = buckets.get(group, [])
            start = taken.get(group, 0)
            if start + quota > len(bucket):
                raise ValueError(
                    f"local-test-items = {items}: client {c.client_id} needs {quota} unused "
                    f"items of content group {group} and only {len(bucket) - start} are "
                    "left; lower local-test-items or train-max-items"
                )
            extra += bucket[start : start + quota]
            taken[group] = start + quota
        clients.append(
            ClientPartition(c.client_id, c.modality, c.train, tuple(sorted((*c.test, *extra))))
        )
    settings = {**partition.settings, "local_test_items": int(items)}
    settings["pool_items"] = max([partition.num_items, *(v + 1 for v in pool)])
    return Partition(tuple(clients), partition.cluster_labels, settings)


def _quotas(mix: Counter, n: int) -> dict[int, int]:
    """``n`` split in ``mix``'s proportions, largest remainder first (ties: smaller group)."""
    total = sum(mix.values())
    exact = {g: n * k / total for g, k in sorted(mix.items())}
    quotas = {g: math.floor(v) for g, v in exact.items()}
    for g in sorted(exact, key=lambda g: (quotas[g] - exact[g], g))[: n - sum(quotas.values())]:
        quotas[g] += 1
    return {g: q for g, q in quotas.items() if q}


def shard_partition(
    num_items: int,
    client_id: int,
    num_partitions: int,
    *,
    missing_rate: float = 0.5,
    local_test_fraction: float = 0.1,
    seed: int = 0,
    modality: Modality | None = None,
) -> ClientPartition:
    """A node that holds its own shard: all ``num_items`` are its share.

    The local test split and, unless ``modality`` is given, the modality follow the same
    seeded rules as :func:`make_partition`, so ``missing-rate`` means the same in a
    deployment of shards as in simulation.
    """
    _check_int("num_items", num_items, 0)
    _check_int("num_partitions", num_partitions, 1)
    if not 0 <= client_id < num_partitions:
        raise ValueError(f"client_id must be in [0, {num_partitions}), got {client_id!r}")
    _check_rate("local-test-fraction", local_test_fraction, hi_open=True)
    if modality is None:
        modality = assign_modalities(num_partitions, missing_rate, seed)[client_id]
    elif modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    train, test = _local_test_split(range(num_items), local_test_fraction, seed, client_id)
    return ClientPartition(client_id, modality, train, test)


# --------------------------------------------------------------------------------------------
# Helpers


def _label_split_input(labels: Any, num_partitions: Any, alpha: Any, seed: Any) -> np.ndarray:
    """The checked arguments of a label-skew split: ``labels`` as a 1-D integer array."""
    _check_int("num_partitions", num_partitions, 1)
    _check_alpha(alpha)
    _check_seed(seed)
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got shape {y.shape} {y.dtype}")
    return y


def _indices(part: Any) -> list[int]:
    """The ``idx`` column of a partition (an arrow-formatted ``datasets.Dataset``), sorted."""
    return np.sort(np.asarray(part["idx"], dtype=np.int64)).tolist()


def _count_distinct_rows(x: np.ndarray) -> int:
    """Distinct rows via two random projections: exact unique on 113k x 512 costs seconds.

    Equal rows always collide; distinct rows collide only on a measure-zero event, and an
    undercount would merely clamp k a little lower.
    """
    proj = np.random.default_rng(0).normal(size=(x.shape[1], 2))
    return len(np.unique(x.astype(np.float64) @ proj, axis=0))


def _local_test_split(
    items: Sequence[int], fraction: float, seed: int, client_id: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``fraction`` of the items (>= 1 when the client has >= 2 items, always >= 1 train)."""
    n = len(items)
    k = 0
    if fraction > 0 and n >= 2:
        k = min(n - 1, max(1, math.floor(fraction * n + 0.5)))
    if k == 0:
        return tuple(sorted(items)), ()
    rng = np.random.default_rng([_STREAM_LOCAL_TEST, seed, client_id])
    chosen = set(rng.choice(n, size=k, replace=False).tolist())
    srt = sorted(items)
    test = tuple(v for j, v in enumerate(srt) if j in chosen)
    train = tuple(v for j, v in enumerate(srt) if j not in chosen)
    return train, test


def _check_embeddings(embeddings: Any) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    return x


def _check_int(key: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise ValueError(f"{key} must be an integer >= {lo}, got {value!r}")


def _check_seed(seed: Any) -> None:
    _check_int("seed", seed, 0)
    if seed >= 2**32:  # sklearn's random_state limit
        raise ValueError(f"seed must be < 2**32, got {seed!r}")


def _check_alpha(alpha: Any) -> None:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float, np.floating, np.integer))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(
            f"alpha must be a finite number > 0 (Dirichlet concentration), got {alpha!r}"
        )


def _check_rate(key: str, value: Any, *, hi_open: bool) -> None:
    ok = (
        not isinstance(value, bool)
        and isinstance(value, (int, float, np.floating, np.integer))
        and value >= 0
        and (value < 1 if hi_open else value <= 1)
    )
    if not ok:
        interval = "[0, 1)" if hi_open else "[0, 1]"
        raise ValueError(f"{key} must be a number in {interval}, got {value!r}")


def _partition_from_dict(data: Any, where: str) -> Partition:
    """Validate the JSON structure of a partition file; every message names ``where``."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{where} is malformed: {msg}; delete it to recompute the partition")

    if not isinstance(data, dict):
        raise bad("top level is not an object")
    if data.get("format") != FILE_FORMAT or data.get("version") != FILE_VERSION:
        raise bad(
            f"expected format {FILE_FORMAT!r} version {FILE_VERSION}, got "
            f"{data.get('format')!r} version {data.get('version')!r}"
        )
    settings = data.get("settings")
    if not isinstance(settings, dict):
        raise bad("'settings' is missing or not an object")
    num_items = settings.get("num_items")
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items < 0:
        raise bad(f"settings.num_items must be an integer >= 0, got {num_items!r}")
    raw_clients = data.get("clients")
    if not isinstance(raw_clients, list) or not raw_clients:
        raise bad("'clients' is missing or not a non-empty list")

    # a local test split may hold items past num_items (top_up_local_tests)
    pool_items = settings.get("pool_items", num_items)
    if isinstance(pool_items, bool) or not isinstance(pool_items, int) or pool_items < num_items:
        raise bad(f"settings.pool_items must be an integer >= num_items, got {pool_items!r}")

    def index_list(value: Any, what: str, bound: int) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < bound for v in value
        ):
            raise bad(f"{what} must be a list of integers in [0, {bound})")
        return tuple(value)

    clients = []
    seen: set[int] = set()
    for k, c in enumerate(raw_clients):
        if not isinstance(c, dict):
            raise bad(f"clients[{k}] is not an object")
        for key in ("client_id", "modality", "train", "test"):
            if key not in c:
                raise bad(f"clients[{k}] has no {key!r}")
        if c["client_id"] != k:
            raise bad(f"clients[{k}] has client_id {c['client_id']!r}, expected {k}")
        if c["modality"] not in MODALITIES:
            raise bad(f"clients[{k}] modality {c['modality']!r} is not one of {MODALITIES}")
        train = index_list(c["train"], f"clients[{k}].train", num_items)
        test = index_list(c["test"], f"clients[{k}].test", pool_items)
        for key, items in (("num_train", train), ("num_test", test)):
            if key in c and c[key] != len(items):
                raise bad(f"clients[{k}].{key} is {c[key]!r} but the list has {len(items)}")
        for v in (*train, *test):
            if v in seen:
                raise bad(f"item {v} is assigned twice (again in clients[{k}])")
            seen.add(v)
        clients.append(ClientPartition(k, c["modality"], train, test))

    labels = data.get("cluster_labels")
    if labels is not None:
        if (
            not isinstance(labels, list)
            or len(labels) != num_items
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels)
        ):
            raise bad(f"cluster_labels must be null or a list of {num_items} integers")
        labels = tuple(labels)
    return Partition(clients=tuple(clients), cluster_labels=labels, settings=settings)
