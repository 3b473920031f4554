"""Open-loop load: send on a fixed schedule, never wait for answers, time from the schedule.

A closed-loop generator (send, wait for the answer, send the next) slows down when the
server slows down. It then sends fewer requests exactly while latency is bad, and the slow
period hides in a handful of samples: *coordinated omission*. Gates do not behave like that:
riders keep arriving whether the back office is slow or not.

`OpenLoop` sends call i at `start + i / rate`. It never waits for an answer before sending
the next call: every call is asynchronous (a gRPC future) and reports back through a
callback. The latency of call i is its completion time minus its *scheduled* send time, not
its actual send time. If the generator itself falls behind (a pause in the sending thread,
a full in-flight window), that delay is charged to the calls that went out late, as the
riders standing at the gate would feel it. The actual send lag is reported too, so a
generator that cannot keep up is visible rather than silently blamed on the server.

Limits: calls in flight are bounded (`in_flight_max`); when the window is full the sender
waits for a free slot for at most `stall_timeout_s` (every call carries a deadline, so slots
do come free), counts a stall, and the waiting is charged to latency as above. After the
last send, it waits at most `drain_timeout_s` for the calls still in flight; any still
missing then are counted as errors (`CLIENT_UNDRAINED`).

The clock and sleep are injected so unit tests can drive a schedule with a fake clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from services.fare_gate.emulator.stats import LatencySummary, summarize

RATE_PER_S_MAX = 20_000.0
DURATION_S_MAX = 3600.0
IN_FLIGHT_MAX_LIMIT = 10_000
SCHEDULE_LEAD_S = 0.005  # the first call is scheduled this long after run() starts

# Client-side failures, counted with the server's errors but named so they cannot be
# mistaken for them.
CLIENT_IN_FLIGHT_FULL = "CLIENT_IN_FLIGHT_FULL"
CLIENT_SEND_FAILED = "CLIENT_SEND_FAILED"
CLIENT_UNDRAINED = "CLIENT_UNDRAINED"


@dataclass(frozen=True)
class Result:
    """What became of one call.

    `ok` is True when the server answered with status OK, whatever the answer says (a
    denied tap is an answer, not an error). `label` is the answer's class ("OPEN", "DENY",
    "OK") or, for an error, "STATUS_CODE/REASON" such as "DEADLINE_EXCEEDED/" or
    "UNAVAILABLE/UNAVAILABLE". `detail` is a denial reason or an error message. `tag` is a
    free-form class of answered calls for the report's mix, such as "exit OPEN charged"."""

    ok: bool
    label: str
    detail: str = ""
    tag: str = ""


def answered(label: str, detail: str = "", tag: str = "") -> Result:
    return Result(True, label, detail, tag)


def failed(code: str, reason: str = "", detail: str = "") -> Result:
    return Result(False, f"{code}/{reason}", detail)


@dataclass(frozen=True)
class Completion:
    """One measured call: when it was due, when it went out, when its answer came."""

    seq: int
    scheduled_at: float
    sent_at: float
    completed_at: float
    result: Result

    @property
    def latency_ms(self) -> float:
        """From the scheduled send time: what a rider at the gate waits."""
        return (self.completed_at - self.scheduled_at) * 1000.0

    @property
    def service_ms(self) -> float:
        """From the actual send time: what the server and the network took."""
        return (self.completed_at - self.sent_at) * 1000.0

    @property
    def send_lag_ms(self) -> float:
        return (self.sent_at - self.scheduled_at) * 1000.0


# fire(seq, scheduled_at, done): start call `seq` without waiting for it and arrange for
# done(result) to be called once when it ends; done may also be called before fire returns.
FireFn = Callable[[int, float, Callable[[Result], None]], None]


