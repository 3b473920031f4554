"""The tap use cases (taps.TapService) over in-memory fakes of the wallet, PostgreSQL and
Redis: the paths the real stack rarely takes (a fare above the hold, wallet refusals, a
hold that is gone, Redis down, a wallet timeout) in milliseconds, with no I/O."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from libs import errors
from services.fare_gate.domain import (
    CredentialKind,
    Decision,
    Direction,
    Gate,
    GateKind,
    Journey,
    JourneyEnd,
    JourneyStatus,
    Reason,
    RecordedTap,
    TapInput,
)
from services.fare_gate.fares import FareEngine, RiderFareState
from services.fare_gate.fares.testing import write_feed
from services.fare_gate.hot_state import HotState
from services.fare_gate.repository import Snapshot
from services.fare_gate.taps import TapConfig, TapService
from services.fare_gate.wallet_client import HoldState, PostedTransfer, Resolution, WalletRefusal

NOW = datetime(2030, 3, 4, 1, 0, tzinfo=timezone.utc)
REVENUE = "system:operator-revenue:TWD"
CONFIG = TapConfig(revenue_account_id=REVENUE, fare_media_id=None, double_tap_window_s=10, passback_window_s=1200,
                   incomplete_after_s=7200, hold_grace_s=21600, tap_age_s_max=3600, clock_skew_s_max=300,
                   account_lock_timeout_ms=1000)
GATES = {
    "A-G1": Gate("A-G1", GateKind.STATION_GATE, "metro", "A", None, "test:2"),
    "C-G1": Gate("C-G1", GateKind.STATION_GATE, "metro", "C", None, "test:3"),
    "B1-V1": Gate("B1-V1", GateKind.VEHICLE_VALIDATOR, "bus", None, "B1", "test:4"),
}


# --- fakes ----------------------------------------------------------------------------------


def refusal(reason: str) -> WalletRefusal:
    return WalletRefusal(reason, grpc.StatusCode.FAILED_PRECONDITION, reason.lower(), {})


@dataclass
class FakeWallet:
    """The wallet's idempotent holds and transfers over in-memory balances."""

    cards: dict[bytes, Resolution] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)
    holds: dict[str, dict[str, Any]] = field(default_factory=dict)
    transfers: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    refuse_next: dict[str, str] = field(default_factory=dict)  # method -> reason
    resolutions: int = 0

    def _maybe_refuse(self, method: str) -> None:
        reason = self.refuse_next.pop(method, None)
        if reason == "UNAVAILABLE":
            raise errors.Unavailable("UNAVAILABLE", "the wallet did not answer")
        if reason:
            raise refusal(reason)

    def held(self, account_id: str) -> int:
        return sum(h["amount"] for h in self.holds.values() if h["debit"] == account_id and h["status"] == "PENDING")

    def available_minor(self, account_id: str) -> int:
        return self.balances[account_id] - self.held(account_id)

    def resolve_card(self, card_uid: bytes) -> Resolution | None:
        self.resolutions += 1
        return self.cards.get(card_uid)

    def create_hold(self, *, hold_id: str, debit_account_id: str, credit_account_id: str, amount_minor: int,
                    currency: str, expires_at: datetime, reference: str) -> HoldState:
        self._maybe_refuse("create_hold")
        payload = (debit_account_id, credit_account_id, amount_minor, expires_at, reference)
        if hold_id in self.holds:
            if self.holds[hold_id]["payload"] != payload:
                raise refusal("IDEMPOTENCY_CONFLICT")
        elif self.available_minor(debit_account_id) < amount_minor:
            raise refusal("INSUFFICIENT_FUNDS")
        else:
            self.holds[hold_id] = {"payload": payload, "debit": debit_account_id, "credit": credit_account_id,
                                   "amount": amount_minor, "status": "PENDING", "posted": 0}
        hold = self.holds[hold_id]
        return HoldState(hold_id, 1 if hold["status"] == "PENDING" else 2, hold["amount"], hold["posted"],
                         self.available_minor(debit_account_id))

    def post_hold(self, *, hold_id: str, amount_minor: int, currency: str, plan: object = None) -> HoldState:
        self._maybe_refuse("post_hold")
        hold = self.holds[hold_id]
        if hold["status"] == "POSTED":
            if hold["posted"] != amount_minor:
                raise refusal("IDEMPOTENCY_CONFLICT")
        elif hold["status"] != "PENDING":
            raise refusal("INVALID_STATE")
        else:
            assert amount_minor <= hold["amount"]
            hold.update(status="POSTED", posted=amount_minor)
            self._move(hold_id, hold["debit"], hold["credit"], amount_minor)
        return HoldState(hold_id, 2, hold["amount"], amount_minor, self.available_minor(hold["debit"]))

    def void_hold(self, *, hold_id: str) -> HoldState:
        self._maybe_refuse("void_hold")
        hold = self.holds[hold_id]
        if hold["status"] == "POSTED":
            raise refusal("INVALID_STATE")
        hold["status"] = "VOIDED"
        return HoldState(hold_id, 3, hold["amount"], 0, self.available_minor(hold["debit"]))

    def transfer(self, *, transfer_id: str, debit_account_id: str, credit_account_id: str, amount_minor: int,
                 currency: str, reference: str, corrects_transfer_id: str = "",
                 plan: object = None) -> PostedTransfer:
        self._maybe_refuse("transfer")
        if transfer_id in self.transfers:
            if self.transfers[transfer_id] != (debit_account_id, credit_account_id, amount_minor):
                raise refusal("IDEMPOTENCY_CONFLICT")
        elif debit_account_id != REVENUE and self.available_minor(debit_account_id) < amount_minor:
            raise refusal("INSUFFICIENT_FUNDS")
        else:
            self._move(transfer_id, debit_account_id, credit_account_id, amount_minor)
        riders = [a for a in (debit_account_id, credit_account_id) if a != REVENUE]
        return PostedTransfer(transfer_id, {a: self.available_minor(a) for a in riders})

    def _move(self, transfer_id: str, debit: str, credit: str, amount: int) -> None:
        self.transfers[transfer_id] = (debit, credit, amount)
        self.balances[debit] = self.balances.get(debit, 0) - amount
        self.balances[credit] = self.balances.get(credit, 0) + amount


