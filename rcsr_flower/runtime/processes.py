"""The processes a launcher starts, and stopping them: every one carries a tag in its
environment (so do the processes they start, some of which leave the process group), so
the launcher stops all of them by PID when it ends, and from a SIGTERM/SIGINT handler when
its own process is told to stop. Also: waiting until a server answers.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path


def stop_process_group(*processes: subprocess.Popen | None) -> None:
    """SIGTERM, then SIGKILL, the process groups ``processes`` lead (each started with
    ``start_new_session=True``), so whatever they spawned goes too. All groups are
    signalled before any is waited for: they stop side by side."""
    groups: dict[subprocess.Popen, int] = {}
    for process in processes:
        if process is None:
            continue
        try:
            groups[process] = os.getpgid(process.pid)
        except ProcessLookupError:
            groups[process] = -1
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        signalled = []
        for process, pgid in groups.items():
            with contextlib.suppress(ProcessLookupError):
                if pgid >= 0:
                    os.killpg(pgid, sig)  # SIGKILL too: what outlived its leader
                    signalled.append(process)
        if not signalled:
            break
        deadline = time.monotonic() + wait
        for process in signalled:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
        if all(p.poll() is not None for p in signalled):
            time.sleep(0.5)  # what they spawned gets the leader's moment to go too
    for process in groups:
        if process.poll() is None:  # the leader ignored both signals: reap what we can
            process.kill()
            process.wait(timeout=5)


def process_start(pid: int | str) -> str | None:
    """When ``pid`` started (clock ticks after boot, Linux ``/proc``), so a reused pid is
    not mistaken for it; ``""`` where /proc is not there, None when no such process runs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(int(pid) if pid != "self" else os.getpid(), 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return ""


def process_age() -> float | None:
    """Seconds since this process started (Linux ``/proc``); None elsewhere."""
    try:
        ticks = int(process_start("self") or "")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------- what a launcher started
# Every process a launcher starts carries TAG_VAR=<its tag> in its environment, and so
# does everything those start (Flower's SuperExec, ServerApp and ClientApp processes,
# Ray's workers and daemons, some of which leave the process group). The tag finds them
# all, by PID, when the launcher stops, and from a SIGTERM/SIGINT handler when the
# launcher's own process is told to stop (a CI timeout, Ctrl-C), which would otherwise
# leave servers running in their own sessions.
TAG_VAR = "RCSR_LAUNCH_TAG"
_LEADERS: dict[str, list[subprocess.Popen]] = {}  # tag -> session leaders started
_HANDLERS: dict[int, object] = {}  # signal -> the handler ours replaced
_AT_STOP: list[Callable[[], None]] = []  # what else to undo (a test network's namespaces)


def new_tag() -> str:
    return uuid.uuid4().hex


def track(tag: str, process: subprocess.Popen) -> None:
    """Stop ``process``'s session and everything tagged ``tag`` on exit or a signal;
    while it runs, its sessions keep this process's niceness (:func:`pass_on_niceness`)."""
    _install_handlers()
    first = tag not in _LEADERS
    _LEADERS.setdefault(tag, []).append(process)
    if first and niceness() > 0 and _autogroups():
        threading.Thread(target=_keep_niceness, args=(tag,), daemon=True).start()


# ------------------------------------------------------------- a SuperLink's own state
def private_database(directory: Path, tag: str) -> Path:
    """A SuperLink database for one launcher (``tag``): a run that a killed launcher left
    pending in a shared one is started again by the next SuperLink on that file, beside
    the new run (seen: a suite cut short in one session ran its last cell again, unasked,
    in the next). Delete it with :func:`remove_database` when the launcher stops."""
    return directory / f"state-{tag[:16]}.db"


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# ------------------------------------------------------------- niceness across sessions
# With autogroup scheduling (Linux's default on many distributions) every session is a
# scheduling group of its own, whose weight ignores `nice`. The SuperLink and what Flower
# and Ray start run in sessions of their own, so `nice make experiments` alone would still
# take half the CPU from foreground work. Their autogroups get this process's niceness.
def _autogroups() -> bool:
    try:
        return Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        return False


def autogroup_nice(pid: int | str = "self") -> int | None:
    """The nice value of ``pid``'s autogroup (``/proc/PID/autogroup``), None if unknown."""
    try:
        return int(Path(f"/proc/{pid}/autogroup").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def niceness() -> int:
    """How nice this process is: its own nice value or its autogroup's, the larger."""
    return max(os.getpriority(os.PRIO_PROCESS, 0), autogroup_nice() or 0)


def pass_on_niceness(pids: list[int], nice: int | None = None) -> None:
    """Raise the autogroup nice value of ``pids`` to ``nice`` (default: ours); never
    lowers one (that needs privileges, and is not ours to do)."""
    nice = niceness() if nice is None else nice
    for pid in pids:
        current = autogroup_nice(pid)
        if current is not None and current < nice:
            with contextlib.suppress(OSError):
                Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def _keep_niceness(tag: str, every: float = 2.0) -> None:
    while tag in _LEADERS:  # sessions keep appearing during a run (Ray, its actors)
        pass_on_niceness([p.pid for p in _LEADERS.get(tag, [])] + tagged_pids(tag))
        time.sleep(every)


def live_processes(tag: str) -> list[tuple[int, int, bool]]:
    """``(pid, session id, carries TAG_VAR=tag)`` of every live process but this one,
    zombies left out: one pass over ``/proc``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:  # after the command's ")": state, ppid, pgrp, session, ...
                stat = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                environ = Path(entry.path, "environ").read_bytes()
            except (OSError, IndexError):
                continue  # gone
            if stat[0] != "Z":
                found.append((int(entry.name), int(stat[3]), needle in environ.split(b"\0")))
    return found


def tagged_pids(tag: str) -> list[int]:
    """Live processes (not zombies) whose environment carries ``TAG_VAR=tag``."""
    return [pid for pid, _, tagged in live_processes(tag) if tagged]


def stop_tagged(tag: str, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, every session started under ``tag`` and every process
    that carries it. Uses no ``Popen.wait``, so it is safe in a signal handler that
    interrupted one.

    A tagged process's session was started by a process of ours (or is our own, which
    is left alone: it holds the caller's shell or test runner), so everything in it is
    ours too, also what no longer shows the tag: Ray's agents rename themselves
    (``setproctitle``) over the memory that ``/proc/PID/environ`` reads, and left the run
    behind now and then before this.
    """
    leaders = [p for p in _LEADERS.pop(tag, []) if p.returncode is None]
    sessions: set[int] = {p.pid for p in leaders}  # start_new_session: pid = session id
    own = os.getsid(0)

    def targets() -> list[int]:
        processes = live_processes(tag)
        sessions.update(s for _, s, tagged in processes if tagged and s not in (own, 0))
        return [pid for pid, s, tagged in processes if tagged or s in sessions]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for process in leaders:  # not yet reaped: the pid still leads its own process session
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        for pid in targets():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (left := targets()) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not left:
            break
    # a process spawned while the others were dying (Ray starts its dashboard agent late)
    # escaped both sweeps: keep killing what carries the tag until nothing does
    deadline = time.monotonic() + 15.0
    while (late := targets()) and time.monotonic() < deadline:
        for pid in late:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for process in leaders:
        with contextlib.suppress(Exception):
            process.poll()  # reap when we can; a zombie holds nothing


def at_stop(fn: Callable[[], None]) -> None:
    """Also call ``fn`` when :func:`stop_all` runs (at exit, on SIGTERM/SIGINT), after
    the processes have stopped; ``fn`` must be safe to call twice."""
    _install_handlers()
    _AT_STOP.append(fn)


def stop_all() -> None:
    """Stop everything every launcher in this process started, then undo what was
    registered with :func:`at_stop`."""
    for tag in list(_LEADERS):
        stop_tagged(tag)
    while _AT_STOP:
        with contextlib.suppress(Exception):
            _AT_STOP.pop()()


def _install_handlers() -> None:
    if _HANDLERS or threading.current_thread() is not threading.main_thread():
        return
    atexit.register(stop_all)
    for sig in (signal.SIGTERM, signal.SIGINT):
        _HANDLERS[sig] = signal.getsignal(sig)
        signal.signal(sig, functools.partial(_on_signal, _HANDLERS[sig]))


def _on_signal(previous, signum: int, frame) -> None:
    """Stop what we started, then do what the signal did before: raise
    KeyboardInterrupt, call the program's own handler, or die of the signal."""
    stop_all()
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def wait_healthy(
    process: subprocess.Popen,
    url: str,
    log_file: Path,
    cafile: Path | None = None,
    timeout: float = 300,
) -> None:
    """Wait until ``url`` answers (any HTTP status) or the process exits."""
    context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{process.args[0]} exited with code {process.returncode}; see {log_file}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1, context=context):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{process.args[0]} did not answer {url} in {timeout:.0f} s; see {log_file}")
