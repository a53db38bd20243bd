"""A client's data: its share of the partition, preprocessed once per process and once
per node (a disk cache beside the frozen prefix of its training split).

Flower types stay out of this module: the handlers turn messages into these calls.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rcsr_flower.backbones.clip import Backbone
from rcsr_flower.backbones.prefix import TowerPrefix, image_prefix, text_prefix
from rcsr_flower.config import RunConfig
from rcsr_flower.retrieval.evaluation import SplitTensors, preprocess_split
from rcsr_flower.retrieval.zero_shot import backbone_digest
from rcsr_flower.routing.outputs import write_cache_file

log = logging.getLogger(__name__)


@dataclass
class ClientData:
    client_id: int
    modality: str  # "paired" | "image-only" | "text-only"
    train: SplitTensors
    test: SplitTensors
    # the training split's frozen prefix per tower (§2; ``prefix-cache``)
    prefix: dict[str, TowerPrefix] = field(default_factory=dict)

    @property
    def has_image(self) -> bool:
        return self.modality != "text-only"

    @property
    def has_text(self) -> bool:
        return self.modality != "image-only"


# Ray reuses a simulation worker for many clients: keep the preprocessed data of those it
# served, least recently used first out beyond `data-cache-gb` (the client in use stays).
_DATA_CACHE: OrderedDict[tuple, ClientData] = OrderedDict()
_DATA_LOCK = threading.Lock()
CLIENT_CACHE_VERSION = 1


def _pixel_bytes(data: ClientData) -> int:
    pixels = sum(
        s.pixels.numel() * s.pixels.element_size()
        for s in (data.train, data.test)
        if s.pixels is not None
    )
    prefixes = [p.nbytes for p in data.prefix.values()]
    if data.test.eval_prefix is not None:
        prefixes.append(data.test.eval_prefix.nbytes)
    return pixels + sum(prefixes)


def _remember(key: tuple, data: ClientData, budget_bytes: float) -> None:
    with _DATA_LOCK:
        _DATA_CACHE[key] = data
        _DATA_CACHE.move_to_end(key)
        total = sum(_pixel_bytes(d) for d in _DATA_CACHE.values())
        while len(_DATA_CACHE) > 1 and total > budget_bytes:
            _, dropped = _DATA_CACHE.popitem(last=False)
            total -= _pixel_bytes(dropped)


def load_client_data(
    cfg: RunConfig,
    backbone: Backbone,
    partition_id: int,
    num_partitions: int,
    *,
    shard: bool = False,
    modality: str | None = None,
    remember: bool = True,
) -> ClientData:
    """The client's partition, preprocessed once per process while it fits the cache,
    and once per node: the tensors are kept on disk (:func:`client_cache_path`), because
    in a deployment every message starts a fresh ClientApp process, which would otherwise
    decode and preprocess every image of the partition again.

    ``shard``: the dataset in ``cfg`` is this node's own (``federation`` docstring), its
    whole train split is the client's share; otherwise the client's share of the run's
    partition. Only the client's own items are decoded, and a missing modality's images
    never are. ``remember`` false: not kept in this process's cache (on disk still), for a
    message that only this round's participants would otherwise pay for: the query round
    asks every node once, and a worker keeping all of them held 0.4 GB more at 1,000 clients.
    """
    from rcsr_flower.data.partition import shard_partition
    from rcsr_flower.federation import load_partition, open_split, partition_key

    key = (
        partition_key(cfg, backbone, num_partitions),
        partition_id,
        str(backbone.device),
        shard,
        modality,
    )
    with _DATA_LOCK:
        if key in _DATA_CACHE:
            _DATA_CACHE.move_to_end(key)
            return _DATA_CACHE[key]
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"node_config partition-id={partition_id} is outside [0, {num_partitions}); "
            "set partition-id and num-partitions consistently for every SuperNode"
        )
    path = client_cache_path(cfg, backbone, key[0], partition_id, shard, modality)
    data = read_client_cache(path, partition_id)
    if data is None:
        train_set = open_split(cfg, "train")
        if shard:
            client = shard_partition(
                len(train_set),
                partition_id,
                num_partitions,
                missing_rate=cfg.missing_rate,
                local_test_fraction=cfg.local_test_fraction,
                seed=cfg.seed,
                modality=modality,
            )
        else:
            partition = load_partition(cfg, backbone, num_partitions, train_set)
            client = partition.clients[partition_id]
        workers = cfg.loader_workers
        data = ClientData(
            client_id=partition_id,
            modality=client.modality,
            train=preprocess_split(
                backbone,
                train_set.subset(client.train),
                images=client.modality != "text-only",
                texts=client.modality != "image-only",
                workers=workers,
            ),
            # a test split topped up past train-max-items (local-test-items) reads past the cap
            test=preprocess_split(
                backbone,
                (
                    open_split(cfg, "train", capped=False)
                    if client.test and max(client.test) >= len(train_set)
                    else train_set
                ).subset(client.test),
                workers=workers,
            ),
        )
        write_client_cache(path, data)
    if cfg.prefix_cache and not data.prefix:
        data.prefix = client_prefix(cfg, backbone, data, path)
    if remember:
        _remember(key, data, cfg.data_cache_gb * 2**30)
    return data


def prefix_blocks(cfg: RunConfig, backbone: Backbone) -> dict[str, int]:
    """The block whose output starts each tower's adapted part: the frozen prefix ends
    there. Empty for ``adapter-layers = "all"``: its prefix is the embeddings and one
    block, and captions (5 per item) would cost more to cache than they save."""
    if cfg.adapter_layers == "all":
        return {}
    adapters = backbone.new_adapters(cfg.adapter_layers, 1)
    return {t: b for t in ("vision", "text") if (b := adapters.first_block(t)) is not None}


def client_prefix(
    cfg: RunConfig, backbone: Backbone, data: ClientData, data_path: Path
) -> dict[str, TowerPrefix]:
    """The training split's frozen prefix per tower the client holds, computed once per
    node and kept on its disk beside the client data (safetensors, keyed by the same
    things plus the tower, the block and a hash of the backbone's weights, which the
    client data's key names only by ``model-name``: new weights in the same directory
    must not replay old hidden states; skipped when larger than ``data-cache-gb``; safe
    to delete)."""
    from safetensors.torch import load_file

    out = {}
    budget = cfg.data_cache_gb * 2**30
    for tower, block in prefix_blocks(cfg, backbone).items():
        held = data.has_image if tower == "vision" else data.has_text
        if not held or len(data.train) == 0:
            continue
        weights = backbone_digest(backbone)[:12]
        path = data_path.with_name(f"{data_path.stem}.prefix-{tower}-{block}-{weights}.safetensors")
        prefix = None
        if path.is_file():
            try:
                prefix = TowerPrefix.from_tensors(tower, block, load_file(str(path)))
            except Exception as exc:  # torn or foreign: rebuild
                log.warning("ignoring unreadable prefix cache %s: %s", path, exc)
        if prefix is None:
            started = time.perf_counter()
            if tower == "vision":
                prefix = image_prefix(backbone, data.train.pixels, block)
            else:
                prefix = text_prefix(backbone, data.train.captions, block)
            log.info(
                "client %d: %s prefix (blocks 0..%d) of %d inputs in %.1f s, %.0f MB",
                data.client_id,
                tower,
                block,
                len(prefix.length) if prefix.length is not None else len(prefix.hidden),
                time.perf_counter() - started,
                prefix.nbytes / 2**20,
            )
            if prefix.nbytes <= budget:
                save_cache_file(path, prefix.to_tensors(), None, f"the {tower} prefix")
        out[tower] = prefix
    return out


def client_cache_path(
    cfg: RunConfig,
    backbone: Backbone,
    partition_key: str,
    partition_id: int,
    shard: bool = False,
    modality: str | None = None,
) -> Path:
    """``<cache-dir>/client-data/<key>.safetensors``, keyed by everything that determines
    the tensors: the partition (dataset, its file stamp, partition settings, backbone
    name), the image preprocessing, this partition id and the node's ``shard`` and
    ``modality`` settings. Safe to delete."""
    import hashlib

    from rcsr_flower.embedded.assets import cache_root

    processor = json.dumps(backbone.image_processor.to_dict(), sort_keys=True, default=str)
    ident = f"{CLIENT_CACHE_VERSION}|{partition_key}|{partition_id}|{shard}|{modality}|{processor}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:20]
    return cache_root(cfg.cache_dir or None) / "client-data" / f"{digest}.safetensors"


def write_client_cache(path: Path, data: ClientData) -> None:
    """Pixels as float32 tensors (bit-identical to a fresh preprocess), captions and
    modality as metadata (:func:`save_cache_file`)."""
    tensors, meta = {}, {"modality": data.modality, "client_id": str(data.client_id)}
    for name, split in (("train", data.train), ("test", data.test)):
        if split.pixels is not None:
            tensors[f"{name}.pixels"] = split.pixels.contiguous()
        if split.captions is not None:
            meta[f"{name}.captions"] = json.dumps(split.captions)
    save_cache_file(path, tensors, meta, "client data")


def save_cache_file(
    path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None, what: str
) -> None:
    """A node-side safetensors cache file, written whole or skipped (:func:`write_cache_file`)."""
    from safetensors.torch import save_file

    write_cache_file(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), what)


def read_client_cache(path: Path, partition_id: int) -> ClientData | None:
    """The cached tensors, or None when absent or unreadable (then they are rebuilt)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            names = set(fh.keys())
            splits = {
                name: SplitTensors(
                    fh.get_tensor(f"{name}.pixels") if f"{name}.pixels" in names else None,
                    json.loads(meta[f"{name}.captions"]) if f"{name}.captions" in meta else None,
                )
                for name in ("train", "test")
            }
        if int(meta["client_id"]) != partition_id:
            raise ValueError(f"holds partition {meta['client_id']}")
        return ClientData(partition_id, meta["modality"], splits["train"], splits["test"])
    except Exception as exc:  # a torn or foreign file: rebuild, never fail the round
        log.warning("ignoring unreadable client cache %s: %s", path, exc)
        return None
