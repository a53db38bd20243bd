"""A split of image–caption pairs made ready for the towers, and the one retrieval
evaluation (§6) that clients, the server, asset building and benchmarks share.

Below the task and above the backbones: it knows a ``Backbone`` and a dataset view, not
run configs, clients or Flower, so backbone pretraining can evaluate with it too.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rcsr_flower.backbones.adapters import AdapterSet
from rcsr_flower.backbones.clip import Backbone, gather, preprocess_images
from rcsr_flower.backbones.prefix import block_output
from rcsr_flower.data.datasets import ImageCaptionDataset
from rcsr_flower.retrieval.metrics import retrieval_recall
from rcsr_flower.retrieval.zero_shot import ZeroShotMemo, is_identity

log = logging.getLogger(__name__)


@dataclass
class EvalPrefix:
    """A split's frozen prefix (§2) in the evaluation's own batches.

    Each tower's hidden states after the block where the adapters start, batch by batch
    exactly as :func:`embed_split` batches the split, so that replaying them runs the same
    shapes on the same inputs as the plain path: the embeddings are bit-identical, not
    only close. Only valid while the backbone is frozen (every federated run; not
    backbone pretraining, which therefore never passes a budget).
    """

    backbone: Backbone
    key: tuple  # (vision block, text block, batch size)
    images: list[torch.Tensor] | None  # per image batch, on the CPU (None: not cached)
    texts: list[tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]] | None
    # per caption batch: (positions among the flat captions, tokens, hidden)

    @property
    def nbytes(self) -> int:
        hidden = [*(self.images or []), *(h for _, _, h in self.texts or [])]
        return sum(h.numel() * h.element_size() for h in hidden)


@dataclass
class SplitTensors:
    """A split ready for the towers: preprocessed pixels and caption lists (either may be None)."""

    pixels: torch.Tensor | None
    captions: list[list[str]] | None
    # the evaluation's frozen prefix, filled by the first evaluation given a budget
    eval_prefix: EvalPrefix | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        if self.pixels is not None:
            return int(self.pixels.shape[0])
        return len(self.captions or [])


class DecodeAndPreprocess:
    """``DataLoader`` collate: decode a chunk of items' images and preprocess them.

    Holds only the dataset view and the image processor (not the model), so worker
    processes get what they need and nothing else.
    """

    def __init__(self, dataset: ImageCaptionDataset, image_processor) -> None:
        self.dataset = dataset
        self.image_processor = image_processor

    def __call__(self, indices: list[int]) -> torch.Tensor:
        return preprocess_images(self.image_processor, [self.dataset.image(i) for i in indices])


def preprocess_split(
    backbone: Backbone,
    dataset: ImageCaptionDataset,
    *,
    images: bool = True,
    texts: bool = True,
    chunk: int = 256,
    workers: int = 0,
) -> SplitTensors:
    """Decode and preprocess only the modalities the holder has (a missing one stays None).

    Images go through a ``DataLoader`` in chunks of ``chunk``: with ``workers`` > 0 (the
    ``loader-workers`` setting) that many processes decode JPEGs in parallel, which pays
    off for the thousands of images of a Flickr30K/COCO client; a split of one chunk is
    decoded in process. Chunks are the same either way, so the pixels are bit-identical.
    Only the items of ``dataset`` are ever decoded.
    """
    from torch.utils.data import DataLoader

    pixels = None
    n = len(dataset)
    if images and n:
        chunks = math.ceil(n / chunk)
        loader = DataLoader(
            range(n),
            batch_size=chunk,
            shuffle=False,
            num_workers=min(workers, chunks) if chunks > 1 else 0,
            collate_fn=DecodeAndPreprocess(dataset, backbone.image_processor),
            generator=torch.Generator(),  # the loader draws a seed: not from the global RNG
        )
        for start, batch in zip(range(0, n, chunk), loader, strict=True):
            if pixels is None:  # filled in place: no second copy of a large split
                pixels = torch.empty((n, *batch.shape[1:]), dtype=batch.dtype)
            pixels[start : start + len(batch)] = batch
    captions = [dataset.captions(i) for i in range(n)] if texts else None
    return SplitTensors(pixels, captions)


def first_block(tower: str, adapters: Sequence[AdapterSet | None]) -> int | None:
    """The lowest block any of ``adapters`` adapts in ``tower``: below it all is frozen."""
    blocks = [b for a in adapters if a is not None and (b := a.first_block(tower)) is not None]
    return min(blocks) if blocks else None


_PREFIX_LOCK = threading.Lock()


def split_prefix(
    backbone: Backbone,
    split: SplitTensors,
    adapters: Sequence[AdapterSet | None],
    batch_size: int,
    budget_bytes: float,
) -> EvalPrefix | None:
    """The split's evaluation prefix for these adapters, computed on first use and kept
    on the split; None when nothing is adapted or the budget is 0. One that would not fit
    ``budget_bytes`` is kept empty (no tower cached), so the refusal is decided once.

    The first evaluation pays nothing extra (it runs the frozen blocks once, as it would
    anyway); every later one runs only the blocks after the first adapted one: with
    ``adapter-layers = L`` of ViT-B/32's 12 that is L−1 blocks instead of 12; with ``all``
    one block of each tower is saved (of 4 in the embedded tiny CLIP).
    """
    blocks = (first_block("vision", adapters), first_block("text", adapters))
    if budget_bytes <= 0 or blocks == (None, None) or not len(split):
        return None
    key = (*blocks, batch_size)
    with _PREFIX_LOCK:
        cached = split.eval_prefix
        if cached is not None and cached.backbone is backbone and cached.key == key:
            return cached
        vision_block, text_block = blocks
        flat = [c for caps in split.captions for c in caps]
        plan = list(backbone.text_batches(flat, batch_size, by_length=True))
        need = 0
        if vision_block is not None:
            vision = backbone.model.config.vision_config
            tokens = (vision.image_size // vision.patch_size) ** 2 + 1
            need += len(split) * tokens * vision.hidden_size * 4
        if text_block is not None:
            width = backbone.model.config.text_config.hidden_size
            need += sum(t["input_ids"].numel() for _, t in plan) * width * 4
        if need > budget_bytes:
            log.info(
                "evaluation prefix of %d items not cached: %.0f MB > the %.0f MB budget "
                "(data-cache-gb)",
                len(split),
                need / 2**20,
                budget_bytes / 2**20,
            )
            split.eval_prefix = EvalPrefix(backbone, key, None, None)
            return split.eval_prefix
        images = texts = None
        if vision_block is not None:
            images = [
                block_output(backbone, "vision", vision_block, split.pixels[b]).cpu()
                for b in torch.arange(len(split)).split(batch_size)
            ]
        if text_block is not None:
            texts = [
                (idx, tokens, block_output(backbone, "text", text_block, tokens).cpu())
                for idx, tokens in plan
            ]
        split.eval_prefix = EvalPrefix(backbone, key, images, texts)
        return split.eval_prefix


@torch.no_grad()
def embed_split(
    backbone: Backbone,
    split: SplitTensors,
    *adapters: AdapterSet | None,
    batch_size: int = 256,
    prefix_bytes: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_I [N,d], z_T [M,d], caption->image index [M])`` of a paired split.

    ``prefix_bytes`` > 0: the frozen part of the towers runs once per split and is
    replayed from then on (:func:`split_prefix`), within that many bytes.
    """
    if split.pixels is None or split.captions is None:
        raise ValueError("retrieval evaluation needs both modalities of the split")
    prefix = split_prefix(backbone, split, adapters, batch_size, prefix_bytes)
    if prefix is not None and prefix.images is not None:
        block = prefix.key[0]
        z_i = torch.cat(
            [backbone.image_features(h, *adapters, prefix_block=block).cpu() for h in prefix.images]
        )
    else:
        z_i = backbone.embed_images(split.pixels, *adapters, batch_size=batch_size)
    if prefix is not None and prefix.texts is not None:
        block = prefix.key[1]
        owner = torch.tensor([i for i, caps in enumerate(split.captions) for _ in caps])
        z_t = gather(
            (
                (idx, backbone.text_features(tokens, *adapters, prefix=(block, h)).cpu())
                for idx, tokens, h in prefix.texts
            ),
            len(owner),
        )
    else:
        z_t, owner = backbone.embed_caption_lists(
            split.captions, *adapters, batch_size=batch_size, by_length=True
        )
    return z_i, z_t, owner


