"""Run a suite's cells, each a real ``flwr run`` through the project's launcher.

All cells share one private simulation SuperLink (``rcsr_flower.runtime.launch``): each cell is
one more ``flwr run`` submitted to it, with its own run config and number of SuperNodes,
so the suite pays the SuperLink's start-up once. Each cell writes the usual run outputs
to ``<output-root>/<suite>/<setting>/<method>/seed-<k>/`` and its console output to
``run.log`` there; the suite's console gets one line per cell.

A cell whose ``result.json`` says ``completed`` (with the run config the suite asks for
now) is skipped, so a rerun only runs what is missing; a cell cut short (the suite was
killed, the machine rebooted) continues from its last checkpoint (``resume-from``); a
failed cell is reported with its log and the others go on. The exit code is 0 only
when every selected cell has completed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from rcsr_flower.config import BEFORE_KEY_EXISTED, RESUME_MAY_CHANGE
from rcsr_flower.experiments.suite import Cell, Suite
from rcsr_flower.routing import provenance

LOG = "run.log"


@dataclass
class Outcome:
    cell: Cell
    status: str  # "completed" | "skipped" | "failed"
    seconds: float = 0.0
    error: str = ""
    log: Path | None = None
    note: str = ""


# ---------------------------------------------------------------------------- cell state
def expected_config(app_dir: Path, cell: Cell) -> dict:
    """The resolved run config the cell runs with (pyproject defaults + overrides)."""
    from rcsr_flower.runtime.launch import check_run_config

    return check_run_config(app_dir, [], dict(cell.overrides)).to_flower()


def config_changes(ran: dict, wanted: dict, set_by_cell: set[str]) -> list[str]:
    """Keys whose value in ``ran`` (a run's ``config.json``) differs from ``wanted``.

    Keys a resume may change (paths, timeouts) never count. A key missing from ``ran``
    (the config grew since) counts when the cell sets it, or when it is one whose default
    changed the behaviour (``BEFORE_KEY_EXISTED``: what the run did without it); otherwise
    the run used the behaviour its default now names."""
    absent = "<absent>"

    def value(k: str) -> object:
        if k in ran:
            return ran[k]
        if k in set_by_cell:
            return absent
        before = BEFORE_KEY_EXISTED.get(k, absent)
        if callable(before):  # None: the key changes nothing for such a run
            before = before(ran)
            return wanted[k] if before is None else before
        return before

    keys = (set(ran) & set(wanted)) | (set(wanted) & (set_by_cell | set(BEFORE_KEY_EXISTED)))
    return sorted(k for k in keys if k not in RESUME_MAY_CHANGE and value(k) != wanted[k])


def inspect_cell(
    cell: Cell, run_dir: Path, wanted: dict, archived: Path | None = None
) -> tuple[str, str]:
    """``(action, why)``: ``skip`` (completed with this config), ``archived`` (no run here,
    but the report's archive, ``archived``, holds a completed copy with this config:
    committed by a run on another machine or checkout), ``resume`` (an unfinished
    checkpoint with this config), ``fresh`` (nothing, or what is there cannot be used)."""
    from rcsr_flower.routing.checkpoint import CheckpointError, read_latest

    if not run_dir.exists():
        if archived is not None and _completed_with(archived, cell, wanted):
            return "archived", ""
        return "fresh", ""
    result = _read_json(run_dir / "result.json") or {}
    ran = _read_json(run_dir / "config.json")
    changed = config_changes(ran, wanted, set(cell.overrides)) if ran is not None else []
    if changed:
        return "fresh", f"run config changed ({', '.join(changed)}): running it again"
    if result.get("status") == "completed" and ran is not None:
        return "skip", ""
    try:
        latest = read_latest(run_dir)
    except CheckpointError as exc:
        return "fresh", f"unreadable checkpoint ({exc}): running it again"
    if latest is not None and latest["round"] < int(latest["config"]["num-server-rounds"]):
        return "resume", f"continuing after round {latest['round']}"
    return "fresh", "incomplete, no checkpoint to continue from: running it again"


def _completed_with(run_dir: Path, cell: Cell, wanted: dict) -> bool:
    """Whether ``run_dir`` holds a completed run of ``cell`` with the config wanted now."""
    result = _read_json(run_dir / "result.json") or {}
    ran = _read_json(run_dir / "config.json")
    return (
        result.get("status") == "completed"
        and ran is not None
        and not config_changes(ran, wanted, set(cell.overrides))
    )


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------------------- console
def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@contextlib.contextmanager
def output_to(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr to ``path`` for the duration: the file
    descriptors 1 and 2 (so also what its subprocesses print) and ``sys.stdout``/``stderr``
    (whatever they are, e.g. a test's capture)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with (
            open(path, "a", buffering=1) as fh,
            contextlib.redirect_stdout(fh),
            contextlib.redirect_stderr(fh),
        ):
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def shown(path: Path) -> str:
    """``path`` relative to the cwd when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------- the suite
def default_launcher(app_dir: Path, flwr_home: Path, timeout: float):
    from rcsr_flower.runtime.launch import SimulationLauncher

    return SimulationLauncher(app_dir=app_dir, flwr_home=flwr_home, timeout=timeout)


def run_suite(
    suite: Suite,
    cells: list[Cell],
    app_dir: Path,
    root: Path,
    flwr_home: Path,
    console: TextIO | None = None,
    make_launcher: Callable = default_launcher,
    archive: Path | None = None,
) -> list[Outcome]:
    """Run ``cells`` (already checked with :meth:`Suite.check`) one after another into
    ``root/<setting>/<method>/seed-<k>``; return one :class:`Outcome` per cell.

    ``archive``: the report's copy of completed cells (``docs/results/<suite>/cells``):
    a cell with no run under ``root`` but a completed archived copy with the same config
    is not run again, so a suite spread over machines or checkouts continues from what
    was committed."""
    console = console or sys.stdout
    app_dir, root = app_dir.resolve(), root.resolve()
    launcher = None
    outcomes: list[Outcome] = []
    ran_seconds: list[float] = []

    def say(text: str, end: str = "\n") -> None:
        console.write(text + end)
        console.flush()

    plan = []
    for cell in cells:
        run_dir = cell.directory(root)
        wanted = expected_config(app_dir, cell)
        archived = cell.directory(archive) if archive is not None else None
        plan.append((cell, run_dir, *inspect_cell(cell, run_dir, wanted, archived)))
    done_already = ("skip", "archived")
    to_run = sum(action not in done_already for *_, action, _ in plan)
    started = time.monotonic()
    say(
        f"suite {suite.name}: {len(cells)} cells, {to_run} to run, "
        f"{len(cells) - to_run} already completed; outputs in {shown(root)}"
    )
    try:
        for index, (cell, run_dir, action, why) in enumerate(plan, 1):
            left = len(cells) - index
            head = f"[{index:>{len(str(len(cells)))}}/{len(cells)}] {cell.id} · {left} left"
            if action == "skip":
                outcomes.append(Outcome(cell, "skipped", log=run_dir / LOG))
                say(f"{head} · already completed, skipped")
                continue
            if action == "archived":
                outcomes.append(Outcome(cell, "skipped", note="archived"))
                say(f"{head} · completed in the report's archive, skipped")
                continue
            remaining_runs = sum(a not in done_already for *_, a, _ in plan[index - 1 :])
            eta = (
                duration(remaining_runs * sum(ran_seconds) / len(ran_seconds))
                if ran_seconds
                else "?"
            )
            say(f"{head} · elapsed {duration(time.monotonic() - started)} · ETA {eta}", end="")
            if action == "fresh" and run_dir.exists():
                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            log = run_dir / LOG
            t0 = time.monotonic()
            with output_to(log):
                print(f"=== {cell.id}: {action}{f' ({why})' if why else ''}", flush=True)
                try:
                    if launcher is None or launcher.process is None:
                        launcher = make_launcher(app_dir, flwr_home, suite.timeout)
                        launcher.start()
                    elif not launcher.alive():  # the SuperLink or the Ray cluster died
                        launcher.stop()
                        launcher.start()
                    launcher.num_supernodes = cell.num_supernodes
                    launcher.run_config = dict(cell.overrides)
                    if action == "resume":
                        launcher.run_config["resume-from"] = str(run_dir)
                    result = launcher.run(run_dir.name, run_dir.parent)
                except Exception as exc:  # the SuperLink would not start, ...
                    result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                if result.get("status") != "completed":
                    print(f"=== {cell.id} FAILED: {result.get('error')}", flush=True)
            seconds = time.monotonic() - t0
            ran_seconds.append(seconds)
            if result.get("status") == "completed":
                provenance.record(run_dir, app_dir)
                final = (result.get("final_global") or {}).get("rsum")
                rsum = f", final global rsum {final:.1f}" if isinstance(final, float) else ""
                outcomes.append(Outcome(cell, "completed", seconds, log=log, note=why))
                say(f" · completed in {duration(seconds)}{rsum}")
            else:
                error = str(result.get("error", "unknown error")).splitlines()[0]
                outcomes.append(Outcome(cell, "failed", seconds, error, log))
                say(f" · FAILED in {duration(seconds)}: {error} (log: {shown(log)})")
    finally:
        if launcher is not None:
            launcher.stop()
    failed = [o for o in outcomes if o.status == "failed"]
    done = len(outcomes) - len(failed)
    say(
        f"suite {suite.name}: {done}/{len(cells)} cells completed "
        f"({sum(o.status == 'skipped' for o in outcomes)} already were) "
        f"in {duration(time.monotonic() - started)}"
        + (f"; {len(failed)} failed:" if failed else "")
    )
    for o in failed:
        say(f"  {o.cell.id}: {o.error} (log: {shown(o.log)})")
    return outcomes
