"""Confidence intervals for the toy quality benchmark (:mod:`sparse_cache.toy.quality`).

- An **accuracy** (a proportion of independent samples answered right) gets the Wilson score interval, a closed
  form with close to nominal coverage down to 0 or ``n`` successes, where a percentile bootstrap collapses
  to the single point ``0`` or ``1`` and claims a certainty 200 samples do not give.
- A **mean** of per-sample values (the share of the queried cells kept) gets a percentile bootstrap over the
  samples: ``BOOTSTRAP_RESAMPLES`` resamples with replacement, the central ``confidence`` share of their means.
- A **difference between two methods run on the same samples** gets a paired percentile bootstrap of the
  per-sample differences. Pairing removes the between-sample variance both methods share (an easy board is
  easy for both), so it separates differences that two overlapping marginal intervals would not; a difference
  is called only when its interval excludes 0.

Resampling indices depend only on ``(n, resamples, seed)``: every method evaluated on the same ``n`` samples
is resampled with the same indices (the marginal intervals are paired too), and a report is reproducible bit
for bit. The intervals quantify the sampling of the task's boards (what changes with the data seed), not the
training run of the model (docs/toy-vlm.md shows that the best scoring layer changes between training runs).
"""

from __future__ import annotations

import math
from functools import lru_cache
from statistics import NormalDist
from typing import Sequence

import numpy as np

__all__ = [
    "CONFIDENCE",
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "z_value",
    "wilson_interval",
    "bootstrap_indices",
    "bootstrap_interval",
    "paired_difference",
    "intervals_separate",
]

#: two-sided confidence level of every interval in the quality report
CONFIDENCE = 0.95
#: bootstrap resamples (the Monte Carlo error of a 95% percentile bound is then about 0.1 of a standard error)
BOOTSTRAP_RESAMPLES = 4000
#: seed of the bootstrap's resampling indices (fixed: a report is reproducible)
BOOTSTRAP_SEED = 2024


def _check_confidence(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence: must be in (0, 1), got {confidence!r}")
    return float(confidence)


def z_value(confidence: float = CONFIDENCE) -> float:
    """The standard normal quantile of a two-sided ``confidence`` interval (1.95996... for 0.95)."""
    return NormalDist().inv_cdf(0.5 + _check_confidence(confidence) / 2)


def wilson_interval(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``; ``(nan, nan)`` when ``n == 0``."""
    if int(n) != n or n < 0:
        raise ValueError(f"n: must be a non-negative integer, got {n!r}")
    if int(successes) != successes or not 0 <= successes <= n:
        raise ValueError(f"successes: must be an integer in [0, n={n}], got {successes!r}")
    z = z_value(confidence)
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # clamp the rounding at the ends (0 and n successes give exactly 0 / 1 in exact arithmetic)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


@lru_cache(maxsize=16)
def _indices(n: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, n, resamples])
    out = rng.integers(0, n, size=(resamples, n), dtype=np.int32)
    out.flags.writeable = False
    return out


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``(resamples, n)`` indices into ``n`` samples, drawn with replacement; a function of its arguments only."""
    if int(n) != n or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    if int(resamples) != resamples or resamples < 1:
        raise ValueError(f"resamples: must be a positive integer, got {resamples!r}")
    return _indices(int(n), int(resamples), int(seed))


def _values(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {array.shape}")
    if np.isnan(array).any():
        raise ValueError(f"{name}: contains NaN; drop the samples the metric does not apply to first")
    return array


def _percentile(means: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1 - _check_confidence(confidence)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def bootstrap_interval(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)``; ``(nan, nan)`` for no values."""
    array = _values(values, "values")
    _check_confidence(confidence)
    if array.size == 0:
        return math.nan, math.nan
    means = array[bootstrap_indices(array.size, resamples, seed)].mean(axis=1)
    return _percentile(means, confidence)


def paired_difference(
    a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """``mean(a) - mean(b)`` for two methods measured on the same samples (``a[i]`` and ``b[i]`` on sample ``i``),
    with a paired percentile bootstrap interval.

    Returns ``{"difference", "ci": [lo, hi], "n", "separated"}``; ``separated`` is True when the interval
    excludes 0 (a difference is called), False otherwise (including for no samples).
    """
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a, b: must be measured on the same samples, got {a.size} and {b.size} values")
    if a.size == 0:
        return {"difference": math.nan, "ci": [math.nan, math.nan], "n": 0, "separated": False}
    lo, hi = bootstrap_interval(a - b, confidence, resamples, seed)
    return {"difference": float(np.mean(a - b)), "ci": [lo, hi], "n": int(a.size), "separated": lo > 0 or hi < 0}


def intervals_separate(first: Sequence[float], second: Sequence[float]) -> bool:
    """Whether two intervals ``[lo, hi]`` are disjoint (a conservative test of a difference between two figures)."""
    (lo1, hi1), (lo2, hi2) = first, second
    if any(isinstance(x, float) and math.isnan(x) for x in (lo1, hi1, lo2, hi2)):
        return False
    return hi1 < lo2 or hi2 < lo1
