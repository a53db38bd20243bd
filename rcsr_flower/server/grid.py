"""Everything the retrieval ServerApp does to Flower's grid, layer by layer.

The strategy talks to the top of this stack; each layer overrides only what it changes
and hands everything else down (``rcsr_flower.routing.grid.GridLayer``). The code below
builds it from the bottom up::

    ServerKillGrid        test only (fault-injection server-kill@R): SIGKILL mid-round
    PartitionOrderedGrid  nodes in partition order, Flower's node waits bounded, every
                          node that did not answer named
    PromptGrid            deployed only: replies pulled every 0.2 s (rcsr_flower.routing.grid)
    PackingGrid           deployed only: a message's arrays as one array on the wire
    Flower's grid         HttpGrid (deployed) or the simulation's in-memory grid

:func:`wire_grid` builds the lower two layers, which everything the ServerApp sends goes
through; :func:`strategy_grid` adds the upper two for the rounds, once the query round
has said which node holds which partition. Beside them, the waits and queries the
ServerApp makes of the nodes outside the rounds: :func:`wait_for_federation` at the
start, :func:`query_nodes`, :func:`release_client_state` at the end.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from rcsr_flower.config import RunConfig
from rcsr_flower.packing import pack_message, unpack_message
from rcsr_flower.routing.aggregation import unanswered
from rcsr_flower.routing.grid import GridLayer, prompt_grid

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- the layers
class PackingGrid(GridLayer):
    """What the server pushes is packed, what it pulls unpacked (``rcsr_flower.packing``).
    It sits under a ``PromptGrid`` (:func:`wire_grid`), whose ``send_and_receive`` is the
    loop over these two."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages([pack_message(m) for m in messages])

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [unpack_message(m) for m in self._grid.pull_messages(message_ids)]


def wire_grid(grid: Grid) -> Grid:
    """``grid`` as Flower handed it: deployed, a ``PromptGrid`` over a
    :class:`PackingGrid` over it (replies pulled every 0.2 s instead of 3 s, the adapters
    one array a message); the simulation's as it is."""
    return prompt_grid(grid, PackingGrid)


class PartitionOrderedGrid(GridLayer):
    """The run's grid, listing nodes in partition order, and bounding Flower's waits.

    SuperNode ids are random per launch and Flower samples with ``random.sample`` over
    ``get_node_ids()``: ordered by partition id, the seeded sample picks the same clients
    in every launch.

    Flower's ``sample_nodes`` polls ``get_node_ids()`` once a second, without end, while
    fewer nodes are connected than the strategy's minimum. With ``needs`` (the minimums,
    :func:`nodes_needed`) and ``wait_timeout``, the polling is timed here: once it has
    seen too few nodes for ``wait_timeout`` seconds with no message sent in between, it
    raises :class:`NodeWaitTimeout` out of the strategy (every 30 s before that it logs
    who is missing).
    """

    def __init__(
        self,
        grid: Grid,
        partition_of: dict[int, int],
        *,
        needs: dict[str, int] | None = None,
        wait_timeout: float | None = None,
    ) -> None:
        super().__init__(grid)
        self._partition_of = partition_of
        self._needs = needs or {}
        self._wait_timeout = wait_timeout
        self._wait: NodeWait | None = None
        self._last_sent: str | None = None  # where the run is, for the wait's log lines

    def get_node_ids(self) -> list[int]:
        unknown = 1 << 62  # nodes that joined after the query round go last
        nodes = sorted(
            self._grid.get_node_ids(), key=lambda n: (self._partition_of.get(n, unknown), n)
        )
        self._time_wait(nodes)
        return nodes

    def _time_wait(self, nodes: list[int]) -> None:
        if self._wait_timeout is None or not self._needs or len(nodes) >= max(self._needs.values()):
            self._wait = None
            return
        missing = _missing(self._partition_of, nodes, None)
        if self._wait is None:  # Flower may be about to wait: it polls again if so
            where = f"after {self._last_sent}" if self._last_sent else "before the first round"
            self._wait = NodeWait(self._needs, self._wait_timeout, where)
        else:
            self._wait.check(len(nodes), missing)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """The real grid's, then a warning naming every node that did not answer."""
        messages = list(messages)
        self._wait = None  # Flower sends only once it has its nodes: no wait in progress
        if messages:
            self._last_sent = _describe(messages[0])
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg, why in unanswered(messages, replies):
            node = msg.metadata.dst_node_id
            what = _describe(msg)
            waited = f"{timeout:.0f} s" if timeout is not None else "the round"
            outcome = f"failed: {why.rstrip('.')}" if why else f"sent no reply within {waited}"
            log.warning(
                "%s: node %d (partition %s) %s; going on with the others",
                what,
                node,
                self._partition_of.get(node, "?"),
                outcome,
            )
        return replies


