"""The small typed interface between a federated task and the routing strategy.

:class:`~rcsr_flower.strategy.RCSRStrategy` runs SPEC §5 (validate, route, minimax,
fuse, aggregate, update shared state, router step, record) for *any* task that can:

- parse and validate a client's extra reply records into a :class:`ClientReport`;
- turn a report into a fixed-size feature token for the router;
- score a candidate weighting with a differentiable router objective;
- update its shared server state (e.g. a prototype bank) with the fused weights and
  ship that state to clients with the next round;
- hand that state over as tensors for the checkpoint, and take it back on resume.

Image–text retrieval is one such task (``rcsr_flower.retrieval_task``);
docs/extending.md shows another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, RecordDict


class ReplyError(ValueError):
    """A client's reply cannot be used; the message says why."""


@dataclass
class ClientReport:
    """What the strategy knows about one client's valid reply."""

    node_id: int
    client_id: int  # stable index in [0, N) for the minimax distribution
    num_examples: int
    loss: float
    arrays: ArrayRecord  # the client's trained shared parameters θ_k
    summary: Any  # task-specific statistics (prototypes, slot stats, geometry, ...)
    holds: frozenset[str] | None = None  # towers the client trained; None = all

    def holds_tower(self, tower: str) -> bool:
        return self.holds is None or tower in self.holds


class RoutedTask(Protocol):
    """A federated task the routing strategy can aggregate."""

    @property
    def token_dim(self) -> int:
        """Length of one client's router token."""

    def parse_reply(self, content: RecordDict) -> Any:
        """Validate the task's records of a reply and return its summary.

        Raise :class:`ReplyError` with the reason for anything malformed.
        """

    def token(self, report: ClientReport, update: dict[str, torch.Tensor]) -> torch.Tensor:
        """The router's feature vector for one client (``update`` is ``θ_k − θ``)."""

    def router_objective(self, w_router: torch.Tensor, reports: list[ClientReport]) -> torch.Tensor:
        """A differentiable scalar the router minimises over its weights."""

    def update_state(self, weights: torch.Tensor, reports: list[ClientReport]) -> None:
        """Update shared server state with the fused weights."""

    def state_records(self) -> dict[str, ArrayRecord]:
        """Records shipped to clients with every train message (e.g. prototypes)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The shared server state as tensors, for the per-round checkpoint."""

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (a resumed run)."""
