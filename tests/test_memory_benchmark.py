"""benchmarks/memory.py's sampler on a real process tree: it finds the launched command's
descendants, the tagged processes that left the tree and their sessions, and sums their
proportional set sizes; roles come from command lines."""

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("memory_bench", ROOT / "benchmarks" / "memory.py")
memory = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = memory  # its dataclasses look their module up
spec.loader.exec_module(memory)

SLEEP = "import time; time.sleep(60)"
# started tagged, in a session of its own, by the "launcher" below; exits at once, so what
# it starts leaves the launcher's tree: one process that inherits the tag, and one whose
# environment has none (as Ray's agents, which overwrite theirs) in the same session
LEAVER = f"""
import json, subprocess, sys
orphan = subprocess.Popen([sys.executable, "-c", {SLEEP!r}], stdout=subprocess.DEVNULL)
untagged = subprocess.Popen([sys.executable, "-c", {SLEEP!r}], env={{}}, stdout=subprocess.DEVNULL)
print(json.dumps({{"orphan": orphan.pid, "untagged": untagged.pid}}), flush=True)
"""
# the "launcher": holds 50 MB of its own, starts one tagged child (in its tree) and LEAVER
LAUNCHER = f"""
import json, os, subprocess, sys
ballast = "x" * 50_000_000  # written, so resident
env = {{**os.environ, "{memory.TAG_VAR}": sys.argv[1]}}
child = subprocess.Popen([sys.executable, "-c", {SLEEP!r}], env=env)
leaver = subprocess.Popen([sys.executable, "-c", sys.argv[2]], env=env, start_new_session=True,
                          stdout=subprocess.PIPE, text=True)
pids = json.loads(leaver.stdout.readline())
leaver.wait()
print(json.dumps({{"child": child.pid, **pids}}), flush=True)
{SLEEP}
"""


@pytest.fixture
def launched():
    """The launcher's process, its tag and the pids of what it started (all killed after)."""
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != memory.TAG_VAR}
    root = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, tag, LEAVER],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pids = {}
    try:
        pids = json.loads(root.stdout.readline())
        yield root, tag, pids
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        root.kill()
        root.wait()


def test_the_sampler_finds_the_tree_the_tagged_processes_and_their_sessions(launched):
    root, tag, pids = launched
    procs = memory.processes()
    assert memory.tree(root.pid, procs) == {root.pid, pids["child"]}
    assert memory.launch_tags(root.pid, procs) == {tag}
    assert memory.launch_tags(root.pid, procs, inherited=tag) == set()
    found = memory.tagged({tag}, procs, os.getsid(0))
    assert {pids["orphan"], pids["untagged"], pids["child"]} <= found
    # the session of the caller is not followed (it holds the shell or test runner)
    assert pids["untagged"] not in memory.tagged({tag}, procs, procs[pids["orphan"]].session)
    assert memory.tagged(set(), procs) == set()

    tags: set[str] = set()
    s = memory.sample(root.pid, tags)
    assert tags == {tag}
    by_pid = {pid: m for pid, _, m, _ in s.rows}
    assert {root.pid, *pids.values()} <= set(by_pid)
    assert os.getpid() not in by_pid
    assert by_pid[root.pid]["pss"] >= 40e6 and s.total() >= 40e6
    assert s.total("uss") <= s.total() <= s.total("rss")
    assert sum(s.by_role().values()) == s.total() and sum(s.counts().values()) == len(s.rows)


def test_pss_of_reads_smaps_rollup_and_a_gone_process_has_none():
    own = memory.pss_of(os.getpid())
    assert own is not None and 0 < own["uss"] <= own["pss"] <= own["rss"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert memory.pss_of(gone.pid) is None and memory.read_proc(gone.pid) is None


VENV = "/work/x/.venv"
SITE = f"{VENV}/lib/python3.11/site-packages"


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        (f"{VENV}/bin/python {VENV}/bin/flwr-serverapp --runtime-api-address 1:2", "ServerApp"),
        (f"{VENV}/bin/python {VENV}/bin/flwr-simulation --token abc --insecure", "ServerApp"),
        ("ray::ClientAppActor.run", "Ray actor"),
        ("ray::IDLE", "Ray actor"),
        (f"{VENV}/bin/python {SITE}/ray/_private/workers/default_worker.py --x=1", "Ray actor"),
        ("ray::DashboardAgent", "Ray daemons"),
        ("ray::RuntimeEnvAgent", "Ray daemons"),
        (f"{SITE}/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s", "Ray daemons"),
        (f"{SITE}/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray", "Ray daemons"),
        (f"{VENV}/bin/python -u {SITE}/ray/_private/log_monitor.py --logs-dir=/x", "Ray daemons"),
        (f"{VENV}/bin/python -m rcsr_flower.runtime.ray_head /x/ray-head.json", "Ray daemons"),
        (
            f"{VENV}/bin/python -S -c import signal; signal.pause() rcsr-ray-head /x/r.json",
            "Ray daemons",
        ),
        (
            f"{VENV}/bin/python {VENV}/bin/flower-superlink --insecure --simulation "
            "--isolation subprocess --log-file /x/.flwr/superlink.log",
            "SuperLink",
        ),
        (f"{VENV}/bin/python {VENV}/bin/flower-superexec --insecure --parent-pid 7", "SuperExec"),
        (
            f"{VENV}/bin/python -m rcsr_flower.runtime.launch --app-dir . --flwr-home .flwr",
            "launcher",
        ),
        (".venv/bin/python -m rcsr_flower.experiments run --suite embedded", "launcher"),
        (f"{VENV}/bin/python -m flwr.cli.app run /x/app rcsr-local --stream", "flwr run"),
        (f"{VENV}/bin/python -m rcsr_flower.client.node_worker --socket /s", "node worker"),
        ("/usr/bin/bash -c make run", "other"),
        ("", "other"),
    ],
)
def test_roles_come_from_command_lines(cmdline, expected):
    assert memory.role(cmdline) == expected


