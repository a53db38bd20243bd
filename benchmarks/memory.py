"""How much memory the default run uses at its peak, and in which processes.

Runs the embedded default federation as ``make run`` does (``python -m
rcsr_flower.runtime.launch --app-dir . --flwr-home .flwr --num-supernodes 10``, plus any
``-c`` overrides), or with ``--suite-cell`` one cell of the embedded suite
(``python -m rcsr_flower.experiments run --suite embedded --only S4/rcsr/seed-0``, into a
temporary output root, results dir and Flower home, so that no completed cell is skipped
and nothing kept is touched), and samples every second the memory of everything the run
started:

- every process that descends from the launched command, and
- every process that carries the launcher's tag (``RCSR_LAUNCH_TAG``, read from the
  environment of the command's descendants) or shares a session with one that does:
  Ray's and Flower's daemons leave the process tree, and Ray's agents overwrite the
  environment that ``/proc/PID/environ`` reads (``rcsr_flower.runtime.processes``).

The figure is the proportional set size (PSS, ``/proc/PID/smaps_rollup``) summed over
those processes: a page shared by n processes counts 1/n in each, so the torch, Ray and
Python libraries that every actor, the ServerApp and the daemons map are counted once in
the sum, where RSS counts them once per process (``peak_rss_gb``, an upper bound). Pages
shared with processes outside the run (another run of the same interpreter) count only
their share. The breakdown is by role (command line, :func:`role`): the roles' PSS in the
sample of the peak sum, and each role's own peak over the run. GB are 10^9 bytes.

    .venv/bin/python benchmarks/memory.py [-c "num-server-rounds=2"] [--repeat 3]
    .venv/bin/python benchmarks/memory.py --suite-cell [S4/rcsr/seed-0]

Prints the processes of the peak sample, then one JSON line: {"peak_pss_gb",
"peak_rss_gb", "by_process" (role -> GB at the peak), "peak_by_role_gb", "seconds",
"samples", "exit_code" (the launcher's; the script exits non-zero with it),
"load_avg_1m" (before and after), ...}. With ``--repeat N`` the command runs N times
one after another and the line is the median run's (by peak), with every run's peak,
seconds and load under "runs".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG_VAR = "RCSR_LAUNCH_TAG"  # rcsr_flower.runtime.processes.TAG_VAR (not imported: no deps)
GB = 1e9
SUITE_CELL = "S4/rcsr/seed-0"


# ------------------------------------------------------------------ reading /proc
@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    session: int
    cmdline: str  # arguments joined by spaces; "" for kernel threads
    tags: frozenset[str]  # the TAG_VAR values in its environment


def read_proc(pid: int) -> Proc | None:
    """One process from ``/proc``; None when it is gone, a zombie, or not readable."""
    base = Path("/proc", str(pid))
    try:  # after the command's ")": state, ppid, pgrp, session, ...
        stat = (base / "stat").read_text().rsplit(")", 1)[1].split()
        cmdline = (base / "cmdline").read_bytes()
    except (OSError, IndexError):
        return None
    if stat[0] == "Z":
        return None
    try:
        environ = (base / "environ").read_bytes()
    except OSError:  # another user's process
        environ = b""
    prefix = f"{TAG_VAR}=".encode()
    tags = frozenset(
        v[len(prefix) :].decode(errors="replace")
        for v in environ.split(b"\0")
        if v.startswith(prefix)
    )
    args = cmdline.rstrip(b"\0").split(b"\0")
    return Proc(pid, int(stat[1]), int(stat[3]), b" ".join(args).decode(errors="replace"), tags)


def processes() -> dict[int, Proc]:
    """Every live process but zombies, by pid: one pass over ``/proc``."""
    found = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and (proc := read_proc(int(entry.name))) is not None:
                found[proc.pid] = proc
    return found


def tree(pid: int, procs: dict[int, Proc]) -> set[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p in procs and p not in found:
            found.add(p)
            todo += children.get(p, [])
    return found


def tagged(tags: Iterable[str], procs: dict[int, Proc], own_session: int = -1) -> set[int]:
    """Processes that carry one of ``tags``, and the rest of their sessions (a tagged
    process's session was started by the launcher or by what it started; Ray's agents
    rename themselves over their environment). ``own_session`` (this script's: the shell
    or test runner) is not followed."""
    tags = set(tags)
    if not tags:
        return set()
    carriers = {p.pid for p in procs.values() if p.tags & tags}
    sessions = {procs[pid].session for pid in carriers} - {own_session, 0}
    return carriers | {p.pid for p in procs.values() if p.session in sessions}


def launch_tags(root: int, procs: dict[int, Proc], inherited: str | None = None) -> set[str]:
    """The launcher tags that ``root``'s descendants carry, but ``inherited`` (one this
    script's own environment already had, from a launcher that started it)."""
    return {t for pid in tree(root, procs) for t in procs[pid].tags} - {inherited}


