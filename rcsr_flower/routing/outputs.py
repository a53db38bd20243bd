"""``outputs/<run-name>/``: what a run leaves for people to read and for tests to check.

- ``config.json``: the resolved run config;
- ``partition.json``: who holds what (clients, modalities, indices);
- ``metrics.jsonl``: one JSON object per evaluated round (``{"round": r, "global": {...}}``,
  recalls in percent), appended and flushed as the run goes, so nothing computed is lost;
- ``checkpoint/``: the state after the last complete round (``rcsr_flower.routing.checkpoint``);
- ``result.json``: ``{"status": "completed" | "failed", ...}`` written last — ``flwr run``
  exits 0 even when the ServerApp failed, so callers check this file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def resolve_output_path(path: str) -> Path:
    """A relative path is taken from ``$RCSR_OUTPUT_ROOT`` (set by the Makefile to the
    project root) or the cwd: the ServerApp's cwd is not the checkout."""
    base = Path(path).expanduser()
    if not base.is_absolute():
        base = Path(os.environ.get("RCSR_OUTPUT_ROOT", os.getcwd())) / base
    return base


def run_dir(output_dir: str, run_name: str) -> Path:
    """Resolve and create ``output-dir``/``run-name`` (a timestamp when unnamed)."""
    path = resolve_output_path(output_dir) / (run_name or time.strftime("run-%Y%m%d-%H%M%S"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def durable_replace(tmp: Path, final: Path) -> None:
    """Rename a fully written ``tmp`` onto ``final``, both on disk before returning: for
    state a resume depends on (a crash or power loss leaves the old file or the new one)."""
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_cache_file(path: Path, write: Callable[[Path], Any], what: str) -> None:
    """A cache file (a node's client data or prefixes, a zero-shot result): ``write`` fills
    a temporary sibling, which is renamed into place, so a reader sees a whole file or
    none. A full or read-only disk costs speed, not the round: it is logged and the file
    is skipped."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        tmp.chmod(0o644)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("could not cache %s in %s: %s", what, path, exc)
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Collects one round's record from several strategy hooks, then appends it.

    It starts the file afresh with ``rows``: nothing for a new run, the checkpoint's
    rows for a resumed one — so rows of a round that was cut short never stay behind.
    """

    def __init__(self, path: Path, rows: list[dict[str, Any]] | None = None) -> None:
        self.path = path
        self.pending: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()  # the central evaluation adds its fields from a thread
        self.rows: list[dict[str, Any]] = list(rows or [])
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows))
        os.replace(tmp, path)

    def add(self, server_round: int, **fields: Any) -> None:
        with self._lock:
            self.pending.setdefault(server_round, {"round": server_round}).update(fields)

    def flush(self, server_round: int) -> None:
        with self._lock:
            row = self.pending.pop(server_round, None)
        if row is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.rows.append(row)


def metrics_differences(
    ours: list[dict[str, Any]], reference: list[dict[str, Any]], tolerance: float = 0.2
) -> list[str]:
    """Where two runs' ``metrics.jsonl`` rows differ, one line each: the same rounds,
    every field but the wall-clock ``seconds`` equal, numbers within ``tolerance`` (a
    retrieval hit more or fewer moves a recall by 0.1, so 0.2 rsum tells a changed
    computation from float noise across machines)."""
    out: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key == "seconds":
                    continue
                if key not in a or key not in b:
                    out.append(f"{where}.{key}: only in {'the reference' if key in b else 'ours'}")
                else:
                    walk(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and not (isinstance(a, bool) or isinstance(b, bool))
        ):
            if abs(a - b) > tolerance:
                out.append(f"{where}: {a!r} vs {b!r} in the reference")
        elif a != b:
            out.append(f"{where}: {a!r} vs {b!r} in the reference")

    rounds_a = {r["round"]: r for r in ours}
    rounds_b = {r["round"]: r for r in reference}
    if set(rounds_a) != set(rounds_b):
        out.append(f"rounds {sorted(rounds_a)} vs {sorted(rounds_b)} in the reference")
    for rnd in sorted(set(rounds_a) & set(rounds_b)):
        walk(rounds_a[rnd], rounds_b[rnd], f"round {rnd}")
    return out
