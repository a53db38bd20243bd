"""Test-only fault injection: run-config ``fault-injection`` makes a real run misbehave.

The fault and resume tests (``tests/test_faults_resume.py``) need clients that really
raise or reply garbage inside a real Flower run, and a ServerApp that really dies
mid-round. Production runs leave the key empty (the default), and nothing here runs.

``fault-injection`` is a comma-separated list of items:

- ``raise:P@R`` — client ``P`` raises in its train handler in round ``R`` (Flower turns
  the exception into an error reply);
- ``nan:P@R`` — client ``P`` replies adapters full of NaN in round ``R``;
- ``huge:P@R`` — client ``P`` adds 100 to every adapter entry it replies in round ``R``
  (an update far beyond any sensible ``max-update-norm``);
- ``hang:P@R`` — client ``P`` sleeps ``round-timeout`` + 15 s before training in round
  ``R``: alive (its node keeps its heartbeat) but silent until after the server has gone
  on (its wait began before the hang did, and 15 s covers a server slowed by a loaded
  machine). No longer: Flower's simulation cannot end a run before every message in
  flight has returned, so each second of hang past the timeout is a second of test;
- ``server-kill@R`` — the ServerApp process sends itself ``SIGKILL`` as soon as round
  ``R``'s train replies have arrived, before it aggregates them: the clients have trained
  round ``R``, the last checkpoint is round ``R−1`` (a crash at the worst moment; the
  run's grid does it: ``rcsr_flower.server.grid.ServerKillGrid``).

``P`` is a partition id or ``*`` (every client); ``R`` is a server round (from 1).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the config schema imports this module: keep it free of torch and flwr
    import torch

log = logging.getLogger(__name__)

CLIENT_FAULTS = ("raise", "nan", "huge", "hang")
HANG_MARGIN_S = 15.0  # a hanging client answers this long after the server's timeout
GRAMMAR = "comma-separated raise|nan|huge|hang:<partition-id|*>@<round> and server-kill@<round>"
_CLIENT_ITEM = re.compile(r"^(raise|nan|huge|hang):(\*|\d+)@(\d+)$")
_SERVER_ITEM = re.compile(r"^server-kill@(\d+)$")


class InjectedFault(RuntimeError):
    """The exception a client raises for ``raise:P@R``."""


@dataclass(frozen=True)
class FaultPlan:
    """The parsed ``fault-injection`` value."""

    client: tuple[tuple[str, int | None, int], ...] = ()  # (kind, partition or None=*, round)
    server_kill_round: int | None = None

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """Parse ``spec``; raise ``ValueError`` naming the first bad item."""
        client, kill = [], None
        for item in (s.strip() for s in spec.split(",")):
            if not item:
                continue
            client_item, server_item = _CLIENT_ITEM.match(item), _SERVER_ITEM.match(item)
            if not (client_item or server_item):
                raise ValueError(f"bad item {item!r}")
            rnd = int((client_item or server_item).groups()[-1])
            if rnd < 1:
                raise ValueError(f"bad item {item!r}: rounds start at 1")
            if client_item:
                kind, who, _ = client_item.groups()
                client.append((kind, None if who == "*" else int(who), rnd))
            else:
                kill = rnd
        return cls(tuple(client), kill)

    def client_fault(self, partition_id: int, server_round: int) -> str | None:
        """The fault client ``partition_id`` injects in ``server_round``, if any."""
        for kind, who, rnd in self.client:
            if rnd == server_round and who in (None, partition_id):
                return kind
        return None


def before_training(
    plan: FaultPlan, partition_id: int, server_round: int, round_timeout: float = 0.0
) -> None:
    kind = plan.client_fault(partition_id, server_round)
    if kind == "raise":
        raise InjectedFault(f"injected fault: client {partition_id} raises in round {server_round}")
    if kind == "hang":
        log.warning("injected fault: client %d hangs in round %d", partition_id, server_round)
        time.sleep(round_timeout + HANG_MARGIN_S)  # past the server's wait, begun earlier


def corrupt_reply(
    plan: FaultPlan, partition_id: int, server_round: int, trained: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The trained adapters as the faulty client replies them."""
    kind = plan.client_fault(partition_id, server_round)
    if kind == "nan":
        return {k: v.new_full(v.shape, float("nan")) for k, v in trained.items()}
    if kind == "huge":
        return {k: v + 100.0 for k, v in trained.items()}
    return trained
