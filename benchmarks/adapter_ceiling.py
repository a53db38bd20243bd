"""How far adapters can take the embedded backbone, and how they get there.

Trains shared adapters on the pooled training split of the target corpus (the
"centralised" upper bound of §5) with the clients' own code and settings: the paired
loss of ``training.client_loss`` (symmetric InfoNCE at the specification's τ = 0.07), one
AdamW at the embedded ``lr`` and ``batch-size`` of the run config, one caption per image per epoch.
It evaluates the global test split (standard protocol) at step 0 (zero-shot), every
``--eval-every`` steps and at every epoch end, and ends with one JSON line:

    {"zero_shot_rsum": ..., "curve": [[step, rsum], ...], "min_rsum": ..., "epoch2_rsum": ...}

``min_rsum`` is the lowest rsum of the curve after step 0; ``epoch2_rsum`` the rsum after two
epochs (null if ``--steps`` stops before). A benchmark whose backbone behaves like real
CLIP rises from zero-shot from the first steps on.

    .venv/bin/python benchmarks/adapter_ceiling.py --steps 300 --eval-every 10 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from rcsr_flower.backbones.clip import load_backbone
from rcsr_flower.client.data import ClientData
from rcsr_flower.client.training import TrainSettings, batches, client_loss
from rcsr_flower.config import RunConfig
from rcsr_flower.data.datasets import open_dataset
from rcsr_flower.embedded.assets import ensure_assets
from rcsr_flower.retrieval.evaluation import evaluate_retrieval, preprocess_split
from rcsr_flower.retrieval.metrics import format_recall


def main() -> None:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    assets = ensure_assets(args.cache_dir)
    backbone = load_backbone(str(assets.backbone_dir))
    train_set = open_dataset(assets.corpus_json, "train")
    train_set = train_set.subset(range(min(args.train_images, len(train_set))))
    test = preprocess_split(backbone, open_dataset(assets.corpus_json, "test"))
    data = ClientData(0, "paired", preprocess_split(backbone, train_set), test)
    settings = TrainSettings(
        lr=args.lr,
        batch_size=args.batch_size,
        weight_decay=args.weight_decay,
        temperature=args.temperature,
        anchoring=False,
    )
    adapters = backbone.new_adapters()
    opt = torch.optim.AdamW(adapters.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed)
    out = sys.stderr if args.json else sys.stdout

    def evaluate(step: int, epoch: float, loss: float | None) -> float:
        metrics = evaluate_retrieval(backbone, test, adapters)
        tail = "" if loss is None else f" (mean loss {loss:.3f})"
        print(
            f"step {step:4d} (epoch {epoch:.2f}): {format_recall(metrics)}{tail} "
            f"{time.perf_counter() - start:.0f} s",
            file=out,
            flush=True,
        )
        return float(metrics["rsum"])

    start = time.perf_counter()
    print(f"{len(data.train)} train images, {len(test)} test images; {settings}", file=out)
    curve = [[0, evaluate(0, 0.0, None)]]
    steps_per_epoch = len(batches(len(data.train), args.batch_size, torch.Generator()))
    epoch2 = None
    step, recent = 0, []
    adapters.train()
    while step < args.steps:
        for idx in batches(len(data.train), args.batch_size, gen):
            loss = client_loss(backbone, data, idx, [adapters], None, settings, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            recent.append(float(loss.detach()))
            epoch_end = step % steps_per_epoch == 0
            if step % args.eval_every == 0 or epoch_end or step == args.steps:
                rsum = evaluate(step, step / steps_per_epoch, sum(recent) / len(recent))
                recent = []
                curve.append([step, rsum])
                if step == 2 * steps_per_epoch:
                    epoch2 = rsum
            if step == args.steps:
                break
    result = {
        "zero_shot_rsum": curve[0][1],
        "curve": curve,
        "min_rsum": min(r for s, r in curve[1:]) if len(curve) > 1 else None,
        "epoch2_rsum": epoch2,
        "steps_per_epoch": steps_per_epoch,
        "settings": {
            "lr": args.lr,
            "batch_size": args.batch_size,
            "weight_decay": args.weight_decay,
            "temperature": args.temperature,
            "seed": args.seed,
        },
        "backbone": str(assets.backbone_dir),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps({k: result[k] for k in ("zero_shot_rsum", "min_rsum", "epoch2_rsum")}))


if __name__ == "__main__":
    main()
