"""What a round costs as the population grows, at equal participants per round.

Runs the embedded federation once per population (``--clients 100 1000``) through the
real launcher (``python -m rcsr_flower.runtime.launch``), with the same participants per
round in each (``--participants``: ``fraction-train`` and ``fraction-evaluate`` =
participants / clients) and the same data per client (``--items-per-client``:
``train-max-items`` = items × clients, from one embedded corpus large enough for the
largest population, ``embedded-train-items``; ``--local-test-items`` per client's local
test split). Each run's processes are sampled for memory as ``benchmarks/memory.py``
does. Per population it prints one JSON line:

- ``seconds_per_round``: the mean of the rounds' own wall seconds (``seconds.round`` in
  ``metrics.jsonl``, rounds 1..R: training, aggregation, evaluation), so start-up, the
  query round that asks every node and the partition are not in it;
- ``phases``: the same mean per phase (``train_wait``, ``federated_evaluate``, ...);
- ``trained`` / ``evaluated``: how many clients trained / were evaluated each round;
- ``peak_pss_gb``: the run's peak proportional set size (``memory.watch``);
- ``partition_build_s``: building the partition, timed here before the run (which then
  reads it from the cache); ``run_s``: the launcher's whole command;
- ``load_avg_1m`` before and after: the machine's load, without which no second means much.

The last line compares the largest population with the smallest: the ratio of their
seconds per round and of their peak memory, and whether they meet the goals (per-round
time at most 1.2×, peak at most 2.5 GB). ``--repeat N`` runs the populations N times,
interleaved (100, 1000, 100, 1000, ...), and compares their median runs.

    python benchmarks/scale.py --clients 100 1000 [--participants 10] [--rounds 2]
                               [--repeat 3] [--cpus-per-client N] [-c "..."]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.memory import gb, median_of, watch  # noqa: E402

GOAL_ROUND_RATIO = 1.2  # per-round seconds, largest population / smallest
GOAL_PEAK_GB = 2.5  # peak PSS of the largest population's run


def corpus_items(clients: int, items: int, local_test: int) -> int:
    """Training items the embedded corpus needs for ``clients`` of ``items`` each plus
    their local test top-ups (twice what they draw: the top-up draws in each client's
    colours, and a colour can run out before the total does), at least its own 6000,
    rounded up to a thousand."""
    need = clients * (items + 2 * local_test)
    return max(6000, math.ceil(need / 1000) * 1000)


def overrides(args: argparse.Namespace, clients: int, corpus: int, out: Path) -> dict:
    """The run config of one population: equal participants, equal data per client."""
    fraction = min(1.0, args.participants / clients)
    return {
        "fraction-train": fraction,
        "fraction-evaluate": fraction,
        "num-server-rounds": args.rounds,
        "train-max-items": args.items_per_client * clients,
        "local-test-items": str(args.local_test_items),
        "embedded-train-items": corpus,
        "output-dir": str(out),
        "run-name": f"scale-{clients}",
    }


def round_figures(run_dir: Path) -> dict:
    """Seconds per round (rounds >= 1), per phase, and who trained and was evaluated."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in rows if r["round"] >= 1]
    phases: dict[str, list[float]] = {}
    for r in rounds:
        for k, v in r["seconds"].items():
            if isinstance(v, int | float):
                phases.setdefault(k, []).append(float(v))
    return {
        "seconds_per_round": round(statistics.mean(phases["round"]), 2),
        "round_seconds": phases["round"],
        "phases_by_round": [
            {k: round(v, 2) for k, v in r["seconds"].items() if isinstance(v, int | float)}
            for r in rounds
        ],
        "phases": {k: round(statistics.mean(v), 2) for k, v in phases.items() if k != "round"},
        "trained": [len(r.get("weights", {})) for r in rounds],
        "evaluated": [r.get("personalized", {}).get("clients", 0) for r in rounds],
    }


def time_partition(raw: list[str], given: dict, clients: int) -> float:
    """Seconds to build the run's partition (``federation.build_partition``), then keep
    it in the cache (``load_partition``) so that the run reads it and its launcher does
    not build it: what a large population costs once, apart from its rounds."""
    from rcsr_flower import federation
    from rcsr_flower.runtime.launch import check_run_config

    cfg = check_run_config(ROOT, raw, given)
    federation.dataset_source(cfg)  # the corpus, built here once if missing (not timed)
    backbone = None
    if cfg.partition_attribute == federation.KMEANS:
        from rcsr_flower.embedded.assets import load_model

        backbone = load_model(cfg.model_name, cache_dir=cfg.cache_dir or None)
    started = time.perf_counter()
    federation.build_partition(cfg, backbone, clients)
    seconds = time.perf_counter() - started
    federation.load_partition(cfg, backbone, clients)
    return round(seconds, 2)