@dataclass
class RunResult:
    """The measured part of one open-loop run (warm-up calls are left out)."""

    rate_per_s: float
    duration_s: float
    warmup_s: float
    scheduled: int  # measured calls that were due
    completions: list[Completion]
    stalls: int = 0  # times the sender found the in-flight window full
    measured_start: float = 0.0  # clock time of the first measured scheduled send
    errors: Counter = field(default_factory=Counter)  # label -> count, server and client errors
    decisions: Counter = field(default_factory=Counter)  # label -> count of answered calls
    deny_reasons: Counter = field(default_factory=Counter)
    mix: Counter = field(default_factory=Counter)  # tag -> count of answered calls

    def __post_init__(self) -> None:
        for completion in self.completions:
            result = completion.result
            if result.ok:
                self.decisions[result.label] += 1
                if result.tag:
                    self.mix[result.tag] += 1
                if result.label == "DENY":
                    self.deny_reasons[result.detail] += 1
            else:
                self.errors[result.label] += 1

    @property
    def answered(self) -> int:
        return sum(self.decisions.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def latency_summary(self) -> LatencySummary:
        """Latency from the scheduled send time over the answered calls (OPEN and DENY)."""
        return summarize(c.latency_ms for c in self.completions if c.result.ok)

    def service_summary(self) -> LatencySummary:
        """Latency from the actual send time, for comparison: a large gap between the two
        summaries means the generator, not the server, fell behind."""
        return summarize(c.service_ms for c in self.completions if c.result.ok)

    def latencies_ms(self) -> list[float]:
        return [c.latency_ms for c in self.completions if c.result.ok]

    @property
    def send_lag_ms_max(self) -> float:
        return max((c.send_lag_ms for c in self.completions), default=0.0)

    @property
    def achieved_rate_per_s(self) -> float:
        """Answered calls per second, over the time from the first measured scheduled send
        to the last measured answer (at least the planned duration)."""
        ends = [c.completed_at for c in self.completions if c.result.ok]
        if not ends:
            return 0.0
        span_s = max(self.duration_s, max(ends) - self.measured_start)
        return self.answered / span_s

    @property
    def answered_with_warmup(self) -> int:
        """Answered calls, counting the warm-up's (sent, not measured) at the measured part's
        answer rate: what the stack's CPU over the whole run is divided by."""
        answered_share = self.answered / self.scheduled if self.scheduled else 0.0
        return self.answered + round(self.warmup_s * self.rate_per_s * answered_share)

    @property
    def sent_rate_per_s(self) -> float:
        """Calls actually sent per second over the measured window."""
        sends = [c.sent_at for c in self.completions if c.result.label != f"{CLIENT_IN_FLIGHT_FULL}/"]
        if not sends:
            return 0.0
        span_s = max(self.duration_s, max(sends) - self.measured_start + 1.0 / self.rate_per_s)
        return len(sends) / span_s


class OpenLoop:
    """Send `rate_per_s` calls a second for `warmup_s + duration_s` seconds, open loop."""

    def __init__(self, rate_per_s: float, duration_s: float, *, warmup_s: float = 0.0, in_flight_max: int,
                 stall_timeout_s: float, drain_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not 0 < rate_per_s <= RATE_PER_S_MAX:
            raise ValueError(f"rate must be in (0, {RATE_PER_S_MAX:.0f}] calls/s, got {rate_per_s}")
        if not 0 < duration_s <= DURATION_S_MAX or not 0 <= warmup_s <= DURATION_S_MAX:
            raise ValueError(f"duration must be in (0, {DURATION_S_MAX:.0f}] s and warm-up in [0, {DURATION_S_MAX:.0f}] s")
        if not 1 <= in_flight_max <= IN_FLIGHT_MAX_LIMIT:
            raise ValueError(f"in_flight_max must be in [1, {IN_FLIGHT_MAX_LIMIT}], got {in_flight_max}")
        if stall_timeout_s <= 0 or drain_timeout_s <= 0:
            raise ValueError("stall and drain timeouts must be positive")
        self.rate_per_s = rate_per_s
        self.duration_s = duration_s
        self.warmup_s = warmup_s
        self.in_flight_max = in_flight_max
        self.stall_timeout_s = stall_timeout_s
        self.drain_timeout_s = drain_timeout_s
        self._clock = clock
        self._sleep = sleep
        self.warmup_calls = round(warmup_s * rate_per_s)
        self.measured_calls = max(1, round(duration_s * rate_per_s))

    def due_offset_s(self, seq: int) -> float:
        """When call `seq` is due, in seconds after the first call; computed from the index
        (not by adding intervals) so rounding never accumulates over a long run."""
        return seq / self.rate_per_s

    def run(self, fire: FireFn) -> RunResult:
        total = self.warmup_calls + self.measured_calls
        slots = threading.Semaphore(self.in_flight_max)
        lock = threading.Condition()
        completions: list[Completion] = []
        pending: dict[int, tuple[float, float]] = {}  # measured seq -> (scheduled_at, sent_at)
        in_flight = [0]
        closed = [False]
        stalls = 0

        def finisher(seq: int, scheduled_at: float, sent_at: float) -> Callable[[Result], None]:
            used = [False]

            def done(result: Result) -> None:
                completed_at = self._clock()
                with lock:
                    if used[0]:
                        return  # a second report of the same call is ignored
                    used[0] = True
                    in_flight[0] -= 1
                    if seq >= self.warmup_calls and not closed[0]:
                        pending.pop(seq, None)
                        completions.append(Completion(seq, scheduled_at, sent_at, completed_at, result))
                    lock.notify_all()
                slots.release()

            return done

        start = self._clock() + SCHEDULE_LEAD_S
        measured_start = start + self.due_offset_s(self.warmup_calls)
        for seq in range(total):
            scheduled_at = start + self.due_offset_s(seq)
            wait_s = scheduled_at - self._clock()
            if wait_s > 0:
                self._sleep(wait_s)
            if not slots.acquire(blocking=False):
                if seq >= self.warmup_calls:
                    stalls += 1
                if not slots.acquire(timeout=self.stall_timeout_s):
                    if seq >= self.warmup_calls:
                        now = self._clock()
                        with lock:
                            completions.append(Completion(seq, scheduled_at, now, now, failed(
                                CLIENT_IN_FLIGHT_FULL, "", f"{self.in_flight_max} calls in flight for {self.stall_timeout_s} s")))
                    continue
            sent_at = self._clock()
            with lock:
                in_flight[0] += 1
                if seq >= self.warmup_calls:
                    pending[seq] = (scheduled_at, sent_at)
            done = finisher(seq, scheduled_at, sent_at)
            try:
                fire(seq, scheduled_at, done)
            except Exception as exc:  # noqa: BLE001 - a call that could not even start is an error to count
                done(failed(CLIENT_SEND_FAILED, "", f"{type(exc).__name__}: {exc}"))

        drain_deadline = time.monotonic() + self.drain_timeout_s
        with lock:
            while in_flight[0] > 0:
                left_s = drain_deadline - time.monotonic()
                if left_s <= 0:
                    break
                lock.wait(timeout=left_s)
            closed[0] = True
            now = self._clock()
            for seq, (scheduled_at, sent_at) in sorted(pending.items()):
                completions.append(Completion(seq, scheduled_at, sent_at, now, failed(
                    CLIENT_UNDRAINED, "", f"no answer within {self.drain_timeout_s} s after the last send")))
            pending.clear()
            measured = sorted(completions, key=lambda c: c.seq)
        return RunResult(self.rate_per_s, self.duration_s, self.warmup_s, self.measured_calls, measured,
                         stalls=stalls, measured_start=measured_start)


def in_flight_max_for(rate_per_s: float, deadline_s: float) -> int:
    """A window big enough for every call of one deadline's worth of sending, twice over,
    so a healthy run never stalls, and bounded so a dead server cannot exhaust memory."""
    return min(IN_FLIGHT_MAX_LIMIT, max(16, math.ceil(2 * rate_per_s * deadline_s)))
