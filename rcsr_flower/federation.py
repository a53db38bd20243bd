"""Who holds what: the run's datasets and its semantic non-IID partition (§1).

The server and every client call the same functions with the same run config, so they
agree on the partition without shipping it: the first caller computes it (frozen-backbone
caption embeddings -> k-means -> Dirichlet -> missing modalities) and caches it as JSON
under the cache directory, keyed by everything that determines it; the others read it.

Where a node's data lives (deployment, docs/reproducing.md): a SuperNode's ``node_config``
may name its own ``dataset``, ``data-dir``, ... (``config.NodeConfig``, :func:`node_data`),
overriding the run config's, which describe the server's machine. Two ways to use that:

* **copy** (default): the node holds a copy of the whole dataset at its own path and
  computes the same partition as everyone else from ``partition-id``/``num-partitions``
  (fp32 caption embeddings, so CPU and GPU nodes agree); the server checks the sizes the
  nodes report against its own partition;
* **shard** (``shard=true``): the node's dataset *is* its data: the whole train split
  (COCO: train + restval) is its partition, minus ``local-test-fraction`` held out as its
  local test split; its modality is ``modality`` from node_config, else the one the
  simulation would give it (``missing-rate``, ``seed``). Dirichlet settings do not apply:
  the shards are as non-IID as the sites are.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from rcsr_flower.config import EMBEDDED, ConfigError, NodeConfig, RunConfig
from rcsr_flower.data.datasets import ImageCaptionDataset, open_dataset
from rcsr_flower.data.partition import (
    KMEANS,
    Partition,
    content_labels,
    make_partition,
    top_up_local_tests,
)
from rcsr_flower.embedded.assets import (
    cache_root,
    embedded_assets,
    ensure_assets,
    file_lock,
    load_model,
)
from rcsr_flower.modality import Modality

if TYPE_CHECKING:  # torch is imported where a backbone runs: the launcher's check of a
    # cached partition needs neither (1.4 s of its 2.6 s, before anything else starts)
    from rcsr_flower.backbones.clip import Backbone

log = logging.getLogger(__name__)

PARTITION_VERSION = 2  # 2: partition-sizes = "equal" fills each client in turn
MIN_TRAIN_PAIRS = 2  # a client's contrastive loss needs two pairs; with one it sits out


def check_population(cfg: RunConfig, num_items: int, split_items: int, num_clients: int) -> None:
    """Refuse a partition that leaves clients nothing to train on, before building it.

    ``num_items`` training items (after ``train-max-items``) of ``split_items`` in the
    split, over ``num_clients``: each client needs ``MIN_TRAIN_PAIRS`` items to train on,
    plus one held out when ``local-test-fraction`` > 0. Below that on average some clients
    certainly get nothing, which a federation of 1,000 clients on the default 750 items
    would otherwise find out as 250 empty nodes. The error names the settings that fix it.
    """
    per_client = MIN_TRAIN_PAIRS + (cfg.local_test_fraction > 0)
    needed = per_client * num_clients
    if num_items >= needed:
        return
    given = (
        f"train-max-items = {cfg.train_max_items} gives"
        if cfg.train_max_items
        else f"the training split's {num_items} items give"
    )
    fixes = []
    if needed <= split_items:
        fixes.append(f"set train-max-items >= {needed} (0 = all {split_items} of the split)")
    elif cfg.embedded:
        fixes.append(
            f"set embedded-train-items >= {needed} (a larger embedded corpus, built beside "
            f"the default one) and train-max-items >= {needed} or 0"
        )
    fixes.append(f"run at most {num_items // per_client} clients")
    raise ConfigError(
        f"{given} {num_clients} clients {num_items / num_clients:.3g} training items each, "
        f"and each needs at least {per_client} ({MIN_TRAIN_PAIRS} to train on"
        f"{', 1 held out for its local test split' if per_client > MIN_TRAIN_PAIRS else ''}): "
        + ", or ".join(fixes)
    )


def dataset_source(cfg: RunConfig) -> tuple[str, str | None, str]:
    """``(source, image_root, fmt)`` for the run's dataset; ``embedded`` -> built corpus."""
    if cfg.embedded:
        assets = ensure_assets(cfg.cache_dir or None, train_items=cfg.embedded_train_items)
        return str(assets.corpus_json), None, "karpathy"
    return cfg.dataset, (cfg.data_dir or None), cfg.dataset_format


