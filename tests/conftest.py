"""Shared fixtures: the embedded assets (built once per machine, cached) and Flower's
message identity for building ``Message`` objects outside the runtime."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch is imported: OpenMP threads that spin while waiting for work take the cores
# from the other xdist worker's federation (rcsr_flower.runtime.launch does the same for Flower's).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    """Slow tests first (stable, so files keep their order). ``make test`` runs two
    pytest-xdist workers a file at a time (``--dist loadfile --no-loadscope-reorder``, so
    a module fixture runs once): the files with the long federations are handed out
    first and the fast ones fill in around them, instead of one worker meeting a
    five-minute deployment test last while the other has nothing left to do."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def fresh_python():
    """Run code in a fresh interpreter in the repository; its printed lines. What a
    process imports (torch or not) can only be seen from one that has imported nothing
    yet, which the test process is not."""

    def run(code: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip().splitlines()

    return run


@pytest.fixture(scope="session")
def embedded_assets():
    """The real embedded corpus + tiny CLIP (built on first use, like `flwr run .`)."""
    from rcsr_flower.embedded.assets import ensure_assets

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
    from rcsr_flower.embedded.random_clip import save_random_clip

    return save_random_clip(tmp_path_factory.mktemp("vit-b32"))


@pytest.fixture(scope="session")
def vit_b32(vit_b32_dir):
    """That checkpoint loaded by path through the project's one loader."""
    from rcsr_flower.backbones.clip import load_backbone

    return load_backbone(str(vit_b32_dir), device="cpu")
