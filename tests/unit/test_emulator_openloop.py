"""The open-loop scheduler with a fake clock: calls go out on schedule whatever the
answers do, latency counts from the scheduled send time (no coordinated omission), and
errors, denials, stalls and unanswered calls are counted apart."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from services.fare_gate.emulator.openloop import (
    CLIENT_IN_FLIGHT_FULL,
    CLIENT_SEND_FAILED,
    CLIENT_UNDRAINED,
    Completion,
    OpenLoop,
    Result,
    RunResult,
    answered,
    failed,
    in_flight_max_for,
)


class FakeClock:
    """Time moves only when the scheduler sleeps or a test says so."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


def loop(clock: FakeClock, rate: float, duration: float, *, warmup: float = 0.0, in_flight_max: int = 1000,
         stall_timeout_s: float = 1.0, drain_timeout_s: float = 0.05) -> OpenLoop:
    return OpenLoop(rate, duration, warmup_s=warmup, in_flight_max=in_flight_max, stall_timeout_s=stall_timeout_s,
                    drain_timeout_s=drain_timeout_s, clock=clock, sleep=clock.sleep)


def test_calls_go_out_on_the_schedule_and_warm_up_is_not_counted() -> None:
    clock = FakeClock()
    sent: list[tuple[int, float, float]] = []

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        sent.append((seq, scheduled_at, clock()))
        clock.advance(0.002)  # every answer takes 2 ms
        done(answered("OPEN", "OK"))

    result = loop(clock, 100, 2.0, warmup=0.5).run(fire)
    assert len(sent) == 250  # 0.5 s + 2 s at 100/s
    first = sent[0][1]
    for seq, scheduled_at, sent_at in sent:
        assert scheduled_at == pytest.approx(first + seq / 100, abs=1e-9)
        assert sent_at == pytest.approx(scheduled_at, abs=1e-9)  # on time: the fake sender is never late
    assert result.scheduled == 200 and len(result.completions) == 200
    assert [c.seq for c in result.completions] == list(range(50, 250))
    assert result.measured_start == pytest.approx(first + 0.5)
    assert result.latency_summary().p99_ms == pytest.approx(2.0)
    assert result.error_count == 0 and result.decisions == {"OPEN": 200}
    assert result.achieved_rate_per_s == pytest.approx(100, rel=0.01)


def test_latency_counts_from_the_scheduled_time_when_the_sender_falls_behind() -> None:
    """A 50 ms stall of the sender (a GC pause, say) must show in the latencies of the calls
    that went out late, as riders would feel it; measured from the actual send time it would
    vanish (coordinated omission)."""
    clock = FakeClock()

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        clock.advance(0.0005)  # each answer takes 0.5 ms (of the fake sender's time)
        done(answered("OPEN", "OK"))
        if seq == 9:
            clock.advance(0.050)  # then the sender is stuck for 50 ms before call 10

    result = loop(clock, 1000, 0.2).run(fire)  # one call due every ms
    by_seq = {c.seq: c for c in result.completions}
    assert by_seq[9].latency_ms == pytest.approx(0.5)
    assert by_seq[10].latency_ms == pytest.approx(50.0)  # 49.5 ms late + 0.5 ms of service
    assert by_seq[10].service_ms == pytest.approx(0.5)
    # The calls due during the stall go out back to back, each charged its own lateness,
    # until the sender has caught up (0.5 ms gained per call).
    assert by_seq[11].latency_ms == pytest.approx(49.5)
    assert by_seq[60].latency_ms == pytest.approx(25.0)
    assert by_seq[150].latency_ms == pytest.approx(0.5)
    assert result.latency_summary().max_ms == pytest.approx(50.0)
    assert result.service_summary().max_ms == pytest.approx(0.5)
    assert result.send_lag_ms_max == pytest.approx(49.5)
    assert result.latency_summary().p90_ms > 20 * result.service_summary().p90_ms


