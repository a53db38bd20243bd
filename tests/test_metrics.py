"""Tests for ``retrieval.metrics``: hand-computed ranks, protocols, ties, batching, validation.

Most cases use one-hot image embeddings e_0..e_{N-1}, so that score(image i, caption j) is
exactly caption_j[i] (a product with 1 plus zeros: no rounding). A caption row is then written
directly as its scores against the images, plus one slack coordinate that makes its L2 norm 1
and is orthogonal to every image.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rcsr_flower.retrieval.metrics import RECALL_KEYS, format_recall, retrieval_recall


def one_hot_problem(
    scores: list[list[float]], t2i: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings whose caption x image score matrix is exactly ``scores`` ([M][N])."""
    s = torch.tensor(scores, dtype=torch.float32)
    n = s.shape[1]
    slack = (1.0 - (s.double() ** 2).sum(1)).clamp_min(0).sqrt().float()
    assert bool(((s.double() ** 2).sum(1) <= 1).all()), "a caption row has norm > 1"
    img = torch.cat([torch.eye(n), torch.zeros(n, 1)], 1)
    txt = torch.cat([s, slack[:, None]], 1)
    return img, txt, torch.tensor(t2i)


# 4 images A, B, C, D (columns), 5 captions each (rows, caption j belongs to image j // 5).
# Each row: scores of that caption against [A, B, C, D].
HAND_SCORES = [
    # captions of A (0-4)
    [0.90, 0.10, 0.10, 0.10],  # c0:  own 0.9 is the max            -> t2i rank 1
    [0.50, 0.10, 0.10, 0.10],  # c1:                                  -> t2i rank 1
    [0.30, 0.10, 0.60, 0.10],  # c2:  C (0.6) beats own 0.3           -> t2i rank 2
    [0.20, 0.40, 0.60, 0.10],  # c3:  B (0.4) and C (0.6) beat 0.2    -> t2i rank 3
    [0.20, 0.10, 0.60, 0.10],  # c4:  C beats own                     -> t2i rank 2
    # captions of B (5-9)
    [0.10, 0.30, 0.10, 0.10],  # c5:                                  -> t2i rank 1
    [0.10, 0.20, 0.60, 0.10],  # c6:  C beats own                     -> t2i rank 2
    [0.10, 0.20, 0.60, 0.10],  # c7:                                  -> t2i rank 2
    [0.10, 0.20, 0.60, 0.10],  # c8:                                  -> t2i rank 2
    [0.70, 0.20, 0.10, 0.10],  # c9:  A beats own                     -> t2i rank 2
    # captions of C (10-14)
    [0.10, 0.35, 0.50, 0.10],  # c10: B 0.35 < own 0.5                -> t2i rank 1
    [0.10, 0.10, 0.40, 0.10],  # c11:                                 -> t2i rank 1
    [0.10, 0.10, 0.30, 0.10],  # c12:                                 -> t2i rank 1
    [0.10, 0.10, 0.20, 0.10],  # c13:                                 -> t2i rank 1
    [0.10, 0.10, 0.05, 0.10],  # c14: A, B, D (0.1) all beat 0.05     -> t2i rank 4
    # captions of D (15-19); each scores 0.55 with C (distractors for image C)
    [0.10, 0.10, 0.55, 0.05],  # c15: D's FIRST caption, all beat it  -> t2i rank 4
    [0.10, 0.10, 0.55, 0.20],  # c16: C beats own                     -> t2i rank 2
    [0.10, 0.10, 0.55, 0.80],  # c17: D's best caption                -> t2i rank 1
    [0.10, 0.10, 0.55, 0.30],  # c18: C beats own                     -> t2i rank 2
    [0.10, 0.10, 0.55, 0.15],  # c19: C beats own (A, B 0.1 < 0.15)   -> t2i rank 2
]
HAND_T2I = [j // 5 for j in range(20)]


def hand_problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return one_hot_problem(HAND_SCORES, HAND_T2I)


def test_hand_built_standard() -> None:
    img, txt, t2i = hand_problem()
    r = retrieval_recall(img, txt, t2i)
    # i2t (columns; an image's rank = 1 + #captions of OTHER images >= its best own caption):
    #   A: best own c0 = 0.9; best negative is c9 = 0.7          -> rank 1
    #   B: best own c5 = 0.3; negatives >= 0.3: c3 (0.4), c10 (0.35) -> rank 3
    #   C: best own c10 = 0.5; negatives >= 0.5: c2, c3, c4, c6, c7, c8 (0.6) and
    #      c15..c19 (0.55) = 11                                   -> rank 12 (beyond 10)
    #   D: best own c17 = 0.8; every negative is 0.1             -> rank 1
    # ranks [1, 3, 12, 1]: R@1 = 2/4, R@5 = R@10 = 3/4; median of [1, 1, 3, 12] = (1 + 3) / 2.
    assert r["i2t_r1"] == 50.0
    assert r["i2t_r5"] == 75.0
    assert r["i2t_r10"] == 75.0
    assert r["i2t_medr"] == 2.0
    # t2i ranks (from the row comments): rank 1 x8 (c0 c1 c5 c10 c11 c12 c13 c17),
    # rank 2 x9, rank 3 x1 (c3), rank 4 x2 (c14 c15). R@1 = 8/20; with 4 images every rank
    # is <= 4, so R@5 = R@10 = 100. Sorted, ranks 9..17 are 2, so the 10th/11th are both 2.
    assert r["t2i_r1"] == 40.0
    assert r["t2i_r5"] == 100.0
    assert r["t2i_r10"] == 100.0
    assert r["t2i_medr"] == 2.0
    assert r["rsum"] == 50 + 75 + 75 + 40 + 100 + 100  # 440
    assert r["protocol"] == "standard"


def test_i2t_hit_when_any_caption_is_top_k() -> None:
    img, txt, t2i = hand_problem()
    # D's first caption c15 scores 0.05 with D, below every caption of A, B, C (0.1 each).
    # Problem 1: drop c16..c19, so c15 is D's only caption.
    #   D: all 15 negatives >= 0.05                                     -> rank 16 (a miss)
    #   A: best 0.9 vs max negative 0.7 (c9)                            -> rank 1
    #   B: c3 (0.4), c10 (0.35) >= 0.3                                  -> rank 3
    #   C: c2, c3, c4, c6, c7, c8 (0.6) and c15 (0.55) >= 0.5           -> rank 8
    # ranks [1, 3, 8, 16]: R@1 25, R@10 75, median (3 + 8) / 2.
    keep = list(range(16))
    r = retrieval_recall(img, txt[keep], t2i[keep], ks=(1, 10))
    assert (r["i2t_r1"], r["i2t_r10"], r["i2t_medr"]) == (25.0, 75.0, 5.5)
    # Problem 2: add back c17 (0.8 with D) AFTER c15: D now has a caption above all 15
    # negatives (0.1) -> rank 1, although its first caption is still ranked last. A and B are
    # unchanged, C gains c17 as a 0.55 negative -> rank 9. Ranks [1, 3, 9, 1]: R@1 50, R@10 100.
    keep = [*range(16), 17]
    r = retrieval_recall(img, txt[keep], t2i[keep], ks=(1, 10))
    assert (r["i2t_r1"], r["i2t_r10"], r["i2t_medr"]) == (50.0, 100.0, 2.0)


def test_hand_built_paired() -> None:
    img, txt, t2i = hand_problem()
    r = retrieval_recall(img, txt, t2i, protocol="paired")
    # Only the first caption of each image: c0 (A), c5 (B), c10 (C), c15 (D), i.e. the 4x4
    #        A     B     C     D
    #  c0  0.90  0.10  0.10  0.10   -> t2i rank 1
    #  c5  0.10  0.30  0.10  0.10   -> t2i rank 1
    #  c10 0.10  0.35  0.50  0.10   -> t2i rank 1
    #  c15 0.10  0.10  0.55  0.05   -> t2i rank 4
    # i2t (columns): A 1; B: c10 0.35 >= 0.3 -> 2; C: c15 0.55 >= 0.5 -> 2; D: all 0.1 > 0.05 -> 4.
    assert r["i2t_r1"] == 25.0
    assert r["i2t_r5"] == 100.0
    assert r["i2t_r10"] == 100.0
    assert r["i2t_medr"] == 2.0  # median of [1, 2, 2, 4]
    assert r["t2i_r1"] == 75.0
    assert r["t2i_r5"] == 100.0
    assert r["t2i_r10"] == 100.0
    assert r["t2i_medr"] == 1.0  # median of [1, 1, 1, 4]
    assert r["rsum"] == 25 + 100 + 100 + 75 + 100 + 100  # 500
    assert r["protocol"] == "paired"


def test_paired_uses_first_caption_in_given_order() -> None:
    img, txt, t2i = hand_problem()
    # Put c17 (D's best, 0.8) before c15 in the caption order: D's first caption is now c17.
    perm = [*range(15), 17, 15, 16, 18, 19]
    r = retrieval_recall(img, txt[perm], t2i[perm], protocol="paired")
    # 4x4 rows c0, c5, c10, c17. t2i: c17 [0.1, 0.1, 0.55, 0.8] -> rank 1, so ranks [1, 1, 1, 1].
    # i2t: A 1; B: c10 0.35 >= 0.3 -> 2; C: negatives c0 0.1, c5 0.1, c17 0.55 >= 0.5 -> 2;
    #      D: 0.8 vs 0.1s -> 1. Ranks [1, 2, 2, 1].
    assert r["t2i_r1"] == 100.0
    assert r["i2t_r1"] == 50.0
    assert r["i2t_medr"] == 1.5  # median of [1, 1, 2, 2]
    # The standard protocol does not depend on caption order.
    assert retrieval_recall(img, txt[perm], t2i[perm]) == retrieval_recall(img, txt, t2i)


def test_all_equal_embeddings_are_pessimistic() -> None:
    # 20 images x 2 captions, every embedding the same unit vector: every score is exactly 1.
    n, per = 20, 2
    img = torch.zeros(n, 8)
    img[:, 0] = 1
    txt = torch.zeros(n * per, 8)
    txt[:, 0] = 1
    t2i = torch.arange(n * per) // per
    r = retrieval_recall(img, txt, t2i)
    # t2i: the 19 other images tie with the own image and count as above it -> rank 20 for
    # every caption; i2t: the 38 captions of other images tie -> rank 39. With >= 1 negative a
    # tie never gives a hit at 1; here even R@10 is 0 (rank 20 > 10). An optimistic rule would
    # give 100 everywhere.
    for key in RECALL_KEYS:
        assert r[key] == 0.0
    assert r["rsum"] == 0.0
    assert r["t2i_medr"] == 20.0
    assert r["i2t_medr"] == 39.0
    # Two images, one caption each: the single negative ties -> rank 2 both ways, so R@1 is 0
    # while R@5 (any rank <= 5) is 100.
    r2 = retrieval_recall(img[:2], txt[:2], torch.tensor([0, 1]), ks=(1, 5))
    assert (r2["i2t_r1"], r2["i2t_r5"], r2["t2i_r1"], r2["t2i_r5"]) == (0.0, 100.0, 0.0, 100.0)
    # Only one image: nothing to tie with, rank 1.
    r1 = retrieval_recall(img[:1], txt[:3], torch.tensor([0, 0, 0]), ks=(1,))
    assert (r1["i2t_r1"], r1["t2i_r1"]) == (100.0, 100.0)


def test_ties_with_known_count() -> None:
    # 4 images; 4 captions, caption j belongs to image j.
    scores = [
        [0.40, 0.40, 0.50, 0.40],  # c0: own 0.4; B, D tie (0.4), C above (0.5) -> t2i rank 4
        [0.40, 0.40, 0.10, 0.10],  # c1: own 0.4; A ties                        -> t2i rank 2
        [0.20, 0.20, 0.30, 0.30],  # c2: own 0.3; D ties                        -> t2i rank 2
        [0.10, 0.10, 0.10, 0.40],  # c3: own 0.4, the max                       -> t2i rank 1
    ]
    img, txt, t2i = one_hot_problem(scores, [0, 1, 2, 3])
    r = retrieval_recall(img, txt, t2i, ks=(1, 2, 3))
    # t2i ranks [4, 2, 2, 1]: R@1 25, R@2 75, R@3 75, median (2 + 2) / 2 = 2.
    assert (r["t2i_r1"], r["t2i_r2"], r["t2i_r3"], r["t2i_medr"]) == (25.0, 75.0, 75.0, 2.0)
    # i2t (columns): A: own c0 0.4; c1 ties (0.4)            -> 2
    #                B: own c1 0.4; c0 ties (0.4)            -> 2
    #                C: own c2 0.3; c0 0.5 above             -> 2
    #                D: own c3 0.4; c0 ties (0.4), c2 0.3 no -> 2
    # ranks [2, 2, 2, 2]: R@1 0, R@2 100.
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_medr"]) == (0.0, 100.0, 2.0)


def test_i2t_ties_between_positives_do_not_count() -> None:
    # Image 0 has 3 captions all scoring 0.5 (its positives tie with each other) and one
    # negative (caption of image 1) at 0.5 as well: rank = 1 + 1 tied negative = 2, not 4.
    scores = [[0.5, 0.1], [0.5, 0.1], [0.5, 0.1], [0.5, 0.8]]
    img, txt, t2i = one_hot_problem(scores, [0, 0, 0, 1])
    r = retrieval_recall(img, txt, t2i, ks=(1, 2))
    # Image 1: own 0.8, negatives 0.1 -> rank 1. Ranks [2, 1].
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_medr"]) == (50.0, 100.0, 1.5)


def test_perfect_retrieval() -> None:
    n, per = 12, 5
    img = torch.eye(n)
    t2i = torch.arange(n * per) // per
    txt = img[t2i]
    for protocol in ("standard", "paired"):
        r = retrieval_recall(img, txt, t2i, protocol=protocol)
        assert all(r[k] == 100.0 for k in RECALL_KEYS)
        assert r["rsum"] == 600.0
        assert r["i2t_medr"] == 1.0
        assert r["t2i_medr"] == 1.0


# ------------------------------------------------------------------ reference comparisons


def brute_force(
    img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, protocol: str, ks: tuple[int, ...]
) -> dict[str, float | str]:
    """Full score matrix, one Python loop iteration per query, pessimistic ties."""
    t2i_list = t2i.tolist()
    n = img.shape[0]
    if protocol == "paired":
        first = [t2i_list.index(i) for i in range(n)]
        txt, t2i_list = txt[first], list(range(n))
    s = (img.float() @ txt.float().T).tolist()  # [N][M]
    m = len(t2i_list)
    i2t_ranks = []
    for i in range(n):
        best = max(s[i][j] for j in range(m) if t2i_list[j] == i)
        i2t_ranks.append(1 + sum(1 for j in range(m) if t2i_list[j] != i and s[i][j] >= best))
    t2i_ranks = []
    for j in range(m):
        own = s[t2i_list[j]][j]
        t2i_ranks.append(1 + sum(1 for i in range(n) if i != t2i_list[j] and s[i][j] >= own))
    out: dict[str, float | str] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
    out["rsum"] = float(sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks))
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        r = sorted(ranks)
        h = len(r) // 2
        out[f"{name}_medr"] = float(r[h]) if len(r) % 2 else (r[h - 1] + r[h]) / 2
    out["protocol"] = protocol
    return out


