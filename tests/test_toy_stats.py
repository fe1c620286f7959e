"""Confidence intervals of the toy quality benchmark (sparse_cache/toy/stats.py): closed forms, coverage,
pairing, reproducibility and bad input. No model is loaded here."""

import math

import numpy as np
import pytest

from sparse_cache.toy import stats
from sparse_cache.toy.stats import bootstrap_interval, intervals_separate, paired_difference, wilson_interval

Z95 = 1.959963984540054


def _binomial_pmf(n, p):
    return np.array([math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)])


def test_z_value():
    assert stats.z_value(0.95) == pytest.approx(Z95, abs=1e-12)
    assert stats.z_value(0.90) == pytest.approx(1.6448536269514722, abs=1e-12)


def test_wilson_matches_its_closed_form_and_a_published_value():
    # Newcombe (1998), Statistics in Medicine 17:857, example: 81 of 263 -> 0.2553 to 0.3662
    lo, hi = wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    # the ends have closed forms: 0 of n -> [0, z^2 / (n + z^2)], n of n -> [n / (n + z^2), 1]
    for n in (1, 10, 200, 400):
        assert wilson_interval(0, n) == (0.0, pytest.approx(Z95**2 / (n + Z95**2), rel=1e-12))
        assert wilson_interval(n, n) == (pytest.approx(n / (n + Z95**2), rel=1e-12), 1.0)
    # 200 of 200 is not certainty: the interval reaches down to 0.981
    assert wilson_interval(200, 200)[0] == pytest.approx(0.9812, abs=1e-4)
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


@pytest.mark.parametrize("n, p", [(200, 0.8), (400, 0.9), (200, 0.5), (100, 0.95)])
def test_wilson_coverage_is_close_to_nominal(n, p):
    """Exact coverage (sum of the binomial probabilities of the outcomes whose interval holds p)."""
    pmf = _binomial_pmf(n, p)
    covered = np.array([lo <= p <= hi for lo, hi in (wilson_interval(k, n) for k in range(n + 1))])
    coverage = float(pmf[covered].sum())
    assert 0.925 <= coverage <= 0.975, coverage


def test_intervals_contain_the_estimate():
    for n in (1, 2, 7, 200):
        for k in range(n + 1):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 10, 100, 400):
        for _ in range(20):
            values = rng.choice([0.0, 0.5, 1.0], size=n, p=[0.3, 0.2, 0.5])
            lo, hi = bootstrap_interval(values)
            assert lo <= values.mean() <= hi
            other = rng.choice([0.0, 1.0], size=n)
            result = paired_difference(values, other)
            assert result["ci"][0] <= result["difference"] <= result["ci"][1]
            assert result["difference"] == pytest.approx(values.mean() - other.mean())


def test_bootstrap_matches_the_normal_closed_form_on_a_large_sample():
    """For a mean of n = 400 Bernoulli values the percentile bootstrap is the normal interval p +- z*sqrt(p(1-p)/n)."""
    values = np.array([1.0] * 300 + [0.0] * 100)
    lo, hi = bootstrap_interval(values)
    half = Z95 * math.sqrt(0.75 * 0.25 / 400)
    assert lo == pytest.approx(0.75 - half, abs=0.006)
    assert hi == pytest.approx(0.75 + half, abs=0.006)
    # 90% is narrower than 95%, and the same data with no spread gives a point
    lo90, hi90 = bootstrap_interval(values, confidence=0.90)
    assert lo < lo90 < 0.75 < hi90 < hi
    assert bootstrap_interval([0.5] * 30) == (0.5, 0.5)
    assert all(math.isnan(x) for x in bootstrap_interval([]))


