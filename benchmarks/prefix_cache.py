"""What the frozen-prefix cache saves on a local epoch (§2, `prefix-cache`).

A random-weight ViT-B/32-shaped CLIP (`CLIPConfig()` defaults: 12 + 12 blocks) with
adapters on the last `--adapter-layers` blocks of each tower trains one local epoch of
the real client code (`training.local_train`, paired InfoNCE) on `--items` synthetic images
with 5 random captions each, three ways on the same data and the same initial adapters:

- **uncached**: every step runs both towers from pixels and tokens;
- **fill**: computing the frozen prefix of every image and caption once
  (`data.client_prefix`: what a node does before its first epoch);
- **cached**: the same epoch from the cached hidden states.

and then the retrieval evaluation of the same split (`evaluation.evaluate_retrieval`, as the
server and every client run it each round) without and with its evaluation prefix: the
first evaluation with it fills it (`eval_fill_s`), the later ones replay it.

    .venv/bin/python benchmarks/prefix_cache.py [--device cuda] [--repeats 3]

Ends with one JSON line: {"uncached_s", "cached_s", "ratio", "fill_s", "eval_uncached_s",
"eval_cached_s", "eval_ratio", "eval_fill_s", "eval_same", ...} (medians; `eval_same`: the
cached evaluation's metrics equal the plain one's exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from gpu_check import build_backbone, sync

from rcsr_flower.client.data import ClientData, client_prefix
from rcsr_flower.client.training import TrainSettings, local_train
from rcsr_flower.config import RunConfig
from rcsr_flower.embedded.random_clip import random_captions
from rcsr_flower.retrieval.evaluation import SplitTensors, evaluate_retrieval


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--adapter-layers", default="2")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="a tiny CLIP (smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    backbone = build_backbone(args.tiny, device, seed=0)
    size = backbone.model.config.vision_config.image_size
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.items, 3, size, size, generator=g)
    flat = random_captions(5 * args.items, seed=0)
    captions = [flat[5 * i : 5 * i + 5] for i in range(args.items)]
    split = SplitTensors(pixels, captions)
    cfg = RunConfig(adapter_layers=args.adapter_layers, data_cache_gb=0.0)  # memory only
    settings = TrainSettings(lr=1e-3, epochs=1, batch_size=args.batch_size, anchoring=False)
    start = backbone.new_adapters(args.adapter_layers).state_dict()

    def epoch(data: ClientData) -> float:
        shared = backbone.new_adapters(args.adapter_layers)
        shared.load_state_dict(start)
        sync(device)
        t0 = time.perf_counter()
        local_train(backbone, shared, None, data, None, settings, seed=1)
        sync(device)
        return time.perf_counter() - t0

    plain = ClientData(0, "paired", split, split)
    cached = ClientData(0, "paired", split, split)
    fills, uncached, warm = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            cached.prefix = client_prefix(cfg, backbone, cached, Path(tmp) / "c.safetensors")
            sync(device)
            fills.append(time.perf_counter() - t0)
            uncached.append(epoch(plain))
            warm.append(epoch(cached))
    u, c, f = (statistics.median(x) for x in (uncached, warm, fills))

    adapters = backbone.new_adapters(args.adapter_layers)
    adapters.load_state_dict(start)

    def evaluation(target: SplitTensors, budget: float) -> tuple[float, dict]:
        sync(device)
        t0 = time.perf_counter()
        metrics = evaluate_retrieval(backbone, target, adapters, prefix_bytes=budget)
        sync(device)
        return time.perf_counter() - t0, metrics

    kept = SplitTensors(pixels, captions)
    eval_fill, filled = evaluation(kept, 2**34)
    eval_plain, eval_warm, same = [], [], True
    for _ in range(args.repeats):
        seconds, expected = evaluation(split, 0.0)
        eval_plain.append(seconds)
        seconds, metrics = evaluation(kept, 2**34)
        eval_warm.append(seconds)
        same = same and metrics == expected == filled
    eu, ec = statistics.median(eval_plain), statistics.median(eval_warm)
    print(
        json.dumps(
            {
                "uncached_s": round(u, 3),
                "cached_s": round(c, 3),
                "ratio": round(u / c, 2),
                "fill_s": round(f, 3),
                "eval_uncached_s": round(eu, 3),
                "eval_cached_s": round(ec, 3),
                "eval_ratio": round(eu / ec, 2),
                "eval_fill_s": round(eval_fill, 3),
                "eval_same": same,
                "backbone": backbone.name,
                "device": str(device),
                "adapter_layers": args.adapter_layers,
                "items": args.items,
                "captions_per_item": 5,
                "batch_size": args.batch_size,
                "repeats": args.repeats,
                "torch_threads": torch.get_num_threads(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
