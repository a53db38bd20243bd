"""Where the router objective puts the weight when every client is equally good.

§5 step 7 (ours, revised): a unimodal client reports the global prototype as a
placeholder for its missing side. This simulates one round of 2 paired, 2 image-only and
1 text-only clients in d = 512 whose held prototypes are the global ones plus noise of one
size (placeholders: exactly the global ones), and minimises the objective over softmax
logits with Adam, for the literal reading (every client in every term) and the revised
holders-only one. Equally good clients should end near 1/5 each.

    .venv/bin/python benchmarks/router_objective.py --seeds 0 1 2

Ends with one JSON line: per seed and reading, the paired and unimodal clients' weights.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from rcsr_flower.server.retrieval_task import RouterBetas, router_loss

HAS_IMAGE = torch.tensor([True, True, True, True, False])
HAS_TEXT = torch.tensor([True, True, False, False, True])


def optimum(seed: int, revised: bool, dim: int, noise: float, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    g_i = F.normalize(torch.randn(dim, generator=g), dim=0)
    g_t = F.normalize(torch.randn(dim, generator=g), dim=0)

    def noisy(v: torch.Tensor) -> torch.Tensor:
        return F.normalize(v + noise * torch.randn(dim, generator=g) / dim**0.5, dim=0)

    p_i = torch.stack([noisy(g_i) if h else g_i for h in HAS_IMAGE])
    p_t = torch.stack([noisy(g_t) if h else g_t for h in HAS_TEXT])
    masks = {"has_image": HAS_IMAGE, "has_text": HAS_TEXT} if revised else {}
    logits = torch.zeros(len(HAS_IMAGE), requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(steps):
        loss = router_loss(torch.softmax(logits, 0), p_i, p_t, g_i, g_t, RouterBetas(), **masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [round(float(w), 4) for w in torch.softmax(logits.detach(), 0)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=500)
    args = parser.parse_args()
    out = {"clients": ["paired", "paired", "image-only", "image-only", "text-only"]}
    for reading in ("literal", "revised"):
        runs = [
            optimum(s, reading == "revised", args.dim, args.noise, args.steps) for s in args.seeds
        ]
        out[reading] = {
            "weights": runs,
            "paired_mean": round(sum(w[0] + w[1] for w in runs) / (2 * len(runs)), 4),
            "unimodal_mean": round(sum(sum(w[2:]) for w in runs) / (3 * len(runs)), 4),
        }
        print(f"{reading:8s}", *runs, sep="\n  ")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
