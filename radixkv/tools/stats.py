"""Percentiles of a run's latencies, one definition for every report."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The value at rank round(q * (n - 1)) of the sorted values (0.0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Mean, median and p99."""
    if not values:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    return {
        "mean": statistics.fmean(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
    }
