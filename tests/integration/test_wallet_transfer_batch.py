"""PostTransferBatch over the wire on a scratch schema: independent transfers in one call, each
with its own outcome, exactly as if each had been sent alone; the ledger's invariants hold and
every posted transfer has exactly one event."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from citytap.common.v1 import money_pb2
from citytap.wallet.v1 import wallet_pb2
from services.wallet.domain import INDEPENDENT_TRANSFERS_MAX, AccountKind
from tests.integration.wallet_support import GrpcWallet, grpc_wallet, rpc_error, wallet_db  # noqa: F401 - fixtures

W = wallet_pb2


def fare(transfer_id: str, debit: str, credit: str, amount: int = 100, currency: str = "TWD",
         kind: int = W.TRANSFER_KIND_FARE, corrects: str = "") -> W.Transfer:
    return W.Transfer(transfer_id=transfer_id, debit_account_id=debit, credit_account_id=credit,
                      amount=money_pb2.Money(amount_minor=amount, currency=currency), kind=kind,
                      corrects_transfer_id=corrects)


def summary(response: W.PostTransferBatchResponse) -> list[str]:
    """Each outcome as 'posted:<id>' or '<REASON>'."""
    return [f"posted:{o.transfer.transfer_id}" if o.WhichOneof("result") == "transfer" else o.failure.reason
            for o in response.outcomes]


@pytest.fixture()
def world(grpc_wallet: GrpcWallet) -> dict[str, Any]:
    db, stub = grpc_wallet.db, grpc_wallet.stub
    stub.CreateAccount(W.CreateAccountRequest(account_id="ann"))
    stub.CreateAccount(W.CreateAccountRequest(account_id="bob"))
    stub.CreateAccount(W.CreateAccountRequest(account_id="blocked"))
    db.ledger.credit_from_clearing("fund-ann", "ann", 250)
    db.ledger.credit_from_clearing("fund-bob", "bob", 1_000)
    db.ledger.credit_from_clearing("fund-blocked", "blocked", 500)
    stub.BlockAccount(W.BlockAccountRequest(account_id="blocked", reason=W.BLOCK_REASON_LOST_OR_STOLEN))
    return {"stub": stub, "db": db, "revenue": db.sys(AccountKind.OPERATOR_REVENUE)}


def test_each_transfer_succeeds_or_fails_alone_in_request_order(world: dict[str, Any]) -> None:
    stub, db, revenue = world["stub"], world["db"], world["revenue"]
    events_before = len(db.events())
    response = stub.PostTransferBatch(W.PostTransferBatchRequest(transfers=[
        fare("t1", "ann", revenue, 100),           # 250 -> 150
        fare("t2", "ann", revenue, 200),           # refused: 150 left
        fare("t3", "ann", revenue, 150),           # 150 -> 0: the refused one left no trace
        fare("t4", "blocked", revenue, 10),        # refused: blocked
        fare("t5", "nobody", revenue, 10),         # refused: unknown account
        fare("t6", "bob", revenue, 10, currency="USD"),  # refused: wrong currency
        fare("t7", "bob", revenue, 0),             # refused: malformed amount, parsed alone
        fare("t8", "bob", revenue, 400),
    ]))
    assert summary(response) == ["posted:t1", "INSUFFICIENT_FUNDS", "posted:t3", "ACCOUNT_BLOCKED", "UNKNOWN_ACCOUNT",
                                 "INVALID_CURRENCY", "INVALID_AMOUNT", "posted:t8"]
    assert response.outcomes[1].failure.metadata["account_id"] == "ann"
    assert db.balance("ann")[0] == 0 and db.balance("bob")[0] == 600
    posted = {t.transfer_id for e in db.events()[events_before:] for t in e.transfer_posted.transfers}
    assert posted == {"t1", "t3", "t8"}
    assert len(db.events()) - events_before == 3  # exactly one event per posted transfer
    assert db.invariant_violations() == []


def test_retries_replay_posted_ids_and_decide_failed_ones_afresh(world: dict[str, Any]) -> None:
    stub, db, revenue = world["stub"], world["db"], world["revenue"]
    first = stub.PostTransferBatch(W.PostTransferBatchRequest(transfers=[
        fare("r1", "ann", revenue, 200), fare("r2", "ann", revenue, 100)]))
    assert summary(first) == ["posted:r1", "INSUFFICIENT_FUNDS"]
    db.ledger.credit_from_clearing("fund-ann-2", "ann", 100)
    snapshot_events = len(db.events())
    again = stub.PostTransferBatch(W.PostTransferBatchRequest(transfers=[
        fare("r1", "ann", revenue, 200), fare("r2", "ann", revenue, 100), fare("r1x", "ann", revenue, 999)]))
    assert summary(again) == ["posted:r1", "posted:r2", "INSUFFICIENT_FUNDS"]
    assert again.outcomes[0].transfer == first.outcomes[0].transfer  # the original, not a second one
    conflict = stub.PostTransferBatch(W.PostTransferBatchRequest(transfers=[fare("r1", "ann", revenue, 201)]))
    assert summary(conflict) == ["IDEMPOTENCY_CONFLICT"]
    assert len(db.events()) - snapshot_events == 1  # only r2 is new
    assert db.balance("ann")[0] == 50
    assert db.invariant_violations() == []


def test_corrections_may_name_an_earlier_transfer_of_the_same_batch(world: dict[str, Any]) -> None:
    stub, db, revenue = world["stub"], world["db"], world["revenue"]
    response = stub.PostTransferBatch(W.PostTransferBatchRequest(transfers=[
        fare("c-late", revenue, "bob", 50, kind=W.TRANSFER_KIND_CORRECTION, corrects="c-fare"),
        fare("c-fare", "bob", revenue, 100),
        fare("c-fix", revenue, "bob", 40, kind=W.TRANSFER_KIND_CORRECTION, corrects="c-fare"),
        fare("c-none", revenue, "bob", 40, kind=W.TRANSFER_KIND_CORRECTION, corrects="never-posted"),
    ]))
    assert summary(response) == ["INVALID_ARGUMENT", "posted:c-fare", "posted:c-fix", "NOT_FOUND"]
    assert db.balance("bob")[0] == 940
    assert db.invariant_violations() == []


def test_a_malformed_batch_is_refused_whole_and_changes_nothing(world: dict[str, Any]) -> None:
    stub, db, revenue = world["stub"], world["db"], world["revenue"]
    before = db.snapshot()
    call = stub.PostTransferBatch
    assert rpc_error(call, W.PostTransferBatchRequest()) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert rpc_error(call, W.PostTransferBatchRequest(transfers=[fare("d", "bob", revenue), fare("d", "bob", revenue)])) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    too_many = [fare(f"m{i}", "bob", revenue, 1) for i in range(INDEPENDENT_TRANSFERS_MAX + 1)]
    assert rpc_error(call, W.PostTransferBatchRequest(transfers=too_many)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert db.snapshot() == before


def test_a_full_batch_posts_every_transfer(world: dict[str, Any]) -> None:
    stub, db, revenue = world["stub"], world["db"], world["revenue"]
    response = stub.PostTransferBatch(W.PostTransferBatchRequest(transfers=[
        fare(f"full-{i}", "bob", revenue, 1) for i in range(INDEPENDENT_TRANSFERS_MAX)]))
    assert all(o.WhichOneof("result") == "transfer" for o in response.outcomes)
    assert db.balance("bob")[0] == 1_000 - INDEPENDENT_TRANSFERS_MAX
    assert db.invariant_violations() == []


# --- PostHold with linked transfers (a fare and its split) ---------------------------------------


def split_move(transfer_id: str, debit: str, credit: str, amount: int) -> W.Transfer:
    return fare(transfer_id, debit, credit, amount, kind=W.TRANSFER_KIND_REVENUE_SHARE)


def test_a_post_and_its_linked_transfers_commit_together_and_replay(world: dict[str, Any]) -> None:
    stub, db, revenue = world["stub"], world["db"], world["revenue"]
    city, platform = db.sys(AccountKind.CITY_REVENUE), db.sys(AccountKind.PLATFORM_FEES)
    stub.CreateHold(W.CreateHoldRequest(hold_id="h1", debit_account_id="bob", credit_account_id=revenue,
                                        amount=money_pb2.Money(amount_minor=300, currency="TWD"),
                                        kind=W.TRANSFER_KIND_FARE))
    events_before = len(db.events())
    request = W.PostHoldRequest(hold_id="h1", amount=money_pb2.Money(amount_minor=200, currency="TWD"),
                                linked_transfers=[split_move("h1:city", revenue, city, 20),
                                                  split_move("h1:platform", revenue, platform, 6)])
    posted = stub.PostHold(request)
    assert [t.transfer_id for t in posted.linked_transfers] == ["h1:city", "h1:platform"]
    assert posted.debit_available.amount_minor == 800
    assert db.balance(city)[0] == 20 and db.balance(platform)[0] == 6 and db.balance(revenue)[0] == 174
    [event] = db.events()[events_before:]  # one event for the post and its linked moves
    assert [t.transfer_id for t in event.hold_posted.linked_transfers] == ["h1:city", "h1:platform"]
    again = stub.PostHold(request)
    assert again.linked_transfers == posted.linked_transfers and again.transfer == posted.transfer
    other = W.PostHoldRequest(hold_id="h1", amount=money_pb2.Money(amount_minor=200, currency="TWD"),
                              linked_transfers=[split_move("h1:city", revenue, city, 21)])
    assert rpc_error(stub.PostHold, other) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    assert len(db.events()) == events_before + 1
    assert db.invariant_violations() == []


def test_a_failing_linked_transfer_posts_nothing(world: dict[str, Any]) -> None:
    stub, db, revenue = world["stub"], world["db"], world["revenue"]
    city = db.sys(AccountKind.CITY_REVENUE)
    stub.CreateHold(W.CreateHoldRequest(hold_id="h2", debit_account_id="bob", credit_account_id=revenue,
                                        amount=money_pb2.Money(amount_minor=300, currency="TWD"),
                                        kind=W.TRANSFER_KIND_FARE))
    before = db.snapshot()
    bad = [
        [split_move("h2:x", revenue, "nobody", 20)],                        # unknown account
        [split_move("h2:x", revenue, city, 20, ), split_move("h2:x", revenue, city, 1)],  # id twice
        [split_move("h2", revenue, city, 20)],                              # the hold's own id
        [split_move("h2:x", "ann", city, 10_000)],                          # insufficient funds
        [fare("h2:x", revenue, city, 20, currency="USD")],                  # another currency
    ]
    expected = [(grpc.StatusCode.NOT_FOUND, "UNKNOWN_ACCOUNT"), (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
                (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
                (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"),
                (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CURRENCY")]
    for linked, outcome in zip(bad, expected, strict=True):
        request = W.PostHoldRequest(hold_id="h2", linked_transfers=linked)
        assert rpc_error(stub.PostHold, request) == outcome, linked
    assert db.snapshot() == before  # the hold is still pending, nothing moved
    posted = stub.PostHold(W.PostHoldRequest(hold_id="h2"))
    assert posted.hold.status == W.HOLD_STATUS_POSTED and not posted.linked_transfers
    assert db.invariant_violations() == []
