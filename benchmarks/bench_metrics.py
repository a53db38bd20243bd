"""How fast the batched retrieval evaluator is, and how little memory it needs, beside a naive one.

Benchmarks ``retrieval.metrics.retrieval_recall`` (run: ``python benchmarks/bench_metrics.py``).
Times the batched evaluator on 1,000 x 5,000 and 5,000 x 25,000 problems (d=512, 5 captions
per image, captions = noisy copies of their image, all L2-normalised), both protocols, and
prints the largest score block the batch size implies next to the full score matrix. At
1,000 x 5,000 it also times a naive evaluator (full score matrix, argsort of every row, the
usual way) side by side, checks that both give the same recalls (random float data has no
exact ties, so tie rules do not matter) and prints the speed ratio. About 15 s on 2 cores.

Ends with one JSON line: the wall seconds of each problem and protocol, and the side by
side (``batched_s``, ``naive_s``, ``ratio``, ``cpu_ratio``, ``same_recalls``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

try:
    from rcsr_flower.retrieval.metrics import format_recall, retrieval_recall
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from rcsr_flower.retrieval.metrics import format_recall, retrieval_recall

D = 512
CAPTIONS_PER_IMAGE = 5
T = TypeVar("T")
SIGNAL = 0.12  # image component of a caption vs unit-norm noise: CLIP-like recalls at 1k


def make_problem(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n, D, generator=g), dim=1)
    t2i = torch.arange(n * CAPTIONS_PER_IMAGE) // CAPTIONS_PER_IMAGE
    txt = torch.randn(n * CAPTIONS_PER_IMAGE, D, generator=g) / D**0.5 + SIGNAL * img[t2i]
    return img, torch.nn.functional.normalize(txt, dim=1), t2i


def naive_recall(
    img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Standard protocol the straightforward way: whole N x M matrix, argsort every row."""
    scores = img @ txt.T  # [N, M]
    n = img.shape[0]
    # i2t: first position in each image's sorted caption list that is one of its captions.
    order = scores.argsort(dim=1, descending=True)
    is_pos = t2i[order] == torch.arange(n)[:, None]
    i2t_ranks = is_pos.int().argmax(dim=1) + 1
    # t2i: position of each caption's own image in its sorted image list.
    order_t = scores.T.argsort(dim=1, descending=True)
    t2i_ranks = (order_t == t2i[:, None]).int().argmax(dim=1) + 1
    out = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * int((ranks <= k).sum()) / ranks.numel()
    return out


def timed(fn: Callable[[], T], repeats: int) -> tuple[float, float, T]:
    """(wall s, CPU s, result) of the fastest of ``repeats`` calls, after one untimed warm-up
    call if repeats > 1. CPU time (all threads) is less sensitive to other load on the box."""
    if repeats > 1:
        fn()
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        result = fn()
        best = min(best, (time.perf_counter() - w0, time.process_time() - c0))
    return best[0], best[1], result


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--skip-large", action="store_true", help="only 1,000 x 5,000")
    args = parser.parse_args()
    bs = args.batch_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch_size={bs}, d={D}")

    sizes = [1000] if args.skip_large else [1000, 5000]
    figures: dict[str, float | bool] = {}
    for n in sizes:
        img, txt, t2i = make_problem(n)
        m = txt.shape[0]
        for protocol in ("standard", "paired"):
            mq = m if protocol == "standard" else n  # captions in the problem
            full = n * mq * 4
            peak = max(min(bs, n) * mq, min(bs, mq) * n) * 4
            wall, cpu, res = timed(
                lambda img=img, txt=txt, t2i=t2i, protocol=protocol: retrieval_recall(
                    img, txt, t2i, protocol=protocol, batch_size=bs
                ),
                repeats=5 if n <= 1000 else 1,
            )
            figures[f"{protocol}_{n}x{mq}_s"] = round(wall, 4)
            print(
                f"{n:>5,} x {mq:>6,} {protocol:<8} {wall:6.3f} s (cpu {cpu:6.3f} s) | "
                f"score block {mib(peak)} vs "
                f"full {mib(full)} ({peak / full:.2f}x) | {format_recall(res)}"
            )

    # Side by side with the naive full-matrix argsort evaluator at 1,000 x 5,000.
    img, txt, t2i = make_problem(1000)
    w_ours, c_ours, ours = timed(lambda: retrieval_recall(img, txt, t2i, batch_size=bs), 5)
    w_naive, c_naive, naive = timed(lambda: naive_recall(img, txt, t2i), 5)
    same = all(ours[k] == v for k, v in naive.items())
    print(
        f"1,000 x 5,000 standard: batched {w_ours:.3f} s (cpu {c_ours:.3f} s) vs naive "
        f"full-matrix argsort {w_naive:.3f} s (cpu {c_naive:.3f} s) -> "
        f"{w_naive / w_ours:.1f}x faster wall, {c_naive / c_ours:.1f}x cpu; same recalls: {same}"
    )
    figures |= {
        "batched_s": round(w_ours, 4),
        "naive_s": round(w_naive, 4),
        "ratio": round(w_naive / w_ours, 2),
        "cpu_ratio": round(c_naive / c_ours, 2),
        "same_recalls": same,
        "batch_size": bs,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
