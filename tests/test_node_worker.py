"""The node's warm worker (rcsr_flower.client.node_worker): a real worker process started the
way a deployed ClientApp starts it, real Flower records and Context, the embedded
backbone and corpus; the same replies and node state as the ClientApp's own process."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from rcsr_flower.client.handlers import PERSONAL_KEY, PREVIOUS_DELTA_KEY, setup
from rcsr_flower.client.node_worker import (
    NodeWorkerError,
    Worker,
    WorkerRaised,
    WorkerTraceback,
    process_start,
    reply,
    worker_home,
)
from rcsr_flower.config import WORKER_IDLE_KEY as IDLE_KEY
from rcsr_flower.config import ConfigError
from rcsr_flower.retrieval.prototypes import PrototypeBank

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"node worker (\d+) listening")


@pytest.fixture
def home(monkeypatch):
    """A private worker home with a short path (a Unix socket's path has ~107 bytes);
    every worker started in it is stopped after the test."""
    base = Path(tempfile.mkdtemp(prefix="nw"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    yield base
    for log in base.glob("*/*.log"):
        for pid in worker_pids(log):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)


def worker_pids(log: Path) -> list[int]:
    return [int(p) for p in LISTENING.findall(log.read_text(errors="replace"))]


def alive(pid: int) -> bool:
    return process_start(pid) is not None and "Z" not in _state(pid)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def wait_until(predicate, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def run_config(**overrides) -> dict:
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    return {**raw, "partitioning": "iid", "prototype-samples": 32, **overrides}


def context(idle: float, run: dict, state: RecordDict | None = None) -> Context:
    node = {"partition-id": 2, "num-partitions": 4}
    if idle:
        node[IDLE_KEY] = idle
    return Context(
        run_id=7, node_id=11, node_config=node, state=state or RecordDict(), run_config=run
    )


def run_node(idle: float, run: dict) -> list[tuple[str, dict, dict]]:
    """What the ServerApp sends one node (a bootstrap query, a size query, two train
    rounds with prototypes, an evaluation) through ``reply``, one node ``Context``; each
    reply's content and the node state after it, flattened."""
    ctx = context(idle, run)
    node = setup(run, {"partition-id": 2, "num-partitions": 4})
    torch.manual_seed(0)
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    out = []

    def send(kind: str, content: RecordDict) -> RecordDict:
        got = reply(kind, content, ctx)
        out.append((kind, flat(got), flat(ctx.state)))
        return got

    bootstrap = ConfigRecord({"kind": "bootstrap", "prototype-slots": 4})
    groups = send("query", RecordDict({"config": bootstrap}))["groups"].to_torch_state_dict()
    send("query", RecordDict({"config": ConfigRecord({"kind": "size"})}))
    bank = PrototypeBank.bootstrap(
        [groups["image_means"]], [groups["text_means"]], [groups["counts"]], 4
    )
    for server_round in (1, 2):
        config = ConfigRecord({"server-round": server_round, "lr": 1e-3, "anchoring": True})
        arrays = {"arrays": ArrayRecord(theta), "prototypes": ArrayRecord(bank.to_tensors())}
        send("train", RecordDict({**arrays, "config": config}))
    send("evaluate", RecordDict({"arrays": ArrayRecord(theta)}))
    return out


def flat(records: RecordDict) -> dict:
    out = {}
    for name, record in records.items():
        if isinstance(record, ArrayRecord):
            for key, value in record.to_torch_state_dict().items():
                out[f"{name}/{key}"] = value
        else:
            out.update({f"{name}/{k}": v for k, v in record.items()})
    return out


def same(fa: dict, fb: dict) -> None:
    assert sorted(fa) == sorted(fb)
    for key, value in fa.items():
        if key.endswith("-seconds"):  # time, not results
            continue
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fb[key]), key
        else:
            assert value == fb[key], key