def evaluate_retrieval(
    backbone: Backbone,
    split: SplitTensors,
    *adapters: AdapterSet | None,
    protocol: str = "standard",
    batch_size: int = 256,
    memo: ZeroShotMemo | None = None,
    prefix_bytes: float = 0.0,
) -> dict:
    """Retrieval recall (§6) of the backbone + adapters on a paired split.

    ``memo``: while the adapters add nothing (round 0), the frozen backbone's metrics on
    this very split come from there when computed before (:mod:`rcsr_flower.retrieval.zero_shot`).
    ``prefix_bytes``: keep the split's frozen prefix within that budget (:func:`embed_split`);
    0 for a backbone that changes between calls.
    """
    if memo is not None and is_identity(*adapters):
        return memo.metrics(
            backbone,
            "retrieval",
            [split.pixels, split.captions, protocol, batch_size],
            lambda: evaluate_retrieval(backbone, split, protocol=protocol, batch_size=batch_size),
        )
    was_training = [a.training for a in adapters if a is not None]
    for a in adapters:
        if a is not None:
            a.eval()
    try:
        z_i, z_t, owner = embed_split(
            backbone, split, *adapters, batch_size=batch_size, prefix_bytes=prefix_bytes
        )
    finally:
        for a, mode in zip([a for a in adapters if a is not None], was_training, strict=True):
            a.train(mode)
    return retrieval_recall(z_i, z_t, owner, protocol=protocol)
