"""Stopping what a launcher started: by its tag, and by the sessions its tagged processes
run in, because some of them (Ray's agents) rename themselves over the memory that
``/proc/PID/environ`` reads and no longer show the tag."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Run in a session of its own (the test runner's is never ours to stop), it starts:
# a tagged session leader whose child has lost the tag (what Ray's agents look like),
# a tagged process in its own session, and two untagged bystanders (one in its own
# session, one in a new one), then stops the tag and reports who is still alive.
SCRIPT = textwrap.dedent(
    """
    import json, os, subprocess, time
    from rcsr_flower.runtime.processes import TAG_VAR, live_processes, stop_tagged

    tag = "test-" + os.urandom(4).hex()
    tagged = {**os.environ, TAG_VAR: tag}
    leader = subprocess.Popen(
        ["sh", "-c", f"env -u {TAG_VAR} sleep 60 & exec sleep 60"],
        env=tagged, start_new_session=True,
    )
    here_tagged = subprocess.Popen(["sleep", "60"], env=tagged)
    here = subprocess.Popen(["sleep", "60"])
    elsewhere = subprocess.Popen(["sleep", "60"], start_new_session=True)
    def in_session():  # the leader's untagged child
        return [p for p, s, _ in live_processes(tag) if s == leader.pid and p != leader.pid]

    deadline = time.monotonic() + 30
    while not in_session() and time.monotonic() < deadline:
        time.sleep(0.05)
    untagged_child = in_session()[0]
    stop_tagged(tag, grace=0)
    time.sleep(0.5)  # init reaps the orphan
    alive = lambda pid: pid in {p for p, _, _ in live_processes(tag)}
    print(json.dumps({
        "leader": alive(leader.pid), "untagged child": alive(untagged_child),
        "tagged, our session": alive(here_tagged.pid), "untagged, our session": alive(here.pid),
        "untagged, other session": alive(elsewhere.pid),
    }))
    for p in (here, elsewhere):
        p.kill()
    """
)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_stopping_a_tag_takes_its_sessions_and_leaves_everything_else():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "leader": False,
        "untagged child": False,  # no tag, but in a tagged process's session
        "tagged, our session": False,
        "untagged, our session": True,  # the caller's own session is never swept
        "untagged, other session": True,
    }
