"""The ledger against real PostgreSQL: transfers, idempotency, holds and their expiry, linked
batches, floors, history, events in the outbox, and the invariants the database enforces on
its own even when the application is bypassed."""

from __future__ import annotations

from datetime import timedelta

import psycopg
import pytest

from citytap.wallet.v1 import wallet_pb2
from libs import errors
from libs.money import allocate
from services.wallet.domain import (
    AccountKind,
    BlockReason,
    Book,
    HoldRequest,
    HoldStatus,
    Party,
    PostHoldRequest,
    SplitLine,
    Transfer,
    TransferKind,
    TransferRequest,
)
from services.wallet.workers import Sweeper
from tests.integration.wallet_support import WalletDb, wallet_db  # noqa: F401 - fixture

REVENUE = AccountKind.OPERATOR_REVENUE


def pay(db: WalletDb, transfer_id: str, debit: str, amount: int, *, credit: str | None = None,
        kind: TransferKind = TransferKind.FARE, **extra: object) -> TransferRequest:
    return TransferRequest(transfer_id, debit, credit or db.sys(REVENUE), amount, "TWD", kind, **extra)  # type: ignore[arg-type]


def hold(db: WalletDb, hold_id: str, debit: str, amount: int, *, ttl_s: int = 600) -> HoldRequest:
    return HoldRequest(hold_id, debit, db.sys(REVENUE), amount, "TWD", TransferKind.FARE,
                       db.clock() + timedelta(seconds=ttl_s))


def no_violations(db: WalletDb) -> None:
    assert db.invariant_violations() == []


# --- transfers and idempotency ----------------------------------------------------------------


