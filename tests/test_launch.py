"""The simulation launcher's preparation: assets and partition before submitting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from test_node_data import write_flickr

from rcsr_flower import federation
from rcsr_flower.backbones import clip
from rcsr_flower.config import ConfigError, RunConfig
from rcsr_flower.data.partition import Partition
from rcsr_flower.embedded.assets import load_model
from rcsr_flower.federation import load_partition, prepare_partition
from rcsr_flower.runtime.launch import (
    LaunchError,
    SimulationLauncher,
    check_run_config,
    flower_env,
    quote_bare_strings,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(embedded_assets, tmp_path) -> RunConfig:
    return RunConfig(
        model_name=str(embedded_assets.backbone_dir),
        dataset=str(write_flickr(tmp_path / "data", n_train=60)),
        data_dir=str(tmp_path / "data" / "flickr30k-images"),
        cache_dir=str(tmp_path / "cache"),
        partition_clusters=4,
    )


def test_prepare_partition_writes_the_file_the_run_reads(cfg, tmp_path, monkeypatch):
    path = prepare_partition(cfg, 3)
    assert path.is_file() and path.parent == Path(cfg.cache_dir) / "partitions"
    # what a node computes by itself, with no prepared file, is the same partition
    alone = dataclasses.replace(cfg, cache_dir=str(tmp_path / "alone"))
    backbone = load_model(cfg.model_name)
    assert load_partition(alone, backbone, 3).clients == Partition.from_json(path).clients

    # and in the run it is read, not recomputed; found by the model's name without
    # loading a model; the federation's size is part of the key
    def fail(*args, **kwargs):
        pytest.fail("recomputed or reloaded")

    monkeypatch.setattr(federation, "caption_embeddings", fail)
    assert load_partition(cfg, backbone, 3).clients == Partition.from_json(path).clients
    monkeypatch.setattr(clip, "load_backbone", fail)
    assert prepare_partition(cfg, 3) == path
    with pytest.raises(pytest.fail.Exception):
        prepare_partition(cfg, 4)


def test_prepare_partition_returns_the_file_a_first_run_wrote(cfg, tmp_path, monkeypatch):
    """On a first run the model's files appear only when it is loaded (the embedded
    backbone built into the cache, a hub checkpoint downloaded), and the partition's key
    names those files: the path the launcher reports is the one the run reads."""
    import shutil

    model = tmp_path / "arrives-on-load"
    first = dataclasses.replace(cfg, model_name=str(model))

    def download(name, cache_dir=None):
        shutil.copytree(cfg.model_name, model)
        return clip.load_backbone(str(model), "cpu")

    monkeypatch.setattr(federation, "load_model", download)
    path = prepare_partition(first, 3)
    assert path.is_file()
    assert path == federation.partition_file(first, 3)  # what every process of the run reads


def test_checking_a_prepared_run_imports_no_torch(cfg, tmp_path, fresh_python):
    """The launcher's check runs before anything else starts: with the partition cached,
    it needs no backbone, so no torch (1.4 s of its 2.6 s here when it imported it)."""
    prepare_partition(cfg, 3)
    overrides = {
        "model-name": cfg.model_name,
        "dataset": cfg.dataset,
        "data-dir": cfg.data_dir,
        "cache-dir": cfg.cache_dir,
        "partition-clusters": cfg.partition_clusters,
    }
    code = (
        "import sys; from pathlib import Path; from rcsr_flower.runtime.launch import "
        "SimulationLauncher as L; "
        f"l = L(app_dir=Path({str(ROOT)!r}), flwr_home=Path({str(tmp_path / 'home')!r}), "
        f"num_supernodes=3, run_config={overrides!r}); "
        f"l.check('r', Path({str(tmp_path / 'out')!r})); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    lines = fresh_python(code)
    assert lines[-1] == "False False", lines


def test_provenance_takes_the_servers_machine_and_imports_no_torch(tmp_path, fresh_python):
    """``provenance.json`` is written after every run: the machine line comes from the
    ServerApp's ``result.json`` (``RoutedRun.complete`` puts it there), so the launcher
    never imports torch for it (1.2 s at the end of every run); a ServerApp that wrote
    none gets this process's."""
    from rcsr_flower.routing import provenance
    from rcsr_flower.routing.runner import RoutedRun

    cfg = {"num-server-rounds": 1, "run-name": "r", "output-dir": str(tmp_path)}
    with RoutedRun(cfg) as run:
        run.open(cfg)
        run.complete()
    result = json.loads((tmp_path / "r" / "result.json").read_text())
    assert result["machine"] == provenance.machine() and "CPU" in result["machine"]
    assert set(result["load_avg_1m"]) == {"start", "end"}  # what else the machine ran
    assert all(v >= 0 for v in result["load_avg_1m"].values())
    result["machine"] = "8-core test CPU, 1× test GPU"
    result["load_avg_1m"] = {"start": 0.5, "end": 3.25}
    (tmp_path / "r" / "result.json").write_text(json.dumps(result))
    code = (
        "import sys; from pathlib import Path; from rcsr_flower.routing import provenance; "
        f"print(provenance.record(Path({str(tmp_path / 'r')!r}), Path({str(ROOT)!r}))); "
        "print('torch' in sys.modules)"
    )
    lines = fresh_python(code)
    assert lines[-1] == "False", lines
    written = json.loads((tmp_path / "r" / "provenance.json").read_text())
    assert written["machine"] == "8-core test CPU, 1× test GPU" and written["commit"]
    assert written["load_avg_1m"] == {"start": 0.5, "end": 3.25}
    (tmp_path / "r" / "result.json").write_text('{"status": "completed"}')  # another app's
    other = provenance.record(tmp_path / "r", ROOT)
    assert other["machine"] == provenance.machine() and "load_avg_1m" not in other


