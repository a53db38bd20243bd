"""ServerApp set-up on real Flower ``Message``s through a fake grid (no simulation)."""

import time
from unittest.mock import Mock

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from test_strategy import task_identity  # noqa: F401

from rcsr_flower.client.handlers import light_query
from rcsr_flower.config import ConfigError, RunConfig
from rcsr_flower.server import app as server
from rcsr_flower.server import grid as server_grid
from rcsr_flower.server.grid import (
    NodeWaitTimeout,
    PartitionOrderedGrid,
    nodes_needed,
    wait_for_federation,
)


def federation(size: int) -> Mock:
    """A grid of ``size`` nodes whose replies come from the real ClientApp code."""
    grid = Mock(spec=Grid)
    grid.get_node_ids.return_value = [100 + i for i in range(size)]

    def send_and_receive(messages, timeout=None):
        replies = []
        for msg in messages:
            node = {"partition-id": msg.metadata.dst_node_id - 100, "num-partitions": size}
            metrics = light_query({}, node, msg.content["config"])
            replies.append(Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg))
        return replies

    grid.send_and_receive.side_effect = send_and_receive
    return grid


def test_minimums_above_the_federation_size_stop_the_run_before_anything_loads():
    cfg = RunConfig.from_flower({"min-train-nodes": 3})
    with pytest.raises(ConfigError) as exc:
        wait_for_federation(federation(2), cfg, timeout=5)
    message = str(exc.value)
    assert "\n" not in message
    assert message == (
        "run-config 'min-train-nodes' = 3 but the federation has 2 clients (num-partitions): "
        "allowed [1, 2]"
    )
    assert wait_for_federation(federation(3), cfg, timeout=5) == [100, 101, 102]


# ---------------------------------------------------------------------------- node waits
def shrinking(grid: Mock, calls_with_all: int) -> Mock:
    """``grid`` whose last node disconnects after ``calls_with_all`` node listings."""
    nodes = list(grid.get_node_ids.return_value)
    calls = {"n": 0}

    def listing():
        calls["n"] += 1
        return nodes if calls["n"] <= calls_with_all else nodes[:-1]

    grid.get_node_ids.side_effect = listing
    return grid


def test_flowers_node_sampling_gives_up_after_node_wait_timeout(caplog, monkeypatch):
    """Flower's own ``sample_nodes`` (what FedAvg's configure_train/evaluate call) polls
    the grid forever; through the run's grid it ends after the timeout, naming who is
    missing, with progress lines while it waits."""
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    monkeypatch.setattr(server_grid, "WAIT_LOG_EVERY", 0.5)
    cfg = RunConfig.from_flower({"min-train-nodes": 3, "min-available-nodes": 3})
    grid = PartitionOrderedGrid(
        shrinking(federation(3), calls_with_all=1),
        {100: 0, 101: 1, 102: 2},
        needs=nodes_needed(cfg),
        wait_timeout=3.0,
    )
    assert sorted(sample_nodes(grid, 3, 3)[0]) == [100, 101, 102]  # all there: no wait
    grid.send_and_receive([])  # a round went out
    started = time.monotonic()
    with (
        caplog.at_level("WARNING", logger="rcsr_flower.server.grid"),
        pytest.raises(NodeWaitTimeout) as exc,
    ):
        sample_nodes(grid, 3, 3)  # node 102 is gone
    assert 3.0 <= time.monotonic() - started < 30
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith("waited 3 s (node-wait-timeout) for nodes ")
    assert str(exc.value).endswith(
        "2 connected, 3 needed (min-available-nodes 3, min-train-nodes 3); "
        "partitions not connected: 2"
    )
    waiting = [r.getMessage() for r in caplog.records if r.getMessage().startswith("waiting")]
    assert 2 <= len(waiting) <= 8, waiting  # a line per 0.5 s here, not one per poll
    assert "2 connected, 3 needed" in waiting[0] and "partitions not connected: 2" in waiting[0]


def test_a_node_that_comes_back_in_time_ends_the_wait(monkeypatch):
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    cfg = RunConfig.from_flower({})
    base = federation(2)
    listings = iter([[100], [100], [100], [100, 101]])
    base.get_node_ids.side_effect = lambda: next(listings)
    grid = PartitionOrderedGrid(base, {100: 0, 101: 1}, needs=nodes_needed(cfg), wait_timeout=60)
    assert sorted(sample_nodes(grid, 2, 2)[0]) == [100, 101]


def test_the_first_wait_ends_after_node_wait_timeout_naming_missing_partitions(monkeypatch):
    monkeypatch.setattr(server_grid, "WAIT_LOG_EVERY", 0.5)
    grid = federation(3)
    grid.get_node_ids.return_value = [100, 102]  # partition 1's node never connects
    cfg = RunConfig.from_flower({"min-available-nodes": 3, "node-wait-timeout": 2.0})
    with pytest.raises(NodeWaitTimeout) as exc:
        wait_for_federation(grid, cfg)
    assert str(exc.value).endswith(
        "to start the run: 2 connected, 3 needed (min-available-nodes 3); "
        "partitions not connected: 1"
    )


def test_personal_adapters_on_unimodal_clients_with_anchoring_are_warned_about():
    """The combination whose personal adapters collapse (docs/algorithm.md, Measured 6)
    is named with its partitions; the combinations that do not collapse say nothing."""
    from rcsr_flower.modality import Modality

    nodes = [
        {"partition-id": i, "modality": Modality(m).code}
        for i, m in enumerate(["paired", "image-only", "paired", "text-only"])
    ]
    cfg = RunConfig(personal_adapters=True, personal_unimodal=True, anchoring=True)
    warning = server.personal_collapse_warning(cfg, nodes)
    assert warning is not None and "partitions [1, 3]" in warning
    assert "personal-unimodal=false" in warning
    paired = [dict(n, modality=Modality.PAIRED.code) for n in nodes]
    for quiet_cfg, quiet_nodes in [
        (cfg, paired),
        (cfg.replace(anchoring=False), nodes),
        (RunConfig(personal_adapters=False), nodes),
        (RunConfig(personal_adapters=True, anchoring=True), nodes),  # unimodal: none
        (RunConfig(strategy="fedper"), nodes),  # personal adapters, no anchoring
    ]:
        assert server.personal_collapse_warning(quiet_cfg, quiet_nodes) is None
