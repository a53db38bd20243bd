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

    RAY_ADDRESS=local RAY_GCS_SERVER_PORT=<port> python -m rcsr_flower.runtime.ray_head READY_FILE

Writes ``{"gcs_address", "session_dir"}`` (JSON) to ``READY_FILE`` once the cluster is
up. Stop it with SIGTERM to its process group, which Ray's processes share.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rcsr_flower.runtime.ray_head READY_FILE", file=sys.stderr)
        return 2
    ready = Path(args[0])
    import ray

    # the launcher sets RAY_ADDRESS=local (a new cluster, never someone else's) and
    # RAY_GCS_SERVER_PORT (the address it gave the SuperLink before this one was up)
    context = ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    # after ray.init, whose handler reports SIGTERM as a crash. The launcher signals the
    # whole process group, where Ray's processes are too: leaving at once is enough
    # (ray.shutdown() would wait 9 s for processes that are already stopping)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    info = context.address_info
    tmp = ready.with_name(ready.name + ".tmp")
    tmp.write_text(json.dumps({k: info[k] for k in ("gcs_address", "session_dir")}))
    tmp.replace(ready)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