def test_launcher_names_missing_data_before_starting_anything(cfg, tmp_path):
    launcher = SimulationLauncher(
        app_dir=ROOT,
        flwr_home=tmp_path / "flwr",
        num_supernodes=3,
        run_config={
            k: v
            for k, v in dataclasses.replace(cfg, dataset=str(tmp_path / "missing.json"))
            .to_flower()
            .items()
            if k in ("model-name", "dataset", "data-dir", "cache-dir", "partition-clusters")
        },
    )
    result = launcher.run("r", tmp_path / "outputs")
    assert result["status"] == "failed"
    assert "preparing the data" in result["error"] and "missing.json" in result["error"]
    assert launcher.process is None and not (tmp_path / "outputs").exists()


# ------------------------------------------------------------------ -c on the command line
def cli_args(*argv: str):
    import argparse

    from rcsr_flower.runtime.launch import add_run_arguments

    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


def test_run_name_and_output_dir_given_with_c_are_honoured(tmp_path, monkeypatch):
    import signal

    from rcsr_flower.runtime.launch import start_cli

    monkeypatch.setattr(signal, "signal", lambda *a: None)  # start_cli's SIGTERM handler
    monkeypatch.chdir(tmp_path)
    args = cli_args("-c", 'run-name="x" num-server-rounds=2', "-c", "output-dir=out")
    assert start_cli(args, "run") == ("x", tmp_path / "out")
    assert start_cli(cli_args("--run-name", "y"), "run") == ("y", tmp_path / "outputs")
    name, out = start_cli(cli_args(), "run")
    assert name.startswith("run-") and out == tmp_path / "outputs"
    # the same value twice is fine, two different ones are refused with one line
    assert start_cli(cli_args("--run-name", "x", "-c", 'run-name="x"'), "run")[0] == "x"
    with pytest.raises(LaunchError) as exc:
        start_cli(cli_args("--run-name", "x", "-c", 'run-name="z"'), "run")
    assert str(exc.value) == "run-name given twice: --run-name 'x' and -c run-name='z'; give one"
    # and what the launcher submits carries that name
    launcher = SimulationLauncher(app_dir=ROOT, flwr_home=tmp_path / "f", prepare=False)
    launcher.raw_run_config = args.run_config
    overrides = launcher.check("x", tmp_path / "out")
    assert overrides["run-name"] == "x" and overrides["output-dir"] == str(tmp_path / "out")