def test_a_transfer_moves_money_and_records_running_balances(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    [transfer] = db.ledger.create_transfers([pay(db, "fare-1", rider, 250, reference="journey-1")])
    assert (transfer.debit_balance_after_minor, transfer.credit_balance_after_minor) == (750, 250)
    assert db.balance(rider) == (750, 0, 0)
    balance = db.ledger.get_balance(rider)
    assert (balance.account.balance_minor, balance.account.available_minor, balance.holds) == (750, 750, [])
    no_violations(db)


def test_the_same_id_and_payload_returns_the_original_without_a_second_effect(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    first = db.ledger.create_transfers([pay(db, "fare-1", rider, 250)])
    events = len(db.events())
    again = db.ledger.create_transfers([pay(db, "fare-1", rider, 250)])
    assert again == first
    assert db.balance(rider)[0] == 750
    assert len(db.events()) == events


@pytest.mark.parametrize("change", [{"amount": 251}, {"reference": "other"}, {"kind": TransferKind.FEE}])
def test_the_same_id_with_another_payload_is_an_idempotency_conflict(wallet_db: WalletDb, change: dict) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_transfers([pay(db, "fare-1", rider, 250)])
    before = db.snapshot()
    amount = change.pop("amount", 250)
    with pytest.raises(errors.Conflict) as info:
        db.ledger.create_transfers([pay(db, "fare-1", rider, amount, **change)])
    assert info.value.reason == "IDEMPOTENCY_CONFLICT"
    assert db.snapshot() == before


def test_a_batch_mixing_posted_and_new_ids_is_refused(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_transfers([pay(db, "fare-1", rider, 100)])
    before = db.snapshot()
    with pytest.raises(errors.Conflict) as info:
        db.ledger.create_transfers([pay(db, "fare-1", rider, 100), pay(db, "fare-2", rider, 100)])
    assert (info.value.reason, info.value.metadata["index"]) == ("IDEMPOTENCY_CONFLICT", "1")
    assert db.snapshot() == before


def test_top_up_seam_credits_from_stripe_clearing_once(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider()
    first = db.ledger.credit_from_clearing("topup-1", rider, 5000, reference="pi_123")
    assert db.ledger.credit_from_clearing("topup-1", rider, 5000, reference="pi_123") == first
    assert (first.debit_account_id, first.kind) == (db.sys(AccountKind.STRIPE_CLEARING), TransferKind.TOP_UP)
    assert db.balance(rider)[0] == 5000
    assert db.balance(db.sys(AccountKind.STRIPE_CLEARING))[0] == -5000
    with pytest.raises(errors.Conflict):
        db.ledger.credit_from_clearing("topup-1", rider, 6000)
    merchant = db.merchant()
    with pytest.raises(errors.InvalidArgument):
        db.ledger.credit_from_clearing("topup-2", merchant, 100)
    with pytest.raises(errors.LimitExceeded) as info:
        db.ledger.credit_from_clearing("topup-3", rider, 1_000_000)
    assert info.value.reason == "LIMIT_EXCEEDED"
    assert db.balance(rider)[0] == 5000
    no_violations(db)


# --- linked transfers ------------------------------------------------------------------------------


def test_linked_transfers_post_together_with_their_splits(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider, merchant = db.rider(funded_minor=10_000), db.merchant()
    fee, city = allocate(1000, [300, 200])  # 3% and 2% of a 1,000 purchase
    lines = tuple(SplitLine(p, pid, a, "TWD", "contract-7", 2) for p, pid, a in
                  [(Party.MERCHANT, merchant, 1000 - fee - city), (Party.PLATFORM, "platform", fee), (Party.CITY, "city", city)])
    transfers = db.ledger.create_transfers([
        pay(db, "buy-1", rider, 1000, credit=merchant, kind=TransferKind.MERCHANT_PAYMENT, splits=lines),
        pay(db, "buy-1.fee", merchant, fee, credit=db.sys(AccountKind.PLATFORM_FEES), kind=TransferKind.FEE),
        pay(db, "buy-1.city", merchant, city, credit=db.sys(AccountKind.CITY_REVENUE), kind=TransferKind.FEE),
    ])
    assert [t.transfer_id for t in transfers] == ["buy-1", "buy-1.fee", "buy-1.city"]
    assert db.balance(merchant)[0] == 1000 - fee - city
    assert db.ledger.create_transfers([pay(db, "buy-1", rider, 1000, credit=merchant,
                                           kind=TransferKind.MERCHANT_PAYMENT, splits=lines),
                                       pay(db, "buy-1.fee", merchant, fee, credit=db.sys(AccountKind.PLATFORM_FEES),
                                           kind=TransferKind.FEE),
                                       pay(db, "buy-1.city", merchant, city, credit=db.sys(AccountKind.CITY_REVENUE),
                                           kind=TransferKind.FEE)])[0].splits == lines
    [event] = [e for e in db.events() if e.WhichOneof("payload") == "transfer_posted"][-1:]
    assert [t.transfer_id for t in event.transfer_posted.transfers] == ["buy-1", "buy-1.fee", "buy-1.city"]
    assert event.account_key == rider
    no_violations(db)


def test_a_failing_transfer_rolls_back_the_whole_batch_and_names_its_index(wallet_db: WalletDb) -> None:
    db = wallet_db
    rich, poor = db.rider(funded_minor=10_000), db.rider(funded_minor=100)
    before = db.snapshot()
    with pytest.raises(errors.FailedPrecondition) as info:
        db.ledger.create_transfers([pay(db, "a", rich, 500), pay(db, "b", rich, 500), pay(db, "c", poor, 101)])
    assert (info.value.reason, info.value.metadata["index"]) == ("INSUFFICIENT_FUNDS", "2")
    with pytest.raises(errors.NotFound) as info:
        db.ledger.create_transfers([pay(db, "a", rich, 500), pay(db, "b", "nobody", 500)])
    assert (info.value.reason, info.value.metadata["index"]) == ("UNKNOWN_ACCOUNT", "1")
    assert db.snapshot() == before


def test_transfers_in_a_batch_apply_in_order(wallet_db: WalletDb) -> None:
    db = wallet_db
    a, b = db.rider(funded_minor=500), db.rider()
    # b can pay on only because the first transfer funded it earlier in the same batch.
    db.ledger.create_transfers([pay(db, "x1", a, 500, credit=b, kind=TransferKind.CORRECTION), pay(db, "x2", b, 400)])
    assert (db.balance(a)[0], db.balance(b)[0]) == (0, 100)
    with pytest.raises(errors.FailedPrecondition):
        db.ledger.create_transfers([pay(db, "y1", b, 100), pay(db, "y2", b, 1)])


def test_corrections_name_an_existing_or_earlier_transfer(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_transfers([pay(db, "fare-1", rider, 400)])
    refund = TransferRequest("fare-1.fix", db.sys(REVENUE), rider, 150, "TWD", TransferKind.CORRECTION,
                             corrects_transfer_id="fare-1")
    assert db.ledger.create_transfers([refund])[0].corrects_transfer_id == "fare-1"
    with pytest.raises(errors.NotFound) as info:
        db.ledger.create_transfers([TransferRequest("fix-2", db.sys(REVENUE), rider, 1, "TWD", TransferKind.CORRECTION,
                                                    corrects_transfer_id="no-such-transfer")])
    assert info.value.metadata["resource"] == "transfer"
    assert db.balance(rider)[0] == 750


# --- floors ----------------------------------------------------------------------------------------


def test_a_negative_allowance_lets_a_rider_go_below_zero_down_to_the_floor(wallet_db: WalletDb) -> None:
    db = wallet_db
    lenient = db.another_ledger(rider_floor_minor=-300)
    rider = db.rider(funded_minor=100, ledger=lenient)
    assert db.ledger.get_account(rider)[0].floor_minor == -300
    db.ledger.create_transfers([pay(db, "f1", rider, 350)])
    assert db.balance(rider)[0] == -250
    with pytest.raises(errors.FailedPrecondition) as info:
        db.ledger.create_transfers([pay(db, "f2", rider, 51)])
    assert info.value.reason == "FLOOR_BREACH"
    with pytest.raises(errors.FailedPrecondition) as info:
        db.ledger.create_hold(hold(db, "h1", rider, 51))
    assert info.value.reason == "FLOOR_BREACH"
    db.ledger.create_hold(hold(db, "h2", rider, 50))
    assert db.ledger.get_balance(rider).account.available_minor == -300
    no_violations(db)


def test_blocked_accounts_neither_pay_nor_hold_but_receive_and_settle(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "before-block", rider, 300))
    db.ledger.block_account(rider, BlockReason.UNPAID_FARES)
    for attempt in (lambda: db.ledger.create_transfers([pay(db, "f", rider, 1)]),
                    lambda: db.ledger.create_hold(hold(db, "h", rider, 1))):
        with pytest.raises(errors.FailedPrecondition) as info:
            attempt()
        assert info.value.reason == "ACCOUNT_BLOCKED"
    db.ledger.credit_from_clearing("settle-debt", rider, 500)  # a top-up still lands
    db.ledger.post_hold(PostHoldRequest("before-block", 200, "TWD"))  # a journey begun before the block ends
    assert db.balance(rider) == (1300, 0, 0)


# --- holds -----------------------------------------------------------------------------------------


def test_a_hold_reserves_then_posts_for_less_releasing_the_rest(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    placed = db.ledger.create_hold(hold(db, "tap-1", rider, 600))
    assert db.balance(rider) == (1000, 600, 0)
    # A system account keeps no pending sums (its row is the one every fare credits);
    # the hold is listed among the pending holds all the same.
    assert db.balance(db.sys(REVENUE)) == (0, 0, 0)
    assert db.query("SELECT credit_account_id, amount_minor FROM {s}.pending_holds WHERE hold_id = 'tap-1'") == [
        (db.sys(REVENUE), 600)]
    balance = db.ledger.get_balance(rider)
    assert (balance.account.available_minor, [h.hold_id for h in balance.holds]) == (400, ["tap-1"])
    with pytest.raises(errors.FailedPrecondition) as info:
        db.ledger.create_transfers([pay(db, "f", rider, 401)])
    assert info.value.reason == "INSUFFICIENT_FUNDS"
    posted, transfer = db.ledger.post_hold(PostHoldRequest("tap-1", 250, "TWD"))
    assert (posted.status, posted.posted_amount_minor, transfer.transfer_id, transfer.hold_id) == (
        HoldStatus.POSTED, 250, "tap-1", "tap-1")
    assert db.balance(rider) == (750, 0, 0)
    assert db.balance(db.sys(REVENUE)) == (250, 0, 0)
    # Retrying the post returns the original; another amount is a conflict; voiding is refused.
    assert db.ledger.post_hold(PostHoldRequest("tap-1", 250, "TWD")) == (posted, transfer)
    with pytest.raises(errors.Conflict):
        db.ledger.post_hold(PostHoldRequest("tap-1", 251, "TWD"))
    with pytest.raises(errors.FailedPrecondition) as info:
        db.ledger.void_hold("tap-1")
    assert info.value.reason == "INVALID_STATE"
    assert db.ledger.create_hold(hold(db, "tap-1", rider, 600)).hold_id == placed.hold_id  # idempotent create
    assert db.event_types()[-2:] == ["HoldPlaced", "HoldPosted"]
    no_violations(db)


def test_a_post_whose_planned_balance_disagrees_with_the_database_commits_nothing(
        wallet_db: WalletDb, monkeypatch: pytest.MonkeyPatch) -> None:
    """A post's inserts and its COMMIT travel in one round trip, so the cross-check of the
    balances the trigger computed against the domain's plan runs in the database, before the
    commit: a disagreement (a bug in either) aborts the post and changes nothing."""
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "tap-1", rider, 600))
    before, events_before = db.snapshot(), db.event_types()
    planned_post = Book.post

    def off_by_one(self: Book, held: object, amount_minor: int) -> tuple[int, int]:
        debit_after, credit_after = planned_post(self, held, amount_minor)  # type: ignore[arg-type]
        return debit_after + 1, credit_after

    monkeypatch.setattr(Book, "post", off_by_one)
    with pytest.raises(psycopg.errors.InternalError_) as info:
        db.ledger.post_hold(PostHoldRequest("tap-1", 250, "TWD"))
    assert "ledger drift on tap-1: database 750/" in str(info.value)
    assert "planned 751/" in str(info.value)
    assert db.snapshot() == before and db.event_types() == events_before
    assert db.balance(rider) == (1000, 600, 0)
    monkeypatch.undo()
    posted, transfer = db.ledger.post_hold(PostHoldRequest("tap-1", 250, "TWD"))
    assert (posted.status, transfer.debit_balance_after_minor) == (HoldStatus.POSTED, 750)
    no_violations(db)


@pytest.mark.parametrize("batch", [False, True], ids=["create_transfers", "post_transfer_batch"])
def test_a_transfer_whose_planned_balance_disagrees_with_the_database_commits_nothing(
        wallet_db: WalletDb, monkeypatch: pytest.MonkeyPatch, batch: bool) -> None:
    """Transfers send their inserts, the database's balance check and the COMMIT in one
    round trip too: a plan the database disagrees with aborts them before the commit."""
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    before, events_before = db.snapshot(), db.event_types()
    planned_transfer = Book.transfer

    def off_by_one(self: Book, request: TransferRequest, index: int) -> tuple[int, int]:
        debit_after, credit_after = planned_transfer(self, request, index)
        return debit_after - 1, credit_after

    monkeypatch.setattr(Book, "transfer", off_by_one)
    request = pay(db, "fare-1", rider, 250)
    with pytest.raises(psycopg.errors.InternalError_) as info:
        if batch:
            db.ledger.post_transfer_batch([request])
        else:
            db.ledger.create_transfers([request])
    assert "ledger drift on fare-1: database 750/250, planned 749/" in str(info.value)
    assert db.snapshot() == before and db.event_types() == events_before
    monkeypatch.undo()
    [transfer] = db.ledger.post_transfer_batch([request]) if batch else db.ledger.create_transfers([request])
    assert isinstance(transfer, Transfer) and transfer.debit_balance_after_minor == 750
    no_violations(db)


def test_the_databases_balance_check_compares_only_the_sides_it_is_given(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_transfers([pay(db, "fare-1", rider, 250)])

    def check(ids: list[str], debits: list[int | None], credits: list[int | None]) -> None:
        with psycopg.connect(db.dsn) as conn:
            conn.execute(f'SELECT "{db.schema}".assert_transfer_balances(%s::text[], %s::bigint[], %s::bigint[])',
                         (ids, debits, credits))

    check(["fare-1"], [750], [None])  # the revenue side is not compared
    check(["fare-1"], [750], [250])
    for ids, debits, credits, message in [
            (["fare-1"], [749], [None], "ledger drift on fare-1: database 750/250, planned 749/<NULL>"),
            (["fare-1"], [None], [251], "ledger drift on fare-1"),
            (["fare-2"], [None], [None], "transfer fare-2 was not written"),
            (["fare-1"], [750, 1], [None], "1 ids, 2 debit and 1 credit balances")]:
        with pytest.raises(psycopg.errors.InternalError_) as info:
            check(ids, debits, credits)
        assert message in str(info.value)


def test_a_full_post_without_an_amount_matches_a_retry_with_the_full_amount(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "tap-1", rider, 600))
    first = db.ledger.post_hold(PostHoldRequest("tap-1", None, None))
    assert db.ledger.post_hold(PostHoldRequest("tap-1", 600, "TWD")) == first
    with pytest.raises(errors.InvalidArgument) as info:
        db.ledger.post_hold(PostHoldRequest("tap-1", 601, "TWD"))
    assert info.value.reason == "INVALID_AMOUNT"


def test_a_voided_hold_releases_everything_once(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "tap-1", rider, 600))
    voided = db.ledger.void_hold("tap-1")
    assert voided.status is HoldStatus.VOIDED
    assert db.ledger.void_hold("tap-1") == voided
    assert db.balance(rider) == (1000, 0, 0)
    with pytest.raises(errors.FailedPrecondition) as info:
        db.ledger.post_hold(PostHoldRequest("tap-1", None, None))
    assert info.value.reason == "INVALID_STATE"
    assert db.event_types().count("HoldVoided") == 1


def test_the_sweeper_expires_due_holds_and_releases_their_funds(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "short", rider, 300, ttl_s=30))
    db.ledger.create_hold(hold(db, "long", rider, 200, ttl_s=300))
    sweeper = Sweeper(db.ledger, interval_s=0.01, deny_list_rebuild_interval_s=0)
    assert sweeper.run_once() == 0
    db.clock.advance(30)
    assert sweeper.run_once() == 1
    assert db.balance(rider) == (1000, 200, 0)
    [expired] = [e for e in db.events() if e.WhichOneof("payload") == "hold_expired"]
    assert (expired.hold_expired.hold.hold_id, expired.hold_expired.hold.status) == ("short", wallet_pb2.HOLD_STATUS_EXPIRED)
    assert expired.account_key == rider
    assert sweeper.run_once() == 0  # never twice
    no_violations(db)


def test_posting_an_expired_hold_is_refused_and_the_expiry_stands(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "tap-1", rider, 600, ttl_s=60))
    db.clock.advance(60)
    with pytest.raises(errors.FailedPrecondition) as info:
        db.ledger.post_hold(PostHoldRequest("tap-1", 100, "TWD"))
    assert info.value.reason == "HOLD_EXPIRED"
    assert db.balance(rider) == (1000, 0, 0)
    with pytest.raises(errors.FailedPrecondition) as info:  # and again, now from the stored state
        db.ledger.post_hold(PostHoldRequest("tap-1", 100, "TWD"))
    assert info.value.reason == "HOLD_EXPIRED"
    assert db.ledger.void_hold("tap-1").status is HoldStatus.EXPIRED
    assert db.event_types().count("HoldExpired") == 1
    no_violations(db)


def test_writes_and_balance_reads_expire_due_holds_lazily(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "old", rider, 900, ttl_s=60))
    db.clock.advance(61)
    # No sweeper ran: the new hold's transaction releases the expired one first.
    db.ledger.create_hold(hold(db, "new", rider, 800))
    assert db.balance(rider) == (1000, 800, 0)
    db.clock.advance(600)
    assert db.ledger.get_balance(rider).account.available_minor == 1000
    assert db.event_types().count("HoldExpired") == 2
    no_violations(db)


