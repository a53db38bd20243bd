"""The task-agnostic routing core of RCSR (§5): it sees per-client feature tokens,
losses and updates, never images or captions."""

from rcsr_flower.routing.check import TaskCheckError, check_task
from rcsr_flower.routing.minimax import MinimaxWeights
from rcsr_flower.routing.router import SemanticRouter, entropy, fuse_weights

__all__ = [
    "MinimaxWeights",
    "SemanticRouter",
    "TaskCheckError",
    "check_task",
    "entropy",
    "fuse_weights",
]
