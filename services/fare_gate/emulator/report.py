"""Text and JSON renderings of the emulator's results (pure; no I/O)."""

from __future__ import annotations

from typing import Any

from services.fare_gate.emulator.openloop import RunResult
from services.fare_gate.emulator.stats import LatencySummary
from services.fare_gate.fares.currency import CURRENCY_EXPONENTS


def money(amount_minor: int | None, currency: str) -> str:
    """2000, "TWD" -> "TWD 20.00"; an unknown or empty currency prints minor units."""
    if amount_minor is None:
        return "-"
    places = CURRENCY_EXPONENTS.get(currency)
    if places is None:
        return f"{amount_minor} minor units"
    sign = "-" if amount_minor < 0 else ""
    whole, part = divmod(abs(amount_minor), 10**places) if places else (abs(amount_minor), 0)
    return f"{currency} {sign}{whole}" + (f".{part:0{places}d}" if places else "")


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def summary_line(summary: LatencySummary) -> str:
    return (f"p50 {ms(summary.p50_ms)}  p90 {ms(summary.p90_ms)}  p99 {ms(summary.p99_ms)}  "
            f"p99.9 {ms(summary.p999_ms)}  max {ms(summary.max_ms)}  (n={summary.count})")


def counter_text(counter: Any) -> str:
    return ", ".join(f"{key or '?'} {count}" for key, count in counter.most_common()) or "none"


def format_run(result: RunResult, *, what: str = "taps") -> list[str]:
    """The lines `load` prints for one run."""
    latency = result.latency_summary()
    service = result.service_summary()
    lines = [
        f"offered {result.rate_per_s:g} {what}/s for {result.duration_s:g} s (+{result.warmup_s:g} s warm-up, not counted): "
        f"{result.scheduled} scheduled, sent {result.sent_rate_per_s:.1f}/s, answered {result.achieved_rate_per_s:.1f}/s",
        f"  answers   {result.answered}: {counter_text(result.decisions)}",
    ]
    if result.deny_reasons:
        lines.append(f"  denials   {counter_text(result.deny_reasons)}")
    if result.mix:
        lines.append(f"  mix       {counter_text(result.mix)}")
    lines += [
        f"  errors    {result.error_count}" + (f": {counter_text(result.errors)}" if result.error_count else ""),
        f"  latency from scheduled send (ms): {summary_line(latency)}",
        f"  latency from actual send (ms):    {summary_line(service)}",
        f"  generator: send lag max {result.send_lag_ms_max:.1f} ms, in-flight window full {result.stalls} times",
    ]
    return lines


def run_to_dict(result: RunResult) -> dict[str, Any]:
    return {
        "offered_rate_per_s": result.rate_per_s,
        "duration_s": result.duration_s,
        "warmup_s": result.warmup_s,
        "scheduled": result.scheduled,
        "sent_rate_per_s": round(result.sent_rate_per_s, 2),
        "achieved_rate_per_s": round(result.achieved_rate_per_s, 2),
        "answered": result.answered,
        "decisions": dict(result.decisions),
        "deny_reasons": dict(result.deny_reasons),
        "mix": dict(result.mix),
        "errors": result.error_count,
        "errors_by_status": dict(result.errors),
        "latency_from_scheduled_ms": result.latency_summary().to_dict(),
        "latency_from_sent_ms": result.service_summary().to_dict(),
        "send_lag_ms_max": round(result.send_lag_ms_max, 3),
        "in_flight_window_full": result.stalls,
    }