def test_hold_and_transfer_ids_share_one_namespace(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_transfers([pay(db, "id-1", rider, 10)])
    with pytest.raises(errors.Conflict):
        db.ledger.create_hold(hold(db, "id-1", rider, 10))
    db.ledger.create_hold(hold(db, "id-2", rider, 10))
    with pytest.raises(errors.Conflict):
        db.ledger.create_transfers([pay(db, "id-2", rider, 10)])


def test_unknown_holds_are_not_found(wallet_db: WalletDb) -> None:
    with pytest.raises(errors.NotFound) as info:
        wallet_db.ledger.post_hold(PostHoldRequest("nope", None, None))
    assert (info.value.reason, info.value.metadata["resource"]) == ("NOT_FOUND", "hold")
    with pytest.raises(errors.NotFound):
        wallet_db.ledger.void_hold("nope")


# --- history -----------------------------------------------------------------------------------------


def test_history_pages_newest_first_with_running_balances(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=100_000)
    for i in range(120):
        db.clock.advance(1)
        db.ledger.create_transfers([pay(db, f"fare-{i:03d}", rider, i + 1, reference=f"j{i}")])
    seen, token, pages = [], "", 0
    while True:
        entries, token = db.ledger.list_history(rider, page_size_requested=50, page_token=token)
        seen.extend(entries)
        pages += 1
        if not token:
            break
    assert pages == 3 and len(seen) == 121
    assert [e.transfer_id for e in seen[:2]] == ["fare-119", "fare-118"]
    assert seen[-1].transfer_id == f"fund-{rider}" and seen[-1].delta_minor == 100_000
    running = 0
    for entry in reversed(seen):
        running += entry.delta_minor
        assert entry.balance_after_minor == running
    assert running == db.balance(rider)[0]
    assert seen[0].counterparty_kind is AccountKind.OPERATOR_REVENUE
    start, end = seen[30].posted_at, seen[10].posted_at
    window, _ = db.ledger.list_history(rider, page_size_requested=100, start_at=start, end_at=end)
    assert [e.transfer_id for e in window] == [e.transfer_id for e in seen[11:31]]
    with pytest.raises(errors.InvalidArgument):
        db.ledger.list_history(db.sys(REVENUE), page_token=db.ledger.list_history(rider, page_size_requested=1)[1])
    with pytest.raises(errors.NotFound):
        db.ledger.list_history("nobody")


# --- the database enforces the ledger on its own ------------------------------------------------


def raw(db: WalletDb, statement: str, params: tuple = ()) -> None:
    with psycopg.connect(db.dsn) as conn:
        conn.execute(statement.replace("{s}", f'"{db.schema}"'), params)


@pytest.mark.parametrize("statement", [
    "UPDATE {s}.transfers SET amount_minor = 1",
    "DELETE FROM {s}.transfers",
    "TRUNCATE {s}.transfers CASCADE",
    "UPDATE {s}.holds SET amount_minor = 1",
    "DELETE FROM {s}.hold_resolutions",
    "UPDATE {s}.transfer_splits SET amount_minor = 0",
    "UPDATE {s}.accounts SET balance_minor = balance_minor + 1",
    "UPDATE {s}.accounts SET pending_debits_minor = 0",
    "UPDATE {s}.accounts SET floor_minor = -1000000 WHERE floor_minor IS NOT NULL",
    "UPDATE {s}.accounts SET currency = 'USD'",
    "DELETE FROM {s}.accounts",
    "DELETE FROM {s}.pending_holds",
    "INSERT INTO {s}.accounts (id, kind, currency, floor_minor, balance_minor, request_hash, created_at)"
    " VALUES ('rich', 'RIDER_WALLET', 'TWD', 0, 1000000, '', now())",
])
def test_the_ledger_tables_refuse_changes_that_bypass_the_ledger(wallet_db: WalletDb, statement: str) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "h1", rider, 100))
    db.ledger.create_hold(hold(db, "h2", rider, 100))
    db.ledger.post_hold(PostHoldRequest("h2", 50, "TWD", (SplitLine(Party.TRANSIT_OPERATOR, "op", 50, "TWD", "c", 1),)))
    before = db.snapshot()
    assert before["counts"]["transfer_splits"] == 1
    with pytest.raises(psycopg.Error):
        raw(db, statement)
    assert db.snapshot() == before


