"""Shared fixtures: the embedded assets (built once per machine, cached) and Flower's
message identity for building ``Message`` objects outside the runtime; and the order in
which pytest-xdist's workers take the tests (``make test`` runs several, see
:func:`pytest_collection_modifyitems`)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first, so parallel workers end together.

    Half of the suite's wall time is waiting (Flower's heartbeat window, a round-timeout,
    process start-up), so ``make test`` runs it on more workers than cores with
    ``--dist loadgroup``: each test is a unit of work, except that a module's tests stay
    on one worker (its module-scoped fixtures run once) unless the test is marked
    ``slow`` and the module puts no ``xdist_group`` of its own on it. Units are handed
    out in collection order, so the order here is the schedule: ``slow(minutes=...)``
    (what the test takes on a loaded 2-core machine) descending, then everything else in
    file order. A plain ``pytest`` (one process) runs the same order.
    """

    def minutes(item: pytest.Item) -> float:
        slow = item.get_closest_marker("slow")
        return -1.0 if slow is None else float(slow.kwargs.get("minutes", 1.0))

    for item in items:
        if not (item.get_closest_marker("slow") or item.get_closest_marker("xdist_group")):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))
    items[:] = sorted(items, key=lambda item: -minutes(item))  # stable: file order in ties


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