def pss_of(pid: int) -> dict[str, int] | None:
    """``{"pss", "rss", "uss"}`` of ``pid`` in bytes (``/proc/PID/smaps_rollup``; USS:
    its private pages), None when it is gone or not readable."""
    try:
        text = Path("/proc", str(pid), "smaps_rollup").read_text()
    except OSError:
        return None
    kb: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        name, _, rest = line.partition(":")
        with contextlib.suppress(ValueError, IndexError):
            kb[name.strip()] = int(rest.split()[0])
    if "Pss" not in kb:  # a kernel thread: an empty rollup
        return None
    private = kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)
    return {"pss": kb["Pss"] * 1024, "rss": kb.get("Rss", 0) * 1024, "uss": private * 1024}


# ------------------------------------------------------------------ roles
RAY_DAEMON_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::JobAgent")
PROGRAMS = {  # the program (a script's or executable's name, or a python -m module)
    "flwr-serverapp": "ServerApp",
    "flwr-simulation": "ServerApp",  # a simulation's ServerApp runs in it, beside Ray's driver
    "flower-superlink": "SuperLink",
    "flower-superexec": "SuperExec",
    "flower-supernode": "SuperNode",
    "flwr-clientapp": "ClientApp",
    "rcsr_flower.client.node_worker": "node worker",
    "rcsr_flower.runtime.launch": "launcher",
    "rcsr_flower.runtime.deploy": "launcher",
    "rcsr_flower.experiments": "launcher",
    "flwr.cli.app": "flwr run",
    "flwr": "flwr run",
    "rcsr_flower.runtime.ray_head": "Ray daemons",
}
# the launcher's Ray head once its cluster is up: an interpreter that only waits
# (rcsr_flower.runtime.ray_head.WAITER, not imported: no deps)
RAY_HEAD_WAITER = "rcsr-ray-head"


def program(cmdline: str) -> str:
    """What a command line runs: ``python -m MODULE`` gives MODULE, ``python SCRIPT``
    and ``EXECUTABLE`` their file names."""
    args = cmdline.split()
    if args and Path(args[0]).name.startswith("python"):
        rest = args[1:]
        while rest and rest[0].startswith("-"):
            if rest[0] == "-m" and len(rest) > 1:
                return rest[1]
            rest = rest[1:]
        args = rest
    return Path(args[0]).name if args else ""


def role(cmdline: str) -> str:
    """A process's part in a run, from its command line: ServerApp (``flwr-serverapp``,
    or ``flwr-simulation``, where a simulation's ServerApp runs), Ray actor (``ray::...``
    workers), Ray daemons (raylet, GCS, agents, monitors, the launcher's Ray head),
    SuperLink, SuperExec, launcher, flwr run, ... or other."""
    if cmdline.startswith("ray::"):
        return "Ray daemons" if cmdline.startswith(RAY_DAEMON_TITLES) else "Ray actor"
    if RAY_HEAD_WAITER in cmdline.split():
        return "Ray daemons"
    name = program(cmdline)
    if name in PROGRAMS:
        return PROGRAMS[name]
    if "/site-packages/ray/" in " ".join(cmdline.split()[:3]):  # raylet, gcs_server, ...
        return "Ray actor" if name == "default_worker.py" else "Ray daemons"  # not yet renamed
    return "other"


