"""A thousand clients: the settings that size a large federation fail early and say how
to fix them, and a round of 1,000 simulated clients costs what its participants do."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import pytest

from rcsr_flower.config import ConfigError, RunConfig
from rcsr_flower.federation import check_population

ROOT = Path(__file__).resolve().parents[1]


def test_too_few_items_for_the_clients_fail_naming_the_fix():
    """The default 750 items cannot give 1,000 clients anything to train on: the error
    says how many each needs and which settings give them that."""
    cfg = RunConfig()
    check_population(cfg, 750, 6000, 10)  # the default run: 75 items each
    check_population(cfg, 3000, 6000, 1000)  # 3 each: 2 to train on, 1 held out
    with pytest.raises(ConfigError) as exc:
        check_population(cfg, 750, 6000, 1000)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("train-max-items = 750 gives 1000 clients 0.75 training items")
    assert "set train-max-items >= 3000 (0 = all 6000 of the split)" in message
    assert message.endswith("or run at most 250 clients")
    with pytest.raises(ConfigError, match=re.escape("set embedded-train-items >= 9000")):
        check_population(cfg.replace(train_max_items=0), 6000, 6000, 3000)
    # no held-out split: 2 items a client are enough
    check_population(cfg.replace(local_test_fraction=0.0), 2000, 6000, 1000)
    other = RunConfig(dataset="/data/coco.json", train_max_items=0)
    with pytest.raises(ConfigError) as exc:
        check_population(other, 100, 100, 50)
    assert "the training split's 100 items give 50 clients" in str(exc.value)
    assert "embedded-train-items" not in str(exc.value)


def test_local_test_items_beyond_the_unused_items_fail_naming_the_fix(embedded_assets):
    """``local-test-items`` tops up every client from the items past ``train-max-items``:
    for many clients the total is checked before any client is served."""
    from rcsr_flower import federation

    cfg = RunConfig(train_max_items=4000, partition_sizes="equal", seed=7)
    with pytest.raises(ConfigError) as exc:
        federation.load_partition(cfg, None, 1000)  # "auto" = 50 a client
    message = str(exc.value)
    assert re.search(r"local-test-items = 50 tops up 1000 clients' .* with \d+ training", message)
    assert "and the split has 2000 of them: set local-test-items = 0" in message
    assert "a larger embedded-train-items" in message


# ------------------------------------------------------------------ the simulation's inbox
def _state_with_nodes(n: int):
    """Flower's in-memory link state as its simulation builds it: a run and ``n`` nodes,
    and the in-memory grid the ServerApp sends through."""
    import secrets

    from flwr.common.constant import HEARTBEAT_INTERVAL_INF, NOOP_ACCOUNT_NAME, NOOP_FLWR_AID
    from flwr.proto.task_pb2 import Task
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.federation.noop_federation_manager import NOOP_FEDERATION_ID
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(
        FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory()
    )
    state = factory.state()
    run = Run.create_empty(7)
    run.primary_task_id, run.federation_id = 11, NOOP_FEDERATION_ID
    state.run_ids[7] = RunRecord(run=run)
    state.task_store[11] = Task(task_id=11, run_id=7)
    nodes = []
    for _ in range(n):
        node = state.create_node(
            NOOP_FLWR_AID,
            NOOP_ACCOUNT_NAME,
            secrets.token_bytes(32),
            heartbeat_interval=HEARTBEAT_INTERVAL_INF,
        )
        state.acknowledge_node_heartbeat(node_id=node, heartbeat_interval=HEARTBEAT_INTERVAL_INF)
        nodes.append(node)
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    return state, grid, nodes


def test_the_indexed_inbox_delivers_what_flowers_state_does(monkeypatch):
    """``index_inbox``: polled the way Flower's simulation polls (every node, one message
    at a time, pass after pass), the indexed state hands out the same messages in the
    same order, marks them delivered, drops an expired one as Flower does, and a pass
    over 1,000 nodes with every node's message in flight no longer scans every message
    once per node."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from rcsr_flower.routing.inbox import index_inbox

    monkeypatch.setattr(TaskIdentity, "_run_id", 7, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)  # the SuperLink
    monkeypatch.setattr(TaskIdentity, "_task_id", 11, raising=False)

    def deliveries(indexed: bool) -> tuple[list, list]:
        state, grid, nodes = _state_with_nodes(6)
        if indexed:
            assert index_inbox(grid)
        plan = [0, 1, 1, 3, 0, 5, 1]  # node index of each message, in push order
        messages = [
            Message(
                RecordDict({"config": ConfigRecord({"k": k})}),
                dst_node_id=nodes[n],
                message_type=MessageType.QUERY,
                ttl=0.5 if k == 4 else 3600.0,  # the fifth expires before it is asked for
            )
            for k, n in enumerate(plan)
        ]
        grid.push_messages(messages)
        time.sleep(0.6)
        seen = []
        for _ in range(4):  # passes
            seen.append(
                [
                    [int(m.content["config"]["k"]) for m in state.get_message_ins(node, limit=1)]
                    for node in nodes
                ]
            )
        stored = sorted(int(m.content["config"]["k"]) for m in state.message_ins_store.values())
        delivered = sorted(
            int(m.content["config"]["k"])
            for m in state.message_ins_store.values()
            if m.metadata.delivered_at
        )
        return seen, [stored, delivered]

    assert deliveries(True) == deliveries(False)
    seen, (stored, delivered) = deliveries(True)
    assert seen[0] == [[0], [1], [], [3], [], [5]] and seen[1][1] == [2] and stored == delivered
    assert 4 not in stored  # expired: deleted by the check, never delivered

    state, grid, nodes = _state_with_nodes(1000)
    assert index_inbox(grid) and index_inbox(grid)  # once; a second call keeps it
    grid.push_messages(
        Message(
            RecordDict({"config": ConfigRecord({"k": 0})}),
            dst_node_id=n,
            message_type=MessageType.QUERY,
        )
        for n in nodes
    )
    for _ in range(2):  # the second pass: every message delivered, none answered
        started = time.perf_counter()
        for node in nodes:
            state.get_message_ins(node, limit=1)
    assert time.perf_counter() - started < 1.0  # unindexed: 9 s here, loaded

    # between rounds almost every node has nothing stored: a pass over them takes no
    # lock (Flower's takes it, and reads the clock, once per node, 10 passes a second)
    state, grid, nodes = _state_with_nodes(1000)
    assert index_inbox(grid)
    counting = CountingLock(state.lock)
    state.lock = counting
    one = Message(RecordDict(), dst_node_id=nodes[7], message_type=MessageType.QUERY)
    grid.push_messages([one])
    counting.taken = 0
    assert [[m.metadata.message_id for m in state.get_message_ins(n, limit=1)] for n in nodes] == [
        [one.metadata.message_id] if n == nodes[7] else [] for n in nodes
    ]
    assert 0 < counting.taken < 10  # the one node's message only; without: 1,000 and more


