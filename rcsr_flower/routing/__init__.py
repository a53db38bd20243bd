"""The task-agnostic routing core of RCSR (§5): it sees per-client feature tokens,
losses and updates, never images or captions.

The names below load on first use: the run-config schema imports ``routing.errors``, and
the ClientApp module must not pay for torch before a handler needs it.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rcsr_flower.routing.check import TaskCheckError, check_task
    from rcsr_flower.routing.minimax import MinimaxWeights
    from rcsr_flower.routing.router import SemanticRouter, entropy, fuse_weights

_HOME = {
    "TaskCheckError": "check",
    "check_task": "check",
    "MinimaxWeights": "minimax",
    "SemanticRouter": "router",
    "entropy": "router",
    "fuse_weights": "router",
}
__all__ = [
    "MinimaxWeights",
    "SemanticRouter",
    "TaskCheckError",
    "check_task",
    "entropy",
    "fuse_weights",
]


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOME[name]}"), name)
