"""Synthetic riders for the load mode: each one enters at a station and exits at another.

A load of random taps would mostly measure denials (exit without entry, passback). Real
riders alternate: entry at A, exit at B, later entry at C... `RiderPool` keeps that state
per rider and hands out the next tap of an idle rider. A rider whose tap is still in flight
is busy and is not chosen again until its answer arrives, as a real rider does not tap
twice before the gate has answered.

What a rider does next follows the gate's answer:

| answer | rider state after |
|---|---|
| entry OPEN | inside, journey from that station |
| exit OPEN | outside, at that station |
| entry DENY DENIED_PASSBACK | inside (the back office thinks so): the next tap is an exit |
| exit DENY DENIED_NO_ENTRY | outside (the back office has no journey): the next tap is an entry |
| any other DENY | unchanged |
| an error | unchanged: the rider tries again as if the tap had not happened |

After an error nobody knows whether the back office recorded the tap. The rider goes on as
if it had not, and the two denials above put it right if it had: an entry that was
recorded makes the next entry a passback denial, an exit that was recorded makes the next
exit a no-entry denial. So one error costs at most one extra denial, and a burst of errors
cannot leave the run without riders.

Stations are picked at random (seeded), but never one of the rider's last
`RECENT_STOPS_AVOIDED` stations (fewer when there are few stations). So an exit is never
where its journey began, the next entry is never where the last journey ended (which the
demo city would join into one fare leg), and a rider comes back to the same gate only five
taps later at the soonest. With R riders tapping T times a second in all, that is at least
5 * R / T seconds: keep it above the fare gate's double-tap window (10 s by default), or
some taps are answered as double taps (for example 2000 riders at up to 1000 taps/s).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.fare_gate.emulator.openloop import Result

RIDERS_MAX = 100_000
RECENT_STOPS_AVOIDED = 4
CARD_UID_BYTES = 7  # a 7-byte ISO 14443 UID, the common size for transit cards
NXP_MANUFACTURER_BYTE = 0x04


class RiderError(ValueError):
    """Riders or gates that cannot make a load; the message says what to change."""


@dataclass(frozen=True)
class Gate:
    """A station gate: its id and the GTFS stop_id where it stands."""

    gate_id: str
    stop_id: str


@dataclass
class Rider:
    """One synthetic rider and where it is in its day."""

    name: str
    card_uid: bytes
    account_id: str = ""
    rider_category: str = ""
    inside_stop: str | None = None  # the station of the open journey's entry
    recent_stops: tuple[str, ...] = ()  # the stations of the last taps that opened, newest last


@dataclass(frozen=True)
class PlannedTap:
    rider: Rider
    gate: Gate
    direction: str  # "entry" or "exit"


def parse_gates(texts: Iterable[str]) -> list[Gate]:
    """Gates from `GATE=STOP` words, or plain `STOP` words which get gate `STOP-G1`."""
    gates: list[Gate] = []
    seen: set[str] = set()
    for text in texts:
        gate_id, sep, stop_id = text.partition("=")
        if not sep:
            gate_id, stop_id = f"{text}-G1", text
        if not gate_id or not stop_id or any(ch.isspace() for ch in text):
            raise RiderError(f"gate {text!r}: expected GATE=STOP (such as HBR-G1=HBR) or a stop_id")
        if gate_id in seen:
            raise RiderError(f"gate {gate_id!r} is listed twice")
        seen.add(gate_id)
        gates.append(Gate(gate_id, stop_id))
    return gates


def station_gates(stop_ids: Sequence[str], gates_per_stop: int) -> list[Gate]:
    """`gates_per_stop` gates at each stop, named STOP-G1, STOP-G2..."""
    if gates_per_stop < 1:
        raise RiderError("at least one gate per station")
    return [Gate(f"{stop}-G{n}", stop) for stop in stop_ids for n in range(1, gates_per_stop + 1)]


def synthetic_card_uid(rng: random.Random) -> bytes:
    return bytes([NXP_MANUFACTURER_BYTE]) + rng.randbytes(CARD_UID_BYTES - 1)


class RiderPool:
    """Idle riders and their next taps; safe to use from the sender and the answer callbacks."""

    def __init__(self, riders: Sequence[Rider], gates: Sequence[Gate], *, seed: int) -> None:
        if not riders:
            raise RiderError("the load needs at least one rider")
        if len(riders) > RIDERS_MAX:
            raise RiderError(f"at most {RIDERS_MAX} riders")
        self._by_stop: dict[str, list[Gate]] = {}
        for gate in gates:
            self._by_stop.setdefault(gate.stop_id, []).append(gate)
        if len(self._by_stop) < 2:
            raise RiderError("riders need gates at two stations at least, to enter at one and exit at another")
        self._stops = sorted(self._by_stop)
        self._avoided = min(RECENT_STOPS_AVOIDED, len(self._stops) - 1)
        self._rng = random.Random(seed)
        self._idle: deque[Rider] = deque(riders)
        self._lock = threading.Lock()
        self.riders = list(riders)
        self.failed_taps = 0  # taps that ended in an error (the riders carried on)
        self.no_idle_rider = 0

    def _station(self, rider: Rider) -> str:
        avoid = set(rider.recent_stops[-self._avoided:]) if self._avoided else set()
        if rider.inside_stop is not None:
            avoid.add(rider.inside_stop)
        return self._rng.choice([stop for stop in self._stops if stop not in avoid])

    def next_tap(self) -> PlannedTap | None:
        """The next tap of the longest-idle rider, or None when every rider is busy."""
        with self._lock:
            if not self._idle:
                self.no_idle_rider += 1
                return None
            rider = self._idle.popleft()
            direction = "entry" if rider.inside_stop is None else "exit"
            stop = self._station(rider)
            return PlannedTap(rider, self._rng.choice(self._by_stop[stop]), direction)

    def settle(self, tap: PlannedTap, result: Result) -> None:
        """Apply the answer to the rider and make it idle again."""
        rider = tap.rider
        with self._lock:
            if not result.ok:
                self.failed_taps += 1
            elif result.label == "OPEN":
                rider.recent_stops = (*rider.recent_stops[-(RECENT_STOPS_AVOIDED - 1):], tap.gate.stop_id)
                rider.inside_stop = tap.gate.stop_id if tap.direction == "entry" else None
            elif result.label == "DENY" and result.detail == "DENIED_PASSBACK" and tap.direction == "entry":
                rider.inside_stop = tap.gate.stop_id
            elif result.label == "DENY" and result.detail == "DENIED_NO_ENTRY" and tap.direction == "exit":
                rider.inside_stop = None
            self._idle.append(rider)

    @property
    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)
