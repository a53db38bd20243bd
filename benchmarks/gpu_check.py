"""Client training throughput and memory at ViT-B/32 shape, bf16 autocast vs fp32.

Runs the project's real client step (``rcsr_flower.client.training.local_train``: a paired client's
InfoNCE + prototype alignment + L_prox, AdamW on bottleneck-64 adapters in every block)
on a ``CLIPModel`` built from ``CLIPConfig()`` defaults (ViT-B/32) with random weights,
so no download is needed: random weights cost the same FLOPs as OpenAI's. The frozen
backbone runs under bf16 autocast on CUDA (what clients do) or in fp32; the script prints
samples/s, seconds per step and peak GPU memory of both, and their ratios, and ends with
them as one JSON line (``bf16`` and ``fp32`` rows, ``speed_ratio``, ``memory_ratio``).

    .venv/bin/python benchmarks/gpu_check.py                     # CUDA: batch 128, 20 steps
    .venv/bin/python benchmarks/gpu_check.py --device cpu --steps 1 --batch-size 4
    .venv/bin/python benchmarks/gpu_check.py --tiny --device cpu --steps 1 --batch-size 4

Inputs are random pixels (already preprocessed, on the host like a client's cached split)
and random 8-14-word captions; each mode runs ``--warmup`` steps before the timed ones.
On a CPU, autocast is off in both modes (the library uses bf16 on CUDA only): the CPU run
is a smoke check of the code path, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from rcsr_flower.backbones.adapters import count_parameters
from rcsr_flower.backbones.clip import Backbone
from rcsr_flower.client.data import ClientData
from rcsr_flower.client.training import TrainSettings, local_train
from rcsr_flower.embedded.random_clip import (
    clip_tokenizer,
    random_captions,
    random_clip,
    tiny_clip_config,
)
from rcsr_flower.retrieval.evaluation import SplitTensors
from rcsr_flower.retrieval.prototypes import PrototypeBank

MODES = ("bf16", "fp32")


def build_backbone(tiny: bool, device: torch.device, seed: int) -> Backbone:
    """A random-weight CLIP (``CLIPConfig()`` = ViT-B/32, or a tiny one), frozen, on ``device``."""
    model = random_clip(tiny_clip_config() if tiny else None, seed=seed)
    model.requires_grad_(False).eval().to(device)
    text = model.config.text_config
    tokenizer = clip_tokenizer(text.vocab_size, text.max_position_embeddings)
    name = "random ViT-B/32" if not tiny else "random tiny CLIP"
    return Backbone(model, tokenizer, None, device, name)


def client_data(backbone: Backbone, n: int, seed: int) -> ClientData:
    size = backbone.model.config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, size, size, generator=g)
    captions = [[c] for c in random_captions(n, seed=seed)]
    empty = SplitTensors(pixels[:0], [])
    return ClientData(0, "paired", SplitTensors(pixels, captions), empty)


def random_bank(dim: int, slots: int, seed: int) -> PrototypeBank:
    g = torch.Generator().manual_seed(seed)
    normalize = torch.nn.functional.normalize
    image = normalize(torch.randn(slots, dim, generator=g), dim=-1)
    text = normalize(torch.randn(slots, dim, generator=g), dim=-1)
    return PrototypeBank(
        image, text, normalize(image.mean(0), dim=0), normalize(text.mean(0), dim=0)
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_mode(backbone: Backbone, mode: str, args, bank: PrototypeBank) -> dict:
    """Warm-up, then ``args.steps`` timed steps of ``local_train`` in one mode."""
    device = backbone.device
    backbone.mixed_precision = mode == "bf16"
    torch.manual_seed(args.seed)
    adapters = backbone.new_adapters("all", args.bottleneck)
    settings = TrainSettings(lr=1e-4, batch_size=args.batch_size, prox_mu=0.01)
    if args.warmup:
        data = client_data(backbone, args.warmup * args.batch_size, args.seed + 1)
        local_train(backbone, adapters, None, data, bank, settings, seed=args.seed)
    data = client_data(backbone, args.steps * args.batch_size, args.seed + 2)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    result = local_train(backbone, adapters, None, data, bank, settings, seed=args.seed)
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {
        "mode": mode,
        "steps": result["steps"],
        "batch_size": args.batch_size,
        "seconds": seconds,
        "samples_per_s": result["steps"] * args.batch_size / seconds,
        "s_per_step": seconds / max(result["steps"], 1),
        "peak_gib": peak,
        "loss": result["loss"],
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--bottleneck", type=int, default=64)
    parser.add_argument("--tiny", action="store_true", help="a tiny CLIP instead of B/32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.warmup < 0:
        parser.error("need --steps >= 1, --batch-size >= 2 and --warmup >= 0")

    device = torch.device(args.device)
    backbone = build_backbone(args.tiny, device, args.seed)
    bank = random_bank(backbone.dim, 32, args.seed).to(device)
    adapters = backbone.new_adapters("all", args.bottleneck)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"device: {device} ({where or 'cpu'}), torch {torch.__version__}\n"
        f"backbone: {backbone.name}, {count_parameters(backbone.model) / 1e6:.1f} M frozen "
        f"parameters; adapters: {count_parameters(adapters) / 1e6:.3f} M (bottleneck "
        f"{args.bottleneck}, every block)\n"
        f"batch {args.batch_size}, {args.warmup} warm-up + {args.steps} timed steps per mode"
    )
    if device.type == "cuda":
        print(
            f"TF32 matmul: {torch.backends.cuda.matmul.allow_tf32}, "
            f"TF32 cuDNN: {torch.backends.cudnn.allow_tf32}"
        )
    else:
        print("CPU: autocast is CUDA-only in this library, so 'bf16' runs in fp32 here")
    rows = [run_mode(backbone, mode, args, bank) for mode in MODES]
    backbone.mixed_precision = True

    print(f"\n{'mode':>5}  {'samples/s':>10}  {'s/step':>8}  {'peak GiB':>8}  {'loss':>7}")
    for r in rows:
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
        print(
            f"{r['mode']:>5}  {r['samples_per_s']:>10.1f}  {r['s_per_step']:>8.3f}  "
            f"{peak:>8}  {r['loss']:>7.4f}"
        )
    bf16, fp32 = rows
    ratio = f"bf16/fp32: speed x{bf16['samples_per_s'] / fp32['samples_per_s']:.2f}"
    if bf16["peak_gib"] is not None:
        ratio += f", peak memory x{bf16['peak_gib'] / fp32['peak_gib']:.2f}"
    print(ratio)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "name": where, "rows": rows}, f, indent=2)
    memory = bf16["peak_gib"] / fp32["peak_gib"] if bf16["peak_gib"] is not None else None
    figures = {
        "device": str(device),
        "name": where,
        **{r["mode"]: {k: v for k, v in r.items() if k != "mode"} for r in rows},
        "speed_ratio": bf16["samples_per_s"] / fp32["samples_per_s"],
        "memory_ratio": memory,
    }
    print(json.dumps(figures))
    return rows


if __name__ == "__main__":
    main()
