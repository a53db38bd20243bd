"""Nothing keeps running when a run is cut short: a launcher's process told to stop
(SIGTERM from a CI timeout, SIGINT from Ctrl-C) in the middle of a real run stops the
SuperLink, the SuperNodes and everything Flower and Ray started under them.

Each case runs, in a child process, what a test or ``make run`` runs, with a marker
variable in its environment that every process it starts inherits; once the run is
under way the child gets the signal, and afterwards no process may carry the marker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A test's body: a secure deployment with a run in flight, no try/finally (a SIGTERM
# kills a test process before any finally runs).
DEPLOY = r"""
import sys
from pathlib import Path
from rcsr_flower.runtime.deploy import LocalDeployment

root = Path(sys.argv[1])
d = LocalDeployment(app_dir=Path(sys.argv[2]), root=root / "deploy", num_supernodes=2,
                    num_partitions=20, run_config={"partitioning": "iid"}, timeout=3600)
d.start()
d.start_run("interrupted", root / "outputs")
d.wait_run("interrupted", root / "outputs")
"""

# What tests/test_integration.py does: a simulation in try/finally.
SIMULATION = r"""
import sys
from pathlib import Path
from rcsr_flower.runtime.launch import SimulationLauncher

root = Path(sys.argv[1])
launcher = SimulationLauncher(app_dir=Path(sys.argv[2]), flwr_home=root / "flwr",
                              num_supernodes=2, prepare=False, timeout=3600,
                              run_config={"partitioning": "iid"})
try:
    launcher.start()
    launcher.run("interrupted", root / "outputs")
finally:
    launcher.stop()
"""


def marked(marker: str) -> list[str]:
    """``pid command`` of every live process whose environment holds ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        if f"RCSR_TEST_MARKER={marker}".encode() in environ.split(b"\0"):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name} {command}")
    return found


def under_way(tmp_path: Path, kind: str) -> bool:
    """The run is in flight: a node got a message (deployment), or Ray's workers are up
    beside a running ServerApp (simulation)."""
    if kind == "deploy":
        logs = list((tmp_path / "deploy").glob("node-*.log"))
        return any("Receiving: " in p.read_text(errors="replace") for p in logs)
    result = tmp_path / "outputs" / "interrupted" / "result.json"
    return result.is_file() and '"running"' in result.read_text()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
@pytest.mark.parametrize(
    ("kind", "sig"), [("deploy", signal.SIGTERM), ("simulation", signal.SIGINT)]
)
def test_an_interrupted_run_leaves_no_process(tmp_path, kind, sig):
    marker = uuid.uuid4().hex
    script = DEPLOY if kind == "deploy" else SIMULATION
    env = {**os.environ, "RCSR_TEST_MARKER": marker, "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path), str(ROOT)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the signal goes to the launcher's process only
    )
    try:
        deadline = time.monotonic() + 600  # a loaded machine starts Flower slowly
        while not under_way(tmp_path, kind):
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run never got under way"
            time.sleep(1)
        time.sleep(3)  # mid-way: more of the run's processes are up
        started = marked(marker)
        assert len(started) >= 3, started  # the launcher, a SuperLink, more under it
        child.send_signal(sig)
        child.wait(timeout=180)
        left = marked(marker)
        deadline = time.monotonic() + 30  # SIGKILLed processes vanish from /proc
        while left and time.monotonic() < deadline:
            time.sleep(1)
            left = marked(marker)
        assert not left, left
    finally:
        for line in marked(marker):  # never leave them behind, whatever happened above
            os.kill(int(line.split()[0]), signal.SIGKILL)
        if child.poll() is None:
            child.kill()
            child.wait()
