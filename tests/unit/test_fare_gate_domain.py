"""The tap path's pure decisions: tap validation, derived ids and fingerprints, replays,
and screening (blocked, double tap, passback, exit without entry), with no I/O."""

from __future__ import annotations

import re
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from libs import errors
from services.fare_gate.domain import (
    Catalogue,
    CredentialKind,
    Decision,
    Direction,
    FaceProbe,
    Gate,
    GateKind,
    OpenJourneyFacts,
    Reason,
    RecordedTap,
    TapInput,
    TapOutcome,
    Verdict,
    check_tap_id,
    credential_hash,
    event_id_for,
    hold_expiry,
    hold_id_for,
    journey_id_for,
    replay,
    screen,
    tap_fingerprint,
    validate_tap,
    within,
)

NOW = datetime(2030, 3, 4, 1, 0, tzinfo=timezone.utc)
KEY = bytes(range(32))
UID = bytes.fromhex("04a1b2c3d4e5f6")
GATES = {
    "CEN-G1": Gate("CEN-G1", GateKind.STATION_GATE, "metro", "CEN", None, "gates.csv:2"),
    "CEN-G2": Gate("CEN-G2", GateKind.STATION_GATE, "metro", "CEN", None, "gates.csv:3"),
    "BUS1-V1": Gate("BUS1-V1", GateKind.VEHICLE_VALIDATOR, "bus", None, "BUS1", "gates.csv:4"),
}
CATALOGUE = Catalogue(frozenset({"CEN", "UNI", "BUS_CEN"}), {"RED": "metro", "BUS1": "bus", "BUS2": "bus"})
WALLET_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def raw(**changes: object) -> TapInput:
    base = TapInput(tap_id=str(uuid.UUID(int=7)), gate_id="CEN-G1", stop_id="", direction=1, tapped_at=NOW,
                    credential_kind=CredentialKind.CARD, card_uid=UID, route_id="")
    return replace(base, **changes)


def check(tap: TapInput):
    return validate_tap(tap, GATES, CATALOGUE, now=NOW, tap_age_s_max=3600, clock_skew_s_max=300)


# --- validation ---------------------------------------------------------------------------------


def test_a_good_tap_is_filled_in_from_its_gate() -> None:
    tap = check(raw(tap_id=str(uuid.UUID(int=7)).upper()))
    assert tap.tap_id == str(uuid.UUID(int=7))  # canonical lower case: a retry in upper case is the same tap
    assert (tap.stop_id, tap.network_id, tap.direction, tap.route_id) == ("CEN", "metro", Direction.ENTRY, None)
    bus = check(raw(gate_id="BUS1-V1", direction=3, stop_id="BUS_CEN"))
    assert (bus.stop_id, bus.network_id, bus.route_id) == ("BUS_CEN", "bus", "BUS1")
    other_route = check(raw(gate_id="BUS1-V1", direction=3, stop_id="BUS_CEN", route_id="BUS2"))
    assert other_route.route_id == "BUS2"
    assert check(raw(tapped_at=NOW.astimezone(timezone(timedelta(hours=8))))).tapped_at.tzinfo == timezone.utc