def test_the_worker_replies_what_the_clientapp_computes_itself(home, embedded_assets, caplog):
    run = run_config(**{"personal-adapters": True, "personal-unimodal": True})
    caplog.set_level("INFO")
    itself = run_node(0, run)
    through_worker = run_node(600, run)
    assert [k for k, *_ in through_worker] == ["query", "query", "train", "train", "evaluate"]
    for (_, content, state), (_, w_content, w_state) in zip(itself, through_worker, strict=True):
        same(content, w_content)
        same(state, w_state)
    state = through_worker[-1][2]
    assert any(k.startswith(f"{PERSONAL_KEY}/") for k in state)
    assert any(k.startswith(f"{PREVIOUS_DELTA_KEY}/") for k in state)
    assert "metrics/train-seconds" in through_worker[2][1]
    # one worker served all five messages, and its log lines reached this process
    logs = list(home.glob("*/*.log"))
    assert len(logs) == 1 and len(worker_pids(logs[0])) == 1
    text = caplog.text
    assert text.count("started node worker") == 1
    assert "ClientApp start-up (partition 2)" in text


def test_a_handler_error_comes_back_named_and_the_worker_goes_on(home, embedded_assets):
    run = run_config(**{"fault-injection": "raise:2@1"})
    ctx = context(600, run)
    size = RecordDict({"config": ConfigRecord({"kind": "size"})})
    assert reply("query", size, ctx)["metrics"]["num-partitions"] == 4
    node = setup(run, {"partition-id": 2, "num-partitions": 4})
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    train = RecordDict(
        {"arrays": ArrayRecord(theta), "config": ConfigRecord({"server-round": 1, "lr": 1e-3})}
    )
    with pytest.raises(WorkerRaised, match=r"^InjectedFault: .*client 2 raises in round 1") as info:
        reply("train", train, ctx)
    assert isinstance(info.value.__cause__, WorkerTraceback)
    assert "before_training" in str(info.value.__cause__)
    assert reply("query", size, ctx)["metrics"]["partition-id"] == 2
    (log,) = home.glob("*/*.log")
    assert len(worker_pids(log)) == 1  # the same worker throughout


def test_a_listener_that_ends_before_accepting_is_a_stale_socket(home):
    """A connection that got into a listener's backlog and was reset before the worker
    accepted it (a killed worker's socket, seen under load) is not a worker that died on
    the message: no greeting came, so the ClientApp starts a new worker instead."""
    worker = Worker("b" * 24, worker_home(), ROOT, os.getpid(), process_start(os.getpid()), 600)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(worker.socket_path))
    listener.listen(4)
    closer = threading.Timer(0.5, listener.close)
    closer.start()
    started = time.monotonic()
    assert worker._try_connect() is None  # connected into the backlog, then reset
    assert 0.4 < time.monotonic() - started < 30
    closer.join()


def test_a_killed_worker_fails_its_message_and_the_next_one_starts_a_new_worker(
    home, embedded_assets
):
    run = run_config(**{"fault-injection": "hang:2@1", "round-timeout": 20.0})  # a 30 s hang
    ctx = context(600, run)
    size = RecordDict({"config": ConfigRecord({"kind": "size"})})
    reply("query", size, ctx)
    (log,) = home.glob("*/*.log")
    (first,) = worker_pids(log)

    node = setup(run, {"partition-id": 2, "num-partitions": 4})
    theta = {k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}
    train = RecordDict(
        {"arrays": ArrayRecord(theta), "config": ConfigRecord({"server-round": 1, "lr": 1e-3})}
    )
    errors: list[BaseException] = []

    def hang() -> None:
        try:
            reply("train", train, context(600, run))
        except BaseException as exc:  # the test looks at it
            errors.append(exc)

    thread = threading.Thread(target=hang)
    thread.start()
    assert wait_until(lambda: "hangs in round 1" in log.read_text())
    os.kill(first, signal.SIGKILL)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], NodeWorkerError), errors
    assert "ended while working on a train message" in str(errors[0])

    assert reply("query", size, ctx)["metrics"]["partition-id"] == 2  # a stale socket
    (second,) = worker_pids(log)  # a new worker's log replaced the killed one's
    assert second != first and alive(second)


