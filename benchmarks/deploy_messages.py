"""What each message costs a deployed node, with and without its warm worker.

Runs the same deployment twice with ``rcsr_flower.runtime.deploy.LocalDeployment`` (a SuperLink
and ``--num-supernodes`` SuperNodes on loopback, TLS and node authentication on, one run
of the given rounds): once with ``worker-idle-s=0`` (every ClientApp process imports
torch and transformers and loads the backbone and data itself) and once with
``worker-idle-s=600`` (``rcsr_flower.client.node_worker``). From the timestamped node logs, per
message: Flower's dispatch (``Receiving`` → ``Start `flwr-clientapp` process``) and the
whole message (``Receiving`` → ``Sent successfully``), by message kind; a node's first
data-loading message (the bootstrap query) is listed on its own, since it pays for
preprocessing the node's data (and, with a worker, starting it).

    .venv/bin/python benchmarks/deploy_messages.py -c '{"num-server-rounds": 3}'

Across a network (``--modes node_worker slow_link``, as root): ``slow_link`` puts the
SuperLink, the user and every SuperNode on hosts of their own
(``rcsr_flower.runtime.netns``), each node's link to the SuperLink ``--link-delay-ms``
each way and ``--link-rate-mbit`` (``rcsr_flower.runtime.slowlink``); the server's wait
for a train round's replies (``train_wait_s``) minus loopback's is what the link costs
a round, which is what ``round-timeout`` must leave room for.

Ends with one JSON line: per mode, the median seconds (received → reply sent) of the
train and evaluate messages after a node's first loading message, of that first message,
and of Flower's dispatch. The work itself is the same in both modes; the difference is
what a ClientApp process pays before it works (``benchmarks/clientapp_startup.py``
measures that part alone).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EVENT = re.compile(
    r"^(\d\d:\d\d:\d\d\.\d{3}) .*?(Receiving: (\w+) message|Start `flwr-clientapp` process"
    r"|Sent successfully|ClientApp start-up|started node worker)"
)


def seconds(stamp: str) -> float:
    t = dt.datetime.strptime(stamp, "%H:%M:%S.%f")
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def messages(log: str) -> list[dict]:
    """One dict per message a node received: kind, and the seconds to each event."""
    out: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        m = EVENT.match(line)
        if m is None:
            continue
        t, what, kind = seconds(m.group(1)), m.group(2), m.group(3)
        if kind is not None:
            current = {"kind": kind, "received": t, "loads": False}
            out.append(current)
        elif current is None:
            continue
        elif what.startswith("Start"):
            current["dispatch"] = t - current["received"]
        elif what.startswith(("ClientApp start-up", "started node worker")):
            current["loads"] = True  # this message loaded the backbone and data
        else:  # sent
            current["total"] = t - current["received"]
    return [m for m in out if "total" in m and "dispatch" in m]


def run_mode(args, mode: str, root: Path) -> list[dict]:
    from rcsr_flower.runtime.deploy import LocalDeployment
    from rcsr_flower.runtime.netns import Network, deployment_hosts
    from rcsr_flower.runtime.slowlink import Link

    idle, separate = MODES[mode]
    network = None
    if separate:
        network = Network(deployment_hosts(args.num_supernodes))
    deployment = LocalDeployment(
        app_dir=ROOT,
        root=root / "deploy",
        num_supernodes=args.num_supernodes,
        node_config={"worker-idle-s": idle},
        run_config={"partitioning": "iid", **json.loads(args.run_config)},
        timeout=3600,
        network=network,
        link=Link(args.link_delay_ms / 1000, args.link_rate_mbit * 1e6 / 8) if separate else None,
    )
    try:
        deployment.start()
        result = deployment.run("messages", root / "outputs")
    finally:
        deployment.stop()
        if network is not None:
            network.close()
    if result["status"] != "completed":
        raise SystemExit(f"the run failed: {result.get('error')}")
    rows = []
    for i in range(args.num_supernodes):
        for m in messages((deployment.root / f"node-{i}.log").read_text()):
            rows.append({"node": i, **m})
    return rows


def summary(rows: list[dict]) -> dict:
    """Medians by kind of the messages after each node's first loading one, that one's,
    and Flower's dispatch."""
    first, rest = [], []
    for node in sorted({r["node"] for r in rows}):
        mine = [r for r in rows if r["node"] == node]
        i = next((i for i, r in enumerate(mine) if r["loads"]), len(mine))
        first += mine[i : i + 1]
        rest += mine[i + 1 :]
    out: dict = {}
    for kind in ("train", "evaluate"):
        kind_rows = [r for r in rest if r["kind"] == kind]
        if kind_rows:
            out[f"{kind}_s"] = round(statistics.median(r["total"] for r in kind_rows), 2)
    if first:
        out["first_loading_message_s"] = round(statistics.median(r["total"] for r in first), 2)
    out["dispatch_s"] = round(statistics.median(r["dispatch"] for r in rows), 2)
    out["messages"] = len(rows)
    return out


# mode -> (worker-idle-s, on separate hosts behind the slow link)
MODES = {"per_process": (0.0, False), "node_worker": (600.0, False), "slow_link": (600.0, True)}


def clients_train(run_dir: Path) -> list[float]:
    """The clients' own training seconds per round (their ``train-seconds`` summed)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [
        round(r["seconds"]["clients"]["train"], 1)
        for r in rows
        if r.get("seconds", {}).get("clients", {}).get("train")
    ]


def server_waits(run_dir: Path) -> dict:
    """Medians over the trained rounds of the server's wait for the train replies and of
    the federated evaluation (sending, the clients' work, the replies' way back)."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for key, name in (("train_wait", "train_wait_s"), ("federated_evaluate", "evaluate_wait_s")):
        values = [r["seconds"][key] for r in rows if r["round"] > 0 and key in r.get("seconds", {})]
        if values:
            out[name] = round(statistics.median(values), 2)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-supernodes", type=int, default=2)
    parser.add_argument(
        "-c", "--run-config", default='{"num-server-rounds": 2}', help="JSON overrides"
    )
    parser.add_argument("--modes", nargs="+", default=["per_process", "node_worker"], choices=MODES)
    parser.add_argument("--keep", type=Path, help="keep each mode's logs and outputs here")
    parser.add_argument("--link-delay-ms", type=float, default=100.0, help="slow_link: each way")
    parser.add_argument("--link-rate-mbit", type=float, default=20.0, help="slow_link: per node")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    figures: dict = {}
    for mode in args.modes:
        with tempfile.TemporaryDirectory(prefix="deploy-messages-") as tmp:
            root = args.keep / mode if args.keep else Path(tmp)
            rows = run_mode(args, mode, root)
            run_dir = root / "outputs" / "messages"
            figures[mode] = {"clients_train_s": clients_train(run_dir), **server_waits(run_dir)}
        for r in rows:
            print(
                json.dumps(
                    {"mode": mode, **{k: v for k, v in r.items() if k != "received"}},
                    default=lambda x: round(x, 2),
                )
            )
        figures[mode].update(summary(rows))
        print(json.dumps({"mode": mode, **figures[mode]}), flush=True)
    if "slow_link" in figures and "node_worker" in figures:
        figures["link"] = f"{args.link_delay_ms:g} ms each way, {args.link_rate_mbit:g} Mbit/s"
        for key in ("train_wait_s", "evaluate_wait_s"):
            extra = figures["slow_link"].get(key, 0) - figures["node_worker"].get(key, 0)
            figures[f"slow_link_extra_{key}"] = round(extra, 2)
    figures["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
