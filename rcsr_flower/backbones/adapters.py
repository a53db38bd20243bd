"""Bottleneck adapters on a frozen Hugging Face ``CLIPModel`` (§2).

One adapter after each chosen transformer block of each tower:
``h <- h + W_up GELU(W_down h + b_down) + b_up`` with ``W_up = 0`` and zero biases, so
the adapted model starts *exactly* as the frozen backbone (round 0 is true zero-shot).

Adapters wrap the model without forking its code: they are applied with forward hooks
on ``CLIPEncoderLayer`` for the duration of an :func:`adapted` block, so one cached
backbone per process serves the shared adapters, a client's personal adapters, or none.
Hooks change the shared model, so such a block holds the model's :func:`model_lock`: two
threads of one process (the server's central evaluation beside in-process clients)
take turns instead of running each other's adapters. Only adapter tensors are
trainable and only they travel.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator

import torch
from torch import nn

TOWERS = ("vision", "text")


def tower_of(key: str) -> str | None:
    """The tower an :class:`AdapterSet` state-dict key belongs to (``adapters.vision_3.up.bias``
    -> ``"vision"``); None for a key that is not an adapter's."""
    name = key.removeprefix("adapters.")
    tower = name.split("_", 1)[0]
    return tower if tower in TOWERS and name != key else None


class BottleneckAdapter(nn.Module):
    """``x -> W_up GELU(W_down x + b_down) + b_up`` (the residual is added by the hook)."""

    def __init__(self, dim: int, bottleneck: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(h)))


def adapted_blocks(num_layers: int, adapter_layers: str) -> list[int]:
    """Block indices that get an adapter: ``"all"`` or the last ``L`` blocks."""
    if adapter_layers == "all":
        return list(range(num_layers))
    last = int(adapter_layers)
    if last > num_layers:
        raise ValueError(
            f"adapter-layers = {last} but the backbone has only {num_layers} blocks per tower; "
            f"use 'all' or a number <= {num_layers}"
        )
    return list(range(num_layers - last, num_layers))


class AdapterSet(nn.Module):
    """The adapters of both towers, keyed ``"<tower>.<block>"`` (state-dict stable)."""

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        vision_blocks: list[int],
        text_blocks: list[int],
        bottleneck: int = 64,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.blocks = {"vision": list(vision_blocks), "text": list(text_blocks)}
        dims = {"vision": vision_dim, "text": text_dim}
        self.adapters = nn.ModuleDict(
            {
                f"{tower}_{i}": BottleneckAdapter(dims[tower], bottleneck, init_std)
                for tower in TOWERS
                for i in self.blocks[tower]
            }
        )

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        adapter_layers: str = "all",
        bottleneck: int = 64,
        init_std: float = 0.02,
    ) -> AdapterSet:
        """Place adapters for a ``CLIPModel``'s two towers."""
        vision_cfg, text_cfg = model.config.vision_config, model.config.text_config
        return cls(
            vision_dim=vision_cfg.hidden_size,
            text_dim=text_cfg.hidden_size,
            vision_blocks=adapted_blocks(vision_cfg.num_hidden_layers, adapter_layers),
            text_blocks=adapted_blocks(text_cfg.num_hidden_layers, adapter_layers),
            bottleneck=bottleneck,
            init_std=init_std,
        )

    def get(self, tower: str, block: int) -> BottleneckAdapter | None:
        key = f"{tower}_{block}"
        # nn.ModuleDict has no .get()
        return self.adapters[key] if key in self.adapters else None  # noqa: SIM401

    def tower_parameters(self, tower: str) -> Iterator[nn.Parameter]:
        for name, p in self.adapters.named_parameters():
            if name.startswith(f"{tower}_"):
                yield p

    def first_block(self, tower: str) -> int | None:
        """Lowest adapted block: everything below it is frozen and cacheable."""
        return min(self.blocks[tower]) if self.blocks[tower] else None


_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock a forward holds while hooks or swapped modules change ``model``
    (:func:`adapted`, ``backbones.prefix``): one per model, re-entrant."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _encoder_layers(model: nn.Module, tower: str) -> nn.ModuleList:
    sub = model.vision_model if tower == "vision" else model.text_model
    return sub.encoder.layers


@contextlib.contextmanager
def adapted(model: nn.Module, *adapter_sets: AdapterSet | None) -> Iterator[nn.Module]:
    """Apply the given adapter sets (summed: shared + personal) inside the block."""
    sets = [s for s in adapter_sets if s is not None]
    handles = []
    with model_lock(model):
        try:
            for tower in TOWERS:
                for i, layer in enumerate(_encoder_layers(model, tower)):
                    mods = [a for s in sets if (a := s.get(tower, i)) is not None]
                    if not mods:
                        continue

                    def hook(_m, _inp, out, mods=mods):
                        h = out[0] if isinstance(out, tuple) else out
                        delta = sum(a(h) for a in mods)
                        h = h + delta
                        return (h, *out[1:]) if isinstance(out, tuple) else h

                    handles.append(layer.register_forward_hook(hook))
            yield model
        finally:
            for handle in handles:
                handle.remove()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
