"""Image-text retrieval recall (R@K, rsum, median rank), §6.

One function, :func:`retrieval_recall`, is the only place ranks are computed: the server's
global evaluation, the clients' local evaluation and the benchmarks all call it, so every
number in the project comes from the same definition.

- **Pure**: tensors in, a JSON-serialisable ``dict`` of plain floats out; no state, no I/O,
  inputs are never modified.
- **Batched**: the score matrix is built ``batch_size`` query rows at a time, so a
  5,000 x 25,000 evaluation never materialises all 125M scores. Ranks are counted, not sorted
  (one comparison pass per chunk), which is also faster than an argsort evaluator.
- **Pessimistic ties**: a negative scoring *equal* to the positive counts as ranked above it,
  i.e. ``rank = 1 + #negatives with score >= positive score``. A degenerate model (all
  embeddings equal) therefore gets chance/zero recall rather than a flattering 100%.
  Both the positive and the negatives it is compared with come from the same row of the
  same matmul, so an exact tie is seen as one.

Protocols:

- ``"standard"`` (CLIP_benchmark): every caption is a text->image query whose only positive is
  its own image; every image is an image->text query that is a hit at K when *any* of its
  captions is in the top K. Its rank is ``1 + #captions of other images scoring >= its
  best-scoring caption``; its other captions never count against it.
- ``"paired"`` (the paper authors' 1:1 evaluator): only the first caption of each image (lowest
  caption index, in the order given) is kept, giving an N x N problem with one positive per
  query in each direction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["PROTOCOLS", "RECALL_KEYS", "format_recall", "retrieval_recall"]

PROTOCOLS = ("standard", "paired")
RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


def retrieval_recall(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    *,
    protocol: str = "standard",
    ks: tuple[int, ...] = (1, 5, 10),
    batch_size: int = 1024,
) -> dict[str, float | str]:
    """Recall@K both ways, their sum and median ranks for one retrieval problem.

    Args:
        image_emb: ``[N, d]`` image embeddings, already L2-normalised (not re-normalised here:
            scores are plain dot products).
        text_emb: ``[M, d]`` caption embeddings, already L2-normalised.
        text_to_image: ``[M]`` integer tensor (or int sequence), the index in ``image_emb`` of
            each caption's image. Every image must have at least one caption.
        protocol: ``"standard"`` or ``"paired"`` (see the module docstring).
        ks: the cut-offs K; one ``i2t_r{K}`` and one ``t2i_r{K}`` key each.
        batch_size: query rows of the score matrix computed at once; at most
            ``batch_size * max(N, M)`` float32 scores (plus a bool mask of the same shape)
            exist at any time. 1024 keeps 5,000 x 25,000 at ~100 MiB of scores.

    Returns:
        ``{"i2t_r{K}"..., "t2i_r{K}"..., "rsum", "i2t_medr", "t2i_medr", "protocol"}``:
        recalls in percent (0..100), ``rsum`` their sum, median 1-based ranks (mean of the two
        middle ranks for an even count), and the protocol name. All numbers are Python floats.

    Scores are computed in float32 on ``image_emb``'s device (``text_emb`` and
    ``text_to_image`` are moved there). Raises ``ValueError`` on malformed input.
    """
    ks = _check_ks(ks)
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    img, txt, t2i, counts = _check_inputs(image_emb, text_emb, text_to_image)
    n, m = img.shape[0], txt.shape[0]

    with torch.no_grad():
        if protocol == "paired":
            # First caption of each image = lowest caption index pointing at it.
            first = torch.full((n,), m, dtype=torch.long, device=img.device)
            first.scatter_reduce_(0, t2i, torch.arange(m, device=img.device), reduce="amin")
            txt, t2i = txt[first], torch.arange(n, device=img.device)
            counts = torch.ones(n, dtype=torch.long, device=img.device)
        i2t_ranks, t2i_ranks = _ranks(img, txt, t2i, counts, batch_size)

    out: dict[str, float | str] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * int((ranks <= k).sum()) / ranks.numel()
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks))
    out["i2t_medr"] = _median(i2t_ranks)
    out["t2i_medr"] = _median(t2i_ranks)
    out["protocol"] = protocol
    return out


def format_recall(m: Mapping[str, float | str]) -> str:
    """One log line for a :func:`retrieval_recall` result, e.g.

    ``i2t R@1/5/10 12.3/34.5/45.6 medr 3.0 | t2i R@1/5/10 ... | rsum 123.4 (standard)``.
    Works for any ``ks`` (read from the keys); missing parts are left out.
    """
    parts = []
    for d in ("i2t", "t2i"):
        prefix = f"{d}_r"
        ks = sorted(
            int(k[len(prefix) :]) for k in m if k.startswith(prefix) and k[len(prefix) :].isdigit()
        )
        if not ks:
            continue
        recalls = "/".join(f"{float(m[f'{prefix}{k}']):.1f}" for k in ks)
        part = f"{d} R@{'/'.join(map(str, ks))} {recalls}"
        if f"{d}_medr" in m:
            part += f" medr {float(m[f'{d}_medr']):.1f}"
        parts.append(part)
    if "rsum" in m:
        parts.append(f"rsum {float(m['rsum']):.1f}")
    line = " | ".join(parts)
    if "protocol" in m:
        line += f" ({m['protocol']})"
    return line


# --------------------------------------------------------------------------- internals


def _ranks(
    img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, counts: torch.Tensor, bs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-based pessimistic ranks: ``[N]`` image->text and ``[M]`` text->image.

    Images are processed ``bs`` at a time (a ``[bs, M]`` score block), captions likewise
    (``[bs, N]``). When all N images fit in one block, that one ``[N, M]`` matrix serves both
    directions (half the matmul work: the usual case of a 1k-image test set).
    """
    n, m = img.shape[0], txt.shape[0]
    # Captions grouped by image: the positives of images [s, e) are order[offsets[s]:offsets[e]].
    order = torch.argsort(t2i, stable=True)
    if n <= bs:  # one block is the whole [N, M] matrix: read t2i off its columns
        scores = img @ txt.T
        pos = scores.gather(0, t2i[None, :])  # [1, M] each caption's own-image score
        # The t2i count includes the positive itself: 1 + #negatives >= it.
        return _i2t_block(scores, 0, t2i, order), _count(scores >= pos, 0)
    offsets = [0, *torch.cumsum(counts, 0).tolist()]
    i2t = torch.empty(n, dtype=torch.int32, device=img.device)
    for s in range(0, n, bs):
        e = min(s + bs, n)
        scores = img[s:e] @ txt.T  # [B, M]
        i2t[s:e] = _i2t_block(scores, s, t2i, order[offsets[s] : offsets[e]])
        del scores  # free it before the next block is computed
    t2i_ranks = torch.empty(m, dtype=torch.int32, device=img.device)
    for s in range(0, m, bs):
        e = min(s + bs, m)
        scores = txt[s:e] @ img.T  # [B, N]
        pos = scores.gather(1, t2i[s:e, None])
        t2i_ranks[s:e] = _count(scores >= pos, 1)  # includes the positive, as above
        del scores
    return i2t, t2i_ranks


