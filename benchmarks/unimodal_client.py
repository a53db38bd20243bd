"""How far one image-only client's anchoring moves the shared space: one round, two clients.

The two-node deployment of docs/deployment.md (IID, ``missing-rate`` 0.5: client 0
image-only, client 1 paired, 2,700 training items each) falls from global rsum 301.1 to
47.7 after its first round. This runs that round in one process, through the ServerApp's
``run_server`` and the ClientApp's handlers (``benchmarks/round_overhead.py``'s
``InProcessGrid``: the same arithmetic as ``flwr run``), keeps both clients' trained
adapters, and scores on the global test split:

- ``start``: the adapters the round started from (zero-shot);
- ``image_only_alone``: client 0's vision adapters, the text adapters it was sent;
- ``paired_alone``: client 1's adapters;
- ``mix_half`` / ``mix_quarter``: client 1's text adapters, vision adapters averaged with
  client 0's at weight 0.5 / 0.25 (tower-wise aggregation with those weights).

    .venv/bin/python benchmarks/unimodal_client.py [-c '{"lr": 1e-4}']

Ends with one JSON line: the settings, each client's loss, steps and update norm per
tower, and the rsums above.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--run-config", default="{}", help="JSON overrides")
    args = parser.parse_args()

    import torch

    from rcsr_flower.backbones.adapters import tower_of
    from rcsr_flower.client import MODALITY_CODES
    from rcsr_flower.config import RunConfig
    from rcsr_flower.launch import prepare_run
    from rcsr_flower.server import _load_evaluation
    from rcsr_flower.splits import evaluate_retrieval

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

    start = captured[0]["start"]
    delta = {p: {k: c["trained"][k] - start[k] for k in start} for p, c in captured.items()}

    def mix(w_image_only: float) -> dict[str, torch.Tensor]:
        return {
            k: start[k]
            + (
                w_image_only * delta[0][k] + (1 - w_image_only) * delta[1][k]
                if tower_of(k) == "vision"
                else delta[1][k]
            )
            for k in start
        }

    clients = {}
    for p, c in captured.items():
        norms = {
            tower: round(
                float(sum(v.norm() ** 2 for k, v in delta[p].items() if tower_of(k) == tower))
                ** 0.5,
                3,
            )
            for tower in ("vision", "text")
        }
        m = c["metrics"]
        clients[p] = {
            "modality": {v: k for k, v in MODALITY_CODES.items()}[int(m["modality"])],
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
            "image_only_alone": rsum(mix(1.0)),
            "paired_alone": rsum(mix(0.0)),
            "mix_half": rsum(mix(0.5)),
            "mix_quarter": rsum(mix(0.25)),
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