def random_t2i(n: int, m: int, g: torch.Generator) -> torch.Tensor:
    """Every image gets >= 1 caption, the rest at random, in shuffled caption order."""
    t2i = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=g)])
    return t2i[torch.randperm(m, generator=g)]


def random_problem(n: int, m: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    t2i = random_t2i(n, m, g)
    img = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    # Captions near their image so that ranks spread over 1..N, not just chance.
    txt = torch.randn(m, d, generator=g) + 1.5 * img[t2i]
    return img, torch.nn.functional.normalize(txt, dim=1), t2i


def sign_problem(n: int, m: int, seed: int):
    """Entries +-0.25 in d=16: unit norm, and every dot product is a multiple of 1/16 computed
    exactly in float32 in any summation order, so ties are many and exact."""
    g = torch.Generator().manual_seed(seed)
    t2i = random_t2i(n, m, g)
    img = (torch.randint(0, 2, (n, 16), generator=g) * 2 - 1) * 0.25
    txt = (torch.randint(0, 2, (m, 16), generator=g) * 2 - 1) * 0.25
    # Inject more ties: some captions are exact copies of an image (own or other).
    copy = torch.randperm(m, generator=g)[: m // 3]
    txt[copy] = img[torch.randint(0, n, (copy.numel(),), generator=g)]
    img[: n // 4] = img[n // 4 : 2 * (n // 4)]  # duplicate images
    return img.float(), txt.float(), t2i


@pytest.mark.parametrize("protocol", ["standard", "paired"])
def test_batch_size_invariance(protocol: str) -> None:
    img, txt, t2i = random_problem(37, 160, 24, seed=0)
    ks = (1, 5, 10)
    results = [
        retrieval_recall(img, txt, t2i, protocol=protocol, ks=ks, batch_size=bs)
        for bs in (1, 3, 1024)
    ]
    assert results[0] == results[1] == results[2]
    assert results[0] == brute_force(img, txt, t2i, protocol, ks)
    assert 0 < results[0]["rsum"] < 600  # not a degenerate case


@pytest.mark.parametrize("protocol", ["standard", "paired"])
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_brute_force_with_ties(protocol: str, seed: int) -> None:
    img, txt, t2i = sign_problem(29, 113, seed)
    ks = (1, 2, 5, 10)
    expected = brute_force(img, txt, t2i, protocol, ks)
    for bs in (1, 4, 1024):
        assert retrieval_recall(img, txt, t2i, protocol=protocol, ks=ks, batch_size=bs) == expected


# ------------------------------------------------------------------ output and input handling


def test_output_types_keys_and_format() -> None:
    img, txt, t2i = hand_problem()
    r = retrieval_recall(img, txt, t2i)
    assert list(r) == [*RECALL_KEYS, "rsum", "i2t_medr", "t2i_medr", "protocol"]
    assert all(type(v) is float for k, v in r.items() if k != "protocol")
    assert json.loads(json.dumps(r)) == r
    assert math.isclose(float(r["rsum"]), sum(float(r[k]) for k in RECALL_KEYS))
    assert format_recall(r) == (
        "i2t R@1/5/10 50.0/75.0/75.0 medr 2.0 | t2i R@1/5/10 40.0/100.0/100.0 medr 2.0"
        " | rsum 440.0 (standard)"
    )
    r2 = retrieval_recall(img, txt, t2i, ks=(10, 2))
    assert list(r2)[:4] == ["i2t_r10", "i2t_r2", "t2i_r10", "t2i_r2"]
    assert format_recall(r2).startswith("i2t R@2/10 ")


def test_accepts_other_dtypes_and_grad_tensors() -> None:
    img, txt, t2i = hand_problem()
    expected = retrieval_recall(img, txt, t2i)
    img64 = img.double().requires_grad_()
    assert retrieval_recall(img64, txt.double(), t2i.int()) == expected
    assert retrieval_recall(img, txt, t2i.tolist()) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_emb": torch.zeros(4, 3)}, "dims mismatch"),
        ({"image_emb": torch.zeros(4)}, "image_emb must be 2-D"),
        ({"text_emb": torch.zeros(2, 6, 5)}, "text_emb must be 2-D"),
        ({"text_emb": torch.zeros(0, 5)}, "text_emb is empty"),
        ({"text_to_image": torch.tensor([0, 1, 2])}, r"text_to_image must have shape \[4\]"),
        ({"text_to_image": torch.tensor([0.0, 1.0, 2.0, 3.0])}, "integer tensor"),
        ({"text_to_image": torch.tensor([0, 1, 2, 4])}, "out of range"),
        ({"text_to_image": torch.tensor([0, 1, 2, -1])}, "out of range"),
        ({"text_to_image": torch.tensor([0, 1, 1, 3])}, r"images with no caption: \[2\]"),
        ({"protocol": "paired", "text_to_image": torch.tensor([0, 0, 1, 1])}, "no caption"),
        ({"protocol": "1:1"}, "unknown protocol"),
        ({"ks": ()}, "ks must be"),
        ({"ks": (0, 1)}, "ks must be"),
        ({"ks": (1, 1)}, "duplicates"),
        ({"batch_size": 0}, "batch_size"),
        ({"image_emb": torch.zeros(4, 5, dtype=torch.long)}, "floating-point"),
        ({"image_emb": torch.full((4, 5), float("nan"))}, "image_emb contains non-finite"),
        ({"text_emb": torch.full((4, 5), float("inf"))}, "text_emb contains non-finite"),
    ],
)
def test_validation(kwargs: dict, match: str) -> None:
    args = {
        "image_emb": torch.eye(4, 5),
        "text_emb": torch.eye(4, 5),
        "text_to_image": torch.arange(4),
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        retrieval_recall(
            args.pop("image_emb"), args.pop("text_emb"), args.pop("text_to_image"), **args
        )