# Datasets this process opened, newest last: a simulation worker serves many clients,
# and each client's first message would otherwise read and check the whole dataset file
# again (1.3 s for the embedded corpus's JSON on a loaded 2-core machine: minutes of the
# query round of 1,000 clients). Keyed by the file's size and time, so a changed file is
# read again; a handful of entries (splits of one run) bound the memory.
_OPENED: OrderedDict[tuple, ImageCaptionDataset] = OrderedDict()
_OPENED_MAX = 4
_OPENED_LOCK = threading.Lock()


def open_split(cfg: RunConfig, split: str, *, capped: bool = True) -> ImageCaptionDataset:
    """One split of the run's dataset; the training split capped at ``train-max-items``
    (its first N items, before partitioning: every node cuts the same items) unless
    ``capped`` is false (the items past the cap feed ``local-test-items``). Opened once
    per process while the dataset's file stays the same (``_OPENED``)."""
    source, image_root, fmt = dataset_source(cfg)
    columns = (cfg.image_column, cfg.caption_column, cfg.split_column)
    path = Path(source)
    stamp = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
    key = (str(source), image_root, fmt, columns, split, stamp)
    with _OPENED_LOCK:
        dataset = _OPENED.get(key) if stamp is not None else None
        if dataset is not None:
            _OPENED.move_to_end(key)
    if dataset is None:
        dataset = open_dataset(
            source,
            split,
            fmt=fmt,
            image_root=image_root,
            image_column=cfg.image_column,
            caption_column=cfg.caption_column,
            split_column=cfg.split_column or None,
        )
        if stamp is not None:  # a directory (HF dataset) has no one stamp: not kept
            with _OPENED_LOCK:
                _OPENED[key] = dataset
                while len(_OPENED) > _OPENED_MAX:
                    _OPENED.popitem(last=False)
    if capped and split == "train" and cfg.train_max_items and len(dataset) > cfg.train_max_items:
        dataset = dataset.subset(range(cfg.train_max_items))
    return dataset


@dataclass(frozen=True)
class NodeData:
    """Where one node reads its data: the run config with node_config's locations applied,
    and whether the dataset is the node's own shard (module docstring)."""

    cfg: RunConfig
    shard: bool = False
    modality: str | None = None  # shard only: forced modality


def node_data(cfg: RunConfig, node: NodeConfig) -> NodeData:
    """Apply a SuperNode's node config (``NodeConfig.from_flower``, which validated it) to
    the run config: the identity in simulation, where it holds only ``partition-id`` and
    ``num-partitions``."""
    return NodeData(node.apply(cfg), node.shard, node.modality)


def global_test_set(cfg: RunConfig) -> ImageCaptionDataset:
    """The server's held-out split (§6), capped at ``eval-max-images``."""
    test = open_split(cfg, "test")
    if cfg.eval_max_images and len(test) > cfg.eval_max_images:
        test = test.subset(range(cfg.eval_max_images))
    return test


def caption_embeddings(
    backbone: Backbone, dataset: ImageCaptionDataset, batch_size: int = 512
) -> np.ndarray:
    """Per item: the normalised mean of its frozen-backbone caption embeddings."""
    import torch

    from rcsr_flower.backbones import clip

    captions = [dataset.captions(i) for i in range(len(dataset))]
    # every node computes this itself: no bf16 on GPUs. It runs once, under the partition
    # lock that every client and the server wait on, so it may use all the cores (a Ray
    # actor has one thread). With torch's CPU kernels the embeddings are bit-identical for
    # 1 and 2 threads (tests/test_partition.py), so the partition does not depend on it.
    with backbone.full_precision(), clip.torch_threads(clip.available_cores()):
        z, owner = backbone.embed_caption_lists(captions, batch_size=batch_size)
    sums = torch.zeros(len(captions), z.shape[1]).index_add_(0, owner, z)
    return torch.nn.functional.normalize(sums, dim=-1).numpy()


def backbone_stamp(name: str, cache_dir: str | None = None) -> list | str | None:
    """Which files stand behind ``model-name`` now, cheaply (no torch, no hashing): the
    name, size and mtime of every file of a checkpoint directory (``"embedded"``: the one
    in the cache), the snapshot commit of a hub id in the local Hugging Face cache, None
    where neither is found. Partitions embed captions with the backbone, so new weights
    saved under the same name must not find the old partition (nor the client caches and
    frozen-prefix features keyed by it)."""
    if name == EMBEDDED:
        directory = embedded_assets(cache_dir).backbone_dir
    else:
        directory = Path(name).expanduser()
    if directory.is_dir():
        return sorted(
            (f.name, (st := f.stat()).st_size, st.st_mtime_ns)
            for f in directory.iterdir()
            if f.is_file()
        )
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a repo id at all, or no cache: the name is all there is
        return None
    return Path(found).parent.name if isinstance(found, str) else None


