"""Who holds what: the run's datasets and its semantic non-IID partition (SPEC §1).

The server and every client call the same functions with the same run config, so they
agree on the partition without shipping it: the first caller computes it (frozen-backbone
caption embeddings -> k-means -> Dirichlet -> missing modalities) and caches it as JSON
under the cache directory, keyed by everything that determines it; the others read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from rcsr_flower.assets import cache_root, ensure_assets, file_lock
from rcsr_flower.backbones.clip import Backbone
from rcsr_flower.config import RunConfig
from rcsr_flower.data.datasets import ImageCaptionDataset, open_dataset
from rcsr_flower.data.partition import Partition, make_partition

log = logging.getLogger(__name__)

PARTITION_VERSION = 1


def dataset_source(cfg: RunConfig) -> tuple[str, str | None, str]:
    """``(source, image_root, fmt)`` for the run's dataset; ``embedded`` -> built corpus."""
    if cfg.embedded:
        return str(ensure_assets(cfg.cache_dir or None).corpus_json), None, "karpathy"
    return cfg.dataset, (cfg.data_dir or None), cfg.dataset_format


def open_split(cfg: RunConfig, split: str) -> ImageCaptionDataset:
    source, image_root, fmt = dataset_source(cfg)
    return open_dataset(source, split, fmt=fmt, image_root=image_root)


def global_test_set(cfg: RunConfig) -> ImageCaptionDataset:
    """The server's held-out split (SPEC §6), capped at ``eval-max-images``."""
    test = open_split(cfg, "test")
    if cfg.eval_max_images and len(test) > cfg.eval_max_images:
        test = test.subset(range(cfg.eval_max_images))
    return test


def caption_embeddings(
    backbone: Backbone, dataset: ImageCaptionDataset, batch_size: int = 512
) -> np.ndarray:
    """Per item: the normalised mean of its frozen-backbone caption embeddings."""
    captions = [dataset.captions(i) for i in range(len(dataset))]
    with backbone.full_precision():  # every node computes this itself: no bf16 on GPUs
        z, owner = backbone.embed_caption_lists(captions, batch_size=batch_size)
    sums = torch.zeros(len(captions), z.shape[1]).index_add_(0, owner, z)
    return torch.nn.functional.normalize(sums, dim=-1).numpy()


def partition_key(cfg: RunConfig, backbone: Backbone, num_partitions: int) -> str:
    source, image_root, fmt = dataset_source(cfg)
    src = Path(source)
    stamp = (src.stat().st_size, src.stat().st_mtime_ns) if src.is_file() else None
    ident = {
        "v": PARTITION_VERSION,
        "source": str(src.resolve()) if src.exists() else source,
        "stamp": stamp,
        "image_root": image_root,
        "fmt": fmt,
        "backbone": backbone.name,
        "num_partitions": num_partitions,
        "partitioning": cfg.partitioning,
        "clusters": cfg.partition_clusters,
        "alpha": cfg.alpha,
        "missing_rate": cfg.missing_rate,
        "local_test_fraction": cfg.local_test_fraction,
        "seed": cfg.seed,
    }
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
    key = partition_key(cfg, backbone, num_partitions)
    path = cache_root(cfg.cache_dir or None) / "partitions" / f"{key}.json"
    if path.is_file():
        return Partition.from_json(path)
    with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            return Partition.from_json(path)
        train = train if train is not None else open_split(cfg, "train")
        embeddings = None
        if cfg.partitioning == "dirichlet":
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
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        partition.to_json(path)
        os.chmod(path, 0o644)
    return partition
