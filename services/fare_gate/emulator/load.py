"""The load mode: synthetic riders tapping through station gates at a fixed rate, open loop.

`run_taps` drives `OpenLoop` with taps from a `RiderPool` through `FareGateClient.tap_async`;
`run_baseline` drives the same schedule with a call that does no fare work (GetGateConfig or
the health check), so a run can say how much of the tap latency is the machine and the gRPC
stack rather than the tap path.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from services.fare_gate.emulator.gate import CallFailed, FareGateClient, TapReply, tap_id_for, tap_request
from services.fare_gate.emulator.openloop import OpenLoop, Result, RunResult, answered, failed, in_flight_max_for
from services.fare_gate.emulator.provision import RiderSetup
from services.fare_gate.emulator.riders import Rider, RiderPool, synthetic_card_uid

CLIENT_NO_IDLE_RIDER = "CLIENT_NO_IDLE_RIDER"
DRAIN_GRACE_S = 5.0  # beyond the deadline, for answers still in flight after the last send
BASELINE_METHODS = ("config", "health")


@dataclass(frozen=True)
class LoadShape:
    """How hard and how long: calls per second, measured seconds, warm-up seconds before them
    (sent but not counted), and the deadline of each call."""

    rate_per_s: float
    duration_s: float
    warmup_s: float = 0.0
    deadline_s: float = 1.0

    def open_loop(self, *, clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> OpenLoop:
        return OpenLoop(self.rate_per_s, self.duration_s, warmup_s=self.warmup_s,
                        in_flight_max=in_flight_max_for(self.rate_per_s, self.deadline_s),
                        stall_timeout_s=self.deadline_s + DRAIN_GRACE_S,
                        drain_timeout_s=self.deadline_s + DRAIN_GRACE_S, clock=clock, sleep=sleep)


def synthetic_riders(count: int, *, run_id: str, seed: int, rider_category: str = "adult") -> list[Rider]:
    """`count` riders with fresh random 7-byte card UIDs and account ids unique to `run_id`."""
    rng = random.Random(seed)
    return [Rider(name=f"r{i}", card_uid=synthetic_card_uid(rng), account_id=f"{run_id}-rider-{i}",
                  rider_category=rider_category) for i in range(count)]


def rider_setups(riders: list[Rider], *, fund_minor: int) -> list[RiderSetup]:
    return [RiderSetup(r.account_id, r.card_uid, r.rider_category, r.name, fund_minor) for r in riders]


def _result_of_tap(direction: str, reply: TapReply | None, failure: CallFailed | None) -> Result:
    if failure is not None:
        return failed(failure.code, failure.reason, failure.message)
    assert reply is not None
    if reply.decision == "OPEN":
        tag = f"{direction} OPEN"
        if direction == "exit":
            # A capped journey exits with a zero fare, which the tap path handles apart.
            tag += " charged" if reply.fare_minor else " zero fare"
        return answered("OPEN", reply.reason, tag)
    # DENY, and UNSPECIFIED which a gate treats as a denial.
    return answered("DENY", reply.reason, f"{direction} DENY")


def run_taps(client: FareGateClient, pool: RiderPool, shape: LoadShape, *, tap_id_prefix: str,
             clock: Callable[[], float] = time.monotonic) -> RunResult:
    """Send taps of the pool's riders at `shape.rate_per_s`; tap ids derive from `prefix` and
    the tap's sequence number (`tap_id_for`), so they are unique to the run."""
    mono_anchor, wall_anchor = clock(), datetime.now(timezone.utc)

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        planned = pool.next_tap()
        if planned is None:
            done(failed(CLIENT_NO_IDLE_RIDER, "", "every rider had a tap in flight; use more riders"))
            return
        request = tap_request(
            tap_id=tap_id_for(tap_id_prefix, str(seq)), gate_id=planned.gate.gate_id, stop_id=planned.gate.stop_id,
            direction=planned.direction, card_uid=planned.rider.card_uid,
            tapped_at=wall_anchor + timedelta(seconds=scheduled_at - mono_anchor))

        def on_done(reply: TapReply | None, failure: CallFailed | None) -> None:
            result = _result_of_tap(planned.direction, reply, failure)
            done(result)  # first: the completion time is taken before any bookkeeping
            pool.settle(planned, result)

        client.tap_async(request, on_done)

    return shape.open_loop(clock=clock).run(fire)


def run_baseline(client: FareGateClient, shape: LoadShape, *, method: str, gate_id: str,
                 clock: Callable[[], float] = time.monotonic) -> RunResult:
    """The same schedule with GetGateConfig (`config`) or the health check (`health`)."""
    if method not in BASELINE_METHODS:
        raise ValueError(f"baseline method must be one of {BASELINE_METHODS}")

    def fire(seq: int, scheduled_at: float, done: Callable[[Result], None]) -> None:
        def on_done(_: object, failure: CallFailed | None) -> None:
            done(failed(failure.code, failure.reason, failure.message) if failure else answered("OK"))

        if method == "config":
            client.gate_config_async(gate_id, on_done)
        else:
            client.health_async(on_done)

    return shape.open_loop(clock=clock).run(fire)