def partition_key(cfg: RunConfig, backbone: Backbone | str, num_partitions: int) -> str:
    """The partition's cache key; ``backbone`` may be given by its name (``model-name``),
    so a caller can look for a cached partition without loading the model."""
    backbone_name = backbone if isinstance(backbone, str) else backbone.name
    source, image_root, fmt = dataset_source(cfg)
    src = Path(source)
    stamp = (src.stat().st_size, src.stat().st_mtime_ns) if src.is_file() else None
    ident = {
        "v": PARTITION_VERSION,
        "source": str(src.resolve()) if src.exists() else source,
        "stamp": stamp,
        "image_root": image_root,
        "fmt": fmt,
        "backbone": backbone_name,
        "backbone_files": backbone_stamp(backbone_name, cfg.cache_dir or None),
        "num_partitions": num_partitions,
        "partitioning": cfg.partitioning,
        "clusters": cfg.partition_clusters,
        "alpha": cfg.alpha,
        "missing_rate": cfg.missing_rate,
        "local_test_fraction": cfg.local_test_fraction,
        "seed": cfg.seed,
    }
    columns = (cfg.image_column, cfg.caption_column, cfg.split_column)
    if columns != ("image", "caption", ""):  # keeps the keys of existing caches
        ident["columns"] = columns
    if cfg.train_max_items:  # likewise
        ident["train_max_items"] = cfg.train_max_items
    if cfg.partition_attribute != KMEANS:  # likewise
        ident["partition_by"] = cfg.partition_attribute
    if cfg.partition_sizes != "dirichlet":  # likewise
        ident["partition_sizes"] = cfg.partition_sizes
    if cfg.local_test_size:  # likewise
        ident["local_test_items"] = cfg.local_test_size
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def load_partition(
    cfg: RunConfig,
    backbone: Backbone,
    num_partitions: int,
    train: ImageCaptionDataset | None = None,
) -> Partition:
    """The run's partition: cached by key, computed once under a lock."""
    if num_partitions < 1:
        raise ValueError(f"num-partitions must be >= 1, got {num_partitions}")
    if (
        cfg.local_test_size
        and cfg.partitioning == "dirichlet"
        and cfg.partition_attribute == KMEANS
    ):
        raise ConfigError(
            f"local-test-items = {cfg.local_test_size} draws each client's extra test items "
            "in its mix of content groups, which k-means clusters do not give for unused "
            "items: partition by a recorded attribute (partition-by) or set local-test-items = 0"
        )
    path = partition_file(cfg, num_partitions, backbone)
    if path.is_file():
        return Partition.from_json(path)
    with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return Partition.from_json(path)
        partition = build_partition(cfg, backbone, num_partitions, train)
        path.parent.mkdir(parents=True, exist_ok=True)
        partition.to_json(path)
        os.chmod(path, 0o644)
    return partition