def test_the_sender_never_waits_for_answers() -> None:
    clock = FakeClock()
    pending: list[Callable[[Result], None]] = []

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        pending.append(done)
        if len(pending) > 5:  # answers arrive 5 calls late, long after later calls went out
            clock.advance(0.0001)
            pending.pop(0)(answered("OPEN", "OK"))

    result = loop(clock, 200, 1.0, drain_timeout_s=0.05).run(fire)
    # Every scheduled call went out although 5 were always unanswered; the last 5 never came.
    assert len(result.completions) == 200
    assert result.answered == 195
    assert result.errors == {f"{CLIENT_UNDRAINED}/": 5}
    assert max(c.latency_ms for c in result.completions if c.result.ok) == pytest.approx(25.1, abs=0.01)


def test_errors_and_denials_are_counted_apart() -> None:
    clock = FakeClock()
    outcomes = [answered("OPEN", "OK"), answered("DENY", "DENIED_PASSBACK"),
                failed("DEADLINE_EXCEEDED", "", "deadline"), failed("UNAVAILABLE", "UNAVAILABLE", "down")]

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        done(outcomes[seq % 4])

    result = loop(clock, 100, 1.0).run(fire)
    assert result.decisions == {"OPEN": 25, "DENY": 25}
    assert result.deny_reasons == {"DENIED_PASSBACK": 25}
    assert result.errors == {"DEADLINE_EXCEEDED/": 25, "UNAVAILABLE/UNAVAILABLE": 25}
    assert result.answered == 50 and result.error_count == 50
    assert result.latency_summary().count == 50  # latencies are over answered calls only


def test_a_full_in_flight_window_stalls_the_sender_and_counts() -> None:
    clock = FakeClock()

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        pass  # never answered

    result = loop(clock, 100, 0.1, in_flight_max=3, stall_timeout_s=0.01, drain_timeout_s=0.01).run(fire)
    assert result.stalls == 7
    assert result.errors == {f"{CLIENT_IN_FLIGHT_FULL}/": 7, f"{CLIENT_UNDRAINED}/": 3}
    assert result.answered == 0


def test_a_call_that_cannot_start_is_an_error_and_frees_its_slot() -> None:
    clock = FakeClock()

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        if seq % 2:
            raise ConnectionError("no channel")
        done(answered("OPEN", "OK"))

    result = loop(clock, 100, 0.2, in_flight_max=1).run(fire)
    assert result.decisions == {"OPEN": 10}
    assert result.errors == {f"{CLIENT_SEND_FAILED}/": 10}
    assert result.stalls == 0


def test_a_second_report_of_one_call_is_ignored() -> None:
    clock = FakeClock()

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        done(answered("OPEN", "OK"))
        done(failed("INTERNAL", "INTERNAL"))

    result = loop(clock, 50, 0.2).run(fire)
    assert result.decisions == {"OPEN": 10} and result.error_count == 0


def test_tags_make_the_mix() -> None:
    clock = FakeClock()

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        done(answered("OPEN", "OK", "entry OPEN" if seq % 2 == 0 else "exit OPEN charged"))

    result = loop(clock, 10, 1.0).run(fire)
    assert result.mix == {"entry OPEN": 5, "exit OPEN charged": 5}


def test_limits_are_checked() -> None:
    clock = FakeClock()
    for rate, duration, in_flight in ((0, 1, 10), (100_000, 1, 10), (10, 0, 10), (10, 7200, 10), (10, 1, 0)):
        with pytest.raises(ValueError):
            loop(clock, rate, duration, in_flight_max=in_flight)
    assert in_flight_max_for(200, 1.0) == 400
    assert in_flight_max_for(1, 0.01) == 16
    assert in_flight_max_for(20_000, 60.0) == 10_000


def test_the_warm_up_counts_at_the_measured_answer_rate() -> None:
    # 10 measured calls, 8 answered; 2 s of warm-up at 5 calls/s is 10 calls, 8 of them counted.
    completions = [Completion(i, float(i), float(i), i + 0.01, answered("OPEN") if i < 8 else failed("UNAVAILABLE"))
                   for i in range(10)]
    result = RunResult(rate_per_s=5.0, duration_s=2.0, warmup_s=2.0, scheduled=10, completions=completions)
    assert result.answered == 8
    assert result.answered_with_warmup == 16
    assert RunResult(rate_per_s=5.0, duration_s=2.0, warmup_s=2.0, scheduled=0, completions=[]).answered_with_warmup == 0