class BrokenRedis:
    """A Redis client whose every command fails, as when Redis is down."""

    def __getattr__(self, name: str):
        def fail(*args: object, **kwargs: object) -> None:
            raise redis.ConnectionError("connection refused")

        return fail


class MemoryRedis:
    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}
        self.sets: dict[str, set[bytes]] = {}

    def get(self, key: str) -> bytes | None:
        return self.values.get(key)

    def set(self, key: str, value: str, ex: int) -> None:
        assert ex > 0
        self.values[key] = value.encode()

    def delete(self, key: str) -> None:
        self.values.pop(key, None)

    def sismember(self, key: str, member: str) -> bool:
        return member.encode() in self.sets.get(key, set())


def test_hot_state_caches_by_pseudonym_and_degrades_to_unknown_when_redis_fails() -> None:
    card = os.urandom(32)
    memory = MemoryRedis()
    state = HotState(memory, cache_ttl_s=60, deny_list_key="deny")
    assert state.cached_account(card) is None
    state.cache_account(card, "rider-1", "student")
    assert state.cached_account(card) == ("rider-1", "student")
    assert list(memory.values) == [f"citytap:fare_gate:card:{card.hex()}"]
    memory.sets["deny"] = {b"account:rider-1"}
    assert state.account_denied("rider-1") and not state.account_denied("rider-2")
    state.forget_card(card)
    assert state.cached_account(card) is None
    off = HotState(memory, cache_ttl_s=0)
    off.cache_account(card, "rider-1", "")
    assert off.cached_account(card) is None
    broken = HotState(BrokenRedis(), cache_ttl_s=60)
    broken.cache_account(card, "rider-1", "")
    assert broken.cached_account(card) is None and broken.account_denied("rider-1") is False



@dataclass
class FakeDb:
    taps: dict[str, tuple[RecordedTap, dict[str, Any]]] = field(default_factory=dict)
    journeys: dict[str, dict[str, Any]] = field(default_factory=dict)
    states: dict[str, tuple[RiderFareState, str | None]] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    locks: dict[str, threading.Lock] = field(default_factory=dict)