@pytest.mark.parametrize(("changes", "error", "reason", "field"), [
    (dict(tap_id=""), errors.InvalidArgument, "INVALID_ARGUMENT", "tap_id"),
    (dict(tap_id="not-a-uuid"), errors.InvalidArgument, "INVALID_ARGUMENT", "tap_id"),
    (dict(tap_id=str(uuid.UUID(int=7)) + "x"), errors.InvalidArgument, "INVALID_ARGUMENT", "tap_id"),
    (dict(gate_id=""), errors.InvalidArgument, "INVALID_ARGUMENT", "gate_id"),
    (dict(gate_id="bad gate!"), errors.InvalidArgument, "INVALID_ARGUMENT", "gate_id"),
    (dict(gate_id="NOPE"), errors.NotFound, "NOT_FOUND", "gate_id"),
    (dict(direction=0), errors.InvalidArgument, "INVALID_ARGUMENT", "direction"),
    (dict(direction=9), errors.InvalidArgument, "INVALID_ARGUMENT", "direction"),
    (dict(direction=3), errors.InvalidArgument, "INVALID_ARGUMENT", "direction"),
    (dict(gate_id="BUS1-V1", direction=1, stop_id="BUS_CEN"), errors.InvalidArgument, "INVALID_ARGUMENT", "direction"),
    (dict(stop_id="UNI"), errors.InvalidArgument, "INVALID_ARGUMENT", "stop_id"),
    (dict(gate_id="BUS1-V1", direction=3), errors.InvalidArgument, "INVALID_ARGUMENT", "stop_id"),
    (dict(gate_id="BUS1-V1", direction=3, stop_id="MOON"), errors.NotFound, "NOT_FOUND", "stop_id"),
    (dict(gate_id="BUS1-V1", direction=3, stop_id="BUS_CEN", route_id="NOPE"), errors.NotFound, "NOT_FOUND",
     "route_id"),
    (dict(gate_id="BUS1-V1", direction=3, stop_id="BUS_CEN", route_id="RED"), errors.InvalidArgument,
     "INVALID_ARGUMENT", "route_id"),
    (dict(tapped_at=None), errors.InvalidArgument, "INVALID_ARGUMENT", "tapped_at"),
    (dict(tapped_at=NOW + timedelta(seconds=301)), errors.InvalidArgument, "INVALID_ARGUMENT", "tapped_at"),
    (dict(tapped_at=NOW - timedelta(seconds=3601)), errors.InvalidArgument, "INVALID_ARGUMENT", "tapped_at"),
    (dict(credential_kind=None), errors.InvalidArgument, "INVALID_ARGUMENT", "credential"),
    (dict(credential_kind=CredentialKind.PHONE_QR, card_uid=b""), errors.InvalidArgument, "INVALID_ARGUMENT",
     "credential.phone_qr"),
    (dict(credential_kind=CredentialKind.PHONE_QR, phone_qr=b"\x00" * 1025), errors.InvalidArgument,
     "INVALID_ARGUMENT", "credential.phone_qr"),
    (dict(credential_kind=CredentialKind.NFC, nfc_token=""), errors.InvalidArgument, "INVALID_ARGUMENT",
     "credential.nfc_token"),
    (dict(credential_kind=CredentialKind.NFC, nfc_token="x" * 65), errors.InvalidArgument, "INVALID_ARGUMENT",
     "credential.nfc_token"),
    (dict(credential_kind=CredentialKind.FACE, card_uid=b""), errors.InvalidArgument, "INVALID_ARGUMENT",
     "credential"),
    (dict(credential_kind=CredentialKind.FACE, face=FaceProbe(embedding=(0.1,) * 127)), errors.InvalidArgument,
     "INVALID_ARGUMENT", "credential.face_embedding"),
    (dict(credential_kind=CredentialKind.FACE, face=FaceProbe(frames=(b"",))), errors.InvalidArgument,
     "INVALID_ARGUMENT", "credential.face_frames"),
    (dict(card_uid=b"\x01\x02\x03"), errors.InvalidArgument, "INVALID_ARGUMENT", "credential.card_uid"),
    (dict(card_uid=b"\x01" * 11), errors.InvalidArgument, "INVALID_ARGUMENT", "credential.card_uid"),
])
def test_a_bad_tap_is_refused_with_its_reason_and_field(changes: dict, error: type, reason: str, field: str) -> None:
    with pytest.raises(error) as info:
        check(raw(**changes))
    assert (info.value.reason, info.value.metadata.get("field")) == (reason, field)


def test_the_edges_of_the_time_window_are_accepted() -> None:
    check(raw(tapped_at=NOW + timedelta(seconds=300)))
    check(raw(tapped_at=NOW - timedelta(seconds=3600)))


# --- ids and fingerprints ---------------------------------------------------------------------


def test_derived_ids_are_deterministic_valid_wallet_ids_and_distinct() -> None:
    tap_id = check_tap_id(str(uuid.uuid4()))
    assert hold_id_for(tap_id) == hold_id_for(tap_id) and WALLET_ID.match(hold_id_for(tap_id))
    assert journey_id_for(tap_id) == journey_id_for(tap_id)
    assert uuid.UUID(journey_id_for(tap_id)).version == 5
    assert journey_id_for(tap_id) != journey_id_for(check_tap_id(str(uuid.uuid4())))
    assert event_id_for(tap_id, "TapRecorded") != event_id_for(tap_id, "JourneyStarted")
    assert not hold_id_for(tap_id).startswith("system:")


def test_the_fingerprint_covers_every_field_the_gate_chose_and_never_the_uid() -> None:
    tap = check(raw())
    card = credential_hash(KEY, UID)
    assert len(card) == 32 and UID not in card and credential_hash(KEY, UID) == card
    assert credential_hash(bytes(32), UID) != card  # keyed: the pseudonym depends on the key
    base = tap_fingerprint(tap, card)
    assert tap_fingerprint(check(raw()), card) == base
    variants = [
        check(raw(gate_id="CEN-G2")), check(raw(direction=2)), check(raw(tapped_at=NOW + timedelta(microseconds=1))),
        check(raw(tap_id=str(uuid.UUID(int=8)))),
    ]
    for variant in variants:
        assert tap_fingerprint(variant, card) != base
    assert tap_fingerprint(tap, credential_hash(KEY, bytes.fromhex("04a1b2c3d4e5f7"))) != base
    bus = check(raw(gate_id="BUS1-V1", direction=3, stop_id="BUS_CEN"))
    assert tap_fingerprint(bus, card) != tap_fingerprint(replace(bus, route_id="BUS2"), card)
    assert tap_fingerprint(bus, card) != tap_fingerprint(replace(bus, stop_id="UNI"), card)


def test_a_replay_returns_the_original_answer_or_refuses_another_payload() -> None:
    outcome = TapOutcome(Decision.OPEN, Reason.OK, 0, 6500, 1000, "j", "TWD")
    recorded = RecordedTap("t", b"a" * 32, outcome)
    assert replay(recorded, b"a" * 32) is outcome
    with pytest.raises(errors.Conflict) as info:
        replay(recorded, b"b" * 32)
    assert info.value.reason == "IDEMPOTENCY_CONFLICT"