def test_a_clientapp_that_goes_away_mid_message_takes_the_work_with_it(home, embedded_assets):
    """As Flower's parent monitor ends a ClientApp whose SuperNode died, the worker ends
    work whose ClientApp is gone: no node state is written for a message nobody gets."""
    run = run_config(**{"fault-injection": "hang:2@1", "round-timeout": 20.0})
    code = f"""
import sys; sys.path.insert(0, {str(ROOT / "tests")!r})
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from test_node_worker import context
from rcsr_flower.client.handlers import setup
from rcsr_flower.client.node_worker import reply
run = {run!r}
node = setup(run, {{"partition-id": 2, "num-partitions": 4}})
theta = {{k: v.detach().cpu() for k, v in node.adapters().state_dict().items()}}
reply("train", RecordDict({{"arrays": ArrayRecord(theta),
      "config": ConfigRecord({{"server-round": 1, "lr": 1e-3}})}}), context(600, run))
"""
    clientapp = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    try:
        assert wait_until(lambda: any(home.glob("*/*.log")), timeout=120)
        (log,) = home.glob("*/*.log")
        assert wait_until(lambda: "hangs in round 1" in log.read_text(), timeout=120)
        (worker,) = worker_pids(log)
    finally:
        clientapp.kill()
        clientapp.wait()
    assert wait_until(lambda: not alive(worker), timeout=10)
    assert "the ClientApp it was working for is gone" in log.read_text()


def test_a_worker_leaves_when_idle_and_when_its_supernode_is_gone(home, embedded_assets):
    """A worker whose ``parent`` (a SuperNode's SuperExec) ends exits within a second or
    two, as does one that got no message for ``worker-idle-s``; a clean exit removes
    its socket and log."""
    run = run_config()
    size = RecordDict({"config": ConfigRecord({"kind": "size"})})

    supernode = subprocess.Popen(["sleep", "600"])
    worker = Worker("a" * 24, worker_home(), ROOT, supernode.pid, process_start(supernode.pid), 600)
    worker.call("query", size, context(600, run))
    (pid,) = worker_pids(worker.log_path)
    supernode.kill()
    supernode.wait()
    assert wait_until(lambda: not alive(pid), timeout=15)
    assert not worker.socket_path.exists() and not worker.log_path.exists()

    idle = Worker("b" * 24, worker_home(), ROOT, os.getpid(), process_start(os.getpid()), 1.0)
    idle.call("query", size, context(1.0, run))
    (pid,) = worker_pids(idle.log_path)
    assert wait_until(lambda: not alive(pid), timeout=15)
    assert not idle.socket_path.exists() and not idle.log_path.exists()


def test_bad_settings_get_errors_that_say_what_to_do(home):
    size = RecordDict({"config": ConfigRecord({"kind": "size"})})
    for bad in (-1, "90", "soon", float("nan")):
        # the ClientApp refuses it before any worker is started
        with pytest.raises(ConfigError, match=f"'{IDLE_KEY}' = .*[:;] set it to how long"):
            reply("query", size, context(bad, {}))
    assert not any(home.iterdir())
    open_home = home / f"rcsr-flower-{os.getuid()}"
    open_home.mkdir(mode=0o755)
    open_home.chmod(0o755)
    with pytest.raises(NodeWorkerError, match="closed to others"):
        worker_home()


def test_the_clientapp_module_does_not_import_torch(fresh_python):
    """A deployed ClientApp with a worker never needs torch itself."""
    code = "import sys; import client_app; print('torch' in sys.modules)"
    assert fresh_python(code) == ["False"]


def test_worker_keys_differ_per_supernode_and_node_config():
    a = Worker.for_node({"partition-id": 0}, 600)
    assert a.key == Worker.for_node({"partition-id": 0}, 600).key
    assert a.key != Worker.for_node({"partition-id": 2}, 600).key
    assert len(str(a.socket_path)) < 100