def _i2t_block(scores: torch.Tensor, s: int, t2i: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Ranks of images ``s .. s+B-1`` from their ``[B, M]`` scores; ``cap``: their captions.

    rank = 1 + #captions >= the best positive - #positives >= it (at least the best itself),
    i.e. other positives never count against the image.
    """
    row = t2i[cap] - s  # local query row of each positive caption
    pos = scores[row, cap]
    best = torch.full((scores.shape[0],), float("-inf"), device=scores.device)
    best.scatter_reduce_(0, row, pos, reduce="amax")
    n_ge = _count(scores >= best[:, None], 1)
    n_pos_ge = torch.zeros_like(n_ge).scatter_add_(0, row, (pos >= best[row]).to(n_ge.dtype))
    return 1 + n_ge - n_pos_ge


def _count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """True entries along ``dim``; int32 accumulation is ~3x faster than bool.sum()'s int64."""
    return mask.sum(dim, dtype=torch.int32)


def _median(ranks: torch.Tensor) -> float:
    """Median as a float; the mean of the two middle values for an even count (as numpy)."""
    r = ranks.sort().values
    n = r.numel()
    if n % 2:
        return float(r[n // 2])
    return (float(r[n // 2 - 1]) + float(r[n // 2])) / 2.0


def _check_ks(ks: tuple[int, ...]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple of positive ints, got {ks!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has duplicates: {ks!r}")
    return ks


def _check_inputs(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate shapes, dtypes, index range, coverage and finiteness; return float32 tensors
    on ``image_emb``'s device and the caption count per image."""
    for name, x in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    n, d = image_emb.shape
    m, d_text = text_emb.shape
    if d != d_text:
        raise ValueError(f"embedding dims mismatch: image_emb has d={d}, text_emb has d={d_text}")
    if not isinstance(text_to_image, torch.Tensor):
        text_to_image = torch.as_tensor(text_to_image)
    if text_to_image.ndim != 1 or text_to_image.shape[0] != m:
        raise ValueError(
            f"text_to_image must have shape [{m}] (one image index per caption), "
            f"got {tuple(text_to_image.shape)}"
        )
    if (
        text_to_image.is_floating_point()
        or text_to_image.is_complex()
        or text_to_image.dtype == torch.bool
    ):
        raise ValueError(f"text_to_image must be an integer tensor, got {text_to_image.dtype}")

    device = image_emb.device
    img = image_emb.detach().to(device=device, dtype=torch.float32)
    txt = text_emb.detach().to(device=device, dtype=torch.float32)
    t2i = text_to_image.detach().to(device=device, dtype=torch.long)
    lo, hi = int(t2i.min()), int(t2i.max())
    if lo < 0 or hi >= n:
        raise ValueError(
            f"text_to_image out of range: values in [{lo}, {hi}] but there are {n} images"
        )
    counts = torch.bincount(t2i, minlength=n)
    if bool((counts == 0).any()):
        missing = torch.nonzero(counts == 0).flatten()
        shown = missing[:5].tolist()
        more = f" (and {missing.numel() - 5} more)" if missing.numel() > 5 else ""
        raise ValueError(f"images with no caption: {shown}{more}; every image needs >= 1 caption")
    for name, x in (("image_emb", img), ("text_emb", txt)):
        if not bool(torch.isfinite(x.sum(dtype=torch.float64))):  # NaN/inf propagate; no overflow
            raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return img, txt, t2i, counts


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A short table of the global metrics per evaluated round."""
    head = f"{'round':>5} " + " ".join(f"{k:>8}" for k in RECALL_KEYS) + f" {'rsum':>7}"
    lines = [head, "-" * len(head)]
    for row in rows:
        g = row.get("global")
        if not g:
            continue
        vals = " ".join(f"{g[k]:8.2f}" for k in RECALL_KEYS)
        lines.append(f"{row['round']:>5} {vals} {g['rsum']:7.2f}")
    if len(lines) > 2:
        lines.append(f"(global test split, protocol: {rows[-1].get('global', {}).get('protocol')})")
    return "\n".join(lines)