def test_the_hold_outlives_the_incomplete_journey_by_the_grace() -> None:
    assert hold_expiry(NOW, 7200, 600) == NOW + timedelta(seconds=7800)


# --- screening ---------------------------------------------------------------------------------


OPENED = TapOutcome(Decision.OPEN, Reason.OK, 0, 6500, 43_500, "journey-1", "TWD")


def decide(direction: Direction, *, blocked: bool = False, at: datetime = NOW,
           opening: tuple[datetime, TapOutcome] | None = None, journey_started: datetime | None = None,
           double_tap_s: int = 10, passback_s: int = 1200):
    journey = OpenJourneyFacts("journey-1", journey_started) if journey_started else None
    return screen(direction, blocked=blocked, tapped_at=at, last_opening_here=opening, open_journey=journey,
                  double_tap_window_s=double_tap_s, passback_window_s=passback_s)


def test_a_plain_entry_exit_or_validate_proceeds() -> None:
    assert decide(Direction.ENTRY).verdict is Verdict.PROCEED
    assert decide(Direction.EXIT, journey_started=NOW - timedelta(minutes=9)).verdict is Verdict.PROCEED
    assert decide(Direction.VALIDATE).verdict is Verdict.PROCEED


def test_a_double_tap_repeats_the_opening_for_nothing_within_the_window_only() -> None:
    for seconds in (0, 3, 10, -2):  # gate clocks drift: a repeat may read slightly earlier
        verdict = decide(Direction.ENTRY, at=NOW + timedelta(seconds=seconds), opening=(NOW, OPENED),
                         journey_started=NOW)
        assert verdict.verdict is Verdict.REPEAT
        assert verdict.repeat_of == TapOutcome(Decision.OPEN, Reason.OK_DOUBLE_TAP, 0, 0, 43_500, "journey-1", "TWD")
    late = decide(Direction.ENTRY, at=NOW + timedelta(seconds=11), opening=(NOW, OPENED), journey_started=NOW)
    assert (late.verdict, late.reason) == (Verdict.DENY, Reason.DENIED_PASSBACK)
    off = decide(Direction.ENTRY, opening=(NOW, OPENED), journey_started=NOW, double_tap_s=0)
    assert (off.verdict, off.reason) == (Verdict.DENY, Reason.DENIED_PASSBACK)
    # An exit repeated at its gate after the journey closed opens again, charging nothing.
    assert decide(Direction.EXIT, at=NOW + timedelta(seconds=2), opening=(NOW, OPENED)).verdict is Verdict.REPEAT
    assert decide(Direction.VALIDATE, at=NOW + timedelta(seconds=5), opening=(NOW, OPENED)).verdict is Verdict.REPEAT


def test_passback_refuses_a_second_entry_within_the_window_and_closes_a_stale_journey_after_it() -> None:
    for started in (NOW - timedelta(seconds=1), NOW - timedelta(seconds=1199), NOW + timedelta(seconds=30)):
        verdict = decide(Direction.ENTRY, journey_started=started)
        assert (verdict.verdict, verdict.reason) == (Verdict.DENY, Reason.DENIED_PASSBACK)
    assert decide(Direction.ENTRY, journey_started=NOW - timedelta(seconds=1200)).verdict is \
        Verdict.CLOSE_STALE_THEN_PROCEED
    assert decide(Direction.ENTRY, journey_started=NOW - timedelta(seconds=1), passback_s=0).verdict is \
        Verdict.CLOSE_STALE_THEN_PROCEED
    # Boarding a bus with a station journey open: that journey had no exit.
    assert decide(Direction.VALIDATE, journey_started=NOW - timedelta(minutes=2)).verdict is \
        Verdict.CLOSE_STALE_THEN_PROCEED


def test_an_exit_without_an_open_journey_is_denied() -> None:
    verdict = decide(Direction.EXIT)
    assert (verdict.verdict, verdict.reason) == (Verdict.DENY, Reason.DENIED_NO_ENTRY)


def test_blocked_comes_first_except_for_an_exit_that_ends_a_journey() -> None:
    for direction in (Direction.ENTRY, Direction.VALIDATE, Direction.EXIT):
        verdict = decide(direction, blocked=True, opening=(NOW, OPENED))
        assert (verdict.verdict, verdict.reason) == (Verdict.DENY, Reason.DENIED_BLOCKED)
    assert decide(Direction.ENTRY, blocked=True, journey_started=NOW).reason is Reason.DENIED_BLOCKED
    assert decide(Direction.EXIT, blocked=True, journey_started=NOW - timedelta(minutes=5)).verdict is Verdict.PROCEED


def test_within_is_symmetric_and_off_at_zero() -> None:
    assert within(NOW, NOW + timedelta(seconds=10), 10) and within(NOW + timedelta(seconds=10), NOW, 10)
    assert not within(NOW, NOW + timedelta(seconds=10, microseconds=1), 10)
    assert not within(NOW, NOW, 0)
