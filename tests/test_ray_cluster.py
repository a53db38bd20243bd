"""Flower's simulation on a Ray cluster of several nodes: the launcher with ``RAY_ADDRESS``.

A user with a multi-node Ray cluster points the launcher at it (docs/reproducing.md, "A
Ray cluster beyond one machine"). Here the cluster is two Ray nodes on this machine, a
head and a node joined to it, each with one CPU, so a run with one CPU per client has
one simulation actor on each node. The cluster is started with ``ray start`` on ports
of its own (another cluster on the same machine never clashes with it) and a Ray temp
directory of its own, every daemon carrying a tag of its own in its environment, so the
test stops all it started by PID (``rcsr_flower.runtime.processes``), also when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rcsr_flower.runtime.launch import SimulationLauncher, free_port
from rcsr_flower.runtime.processes import (
    TAG_VAR,
    live_processes,
    new_tag,
    process_start,
    stop_tagged,
    tagged_pids,
    track,
)

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def alive(pid: int, start: str) -> bool:
    """``pid`` still runs, the same process (its start time), and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return stat[0] != "Z" and stat[19] == start


@dataclass
class RayCluster:
    """Ray nodes started with ``ray start`` on this machine, one CPU each."""

    log_dir: Path
    tag: str = field(default_factory=new_tag)
    port: int = field(default_factory=free_port)
    temp_dirs: list[str] = field(default_factory=list)
    seen: set[tuple[int, str]] = field(default_factory=set)  # (pid, start) of its processes

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env[TAG_VAR] = self.tag
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env["RAY_prestart_worker_first_driver"] = "0"  # as the launcher's own cluster
        return env

    def start_node(self, head: bool) -> None:
        """``ray start`` with every port whose default is fixed given a free one (the GCS
        6379, the client server 10001, the API server 8265, the dashboard agent 52365),
        workers on ports the system picks (the default range 10002-19999 is every
        cluster's), the other ports picked at random by Ray; a temp dir of its own (never
        ``/tmp/ray``, whose ``ray_current_cluster`` other runs would read), a short one:
        Ray's socket paths must stay under 108 characters."""
        temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        cmd = [RAY, "start", "--num-cpus", "1", "--num-gpus", "0", "--temp-dir", temp_dir]
        cmd += ["--dashboard-agent-listen-port", str(free_port())]
        cmd += ["--min-worker-port", "0", "--max-worker-port", "0"]
        cmd += ["--object-store-memory", str(200 * 2**20), "--disable-usage-stats"]
        if head:
            cmd += ["--head", "--port", str(self.port), "--include-dashboard", "false"]
            cmd += ["--ray-client-server-port", str(free_port())]
            cmd += ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(free_port())]
        else:
            cmd += ["--address", self.address]
        log = self.log_dir / f"ray-start-{len(self.temp_dirs)}.log"
        with open(log, "ab") as out:
            # a session of its own, which the daemons it leaves behind stay in: stop_tagged
            # stops the whole session (Ray's agents rename themselves over their environment)
            process = subprocess.Popen(
                cmd, env=self.env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        track(self.tag, process)  # stopped at exit or on a signal too
        code = process.wait(timeout=600)
        assert code == 0, f"{' '.join(cmd)} exited {code}:\n{log.read_text()[-3000:]}"

    def record(self) -> None:
        """Remember every process in the sessions of the cluster's tagged processes."""
        processes = live_processes(self.tag)
        sessions = {s for _, s, tagged in processes if tagged and s != os.getsid(0)}
        for pid, session, tagged in processes:
            if (tagged or session in sessions) and (start := process_start(pid)):
                self.seen.add((pid, start))

    def left(self, wait: float = 60) -> dict[int, str]:
        """Of the processes recorded, those still running after up to ``wait`` seconds
        (on a loaded machine a killed process can take a moment to exit, after
        ``stop_tagged`` found it gone from ``/proc``), with their state and command."""
        deadline = time.monotonic() + wait
        while (running := [p for p, start in self.seen if alive(p, start)]) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.5)
        found = {}
        for pid in running:
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                found[pid] = f"{state} {command.decode(errors='replace')[:200]}"
        return found

    def state(self) -> tuple[list[dict], list[dict]]:
        """The cluster's nodes and actors (dead ones too) as its GCS records them, what
        ``ray.nodes()`` reads in a driver. Ray's state API (``ray.util.state``, ``ray list
        actors``) is served by the dashboard's HTTP server, which needs ray[default]'s
        dashboard packages (``aiohttp_cors``), not installed with Flower's simulation
        extra."""
        from ray._private.state import GlobalState
        from ray._raylet import GcsClientOptions

        state = GlobalState()
        state._initialize_global_state(
            GcsClientOptions.create(
                self.address, None, allow_cluster_id_nil=True, fetch_cluster_id_if_nil=False
            )
        )
        try:
            return state.node_table(), list(state.actor_table(None).values())
        finally:
            state.disconnect()

    def wait_for_nodes(self, count: int, timeout: float = 300) -> set[str]:
        """The ids of the cluster's alive nodes once there are ``count``."""
        deadline = time.monotonic() + timeout
        while True:
            alive_nodes = {n["NodeID"] for n in self.state()[0] if n["Alive"]}
            if len(alive_nodes) >= count or time.monotonic() > deadline:
                return alive_nodes
            time.sleep(1)

    def stop(self) -> None:
        stop_tagged(self.tag)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def ray_cluster(log_dir: Path, nodes: int) -> Iterator[RayCluster]:
    """A head and ``nodes - 1`` nodes joined to it; everything stopped on the way out."""
    cluster = RayCluster(log_dir)
    try:
        for n in range(nodes):
            cluster.start_node(head=n == 0)
        cluster.record()
        yield cluster
    finally:
        cluster.record()
        cluster.stop()


