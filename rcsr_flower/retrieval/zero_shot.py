"""What the frozen backbone computes, remembered on disk (``zero-shot-cache``).

Adapters start with ``W_up = 0`` and ``b_up = 0`` (§2), so until they have trained
they add exactly nothing: the adapted model *is* the frozen backbone. Round 0's retrieval
metrics (on the global test split and on every client's local split) and the paired
clients' bootstrap groups (§3) are then functions of the backbone's weights, the data
and the code alone, and the same for every method of a setting and seed: the experiment
suite used to compute them again in each of its cells, ``make run`` in each run, about a
tenth of a default run's work. So is every central evaluation of local-only, whose
server adapters never move.

A result is kept under a hash of everything it depends on: the backbone's weights,
tokenizer and image processor; the very tensors and captions it was computed from; every
setting of the computation; the device and precision; the source of the modules that
compute it and the versions of torch, transformers, numpy and scikit-learn. A change to
any of them is a new key, never a stale result. Files are written whole (temporary file,
then rename), a torn or unreadable one is recomputed, and the directory
(``<cache-dir>/zero-shot``) is safe to delete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from rcsr_flower.backbones.adapters import AdapterSet, BottleneckAdapter
from rcsr_flower.routing.outputs import write_cache_file

log = logging.getLogger(__name__)

VERSION = 1
# the modules whose code decides the numbers kept here: any edit to them is a new key
_SOURCES = (
    "rcsr_flower.retrieval.metrics",
    "rcsr_flower.retrieval.evaluation",
    "rcsr_flower.client.data",
    "rcsr_flower.client.training",
    "rcsr_flower.backbones.clip",
    "rcsr_flower.backbones.adapters",
)
_LIBRARIES = ("torch", "transformers", "numpy", "scikit-learn")
_BACKBONE_DIGESTS: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()
_CODE_DIGEST: str | None = None


def is_identity(*adapter_sets: AdapterSet | None) -> bool:
    """True when every given adapter adds exactly zero (all up-projections zero), so
    the adapted forward equals the frozen backbone's bit for bit."""
    for adapters in adapter_sets:
        if adapters is None:
            continue
        for module in adapters.modules():
            if isinstance(module, BottleneckAdapter) and (
                module.up.weight.count_nonzero() or module.up.bias.count_nonzero()
            ):
                return False
    return True


def digest(*parts: Any) -> str:
    """A hash of tensors (dtype, shape and bytes), strings, numbers and (nested) lists."""
    h = hashlib.blake2b(digest_size=20)

    def feed(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, list | tuple):
            h.update(f"L{len(x)}".encode())
            for item in x:
                feed(item)
        elif x is None or isinstance(x, str | int | float | bool):
            h.update(f"{type(x).__name__}:{x!r};".encode())
        else:
            raise TypeError(f"cannot hash {type(x).__name__}")

    for part in parts:
        feed(part)
    return h.hexdigest()


def backbone_digest(backbone) -> str:
    """The weights, tokenizer and image processor of a backbone (hashed once per model)."""
    model = backbone.model
    cached = _BACKBONE_DIGESTS.get(model)
    if cached is None:
        state = model.state_dict()
        tokenizer, processor = backbone.tokenizer, backbone.image_processor
        if getattr(tokenizer, "backend_tokenizer", None) is not None:
            vocab = tokenizer.backend_tokenizer.to_str()
        else:  # a slow tokenizer, or none (a benchmark's bare model)
            vocab = json.dumps(tokenizer.get_vocab()) if tokenizer is not None else None
        cached = digest(
            [[name, state[name]] for name in sorted(state)],
            vocab,
            json.dumps(processor.to_dict(), sort_keys=True, default=str) if processor else None,
            json.dumps(model.config.to_dict(), sort_keys=True, default=str),
        )
        _BACKBONE_DIGESTS[model] = cached
    return cached


def code_digest() -> str:
    """The source of the modules that compute what is kept, and the libraries' versions."""
    global _CODE_DIGEST
    if _CODE_DIGEST is None:
        sources = []
        for name in _SOURCES:
            spec = importlib.util.find_spec(name)
            sources.append(Path(spec.origin).read_text() if spec and spec.origin else name)
        versions = []
        for lib in _LIBRARIES:
            try:
                versions.append(f"{lib}={importlib.metadata.version(lib)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{lib}=none")
        _CODE_DIGEST = digest(VERSION, sources, versions)
    return _CODE_DIGEST


class ZeroShotMemo:
    """Results of the frozen backbone under ``root``, each keyed by what it depends on."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def key(self, backbone, kind: str, parts: Iterable[Any]) -> str:
        device = backbone.device
        precision = f"{device.type}|{backbone.mixed_precision}"
        return digest(kind, code_digest(), backbone_digest(backbone), precision, list(parts))

    def metrics(
        self, backbone, kind: str, parts: Iterable[Any], compute: Callable[[], dict]
    ) -> dict:
        """``compute()`` (a JSON-able dict), or what it returned before for the same key."""
        path = self.root / f"{kind}-{self.key(backbone, kind, parts)}.json"
        if path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("recomputing %s: unreadable %s (%s)", kind, path, exc)
        result = compute()
        write_cache_file(path, lambda tmp: tmp.write_text(json.dumps(result)), kind)
        return result

    def tensors(
        self,
        backbone,
        kind: str,
        parts: Iterable[Any],
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``compute()`` (named CPU tensors), or what it returned before for the same key."""
        from safetensors.torch import load_file, save_file

        path = self.root / f"{kind}-{self.key(backbone, kind, parts)}.safetensors"
        if path.is_file():
            try:
                return load_file(str(path))
            except Exception as exc:  # torn or foreign: recompute
                log.warning("recomputing %s: unreadable %s (%s)", kind, path, exc)
        result = compute()
        write_cache_file(path, lambda tmp: save_file(result, str(tmp)), kind)
        return result
