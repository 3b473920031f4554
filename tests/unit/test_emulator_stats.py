"""The emulator's latency arithmetic on known data: nearest-rank percentiles, summaries,
log-spaced histogram bins, and the money and latency text of its reports."""

from __future__ import annotations

import random

import pytest

from services.fare_gate.emulator.report import money
from services.fare_gate.emulator.stats import histogram, log_bin_edges, percentile, summarize


def test_nearest_rank_percentiles_of_1_to_100() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.9) == 90.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 0.999) == 100.0  # rank ceil(99.9) = 100
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.001) == 1.0


def test_p999_of_1000_values_is_the_999th_despite_float_rounding() -> None:
    values = [float(v) for v in range(1, 1001)]
    # 0.999 * 1000 is 998.9999999999999 in binary floating point; the rank must still be 999.
    assert percentile(values, 0.999) == 999.0
    assert percentile(values, 0.99) == 990.0


def test_percentile_is_always_a_measured_value() -> None:
    rng = random.Random(7)
    values = sorted(rng.uniform(0.5, 300.0) for _ in range(1234))
    for fraction in (0.5, 0.9, 0.99, 0.999):
        assert percentile(values, fraction) in values


def test_percentile_edge_cases() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.999) == 3.0
    with pytest.raises(ValueError):
        percentile([1.0], 0.0)
    with pytest.raises(ValueError):
        percentile([1.0], 1.5)


def test_summary_of_a_long_tail() -> None:
    # 990 calls of 2 ms, 9 of 40 ms, 1 of 900 ms: the tail shows only from p99.9 on.
    values = [2.0] * 990 + [40.0] * 9 + [900.0]
    random.Random(1).shuffle(values)
    summary = summarize(values)
    assert summary.count == 1000
    assert (summary.min_ms, summary.p50_ms, summary.p90_ms, summary.p99_ms) == (2.0, 2.0, 2.0, 2.0)
    assert summary.p999_ms == 40.0
    assert summary.max_ms == 900.0
    assert summary.mean_ms == pytest.approx((990 * 2 + 9 * 40 + 900) / 1000)


def test_summary_of_nothing() -> None:
    summary = summarize([])
    assert summary.count == 0 and summary.p99_ms is None and summary.max_ms is None
    assert summary.to_dict()["p99_ms"] is None


def test_log_bins_cover_the_data_and_sit_on_one_grid() -> None:
    edges = log_bin_edges(0.9, 17.3, bins_per_decade=20)
    assert edges[0] <= 0.9 and edges[-1] > 17.3
    assert all(b > a for a, b in zip(edges, edges[1:]))
    # Every edge is 10 ** (k / 20): runs with different data share bin boundaries.
    other = log_bin_edges(0.3, 50.0, bins_per_decade=20)
    assert set(round(e, 9) for e in edges) <= set(round(e, 9) for e in other)
    assert 1.0 in edges and 10.0 in edges


def test_log_bins_when_the_top_value_is_an_edge() -> None:
    edges = log_bin_edges(1.0, 10.0, bins_per_decade=10)
    assert edges[0] == 1.0
    assert edges[-2] == pytest.approx(10.0) and edges[-1] > 10.0  # 10.0 falls inside the last bin


def test_log_bins_are_bounded() -> None:
    edges = log_bin_edges(0.0, 10**9)  # clamped to 0.01 ms .. 100 s
    assert edges[0] == pytest.approx(0.01) and edges[-1] >= 100_000.0
    with pytest.raises(ValueError):
        log_bin_edges(1.0, 2.0, bins_per_decade=0)
    with pytest.raises(ValueError):
        log_bin_edges(0.01, 100_000.0, bins_per_decade=100)  # 700 bins


def test_histogram_counts_every_value_once_with_outliers_in_the_end_bins() -> None:
    edges = [1.0, 2.0, 4.0, 8.0]
    counts = histogram([0.5, 1.0, 1.5, 2.0, 3.9, 4.0, 7.99, 8.0, 100.0], edges)
    assert counts == [3, 2, 4]  # 0.5 joins the first bin; 8.0 and 100 the last
    assert sum(counts) == 9
    with pytest.raises(ValueError):
        histogram([1.0], [1.0])


def test_money_text() -> None:
    assert money(2000, "TWD") == "TWD 20.00"
    assert money(-640, "TWD") == "TWD -6.40"
    assert money(5, "TWD") == "TWD 0.05"
    assert money(1500, "JPY") == "JPY 1500"
    assert money(None, "TWD") == "-"
    assert money(12, "") == "12 minor units"
