"""The tap path against the real stack: a fare gate and a wallet built through their
composition roots, over the test stack's PostgreSQL, Redis and Kafka, talking gRPC.

Every money expectation is worked out from the demo city's fare table (FARES.md): adult
metro NT$20 up to 5 km and NT$25 up to 8 km, metro maximum fare NT$65, bus NT$15, metro to
bus transfer -NT$8 within 60 min, adult daily cap NT$150. One minor unit is NT$0.01.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from citytap.fare_gate.v1 import fare_gate_pb2
from libs.postgres import create_pool
from services.fare_gate.bootstrap import incomplete_journey_worker
from services.fare_gate.domain import CredentialKind, TapInput, hold_id_for
from services.fare_gate.repository import AccountTx
from tests.integration.fare_gate_support import (  # noqa: F401 - `stack` is a fixture
    DENY,
    ENTRY,
    EXIT,
    OPEN,
    VALIDATE,
    FareGateStack,
    R,
    service_day_start,
    stack,
)
from tests.integration.wallet_support import invariant_violations

METRO_MAX = 6500


def now() -> datetime:
    return datetime.now(timezone.utc)


def an_hour_ago() -> datetime:
    """Gates may not send taps from the future, so journeys replayed here start in the past."""
    return now() - timedelta(hours=1)


def test_entry_holds_the_maximum_fare_and_exit_posts_the_distance_fare(stack: FareGateStack) -> None:
    rider = stack.rider(50_000)
    t0 = an_hour_ago()
    entry = stack.tap(rider, "HBR-G1", ENTRY, t0)
    assert (entry.decision, entry.reason) == (OPEN, R.TAP_REASON_OK)
    assert entry.amount_held.amount_minor == METRO_MAX and entry.fare_charged.amount_minor == 0
    assert entry.balance.amount_minor == 50_000 - METRO_MAX and entry.balance.currency == "TWD"
    assert stack.balance(rider) == (50_000, METRO_MAX)
    exit_ = stack.tap(rider, "UNI-G2", EXIT, t0 + timedelta(minutes=20))  # Harbour - University: 8.0 km
    assert (exit_.decision, exit_.reason) == (OPEN, R.TAP_REASON_OK)
    assert exit_.fare_charged.amount_minor == 2500 and exit_.amount_held.amount_minor == 0
    assert exit_.journey_id == entry.journey_id
    assert exit_.balance.amount_minor == 47_500
    assert stack.balance(rider) == (47_500, 0)
    journey = stack.query("SELECT status, fare_minor, transfer_id, entry_stop_id, exit_stop_id FROM {fg}.journeys"
                          " WHERE journey_id = %s", (entry.journey_id,))
    assert journey == [("COMPLETED", 2500, journey[0][2], "HBR", "UNI")]
    assert stack.event_types(rider.account_id) == ["JourneyStarted", "TapRecorded", "JourneyCompleted", "TapRecorded"]


def test_a_retried_tap_returns_its_first_answer_and_another_payload_is_refused(stack: FareGateStack) -> None:
    rider = stack.rider(50_000)
    t0 = an_hour_ago()
    request = stack.request(rider.card_uid, "CEN-G1", ENTRY, t0)
    first = stack.stub.Tap(request)
    before = stack.snapshot()
    for _ in range(3):
        assert stack.stub.Tap(request) == first
    assert stack.snapshot() == before
    assert stack.balance(rider) == (50_000, METRO_MAX)
    # The same tap id with another payload: another gate, another card, another time.
    for changed in (stack.request(rider.card_uid, "CEN-G2", ENTRY, t0, tap_id=request.tap_id),
                    stack.request(stack.rider().card_uid, "CEN-G1", ENTRY, t0, tap_id=request.tap_id),
                    stack.request(rider.card_uid, "CEN-G1", ENTRY, t0 + timedelta(seconds=1), tap_id=request.tap_id)):
        before = stack.snapshot()
        code, reason, _ = stack.refused(changed)
        assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
        assert stack.snapshot() == before
    # A retried exit repeats its answer and its charge is not made twice.
    exit_request = stack.request(rider.card_uid, "MKT-G1", EXIT, t0 + timedelta(minutes=10))
    exit_ = stack.stub.Tap(exit_request)
    assert exit_.fare_charged.amount_minor == 2000  # Central - Market: 2.0 km
    assert stack.stub.Tap(exit_request) == exit_
    assert stack.balance(rider) == (48_000, 0)


def test_a_double_tap_opens_again_for_nothing_and_charges_nothing_more(stack: FareGateStack) -> None:
    rider = stack.rider(50_000)
    t0 = an_hour_ago()
    entry = stack.tap(rider, "OLD-G1", ENTRY, t0)
    again = stack.tap(rider, "OLD-G1", ENTRY, t0 + timedelta(seconds=3))
    assert (again.decision, again.reason) == (OPEN, R.TAP_REASON_OK_DOUBLE_TAP)
    assert again.journey_id == entry.journey_id
    assert again.amount_held.amount_minor == 0 and again.fare_charged.amount_minor == 0
    assert stack.balance(rider) == (50_000, METRO_MAX)
    # After the double-tap window, the same gate sees a second entry: passback.
    late = stack.tap(rider, "OLD-G1", ENTRY, t0 + timedelta(seconds=30))
    assert (late.decision, late.reason) == (DENY, R.TAP_REASON_DENIED_PASSBACK)
    exit_ = stack.tap(rider, "CEN-G1", EXIT, t0 + timedelta(minutes=8))
    assert exit_.fare_charged.amount_minor == 2000
    exit_again = stack.tap(rider, "CEN-G1", EXIT, t0 + timedelta(minutes=8, seconds=2))
    assert (exit_again.decision, exit_again.reason) == (OPEN, R.TAP_REASON_OK_DOUBLE_TAP)
    assert exit_again.fare_charged.amount_minor == 0
    # Double taps on a bus validator: one fare.
    bus = stack.tap(rider, "BUS2-V1", VALIDATE, t0 + timedelta(minutes=30), stop_id="BUS_CEN")
    bus_again = stack.tap(rider, "BUS2-V1", VALIDATE, t0 + timedelta(minutes=30, seconds=4), stop_id="BUS_CEN")
    assert bus.fare_charged.amount_minor == 700  # 15 - 8 transfer discount
    assert (bus_again.reason, bus_again.fare_charged.amount_minor) == (R.TAP_REASON_OK_DOUBLE_TAP, 0)
    assert stack.balance(rider) == (50_000 - 2000 - 700, 0)


def test_passback_at_another_gate_is_refused_and_a_stale_entry_is_charged_as_incomplete(stack: FareGateStack) -> None:
    rider = stack.rider(50_000)
    t0 = now() - timedelta(minutes=25)
    first = stack.tap(rider, "RIV-G1", ENTRY, t0)
    assert first.decision == OPEN
    second = stack.tap(rider, "RIV-G2", ENTRY, t0 + timedelta(minutes=2))
    assert (second.decision, second.reason) == (DENY, R.TAP_REASON_DENIED_PASSBACK)
    assert second.journey_id == "" and second.amount_held.amount_minor == 0
    assert stack.balance(rider) == (50_000, METRO_MAX)
    # 25 minutes later (beyond the 20-minute passback window) the rider evidently left
    # without an exit: that journey costs the maximum fare, and a new one begins.
    third = stack.tap(rider, "RIV-G2", ENTRY, t0 + timedelta(minutes=25))
    assert (third.decision, third.reason) == (OPEN, R.TAP_REASON_OK)
    assert third.journey_id != first.journey_id
    assert stack.balance(rider) == (50_000 - METRO_MAX, METRO_MAX)
    rows = stack.query("SELECT journey_id::text, status, fare_minor FROM {fg}.journeys WHERE account_id = %s"
                       " ORDER BY started_at", (rider.account_id,))
    assert rows == [(first.journey_id, "INCOMPLETE", METRO_MAX), (third.journey_id, "OPEN", None)]
    assert "JourneyIncomplete" in stack.event_types(rider.account_id)


def test_insufficient_balance_is_denied_with_the_balance_and_holds_nothing(stack: FareGateStack) -> None:
    rider = stack.rider(3000)
    before = stack.balance(rider)
    entry = stack.tap(rider, "HSP-G1", ENTRY)
    assert (entry.decision, entry.reason) == (DENY, R.TAP_REASON_DENIED_INSUFFICIENT_BALANCE)
    assert entry.balance.amount_minor == 3000 and entry.amount_held.amount_minor == 0 and entry.journey_id == ""
    poor = stack.rider(1000)
    bus = stack.tap(poor, "BUS1-V2", VALIDATE, stop_id="BUS_UNI")
    assert (bus.decision, bus.reason) == (DENY, R.TAP_REASON_DENIED_INSUFFICIENT_BALANCE)
    assert bus.balance.amount_minor == 1000 and bus.fare_charged.amount_minor == 0
    assert stack.balance(rider) == before and stack.balance(poor) == (1000, 0)
    # Enough for the bus fare but not for a metro entry's hold.
    mid = stack.rider(2000)
    assert stack.tap(mid, "BUS1-V2", VALIDATE, stop_id="BUS_UNI").fare_charged.amount_minor == 1500
    assert stack.balance(mid) == (500, 0)


def test_blocked_and_unknown_cards_are_denied_and_an_open_journey_may_still_exit(stack: FareGateStack) -> None:
    blocked = stack.rider(50_000)
    stack.block(blocked)
    for gate, direction, stop in (("APT-G1", ENTRY, ""), ("BUS2-V2", VALIDATE, "BUS_MKT"), ("APT-G1", EXIT, "")):
        answer = stack.tap(blocked, gate, direction, stop_id=stop)
        assert (answer.decision, answer.reason) == (DENY, R.TAP_REASON_DENIED_BLOCKED), gate
    assert stack.balance(blocked) == (50_000, 0)
    # Blocked while travelling: the rider is let out and the journey is charged.
    travelling = stack.rider(50_000)
    t0 = an_hour_ago()
    assert stack.tap(travelling, "APT-G1", ENTRY, t0).decision == OPEN
    stack.block(travelling)
    exit_ = stack.tap(travelling, "RIV-G1", EXIT, t0 + timedelta(minutes=15))  # Airport - Riverside 12.0 km
    assert (exit_.decision, exit_.fare_charged.amount_minor) == (OPEN, 3500)
    assert stack.balance(travelling) == (46_500, 0)
    # A card linked to no account.
    stranger = bytes.fromhex("04a1b2c3d4e5f6")
    unknown_request = stack.request(stranger, "APT-G2", ENTRY)
    unknown = stack.stub.Tap(unknown_request)
    assert (unknown.decision, unknown.reason) == (DENY, R.TAP_REASON_DENIED_UNKNOWN_CREDENTIAL)
    assert not unknown.HasField("balance")
    assert stack.stub.Tap(unknown_request) == unknown
    assert stack.query("SELECT account_id, decision, reason FROM {fg}.taps WHERE tap_id = %s",
                       (unknown_request.tap_id,)) == [(None, 2, R.TAP_REASON_DENIED_UNKNOWN_CREDENTIAL)]
    # The UID itself is stored nowhere.
    assert not stack.query("SELECT 1 FROM {fg}.taps WHERE position(%s in credential_hash) > 0", (stranger,))


def test_an_exit_without_an_entry_is_denied_and_charges_nothing(stack: FareGateStack) -> None:
    rider = stack.rider(50_000)
    answer = stack.tap(rider, "STD-G1", EXIT)
    assert (answer.decision, answer.reason) == (DENY, R.TAP_REASON_DENIED_NO_ENTRY)
    assert answer.fare_charged.amount_minor == 0 and answer.journey_id == ""
    assert stack.balance(rider) == (50_000, 0)


def test_concurrent_entries_of_one_card_at_two_gates_let_exactly_one_in(stack: FareGateStack) -> None:
    for _ in range(5):
        rider = stack.rider(50_000)
        at = now()
        requests = [stack.request(rider.card_uid, gate, ENTRY, at) for gate in ("CEN-G1", "CEN-G2", "MKT-G1", "MKT-G2")]
        barrier = threading.Barrier(len(requests))

        def send(request: fare_gate_pb2.TapRequest) -> fare_gate_pb2.TapResponse:
            barrier.wait()
            return stack.stub.Tap(request)

        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(send, requests))
        reasons = sorted(a.reason for a in answers)
        assert reasons == [R.TAP_REASON_OK] + [R.TAP_REASON_DENIED_PASSBACK] * 3, reasons
        assert stack.balance(rider) == (50_000, METRO_MAX)
        assert stack.query("SELECT count(*) FROM {fg}.journeys WHERE account_id = %s", (rider.account_id,)) == [(1,)]


def test_a_day_of_journeys_with_a_transfer_discount_reaches_the_daily_cap(stack: FareGateStack) -> None:
    rider = stack.rider(100_000)
    day = service_day_start(now()) - timedelta(days=1)  # yesterday's whole service day is in the past
    t = day + timedelta(hours=3)  # 07:30 local

    def ride(entry_gate: str, exit_gate: str, minutes: int) -> tuple[int, int]:
        nonlocal t
        entry = stack.tap(rider, entry_gate, ENTRY, t)
        assert entry.decision == OPEN, entry
        t += timedelta(minutes=minutes)
        exit_ = stack.tap(rider, exit_gate, EXIT, t)
        assert exit_.decision == OPEN, exit_
        return exit_.fare_charged.amount_minor, exit_.balance.amount_minor

    assert ride("HBR-G1", "CEN-G1", 12) == (2000, 98_000)  # Harbour - Central, 5.0 km
    t += timedelta(minutes=18)
    bus = stack.tap(rider, "BUS1-V1", VALIDATE, t, stop_id="BUS_CEN")  # 18 min after the exit
    assert (bus.fare_charged.amount_minor, bus.balance.amount_minor) == (700, 97_300)  # 15 - 8
    t += timedelta(hours=2)
    assert ride("APT-G1", "NHL-G1", 50)[0] == 6500  # 29.7 km, the top band
    t += timedelta(hours=3)
    assert ride("NHL-G2", "APT-G2", 50)[0] == 5800  # 65 but the day is capped at 150: 150 - 92
    t += timedelta(hours=2)
    capped = stack.tap(rider, "CEN-G2", ENTRY, t)
    assert capped.amount_held.amount_minor == METRO_MAX  # the hold does not know the cap
    t += timedelta(minutes=10)
    free = stack.tap(rider, "UNI-G1", EXIT, t)
    assert (free.fare_charged.amount_minor, free.balance.amount_minor) == (0, 85_000)
    bus_free = stack.tap(rider, "BUS2-V2", VALIDATE, t + timedelta(minutes=5), stop_id="BUS_UNI")
    assert bus_free.fare_charged.amount_minor == 0
    assert stack.balance(rider) == (85_000, 0)
    # The rider paid exactly the cap, and each fare went to operator revenue.
    paid = stack.query("SELECT coalesce(sum(amount_minor), 0) FROM {w}.transfers WHERE debit_account_id = %s",
                       (rider.account_id,))[0][0]
    assert paid == 15_000
    journeys = stack.query("SELECT status, fare_minor FROM {fg}.journeys WHERE account_id = %s ORDER BY started_at",
                           (rider.account_id,))
    assert journeys == [("COMPLETED", 2000), ("COMPLETED", 700), ("COMPLETED", 6500), ("COMPLETED", 5800),
                        ("COMPLETED", 0), ("COMPLETED", 0)]


def test_a_journey_with_no_exit_in_time_is_charged_the_maximum_fare_by_the_worker(stack: FareGateStack) -> None:
    rider = stack.rider(50_000)
    started = now() - timedelta(hours=2, minutes=1)  # the demo metro's incomplete_after_s is 7200
    entry = stack.tap(rider, "STD-G2", ENTRY, started)
    assert entry.decision == OPEN
    on_time = stack.rider(50_000)
    stack.tap(on_time, "STD-G2", ENTRY, now() - timedelta(minutes=5))
    stop = threading.Event()
    worker = threading.Thread(target=incomplete_journey_worker(stack.service, interval_s=0.05), args=(stop,))
    worker.start()
    try:
        deadline = time.monotonic() + 10
        while stack.balance(rider)[1] and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join()
    assert stack.balance(rider) == (50_000 - METRO_MAX, 0)
    assert stack.balance(on_time) == (50_000, METRO_MAX)  # not yet due
    row = stack.query("SELECT status, fare_minor, transfer_id FROM {fg}.journeys WHERE journey_id = %s",
                      (entry.journey_id,))
    assert row == [("INCOMPLETE", METRO_MAX, hold_id_for(stack.query(
        "SELECT entry_tap_id::text FROM {fg}.journeys WHERE journey_id = %s", (entry.journey_id,))[0][0]))]
    assert stack.event_types(rider.account_id)[-1] == "JourneyIncomplete"
    # Its late exit finds no journey; a correction is a support flow (README), not a tap.
    late = stack.tap(rider, "CEN-G1", EXIT)
    assert late.reason == R.TAP_REASON_DENIED_NO_ENTRY
    assert stack.service.close_overdue_journeys() == 0


def test_an_out_and_back_joined_into_one_leg_refunds_the_difference(stack: FareGateStack) -> None:
    """Leaving at North Hills and coming back in there within 15 minutes joins the two rides
    into one fare leg (fare_leg_join_rules.txt), Harbour to Harbour: NT$20 in all. The first
    ride was charged NT$45, so the second exit refunds NT$25 by a correcting transfer."""
    rider = stack.rider(50_000)
    t0 = now() - timedelta(minutes=90)
    assert stack.tap(rider, "HBR-G1", ENTRY, t0).decision == OPEN
    out = stack.tap(rider, "NHL-G1", EXIT, t0 + timedelta(minutes=30))
    assert out.fare_charged.amount_minor == 4500  # 19.5 km
    assert stack.tap(rider, "NHL-G2", ENTRY, t0 + timedelta(minutes=35)).decision == OPEN
    back = stack.tap(rider, "HBR-G2", EXIT, t0 + timedelta(minutes=65))
    assert (back.decision, back.fare_charged.amount_minor, back.balance.amount_minor) == (OPEN, 0, 48_000)
    assert stack.balance(rider) == (48_000, 0)
    refund = stack.query("SELECT kind, amount_minor, corrects_transfer_id, credit_account_id FROM {w}.transfers"
                         " WHERE credit_account_id = %s AND kind <> 'TOP_UP'", (rider.account_id,))
    assert [(kind, amount, account) for kind, amount, _, account in refund] == [("CORRECTION", 2500, rider.account_id)]
    assert refund[0][2].startswith("fare:")
    fares = stack.query("SELECT fare_minor FROM {fg}.journeys WHERE account_id = %s ORDER BY started_at",
                        (rider.account_id,))
    assert fares == [(4500,), (-2500,)]


def test_a_journey_whose_hold_is_gone_is_marked_unresolved_and_charges_nothing(stack: FareGateStack) -> None:
    """What a lost exit leaves behind: the wallet's hold was settled by someone else, so the
    worker can no longer post it. The journey leaves OPEN as UNRESOLVED for support."""
    rider = stack.rider(50_000)
    request = stack.request(rider.card_uid, "OLD-G2", ENTRY, now() - timedelta(hours=2, minutes=5))
    assert stack.stub.Tap(request).decision == OPEN
    stack.ledger.void_hold(hold_id_for(request.tap_id))
    assert stack.service.close_overdue_journeys() >= 1
    assert stack.query("SELECT status, fare_minor, transfer_id FROM {fg}.journeys WHERE account_id = %s",
                       (rider.account_id,)) == [("UNRESOLVED", 0, None)]
    assert stack.balance(rider) == (50_000, 0)
    assert "JourneyIncomplete" not in stack.event_types(rider.account_id)


def test_a_crash_between_the_wallet_and_the_commit_is_completed_by_the_retry(stack: FareGateStack,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The wallet write happens, the local commit does not (the process 'dies'): the retry
    with the same tap id completes the same work, and nothing is charged twice."""
    rider = stack.rider(50_000)
    service = stack.service
    real_flush = AccountTx.flush
    crashes = {"left": 0}

    def crashing_flush(self: AccountTx) -> None:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("the process died before its commit")
        real_flush(self)

    monkeypatch.setattr(AccountTx, "flush", crashing_flush)
    t0 = an_hour_ago()
    crashes["left"] = 1
    entry = TapInput(str(uuid.uuid4()), "UNI-G1", "", ENTRY, t0, CredentialKind.CARD, rider.card_uid, "")
    with pytest.raises(RuntimeError):
        service.tap(entry)
    assert stack.balance(rider) == (50_000, METRO_MAX)  # the hold is placed, nothing local
    assert stack.query("SELECT count(*) FROM {fg}.journeys WHERE account_id = %s", (rider.account_id,)) == [(0,)]
    opened = service.tap(entry)
    assert (opened.decision, opened.amount_held_minor) == (OPEN, METRO_MAX)
    assert stack.balance(rider) == (50_000, METRO_MAX)  # still one hold
    crashes["left"] = 1
    exit_ = TapInput(str(uuid.uuid4()), "HSP-G1", "", EXIT, t0 + timedelta(minutes=6), CredentialKind.CARD,
                     rider.card_uid, "")
    with pytest.raises(RuntimeError):
        service.tap(exit_)
    assert stack.balance(rider) == (48_000, 0)  # University - Hospital 2.5 km: posted in the wallet
    closed = service.tap(exit_)
    assert (closed.decision, closed.fare_charged_minor) == (OPEN, 2000)
    assert stack.balance(rider) == (48_000, 0)
    assert stack.query("SELECT count(*) FROM {w}.transfers WHERE debit_account_id = %s", (rider.account_id,)) == [(1,)]
    assert stack.query("SELECT status, fare_minor FROM {fg}.journeys WHERE account_id = %s",
                       (rider.account_id,)) == [("COMPLETED", 2000)]