class CountingLock:
    """A lock that counts how often it was taken."""

    def __init__(self, lock) -> None:
        self.lock, self.taken = lock, 0

    def __enter__(self):
        self.taken += 1
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


# ------------------------------------------------------------------ 1,000 clients, one round
THOUSAND = 1000
PARTICIPANTS = 10
# small items: 3 training items a client (2 to train on, 1 held out), its local test
# split topped up to 2 from the items past them, a small global test split
SMALL_ITEMS = {
    "num-server-rounds": 1,
    "train-max-items": 3 * THOUSAND,
    "local-test-items": "2",
    "eval-max-images": 100,
    "fraction-train": PARTICIPANTS / THOUSAND,
    "fraction-evaluate": PARTICIPANTS / THOUSAND,
}


@pytest.mark.slow
def test_a_round_of_a_thousand_clients_costs_its_participants(tmp_path, embedded_assets):
    """1,000 simulated SuperNodes through the launcher (real Flower simulation, real
    messages), RCSR for one round: every client holds training pairs, the bootstrap asks
    every node once, and then the round trains and evaluates the 10 sampled clients
    only; the server's per-client state is the population's (minimax over 1,000)."""
    from rcsr_flower.data.partition import Partition
    from rcsr_flower.runtime.launch import SimulationLauncher

    cache = tmp_path / "cache"  # this run's partition and client data, the assets shared
    cache.mkdir()
    (cache / embedded_assets.root.name).symlink_to(embedded_assets.root)
    launcher = SimulationLauncher(
        app_dir=ROOT,
        flwr_home=tmp_path / "flwr",
        num_supernodes=THOUSAND,
        cpus_per_client=1,
        run_config={"cache-dir": str(cache), **SMALL_ITEMS},
        timeout=1800,  # an upper bound for a loaded machine
    )
    started = time.perf_counter()
    try:
        launcher.start()
        result = launcher.run("thousand", tmp_path / "outputs")
    finally:
        launcher.stop()
    assert result["status"] == "completed", result.get("error")
    out = tmp_path / "outputs" / "thousand"
    partition = Partition.from_json(out / "partition.json")
    assert partition.num_partitions == THOUSAND
    assert min(len(c.train) for c in partition.clients) >= 1
    assert {len(c.test) for c in partition.clients} == {2}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    trained = rows[1]["weights"]  # the router's and minimax weights of who replied
    assert len(trained) == PARTICIPANTS and not rows[1]["dropped"]
    assert {int(c) for c in trained} <= set(range(THOUSAND))
    for row in rows:  # round 0 (zero-shot) and round 1: 10 clients evaluated, not 1,000
        assert row["personalized"]["clients"] == PARTICIPANTS
    print(f"1,000 clients, one round: {time.perf_counter() - started:.0f} s")


