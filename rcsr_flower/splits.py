"""A split of image–caption pairs made ready for the towers, and the one retrieval
evaluation (SPEC §6) that clients, the server, asset building and benchmarks share.

Below the task and above the backbones: it knows a ``Backbone`` and a dataset view, not
run configs, clients or Flower, so backbone pretraining can evaluate with it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rcsr_flower.backbones.adapters import AdapterSet
from rcsr_flower.backbones.clip import Backbone, preprocess_images
from rcsr_flower.data.datasets import ImageCaptionDataset
from rcsr_flower.metrics import retrieval_recall
from rcsr_flower.zero_shot import ZeroShotMemo, is_identity


@dataclass
class SplitTensors:
    """A split ready for the towers: preprocessed pixels and caption lists (either may be None)."""

    pixels: torch.Tensor | None
    captions: list[list[str]] | None

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


def embed_split(
    backbone: Backbone, split: SplitTensors, *adapters: AdapterSet | None, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(z_I [N,d], z_T [M,d], caption->image index [M])`` of a paired split."""
    if split.pixels is None or split.captions is None:
        raise ValueError("retrieval evaluation needs both modalities of the split")
    z_i = backbone.embed_images(split.pixels, *adapters, batch_size=batch_size)
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
) -> dict:
    """Retrieval recall (SPEC §6) of the backbone + adapters on a paired split.

    ``memo``: while the adapters add nothing (round 0), the frozen backbone's metrics on
    this very split come from there when computed before (:mod:`rcsr_flower.zero_shot`).
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
        z_i, z_t, owner = embed_split(backbone, split, *adapters, batch_size=batch_size)
    finally:
        for a, mode in zip([a for a in adapters if a is not None], was_training, strict=True):
            a.train(mode)
    return retrieval_recall(z_i, z_t, owner, protocol=protocol)
