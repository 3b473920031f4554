"""A seeded randomized simulation of the ledger against a reference model.

Thousands of steps (WALLET_SIM_STEPS, default 3000; seed WALLET_SIM_SEED, default 20300101)
drive the real service layer on real PostgreSQL with a controllable clock: top-ups (credits
from Stripe clearing), payments with splits, merchant refunds, linked splits that succeed or
fail together, holds posted in full or in part, voided or left to expire (sweeper and lazy
expiry), balance reads, blocks, bad input, and retries that reuse ids with the same payload
(same result, no second effect) or another payload (IDEMPOTENCY_CONFLICT).

The model predicts every outcome (result or error reason), every balance and pending sum,
every hold's status and the number of outbox events. After EVERY step the test checks the
model against the database and the ledger invariants straight from the tables (sum zero per
currency, no available balance below its floor, no hold resolved twice, balances equal to
the replay of the transfers, pending sums equal to the pending holds, running balances). A
failure names the seed and step, so `WALLET_SIM_SEED=<seed> WALLET_SIM_STEPS=<step+1>`
reproduces it.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from libs import errors
from libs.money import allocate
from services.wallet.domain import (
    AccountKind,
    BlockReason,
    HoldRequest,
    Party,
    PostHoldRequest,
    SplitLine,
    TransferKind,
    TransferRequest,
    is_system_account,
)
from services.wallet.ledger import LAZY_EXPIRY_MAX, Ledger
from tests.integration.wallet_support import WalletDb, env_int, open_wallet_db

STEPS = env_int("WALLET_SIM_STEPS", 3000)
SEED = env_int("WALLET_SIM_SEED", 20300101)
STORED_VALUE_MAX = 20_000
LENIENT_FLOOR = -500
FULL_CHECK_EVERY = 100
SWEEP_BATCH = 100


class Refused(Exception):
    """The model's prediction that the ledger refuses a request with `reason`."""

    def __init__(self, reason: str, *, commit: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.commit = commit  # the refusal still commits side effects (an expiry found on the way)


@dataclass
class MAccount:
    account_id: str
    kind: AccountKind
    floor: int | None
    balance: int = 0
    pending_debits: int = 0
    pending_credits: int = 0
    blocked: bool = False


@dataclass
class MHold:
    request: HoldRequest
    expires_at: datetime
    status: str = "PENDING"
    posted_amount: int = 0
    post_key: tuple | None = None


@dataclass
class Model:
    accounts: dict[str, MAccount]
    stored_value_max: int
    holds: dict[str, MHold] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    transfers: dict[str, object] = field(default_factory=dict)  # id -> request (None for hold postings)
    events: int = 0


class Tx:
    """The model's view of one ledger transaction: changes are kept aside and applied on
    commit, so a refused request leaves the model as the rollback leaves the database."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.accounts: dict[str, MAccount] = {}
        self.holds: dict[str, MHold] = {}
        self.transfers: dict[str, object] = {}
        self.events = 0

    def account(self, account_id: str) -> MAccount:
        if account_id not in self.accounts:
            self.accounts[account_id] = replace(self.model.accounts[account_id])
        return self.accounts[account_id]

    def hold(self, hold_id: str) -> MHold:
        if hold_id not in self.holds:
            self.holds[hold_id] = replace(self.model.holds[hold_id])
        return self.holds[hold_id]

    def commit(self) -> None:
        self.model.accounts.update(self.accounts)
        for hold_id, hold in self.holds.items():
            self.model.holds[hold_id] = hold
            (self.model.pending.add if hold.status == "PENDING" else self.model.pending.discard)(hold_id)
        self.model.transfers.update(self.transfers)
        self.model.events += self.events

    # --- the rules, mirrored from domain.Book and the service layer -------------------------

    def expire_due(self, debit_ids: set[str] | None, now: datetime, limit: int) -> int:
        due = sorted((h.expires_at, hold_id) for hold_id in self.model.pending
                     if (h := self.holds.get(hold_id) or self.model.holds[hold_id]).status == "PENDING"
                     and h.expires_at <= now and (debit_ids is None or h.request.debit_account_id in debit_ids))
        for _, hold_id in due[:limit]:
            self.expire(hold_id)
        return len(due[:limit])

    def expire(self, hold_id: str) -> None:
        hold = self.hold(hold_id)
        self.release(hold)
        hold.status = "EXPIRED"
        self.events += 1

    def release(self, hold: MHold) -> None:
        # System accounts keep no pending sums (wallet migration 080); riders and merchants do.
        if not is_system_account(hold.request.debit_account_id):
            self.account(hold.request.debit_account_id).pending_debits -= hold.request.amount_minor
        if not is_system_account(hold.request.credit_account_id):
            self.account(hold.request.credit_account_id).pending_credits -= hold.request.amount_minor

    def pair(self, debit_id: str, credit_id: str) -> tuple[MAccount, MAccount]:
        for account_id in (debit_id, credit_id):
            if account_id not in self.model.accounts:
                raise Refused("UNKNOWN_ACCOUNT")
        debit, credit = self.account(debit_id), self.account(credit_id)
        if debit.blocked:
            raise Refused("ACCOUNT_BLOCKED")
        return debit, credit

    def check_floor(self, account: MAccount) -> None:
        if account.floor is not None and account.balance - account.pending_debits < account.floor:
            raise Refused("FLOOR_BREACH" if account.floor < 0 else "INSUFFICIENT_FUNDS")

    def check_stored_value(self, account: MAccount) -> None:
        if account.kind is AccountKind.RIDER_WALLET and account.balance + account.pending_credits > self.model.stored_value_max:
            raise Refused("LIMIT_EXCEEDED")

    def transfer(self, request: TransferRequest) -> None:
        debit, credit = self.pair(request.debit_account_id, request.credit_account_id)
        debit.balance -= request.amount_minor
        credit.balance += request.amount_minor
        self.check_floor(debit)
        self.check_stored_value(credit)
        self.transfers[request.transfer_id] = request


class Simulation:
    def __init__(self, db: WalletDb, lenient: Ledger, seed: int) -> None:
        self.db, self.ledger, self.lenient = db, db.ledger, lenient
        self.rng = random.Random(seed)
        self.seed = seed
        self.counter = 0
        self.clearing = db.sys(AccountKind.STRIPE_CLEARING)
        self.revenue = db.sys(AccountKind.OPERATOR_REVENUE)
        self.city = db.sys(AccountKind.CITY_REVENUE)
        self.fees = db.sys(AccountKind.PLATFORM_FEES)
        system = {a: MAccount(a, k, None) for a, k in [
            (db.sys(k), k) for k in (AccountKind.OPERATOR_REVENUE, AccountKind.CITY_REVENUE, AccountKind.PLATFORM_FEES,
                                     AccountKind.STRIPE_CLEARING, AccountKind.SUSPENSE)]}
        self.riders = [f"rider-{i}" for i in range(6)]
        self.merchants = ["merchant-0", "merchant-1"]
        accounts = dict(system)
        for index, rider in enumerate(self.riders):
            ledger = lenient if index >= 4 else self.ledger
            db.rider(rider, ledger=ledger)
            accounts[rider] = MAccount(rider, AccountKind.RIDER_WALLET, LENIENT_FLOOR if index >= 4 else 0)
        for merchant in self.merchants:
            db.merchant(merchant)
            accounts[merchant] = MAccount(merchant, AccountKind.MERCHANT_PAYABLE, 0)
        self.model = Model(accounts, STORED_VALUE_MAX, events=len(db.events()))
        # Successful writes that a retry may replay: (description, call, check of the replayed result).
        self.replayable: list[tuple[str, Callable[[], Any], Callable[[Any], None]]] = []
        # Writes a retry may repeat with another payload: (description, call) expected to conflict.
        self.conflicting: list[tuple[str, Callable[[], Any]]] = []
        self.stats: Counter[str] = Counter()

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter:06d}"

    def now(self) -> datetime:
        return self.db.clock()

    # --- running one prediction against the ledger -------------------------------------------

    def expect(self, name: str, predict: Callable[[Tx], Any], call: Callable[[], Any]) -> tuple[Tx, Any]:
        tx = Tx(self.model)
        try:
            predicted = predict(tx)
            refusal = None
        except Refused as exc:
            predicted, refusal = None, exc
        try:
            actual = call()
            got = None
        except errors.CityTapError as exc:
            actual, got = None, exc.reason
        expected = refusal.reason if refusal else None
        assert got == expected, f"{name}: the model predicted {expected or 'success'}, the ledger answered {got or 'success'}"
        if refusal is None or refusal.commit:
            tx.commit()
        self.stats[f"{name}:{got or 'ok'}"] += 1
        return tx, (predicted, actual)

    # --- operations ---------------------------------------------------------------------------

    def op_top_up(self) -> str:
        rider = self.rng.choice(self.riders)
        amount = self.rng.randint(1, 4000)
        transfer_id = self.next_id("tu")
        request = TransferRequest(transfer_id, self.clearing, rider, amount, "TWD", TransferKind.TOP_UP)

        def predict(tx: Tx) -> None:
            tx.expire_due({self.clearing, rider}, self.now(), LAZY_EXPIRY_MAX)
            tx.transfer(request)
            tx.events += 1

        call = lambda: self.ledger.credit_from_clearing(transfer_id, rider, amount)  # noqa: E731
        _, (_, result) = self.expect("top_up", predict, call)
        if result is not None:
            self.replayable.append((f"top-up {transfer_id}", call, lambda again, r=result: _same(again, r)))
            self.conflicting.append((f"top-up {transfer_id} +1",
                                     lambda: self.ledger.credit_from_clearing(transfer_id, rider, amount + 1)))
        return f"top-up {transfer_id} {rider} {amount}"

    def _batch(self, name: str, requests: list[TransferRequest]) -> None:
        def predict(tx: Tx) -> None:
            ids = [r.transfer_id for r in requests]
            if any(i in self.model.transfers or i in self.model.holds for i in ids):
                if all(self.model.transfers.get(r.transfer_id) == r for r in requests):
                    return
                raise Refused("IDEMPOTENCY_CONFLICT")
            involved = {a for r in requests for a in (r.debit_account_id, r.credit_account_id)}
            tx.expire_due(involved, self.now(), LAZY_EXPIRY_MAX)
            for request in requests:
                tx.transfer(request)
            tx.events += 1

        call = lambda: self.ledger.create_transfers(requests)  # noqa: E731
        _, (_, result) = self.expect(name, predict, call)
        if result is not None:
            self.replayable.append((f"{name} {requests[0].transfer_id}", call, lambda again, r=result: _same(again, r)))
            changed = [replace(requests[0], amount_minor=requests[0].amount_minor + 1, splits=()), *requests[1:]]
            self.conflicting.append((f"{name} {requests[0].transfer_id} changed",
                                     lambda: self.ledger.create_transfers(changed)))

    def op_pay(self) -> str:
        rider = self.rng.choice(self.riders)
        amount = self.rng.randint(1, 3000)
        roll = self.rng.random()
        if roll < 0.5:
            operator, city = allocate(amount, [70, 30])
            splits = tuple(SplitLine(p, pid, a, "TWD", "fares-2030", 3) for p, pid, a in
                           [(Party.TRANSIT_OPERATOR, "operator", operator), (Party.CITY, "city", city)])
            request = TransferRequest(self.next_id("fare"), rider, self.revenue, amount, "TWD", TransferKind.FARE,
                                      splits=splits)
        elif roll < 0.85:
            request = TransferRequest(self.next_id("buy"), rider, self.rng.choice(self.merchants), amount, "TWD",
                                      TransferKind.MERCHANT_PAYMENT, reference="order")
        else:  # a merchant refund, which the merchant's payable may not cover
            request = TransferRequest(self.next_id("refund"), self.rng.choice(self.merchants), rider, amount, "TWD",
                                      TransferKind.MERCHANT_REFUND)
        self._batch("pay", [request])
        return f"pay {request}"

    def op_linked(self) -> str:
        rider, merchant = self.rng.choice(self.riders), self.rng.choice(self.merchants)
        amount = self.rng.randint(100, 3000)
        fee, city = allocate(amount * 5 // 100, [3, 2])
        base = self.next_id("split")
        requests = [TransferRequest(base, rider, merchant, amount, "TWD", TransferKind.MERCHANT_PAYMENT)]
        if fee:
            requests.append(TransferRequest(f"{base}.fee", merchant, self.fees, fee, "TWD", TransferKind.FEE))
        if city:
            requests.append(TransferRequest(f"{base}.city", merchant, self.city, city, "TWD", TransferKind.FEE))
        roll = self.rng.random()
        if roll < 0.1:  # a last item that cannot succeed takes the whole batch down
            requests.append(TransferRequest(f"{base}.ghost", merchant, "ghost-account", 1, "TWD", TransferKind.FEE))
        elif roll < 0.2:
            requests.append(TransferRequest(f"{base}.big", self.rng.choice(self.riders), self.revenue, 30_000, "TWD",
                                            TransferKind.FARE))
        self._batch("linked", requests)
        return f"linked {base} x{len(requests)} amount {amount}"

    def op_hold(self) -> str:
        rider = self.rng.choice(self.riders)
        credit = self.revenue if self.rng.random() < 0.7 else self.rng.choice(self.merchants)
        amount = self.rng.randint(1, 3000)
        hold_id = self.next_id("h")
        expires_at = self.now() + timedelta(seconds=self.rng.randint(5, 900))
        request = HoldRequest(hold_id, rider, credit, amount, "TWD", TransferKind.FARE, expires_at)

        def predict(tx: Tx) -> None:
            tx.expire_due({rider, credit}, self.now(), LAZY_EXPIRY_MAX)
            debit, credit_account = tx.pair(rider, credit)
            debit.pending_debits += amount
            if not is_system_account(credit):
                credit_account.pending_credits += amount
            tx.check_floor(debit)
            tx.check_stored_value(credit_account)
            tx.holds[hold_id] = MHold(request, expires_at)
            tx.events += 1

        call = lambda: self.ledger.create_hold(request)  # noqa: E731
        _, (_, result) = self.expect("hold", predict, call)
        if result is not None:
            self.replayable.append((f"hold {hold_id}", call, lambda again, r=result: _same_hold(again, r)))
            self.conflicting.append((f"hold {hold_id} +1",
                                     lambda: self.ledger.create_hold(replace(request, amount_minor=amount + 1))))
        return f"hold {hold_id} {rider}->{credit} {amount} until {expires_at.time()}"

    def _pick_hold(self) -> str:
        if not self.model.holds or self.rng.random() < 0.04:
            return "h-missing"
        if self.model.pending and self.rng.random() < 0.7:
            return self.rng.choice(sorted(self.model.pending))
        return self.rng.choice(list(self.model.holds))

    def op_post(self) -> str:
        hold_id = self._pick_hold()
        hold = self.model.holds.get(hold_id)
        held = hold.request.amount_minor if hold else 100
        roll = self.rng.random()
        if roll < 0.4:
            amount = None
        elif roll < 0.9:
            amount = self.rng.randint(1, held)
        elif roll < 0.95 and hold and hold.post_key:
            amount = hold.post_key[0]  # the same post again
        else:
            amount = held + 1
        request = PostHoldRequest(hold_id, amount, "TWD" if amount is not None else None)

        def predict(tx: Tx) -> None:
            if hold is None:
                raise Refused("NOT_FOUND")
            posted = held if amount is None else amount
            if posted > held:
                raise Refused("INVALID_AMOUNT")
            if hold.status == "POSTED":
                if hold.post_key != (posted,):
                    raise Refused("IDEMPOTENCY_CONFLICT")
                return
            if hold.status == "VOIDED":
                raise Refused("INVALID_STATE")
            if hold.status == "EXPIRED":
                raise Refused("HOLD_EXPIRED")
            if hold.expires_at <= self.now():
                tx.expire(hold_id)
                raise Refused("HOLD_EXPIRED", commit=True)
            changed = tx.hold(hold_id)
            tx.release(changed)
            debit, credit = tx.account(hold.request.debit_account_id), tx.account(hold.request.credit_account_id)
            debit.balance -= posted
            credit.balance += posted
            tx.check_floor(debit)
            changed.status, changed.posted_amount, changed.post_key = "POSTED", posted, (posted,)
            tx.transfers[hold_id] = None
            tx.events += 1

        call = lambda: self.ledger.post_hold(request)  # noqa: E731
        _, (_, result) = self.expect("post", predict, call)
        if result is not None:
            self.replayable.append((f"post {hold_id}", call, lambda again, r=result: _same(again, r)))
            if held > 1:
                other = result[0].posted_amount_minor % held + 1  # another amount that is not over the hold
                self.conflicting.append((f"post {hold_id} other amount",
                                         lambda: self.ledger.post_hold(PostHoldRequest(hold_id, other, "TWD"))))
        return f"post {hold_id} {amount}"

    def op_void(self) -> str:
        hold_id = self._pick_hold()
        hold = self.model.holds.get(hold_id)

        def predict(tx: Tx) -> str:
            if hold is None:
                raise Refused("NOT_FOUND")
            if hold.status in ("VOIDED", "EXPIRED"):
                return hold.status
            if hold.status == "POSTED":
                raise Refused("INVALID_STATE")
            if hold.expires_at <= self.now():
                tx.expire(hold_id)
                return "EXPIRED"
            changed = tx.hold(hold_id)
            tx.release(changed)
            changed.status = "VOIDED"
            tx.events += 1
            return "VOIDED"

        _, (predicted, actual) = self.expect("void", predict, lambda: self.ledger.void_hold(hold_id))
        if actual is not None:
            assert actual.status.name == predicted, f"void {hold_id}: status {actual.status.name}, expected {predicted}"
        return f"void {hold_id}"

    def op_advance(self) -> str:
        seconds = self.rng.randint(1, 240)
        self.db.clock.advance(seconds)
        return f"clock +{seconds}s"

    def op_sweep(self) -> str:
        tx = Tx(self.model)
        expected = tx.expire_due(None, self.now(), SWEEP_BATCH)
        count = self.ledger.expire_due_holds(batch_max=SWEEP_BATCH)
        assert count == expected, f"sweep expired {count}, the model expected {expected}"
        tx.commit()
        self.stats["sweep"] += count
        return f"sweep {count}"

    def op_balance(self) -> str:
        account_id = self.rng.choice(self.riders + self.merchants)

        def predict(tx: Tx) -> None:
            if self.model.accounts[account_id].pending_debits:
                tx.expire_due({account_id}, self.now(), LAZY_EXPIRY_MAX)

        tx, (_, balance) = self.expect("balance", predict, lambda: self.ledger.get_balance(account_id))
        expected = self.model.accounts[account_id]
        got = balance.account
        assert (got.balance_minor, got.pending_debits_minor) == (expected.balance, expected.pending_debits), \
            f"GetBalance {account_id}: {got.balance_minor}/{got.pending_debits_minor}"
        pending = sorted((h.request.hold_id for h in self.model.holds.values()
                          if h.status == "PENDING" and h.request.debit_account_id == account_id))
        assert sorted(h.hold_id for h in balance.holds) == pending[:100]
        return f"balance {account_id}"

    def op_block(self) -> str:
        blocked = [r for r in self.riders if self.model.accounts[r].blocked]
        # Unblock more often than block, so most riders are active most of the time.
        rider = self.rng.choice(blocked) if blocked and self.rng.random() < 0.7 else self.rng.choice(self.riders)
        account = self.model.accounts[rider]
        if account.blocked:
            self.ledger.unblock_account(rider)
        else:
            self.ledger.block_account(rider, BlockReason.UNPAID_FARES)
        account.blocked = not account.blocked
        self.model.events += 1
        return f"{'block' if account.blocked else 'unblock'} {rider}"

    def op_bad_input(self) -> str:
        rider = self.rng.choice(self.riders)
        cases = [
            ("INVALID_AMOUNT", lambda: self.ledger.create_transfers([TransferRequest(
                self.next_id("bad"), rider, self.revenue, 0, "TWD", TransferKind.FARE)])),
            ("INVALID_AMOUNT", lambda: self.ledger.create_hold(HoldRequest(
                self.next_id("bad"), rider, self.revenue, -3, "TWD", TransferKind.FARE, None))),
            ("INVALID_CURRENCY", lambda: self.ledger.create_transfers([TransferRequest(
                self.next_id("bad"), rider, self.revenue, 5, "USD", TransferKind.FARE)])),
            ("UNKNOWN_ACCOUNT", lambda: self.ledger.create_transfers([TransferRequest(
                self.next_id("bad"), "ghost-account", self.revenue, 5, "TWD", TransferKind.FARE)])),
            ("INVALID_ARGUMENT", lambda: self.ledger.create_transfers([TransferRequest(
                "bad id!", rider, self.revenue, 5, "TWD", TransferKind.FARE)])),
        ]
        reason, call = self.rng.choice(cases)
        self.expect("bad_input", lambda tx: _refuse(reason), call)
        return f"bad input {reason}"

    def op_retry_same(self) -> str:
        if not self.replayable:
            return "retry (nothing yet)"
        description, call, check = self.rng.choice(self.replayable)
        check(call())  # the same id and payload: the original result, and nothing written
        self.stats["retry_same"] += 1
        return f"retry {description}"

    def op_retry_changed(self) -> str:
        if not self.conflicting:
            return "retry changed (nothing yet)"
        description, call = self.rng.choice(self.conflicting)
        with pytest.raises(errors.Conflict) as info:
            call()
        assert info.value.reason == "IDEMPOTENCY_CONFLICT", description
        self.stats["retry_changed"] += 1
        return f"retry changed {description}"

    OPERATIONS: list[tuple[str, int]] = [
        ("op_top_up", 12), ("op_pay", 16), ("op_linked", 8), ("op_hold", 18), ("op_post", 14), ("op_void", 7),
        ("op_advance", 8), ("op_sweep", 3), ("op_balance", 4), ("op_retry_same", 5), ("op_retry_changed", 3),
        ("op_block", 2), ("op_bad_input", 2),
    ]

    def step(self) -> str:
        names, weights = zip(*self.OPERATIONS, strict=True)
        return getattr(self, self.rng.choices(names, weights)[0])()

    # --- checks after every step --------------------------------------------------------------

    def check(self, full: bool) -> None:
        violations = self.db.invariant_violations()
        assert not violations, "ledger invariants broken:\n  " + "\n  ".join(violations)
        rows = self.db.query("SELECT id, balance_minor, pending_debits_minor, pending_credits_minor FROM {s}.accounts")
        actual = {r[0]: tuple(r[1:]) for r in rows}
        expected = {a.account_id: (a.balance, a.pending_debits, a.pending_credits) for a in self.model.accounts.values()}
        assert actual == expected, f"balances differ from the model: {_diff(actual, expected)}"
        [(transfers, events, pending)] = self.db.query(
            "SELECT (SELECT count(*) FROM {s}.transfers), (SELECT count(*) FROM {s}.outbox_events),"
            " (SELECT count(*) FROM {s}.pending_holds)")
        assert transfers == len(self.model.transfers), "transfer count differs from the model"
        assert events == self.model.events, f"outbox has {events} events, the model expected {self.model.events}"
        assert pending == len(self.model.pending), "pending hold count differs from the model"
        if full:
            statuses = dict(self.db.query("SELECT h.id, coalesce(r.outcome, 'PENDING') FROM {s}.holds h"
                                          " LEFT JOIN {s}.hold_resolutions r ON r.hold_id = h.id"))
            assert statuses == {i: h.status for i, h in self.model.holds.items()}, "hold statuses differ"

    def check_events(self) -> None:
        """Every transfer travels in exactly one event; every hold has one HoldPlaced and one
        resolution event exactly when it is resolved."""
        in_events: Counter[str] = Counter()
        placed: Counter[str] = Counter()
        resolved: dict[str, list[str]] = {}
        for event in self.db.events():
            kind = event.WhichOneof("payload")
            payload = getattr(event, kind)
            if kind == "transfer_posted":
                in_events.update(t.transfer_id for t in payload.transfers)
            elif kind == "hold_posted":
                in_events[payload.transfer.transfer_id] += 1
                resolved.setdefault(payload.hold.hold_id, []).append("POSTED")
            elif kind == "hold_placed":
                placed[payload.hold.hold_id] += 1
            elif kind in ("hold_voided", "hold_expired"):
                resolved.setdefault(payload.hold.hold_id, []).append(kind.removeprefix("hold_").upper())
        assert set(in_events) == set(self.model.transfers) and set(in_events.values()) <= {1}
        assert placed == Counter(list(self.model.holds))
        for hold_id, hold in self.model.holds.items():
            assert resolved.get(hold_id, []) == ([] if hold.status == "PENDING" else [hold.status]), hold_id


def _refuse(reason: str) -> None:
    raise Refused(reason)


def _same(again: Any, original: Any) -> None:
    assert again == original, f"a retry returned {again!r}, not the original {original!r}"


def _same_hold(again: Any, original: Any) -> None:
    keys = ("hold_id", "debit_account_id", "credit_account_id", "amount_minor", "expires_at", "created_at")
    assert [getattr(again, k) for k in keys] == [getattr(original, k) for k in keys]


def _diff(actual: dict, expected: dict) -> dict:
    return {k: (actual.get(k), expected.get(k)) for k in set(actual) | set(expected) if actual.get(k) != expected.get(k)}


@pytest.fixture()
def db(postgres_dsn: str, scratch_schema: str) -> Iterator[WalletDb]:
    wallet = open_wallet_db(postgres_dsn, scratch_schema, stored_value_max_minor=STORED_VALUE_MAX)
    yield wallet
    wallet.pool.close()


def test_seeded_simulation_keeps_every_invariant_after_every_step(db: WalletDb) -> None:
    lenient = db.another_ledger(rider_floor_minor=LENIENT_FLOOR, stored_value_max_minor=STORED_VALUE_MAX)
    simulation = Simulation(db, lenient, SEED)
    started = time.monotonic()
    last = "setup"
    for step in range(STEPS):
        try:
            last = simulation.step()
            simulation.check(full=step % FULL_CHECK_EVERY == 0 or step == STEPS - 1)
        except AssertionError as exc:
            raise AssertionError(
                f"simulation failed at step {step} ({last}) with seed {SEED}; reproduce with "
                f"WALLET_SIM_SEED={SEED} WALLET_SIM_STEPS={step + 1}\n{exc}") from exc
    simulation.check_events()
    elapsed = time.monotonic() - started
    stats = simulation.stats
    print(f"\nwallet simulation: seed {SEED}, {STEPS} steps in {elapsed:.1f}s; "
          f"{len(simulation.model.transfers)} transfers, {len(simulation.model.holds)} holds, "
          f"{simulation.model.events} events; outcomes {dict(sorted(stats.items()))}")
    # The run must actually have exercised the interesting paths.
    if STEPS >= 1000:
        for outcome in ("post:ok", "void:ok", "post:HOLD_EXPIRED", "hold:INSUFFICIENT_FUNDS", "hold:FLOOR_BREACH",
                        "top_up:LIMIT_EXCEEDED", "linked:ok", "linked:UNKNOWN_ACCOUNT", "pay:ACCOUNT_BLOCKED",
                        "retry_same", "retry_changed", "sweep", "post:IDEMPOTENCY_CONFLICT"):
            assert stats[outcome] > 0, f"the simulation never produced {outcome}: {dict(stats)}"
