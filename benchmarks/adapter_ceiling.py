"""How far adapters can take the embedded backbone: zero-shot vs centrally trained adapters.

The embedded benchmark is only meaningful if the frozen backbone's zero-shot retrieval is
clearly above chance and clearly below what adapters reach on the target domain. This
trains shared adapters on the pooled training split (the "centralised" upper bound of
SPEC §5, plain symmetric InfoNCE) and prints the global test metrics side by side.

    .venv/bin/python benchmarks/adapter_ceiling.py --epochs 4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from rcsr_flower.assets import ensure_assets
from rcsr_flower.backbones.clip import load_backbone
from rcsr_flower.data.datasets import open_dataset
from rcsr_flower.metrics import format_recall
from rcsr_flower.task import (
    ClientData,
    TrainSettings,
    evaluate_retrieval,
    local_train,
    preprocess_split,
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--train-images", type=int, default=6000)
    parser.add_argument("--cache-dir", default=None)
    args = parser.parse_args()

    torch.manual_seed(0)
    assets = ensure_assets(args.cache_dir)
    backbone = load_backbone(str(assets.backbone_dir))
    train_set = open_dataset(assets.corpus_json, "train")
    train_set = train_set.subset(range(min(args.train_images, len(train_set))))
    test = preprocess_split(backbone, open_dataset(assets.corpus_json, "test"))
    train = preprocess_split(backbone, train_set)
    data = ClientData(0, "paired", train, test)

    rows = {"zero-shot": evaluate_retrieval(backbone, test, None)}
    print(
        f"chance rsum ~ {sum(100 * k / len(test) for k in (1, 5, 10)) * 2:.1f} "
        f"({len(test)} test images)"
    )
    print(f"{'zero-shot':>12}: {format_recall(rows['zero-shot'])}", flush=True)
    adapters = backbone.new_adapters()
    settings = TrainSettings(lr=args.lr, batch_size=args.batch_size, temperature=args.temperature)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        result = local_train(backbone, adapters, None, data, None, settings, seed=epoch)
        rows[f"epoch {epoch}"] = evaluate_retrieval(backbone, test, adapters)
        print(
            f"{'epoch ' + str(epoch):>12}: {format_recall(rows[f'epoch {epoch}'])} "
            f"(loss {result['loss']:.3f}, {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    best = max(rows.values(), key=lambda m: m["rsum"])
    print(
        json.dumps(
            {
                "zero_shot_rsum": rows["zero-shot"]["rsum"],
                "best_adapted_rsum": best["rsum"],
                "ratio": best["rsum"] / rows["zero-shot"]["rsum"],
            }
        )
    )


if __name__ == "__main__":
    main()
