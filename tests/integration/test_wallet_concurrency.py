"""Many threads against one wallet through the real service layer and PostgreSQL: the wallet is
never overdrawn, no acknowledged transfer is lost and none is invented, concurrent retries of
one id take effect once, and opposite transfers never deadlock."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from libs import errors
from services.wallet.domain import AccountKind, HoldRequest, HoldStatus, PostHoldRequest, TransferKind, TransferRequest
from tests.integration.wallet_support import WalletDb, env_int, open_wallet_db

WORKERS = 16
OPS_PER_WORKER = 50
FUNDS_MINOR = 40_000  # less than the workers ask for in total, so the floor is hit under contention


@pytest.fixture()
def db(postgres_dsn: str, scratch_schema: str) -> Iterator[WalletDb]:
    wallet = open_wallet_db(postgres_dsn, scratch_schema, pool_max=WORKERS)
    yield wallet
    wallet.pool.close()


def run_parallel(work: Callable[[int], None], workers: int) -> None:
    start = threading.Barrier(workers)

    def wrapped(worker: int) -> None:
        start.wait()
        work(worker)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(wrapped, w) for w in range(workers)]:
            future.result()


def test_parallel_debits_and_holds_never_overdraw_and_never_lose_a_transfer(db: WalletDb) -> None:
    rider = db.rider(funded_minor=FUNDS_MINOR)
    revenue = db.sys(AccountKind.OPERATOR_REVENUE)
    seed = env_int("WALLET_CONCURRENCY_SEED", 7)
    acknowledged: list[tuple[str, int]] = []  # (transfer id, amount) the ledger said it posted
    refused: Counter[str] = Counter()
    lock = threading.Lock()

    def work(worker: int) -> None:
        rng = random.Random(seed * 1000 + worker)
        for op in range(OPS_PER_WORKER):
            amount = rng.randint(1, 400)
            key = f"w{worker}-{op}"
            try:
                choice = rng.random()
                if choice < 0.5:
                    [t] = db.ledger.create_transfers([TransferRequest(key, rider, revenue, amount, "TWD", TransferKind.FARE)])
                    posted = [(t.transfer_id, t.amount_minor)]
                else:
                    db.ledger.create_hold(HoldRequest(key, rider, revenue, amount, "TWD", TransferKind.FARE,
                                                      db.clock() + timedelta(minutes=5)))
                    if choice < 0.85:
                        _, t = db.ledger.post_hold(PostHoldRequest(key, rng.randint(1, amount), "TWD"))
                        posted = [(t.transfer_id, t.amount_minor)]
                    else:
                        assert db.ledger.void_hold(key).status is HoldStatus.VOIDED
                        posted = []
                with lock:
                    acknowledged.extend(posted)
            except errors.FailedPrecondition as exc:
                assert exc.reason == "INSUFFICIENT_FUNDS", exc
                with lock:
                    refused[exc.reason] += 1

    run_parallel(work, WORKERS)

    balance, pending_debits, _ = db.balance(rider)
    assert balance >= 0 and pending_debits == 0
    rows = db.query("SELECT id, amount_minor FROM {s}.transfers WHERE debit_account_id = %s", (rider,))
    assert sorted(rows) == sorted(acknowledged)  # nothing lost, nothing invented
    credits = db.query("SELECT coalesce(sum(amount_minor), 0) FROM {s}.transfers WHERE credit_account_id = %s",
                       (rider,))[0][0]
    assert balance == credits - sum(amount for _, amount in rows) == FUNDS_MINOR - sum(a for _, a in acknowledged)
    assert refused["INSUFFICIENT_FUNDS"] > 0, "the test must drive the wallet to its floor"
    assert db.invariant_violations() == []
    posted_events = sum(1 for e in db.events() if e.WhichOneof("payload") in ("transfer_posted", "hold_posted"))
    assert posted_events == len(acknowledged) + 1  # + the funding transfer


def test_concurrent_retries_of_one_id_take_effect_once(db: WalletDb) -> None:
    rider = db.rider(funded_minor=10_000)
    revenue = db.sys(AccountKind.OPERATOR_REVENUE)
    results: list[object] = []
    lock = threading.Lock()

    def same_transfer(_: int) -> None:
        result = db.ledger.create_transfers([TransferRequest("tap-42", rider, revenue, 250, "TWD", TransferKind.FARE)])
        with lock:
            results.append(result)

    run_parallel(same_transfer, 12)
    assert all(r == results[0] for r in results)
    assert db.balance(rider)[0] == 9750

    db.ledger.create_hold(HoldRequest("hold-42", rider, revenue, 500, "TWD", TransferKind.FARE, None))
    outcomes: list[str] = []

    def post_or_void(worker: int) -> None:
        try:
            if worker % 2:
                db.ledger.post_hold(PostHoldRequest("hold-42", 300, "TWD"))
                outcome = "posted"
            else:
                outcome = db.ledger.void_hold("hold-42").status.name.lower()
        except errors.FailedPrecondition as exc:
            outcome = exc.reason
        with lock:
            outcomes.append(outcome)

    run_parallel(post_or_void, 12)
    resolutions = db.query("SELECT outcome FROM {s}.hold_resolutions WHERE hold_id = 'hold-42'")
    assert len(resolutions) == 1
    if resolutions[0][0] == "POSTED":  # the posts agree, every void is refused
        assert set(outcomes) == {"posted", "INVALID_STATE"}
        assert db.balance(rider)[0] == 9450
    else:  # the voids agree, every post is refused
        assert set(outcomes) == {"voided", "INVALID_STATE"}
        assert db.balance(rider)[0] == 9750
    assert db.invariant_violations() == []


def test_opposite_transfers_between_the_same_accounts_never_deadlock(db: WalletDb) -> None:
    a, b = db.rider(funded_minor=50_000), db.rider(funded_minor=50_000)

    def work(worker: int) -> None:
        for op in range(40):
            debit, credit = (a, b) if (worker + op) % 2 else (b, a)
            db.ledger.create_transfers([TransferRequest(f"p{worker}-{op}", debit, credit, 7, "TWD",
                                                        TransferKind.CORRECTION)])

    run_parallel(work, 8)  # a deadlock would surface as UNAVAILABLE after the bounded retries
    assert db.balance(a)[0] + db.balance(b)[0] == 100_000
    assert db.query("SELECT count(*) FROM {s}.transfers")[0][0] == 8 * 40 + 2
    assert db.invariant_violations() == []


def test_concurrent_fares_to_the_hot_revenue_account_keep_its_running_balance_in_order(db: WalletDb) -> None:
    """Many riders pay the one operator revenue account at once, as fares do. The revenue row is
    locked only by each transfer's balance update, so the order of its transfers (seq) must be
    the order its balance changed in: the latest running balance equals the balance, and each
    transfer's running balance is the previous one plus its amount."""
    revenue = db.sys(AccountKind.OPERATOR_REVENUE)
    riders = [db.rider(funded_minor=100_000) for _ in range(WORKERS)]

    def pay(worker: int) -> None:
        for n in range(OPS_PER_WORKER):
            db.ledger.create_transfers([TransferRequest(
                transfer_id=f"fare-{worker}-{n}", debit_account_id=riders[worker], credit_account_id=revenue,
                amount_minor=1 + (worker * OPS_PER_WORKER + n) % 97, currency="TWD", kind=TransferKind.FARE)])

    run_parallel(pay, WORKERS)
    rows = db.query("SELECT amount_minor, credit_balance_after_minor FROM {s}.transfers"
                    " WHERE credit_account_id = %s ORDER BY seq", (revenue,))
    assert len(rows) == WORKERS * OPS_PER_WORKER
    running = 0
    for amount, after in rows:
        running += amount
        assert after == running  # in seq order, every running balance follows from the one before
    assert db.balance(revenue)[0] == running
    assert db.invariant_violations() == []