class FakeTx:
    """One transaction: reads see committed data, writes apply at flush, all or nothing."""

    def __init__(self, db: FakeDb) -> None:
        self.db = db
        self.writes: list[Any] = []

    def snapshot(self, *, tap_id: str, card_hash: bytes, gate_id: str, direction: int, around: datetime,
                 double_tap_window_s: int) -> Snapshot:
        recorded = self.db.taps.get(tap_id)
        openings = [(row["tapped_at"], r.outcome) for r, row in self.db.taps.values()
                    if row["card"] == card_hash and row["gate"] == gate_id and row["direction"] == direction
                    and r.outcome.decision is Decision.OPEN
                    and abs((row["tapped_at"] - around).total_seconds()) <= double_tap_window_s]
        account = self.account_id
        journey, state, last = self.open_journey(account)
        return Snapshot(recorded[0] if recorded else None, max(openings, key=lambda o: o[0]) if openings else None,
                        journey, state, last)

    def open_journey(self, account_id: str) -> tuple[Journey | None, RiderFareState, str | None]:
        found = [j["journey"] for j in self.db.journeys.values()
                 if j["journey"].account_id == account_id and j["status"] is JourneyStatus.OPEN]
        state, last = self.db.states.get(account_id, (RiderFareState(), None))
        return (found[0] if found else None), state, last

    def find_tap(self, tap_id: str) -> RecordedTap | None:
        row = self.db.taps.get(tap_id)
        return row[0] if row else None

    def insert_tap(self, tap: Any, card_hash: bytes, fingerprint: bytes, account_id: str | None, outcome: Any, *,
                   on_conflict_do_nothing: bool = False) -> bool:
        if on_conflict_do_nothing and tap.tap_id in self.db.taps:
            return False
        row = {"card": card_hash, "gate": tap.gate_id, "direction": int(tap.direction), "tapped_at": tap.tapped_at,
               "account": account_id}
        self.writes.append(lambda: self.db.taps.__setitem__(tap.tap_id, (RecordedTap(tap.tap_id, fingerprint, outcome),
                                                                          row)))
        return True

    def insert_journey(self, journey: Journey, end: JourneyEnd | None = None) -> None:
        self.writes.append(lambda: self.db.journeys.__setitem__(journey.journey_id, {
            "journey": journey, "status": end.status if end else journey.status, "end": end}))

    def close_journey(self, journey_id: str, end: JourneyEnd) -> None:
        def apply() -> None:
            row = self.db.journeys[journey_id]
            assert row["status"] is JourneyStatus.OPEN
            row.update(status=end.status, end=end)

        self.writes.append(apply)

    def save_fare_state(self, account_id: str, state: RiderFareState, *, feed_version: str,
                        last_transfer_id: str | None) -> None:
        self.writes.append(lambda: self.db.states.__setitem__(account_id, (state, last_transfer_id)))

    def enqueue(self, envelope: Any) -> None:
        self.writes.append(lambda: self.db.events.append(envelope.WhichOneof("payload")))

    def flush(self) -> None:
        writes, self.writes = self.writes, []
        for write in writes:
            write()


class FakeRepository:
    def __init__(self) -> None:
        self.db = FakeDb()

    def record_unmatched_tap(self, tap: Any, card_hash: bytes, fingerprint: bytes, outcome: Any, event: Any
                             ) -> RecordedTap | None:
        tx = FakeTx(self.db)
        if not tx.insert_tap(tap, card_hash, fingerprint, None, outcome, on_conflict_do_nothing=True):
            return tx.find_tap(tap.tap_id)
        tx.enqueue(event)
        tx.flush()
        return None

    def due_journeys(self, now: datetime, *, limit: int) -> list[tuple[str, str]]:
        return [(j["journey"].journey_id, j["journey"].account_id) for j in self.db.journeys.values()
                if j["status"] is JourneyStatus.OPEN and j["journey"].incomplete_due_at <= now][:limit]

    @contextmanager
    def account_transaction(self, account_id: str, *, lock_timeout_ms: int) -> Iterator[FakeTx]:
        lock = self.db.locks.setdefault(account_id, threading.Lock())
        with lock:
            tx = FakeTx(self.db)
            tx.account_id = account_id  # type: ignore[attr-defined]
            yield tx
            tx.flush()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> FareEngine:
    """A tiny feed: every leg NT$10, but the metro's maximum fare (the hold) only NT$5."""
    folder: Path = tmp_path_factory.mktemp("feed")
    write_feed(folder, {
        "fare_products.txt": """
            fare_product_id,amount,currency
            flat,10.00,TWD
            cheap,5.00,TWD
            """,
        "citytap_max_fares.txt": """
            network_id,fare_product_id,incomplete_after_s
            metro,cheap,600
            bus,flat,
            """,
    })
    return FareEngine.from_path(folder)