def test_bare_words_are_taken_for_string_keys_and_refused_for_others():
    assert quote_bare_strings(["strategy=fedavg num-server-rounds=2", "run-name=2024"]) == [
        'strategy="fedavg" num-server-rounds=2',
        'run-name="2024"',
    ]
    already = ['strategy="fedavg" alpha=0.5', "dataset='/a b/c.json'"]
    assert quote_bare_strings(already) == already
    cfg = check_run_config(ROOT, ["strategy=fedavg eval-protocol=paired"], {})
    assert (cfg.strategy, cfg.eval_protocol) == ("fedavg", "paired")
    with pytest.raises(LaunchError) as exc:
        quote_bare_strings(["num-server-rounds=two"])
    assert str(exc.value).startswith("run-config 'num-server-rounds' = two: not a valid int")
    # an unknown key is named by the schema, not lost in flwr's "invalid format"
    with pytest.raises(ConfigError, match="unknown run-config key 'stratgy'"):
        check_run_config(ROOT, ["stratgy=fedavg"], {})


# ------------------------------------------------------------------ another app (--app-dir)
EXAMPLE = ROOT / "examples" / "label-routing"


def test_another_app_gets_its_own_keys_checked_and_its_values_passed_on_as_written(tmp_path):
    from rcsr_flower.runtime.launch import flwr_run_command, is_this_app

    assert is_this_app(ROOT) and not is_this_app(EXAMPLE)
    launcher = SimulationLauncher(
        app_dir=EXAMPLE, flwr_home=tmp_path / "f", raw_run_config=["num-classes=4 lr=0.5"]
    )
    overrides = launcher.check("x", tmp_path / "out")  # this app's schema would refuse both
    assert overrides == {"run-name": "x", "output-dir": str(tmp_path / "out")}
    cmd = flwr_run_command(EXAMPLE, "c", launcher.raw_run_config, overrides, quote=False)
    assert "num-classes=4 lr=0.5" in cmd  # not quoted by this app's schema
    launcher.raw_run_config = ["num-class=4"]
    with pytest.raises(LaunchError, match="unknown run-config key 'num-class' for app"):
        launcher.check("y", tmp_path / "out")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "pyproject.toml").write_text(
        '[project]\nname = "bare"\n[tool.flwr.app.config]\nnum-server-rounds = 1\n'
    )
    with pytest.raises(LaunchError, match=r"has no 'output-dir' in \[tool"):
        SimulationLauncher(app_dir=bare, flwr_home=tmp_path / "g").check("z", tmp_path)


AUTOGROUPS = (
    Path("/proc/self/autogroup").exists()
    and Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
)


