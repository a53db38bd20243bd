"""The small typed interface between a federated task and the routing strategy.

:class:`~rcsr_flower.routing.strategy.RCSRStrategy` runs §5 (validate, route, minimax,
fuse, aggregate, update shared state, router step, record) for *any* task that can:

- parse and validate a client's extra reply records into a :class:`ClientReport`;
- turn a report into a fixed-size feature token for the router;
- score a candidate weighting with a differentiable router objective;
- update its shared server state (e.g. a prototype bank) with the fused weights and
  ship that state to clients with the next round;
- hand that state over as tensors for the checkpoint, and take it back on resume.

Image–text retrieval is one such task (``rcsr_flower.server.retrieval_task``);
docs/extending.md shows another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict


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
    holds: frozenset[str] | None = None  # parameter groups the client trained; None = all
    partial: bool = False  # it trained only some of the groups (e.g. a unimodal client)

    def holds_group(self, group: str | None) -> bool:
        return self.holds is None or group is None or group in self.holds


class ParameterGroups(Protocol):
    """Which group each shared array belongs to, and which groups a client trained: what
    group-wise aggregation (§5 step 5) needs, so that a client's zero update of a group it
    cannot train does not dilute the others'. Image–text retrieval's groups are the two
    towers (``server.retrieval_task.TOWER_GROUPS``); a task without one gives none."""

    names: frozenset[str]

    def group_of(self, key: str) -> str | None:
        """The group of the array ``key``; None: an array every client trains."""

    def held(self, metrics: MetricRecord) -> frozenset[str] | None:
        """The groups a reply's client trained, from its metrics; None: all of them.
        Raises :class:`ReplyError` when the metrics name something else."""


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


class FederatedEvaluation(Protocol):
    """How the strategy turns the clients' evaluation replies into one row field."""

    key: str  # the metrics.jsonl field, e.g. "personalized"

    def parse(self, metrics: dict) -> dict | None:
        """One client's ``"metrics"``: the row to summarise, None when it evaluated
        nothing; raise :class:`ReplyError` for a malformed reply."""

    def summarise(self, rows: list[dict]) -> dict:
        """The round's summary; ``summary["mean"]`` (name -> float) also goes to Flower's
        ``Result`` as ``<key>-<name>``."""


class WeightedAverage:
    """Flower ``FedAvg``'s federated evaluation: every numeric metric averaged with the
    clients' ``num-examples`` as weights (``partition-id``, ``num-examples`` and
    ``*-seconds`` excepted)."""

    key = "evaluation"

    def parse(self, metrics: dict) -> dict | None:
        n = metrics.get("num-examples")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ReplyError(f"num-examples is {n!r}, expected an int >= 0")
        return metrics if n > 0 else None

    def summarise(self, rows: list[dict]) -> dict:
        skip = {"num-examples", "partition-id"}
        names = [
            k
            for k, v in rows[0].items()
            if k not in skip
            and not k.endswith("-seconds")
            and isinstance(v, int | float)
            and not isinstance(v, bool)
            and all(isinstance(r.get(k), int | float) for r in rows)
        ]
        total = sum(r["num-examples"] for r in rows)
        mean = {k: sum(float(r[k]) * r["num-examples"] for r in rows) / total for k in names}
        return {"mean": mean, "clients": len(rows), "num-examples": total}
