"""What Flower costs on top of the client work: one federation in-process vs `flwr run`.

Runs the embedded default federation (or any `-c` overrides) with the same code:

- **plain**: the ServerApp's `run_server` and the ClientApp's handlers (`client_app.py`)
  in this one process, messages handed from one to the other by :class:`InProcessGrid`
  (no SuperLink, no Ray, no serialisation, no process start-up), each client's work on
  one torch thread as in a Flower actor (`client-resources-num-cpus=1`) and with its own
  global RNG streams as in its own process: the same arithmetic, so the metrics must
  come out identical (`same_metrics`);
- **plain_all_cores**: the same loop with every core on each client's work, the fastest
  way to do it by hand here (float sums in another order: metrics differ in the last
  digits);
- **flower**: `python -m rcsr_flower.runtime.launch`'s path, a private SuperLink in simulation
  mode with 10 SuperNodes (`make run`).

Same clients, rounds, seeds and sampling (nodes in partition order). Assets and the
partition are prepared first and not timed; the zero-shot memo (``zero-shot-cache``) is
off, so that every run computes round 0 and the bootstrap.

    .venv/bin/python benchmarks/round_overhead.py [-c "num-server-rounds=2"]

Ends with one JSON line: {"plain_s", "plain_all_cores_s", "flower_s", "ratio" (flower /
plain), "ratio_all_cores" (flower / plain_all_cores), "same_metrics", ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import tempfile
import time
import tomllib
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # client_app.py, server_app.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@contextlib.contextmanager
def own_process_rngs():
    """Run a client handler as if in its own process: whatever it draws from the global
    torch, numpy and Python RNGs is not drawn from the ServerApp's streams (the router's
    dropout draws from torch's), as in a Ray actor or a deployed ClientApp."""
    import numpy as np
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class InProcessGrid:
    """The part of Flower's ``Grid`` the ServerApp uses, answered by calling the
    ClientApp's handlers in this process, one ``Context`` (and ``state``) per node."""

    def __init__(self, run_config: dict, num_nodes: int, client_threads: int) -> None:
        from flwr.app import Context, RecordDict

        self.client_threads = client_threads
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for i in range(num_nodes)
        }
        self._next_id = 0

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Error, Message

        import client_app
        from rcsr_flower.backbones.clip import torch_threads

        handlers = {"train": client_app.train, "evaluate": client_app.evaluate}
        replies = []
        for msg in messages:
            self._next_id += 1
            msg.metadata.__dict__["_message_id"] = f"in-process-{self._next_id}"
            handler = handlers.get(msg.metadata.message_type, client_app.query)
            try:
                with torch_threads(self.client_threads), own_process_rngs():
                    replies.append(handler(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                replies.append(Message(Error(code=0, reason=reason), reply_to=msg))
        return replies


def run_plain(run_config: dict, num_nodes: int, client_threads: int) -> float:
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from rcsr_flower.server.app import run_server

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # Message()
    grid = InProcessGrid(run_config, num_nodes, client_threads)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
    )
    started = time.perf_counter()
    run_server(grid, context)
    return time.perf_counter() - started


def final_metrics(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    return {
        "global_rsum": round(last["global"]["rsum"], 4),
        "personalized_rsum": round(last["personalized"]["mean"]["rsum"], 4),
        "seconds": [r.get("seconds", {}).get("round") for r in rows],
    }


def main() -> None:
    from flwr.common.config import parse_config_args

    from rcsr_flower.backbones.clip import available_cores
    from rcsr_flower.runtime.launch import (
        SimulationLauncher,
        check_run_config,
        flower_env,
        prepare_run,
    )

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-c", "--run-config", action="append", default=[])
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--output-dir", default=None, help="default: a temporary directory")
    args = parser.parse_args()
    out = Path(args.output_dir or tempfile.mkdtemp(prefix="round-overhead-")).resolve()
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # each run computes round 0 and the bootstrap itself: with the memo, whichever ran
    # first would fill it for the others (-c "zero-shot-cache=true" to time it on)
    overrides = {"zero-shot-cache": False, **parse_config_args(args.run_config)}

    runs = {}
    kinds = {"plain": 1, "plain_all_cores": available_cores(), "flower": None}
    for kind, client_threads in kinds.items():
        run_config = {**table, **overrides, "run-name": kind, "output-dir": str(out)}
        cfg = check_run_config(ROOT, [], run_config)
        prepare_run(cfg, args.num_supernodes, flower_env(out / "flwr"))  # not timed
        if client_threads is not None:
            runs[kind] = run_plain(run_config, args.num_supernodes, client_threads)
            continue
        launcher = SimulationLauncher(
            app_dir=ROOT,
            flwr_home=out / "flwr",
            num_supernodes=args.num_supernodes,
            run_config={**overrides},
            timeout=3600,
            prepare=False,
        )
        started = time.perf_counter()
        try:
            launcher.start()
            result = launcher.run(kind, out)
        finally:
            launcher.stop()
        runs[kind] = time.perf_counter() - started
        if result.get("status") != "completed":
            sys.exit(f"the flwr run failed: {result.get('error')}")
    finals = {kind: final_metrics(out / kind) for kind in kinds}

    def same(a: str, b: str) -> bool:
        drop = {"seconds"}
        return {k: v for k, v in finals[a].items() if k not in drop} == {
            k: v for k, v in finals[b].items() if k not in drop
        }

    print(
        json.dumps(
            {
                "plain_s": round(runs["plain"], 1),
                "plain_all_cores_s": round(runs["plain_all_cores"], 1),
                "flower_s": round(runs["flower"], 1),
                "ratio": round(runs["flower"] / runs["plain"], 3),
                "ratio_all_cores": round(runs["flower"] / runs["plain_all_cores"], 3),
                "same_metrics": same("plain", "flower"),
                "same_metrics_all_cores": same("plain_all_cores", "flower"),
                **finals,
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "output_dir": str(out),
            }
        )
    )


if __name__ == "__main__":
    main()
