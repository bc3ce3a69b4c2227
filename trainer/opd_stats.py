"""95 % intervals for the OPD report: a held-out success rate, and student/expert on the same problems.

Why these two: a rate of binary rewards on n problems gets a Wilson score interval (it stays inside [0, 1] and
keeps its coverage near 0 and 1, where the experts score); a ratio of two such rates gets a paired percentile
bootstrap, because the recipe scores the student and the expert on the same held-out problems with the same
per-problem sampling seed, so their outcomes are correlated and resampling problems (not each side on its own)
keeps that correlation. The bootstrap's generator is seeded: the same outcomes give the same interval.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0


def wilson(outcomes: list[float], z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the success rate of `outcomes` (rewards in [0, 1]); (nan, nan) when empty."""
    n = len(outcomes)
    if n == 0:
        return (math.nan, math.nan)
    p = sum(outcomes) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at p = 0 or 1 the bound is exactly 0 or 1 (the formula lands a rounding error off)
    return (0.0 if p <= 0 else max(0.0, centre - half), 1.0 if p >= 1 else min(1.0, centre + half))


def paired_ratio_ci(numerator: list[float], denominator: list[float], resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(numerator) / mean(denominator), resampling problem indices (the
    i-th entries of both lists are the same problem). Resamples whose denominator is 0 are dropped; (nan, nan)
    when the lists are empty, of different lengths, or the denominator is 0 everywhere."""
    if not numerator or len(numerator) != len(denominator):
        return (math.nan, math.nan)
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    top, bottom = num[idx].mean(axis=1), den[idx].mean(axis=1)
    ratios = top[bottom > 0] / bottom[bottom > 0]
    if ratios.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return (float(lo), float(hi))