@dataclass
class World:
    service: TapService
    wallet: FakeWallet
    repo: FakeRepository
    clock: list[datetime]

    def rider(self, funded: int = 10_000, *, category: str = "", blocked: bool = False) -> bytes:
        account_id = f"rider-{uuid.uuid4().hex[:8]}"
        uid = uuid.uuid4().bytes[:7]
        self.wallet.cards[uid] = Resolution(account_id, blocked, category)
        self.wallet.balances[account_id] = funded
        return uid

    def account(self, uid: bytes) -> str:
        return self.wallet.cards[uid].account_id

    def tap(self, uid: bytes, gate: str, direction: Direction, at: datetime, *, stop: str = "",
            tap_id: str | None = None):
        return self.service.tap(TapInput(tap_id or str(uuid.uuid4()), gate, stop, int(direction), at,
                                         CredentialKind.CARD, uid, ""))


def world(engine: FareEngine, *, redis: Any = None) -> World:
    wallet, repo = FakeWallet(), FakeRepository()
    clock = [NOW]
    service = TapService(engine=engine, gates=GATES, repository=repo, wallet=wallet,  # type: ignore[arg-type]
                         hot_state=HotState(redis if redis is not None else MemoryRedis(), cache_ttl_s=60),
                         credential_key=bytes(32), config=CONFIG, clock=lambda: clock[0])
    return World(service, wallet, repo, clock)


# --- tests ---------------------------------------------------------------------------------------


def test_entry_and_exit_through_the_fakes(engine: FareEngine) -> None:
    w = world(engine)
    uid = w.rider(10_000)
    entry = w.tap(uid, "A-G1", Direction.ENTRY, NOW - timedelta(minutes=10))
    assert (entry.decision, entry.amount_held_minor, entry.balance_minor) == (Decision.OPEN, 500, 9_500)
    exit_ = w.tap(uid, "C-G1", Direction.EXIT, NOW)
    # The leg costs NT$10 but only NT$5 was held: the hold is posted in full and the
    # difference noted, never collected behind the rider's back.
    assert (exit_.decision, exit_.fare_charged_minor, exit_.balance_minor) == (Decision.OPEN, 500, 9_500)
    [journey] = w.repo.db.journeys.values()
    assert journey["end"].fare_minor == 500 and "above the hold" in journey["end"].note
    assert w.repo.db.events == ["journey_started", "tap_recorded", "journey_completed", "tap_recorded"]
    assert w.wallet.resolutions == 1  # the second tap came from the cache


def test_wallet_refusals_become_denials_or_conflicts(engine: FareEngine) -> None:
    w = world(engine)
    uid = w.rider(10_000)
    w.wallet.refuse_next["create_hold"] = "FLOOR_BREACH"
    denied = w.tap(uid, "A-G1", Direction.ENTRY, NOW)
    assert (denied.reason, denied.balance_minor) == (Reason.DENIED_INSUFFICIENT_BALANCE, 10_000)
    w.wallet.refuse_next["transfer"] = "ACCOUNT_BLOCKED"
    assert w.tap(uid, "B1-V1", Direction.VALIDATE, NOW, stop="B").reason is Reason.DENIED_BLOCKED
    w.wallet.refuse_next["create_hold"] = "IDEMPOTENCY_CONFLICT"
    with pytest.raises(errors.Conflict):
        w.tap(uid, "A-G1", Direction.ENTRY, NOW + timedelta(seconds=30))
    w.wallet.refuse_next["create_hold"] = "UNKNOWN_ACCOUNT"
    with pytest.raises(WalletRefusal):  # a wallet bug is not the rider's fault: INTERNAL, logged
        w.tap(uid, "A-G1", Direction.ENTRY, NOW + timedelta(seconds=40))
    assert w.wallet.balances[w.account(uid)] == 10_000 and not w.wallet.holds


