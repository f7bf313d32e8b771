"""rlkd.stats against known values and brute-force enumeration."""

import itertools
import math

import pytest

from rlkd.stats import mcnemar_exact, mean_ci, wilson_interval


def test_wilson_known_values():
    lo, hi = wilson_interval(50, 100)
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4
    lo, hi = wilson_interval(0, 10)  # textbook: (0, 0.2775)
    assert lo == 0.0 and abs(hi - 0.27753) < 1e-5
    lo, hi = wilson_interval(10, 10)
    assert abs(lo - 0.72247) < 1e-5 and hi == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


@pytest.mark.parametrize("k,n", [(1, 7), (3, 20), (650, 1319), (1318, 1319)])
def test_wilson_is_the_score_test_inversion(k, n):
    """The bounds are where the score statistic |p_hat - p| / sqrt(p(1-p)/n) equals z."""
    z = 1.959964
    lo, hi = wilson_interval(k, n, z)
    p_hat = k / n
    for bound in (lo, hi):
        score = abs(p_hat - bound) / math.sqrt(bound * (1 - bound) / n)
        assert abs(score - z) < 1e-9
    assert lo < p_hat < hi


def brute_force_mcnemar_p(b01, b10):
    m = b01 + b10
    if m == 0:
        return 1.0
    # Two-sided exact binomial by summing outcomes at least as extreme, as exact fractions.
    k = min(b01, b10)
    tail = sum(math.comb(m, i) for i in range(m + 1) if min(i, m - i) <= k)
    return min(1.0, tail / 2**m)


@pytest.mark.parametrize("b01,b10,same", [(0, 5, 3), (2, 9, 10), (4, 4, 0), (7, 1, 2), (0, 0, 6)])
def test_mcnemar_matches_brute_force(b01, b10, same):
    a = [False] * b01 + [True] * b10 + [True] * same
    b = [True] * b01 + [False] * b10 + [True] * same
    out = mcnemar_exact(a, b)
    assert (out["b01"], out["b10"], out["n"]) == (b01, b10, b01 + b10 + same)
    assert abs(out["p_value"] - brute_force_mcnemar_p(b01, b10)) < 1e-15


def test_mcnemar_known_values_and_symmetry():
    # 0 vs 5 discordant: p = 2 / 32.
    assert mcnemar_exact([False] * 5, [True] * 5)["p_value"] == 0.0625
    # Swapping the models swaps b01/b10 but not the p-value.
    a = [True, False, False, True, True, False, True]
    b = [False, True, True, True, False, True, True]
    ab, ba = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (ab["b01"], ab["b10"]) == (ba["b10"], ba["b01"]) == (3, 2)
    assert ab["p_value"] == ba["p_value"] == 1.0
    # Eval-set sized input stays exact (no float overflow in 2**m).
    big = mcnemar_exact([False] * 1000 + [True] * 900, [True] * 1000 + [False] * 900)
    assert 0 < big["p_value"] < 0.05
    with pytest.raises(ValueError):
        mcnemar_exact([True], [True, False])


def test_mcnemar_p_values_are_valid_under_null():
    """Exact test: under H0, P[p <= alpha] <= alpha for every alpha, by full enumeration."""
    m = 12
    for alpha in (0.01, 0.05, 0.2):
        mass = sum(
            math.comb(m, i) / 2**m
            for i in range(m + 1)
            if mcnemar_exact([False] * i + [True] * (m - i), [True] * i + [False] * (m - i))[
                "p_value"
            ]
            <= alpha
        )
        assert mass <= alpha


def test_mean_ci():
    mean, lo, hi = mean_ci([1, 2, 3, 4, 5])
    half = 1.959964 * math.sqrt(2.5) / math.sqrt(5)
    assert mean == 3.0 and abs(lo - (3 - half)) < 1e-12 and abs(hi - (3 + half)) < 1e-12
    values = [0.5, 2.25, 1.0, 7.0]
    m = sum(values) / 4
    s = math.sqrt(sum((v - m) ** 2 for v in values) / 3)
    assert mean_ci(values, z=1.0) == pytest.approx((m, m - s / 2, m + s / 2), abs=1e-12)
    mean, lo, hi = mean_ci([4.0])
    assert mean == 4.0 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        mean_ci([])


def test_mcnemar_counts_from_pairs():
    pairs = list(itertools.product([False, True], repeat=2)) * 3
    a, b = zip(*pairs, strict=True)
    out = mcnemar_exact(a, b)
    assert out["b01"] == 3 and out["b10"] == 3 and out["n"] == 12 and out["p_value"] == 1.0
