"""Shared fixtures: the embedded assets (built once per machine, cached) and Flower's
message identity for building ``Message`` objects outside the runtime."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Slow tests first, in file order. ``make test`` runs two pytest-xdist workers
    (``--dist loadgroup``): each starts on a long federation and the fast tests fill in
    around them, instead of one worker meeting a five-minute deployment test last while
    the other has nothing left. Tests that share an expensive module fixture are one
    ``xdist_group`` so it is computed once."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def embedded_assets():
    """The real embedded corpus + tiny CLIP (built on first use, like `flwr run .`)."""
    from rcsr_flower.assets import ensure_assets

    return ensure_assets()


@pytest.fixture(scope="session")
def backbone(embedded_assets):
    from rcsr_flower.backbones.clip import load_backbone

    return load_backbone(str(embedded_assets.backbone_dir), device="cpu")


@pytest.fixture(scope="session")
def vit_b32_dir(tmp_path_factory):
    """A ViT-B/32-shaped CLIP (``CLIPConfig()`` defaults, random weights) saved with
    ``save_pretrained`` together with its tokenizer and image processor: the layout
    ``hf download openai/clip-vit-base-patch32`` gives, without the download."""
    from rcsr_flower.backbones.random_clip import save_random_clip

    return save_random_clip(tmp_path_factory.mktemp("vit-b32"))


@pytest.fixture(scope="session")
def vit_b32(vit_b32_dir):
    """That checkpoint loaded by path through the project's one loader."""
    from rcsr_flower.backbones.clip import load_backbone

    return load_backbone(str(vit_b32_dir), device="cpu")
