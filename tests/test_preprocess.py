"""Image preprocessing through a DataLoader: same pixels with or without worker processes."""

import pytest
import torch

from rcsr_flower.data.datasets import open_dataset
from rcsr_flower.retrieval.evaluation import preprocess_split


def reference_pixels(backbone, dataset, chunk):
    """The in-process path the loader replaced: decode a chunk, preprocess it, concatenate."""
    parts = []
    for s in range(0, len(dataset), chunk):
        parts.append(
            backbone.preprocess([dataset.image(i) for i in range(s, min(s + chunk, len(dataset)))])
        )
    return torch.cat(parts)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_pixels_are_bit_identical_to_in_process_decoding(embedded_assets, backbone, workers):
    dataset = open_dataset(embedded_assets.corpus_json, "train").subset(range(100, 140))
    expected = reference_pixels(backbone, dataset, chunk=16)
    rng = torch.get_rng_state()
    split = preprocess_split(backbone, dataset, chunk=16, workers=workers)  # 3 chunks
    assert torch.equal(torch.get_rng_state(), rng)  # seeded adapter init downstream unchanged
    assert split.pixels.dtype == expected.dtype and torch.equal(split.pixels, expected)
    assert split.captions == [dataset.captions(i) for i in range(len(dataset))]


def test_missing_modality_is_never_loaded(embedded_assets, backbone):
    dataset = open_dataset(embedded_assets.corpus_json, "train").subset(range(8))
    text_only = preprocess_split(backbone, dataset, images=False, workers=2)
    assert text_only.pixels is None and len(text_only) == 8
    image_only = preprocess_split(backbone, dataset, texts=False, workers=2)
    assert image_only.captions is None and image_only.pixels.shape[0] == 8
    assert preprocess_split(backbone, dataset.subset([]), workers=2).pixels is None