# ------------------------------------------------------------------ sampling
@dataclass
class Sample:
    t: float  # seconds since the command started
    rows: list[tuple[int, str, dict[str, int], str]]  # (pid, role, memory, cmdline)

    def total(self, key: str = "pss") -> int:
        return sum(m[key] for _, _, m, _ in self.rows)

    def by_role(self, key: str = "pss") -> dict[str, int]:
        out: dict[str, int] = {}
        for _, r, m, _ in self.rows:
            out[r] = out.get(r, 0) + m[key]
        return out

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, r, _, _ in self.rows:
            out[r] = out.get(r, 0) + 1
        return out


def members(root: int, tags: set[str], procs: dict[int, Proc], own_session: int) -> set[int]:
    """The run's processes: ``root``'s tree, and what carries one of ``tags`` (whose
    sessions too, :func:`tagged`), this process left out."""
    return (tree(root, procs) | tagged(tags, procs, own_session)) - {os.getpid()}


def sample(root: int, tags: set[str], t: float = 0.0) -> Sample:
    """One sample of the run started as ``root``; adds the tags newly seen to ``tags``."""
    procs = processes()
    tags |= launch_tags(root, procs, os.environ.get(TAG_VAR))
    rows = []
    for pid in sorted(members(root, tags, procs, os.getsid(0))):
        if (memory := pss_of(pid)) is not None:
            rows.append((pid, role(procs[pid].cmdline), memory, procs[pid].cmdline))
    return Sample(t, rows)


# ------------------------------------------------------------------ the benchmark
def command(args: argparse.Namespace, tmp: Path) -> list[str]:
    if args.suite_cell:
        return [
            sys.executable, "-m", "rcsr_flower.experiments", "run",
            "--suite", args.suite, "--only", args.suite_cell,
            "--output-root", str(tmp / "outputs"),
            "--results-dir", str(tmp / "results"),  # its archive: no completed copy to skip to
            "--flwr-home", str(tmp / "flwr"),
        ]  # fmt: skip
    cmd = [sys.executable, "-m", "rcsr_flower.runtime.launch", "--app-dir", "."]
    cmd += ["--flwr-home", ".flwr", "--num-supernodes", str(args.num_supernodes)]
    if args.cpus_per_client is not None:
        cmd += ["--cpus-per-client", str(args.cpus_per_client)]
    for raw in args.run_config:
        cmd += ["-c", raw]
    return cmd


@dataclass
class Watched:
    """What :func:`watch` saw of one command's run."""

    peak: Sample  # the sample of the largest PSS sum
    role_peak: dict[str, int]  # each role's own peak PSS over the run
    peak_rss: int
    samples: int
    seconds: float
    code: int  # the command's exit code


def watch(cmd: list[str], env: dict[str, str], every: float = 1.0, cwd: Path = ROOT) -> Watched:
    """Run ``cmd`` and sample its processes' memory every ``every`` s until it exits
    (:func:`sample`), with a progress line every 15 samples; Ctrl-C stops the command,
    whose launcher then stops what it started."""
    tags: set[str] = set()
    peak: Sample | None = None
    role_peak: dict[str, int] = {}
    peak_rss = samples = 0
    start = time.monotonic()
    child = subprocess.Popen(cmd, cwd=cwd, env=env)
    try:
        while child.poll() is None:
            s = sample(child.pid, tags, time.monotonic() - start)
            samples += 1
            total = s.total()
            peak_rss = max(peak_rss, s.total("rss"))
            for r, v in s.by_role().items():
                role_peak[r] = max(role_peak.get(r, 0), v)
            if peak is None or total > peak.total():
                peak = s
            if samples % 15 == 1:
                print(
                    f"[memory] {s.t:6.0f} s: {gb(total):.2f} GB PSS in {len(s.rows)} "
                    f"processes (peak {gb(peak.total()):.2f} GB)",
                    flush=True,
                )
            time.sleep(max(0.0, every - (time.monotonic() - start - s.t)))
    except KeyboardInterrupt:
        child.terminate()  # the launcher stops what it started
        child.wait()
        raise
    return Watched(
        peak or Sample(0.0, []),
        role_peak,
        peak_rss,
        samples,
        time.monotonic() - start,
        child.returncode,
    )


