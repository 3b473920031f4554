"""Latency pictures: a histogram on a log latency axis with percentile lines, as a PNG.

The only module that imports matplotlib, and only when a picture is drawn, so `--help` and
single taps stay fast. It draws on a `Figure` with the Agg canvas (no display, no pyplot
global state), so it works on a headless machine and from any thread.

How to read it: x is the latency from each call's scheduled send time, on a log scale
(0.1 ms ... seconds); y is how many calls fell in each bin, also on a log scale so the few
calls of the tail stay visible next to the thousands of the body. Vertical lines of each
series' colour mark its p50 (dotted), p99 (dashed), p99.9 (dash-dot) and max (solid, thin);
a red line marks the latency budget when one is given. A second panel, when steps are
given, shows p50/p99/p99.9 against the offered rate of each step, with passed steps in
green and failed ones in red.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.fare_gate.emulator.stats import histogram, log_bin_edges, summarize

PERCENTILE_STYLES = (("p50", "p50_ms", ":"), ("p99", "p99_ms", "--"), ("p99.9", "p999_ms", "-."), ("max", "max_ms", "-"))
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
SERIES_MAX = len(COLOURS)


@dataclass(frozen=True)
class Series:
    """One set of latencies to draw, with its legend label."""

    label: str
    latencies_ms: Sequence[float]
    errors: int = 0  # calls without an answer, which have no latency to draw but must be told


@dataclass(frozen=True)
class StepPoint:
    """One step of a rate sweep."""

    rate_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    p999_ms: float | None
    passed: bool


def write_latency_png(path: str | Path, series: Sequence[Series], *, title: str, subtitle: str = "",
                      budget_ms: float | None = None, steps: Sequence[StepPoint] = (),
                      step_budget_ms: float | None = None) -> Path:
    """Draw the histogram (and the step panel, if any) and save it as a PNG at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    if not series:
        raise ValueError("nothing to draw: no series")
    if len(series) > SERIES_MAX:
        raise ValueError(f"at most {SERIES_MAX} series in one picture")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    panels = 2 if steps else 1
    figure = Figure(figsize=(10, 5.2 * panels), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(panels, 1, squeeze=False)[:, 0]

    values = [v for s in series for v in s.latencies_ms if v > 0]
    edges = log_bin_edges(min(values, default=0.1), max(values, default=10.0))
    ax = axes[0]
    for colour, one in zip(COLOURS, series):
        summary = summarize(one.latencies_ms)
        label = f"{one.label}: {summary.count} answered"
        if one.errors:
            label += f", {one.errors} ERRORS (not drawn)"
        if summary.count:
            label += f", p50 {summary.p50_ms:.1f} / p99 {summary.p99_ms:.1f} / p99.9 {summary.p999_ms:.1f} ms"
        counts = histogram(one.latencies_ms, edges)
        ax.stairs(counts, edges, color=colour, fill=True, alpha=0.25)
        ax.stairs(counts, edges, color=colour, label=label)
        labels: dict[float, list[str]] = {}  # equal values (p99.9 = max on small runs) share one label
        for name, field, style in PERCENTILE_STYLES:
            value = getattr(summary, field)
            if value is None:
                continue
            ax.axvline(value, color=colour, linestyle=style, linewidth=0.8 if name == "max" else 1.4)
            labels.setdefault(value, []).append(name)
        for value, names in labels.items():
            ax.annotate(f"{'/'.join(names)} {value:.1f}", xy=(value, 1.0), xycoords=("data", "axes fraction"),
                        rotation=90, va="top", ha="right", fontsize=7, color=colour)
    if budget_ms is not None:
        ax.axvline(budget_ms, color="red", linewidth=1.6, label=f"budget {budget_ms:g} ms")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.set_yscale("log")
    ax.set_ylim(bottom=0.8)
    ax.set_xlabel("latency from scheduled send time (ms, log scale)")
    ax.set_ylabel("calls per bin (log scale)")
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncols=1, fontsize=8, frameon=False)

    if steps:
        ax2 = axes[1]
        rates = [s.rate_per_s for s in steps]
        for label, field, style in (("p50", "p50_ms", ":"), ("p99", "p99_ms", "--"), ("p99.9", "p999_ms", "-.")):
            points = [(s.rate_per_s, getattr(s, field)) for s in steps if getattr(s, field) is not None]
            if points:
                ax2.plot([p[0] for p in points], [p[1] for p in points], linestyle=style, marker="o",
                         color="#444444", label=label)
        for step in steps:
            if step.p99_ms is not None:
                ax2.scatter([step.rate_per_s], [step.p99_ms], s=80, zorder=3,
                            color="#2ca02c" if step.passed else "#d62728")
        if step_budget_ms is not None:
            ax2.axhline(step_budget_ms, color="red", linewidth=1.4, label=f"p99 limit {step_budget_ms:g} ms")
        ax2.set_yscale("log")
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax2.set_xticks(rates)
        ax2.set_xlabel("offered rate (taps/s); green: passed (p99 within the limit, no errors), red: failed")
        ax2.set_ylabel("latency (ms, log scale)")
        ax2.set_title("rate steps", fontsize=10)
        ax2.grid(True, which="both", alpha=0.25)
        ax2.legend(loc="upper left", fontsize=8)

    figure.savefig(path, format="png")
    return path
