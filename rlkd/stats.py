"""Small-sample statistics for comparing evaluation runs (accuracy intervals, paired tests)."""

import math
import statistics
from collections.abc import Sequence


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (Wilson 1927).

    Unlike the normal (Wald) interval it stays inside [0, 1] and keeps its coverage near 0 and
    1, where small-model accuracies often sit. n = 0 carries no information: (0, 1).
    """
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact ends at k = 0 and k = n, which the float formula only reaches up to rounding.
    lo = 0.0 if k == 0 else centre - half
    hi = 1.0 if k == n else centre + half
    return lo, hi


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> dict:
    """Exact McNemar test of two models graded on the same items (McNemar 1947).

    Only discordant items carry information: b01 = a wrong and b right, b10 = a right and b
    wrong. Under H0 (equal accuracy) b01 ~ Bin(b01 + b10, 1/2); the two-sided p-value is
    min(1, 2 P[X <= min(b01, b10)]), and 1 when there are no discordant items.
    """
    if len(correct_a) != len(correct_b):
        raise ValueError(f"length mismatch: {len(correct_a)} vs {len(correct_b)}")
    b01 = sum(1 for a, b in zip(correct_a, correct_b, strict=True) if not a and b)
    b10 = sum(1 for a, b in zip(correct_a, correct_b, strict=True) if a and not b)
    m = b01 + b10
    # Exact integer arithmetic: 2**m stays exact for the thousands of items of an eval set.
    tail = sum(math.comb(m, i) for i in range(min(b01, b10) + 1))
    p_value = min(1.0, 2 * tail / 2**m) if m else 1.0
    return {"b01": b01, "b10": b10, "n": len(correct_a), "p_value": p_value}


def mean_ci(values: Sequence[float], z: float = 1.959964) -> tuple[float, float, float]:
    """(mean, lo, hi): normal-approximation interval mean +- z * s / sqrt(n), s the sample std.

    For latencies and completion lengths, where n is large. With one value the spread is
    unknown and the bounds are NaN.
    """
    if len(values) == 0:
        raise ValueError("mean_ci of an empty sequence")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = z * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half