def _describe(msg: Message) -> str:
    """``"train round 3"``, ``"query"``: a message's type and round, for log lines."""
    config = msg.content.config_records.get("config")
    server_round = config.get("server-round") if config is not None else None
    what = msg.metadata.message_type
    return what if server_round is None else f"{what} round {server_round}"


class ServerKillGrid(GridLayer):
    """SIGKILLs this process once round ``kill_round``'s train replies have arrived,
    before the strategy aggregates them (``server-kill@R``, rcsr_flower/faults.py)."""

    def __init__(self, grid: Grid, kill_round: int) -> None:
        super().__init__(grid)
        self._kill_round = kill_round

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        if any(
            m.metadata.message_type == MessageType.TRAIN
            and int(m.content["config"]["server-round"]) == self._kill_round
            for m in messages
        ):
            log.warning("injected fault: killing the ServerApp (pid %d) mid-round", os.getpid())
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return replies


def strategy_grid(grid: Grid, cfg: RunConfig, partition_of: dict[int, int]) -> Grid:
    """The grid the strategy's rounds go through: :func:`wire_grid`'s ``grid`` in
    partition order (``partition_of``: node id -> partition id) with Flower's node waits
    bounded by ``node-wait-timeout``, under a :class:`ServerKillGrid` when the run's
    ``fault-injection`` has ``server-kill@R``."""
    run_grid: GridLayer = PartitionOrderedGrid(
        grid,
        partition_of,
        needs=nodes_needed(cfg),
        wait_timeout=cfg.node_wait_timeout,
    )
    if cfg.faults.server_kill_round is not None:
        run_grid = ServerKillGrid(run_grid, cfg.faults.server_kill_round)
    return run_grid  # type: ignore[return-value]


# ---------------------------------------------------------------------------- node waits
class NodeWaitTimeout(RuntimeError):
    """Fewer nodes than the run's minimum stayed connected for ``node-wait-timeout`` s."""


WAIT_LOG_EVERY = 30.0  # seconds between "waiting for nodes" lines


def nodes_needed(cfg: RunConfig) -> dict[str, int]:
    """The minimums that make Flower wait for nodes, by run-config key."""
    needs = {
        "min-available-nodes": cfg.min_available_nodes,
        "min-train-nodes": cfg.min_train_nodes,
    }
    if cfg.fraction_evaluate > 0:
        needs["min-evaluate-nodes"] = cfg.min_evaluate_nodes
    return needs


class NodeWait:
    """One bounded wait for nodes: how long it has lasted, a progress line every 30 s,
    and :class:`NodeWaitTimeout` (one line: who is missing) when ``timeout`` is up."""

    def __init__(self, needs: dict[str, int], timeout: float, where: str) -> None:
        self.needs = needs
        self.needed = max(needs.values())
        self.timeout = timeout
        self.where = where
        self.started = time.monotonic()
        self.logged: float | None = None  # the first check logs

    def due(self) -> bool:
        """Whether :meth:`check` will log or raise now."""
        now = time.monotonic()
        if self.logged is None or now - self.started >= self.timeout:
            return True
        return now - self.logged >= WAIT_LOG_EVERY

    def check(self, connected: int, missing: str) -> None:
        """Log progress, or raise once the time is up."""
        now = time.monotonic()
        waited = now - self.started
        if waited >= self.timeout:
            raise NodeWaitTimeout(
                f"waited {waited:.0f} s (node-wait-timeout) for nodes {self.where}: "
                f"{self._status(connected, missing)}"
            )
        if self.logged is None or now - self.logged >= WAIT_LOG_EVERY:
            self.logged = now
            self._log(connected, missing)

    def _log(self, connected: int, missing: str) -> None:
        left = max(0.0, self.timeout - (time.monotonic() - self.started))
        log.warning(
            "waiting for nodes %s: %s; the run ends in %.0f s unless they connect",
            self.where,
            self._status(connected, missing),
            left,
        )

    def _status(self, connected: int, missing: str) -> str:
        keys = ", ".join(f"{k} {v}" for k, v in self.needs.items() if v == self.needed)
        return f"{connected} connected, {self.needed} needed ({keys}){missing}"


