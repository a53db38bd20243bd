"""How far one image-only client's anchoring moves the shared space: one round, two clients.

The two-node deployment of docs/deployment.md (IID, ``missing-rate`` 0.5: client 0
image-only, client 1 paired, 2,700 training items each) falls from global rsum 301.1 to
47.7 after its first round. This runs that round in one process, through the ServerApp's
``run_server`` and the ClientApp's handlers (``benchmarks/round_overhead.py``'s
``InProcessGrid``: the same arithmetic as ``flwr run``), keeps both clients' trained
adapters, and scores on the global test split:

- ``start``: the adapters the round started from (zero-shot);
- ``image_only_alone`` / ``paired_alone``: each client's adapters as it trained them (the
  image-only client's text adapters are the ones it was sent);
- ``mix_full`` / ``mix_half`` / ``mix_quarter``: the paired client's text adapters and
  vision adapters averaged with the image-only client's at weight 1 / 0.5 / 0.25 (the
  tower-wise aggregation, where only the paired client holds the text tower).

    .venv/bin/python benchmarks/unimodal_client.py [-c '{"lr": 1e-4, "seed": 1}']
    .venv/bin/python benchmarks/unimodal_client.py --table RUNS.jsonl   # saved lines -> table

Ends with one JSON line: the settings, each client's loss, steps and update norm per
tower, and the rsums above. ``--table`` turns saved lines into a Markdown table, one row
per setting, mean and range over the seeds it finds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import round_overhead  # noqa: E402  (sets HF_HUB_OFFLINE, puts client_app on the path)


def table(path: Path) -> str:
    """Markdown: per setting (all but the seed), mean [min–max] over seeds."""
    groups: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            run = json.loads(line)
            setting = {k: v for k, v in run["settings"].items() if k != "seed"}
            groups.setdefault(json.dumps(setting, sort_keys=True), []).append(run)

    def cell(values: list[float]) -> str:
        mean = sum(values) / len(values)
        return f"{mean:.1f} [{min(values):.1f}–{max(values):.1f}]"

    columns = ["image_only_alone", "paired_alone", "mix_full", "mix_half", "mix_quarter"]
    out = [
        "| setting | seeds | image-only ‖Δ_vision‖ | image-only loss | "
        + " | ".join(columns)
        + " |",
        "|---" * (4 + len(columns)) + "|",
    ]
    for setting, runs in groups.items():
        uni = [
            next(c for c in r["clients"].values() if c["modality"] == "image-only") for r in runs
        ]
        seeds = ", ".join(str(r["settings"].get("seed", 0)) for r in runs)
        row = [
            setting,
            seeds,
            cell([u["update_norm"]["vision"] for u in uni]),
            cell([u["train_loss"] for u in uni]),
        ]
        row += [cell([r["rsum"][c] for r in runs]) for c in columns]
        out.append("| " + " | ".join(row) + " |")
    start = {r["rsum"]["start"] for rs in groups.values() for r in rs}
    out.append(f"\nGlobal rsum of the starting (zero-shot) adapters: {sorted(start)}.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--run-config", default="{}", help="JSON overrides")
    parser.add_argument("--table", type=Path, help="print a table of saved JSON lines, run nothing")
    args = parser.parse_args()
    if args.table is not None:
        print(table(args.table))
        return

    import torch

    from rcsr_flower.backbones.adapters import TOWERS, tower_of
    from rcsr_flower.client.training import tower_norm
    from rcsr_flower.config import RunConfig
    from rcsr_flower.modality import Modality
    from rcsr_flower.retrieval.evaluation import evaluate_retrieval
    from rcsr_flower.runtime.launch import prepare_run
    from rcsr_flower.server.app import _load_evaluation

    captured: dict[int, dict] = {}
    send = round_overhead.InProcessGrid.send_and_receive

    def keep_training_replies(self, messages, *, timeout=None):
        messages = list(messages)
        replies = send(self, messages, timeout=timeout)
        for msg, reply in zip(messages, replies, strict=True):
            if msg.metadata.message_type == "train" and reply.has_content():
                pid = int(self.contexts[msg.metadata.dst_node_id].node_config["partition-id"])
                captured[pid] = {
                    "start": msg.content["arrays"].to_torch_state_dict(),
                    "trained": reply.content["arrays"].to_torch_state_dict(),
                    "metrics": dict(reply.content["metrics"]),
                }
        return replies

    round_overhead.InProcessGrid.send_and_receive = keep_training_replies
    overrides = {"partitioning": "iid", "num-server-rounds": 1, **json.loads(args.run_config)}
    with tempfile.TemporaryDirectory() as out:
        run_config = {**RunConfig().to_flower(), **overrides, "output-dir": out}
        cfg = RunConfig.from_flower(run_config)
        prepare_run(cfg, 2, {})
        round_overhead.run_plain(run_config, 2, 1)
    if sorted(captured) != [0, 1]:
        raise SystemExit(f"expected training replies of clients 0 and 1, got {sorted(captured)}")

    backbone, test = _load_evaluation(cfg)

    def rsum(state: dict[str, torch.Tensor]) -> float:
        adapters = backbone.new_adapters(
            cfg.adapter_layers, cfg.adapter_bottleneck, cfg.adapter_init_std
        )
        adapters.load_state_dict(state)
        return round(float(evaluate_retrieval(backbone, test, adapters)["rsum"]), 2)

    modality_of = {m.code: str(m) for m in Modality}
    by_modality = {modality_of[int(c["metrics"]["modality"])]: p for p, c in captured.items()}
    if sorted(by_modality) != ["image-only", "paired"]:
        raise SystemExit(
            f"this seed's partition gave {sorted(by_modality)}: one image-only and one "
            "paired client are needed (try another seed)"
        )
    uni, pair = by_modality["image-only"], by_modality["paired"]
    start = captured[uni]["start"]
    delta = {p: {k: c["trained"][k] - start[k] for k in start} for p, c in captured.items()}

    def mix(w_image_only: float) -> dict[str, torch.Tensor]:
        """The paired client's text adapters; vision adapters averaged at this weight."""
        return {
            k: start[k]
            + (
                w_image_only * delta[uni][k] + (1 - w_image_only) * delta[pair][k]
                if tower_of(k) == "vision"
                else delta[pair][k]
            )
            for k in start
        }

    clients = {}
    for p, c in captured.items():
        norms = {tower: round(float(tower_norm(delta[p], tower)), 3) for tower in TOWERS}
        m = c["metrics"]
        clients[p] = {
            "modality": modality_of[int(m["modality"])],
            "num_examples": int(m["num-examples"]),
            "steps": int(m["steps"]),
            "train_loss": round(float(m["train-loss"]), 4),
            "update_norm": norms,
        }
    result = {
        "settings": overrides,
        "clients": clients,
        "rsum": {
            "start": rsum(start),
            "image_only_alone": rsum({k: start[k] + delta[uni][k] for k in start}),
            "paired_alone": rsum(mix(0.0)),
            "mix_full": rsum(mix(1.0)),
            "mix_half": rsum(mix(0.5)),
            "mix_quarter": rsum(mix(0.25)),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