def gb(n: float) -> float:
    return round(n / GB, 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        help='run-config overrides for the launcher, e.g. -c "num-server-rounds=2"',
    )
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument(
        "--cpus-per-client",
        type=int,
        default=None,
        help="CPUs of a Ray actor: the machine's CPUs / this many actors (default: the "
        "launcher's, as make run)",
    )
    parser.add_argument(
        "--suite-cell",
        nargs="?",
        const=SUITE_CELL,
        default=None,
        help=f"run this cell of --suite instead (default {SUITE_CELL})",
    )
    parser.add_argument("--suite", default="embedded")
    parser.add_argument("--every", type=float, default=1.0, help="seconds between samples")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs, one after another; the line is the median's"
    )
    args = parser.parse_args(argv)
    if args.suite_cell and args.run_config:
        parser.error("-c is for the default run; a suite cell takes its suite's config")

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # Makefile
    runs = []
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"[memory] run {i + 1} of {args.repeat}", flush=True)
        runs.append(measure(args, env))
        if runs[-1]["exit_code"] != 0:
            break  # a failed run: its code, no median of what did not run
    line = median_run(runs)
    print(json.dumps(line))
    code = line["exit_code"]
    return 0 if code == 0 else code if 0 < code < 256 else 1  # < 0: killed by a signal


def measure(args: argparse.Namespace, env: dict[str, str]) -> dict:
    """One run of the command, watched: the processes of its peak sample (printed) and
    its figures."""
    tmp = Path(tempfile.mkdtemp(prefix="rcsr-memory-"))
    cmd = command(args, tmp)
    print(f"[memory] $ {' '.join(cmd)}", flush=True)
    before = os.getloadavg()[0]
    try:
        watched = watch(cmd, env, args.every)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak, role_peak = watched.peak, watched.role_peak
    print(f"[memory] peak sample at {peak.t:.0f} s: {gb(peak.total()):.2f} GB PSS", flush=True)
    for pid, r, m, cmdline in sorted(peak.rows, key=lambda row: -row[2]["pss"]):
        print(
            f"[memory]   {gb(m['pss']):6.3f} GB PSS  {gb(m['rss']):6.3f} GB RSS  "
            f"{pid:>7}  {r:<12} {cmdline[:90]}",
            flush=True,
        )
    order = sorted(role_peak, key=lambda r: -role_peak[r])
    at_peak = peak.by_role()
    return {
        "peak_pss_gb": gb(peak.total()),
        "peak_rss_gb": gb(watched.peak_rss),
        "peak_uss_gb": gb(peak.total("uss")),  # private pages of the peak sample
        "by_process": {r: gb(at_peak[r]) for r in order if r in at_peak},
        "processes_at_peak": {r: peak.counts()[r] for r in order if r in at_peak},
        "peak_by_role_gb": {r: gb(role_peak[r]) for r in order},
        "peak_at_s": round(peak.t, 1),
        "seconds": round(watched.seconds, 1),
        "samples": watched.samples,
        "exit_code": watched.code,
        "load_avg_1m": {"before": round(before, 2), "after": round(os.getloadavg()[0], 2)},
    }


def median_of(runs: list[dict], key: str) -> dict:
    """The run whose ``key`` is the median: the lower middle of an even count, so a run
    that happened, not an average of two."""
    ranked = sorted(runs, key=lambda r: r[key])
    return ranked[(len(ranked) - 1) // 2]


def median_run(runs: list[dict]) -> dict:
    """The figures of the run whose peak is the median (:func:`median_of`), and, of more
    than one, every run's peak, seconds and load, so that the spread and the machine's
    state stay with the figure."""
    if len(runs) == 1:
        return runs[0]
    line = dict(median_of(runs, "peak_pss_gb"))
    line["repeat"] = len(runs)
    line["runs"] = [
        {k: r[k] for k in ("peak_pss_gb", "seconds", "exit_code", "load_avg_1m")} for r in runs
    ]
    failed = [r["exit_code"] for r in runs if r["exit_code"] != 0]
    line["exit_code"] = failed[0] if failed else 0
    return line


if __name__ == "__main__":
    sys.exit(main())
