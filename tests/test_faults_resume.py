"""Faults and resume in real ``flwr run`` simulations (private SuperLink + Ray, 4 nodes).

One fault plan (run-config ``fault-injection``, test-only: rcsr_flower/faults.py), fixed
seed, 4 rounds, every client sampled every round:

- round 1: client 0 raises, client 1 replies NaN: both dropped, the round goes on;
- round 2: every client raises: the round is skipped, the global state unchanged;
- round 3: client 2 replies an update far above ``max-update-norm``: dropped.

Run A goes through uninterrupted. Run B has the same plan plus ``server-kill@3``: the
ServerApp process SIGKILLs itself as soon as round 3's train replies have arrived — a
real kill (no ``finally``, no ``atexit``; ``result.json`` stays "running"), at the worst
moment: the clients have trained round 3 and written their round-3 state, the last
checkpoint is round 2. B is then resumed with ``resume-from`` in a new simulation (new
Flower run, new SuperNodes, new Ray workers, empty ``context.state``) and must end with
A's adapters, prototype bank, router and minimax state bit for bit, and A's metrics.

The runs use 900 images of the embedded corpus (a Karpathy JSON written here) and the
embedded tiny CLIP: each launch is mostly start-up (Ray, model and data on every worker).
Refused resumes (finished run, other config) are tested on real checkpoint files in
test_checkpoint.py, a too-small federation in test_server.py and test_integration.py.
"""

import json
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rcsr_flower.runtime.launch import SimulationLauncher

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FAULTS = "raise:0@1,nan:1@1,raise:*@2,huge:2@3"


def small_corpus(embedded_assets, path: Path) -> Path:
    corpus = json.loads(Path(embedded_assets.corpus_json).read_text())
    split = lambda name, n: [i for i in corpus["images"] if i["split"] == name][:n]  # noqa: E731
    path.write_text(json.dumps({**corpus, "images": split("train", 800) + split("test", 100)}))
    return path


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie (killed, not yet reaped by its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def run_and_kill(launcher: SimulationLauncher, name: str, out: Path, timeout: float = 1800):
    """Run until the ServerApp's process is gone, then stop the SuperLink (which would
    otherwise wait about a minute for the dead run's heartbeat)."""
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(launcher.run(name, out)))
    thread.start()
    deadline, seen = time.monotonic() + timeout, None
    while thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.5)
        try:
            pid = json.loads((out / name / "result.json").read_text()).get("pid")
        except (FileNotFoundError, json.JSONDecodeError):
            continue
        if pid and seen is None:
            seen = pid
        if seen and not alive(seen):
            break
    launcher.stop()
    thread.join(timeout=120)
    return seen, done


@pytest.fixture(scope="module")
def runs(tmp_path_factory, embedded_assets):
    tmp = tmp_path_factory.mktemp("faults")
    out = tmp / "outputs"
    common = {
        "model-name": str(embedded_assets.backbone_dir),
        "dataset": str(small_corpus(embedded_assets, tmp / "corpus.json")),
        "data-dir": str(Path(embedded_assets.corpus_json).parent),
        "cache-dir": str(tmp / "cache"),
        "eval-max-images": 100,
        "partition-clusters": 8,
        "batch-size": 32,
        "num-server-rounds": 4,
        "fraction-train": 1.0,
        "min-train-nodes": 2,
        "personal-adapters": True,
        "personal-unimodal": True,  # every node has personal state to resume
        "max-update-norm": 1000.0,
    }

    def launcher(name: str, **extra) -> SimulationLauncher:
        return SimulationLauncher(
            app_dir=ROOT,
            flwr_home=tmp / name,
            num_supernodes=4,
            cpus_per_client=1,
            run_config={**common, **extra},
            timeout=1800,  # an upper bound for a loaded machine: a launch here takes ~1 min
        )

    found: dict = {"out": out}
    first = launcher("flwr-1", **{"fault-injection": FAULTS})
    try:
        first.start()
        found["A"] = first.run("A", out)
        first.run_config["fault-injection"] = FAULTS + ",server-kill@3"
        found["killed_pid"], found["B-killed"] = run_and_kill(first, "B", out)
    finally:
        first.stop()
    found["after_kill"] = {
        "result": json.loads((out / "B" / "result.json").read_text()),
        "checkpoint": json.loads((out / "B" / "checkpoint" / "latest.json").read_text())["round"],
        "rows": [json.loads(line)["round"] for line in (out / "B" / "metrics.jsonl").open()],
        "snapshots": sorted(
            p.name for p in (tmp / "cache" / "client-state").rglob("*.safetensors")
        ),
    }

    second = launcher("flwr-2", **{"fault-injection": FAULTS, "resume-from": str(out / "B")})
    try:
        second.start()
        found["B"] = second.run("B", out)
    finally:
        second.stop()
    found["client_state_left"] = sorted(
        str(p.relative_to(tmp)) for p in (tmp / "cache" / "client-state").rglob("*")
    )
    return found


def rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]


def test_faulty_clients_are_dropped_and_a_round_without_replies_is_skipped(runs):
    assert runs["A"]["status"] == "completed", runs["A"].get("error")
    by_round = {r["round"]: r for r in rows(runs["out"], "A")}
    assert sorted(by_round) == [0, 1, 2, 3, 4]
    one, two, three, four = (by_round[r] for r in (1, 2, 3, 4))
    assert set(one["weights"]) == {"2", "3"} and one["skipped"] is False
    reasons = sorted(one["dropped"].values())
    assert reasons[0].startswith("'arrays.") and reasons[0].endswith("has non-finite values")
    assert reasons[1].startswith("error reply: ") and "client 0 raises in round 1" in reasons[1]
    assert "\n" not in reasons[1]  # one log line, not the client's traceback
    # every client failed: skipped, recorded, and the global model did not move
    assert two["skipped"] is True and "weights" not in two and len(two["dropped"]) == 4
    assert two["global"] == one["global"]
    assert set(three["weights"]) == {"0", "1", "3"}
    (norm,) = three["dropped"].values()
    assert norm.startswith("update norm ") and norm.endswith("exceeds max-update-norm 1000")
    assert set(four["weights"]) == {"0", "1", "2", "3"} and not four["dropped"]


def test_a_killed_server_leaves_its_last_complete_round(runs):
    after = runs["after_kill"]
    assert runs["killed_pid"] and not alive(runs["killed_pid"])
    assert after["result"]["status"] == "running"  # killed: nothing after the kill ran
    assert after["checkpoint"] == 2 and after["rows"] == [0, 1, 2]
    # the clients trained round 3 before the kill and kept their state of rounds 1 and 3
    assert "round-00003.safetensors" in after["snapshots"]


def test_the_resumed_run_ends_bit_identical_to_the_uninterrupted_one(runs):
    out = runs["out"]
    assert runs["B"]["status"] == "completed", runs["B"].get("error")
    assert runs["B"]["resumed_after_round"] == 2
    for name in ("adapters", "prototypes", "router"):
        a = load_file(str(out / "A" / f"{name}.safetensors"))
        b = load_file(str(out / "B" / f"{name}.safetensors"))
        assert set(a) == set(b)
        for key in a:  # bit for bit: same dtype, same bytes
            assert (
                a[key].dtype == b[key].dtype
                and a[key].numpy().tobytes() == b[key].numpy().tobytes()
            ), (name, key)
    for name in ("minimax.json",):
        assert (out / "A" / name).read_text() == (out / "B" / name).read_text()
    # metrics.jsonl continued in place: every round once, same numbers; "dropped" is keyed
    # by the launch's random node ids, so compare its reasons
    a_rows, b_rows = rows(out, "A"), rows(out, "B")
    assert [r["round"] for r in b_rows] == [0, 1, 2, 3, 4]
    for a, b in zip(a_rows, b_rows, strict=True):
        assert sorted(a.pop("dropped", {}).values()) == sorted(b.pop("dropped", {}).values())
        assert set(a.pop("seconds")) == set(b.pop("seconds"))  # wall clock: phases only
        assert a == b, a["round"]
    # each finished run told its nodes to drop their resume snapshots
    assert not [p for p in runs["client_state_left"] if p.endswith(".safetensors")]
