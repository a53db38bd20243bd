"""``LocalOnlyStrategy``: the no-collaboration baseline (``strategy = "local"``).

Every client trains its own adapters and keeps them on its node across rounds, in
``context.state`` (``rcsr_flower.client.handlers``: a client starts its first round from the
server's initial adapters, every later round from its own); nothing is aggregated. The
clients still reply their adapters so that Flower's round, the reply validation and the
round record run exactly as for the other methods; the server discards them.

So the global adapters stay the initial ones (the frozen backbone: zero-shot) and the
server's global evaluation measures nothing this method learnt: its result is the
*personalised* evaluation, each client's own adapters on its own local test split.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord

from rcsr_flower.routing.strategy import RCSRStrategy


class LocalOnlyStrategy(RCSRStrategy):
    """``RCSRStrategy`` in FedAvg mode whose aggregate is thrown away."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        _, metrics = super().aggregate_train(server_round, replies)  # validate and record
        record = self.history.get(server_round, {})
        if not record.get("skipped"):
            # no aggregation: no weights to record, and the global adapters stay as they were
            self._record(
                server_round, {**record, "aggregated": False, "weights": {}, "weight_entropy": None}
            )
        return None, metrics
