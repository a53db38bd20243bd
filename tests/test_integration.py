"""The real app through `flwr run` in a private local simulation (SuperLink + Ray)."""

import json
import socket
from pathlib import Path

import pytest

from rcsr_flower.runtime.launch import SimulationLauncher, main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def launch(tmp_path, embedded_assets, run_name, **run_config):
    launcher = SimulationLauncher(
        app_dir=ROOT,
        flwr_home=tmp_path / "flwr",
        num_supernodes=4,
        cpus_per_client=1,
        run_config={
            "cache-dir": str(embedded_assets.root.parent),
            "eval-max-images": 200,
            "partition-clusters": 8,
            "batch-size": 32,
            **run_config,
        },
        timeout=1800,  # an upper bound for a loaded machine: a run here takes 1-3 min
    )
    try:
        launcher.start()
        result = launcher.run(run_name, tmp_path / "outputs")
    finally:
        launcher.stop()
    assert launcher.process is None and not port_open(launcher.port)
    return result, tmp_path / "outputs" / run_name


def test_rcsr_two_rounds_with_missing_modality_clients(tmp_path, embedded_assets):
    # the first 1,600 items (about 400 a client), as the smoke suite: mechanics, not accuracy;
    # eval-every = 0: evaluations at round 0 and the last round only
    result, out = launch(
        tmp_path,
        embedded_assets,
        "rcsr",
        **{"num-server-rounds": 2, "train-max-items": 1600, "eval-every": 0},
    )
    assert result["status"] == "completed", result.get("error")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    # round 0 is the frozen backbone: zero-shot, centralised and on every client's split
    zero = rows[0]["global"]
    assert set(rows[0]) == {"round", "global", "personalized", "seconds"}
    assert zero["protocol"] == "standard"
    assert 0 < zero["rsum"] < 600
    assert rows[0]["personalized"]["clients"] == 4
    for row in rows[1:]:
        assert row["skipped"] is False
        # where the round's time went, the clients' own compute included
        assert row["seconds"]["round"] >= row["seconds"]["train_wait"] > 0
        assert row["seconds"]["clients"]["train"] > 0
        fused = [w["fused"] for w in row["weights"].values()]
        assert len(fused) == 2 and abs(sum(fused) - 1) < 1e-5
        assert row["router_loss"] is not None and row["weight_entropy"] > 0
    # round 1 trained but evaluated nothing, on the server or on the clients
    assert not {"global", "personalized"} & set(rows[1])
    assert not {"federated_evaluate", "central_evaluate"} & set(rows[1]["seconds"])
    assert set(rows[2]["global"]) >= {"i2t_r1", "t2i_r10", "rsum", "protocol"}
    assert {"paired", "image-only", "text-only"} <= set(rows[2]["personalized"]["by_group"])
    assert rows[2]["personalized"]["clients"] == 4
    partition = json.loads((out / "partition.json").read_text())
    modalities = sorted(c["modality"] for c in partition["clients"])
    assert modalities == ["image-only", "paired", "paired", "text-only"]
    for name in (
        "config.json",
        "adapters.safetensors",
        "prototypes.safetensors",
        "router.safetensors",
        "minimax.json",
        "result.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["num-server-rounds"] == 2


def test_a_silent_client_is_left_behind_after_round_timeout(tmp_path, embedded_assets, capfd):
    """A client that is alive but never answers (``hang``: its node keeps its heartbeat,
    so only ``round-timeout`` ends the wait): the round goes on with the others after the
    timeout, the node is named in the log and in the round's ``dropped``.

    Robust to a loaded machine both ways: the hanging client holds one of the two Ray
    actors, so the other three clients train one after the other on the second. With the
    full 1,500 items each they needed 20-25 s quiet, and a 20 s timeout was missed by a
    healthy client on a busy machine; with about 400 items each (``train-max-items``) they need
    about 8 s, so 40 s leaves room for a machine 5x slower. Flower's simulation ends
    only once the hung message has returned (``round-timeout`` + 15 s after it began),
    so every second of timeout is paid about twice."""
    result, out = launch(
        tmp_path,
        embedded_assets,
        "silent",
        **{
            "num-server-rounds": 1,
            "fraction-train": 1.0,
            "train-max-items": 1600,
            "round-timeout": 40.0,
            "fault-injection": "hang:1@1",
        },
    )
    assert result["status"] == "completed", result.get("error")
    (row,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    assert set(row["weights"]) == {"0", "2", "3"} and row["skipped"] is False
    (why,) = row["dropped"].values()
    assert why == "no reply within 40 s"
    (node,) = row["dropped"]
    logged = capfd.readouterr().out
    assert f"train round 1: node {node} (partition 1) sent no reply within 40 s" in logged


def failing_run(tmp_path, embedded_assets, name: str, supernodes: int, *config: str) -> int:
    """``python -m rcsr_flower.runtime.launch``, the run's name and place given with ``-c``."""
    args = ["--app-dir", str(ROOT), "--flwr-home", str(tmp_path / "flwr")]
    args += ["--num-supernodes", str(supernodes), "--timeout", "1200"]
    args += ["-c", f'run-name="{name}" output-dir="{tmp_path / "outputs"}"']
    for item in (*config, f'cache-dir="{embedded_assets.root.parent}"'):
        args += ["-c", item]
    return main(args)


def test_a_failed_run_exits_non_zero(tmp_path, embedded_assets, capsys):
    # a bad value never reaches Flower: the launcher names it (the SuperLink would only
    # say "Invalid run configuration." for an unknown key)
    assert failing_run(tmp_path, embedded_assets, "bad", 2, "alpha=0.0") == 1
    assert "'alpha' = 0.0 is out of range: allowed (0, inf)" in capsys.readouterr().err
    assert failing_run(tmp_path, embedded_assets, "bad", 2, "alhpa=0.3") == 1
    err = capsys.readouterr().err
    assert "RUN FAILED" in err and "unknown run-config key 'alhpa' (did you mean alpha?)" in err
    assert not (tmp_path / "outputs" / "bad").exists()
    assert not (tmp_path / "flwr").exists()  # no SuperLink was started for them
    # what only the running federation reveals fails in the ServerApp, before training,
    # with one line in result.json
    # (and a bare word for a string key reaches the run: flwr alone refuses the whole -c)
    small = "min-train-nodes=3 strategy=fedavg"
    assert failing_run(tmp_path, embedded_assets, "small", 2, small) == 1
    config = json.loads((tmp_path / "outputs" / "small" / "config.json").read_text())
    assert config["strategy"] == "fedavg"
    result = json.loads((tmp_path / "outputs" / "small" / "result.json").read_text())
    assert result["status"] == "failed" and "\n" not in result["error"]
    assert "'min-train-nodes' = 3 but the federation has 2 clients" in result["error"]
    assert not (tmp_path / "outputs" / "small" / "metrics.jsonl").exists()
    assert "RUN FAILED" in capsys.readouterr().err