# the embedded default, shrunk: one round, about 400 items a client, a small test split
RUN = {
    "num-server-rounds": 1,
    "train-max-items": 800,
    "eval-max-images": 100,
    "partition-clusters": 8,
    "batch-size": 32,
    "fraction-train": 1.0,
}


def launch(tmp_path: Path, embedded_assets, name: str, env: dict[str, str]):
    """The app through the launcher: 2 SuperNodes, one CPU per simulation actor. Each run
    has a cache of its own (partition, clients' data, zero-shot results: a run reads
    nothing another computed) holding the embedded assets, shared read-only."""
    cache = tmp_path / f"cache-{name}"
    cache.mkdir()
    (cache / embedded_assets.root.name).symlink_to(embedded_assets.root)
    launcher = SimulationLauncher(
        app_dir=ROOT,
        flwr_home=tmp_path / f"flwr-{name}",
        num_supernodes=2,
        cpus_per_client=1,
        run_config={"cache-dir": str(cache), **RUN},
        timeout=1800,  # an upper bound for a loaded machine
        env=env,
    )
    try:
        launcher.start()
        result = launcher.run(name, tmp_path / "outputs")
    finally:
        launcher.stop()
    assert result["status"] == "completed", result.get("error")
    return launcher


def metrics(out: Path) -> list[dict]:
    """``metrics.jsonl`` without the wall clock (``seconds``: its phases are kept)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row["seconds"] = sorted(row["seconds"])
    return rows


@pytest.mark.slow
def test_a_run_on_a_two_node_ray_cluster_uses_both_nodes_and_matches_one_node(
    tmp_path, embedded_assets, monkeypatch
):
    """``RAY_ADDRESS`` names a cluster of two Ray nodes: the launcher starts no Ray of its
    own, Flower's simulation builds its actor pool over the cluster (one actor per node,
    each node having one CPU and each actor reserving one), the run completes with the
    numbers of the same run on the launcher's own one-node cluster, and stopping the
    cluster by its tag leaves none of its processes."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_cluster(tmp_path, nodes=2) as cluster:
        nodes = cluster.wait_for_nodes(2)
        assert len(nodes) == 2, nodes
        launcher = launch(tmp_path, embedded_assets, "two-nodes", {"RAY_ADDRESS": cluster.address})
        assert not launcher.ray_head and launcher.ray_port is None  # no cluster of its own
        node_table, actors = cluster.state()
        cluster.record()
    assert len(node_table) == 2 and {n["NodeID"] for n in node_table if n["Alive"]} == nodes
    flower = [a for a in actors if a["ActorClassName"] == "ClientAppActor"]
    assert len(flower) == 2, actors
    assert {a["Address"]["NodeID"] for a in flower} == nodes  # one on each node
    # stopped by its tag: nothing of the cluster runs on, renamed agents included
    assert not tagged_pids(cluster.tag)
    assert cluster.seen
    assert not (left := cluster.left()), left
    assert not any(Path(d).exists() for d in cluster.temp_dirs)

    one = launch(tmp_path, embedded_assets, "one-node", {})
    assert one.ray_head  # no RAY_ADDRESS: the launcher's own cluster, one node
    two_rows = metrics(tmp_path / "outputs" / "two-nodes")
    assert [r["round"] for r in two_rows] == [0, 1]
    assert two_rows == metrics(tmp_path / "outputs" / "one-node")
