"""Synthetic riders: they alternate entry and exit, never tap where they just were, wait
for their answer before tapping again, and follow what the gate answered."""

from __future__ import annotations

import random

import pytest

from services.fare_gate.emulator.openloop import answered, failed
from services.fare_gate.emulator.riders import (
    RECENT_STOPS_AVOIDED,
    Gate,
    Rider,
    RiderError,
    RiderPool,
    parse_gates,
    station_gates,
    synthetic_card_uid,
)

STATIONS = ("A", "B", "C", "D", "E", "F", "G", "H")


def pool(riders: int = 3, stations: tuple[str, ...] = STATIONS, seed: int = 1) -> RiderPool:
    rng = random.Random(seed)
    return RiderPool([Rider(f"r{i}", synthetic_card_uid(rng)) for i in range(riders)],
                     station_gates(stations, 2), seed=seed)


def test_riders_alternate_entry_and_exit_and_avoid_their_recent_stations() -> None:
    riders = pool(riders=1)
    stations_seen: list[str] = []
    for i in range(200):
        tap = riders.next_tap()
        assert tap is not None
        assert tap.direction == ("entry" if i % 2 == 0 else "exit")
        assert tap.gate.stop_id not in stations_seen[-RECENT_STOPS_AVOIDED:]
        assert tap.gate.gate_id.startswith(tap.gate.stop_id + "-G")
        stations_seen.append(tap.gate.stop_id)
        riders.settle(tap, answered("OPEN", "OK"))
    assert set(stations_seen) == set(STATIONS)


def test_with_two_stations_riders_go_back_and_forth() -> None:
    riders = pool(riders=1, stations=("A", "B"))
    seen = []
    for _ in range(6):
        tap = riders.next_tap()
        assert tap is not None
        seen.append(tap.gate.stop_id)
        riders.settle(tap, answered("OPEN", "OK"))
    assert seen in (["A", "B"] * 3, ["B", "A"] * 3)


def test_a_rider_with_a_tap_in_flight_is_not_chosen_again() -> None:
    riders = pool(riders=2)
    first, second = riders.next_tap(), riders.next_tap()
    assert first is not None and second is not None and first.rider is not second.rider
    assert riders.next_tap() is None and riders.no_idle_rider == 1
    riders.settle(second, answered("OPEN", "OK"))
    again = riders.next_tap()
    assert again is not None and again.rider is second.rider and again.direction == "exit"


def test_riders_follow_denials_and_carry_on_after_errors() -> None:
    riders = pool(riders=1)
    tap = riders.next_tap()
    assert tap is not None and tap.direction == "entry"
    riders.settle(tap, answered("DENY", "DENIED_INSUFFICIENT_BALANCE"))
    tap = riders.next_tap()
    assert tap is not None and tap.direction == "entry"  # still outside
    riders.settle(tap, answered("DENY", "DENIED_PASSBACK"))
    tap = riders.next_tap()
    assert tap is not None and tap.direction == "exit"  # the back office thinks it is inside
    riders.settle(tap, answered("DENY", "DENIED_NO_ENTRY"))
    tap = riders.next_tap()
    assert tap is not None and tap.direction == "entry"  # the back office has no journey
    riders.settle(tap, failed("DEADLINE_EXCEEDED"))
    assert riders.failed_taps == 1
    tap = riders.next_tap()
    assert tap is not None and tap.direction == "entry"  # as if the failed entry had not happened
    riders.settle(tap, answered("DENY", "DENIED_PASSBACK"))  # ...but it had been recorded
    tap = riders.next_tap()
    assert tap is not None and tap.direction == "exit"


def test_gates_from_the_command_line() -> None:
    assert parse_gates(["HBR-G1=HBR", "CEN"]) == [Gate("HBR-G1", "HBR"), Gate("CEN-G1", "CEN")]
    for words in (["=HBR"], ["G1="], ["A=B", "A=C"], ["a b"]):
        with pytest.raises(RiderError):
            parse_gates(words)
    with pytest.raises(RiderError):
        RiderPool([Rider("r", b"\x04" * 7)], [Gate("G1", "A"), Gate("G2", "A")], seed=1)
    with pytest.raises(RiderError):
        RiderPool([], station_gates(STATIONS, 1), seed=1)
    with pytest.raises(RiderError):
        station_gates(STATIONS, 0)


def test_synthetic_cards_are_7_byte_uids() -> None:
    rng = random.Random(3)
    cards = {synthetic_card_uid(rng) for _ in range(1000)}
    assert len(cards) == 1000 and all(len(c) == 7 and c[0] == 0x04 for c in cards)
