"""``RoutedRun`` on real files, without Flower: result.json, config.json, resume checks.

The rounds themselves (``RoutedRun.start`` through ``flwr run``) are tested with the
example app in test_example_app.py and with the retrieval app in test_faults_resume.py
and test_integration.py.
"""

import json
import os

import pytest
from flwr.app import ArrayRecord
from test_strategy import rcsr, task_identity, theta  # noqa: F401

from rcsr_flower.config import ConfigError
from rcsr_flower.routing.checkpoint import save_checkpoint
from rcsr_flower.routing.runner import RoutedRun


def config(tmp_path, **extra) -> dict:
    return {"num-server-rounds": 4, "output-dir": str(tmp_path), "run-name": "r", **extra}


def result(tmp_path) -> dict:
    return json.loads((tmp_path / "r" / "result.json").read_text())


def test_any_failure_in_the_run_leaves_a_failed_result_json_and_goes_on_to_flower(tmp_path):
    with pytest.raises(ValueError, match="bad value"), RoutedRun(config(tmp_path)) as run:
        assert result(tmp_path) == {"status": "running", "pid": os.getpid()}
        raise ValueError("bad value")
    failed = result(tmp_path)
    assert failed["status"] == "failed" and failed["error"] == "ValueError: bad value"
    assert 'raise ValueError("bad value")' in failed["traceback"]
    assert run.out == tmp_path / "r"


def test_a_run_that_never_started_its_rounds_does_not_count_as_completed(tmp_path):
    with RoutedRun(config(tmp_path)) as run:
        run.open(config(tmp_path))
    assert result(tmp_path)["status"] == "failed"
    assert "without running the strategy" in result(tmp_path)["error"]


def test_open_writes_the_config_and_needs_num_server_rounds(tmp_path):
    cfg = config(tmp_path, lr=0.1)
    with RoutedRun(cfg) as run:
        assert run.open(cfg) is None  # fresh: nothing to resume
        assert json.loads((run.out / "config.json").read_text()) == cfg
        assert len(run.state_key) == 32
        run.final_arrays = ArrayRecord()  # as if the rounds had run
    done = result(tmp_path)
    assert done["status"] == "completed" and done["rounds"] == 4
    assert done["resumed_after_round"] is None
    del cfg["num-server-rounds"]
    with pytest.raises(ConfigError, match="no 'num-server-rounds'"), RoutedRun(cfg) as run:
        run.open(cfg)


def checkpointed(tmp_path, done: int, **cfg) -> dict:
    """A run directory ``tmp/r`` with a checkpoint after round ``done``."""
    strategy = rcsr()
    save_checkpoint(
        tmp_path / "r",
        done,
        ArrayRecord(theta(0)),
        strategy.state_for_checkpoint(),
        [{"round": r} for r in range(done + 1)],
        config=config(tmp_path, **cfg),
        state_key="ab" * 16,
        num_clients=3,
    )
    return config(tmp_path, **cfg)


def test_a_resume_is_refused_for_a_changed_app_key_unless_the_app_allows_it(tmp_path):
    cfg = checkpointed(tmp_path, 2, lr=0.1)
    now = {**cfg, "lr": 0.2, "run-name": "s", "resume-from": str(tmp_path / "r")}
    with pytest.raises(ConfigError) as exc, RoutedRun(now) as run:
        run.open(now)
    assert "'lr' (checkpoint 0.1, now 0.2)" in str(exc.value)
    assert "\n" not in str(exc.value)
    with RoutedRun(now) as run:
        ckpt = run.open(now, may_change={"lr"})
        assert ckpt.round == 2 and run.state_key == "ab" * 16
        assert [r["round"] for r in run.metrics_log.rows] == [0, 1, 2]
        with pytest.raises(ConfigError, match="had 3 clients, this federation has 4"):
            run.check_num_clients(4)
        run.final_arrays = ArrayRecord()
    assert json.loads((tmp_path / "s" / "result.json").read_text())["resumed_after_round"] == 2


def test_a_fresh_run_does_not_overwrite_an_unfinished_one(tmp_path):
    cfg = checkpointed(tmp_path, 2)
    with pytest.raises(ConfigError, match="holds an unfinished run"), RoutedRun(cfg) as run:
        run.open(cfg)


