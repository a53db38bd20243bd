"""Paired comparison over seeds: is method A better than method B, and by how much?

Cells of two methods with the same seed share the seed's partition, sampling and
initialisation, so their difference is paired: ``d_s = a_s − b_s`` over the seeds ``s``
both completed. :func:`paired_t` gives the mean difference, its two-sided t confidence
interval and the paired t-test's p-value. With three seeds (two degrees of freedom) the
interval is wide: it says how little three seeds can tell, which is the point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean of a − b
    low: float  # confidence interval of the mean difference
    high: float
    p: float  # two-sided paired t-test
    n: int  # pairs

    def __str__(self) -> str:
        p = "p<0.001" if self.p < 0.001 else f"p={self.p:.3f}"
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}], {p}"


def paired_t(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> PairedDifference | None:
    """Paired t over seeds of ``a − b``; None with fewer than two pairs (no spread to
    estimate). Identical differences (zero spread) give a zero-width interval and p = 0
    when the mean is non-zero, 1 when it is zero."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes, got {a.shape} and {b.shape}")
    n = len(a)
    if n < 2:
        return None
    d = a - b
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        return PairedDifference(mean, mean, mean, 0.0 if mean != 0 else 1.0, n)
    t_crit = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    p = float(2 * stats.t.sf(abs(mean / se), n - 1))
    return PairedDifference(mean, mean - t_crit * se, mean + t_crit * se, p, n)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``ddof=1``; None for one value)."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), (float(x.std(ddof=1)) if len(x) > 1 else None)
