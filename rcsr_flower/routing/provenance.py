"""Where a run's numbers came from: the commit and the machine, written beside its outputs.

``provenance.json`` is written by the launchers (``rcsr_flower.runtime.launch``,
``rcsr_flower.experiments``) after a run, so every figure and table drawn from the run
later can say which code and which machine produced it, whatever checkout draws it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

FILE = "provenance.json"


def commit(repo: Path, ignore: tuple[str, ...] = ()) -> str:
    """``git`` short hash of ``repo``'s HEAD, ``+dirty`` when tracked files differ from it
    (changes under the ``ignore`` paths, relative to ``repo``, aside: a recorder's own
    outputs); ``unknown`` outside a git checkout."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )

    try:
        head = git("rev-parse", "--short=10", "HEAD")
        if head.returncode != 0:
            return "unknown"
        spec = [f":(top,exclude){path}" for path in ignore]
        dirty = git("diff", "--quiet", "HEAD", "--", *spec).returncode != 0
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU count and model, accelerator, torch build, OS."""
    import torch

    if torch.cuda.is_available():
        accel = f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    else:
        accel = "no GPU"
    return (
        f"{os.cpu_count()}-core {cpu_name()} CPU, {accel}, torch {torch.__version__}, "
        f"{platform.system()} {platform.machine()}"
    )


def load_1m() -> float | None:
    """The machine's 1-minute load average (None where the OS has none): what else the
    machine was doing while a run's seconds were measured."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def record(run_dir: Path, repo: Path) -> dict:
    """Write ``run_dir/provenance.json`` (commit of ``repo``, machine) and return it.

    The machine is the one the ServerApp put in ``result.json`` (``RoutedRun.complete``)
    where there is one, so a launcher never imports torch for it; else this process's.
    The machine's load at the run's start and end (``load_avg_1m``) comes from there too:
    a figure's seconds mean little without it."""
    reported = _reported(run_dir)
    name = reported.get("machine")
    info: dict = {
        "commit": commit(repo),
        "machine": name if isinstance(name, str) and name else machine(),
    }
    if isinstance(reported.get("load_avg_1m"), dict):
        info["load_avg_1m"] = reported["load_avg_1m"]
    if run_dir.is_dir():
        (run_dir / FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _reported(run_dir: Path) -> dict:
    try:
        value = json.loads((run_dir / "result.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
