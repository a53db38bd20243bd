"""Shared fixtures: the embedded assets (built once per machine, cached) and Flower's
message identity for building ``Message`` objects outside the runtime."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_assets():
    """The real embedded corpus + tiny CLIP (built on first use, like `flwr run .`)."""
    from rcsr_flower.assets import ensure_assets

    return ensure_assets()


@pytest.fixture(scope="session")
def backbone(embedded_assets):
    from rcsr_flower.backbones.clip import load_backbone

    return load_backbone(str(embedded_assets.backbone_dir), device="cpu")