def run_population(args: argparse.Namespace, clients: int, corpus: int, out: Path) -> dict:
    given = overrides(args, clients, corpus, out)
    before = os.getloadavg()[0]
    partition_s = time_partition(args.run_config, given, clients)
    cmd = [sys.executable, "-m", "rcsr_flower.runtime.launch", "--app-dir", "."]
    cmd += ["--flwr-home", str(out / "flwr"), "--num-supernodes", str(clients)]
    cmd += ["--timeout", str(args.timeout)]
    if args.cpus_per_client is not None:
        cmd += ["--cpus-per-client", str(args.cpus_per_client)]
    for raw in args.run_config:
        cmd += ["-c", raw]
    cmd += ["-c", " ".join(f"{k}={json.dumps(v)}" for k, v in given.items())]
    print(f"[scale] $ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    watched = watch(cmd, env)
    figures: dict = {"clients": clients, "participants": args.participants}
    figures["rounds"] = args.rounds
    figures["exit_code"] = watched.code
    if watched.code == 0:
        figures.update(round_figures(out / f"scale-{clients}"))
    at_peak = watched.peak.by_role()
    figures.update(
        peak_pss_gb=gb(watched.peak.total()),
        peak_by_process_gb={r: gb(v) for r, v in sorted(at_peak.items(), key=lambda x: -x[1])},
        partition_build_s=partition_s,
        run_s=round(watched.seconds, 1),
        items_per_client=args.items_per_client,
        local_test_items=args.local_test_items,
        embedded_train_items=corpus,
        load_avg_1m={"before": round(before, 2), "after": round(os.getloadavg()[0], 2)},
    )
    return figures


def comparison(results: list[dict]) -> dict:
    """The largest population against the smallest, and the goals; with both
    populations' own figures (the line a record keeps), each round's phases and memory by
    process among them, so the record says where a difference comes from.

    Of repeated runs (``--repeat``, the populations interleaved so that a change in the
    machine's load falls on both), each population's figure is its median run's (by
    seconds per round; the lower middle of an even count), the ratio is that of the
    medians, and every run's seconds, peak and load are kept beside it."""
    by: dict[int, list[dict]] = {}
    for r in results:
        by.setdefault(r["clients"], []).append(r)
    populations = sorted(by)
    median = {c: median_of(by[c], "seconds_per_round") for c in populations}
    small, large = median[populations[0]], median[populations[-1]]
    ratio = large["seconds_per_round"] / small["seconds_per_round"]
    keep = ("seconds_per_round", "round_seconds", "phases", "phases_by_round", "peak_pss_gb")
    keep += ("peak_by_process_gb", "load_avg_1m")
    line = {
        "clients": [small["clients"], large["clients"]],
        "by_population": {str(r["clients"]): {k: r[k] for k in keep} for r in (small, large)},
        "seconds_per_round_ratio": round(ratio, 3),
        "peak_pss_gb": [small["peak_pss_gb"], large["peak_pss_gb"]],
        "peak_pss_ratio": round(large["peak_pss_gb"] / small["peak_pss_gb"], 3),
        "partition_build_s": [small["partition_build_s"], large["partition_build_s"]],
        "round_goal_met": ratio <= GOAL_ROUND_RATIO,
        "memory_goal_met": large["peak_pss_gb"] <= GOAL_PEAK_GB,
        "goals": {"seconds_per_round_ratio": GOAL_ROUND_RATIO, "peak_pss_gb": GOAL_PEAK_GB},
    }
    repeat = len(by[populations[0]])
    if repeat > 1:
        line["repeat"] = repeat
        line["runs"] = {
            str(c): [
                {
                    k: r[k]
                    for k in ("seconds_per_round", "round_seconds", "peak_pss_gb", "load_avg_1m")
                }
                for r in by[c]
            ]
            for c in (populations[0], populations[-1])
        }
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--participants", type=int, default=10, help="clients a round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--items-per-client", type=int, default=8)
    parser.add_argument("--local-test-items", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=3600.0, help="per population")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each population, interleaved"
    )
    parser.add_argument(
        "--cpus-per-client", type=int, default=None, help="a Ray actor's CPUs (the launcher's)"
    )
    parser.add_argument(
        "-c",
        "--run-config",
        action="append",
        default=[],
        help='run-config overrides for every population, e.g. -c "eval-max-images=200"',
    )
    args = parser.parse_args(argv)
    populations = sorted(set(args.clients))
    corpus = corpus_items(populations[-1], args.items_per_client, args.local_test_items)
    results = []
    with tempfile.TemporaryDirectory(prefix="rcsr-scale-") as tmp:
        for i in range(args.repeat):  # interleaved: 100, 1000, 100, 1000, ...
            for clients in populations:
                out = Path(tmp) / f"{clients}-{i}"
                figures = run_population(args, clients, corpus, out)
                print(json.dumps(figures), flush=True)
                results.append(figures)
                if figures["exit_code"] != 0:
                    print("[scale] a run failed: no comparison", file=sys.stderr)
                    return 1
    if len(populations) > 1:
        print(json.dumps(comparison(results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