@pytest.mark.parametrize("case", [
    "no credential", "malformed phone qr", "short card uid", "malformed tap id", "empty tap id", "unknown gate",
    "no direction", "validate at a station", "entry at a validator", "unknown stop", "wrong station",
    "no stop on a bus", "unknown route", "route of another network", "no time", "far future", "too old",
])
def test_bad_taps_get_clear_errors_and_change_nothing(stack: FareGateStack, case: str) -> None:
    rider = stack.riders[0] if stack.riders else stack.rider()
    uid = rider.card_uid
    base = dict(card_uid=uid, gate_id="CEN-G1", direction=ENTRY)
    make = {
        "no credential": (dict(base, card_uid=None), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "credential"),
        "malformed phone qr": (None, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "PhoneQrPayload"),
        "short card uid": (dict(base, card_uid=b"\x01\x02"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                           "card UID"),
        "malformed tap id": (dict(base, tap_id="tap-1; DROP TABLE"), grpc.StatusCode.INVALID_ARGUMENT,
                             "INVALID_ARGUMENT", "tap_id"),
        "empty tap id": (dict(base, tap_id=""), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "tap_id"),
        "unknown gate": (dict(base, gate_id="NOPE-G9"), grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "gate"),
        "no direction": (dict(base, direction=0), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "direction"),
        "validate at a station": (dict(base, direction=VALIDATE), grpc.StatusCode.INVALID_ARGUMENT,
                                  "INVALID_ARGUMENT", "station gate"),
        "entry at a validator": (dict(base, gate_id="BUS1-V1", stop_id="BUS_CEN"), grpc.StatusCode.INVALID_ARGUMENT,
                                 "INVALID_ARGUMENT", "validator"),
        "unknown stop": (dict(base, gate_id="BUS1-V1", direction=VALIDATE, stop_id="MOON"),
                         grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "stop"),
        "wrong station": (dict(base, stop_id="HBR"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "stop"),
        "no stop on a bus": (dict(base, gate_id="BUS1-V1", direction=VALIDATE), grpc.StatusCode.INVALID_ARGUMENT,
                             "INVALID_ARGUMENT", "stop"),
        "unknown route": (dict(base, gate_id="BUS1-V1", direction=VALIDATE, stop_id="BUS_CEN", route_id="BUS99"),
                          grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "route"),
        "route of another network": (dict(base, gate_id="BUS1-V1", direction=VALIDATE, stop_id="BUS_CEN",
                                          route_id="RED"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "route"),
        "no time": (dict(base, at=None), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "tapped_at"),
        "far future": (dict(base, at=now() + timedelta(hours=1)), grpc.StatusCode.INVALID_ARGUMENT,
                       "INVALID_ARGUMENT", "ahead"),
        "too old": (dict(base, at=now() - timedelta(days=3)), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT",
                    "old"),
    }
    fields, code, reason, hint = make[case]
    if fields is None:
        request = stack.request(None, "CEN-G1", ENTRY)
        request.credential.phone_qr = b"not a phone code"
    else:
        fields = dict(fields)
        at = fields.pop("at", "now")
        request = stack.request(fields.pop("card_uid"), fields.pop("gate_id"), fields.pop("direction"),
                                None if at == "now" else at, **fields)
        if at is None:
            request.ClearField("tapped_at")
    before = stack.snapshot()
    got_code, got_reason, details = stack.refused(request)
    assert (got_code, got_reason) == (code, reason), details
    assert hint in details, details
    assert stack.snapshot() == before


def test_quote_fare_gate_config_and_offline_rpcs(stack: FareGateStack) -> None:
    quote = stack.stub.QuoteFare(fare_gate_pb2.QuoteFareRequest(from_stop_id="HBR", to_stop_id="UNI"))
    assert (quote.fare.amount_minor, quote.fare.currency, quote.fare_product_id, quote.network_id) == (
        2500, "TWD", "metro_25", "metro")
    assert quote.feed_version == stack.service.engine.feed.version
    student = stack.stub.QuoteFare(fare_gate_pb2.QuoteFareRequest(from_stop_id="HBR", to_stop_id="UNI",
                                                                  rider_category="student"))
    assert student.fare.amount_minor == 2000
    bus = stack.stub.QuoteFare(fare_gate_pb2.QuoteFareRequest(from_stop_id="BUS_CEN", route_id="BUS1"))
    assert (bus.fare.amount_minor, bus.network_id) == (1500, "bus")
    for request, code, reason in (
        (fare_gate_pb2.QuoteFareRequest(from_stop_id="MOON", to_stop_id="UNI", network_id="metro"),
         grpc.StatusCode.NOT_FOUND, "NOT_FOUND"),
        (fare_gate_pb2.QuoteFareRequest(from_stop_id="HBR", to_stop_id="UNI", rider_category="pirate"),
         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (fare_gate_pb2.QuoteFareRequest(from_stop_id="BUS_CEN"), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (fare_gate_pb2.QuoteFareRequest(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
    ):
        assert stack.refused(request, "QuoteFare")[:2] == (code, reason)
    config = stack.stub.GetGateConfig(fare_gate_pb2.GetGateConfigRequest(gate_id="CEN-G2")).config
    assert (config.stop_id, config.kind, config.network_id, config.time_zone) == (
        "CEN", fare_gate_pb2.GATE_KIND_STATION_GATE, "metro", "Asia/Taipei")
    assert (config.double_tap_window_s, config.passback_window_s, config.tap_deadline_ms) == (10, 1200, 250)
    assert config.feed_version == quote.feed_version
    validator = stack.stub.GetGateConfig(fare_gate_pb2.GetGateConfigRequest(gate_id="BUS2-V1")).config
    assert (validator.stop_id, validator.kind, validator.route_id) == ("", fare_gate_pb2.GATE_KIND_VEHICLE_VALIDATOR,
                                                                       "BUS2")
    assert stack.refused(fare_gate_pb2.GetGateConfigRequest(gate_id="X"), "GetGateConfig")[:2] == (
        grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    code, _, _ = stack.refused(fare_gate_pb2.GetGateBundleRequest(gate_id="CEN-G1"), "GetGateBundle")
    assert code == grpc.StatusCode.UNIMPLEMENTED
    code, _, _ = stack.refused(fare_gate_pb2.UploadOfflineTapsRequest(gate_id="CEN-G1"), "UploadOfflineTaps")
    assert code == grpc.StatusCode.UNIMPLEMENTED


def test_zz_the_books_add_up_after_every_test(stack: FareGateStack) -> None:
    """Runs last in this module: every fare the taps above charged is in the ledger once."""
    pool = create_pool(stack.dsn, name="fare-gate-books", max_size=1)
    try:
        assert not invariant_violations(pool, stack.wallet_schema)
    finally:
        pool.close()
    funded = sum(r.funded_minor for r in stack.riders)
    balances = sum(stack.balance(r)[0] for r in stack.riders)
    # Fares are paid to the operator's revenue, and split from there to the city's and the
    # platform's accounts when a transit-fare contract is in force (fare_split.py).
    fare_accounts = (stack.revenue_account, "system:city-revenue:TWD", "system:platform-fees:TWD")
    revenue_balance = stack.query("SELECT sum(balance_minor)::bigint FROM {w}.accounts WHERE id = ANY(%s)",
                                  (list(fare_accounts),))[0][0]
    assert funded - balances == revenue_balance > 0  # what riders paid is what those accounts received
    fares = stack.query("SELECT coalesce(sum(fare_minor), 0) FROM {fg}.journeys WHERE status <> 'OPEN'")[0][0]
    assert fares == revenue_balance  # every charged journey, and nothing else, reached the ledger
    # Every pending hold in the wallet belongs to an open journey, and every open journey has one.
    held = stack.query("SELECT h.id, h.amount_minor FROM {w}.holds h WHERE NOT EXISTS"
                       " (SELECT 1 FROM {w}.hold_resolutions r WHERE r.hold_id = h.id) ORDER BY 1")
    open_holds = stack.query("SELECT hold_id, amount_held_minor FROM {fg}.journeys WHERE status = 'OPEN' ORDER BY 1")
    assert held == open_holds
    # Every outbox event was relayed to Kafka.
    deadline = time.monotonic() + 10
    while stack.query("SELECT count(*) FROM {fg}.outbox_events WHERE published_at IS NULL")[0][0]:
        assert time.monotonic() < deadline, "the outbox relay did not publish fare-gate's events"
        time.sleep(0.1)