def test_the_database_refuses_overdrafts_double_resolutions_and_mixed_currencies(wallet_db: WalletDb) -> None:
    db = wallet_db
    rider = db.rider(funded_minor=1000)
    db.ledger.create_hold(hold(db, "h1", rider, 100))
    db.ledger.void_hold("h1")
    usd = "INSERT INTO {s}.accounts (id, kind, currency, floor_minor, request_hash, created_at)" \
          " VALUES ('usd-rider', 'RIDER_WALLET', 'USD', 0, '', now())"
    raw(db, usd)
    before = db.snapshot()
    insert = ("INSERT INTO {s}.transfers (id, debit_account_id, credit_account_id, amount_minor, currency, kind,"
              " request_hash, posted_at) VALUES (%s, %s, %s, %s, %s, 'FARE', '', now())")
    with pytest.raises(psycopg.errors.CheckViolation, match="accounts_floor_zero_respected"):
        raw(db, insert, ("over", rider, db.sys(REVENUE), 1001, "TWD"))
    with pytest.raises(psycopg.errors.IntegrityError):
        raw(db, insert, ("mixed", rider, "usd-rider", 1, "TWD"))
    with pytest.raises(psycopg.errors.CheckViolation):
        raw(db, insert, ("zero", rider, db.sys(REVENUE), 0, "TWD"))
    with pytest.raises(psycopg.errors.CheckViolation):
        raw(db, insert, ("self", rider, rider, 1, "TWD"))
    with pytest.raises(psycopg.errors.UniqueViolation):
        raw(db, "INSERT INTO {s}.hold_resolutions (hold_id, outcome, resolved_at) VALUES ('h1', 'VOIDED', now())")
    with pytest.raises(psycopg.errors.IntegrityError):  # a transfer claiming to post a hold that was not posted
        raw(db, "INSERT INTO {s}.transfers (id, debit_account_id, credit_account_id, amount_minor, currency, kind,"
                " hold_id, request_hash, posted_at) VALUES ('h1', %s, %s, 100, 'TWD', 'FARE', 'h1', '', now())",
            (rider, db.sys(REVENUE)))
    assert db.snapshot() == before
    no_violations(db)


def test_with_the_services_floor_check_disabled_the_database_still_refuses(
        wallet_db: WalletDb, monkeypatch: pytest.MonkeyPatch) -> None:
    db = wallet_db
    strict = db.rider(funded_minor=100)
    lenient = db.rider(funded_minor=100, ledger=db.another_ledger(rider_floor_minor=-300))
    monkeypatch.setattr(Book, "_check_floor", staticmethod(lambda position, index: None))
    before = db.snapshot()
    for rider, amount, reason in [(strict, 101, "INSUFFICIENT_FUNDS"), (lenient, 401, "FLOOR_BREACH")]:
        with pytest.raises(errors.FailedPrecondition) as info:
            db.ledger.create_transfers([pay(db, f"over-{rider}", rider, amount)])
        assert info.value.reason == reason
        with pytest.raises(errors.FailedPrecondition) as info:
            db.ledger.create_hold(hold(db, f"hold-{rider}", rider, amount))
        assert info.value.reason == reason
    assert db.snapshot() == before
