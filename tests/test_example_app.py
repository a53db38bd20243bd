"""The second app, ``examples/label-routing``, through the real ``flwr run`` path.

``python -m rcsr_flower.runtime.launch --app-dir examples/label-routing`` (its ``main``) with 4
SuperNodes: a private SuperLink, Flower's simulation, the example's own ServerApp and
ClientApp importing the installed ``rcsr_flower``. What docs/extending.md promises a new
task must hold here: metrics rows with routed weights, an evaluation summary,
checkpoints, ``resume-from`` and an honest exit code.

The resume test continues from a copy of the uninterrupted run's checkpoint after round
k (taken while that run went on: exactly what a kill after round k leaves on disk; the
example's clients keep no state) and must end bit-identical to it. A real SIGKILL of the
retrieval app's ServerApp is tested in test_faults_resume.py; killing one here would
cost a third launch.
"""

import hashlib
import json
import tempfile
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rcsr_flower.runtime.launch import free_port, main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "label-routing"
ROUNDS = 4
pytestmark = pytest.mark.slow


def launch(tmp: Path, name: str, *config: str) -> int:
    return main(
        [
            "--app-dir",
            str(EXAMPLE),
            "--flwr-home",
            str(tmp / f"flwr-{name}"),
            "--num-supernodes",
            "4",
            "--output-dir",
            str(tmp / "outputs"),
            "--run-name",
            name,
            "--timeout",
            "600",
            *[arg for c in config for arg in ("-c", c)],
        ]
    )


def snapshot_checkpoint(run: Path, dest: Path, stop: threading.Event) -> dict:
    """Copy the first checkpoint of a round in ``1..ROUNDS-1`` that ``run`` commits into
    ``dest/checkpoint`` (its tensor file verified against ``latest.json``'s SHA-256)."""
    taken: dict = {}
    while not stop.is_set() and not taken:
        time.sleep(0.02)
        try:
            latest = json.loads((run / "checkpoint" / "latest.json").read_text())
            if not 1 <= latest["round"] < ROUNDS:
                continue
            tensors = (run / "checkpoint" / latest["tensors"]).read_bytes()
        except (FileNotFoundError, json.JSONDecodeError):
            continue  # not written yet, or replaced by the next round's: try again
        if hashlib.sha256(tensors).hexdigest() != latest["sha256"]:
            continue
        (dest / "checkpoint").mkdir(parents=True)
        (dest / "checkpoint" / latest["tensors"]).write_bytes(tensors)
        (dest / "checkpoint" / "latest.json").write_text(json.dumps(latest))
        taken["round"] = latest["round"]
    return taken


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("label-routing")
    stop, taken = threading.Event(), {}
    watcher = threading.Thread(
        target=lambda: taken.update(
            snapshot_checkpoint(tmp / "outputs" / "A", tmp / "snapshot", stop)
        )
    )
    watcher.start()
    try:
        code = launch(tmp, "A", f"num-server-rounds={ROUNDS}")
    finally:
        stop.set()
        watcher.join()
    return {"tmp": tmp, "code": code, "run": tmp / "outputs" / "A", "snapshot": taken}


def test_the_example_app_runs_routed_with_metrics_evaluation_and_checkpoints(uninterrupted):
    run = uninterrupted["run"]
    assert uninterrupted["code"] == 0
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "completed" and result["rounds"] == ROUNDS
    table = rows(run)
    assert [r["round"] for r in table] == list(range(ROUNDS + 1))
    assert table[0]["evaluation"]["clients"] == 4  # round 0: before any training
    for row in table[1:]:
        assert row["skipped"] is False and not row["dropped"]
        weights = row["weights"]
        assert sorted(weights) == ["0", "1", "2", "3"]
        fused = [weights[k]["fused"] for k in sorted(weights)]
        assert abs(sum(fused) - 1) < 1e-5
        # client p holds 48 * (1 + p) + 1 examples: the routed weights are not those
        counts = [48 * (1 + p) + 1 for p in range(4)]
        by_count = [n / sum(counts) for n in counts]
        assert max(abs(f - c) for f, c in zip(fused, by_count, strict=True)) > 0.05
        assert row["router_loss"] is not None and row["weight_entropy"] > 0
        assert row["evaluation"]["clients"] == 4
        assert 0 <= row["evaluation"]["mean"]["accuracy"] <= 1
        assert set(row["central"]) == {"accuracy", "loss"}
    # the routed model learns: central accuracy on the balanced test set rises
    assert table[-1]["central"]["accuracy"] > table[0]["central"]["accuracy"] + 0.3
    latest = json.loads((run / "checkpoint" / "latest.json").read_text())
    assert latest["round"] == ROUNDS
    for name in ("arrays", "task-state", "router"):
        assert (run / f"{name}.safetensors").is_file(), name
    assert set(load_file(str(run / "task-state.safetensors"))) == {"prior"}


def test_the_example_resumed_from_a_checkpoint_ends_like_the_uninterrupted_run(
    uninterrupted, monkeypatch
):
    """Also on a machine where a dead Ray cluster's address was left in Ray's temp dir
    (what `ray start` writes, and a killed cluster leaves): Flower's ``ray.init()`` would
    join it and wait until the launcher's timeout; the launcher starts the run's own."""
    assert uninterrupted["code"] == 0
    k = uninterrupted["snapshot"].get("round")
    assert k is not None, "no checkpoint of rounds 1..3 was seen while the run went on"
    tmp, a = uninterrupted["tmp"], uninterrupted["run"]
    snapshot = tmp / "snapshot"
    with tempfile.TemporaryDirectory(prefix="ray-", dir="/tmp") as ray_tmp:  # short: sockets
        (Path(ray_tmp) / "ray").mkdir()
        (Path(ray_tmp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        code = launch(tmp, "B", f"num-server-rounds={ROUNDS}", f'resume-from="{snapshot}"')
    assert code == 0
    b = tmp / "outputs" / "B"
    assert json.loads((b / "result.json").read_text())["resumed_after_round"] == k
    for name in ("arrays", "task-state", "router"):
        ta, tb = (load_file(str(run / f"{name}.safetensors")) for run in (a, b))
        assert set(ta) == set(tb)
        for key in ta:  # bit for bit
            assert ta[key].numpy().tobytes() == tb[key].numpy().tobytes(), (name, key)
    assert (a / "minimax.json").read_text() == (b / "minimax.json").read_text()
    a_rows, b_rows = rows(a), rows(b)
    assert [r["round"] for r in b_rows] == list(range(ROUNDS + 1))
    for ra, rb in zip(a_rows, b_rows, strict=True):
        assert set(ra.pop("seconds")) == set(rb.pop("seconds"))  # wall clock: phases only
        assert ra == rb, ra["round"]


def test_a_crashing_serverapp_and_an_unknown_key_exit_non_zero(tmp_path, capsys):
    # refused before anything starts, naming the key
    assert launch(tmp_path, "unknown", "no-such-key=1") == 1
    assert "unknown run-config key 'no-such-key' for app 'label-routing'" in capsys.readouterr().err
    assert not (tmp_path / "flwr-unknown").exists()
    # the ServerApp raises on a value it refuses: plain `flwr run` would exit 0
    assert launch(tmp_path, "crash", "num-classes=1") == 1
    err = capsys.readouterr().err
    assert "RUN FAILED" in err and "wrote no result.json" in err