def test_run_routed_takes_eval_every_from_the_run_config(tmp_path):
    """An app's ``eval-every`` spaces its evaluations with no code (round 0 and the last
    always); the central and federated rows of the skipped rounds are absent."""
    from flwr.app import Context, MessageType, MetricRecord, RecordDict
    from test_strategy import evaluate_reply, mock_grid, reply

    from rcsr_flower.routing.runner import run_routed
    from rcsr_flower.routing.strategy import RoutingOptions

    asked = []

    def send_and_receive(messages, timeout=None):
        messages = list(messages)
        kind = messages[0].metadata.message_type
        asked.append((kind, int(messages[0].content["config"]["server-round"])))
        if kind == MessageType.EVALUATE:
            return [evaluate_reply(m.metadata.dst_node_id, {"num-examples": 5}) for m in messages]
        return [reply(m.metadata.dst_node_id, theta(1), 10) for m in messages]

    run_config = config(tmp_path, **{"eval-every": 2, "num-server-rounds": 3})
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    run_routed(
        mock_grid([1, 2], send_and_receive),
        context,
        None,
        ArrayRecord(theta(0)),
        num_clients=2,
        options=RoutingOptions(mode="fedavg"),
        evaluate_fn=lambda rnd, arrays: MetricRecord({"rsum": float(rnd)}),
        min_available_nodes=2,
        min_train_nodes=2,
        min_evaluate_nodes=2,
    )
    assert [r for kind, r in asked if kind == MessageType.EVALUATE] == [0, 2, 3]
    assert [r for kind, r in asked if kind == MessageType.TRAIN] == [1, 2, 3]
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows if "central" in r] == [0, 2, 3]


def fake_http_grid(ready_at: dict[str, float], clock: list[float]):
    """Flower's ``HttpGrid`` (the deployed ServerApp's grid) without a SuperLink:
    replies become pullable at given times of a fake clock."""
    from flwr.superlink.grid.http_grid import HttpGrid

    class FakeHttpGrid(HttpGrid):
        def __init__(self) -> None:  # no connection
            self.ready_at, self.clock, self.pulls = ready_at, clock, 0

        push_messages = _Pullable.push_messages
        pull_messages = _Pullable.pull_messages
        get_node_ids = _Pullable.get_node_ids

    return FakeHttpGrid()


class _Pullable:
    def __init__(self, ready_at: dict[str, float], clock: list[float]) -> None:
        self.ready_at, self.clock, self.pulls = ready_at, clock, 0

    def push_messages(self, messages):
        return [m for m in messages]

    def pull_messages(self, message_ids):
        from types import SimpleNamespace

        self.pulls += 1
        ready = [i for i in message_ids if self.ready_at.get(i, float("inf")) <= self.clock[0]]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in ready]

    def get_node_ids(self):
        return [1, 2]


def test_a_deployed_grid_is_pulled_every_fifth_of_a_second_not_every_three(monkeypatch):
    """Flower's HttpGrid sleeps 3 s between pulls; the ServerApp's grid pulls every 0.2 s
    until every reply is in, or until the timeout with what came, as Flower's loop does.
    The simulation's in-memory grid (0.1 s) is used as it is."""
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    from rcsr_flower.routing import grid as layers
    from rcsr_flower.routing.grid import PromptGrid, prompt_grid

    clock = [0.0]
    slept: list[float] = []

    def sleep(seconds):
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(layers.time, "sleep", sleep)
    monkeypatch.setattr(layers.time, "monotonic", lambda: clock[0])
    raw = fake_http_grid({"a": 0.5, "b": 1.3}, clock)
    grid = prompt_grid(raw)
    assert isinstance(grid, PromptGrid) and prompt_grid(grid) is grid
    assert grid.get_node_ids() == [1, 2]  # everything else is the grid's
    replies = grid.send_and_receive(["a", "b"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert set(slept) == {0.2} and 1.3 <= clock[0] < 1.3 + 0.2 + 1e-9  # not 3 s late
    clock[0], slept[:] = 0.0, []
    replies = grid.send_and_receive(["a", "never"], timeout=2.0)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 2.0 <= clock[0] < 2.0 + 0.2 + 1e-9  # gave up at the timeout with what came
    in_memory = InMemoryGrid.__new__(InMemoryGrid)  # simulation: as it is
    assert prompt_grid(in_memory) is in_memory
    wired = prompt_grid(fake_http_grid({}, clock), wire=lambda g: ("wire", g))
    assert wired._grid[0] == "wire"  # the app's wire format sits under the polling