def test_a_wallet_timeout_records_nothing_and_the_retry_completes(engine: FareEngine) -> None:
    w = world(engine)
    uid = w.rider(10_000)
    tap_id = str(uuid.uuid4())
    w.wallet.refuse_next["create_hold"] = "UNAVAILABLE"
    with pytest.raises(errors.Unavailable):
        w.tap(uid, "A-G1", Direction.ENTRY, NOW, tap_id=tap_id)
    assert not w.repo.db.taps and not w.repo.db.journeys
    assert w.tap(uid, "A-G1", Direction.ENTRY, NOW, tap_id=tap_id).decision is Decision.OPEN
    assert len(w.wallet.holds) == 1


def test_an_exit_whose_hold_is_gone_lets_the_rider_out_unresolved(engine: FareEngine) -> None:
    w = world(engine)
    uid = w.rider(10_000)
    w.tap(uid, "A-G1", Direction.ENTRY, NOW - timedelta(minutes=5))
    w.wallet.refuse_next["post_hold"] = "HOLD_EXPIRED"
    exit_ = w.tap(uid, "C-G1", Direction.EXIT, NOW)
    assert (exit_.decision, exit_.fare_charged_minor) == (Decision.OPEN, 0)
    [journey] = w.repo.db.journeys.values()
    assert journey["status"] is JourneyStatus.UNRESOLVED and "HOLD_EXPIRED" in journey["end"].note
    assert "journey_completed" not in w.repo.db.events


def test_redis_down_falls_back_to_the_wallet_for_cards_and_blocks(engine: FareEngine) -> None:
    w = world(engine, redis=BrokenRedis())
    uid = w.rider(10_000)
    blocked = w.rider(10_000, blocked=True)
    for minutes in (0, 1):
        assert w.tap(uid, "B1-V1", Direction.VALIDATE, NOW + timedelta(minutes=minutes), stop="B").decision \
            is Decision.OPEN
    assert w.wallet.resolutions == 2  # no cache: the wallet every time
    assert w.tap(blocked, "A-G1", Direction.ENTRY, NOW).reason is Reason.DENIED_BLOCKED


def test_a_category_the_feed_lacks_is_priced_as_the_default(engine: FareEngine) -> None:
    w = world(engine)
    uid = w.rider(10_000, category="disabled")
    assert w.tap(uid, "B1-V1", Direction.VALIDATE, NOW, stop="B").fare_charged_minor == 1000


def test_the_worker_charges_overdue_journeys_and_only_those(engine: FareEngine) -> None:
    w = world(engine)
    late, fresh = w.rider(10_000), w.rider(10_000)
    w.tap(late, "A-G1", Direction.ENTRY, NOW - timedelta(minutes=11))  # due after 600 s (the feed's row)
    w.tap(fresh, "A-G1", Direction.ENTRY, NOW - timedelta(minutes=5))
    assert w.service.close_overdue_journeys() == 1
    assert w.wallet.balances[w.account(late)] == 9_500 and w.wallet.held(w.account(late)) == 0
    assert w.wallet.held(w.account(fresh)) == 500
    w.clock[0] = NOW + timedelta(minutes=6)
    assert w.service.close_overdue_journeys() == 1
    assert w.service.close_overdue_journeys() == 0
    statuses = sorted(j["status"].value for j in w.repo.db.journeys.values())
    assert statuses == ["INCOMPLETE", "INCOMPLETE"]
    assert w.repo.db.events.count("journey_incomplete") == 2


def test_concurrent_taps_of_one_card_serialize_on_the_account(engine: FareEngine) -> None:
    w = world(engine)
    uid = w.rider(10_000)
    barrier = threading.Barrier(6)
    answers: list[Any] = []

    def send(gate: str) -> None:
        barrier.wait()
        answers.append(w.tap(uid, gate, Direction.ENTRY, NOW))

    threads = [threading.Thread(target=send, args=(g,)) for g in ("A-G1", "C-G1") * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    reasons = sorted(a.reason for a in answers)
    assert reasons.count(Reason.OK) == 1 and len(w.wallet.holds) == 1
    assert set(reasons) <= {Reason.OK, Reason.OK_DOUBLE_TAP, Reason.DENIED_PASSBACK}
