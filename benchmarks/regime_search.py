"""The search for the embedded benchmark's regime, one variable at a time, kept as files.

A benchmark can only judge RCSR where its settings cost the plain baseline something
(docs/algorithm.md, "The embedded benchmark's regime"). This script runs FedAvg
(tower-wise, no anchoring) through ``benchmarks/fed_dynamics.py`` (the client code of
the app, all clients in one process) for each variant below and each seed, keeps every
result as ``docs/results/regime-search/<variant>/seed-<k>.json`` (curve, settings,
commit, machine, load) and writes the table in docs/algorithm.md between its markers
from those files:

    .venv/bin/python benchmarks/regime_search.py run --seeds 0 1 2   # missing results only
    .venv/bin/python benchmarks/regime_search.py table --write docs/algorithm.md

It ends with one JSON line: ``{"variant": {"mean": ..., "std": ..., "n": ...}, ...}`` of
the final global rsum.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "results" / "regime-search"
START, END = "<!-- regime-search:start -->", "<!-- regime-search:end -->"

# the regime: 750 of the corpus's training items (67 training pairs a client), 10 local
# steps a round, 20 rounds; FedAvg tower-wise without anchoring throughout
REGIME = ["--train-max-items", "750", "--local-steps", "10", "--rounds", "20", "--no-anchoring"]
NON_IID = ["--partitioning", "dirichlet", "--partition-by", "color"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "S1": ("IID, all paired", [*REGIME, "--partitioning", "iid", "--missing-rate", "0"]),
    "S2": (
        "Dirichlet(0.1) over object colour, equal sizes, all paired",
        [*REGIME, *NON_IID, "--partition-sizes", "equal", "--missing-rate", "0"],
    ),
    "S3": (
        "IID, half the clients unimodal",
        [*REGIME, "--partitioning", "iid", "--missing-rate", "0.5"],
    ),
    "S4": (
        "Dirichlet(0.1) over object colour, equal sizes, half unimodal",
        [*REGIME, *NON_IID, "--partition-sizes", "equal", "--missing-rate", "0.5"],
    ),
    "central": (
        "pooled data on 1 client, 50 steps a round (the federation's 5 × 10)",
        [
            "--train-max-items", "750", "--rounds", "20", "--no-anchoring", "--clients", "1",
            "--fraction", "1", "--partitioning", "iid", "--missing-rate", "0",
            "--local-steps", "50",
        ],
    ),
}  # fmt: skip


def result_path(variant: str, seed: int) -> Path:
    return OUT / variant / f"seed-{seed}.json"


def run(variants: list[str], seeds: list[int]) -> None:
    sys.path.insert(0, str(ROOT))
    from rcsr_flower.routing import provenance

    for name in variants:
        for seed in seeds:
            path = result_path(name, seed)
            if path.is_file():
                continue
            load = os.getloadavg()[0]
            start = time.perf_counter()
            cmd = [sys.executable, str(ROOT / "benchmarks" / "fed_dynamics.py"), "--json"]
            cmd += ["--seed", str(seed), *VARIANTS[name][1]]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(f"{name} seed {seed} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["provenance"] = {
                "command": " ".join(["benchmarks/fed_dynamics.py", *cmd[3:]]),
                "commit": provenance.commit(ROOT),
                "machine": provenance.machine(),
                "load_at_start": round(load, 2),
                "seconds": round(time.perf_counter() - start, 1),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result) + "\n")
            print(f"{name} seed {seed}: rsum {result['rsum'][-1][1]:.1f}", file=sys.stderr)


def clusters(seed: int = 0, num_clusters: int = 50) -> dict:
    """What the k-means partition groups by: normalised mutual information between the
    k-means clusters of the frozen backbone's caption embeddings (the ``kmeans`` path of
    ``partition-by``) and each attribute the embedded corpus records."""
    sys.path.insert(0, str(ROOT))
    from sklearn.metrics import normalized_mutual_info_score

    from rcsr_flower.config import RunConfig
    from rcsr_flower.data.partition import semantic_clusters
    from rcsr_flower.embedded.assets import load_model
    from rcsr_flower.federation import caption_embeddings, open_split
    from rcsr_flower.routing import provenance

    cfg = RunConfig(train_max_items=0)
    train = open_split(cfg, "train")
    labels = semantic_clusters(
        caption_embeddings(load_model(cfg.model_name), train), num_clusters, seed
    )
    attrs = [train.attributes(i) for i in range(len(train))]
    nmi = {
        key: round(float(normalized_mutual_info_score([str(a[key]) for a in attrs], labels)), 3)
        for key in attrs[0]
    }
    return {
        "items": len(train),
        "clusters": num_clusters,
        "seed": seed,
        "nmi": dict(sorted(nmi.items(), key=lambda kv: -kv[1])),
        "provenance": {"commit": provenance.commit(ROOT), "machine": provenance.machine()},
    }


def finals() -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for name in VARIANTS:
        for path in sorted((OUT / name).glob("seed-*.json")):
            result = json.loads(path.read_text())
            out.setdefault(name, {})[int(path.stem.split("-")[1])] = result["rsum"][-1][1]
    return out


def table() -> str:
    data = finals()
    ref = data.get("S1", {})
    lines = [
        START,
        "Generated by `benchmarks/regime_search.py table` from "
        "`docs/results/regime-search/*/seed-*.json` (each file names its command, commit, "
        "machine and load); FedAvg tower-wise, no anchoring, in-process "
        "(`benchmarks/fed_dynamics.py`), global rsum of round 20 on the 1,000-image test "
        "split, standard protocol, embedded tiny CLIP.",
        "",
        "| variant | what | seeds | final rsum (mean ± std) | per seed | − S1 (mean of paired) |",
        "|---|---|---|---|---|---|",
    ]
    machines = set()
    for name, (what, _) in VARIANTS.items():
        values = data.get(name, {})
        for seed in values:
            machines.add(json.loads(result_path(name, seed).read_text())["provenance"]["machine"])
        if not values:
            lines.append(f"| {name} | {what} | 0 | — | — | — |")
            continue
        v = np.array(list(values.values()))
        std = f" ± {v.std(ddof=1):.1f}" if len(v) > 1 else ""
        per = ", ".join(f"{values[s]:.1f}" for s in sorted(values))
        common = sorted(set(values) & set(ref))
        diff = (
            f"{np.mean([values[s] - ref[s] for s in common]):+.1f}"
            if common and name != "S1"
            else "—"
        )
        lines.append(f"| {name} | {what} | {len(v)} | {v.mean():.1f}{std} | {per} | {diff} |")
    lines += ["", "Machine: " + "; ".join(sorted(machines)) + "."]
    if (OUT / "clusters.json").is_file():
        c = json.loads((OUT / "clusters.json").read_text())
        nmi = ", ".join(f"{k} {v:.2f}" for k, v in c["nmi"].items())
        lines += [
            "",
            f"What the `kmeans` partition groups by (`benchmarks/regime_search.py clusters`: "
            f"{c['clusters']} k-means clusters of the frozen backbone's caption embeddings of "
            f"all {c['items']:,} training items, seed {c['seed']}, commit "
            f"{c['provenance']['commit']}): normalised mutual information with each "
            f"attribute: {nmi}.",
        ]
    lines.append(END)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--only", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    sub.add_parser("clusters", help="what k-means over caption embeddings groups by")
    t = sub.add_parser("table")
    t.add_argument("--write", type=Path, default=None, help="replace the markers' block")
    args = parser.parse_args()
    if args.command == "run":
        run(args.only, args.seeds)
    elif args.command == "clusters":
        result = clusters()
        (OUT / "clusters.json").write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result))
        return
    else:
        block = table()
        if args.write:
            text = args.write.read_text()
            if START not in text or END not in text:
                sys.exit(f"{args.write} has no {START} ... {END} markers: add them")
            head, rest = text.split(START, 1)
            args.write.write_text(head + block + rest.split(END, 1)[1])
        else:
            print(block)
    summary = {}
    for name, values in finals().items():
        v = np.array(list(values.values()))
        summary[name] = {
            "mean": round(float(v.mean()), 2),
            "std": round(float(v.std(ddof=1)), 2) if len(v) > 1 else None,
            "n": len(v),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
