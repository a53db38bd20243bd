"""A Ray cluster that outlives the runs of one launcher.

Flower's simulation starts a Ray cluster for every run (``ray.init()``: the GCS, a
raylet, the dashboard and runtime-env agents, the log monitor: a few seconds on 2 cores)
and stops it when the run ends (part of the 3 s between the ServerApp's return and the
run's end). A launcher (:class:`rcsr_flower.runtime.launch.SimulationLauncher`) starts this
process beside its SuperLink, so the cluster comes up while the SuperLink, ``flwr run``
and the simulation process start, and points every run at it with ``RAY_ADDRESS``:
``ray.init`` then only connects (0.6 s) and ``ray.shutdown`` only disconnects. An
experiment suite, which runs its federations through one launcher, pays the start-up
once. Each run is still a Ray job of its own: its runtime environment, its actors and
their worker processes, which Ray stops when the run's driver leaves.

The cluster is started the way ``ray start --head`` starts one, a head node with no
driver of its own, less the autoscaler's monitor (0.05 GB), which a fixed cluster on one
machine never uses, and less the Ray client server ``ray start`` adds (0.1 GB). Once it
is up this process replaces itself with a bare interpreter that only waits
(``os.execv``: same pid, same process group), so the Python that imported Ray (0.06 GB)
does not stay either.

    RAY_GCS_SERVER_PORT=<port> python -m rcsr_flower.runtime.ray_head READY_FILE

Writes ``{"gcs_address", "session_dir"}`` (JSON) to ``READY_FILE`` once the cluster is
up. Stop it with SIGTERM, then SIGKILL, to its process group, which Ray's processes share
(the GCS and the raylet outlast a SIGTERM by seconds).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# the command line the waiting process keeps: found by it in `ps` and by role() in
# benchmarks/memory.py
WAITER = "rcsr-ray-head"


def start_cluster() -> dict[str, str]:
    """A head node on this machine; its ``gcs_address`` and ``session_dir``.

    ``Node`` and ``RayParams`` are what ``ray start`` and ``ray.init`` use (Ray keeps
    them in ``ray._private``; Flower pins the Ray version). The GCS port is the one the
    environment's ``RAY_GCS_SERVER_PORT`` names: the address the launcher gave the runs
    before the cluster was up."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    params = RayParams(include_dashboard=False, no_monitor=True)
    # shutdown_at_exit/spawn_reaper False: the processes outlive this one's exec
    node = Node(params, head=True, shutdown_at_exit=False, spawn_reaper=False)
    info = node.address_info
    return {k: info[k] for k in ("gcs_address", "session_dir")}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rcsr_flower.runtime.ray_head READY_FILE", file=sys.stderr)
        return 2
    ready = Path(args[0])
    info = start_cluster()
    tmp = ready.with_name(ready.name + ".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(ready)
    sys.stdout.flush()
    sys.stderr.flush()
    # wait without Ray's modules in memory: SIGTERM's default action ends the waiter
    os.execv(
        sys.executable,
        [sys.executable, "-S", "-c", "import signal; signal.pause()", WAITER, str(ready)],
    )
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
