"""ServerApp set-up on real Flower ``Message``s through a fake grid (no simulation)."""

from unittest.mock import Mock

import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from test_strategy import task_identity  # noqa: F401

from rcsr_flower.client import light_query
from rcsr_flower.config import ConfigError, RunConfig
from rcsr_flower.server import wait_for_federation


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