def wait_for_federation(grid: Grid, cfg: RunConfig, timeout: float | None = None) -> list[int]:
    """Wait for ``min-available-nodes``, at most ``node-wait-timeout`` s (or ``timeout``);
    fail fast when the federation is too small.

    As soon as one node is up, it is asked for ``num-partitions`` (the federation's size;
    the node answers without loading anything): minimums above it would make Flower's
    sampling wait forever, so they stop the run here with one line naming the key. While
    the wait lasts, every 30 s the new nodes are asked who they are, so the log names the
    partitions that are still missing.
    """
    wait = NodeWait(
        {"min-available-nodes": cfg.min_available_nodes},
        cfg.node_wait_timeout if timeout is None else timeout,
        "to start the run",
    )
    checked, partition_of, num_partitions = False, {}, None
    while True:
        nodes = list(grid.get_node_ids())
        if nodes and not checked:
            sized = query_nodes(grid, cfg, "size", nodes[:1])
            if sized:
                num_partitions = int(sized[0]["num-partitions"])
                cfg.check_federation(num_partitions)
                partition_of[sized[0]["node_id"]] = int(sized[0]["partition-id"])
                checked = True
        if checked and len(nodes) >= cfg.min_available_nodes:
            return nodes
        if wait.due():  # about to log or give up: who is here?
            new = [n for n in nodes if n not in partition_of]
            if new:
                for entry in query_nodes(grid, cfg, "size", new):
                    partition_of[entry["node_id"]] = int(entry["partition-id"])
        wait.check(len(nodes), _missing(partition_of, nodes, num_partitions))
        time.sleep(1.0)


def _missing(partition_of: dict[int, int], nodes: list[int], num_partitions: int | None) -> str:
    """``"; partitions not connected: 1, 3"`` (those known to the run), else ``""``."""
    here = {partition_of[n] for n in nodes if n in partition_of}
    if num_partitions is not None:
        missing = sorted(set(range(num_partitions)) - here)
    else:
        missing = sorted(set(partition_of.values()) - here)
    if not missing:
        return ""
    shown = ", ".join(map(str, missing[:20])) + (", ..." if len(missing) > 20 else "")
    return f"; partitions not connected: {shown}"


# ---------------------------------------------------------------------------- queries
def query_nodes(grid: Grid, cfg: RunConfig, kind: str, node_ids: list[int]) -> list[dict]:
    """One QUERY round (``kind``: bootstrap, describe); failures are logged and skipped."""
    replies = _query(grid, node_ids, {"kind": kind, "prototype-slots": cfg.prototype_slots}, cfg)
    info = []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d failed the query round: %s", node, reply.error.reason)
            continue
        entry = {"node_id": node, **dict(reply.content["metrics"])}
        if "groups" in reply.content.array_records:
            entry["groups"] = reply.content["groups"].to_torch_state_dict()
        info.append(entry)
    return sorted(info, key=lambda d: d["partition-id"])


def _query(grid: Grid, node_ids: list[int], config: dict, cfg: RunConfig) -> list[Message]:
    messages = [
        Message(
            RecordDict({"config": ConfigRecord(config)}),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in node_ids
    ]
    return list(grid.send_and_receive(messages, timeout=cfg.round_timeout))


def release_client_state(grid: Grid, cfg: RunConfig, state_key: str) -> None:
    """Tell every node the run is over: it deletes its resume snapshots (client/handlers.py)."""
    nodes = list(grid.get_node_ids())
    replies = _query(grid, nodes, {"kind": "release-state", "state-key": state_key}, cfg)
    released = sum(not r.has_error() for r in replies)
    if released < len(nodes):
        log.warning("client state kept on %d of %d nodes", len(nodes) - released, len(nodes))
