"""Layers between a routed ServerApp and the grid Flower hands it.

A layer wraps a grid and is used in its place: it overrides what it changes of
``push_messages``, ``pull_messages``, ``send_and_receive`` and ``get_node_ids``, and
everything else is the wrapped grid's (:class:`GridLayer`, where that delegation is
written once). Layers stack, and the strategy talks to the top one.

Here are the layers any routed app may use: :class:`PromptGrid` (a deployed run's
replies pulled every :data:`PULL_INTERVAL` s), which :func:`prompt_grid` puts over
Flower's deployed grid and ``RoutedRun.start`` applies to whatever grid it is given. The
retrieval app's whole stack, built on these, is ``rcsr_flower.server.grid``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore import log as flwr_log

from rcsr_flower.routing.inbox import index_inbox

PULL_INTERVAL = 0.2  # seconds between a deployed ServerApp's pulls for replies


class GridLayer:
    """A grid over ``grid``: what a subclass defines is its own, everything else
    ``grid``'s."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class PromptGrid(GridLayer):
    """A grid whose ``send_and_receive`` pulls for replies every :data:`PULL_INTERVAL` s.

    Flower's ``HttpGrid`` (a deployed ServerApp's grid) pulls and then sleeps 3 s until
    every reply is in or the timeout passes, so each train and evaluate step waits 1.5 s
    on average, 3 s at worst, after its last reply came: about 3 s of every deployed
    round, five minutes of a 100-round run. This is the same loop over the wrapped grid's
    ``push_messages``/``pull_messages``, with the same timeout. :func:`prompt_grid`
    leaves Flower's in-memory grid (simulation, 0.1 s) as it is."""

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL) -> None:
        super().__init__(grid)
        self.interval = interval

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list:
        waiting = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list = []
        while True:
            pulled = list(self._grid.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting or (deadline is not None and time.monotonic() >= deadline):
                return replies
            time.sleep(self.interval)


def prompt_grid(grid: Grid, wire: Callable[[Grid], Any] | None = None) -> Grid:
    """``grid`` as Flower handed it to a ServerApp: Flower's ``HttpGrid`` (a deployment)
    in a :class:`PromptGrid`, any other grid as it is (the simulation's in-memory grid
    pulls every 0.1 s already, and no message of it crosses a wire; its state's messages
    are indexed by node, ``rcsr_flower.routing.inbox``). ``wire`` wraps the
    deployed grid first, for what the app does to messages on the wire (the retrieval
    app: ``rcsr_flower.server.grid.PackingGrid``)."""
    try:
        from flwr.superlink.grid.http_grid import HttpGrid
    except ImportError:  # a Flower that moved it: its grid as it is
        return grid
    if not isinstance(grid, HttpGrid):
        index_inbox(grid)  # a simulation's: delivering costs the round, not the population
        return grid
    inner = wire(grid) if wire is not None else grid
    flwr_log(  # Flower's logger: on the run's console with the strategy's lines
        logging.INFO,
        "deployed grid: replies pulled every %.1f s%s",
        PULL_INTERVAL,
        f", messages through {type(inner).__name__}" if wire is not None else "",
    )
    return PromptGrid(inner)  # type: ignore[return-value]