@pytest.mark.skipif(not AUTOGROUPS, reason="no autogroup scheduling on this kernel")
def test_a_niced_launcher_passes_its_niceness_to_the_sessions_it_starts(tmp_path):
    """`nice make experiments` must stay nice: the SuperLink (and what Flower and Ray start)
    run in sessions of their own, each an autogroup whose weight ignores `nice`."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import os, subprocess, time
        from rcsr_flower.runtime.processes import autogroup_nice, niceness, pass_on_niceness, track
        os.nice(5)
        mine = niceness()  # 5, or more where the test runs niced itself
        child = subprocess.Popen(["sleep", "30"], start_new_session=True)
        before = autogroup_nice(child.pid)  # a new session's autogroup starts at 0
        track("t", child)  # starts the keeper: within its period the child follows
        deadline = time.monotonic() + 20
        while autogroup_nice(child.pid) != mine and time.monotonic() < deadline:
            time.sleep(0.1)
        other = subprocess.Popen(["sleep", "30"], start_new_session=True)
        open(f"/proc/{other.pid}/autogroup", "w").write("19")
        pass_on_niceness([other.pid])  # nicer than us already: left alone
        print(before, autogroup_nice(child.pid) == mine, autogroup_nice(other.pid))
        other.kill()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "True", "19"]


@pytest.mark.slow
def test_a_run_left_by_a_killed_launcher_is_not_started_again_by_the_next(tmp_path):
    """A suite cut short (a kill between submitting a run and its start, a machine going
    away) leaves the run pending in the SuperLink's database; a SuperLink opening that
    database starts it, beside the next run (seen: a cell cut short in one session ran
    again, unasked, in the next). Each launcher's SuperLink has a database of its own,
    deleted when it stops."""
    import os
    import signal
    import subprocess
    import time

    from rcsr_flower.runtime.launch import flwr_run_command
    from rcsr_flower.runtime.processes import stop_tagged, tagged_pids

    def superexecs(tag: str) -> list[int]:
        return [
            pid
            for pid in tagged_pids(tag)
            if b"flower-superexec" in Path(f"/proc/{pid}/cmdline").read_bytes()
        ]

    def wait_for(condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert condition(), what

    home = tmp_path / "flwr"
    app = ROOT / "examples" / "label-routing"
    log = home / "superlink.log"
    first = SimulationLauncher(app_dir=app, flwr_home=home, num_supernodes=2, prepare=False)
    first.start()
    try:
        # no SuperExec to take it: the submitted run stays pending, as when the launcher
        # dies right after submitting
        wait_for(lambda: superexecs(first.tag), "the SuperLink started no SuperExec")
        for pid in superexecs(first.tag):
            os.kill(pid, signal.SIGKILL)
        options = ["--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
        cmd = flwr_run_command(app, first.connection, [], {}, *options, quote=False)
        submit = subprocess.Popen(
            cmd, env=first._env(), stdout=subprocess.DEVNULL, start_new_session=True
        )
        wait_for(lambda: "Created run" in log.read_text(), "the run was never created")
        # the launcher dies without stopping anything: all it started is killed
        os.killpg(first.process.pid, signal.SIGKILL)
        os.killpg(submit.pid, signal.SIGKILL)
        stop_tagged(first.tag, grace=0)
        first.process.wait(timeout=30)
    finally:
        first.process = None
    assert first.database.is_file()  # what the crash left behind

    second = SimulationLauncher(app_dir=app, flwr_home=home, num_supernodes=2, prepare=False)
    assert second.database != first.database
    offset = len(log.read_text())
    second.start()
    try:
        time.sleep(10)  # a pending run would be taken within seconds of start-up
        assert "Started task" not in log.read_text()[offset:]
    finally:
        second.stop()
    assert not second.database.exists()


def test_flower_processes_wait_passively_unless_told_otherwise(tmp_path, monkeypatch):
    """Several torch processes share this machine's cores in a simulation or a local
    deployment; spinning OpenMP threads made two nodes' local epochs 2-30x slower
    (docs/development.md). A user's own setting is kept."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert flower_env(tmp_path)["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert flower_env(tmp_path)["OMP_WAIT_POLICY"] == "ACTIVE"


