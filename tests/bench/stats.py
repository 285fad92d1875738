"""Small statistics for the benchmark: pure functions over lists of numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of nothing")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2.0


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks; ``q`` in 0..100."""
    if not values:
        raise ValueError("percentile of nothing")
    if not 0 <= q <= 100:
        raise ValueError("q must be in 0..100")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(pos), math.ceil(pos)
    if low == high:
        return float(ordered[low])
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def cost_ratio(value: float, baseline: float, higher_is_better: bool) -> float:
    """How much more one operation costs with enforcement than without: 1.0 is free.

    For a latency that is value / baseline; for a throughput (higher is better)
    it is baseline / value, so that the ratio reads the same way everywhere.
    """
    if value <= 0 or baseline <= 0:
        raise ValueError("ratios of non-positive measurements are meaningless")
    return baseline / value if higher_is_better else value / baseline


def round_ratios(pairs: Sequence[tuple[float, float]], higher_is_better: bool) -> list[float]:
    """Per-round cost ratios from (value, baseline) pairs measured in the same round."""
    return [cost_ratio(v, b, higher_is_better) for v, b in pairs]
