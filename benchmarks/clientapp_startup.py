"""What a fresh ClientApp process costs before it can work on a message.

In a deployment every message starts a new ClientApp process (Flower 1.41+), so these
costs are paid per message, per node. Two ways, each a fresh interpreter per repetition
that does what ``client_app.py`` does:

- **in process** (a SuperNode without ``worker-idle-s``): import the app, load the
  backbone and this node's data; the first repetition starts with no cached client data
  (decode + preprocess every image of the partition), the others read the node's disk
  cache (``<cache-dir>/client-data/``);
- **node worker** (``worker-idle-s`` set, ``rcsr_flower.client.node_worker``): import the app
  (no torch), hand a describe query (backbone and data in hand) to the node's worker; the
  first repetition starts the worker, the others find it warm.

A node's log shows the same phases for real messages, plus Flower's own dispatch.
The last line is its JSON; ``startup_s`` is the warm-worker median, the
deployment default of ``rcsr_flower.runtime.deploy``.

    .venv/bin/python benchmarks/clientapp_startup.py --num-partitions 2 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import client_app  # flwr and the app; a handler imports the project (torch) when called
import tomllib
from rcsr_flower.embedded.assets import load_model
from rcsr_flower.client.handlers import setup  # what the first handler imports
from rcsr_flower.runtime.processes import process_age
from rcsr_flower.config import RunConfig
from rcsr_flower.client.data import load_client_data
t1 = time.perf_counter()

raw = tomllib.loads(open("pyproject.toml").read())["tool"]["flwr"]["app"]["config"]
raw.update(json.loads(sys.argv[1]))
cfg = RunConfig.from_flower(raw)
t2 = time.perf_counter()
backbone = load_model(cfg.model_name, cache_dir=cfg.cache_dir or None)
t3 = time.perf_counter()
data = load_client_data(cfg, backbone, int(sys.argv[2]), int(sys.argv[3]))
t4 = time.perf_counter()
print(json.dumps({
    "interpreter": round(process_age() - (t4 - t0), 2),
    "import": round(t1 - t0, 2),
    "backbone": round(t3 - t2, 2),
    "data": round(t4 - t3, 2),
    "total": round(process_age(), 2),
    "items": len(data.train) + len(data.test),
}))
"""


WORKER_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import client_app  # flwr and the app, not torch
import tomllib
from flwr.app import ConfigRecord, Context, RecordDict
from rcsr_flower.runtime.processes import process_age
t1 = time.perf_counter()
raw = tomllib.loads(open("pyproject.toml").read())["tool"]["flwr"]["app"]["config"]
raw.update(json.loads(sys.argv[1]))
node = {"partition-id": int(sys.argv[2]), "num-partitions": int(sys.argv[3]),
        "worker-idle-s": 120}
ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=raw)
out = client_app.reply("query", RecordDict({"config": ConfigRecord({})}), ctx)
t2 = time.perf_counter()
print(json.dumps({
    "import": round(t1 - t0, 2),
    "worker": round(t2 - t1, 2),
    "total": round(process_age(), 2),
    "items": int(out["metrics"]["num-train"] + out["metrics"]["num-test"]),
    "torch imported": "torch" in sys.modules,
}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-partitions", type=int, default=2)
    parser.add_argument("--partition-id", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "-c", "--run-config", default='{"partitioning": "iid"}', help="JSON overrides"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    import tomllib

    from rcsr_flower.client.data import client_cache_path
    from rcsr_flower.config import RunConfig
    from rcsr_flower.embedded.assets import load_model
    from rcsr_flower.federation import load_partition, partition_key

    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    raw.update(json.loads(args.run_config))
    cfg = RunConfig.from_flower(raw)
    backbone = load_model(cfg.model_name, cache_dir=cfg.cache_dir or None)
    load_partition(cfg, backbone, args.num_partitions)  # computed once, not timed
    key = partition_key(cfg, backbone, args.num_partitions)
    client_cache_path(cfg, backbone, key, args.partition_id).unlink(missing_ok=True)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    ids = [str(args.partition_id), str(args.num_partitions)]

    def fresh(code: str, extra_env: dict[str, str] | None = None) -> dict:
        out = subprocess.run(
            [sys.executable, "-c", code, args.run_config, *ids],
            cwd=ROOT,
            env={**env, **(extra_env or {})},
            capture_output=True,
            text=True,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    rows = []
    for i in range(args.repeats):
        row = fresh(CHILD)
        row["client data"] = "preprocessed" if i == 0 else "disk cache"
        rows.append(row)
        print(json.dumps({"mode": "in process", **row}), flush=True)

    home = Path(tempfile.mkdtemp(prefix="cs"))  # this benchmark's own node worker
    worker_rows = []
    try:
        for i in range(args.repeats + 1):
            row = fresh(WORKER_CHILD, {"XDG_RUNTIME_DIR": str(home)})
            row["node worker"] = "started" if i == 0 else "warm"
            worker_rows.append(row)
            print(json.dumps({"mode": "node worker", **row}), flush=True)
    finally:
        for log in home.glob("*/*.log"):
            for pid in re.findall(r"node worker (\d+) listening", log.read_text()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGTERM)
        shutil.rmtree(home, ignore_errors=True)

    warm = rows[1:] or rows
    warm_worker = worker_rows[1:]
    print(
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"{rows[0]['items']} items; cold data {rows[0]['data']} s; in process, warm median: "
        + ", ".join(
            f"{k} {statistics.median(r[k] for r in warm):.2f} s"
            for k in ("interpreter", "import", "backbone", "data", "total")
        )
        + f"; node worker: first message {worker_rows[0]['total']:.2f} s, then median "
        + ", ".join(
            f"{k} {statistics.median(r[k] for r in warm_worker):.2f} s"
            for k in ("import", "worker", "total")
        )
    )
    # the headline figure, last
    print(
        json.dumps(
            {
                "startup_s": round(statistics.median(r["total"] for r in warm_worker), 2),
                "worker_start_s": worker_rows[0]["total"],
                "in_process_s": round(statistics.median(r["total"] for r in warm), 2),
                "repeats": len(warm_worker),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