def test_bootstrap_coverage_on_a_known_distribution():
    """400 data sets of n = 100 draws from a known 3-valued distribution (the toy's recall takes 0, 1/2 and 1):
    the 95% percentile interval holds the true mean about 95% of the time."""
    rng = np.random.default_rng(1)
    support, probs = np.array([0.0, 0.5, 1.0]), np.array([0.3, 0.2, 0.5])
    true_mean = float(support @ probs)
    hits = 0
    for _ in range(400):
        lo, hi = bootstrap_interval(rng.choice(support, size=100, p=probs), resamples=1000)
        hits += lo <= true_mean <= hi
    assert 0.92 <= hits / 400 <= 0.975, hits / 400


def test_paired_difference_separates_what_overlapping_marginals_do_not():
    """Two methods on the same 200 samples: b right on 100, a right on the same 100 and on 12 more. The marginal
    intervals overlap (0.56 vs 0.50), but every per-sample difference is >= 0: the paired interval excludes 0."""
    b = np.array([1.0] * 100 + [0.0] * 100)
    a = b.copy()
    a[100:112] = 1.0
    result = paired_difference(a, b)
    assert result["difference"] == pytest.approx(0.06)
    assert result["n"] == 200 and result["separated"]
    assert result["ci"][0] > 0
    # the per-sample differences are Bernoulli(0.06): the normal closed form again
    half = Z95 * math.sqrt(0.06 * 0.94 / 200)
    assert result["ci"] == [pytest.approx(0.06 - half, abs=0.01), pytest.approx(0.06 + half, abs=0.01)]
    assert not intervals_separate(wilson_interval(112, 200), wilson_interval(100, 200))
    # the same outcomes: no difference, and none called
    same = paired_difference(b, b)
    assert same == {"difference": 0.0, "ci": [0.0, 0.0], "n": 200, "separated": False}
    # a difference in both directions that cancels: not called
    c = b.copy()
    c[:6], c[100:106] = 0.0, 1.0
    assert not paired_difference(c, b)["separated"]


def test_intervals_separate():
    assert intervals_separate([0.1, 0.2], [0.3, 0.4]) and intervals_separate([0.3, 0.4], [0.1, 0.2])
    assert not intervals_separate([0.1, 0.3], [0.3, 0.4])
    assert not intervals_separate([math.nan, math.nan], [0.3, 0.4])


def test_fixed_seed_is_reproducible():
    rng = np.random.default_rng(5)
    values, other = rng.random(150), rng.random(150)
    assert bootstrap_interval(values) == bootstrap_interval(values.copy())
    assert paired_difference(values, other) == paired_difference(values.copy(), other.copy())
    assert bootstrap_interval(values, seed=stats.BOOTSTRAP_SEED + 1) != bootstrap_interval(values)
    # the indices depend on (n, resamples, seed) only: two methods on the same samples are resampled alike
    first = stats.bootstrap_indices(150)
    assert first.shape == (stats.BOOTSTRAP_RESAMPLES, 150) and np.array_equal(first, stats.bootstrap_indices(150))
    assert first.min() >= 0 and first.max() < 150


@pytest.mark.parametrize("call, words", [
    (lambda: wilson_interval(3, 2), ["successes", "3", "[0, n=2]"]),
    (lambda: wilson_interval(-1, 2), ["successes", "-1"]),
    (lambda: wilson_interval(1, 2.5), ["n", "2.5", "non-negative integer"]),
    (lambda: wilson_interval(1, 2, confidence=1.0), ["confidence", "1.0", "(0, 1)"]),
    (lambda: bootstrap_interval([0.5, math.nan]), ["values", "NaN"]),
    (lambda: bootstrap_interval([[0.5]]), ["values", "1-D"]),
    (lambda: bootstrap_interval([0.5], confidence=0), ["confidence", "0"]),
    (lambda: paired_difference([1.0, 0.0], [1.0]), ["a, b", "same samples", "2", "1"]),
    (lambda: stats.bootstrap_indices(0), ["n", "positive integer", "0"]),
    (lambda: stats.bootstrap_indices(5, resamples=0), ["resamples", "positive integer", "0"]),
])
def test_bad_input_names_the_argument(call, words):
    with pytest.raises(ValueError) as error:
        call()
    for word in words:
        assert word in str(error.value)