def test_the_scale_comparison_takes_each_populations_median_run():
    """``benchmarks/scale.py --repeat``: each population's figure is its median run's,
    the ratio that of the medians, and every run's seconds, peak and load stay beside
    them; one run a population is compared as it is."""
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "benchmarks" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)

    def run(clients: int, seconds: float, peak: float) -> dict:
        return {
            "clients": clients,
            "seconds_per_round": seconds,
            "round_seconds": [seconds],
            "phases": {"train_wait": seconds / 2},
            "phases_by_round": [{"train_wait": seconds / 2}],
            "peak_pss_gb": peak,
            "peak_by_process_gb": {"ServerApp": peak / 3},
            "partition_build_s": clients / 1000,
            "load_avg_1m": {"before": 1.0, "after": 2.0},
        }

    runs = [run(100, 6.0, 2.2), run(1000, 7.0, 2.3), run(100, 5.0, 2.1)]
    runs += [run(1000, 9.0, 2.45), run(100, 5.5, 2.2), run(1000, 6.5, 2.6)]
    line = scale.comparison(runs)
    assert line["by_population"]["100"]["seconds_per_round"] == 5.5
    assert line["by_population"]["1000"]["seconds_per_round"] == 7.0
    assert line["seconds_per_round_ratio"] == round(7.0 / 5.5, 3) and not line["round_goal_met"]
    assert line["peak_pss_gb"] == [2.2, 2.3] and line["memory_goal_met"]  # the median runs'
    assert line["repeat"] == 3 and [r["peak_pss_gb"] for r in line["runs"]["1000"]] == [
        2.3,
        2.45,
        2.6,
    ]
    single = scale.comparison([run(100, 5.0, 2.0), run(1000, 5.5, 2.1)])
    assert single["seconds_per_round_ratio"] == 1.1 and single["round_goal_met"]
    assert "repeat" not in single