def build_partition(
    cfg: RunConfig,
    backbone: Backbone | None,
    num_partitions: int,
    train: ImageCaptionDataset | None = None,
) -> Partition:
    """Compute the run's partition (no cache): what :func:`load_partition` computes once
    and keeps, and what ``benchmarks/scale.py`` times. ``backbone`` embeds the captions
    for ``partition-by = "kmeans"`` only."""
    train = train if train is not None else open_split(cfg, "train")
    split_items = len(train)
    if cfg.train_max_items and len(train) == cfg.train_max_items:
        split_items = len(open_split(cfg, "train", capped=False))
    check_population(cfg, len(train), split_items, num_partitions)
    embeddings = labels = None
    if cfg.partitioning == "dirichlet" and cfg.partition_attribute != KMEANS:
        try:
            labels = content_labels(
                [train.attributes(i) for i in range(len(train))], cfg.partition_attribute
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    elif cfg.partitioning == "dirichlet":
        log.info("embedding %d training items for the semantic partition", len(train))
        embeddings = caption_embeddings(backbone, train)
    partition = make_partition(
        embeddings,
        len(train),
        num_partitions,
        partitioning=cfg.partitioning,
        num_clusters=cfg.partition_clusters,
        alpha=cfg.alpha,
        missing_rate=cfg.missing_rate,
        local_test_fraction=cfg.local_test_fraction,
        seed=cfg.seed,
        labels=labels,
        equal_sizes=cfg.partition_sizes == "equal",
    )
    if cfg.local_test_size:
        partition = _top_up(cfg, partition, train, labels is not None)
    return partition


def _top_up(
    cfg: RunConfig, partition: Partition, train: ImageCaptionDataset, labelled: bool
) -> Partition:
    """``local-test-items``: the clients' local test splits topped up from the training
    items past ``train-max-items``, in each client's own mix of content groups."""
    full = open_split(cfg, "train", capped=False)
    pool = range(len(train), len(full))
    if not pool:
        raise ConfigError(
            f"local-test-items = {cfg.local_test_size} draws from the training items past "
            f"train-max-items, and the training split has no more than its {len(train)}: "
            "set a smaller train-max-items or local-test-items = 0"
        )
    needed = sum(max(0, cfg.local_test_size - len(c.test)) for c in partition.clients if c.train)
    if needed > len(pool):
        raise ConfigError(
            f"local-test-items = {cfg.local_test_size} tops up {partition.num_partitions} "
            f"clients' local test splits with {needed} training items past train-max-items, "
            f"and the split has {len(pool)} of them: set local-test-items = 0 (the held-out "
            f"part alone) or lower, a smaller train-max-items"
            + (", or a larger embedded-train-items" if cfg.embedded else "")
        )
    key = cfg.partition_attribute
    try:
        pool_labels = None
        if labelled:
            names = sorted({str(train.attributes(i)[key]) for i in range(len(train))})
            pool_labels = content_labels([full.attributes(i) for i in pool], key, names)
        return top_up_local_tests(partition, cfg.local_test_size, pool, pool_labels, cfg.seed)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def prepare_partition(cfg: RunConfig, num_partitions: int) -> Path:
    """Make sure the run's partition is cached, before the run: ``load_partition``'s
    file. The simulation launcher calls it, so the one-off caption embedding runs in a
    quiet process with its log on the console, instead of in a Ray actor that the
    ServerApp and every other actor wait on."""
    path = partition_file(cfg, num_partitions)
    if not path.is_file():
        backbone = load_model(cfg.model_name, cache_dir=cfg.cache_dir or None)
        load_partition(cfg, backbone, num_partitions)
        # the key names the backbone's files, which a first run has only now (built or
        # downloaded by load_model)
        path = partition_file(cfg, num_partitions, backbone)
    return path


def partition_file(cfg: RunConfig, num_partitions: int, backbone: Backbone | str = "") -> Path:
    key = partition_key(cfg, backbone or cfg.model_name, num_partitions)
    return cache_root(cfg.cache_dir or None) / "partitions" / f"{key}.json"


# ---------------------------------------------------------------------------- server side


def reported_partition(nodes: list[dict]) -> dict:
    """What the nodes said they hold (query round): the run's partition record when nodes
    hold their own shards and the server has no partition of its own."""
    return {
        "format": "rcsr-flower-reported-partition",
        "clients": [
            {
                "client_id": int(n["partition-id"]),
                "modality": str(Modality.from_code(int(n["modality"]))),
                "num_train": int(n["num-train"]),
                "num_test": int(n["num-test"]),
                "shard": bool(n.get("shard", 0)),
            }
            for n in sorted(nodes, key=lambda n: int(n["partition-id"]))
        ],
    }


def partition_mismatches(partition: Partition, nodes: list[dict]) -> list[str]:
    """Nodes whose reported sizes differ from the server's partition, one line each.

    In copy mode every node computes the partition from its own copy of the data; a
    different copy, config or checkpoint shows up here instead of silently training on
    overlapping data.
    """
    out = []
    for n in nodes:
        pid = int(n["partition-id"])
        if not 0 <= pid < partition.num_partitions:
            out.append(f"node {n['node_id']}: partition-id {pid} is outside the partition")
            continue
        client = partition.clients[pid]
        mine = (len(client.train), len(client.test), client.modality)
        theirs = (
            int(n["num-train"]),
            int(n["num-test"]),
            str(Modality.from_code(int(n["modality"]))),
        )
        if mine != theirs:
            out.append(
                f"node {n['node_id']} (partition {pid}) holds {theirs[0]} train / {theirs[1]} "
                f"test items ({theirs[2]}), the server's partition {mine[0]} / {mine[1]} "
                f"({mine[2]}): its data copy, run config or checkpoint differs from the server's"
            )
    return out
