"""Latency statistics for the emulator: nearest-rank percentiles and log-spaced histograms.

Pure arithmetic on lists of floats, so the numbers printed by `load` and drawn in its PNG
can be checked on known data in unit tests.

Percentiles use the nearest-rank method: the p-th percentile of n sorted values is the
value at rank ceil(p * n) (1-based). It is always one of the measured values, never an
interpolation between two, so "p99 = 41.2 ms" means at least 99% of the calls took at most
41.2 ms and some call took exactly that long.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# The percentiles every summary reports, as fractions.
REPORTED_FRACTIONS = (0.5, 0.9, 0.99, 0.999)

# A histogram covers at most this many decades and bins, whatever the data: 10 us .. 100 s.
HISTOGRAM_LOW_MS_MIN = 0.01
HISTOGRAM_HIGH_MS_MAX = 100_000.0
BINS_PER_DECADE_DEFAULT = 20
BINS_MAX = 400


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of values already sorted ascending; None when there are none."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not sorted_values:
        return None
    # round() first: 0.999 * 1000 is 998.999...9 in binary floating point, not 999.
    rank = max(1, math.ceil(round(fraction * len(sorted_values), 9)))
    return sorted_values[rank - 1]


@dataclass(frozen=True)
class LatencySummary:
    """What a list of latencies comes to, in milliseconds; every field is None when empty."""

    count: int
    min_ms: float | None
    mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    max_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        return {key: (round(value, 3) if isinstance(value, float) else value) for key, value in asdict(self).items()}


def summarize(latencies_ms: Iterable[float]) -> LatencySummary:
    """Summarize latencies in milliseconds (any order)."""
    values = sorted(latencies_ms)
    if not values:
        return LatencySummary(0, None, None, None, None, None, None, None)
    p50, p90, p99, p999 = (percentile(values, fraction) for fraction in REPORTED_FRACTIONS)
    return LatencySummary(len(values), values[0], math.fsum(values) / len(values), p50, p90, p99, p999, values[-1])


def log_bin_edges(low_ms: float, high_ms: float, *, bins_per_decade: int = BINS_PER_DECADE_DEFAULT) -> list[float]:
    """Bin edges spaced evenly on a log scale, covering [low_ms, high_ms].

    Every edge is a point of one fixed grid, 10 ** (k / bins_per_decade) for whole k, so the
    histograms of different runs drawn on one axis line up bin for bin."""
    if bins_per_decade < 1:
        raise ValueError("bins_per_decade must be at least 1")
    low_ms = min(max(low_ms, HISTOGRAM_LOW_MS_MIN), HISTOGRAM_HIGH_MS_MAX)
    high_ms = min(max(high_ms, low_ms), HISTOGRAM_HIGH_MS_MAX)
    # round() guards the grid points themselves against floating-point noise in log10.
    first = math.floor(round(math.log10(low_ms) * bins_per_decade, 9))
    last = max(first + 1, math.ceil(round(math.log10(high_ms) * bins_per_decade, 9)))
    if last == math.floor(round(math.log10(high_ms) * bins_per_decade, 9)):
        last += 1  # the top value itself must fall inside the last bin [edge, next edge)
    if last - first > BINS_MAX:
        raise ValueError(f"more than {BINS_MAX} bins: lower bins_per_decade")
    return [10.0 ** (k / bins_per_decade) for k in range(first, last + 1)]


def histogram(values: Iterable[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin [edges[i], edges[i+1]); values outside the edges go to the end bins,
    so no measurement silently disappears from the picture."""
    if len(edges) < 2:
        raise ValueError("a histogram needs at least two edges")
    counts = [0] * (len(edges) - 1)
    last = len(counts) - 1
    for value in values:
        index = bisect.bisect_right(edges, value) - 1
        counts[min(max(index, 0), last)] += 1
    return counts