def test_flower_processes_keep_two_malloc_arenas_unless_told_otherwise(tmp_path, monkeypatch):
    """glibc's per-thread arenas held 0.5 GB of the ServerApp's memory (docs/development.md)."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert flower_env(tmp_path)["MALLOC_ARENA_MAX"] == "2"
    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert flower_env(tmp_path)["MALLOC_ARENA_MAX"] == "8"


def test_flower_processes_start_their_own_ray_unless_told_otherwise(tmp_path, monkeypatch):
    """Without an address Ray joins the cluster in <ray temp dir>/ray_current_cluster,
    anyone's or a dead one's (the stale case runs in test_example_app.py)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert flower_env(tmp_path)["RAY_ADDRESS"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "")  # Ray reads an empty one as none
    assert flower_env(tmp_path)["RAY_ADDRESS"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert flower_env(tmp_path)["RAY_ADDRESS"] == "10.0.0.5:6379"


@pytest.mark.slow
def group_members(pgid: int) -> list[int]:
    """The pids of process group ``pgid`` (Linux /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_a_launchers_runs_share_the_ray_cluster_it_started(tmp_path, monkeypatch):
    """Flower's simulation starts a Ray cluster for every run (4-5 s on 2 cores) and
    stops it at the end, unless RAY_ADDRESS names one: the launcher starts one beside its
    SuperLink and each run it submits joins it as a Ray job of its own. The cluster keeps
    no driver, no Python that imported Ray and no autoscaler monitor. A cluster that
    died is said before the next run is submitted; stop() leaves none of its processes.
    With RAY_ADDRESS set (``local``: each run its own, Flower's way) it starts none."""
    import json
    import os
    import signal

    from rcsr_flower.runtime.processes import tagged_pids
    from rcsr_flower.runtime.ray_head import WAITER

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    launcher = SimulationLauncher(
        app_dir=ROOT / "examples" / "label-routing",
        flwr_home=tmp_path / "flwr",
        num_supernodes=2,
        prepare=False,
        run_config={"num-server-rounds": 1, "num-clients": 2},
        timeout=600,
    )
    assert launcher._env()["RAY_ADDRESS"] == f"127.0.0.1:{launcher.ray_port}"
    tag = launcher.tag
    launcher.start()
    try:
        for name in ("one", "two"):
            result = launcher.run(name, tmp_path / "out")
            assert result["status"] == "completed", result.get("error")
        info = json.loads(launcher.ray_ready_file.read_text())
        assert info["gcs_address"].endswith(f":{launcher.ray_port}")
        drivers = sorted((Path(info["session_dir"]) / "logs").glob("python-core-driver-*"))
        assert len(drivers) == 2, drivers  # one job per run; the cluster has no driver
        assert launcher.alive()
        # the head waits in a bare interpreter, and the group holds no autoscaler monitor
        head = launcher.ray_process.pid
        assert WAITER.encode() in Path(f"/proc/{head}/cmdline").read_bytes().split(b"\0")
        group = [p for p in group_members(head) if p != head]
        assert group and not any("autoscaler" in cmdline(p) for p in group), group
        os.killpg(launcher.ray_process.pid, signal.SIGKILL)
        launcher.ray_process.wait(timeout=30)
        assert not launcher.alive()  # the experiment runner starts the launcher again
        failed = launcher.run("three", tmp_path / "out")
        assert failed["status"] == "failed"
        assert "Ray cluster" in failed["error"] and "ray-head.log" in failed["error"]
    finally:
        launcher.stop()
    assert not tagged_pids(tag)
    assert not launcher.ray_ready_file.exists()

    monkeypatch.setenv("RAY_ADDRESS", "local")
    own = SimulationLauncher(app_dir=ROOT, flwr_home=tmp_path / "flwr")
    assert not own.ray_head and own._env()["RAY_ADDRESS"] == "local"


def test_launchers_sharing_a_flower_home_keep_their_own_connections(tmp_path):
    """Two suite runners in one checkout share `.flwr/experiments/<suite>`: each launcher
    names its own SuperLink in config.toml, and stopping one leaves the other's entry (a
    rewritten file once sent a runner's next run to the other's stopped SuperLink)."""
    import tomllib

    from rcsr_flower.runtime.launch import write_connection

    def table() -> dict:
        return tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]

    first = SimulationLauncher(app_dir=ROOT, flwr_home=tmp_path)
    second = SimulationLauncher(app_dir=ROOT, flwr_home=tmp_path)
    assert first.connection != second.connection
    write_connection(tmp_path, first.connection, "127.0.0.1:1001")
    write_connection(tmp_path, second.connection, "127.0.0.1:1002")
    assert table()[first.connection] == {"address": "127.0.0.1:1001", "insecure": True}
    assert table()[second.connection]["address"] == "127.0.0.1:1002"
    assert table()["default"] == second.connection
    second.stop()  # nothing started: stopping removes only its entry
    assert second.connection not in table() and table()["default"] == first.connection
    write_connection(tmp_path, "tls", "10.0.0.1:9093", tmp_path / "ca.crt")
    assert table()["tls"] == {
        "address": "10.0.0.1:9093",
        "root-certificates": str(tmp_path / "ca.crt"),
    }
    assert table()[first.connection]["address"] == "127.0.0.1:1001"