def test_the_commands_are_make_runs_and_a_suite_cell_in_a_temporary_root(tmp_path):
    args = memory.argparse.Namespace(
        suite_cell=None,
        suite="embedded",
        num_supernodes=10,
        cpus_per_client=None,
        run_config=["num-server-rounds=2"],
    )
    cmd = memory.command(args, tmp_path)  # make run's, with the launcher's actors
    assert cmd[1:] == ["-m", "rcsr_flower.runtime.launch", "--app-dir", ".", "--flwr-home",
                       ".flwr", "--num-supernodes", "10", "-c", "num-server-rounds=2"]  # fmt: skip
    args.cpus_per_client = 1
    cmd = memory.command(args, tmp_path)
    assert cmd[9:] == ["--cpus-per-client", "1", "-c", "num-server-rounds=2"]
    args.suite_cell = "S4/rcsr/seed-0"
    cmd = memory.command(args, tmp_path)
    assert cmd[1:7] == ["-m", "rcsr_flower.experiments", "run", "--suite", "embedded", "--only"]
    for flag in ("--output-root", "--results-dir", "--flwr-home"):
        assert cmd[cmd.index(flag) + 1].startswith(str(tmp_path))


def test_main_samples_the_command_until_it_exits_and_reports_its_exit_code(monkeypatch, capsys):
    code = 'import time; x = "x" * 50_000_000; time.sleep(2.5); raise SystemExit(3)'
    monkeypatch.setattr(memory, "command", lambda args, tmp: [sys.executable, "-c", code])
    assert memory.main(["--every", "0.5"]) == 3
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["exit_code"] == 3 and out["samples"] >= 2
    assert out["peak_pss_gb"] >= 0.04 and out["peak_rss_gb"] >= out["peak_pss_gb"]
    assert out["by_process"]["other"] == out["peak_pss_gb"]
    assert out["peak_by_role_gb"]["other"] >= 0.04
    assert {"seconds", "load_avg_1m", "processes_at_peak"} <= set(out)


def test_repeated_runs_give_the_median_run_with_every_runs_peak_and_load(monkeypatch, capsys):
    """``--repeat N``: the line is the run of the median peak (one that happened), and
    every run's peak, seconds and load come with it; a failed run ends the series."""

    def figures(peak: float, code: int = 0) -> dict:
        load = {"before": peak, "after": peak}
        return {"peak_pss_gb": peak, "seconds": 1.0, "exit_code": code, "load_avg_1m": load}

    line = memory.median_run([figures(2.3), figures(2.1), figures(2.2)])
    assert line["peak_pss_gb"] == 2.2 and line["repeat"] == 3 and line["exit_code"] == 0
    assert [r["peak_pss_gb"] for r in line["runs"]] == [2.3, 2.1, 2.2]
    assert memory.median_run([figures(2.0), figures(1.0)])["peak_pss_gb"] == 1.0
    assert memory.median_run([figures(2.0)]) == figures(2.0)  # one run: its own line

    code = 'import time; x = "x" * 20_000_000; time.sleep(1.2)'
    monkeypatch.setattr(memory, "command", lambda args, tmp: [sys.executable, "-c", code])
    assert memory.main(["--every", "0.3", "--repeat", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["repeat"] == 2 and len(out["runs"]) == 2 and out["peak_pss_gb"] >= 0.015
    assert set(out["runs"][0]["load_avg_1m"]) == {"before", "after"}
    failing = [sys.executable, "-c", "raise SystemExit(4)"]
    monkeypatch.setattr(memory, "command", lambda args, tmp: failing)
    assert memory.main(["--every", "0.3", "--repeat", "3"]) == 4
    assert "runs" not in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
