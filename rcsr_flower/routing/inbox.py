"""A simulation's undelivered messages indexed by node, so that delivering them costs
what the round sends, not the population.

Flower's simulation engine (``flwr.server.superlink.fleet.vce.vce_api``) hands messages
to the ClientApps from a thread that, every 0.1 s, asks the in-memory link state for the
next message of *every* simulated node, and ``InMemoryLinkState.get_message_ins`` answers
each such question by scanning (and expiry-checking) *every* stored message. One pass is
nodes × stored messages: 19 ms for 1,000 idle nodes (1.9 ms for 100), and with a query of
all 1,000 nodes in flight a million checks, holding the state's lock and a core the whole
round. That is Flower's cost, not the app's, and it grows with the population.

:func:`index_inbox` gives the run's in-memory state a per-node index of its stored
messages: ``store_message_ins`` adds to it, ``get_message_ins(node)`` looks at that
node's messages only, in the order they were stored, with the same expiry check, and
returns and marks what the original would (tested against it); a node with nothing
stored costs a dictionary lookup, where Flower's takes the lock and reads the clock (an
idle pass over 1,000 nodes: 0.3 ms, Flower's 3.4 ms). Only Flower's
in-memory state, with the attributes this relies on, is indexed; anything else (a
deployment's SuperLink, another Flower) is left as it is.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_NEEDS = ("lock", "message_ins_store", "_check_stored_messages", "store_message_ins")


class NodeInbox:
    """``state``'s stored messages by destination node (message ids in store order)."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.ids: dict[int, list[str]] = {}
        self._store = state.store_message_ins  # the original, bound

    def install(self) -> None:
        """Index what is stored now and take over the two methods (on this instance)."""
        with self.state.lock:
            for msg_id, msg in self.state.message_ins_store.items():
                self.ids.setdefault(msg.metadata.dst_node_id, []).append(msg_id)
            self.state.store_message_ins = self.store_message_ins
            self.state.get_message_ins = self.get_message_ins
            self.state.rcsr_inbox = self

    def store_message_ins(self, message: Any) -> str | None:
        """Flower's ``store_message_ins``, and the message indexed under its node."""
        with self.state.lock:
            new = message.metadata.message_id not in self.state.message_ins_store
            stored = self._store(message)
            if stored is not None and new and stored in self.state.message_ins_store:
                self.ids.setdefault(message.metadata.dst_node_id, []).append(stored)
        return stored

    def get_message_ins(
        self, node_id: int, limit: int | None, *, run_id: int | None = None
    ) -> list[Any]:
        """Flower's ``get_message_ins`` over ``node_id``'s own messages: the first
        ``limit`` undelivered ones that pass the expiry check, marked delivered."""
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        if not self.ids.get(node_id):
            # most nodes, most of the time: nothing stored for them, and no lock taken.
            # A message stored while this reads is delivered at the next pass, as it
            # would be had the pass come a moment earlier
            return []
        from flwr.supercore.date import now

        state = self.state
        found: list[Any] = []
        with state.lock:
            for msg_id in self.ids.get(node_id, ()):
                state._check_stored_messages({msg_id})  # may delete it (expired)
                msg = state.message_ins_store.get(msg_id)
                if (
                    msg is not None
                    and msg.metadata.dst_node_id == node_id
                    and (run_id is None or msg.metadata.run_id == run_id)
                    and msg.metadata.delivered_at == ""
                ):
                    found.append(msg)
                if limit and len(found) == limit:
                    break
            live = [m for m in self.ids.get(node_id, ()) if m in state.message_ins_store]
            if live:
                self.ids[node_id] = live
            else:
                self.ids.pop(node_id, None)
        delivered_at = now().isoformat()
        for msg in found:
            msg.metadata.delivered_at = delivered_at
        return found


def index_inbox(grid: Any) -> bool:
    """Index the undelivered messages of ``grid``'s state by node, when ``grid`` is
    Flower's in-memory (simulation) grid over its in-memory state; True when indexed
    (now or before)."""
    try:
        from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid
    except ImportError:  # a Flower that moved them: as it is
        return False
    state = getattr(grid, "state", None)
    if not isinstance(grid, InMemoryGrid) or type(state) is not InMemoryLinkState:
        return False
    if getattr(state, "rcsr_inbox", None) is not None:
        return True
    if not all(hasattr(state, name) for name in _NEEDS):
        log.info("simulation inbox not indexed: this Flower's in-memory state differs")
        return False
    NodeInbox(state).install()
    return True
