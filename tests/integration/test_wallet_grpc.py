"""The real WalletService servicer on a real in-process server (port 0) over a scratch schema:
happy paths through the wire, and every kind of bad input answered with its precise status
code and ErrorInfo reason while the database stays exactly as it was."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest

from citytap.common.v1 import credential_pb2, money_pb2, split_pb2
from citytap.wallet.v1 import wallet_pb2
from libs.grpc_client import error_info
from services.wallet.domain import AccountKind
from tests.integration.wallet_support import GrpcWallet, grpc_wallet, rpc_error, wallet_db  # noqa: F401 - fixtures

W = wallet_pb2
INT64_MAX = 2**63 - 1
UID = bytes.fromhex("04a1b2c3d4e5f6")


def twd(amount: int, currency: str = "TWD") -> money_pb2.Money:
    return money_pb2.Money(amount_minor=amount, currency=currency)


def fare(transfer_id: str, debit: str, credit: str, amount: int | None = 100, currency: str = "TWD",
         kind: int = W.TRANSFER_KIND_FARE) -> W.Transfer:
    message = W.Transfer(transfer_id=transfer_id, debit_account_id=debit, credit_account_id=credit, kind=kind)
    if amount is not None:
        message.amount.CopyFrom(twd(amount, currency))
    return message


@pytest.fixture()
def world(grpc_wallet: GrpcWallet) -> dict[str, Any]:
    """A funded rider, a poor rider, a blocked rider, a merchant and a pending hold."""
    db, stub = grpc_wallet.db, grpc_wallet.stub
    stub.CreateAccount(W.CreateAccountRequest(account_id="rich", rider_category="adult"))
    stub.CreateAccount(W.CreateAccountRequest(account_id="poor"))
    stub.CreateAccount(W.CreateAccountRequest(account_id="blocked"))
    stub.CreateAccount(W.CreateAccountRequest(account_id="shop", kind=W.ACCOUNT_KIND_MERCHANT_PAYABLE, owner_id="m-1"))
    db.ledger.credit_from_clearing("fund-rich", "rich", 10_000)
    db.ledger.credit_from_clearing("fund-poor", "poor", 50)
    db.ledger.credit_from_clearing("fund-blocked", "blocked", 500)
    stub.BlockAccount(W.BlockAccountRequest(account_id="blocked", reason=W.BLOCK_REASON_LOST_OR_STOLEN))
    stub.LinkCard(W.LinkCardRequest(account_id="rich", card_uid=UID, label="blue"))
    revenue = db.sys(AccountKind.OPERATOR_REVENUE)
    expires = db.clock() + timedelta(minutes=10)
    stub.CreateHold(W.CreateHoldRequest(hold_id="pending", debit_account_id="rich", credit_account_id=revenue,
                                        amount=twd(300), kind=W.TRANSFER_KIND_FARE, expires_at=expires))
    stub.CreateHold(W.CreateHoldRequest(hold_id="voided", debit_account_id="rich", credit_account_id=revenue,
                                        amount=twd(300), kind=W.TRANSFER_KIND_FARE, expires_at=expires))
    stub.VoidHold(W.VoidHoldRequest(hold_id="voided"))
    stub.CreateTransfers(W.CreateTransfersRequest(transfers=[fare("fare-1", "rich", revenue, 100)]))
    return {"stub": stub, "db": db, "revenue": revenue, "suspense": db.sys(AccountKind.SUSPENSE),
            "city": db.sys(AccountKind.CITY_REVENUE)}


# --- the happy path over the wire -----------------------------------------------------------------


def test_the_ledger_rpcs_work_over_the_wire(world: dict[str, Any]) -> None:
    stub, revenue = world["stub"], world["revenue"]
    balance = stub.GetBalance(W.GetBalanceRequest(account_id="rich"))
    assert (balance.balance.amount_minor, balance.held.amount_minor, balance.available.amount_minor) == (9900, 300, 9600)
    assert [h.hold_id for h in balance.holds] == ["pending"]
    posted = stub.PostHold(W.PostHoldRequest(hold_id="pending", amount=twd(120)))
    assert (posted.hold.status, posted.hold.posted_amount.amount_minor, posted.transfer.transfer_id) == (
        W.HOLD_STATUS_POSTED, 120, "pending")
    assert stub.PostHold(W.PostHoldRequest(hold_id="pending", amount=twd(120))) == posted
    assert stub.VoidHold(W.VoidHoldRequest(hold_id="voided")).hold.status == W.HOLD_STATUS_VOIDED
    account = stub.GetAccount(W.GetAccountRequest(account_id="rich"))
    assert (account.account.kind, account.account.rider_category, account.account.floor.amount_minor) == (
        W.ACCOUNT_KIND_RIDER_WALLET, "adult", 0)
    assert [c.label for c in account.cards] == ["blue"]
    resolved = stub.ResolveCredential(W.ResolveCredentialRequest(credential=credential_pb2.Credential(card_uid=UID)))
    assert (resolved.account_id, resolved.status, resolved.rider_category) == ("rich", W.ACCOUNT_STATUS_ACTIVE, "adult")
    history = stub.ListHistory(W.ListHistoryRequest(account_id="rich", page_size=2))
    assert [(e.transfer_id, e.delta.amount_minor, e.balance_after.amount_minor) for e in history.entries] == [
        ("pending", -120, 9780), ("fare-1", -100, 9900)]
    rest = stub.ListHistory(W.ListHistoryRequest(account_id="rich", page_token=history.next_page_token))
    assert [e.transfer_id for e in rest.entries] == ["fund-rich"] and rest.next_page_token == ""
    blocked = stub.GetAccount(W.GetAccountRequest(account_id="blocked")).account
    assert (blocked.status, blocked.block_reason) == (W.ACCOUNT_STATUS_BLOCKED, W.BLOCK_REASON_LOST_OR_STOLEN)
    unblocked = stub.UnblockAccount(W.UnblockAccountRequest(account_id="blocked")).account
    assert unblocked.status == W.ACCOUNT_STATUS_ACTIVE
    card_id = account.cards[0].card_id
    assert stub.UnlinkCard(W.UnlinkCardRequest(account_id="rich", card_id=card_id)).HasField("unlinked_at")
    assert world["db"].invariant_violations() == []


def test_device_rpcs_say_so_until_their_service_is_attached(world: dict[str, Any]) -> None:
    # This servicer has only a ledger: the phone RPCs (live, see test_wallet_devices.py) must
    # say they cannot answer yet, not pretend.
    assert rpc_error(world["stub"].RegisterDevice, W.RegisterDeviceRequest(device_id="d", account_id="rich")) == (
        grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")


# --- bad input: precise status and reason, and nothing changes ----------------------------------

INVALID, NOT_FOUND, PRECONDITION = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                                    grpc.StatusCode.FAILED_PRECONDITION)
CONFLICT, EXHAUSTED = grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.RESOURCE_EXHAUSTED


def transfers(*items: W.Transfer) -> W.CreateTransfersRequest:
    return W.CreateTransfersRequest(transfers=list(items))


# (name, rpc name, request factory taking the world, expected code, expected reason, metadata subset)
BAD: list[tuple[str, str, Callable[[dict], Any], grpc.StatusCode, str, dict]] = [
    ("zero amount", "CreateTransfers", lambda w: transfers(fare("x", "rich", w["revenue"], 0)),
     INVALID, "INVALID_AMOUNT", {"field": "amount", "index": "0"}),
    ("negative amount", "CreateTransfers", lambda w: transfers(fare("x", "rich", w["revenue"], -5)),
     INVALID, "INVALID_AMOUNT", {}),
    ("missing amount", "CreateTransfers", lambda w: transfers(fare("x", "rich", w["revenue"], None)),
     INVALID, "INVALID_AMOUNT", {}),
    ("balance overflow", "CreateTransfers",
     lambda w: transfers(fare("x1", w["suspense"], w["city"], INT64_MAX, kind=W.TRANSFER_KIND_CORRECTION),
                         fare("x2", w["suspense"], w["city"], INT64_MAX, kind=W.TRANSFER_KIND_CORRECTION)),
     INVALID, "INVALID_AMOUNT", {"index": "1"}),
    ("wrong currency for the accounts", "CreateTransfers", lambda w: transfers(fare("x", "rich", w["revenue"], 100, "USD")),
     INVALID, "INVALID_CURRENCY", {}),
    ("malformed currency", "CreateTransfers", lambda w: transfers(fare("x", "rich", w["revenue"], 100, "twd")),
     INVALID, "INVALID_CURRENCY", {}),
    ("unknown debit account", "CreateTransfers", lambda w: transfers(fare("x", "ghost", w["revenue"])),
     NOT_FOUND, "UNKNOWN_ACCOUNT", {"field": "debit_account_id"}),
    ("unknown account in a later item", "CreateTransfers",
     lambda w: transfers(fare("x1", "rich", w["revenue"]), fare("x2", "rich", "ghost")),
     NOT_FOUND, "UNKNOWN_ACCOUNT", {"index": "1", "field": "credit_account_id"}),
    ("empty transfer id", "CreateTransfers", lambda w: transfers(fare("", "rich", w["revenue"])),
     INVALID, "INVALID_ARGUMENT", {"field": "transfer_id"}),
    ("transfer id with a space", "CreateTransfers", lambda w: transfers(fare("a b", "rich", w["revenue"])),
     INVALID, "INVALID_ARGUMENT", {}),
    ("65-character id", "CreateTransfers", lambda w: transfers(fare("x" * 65, "rich", w["revenue"])),
     INVALID, "INVALID_ARGUMENT", {}),
    ("malformed account id", "CreateTransfers", lambda w: transfers(fare("x", "rich/1", w["revenue"])),
     INVALID, "INVALID_ARGUMENT", {"field": "debit_account_id"}),
    ("same account on both sides", "CreateTransfers", lambda w: transfers(fare("x", "rich", "rich")),
     INVALID, "INVALID_ARGUMENT", {}),
    ("no kind", "CreateTransfers", lambda w: transfers(fare("x", "rich", w["revenue"], kind=0)),
     INVALID, "INVALID_ARGUMENT", {"field": "kind"}),
    ("unknown kind number", "CreateTransfers", lambda w: transfers(fare("x", "rich", w["revenue"], kind=99)),
     INVALID, "INVALID_ARGUMENT", {"field": "kind"}),
    ("top-up kind through CreateTransfers", "CreateTransfers",
     lambda w: transfers(fare("x", "system:stripe-clearing:TWD", "rich", kind=W.TRANSFER_KIND_TOP_UP)),
     INVALID, "INVALID_ARGUMENT", {"field": "kind"}),
    ("batch of 33", "CreateTransfers", lambda w: transfers(*[fare(f"x{i}", "rich", w["revenue"], 1) for i in range(33)]),
     INVALID, "INVALID_ARGUMENT", {}),
    ("empty batch", "CreateTransfers", lambda w: transfers(), INVALID, "INVALID_ARGUMENT", {}),
    ("insufficient funds", "CreateTransfers", lambda w: transfers(fare("x", "poor", w["revenue"], 51)),
     PRECONDITION, "INSUFFICIENT_FUNDS", {"account_id": "poor"}),
    ("held funds are not available", "CreateTransfers", lambda w: transfers(fare("x", "rich", w["revenue"], 9601)),
     PRECONDITION, "INSUFFICIENT_FUNDS", {}),
    ("blocked account pays", "CreateTransfers", lambda w: transfers(fare("x", "blocked", w["revenue"], 1)),
     PRECONDITION, "ACCOUNT_BLOCKED", {}),
    ("stored value limit", "CreateTransfers",
     lambda w: transfers(fare("x", w["suspense"], "poor", 1_000_000, kind=W.TRANSFER_KIND_CORRECTION)),
     EXHAUSTED, "LIMIT_EXCEEDED", {"limit": "stored_value"}),
    ("reused id, other payload", "CreateTransfers", lambda w: transfers(fare("fare-1", "rich", w["revenue"], 101)),
     CONFLICT, "IDEMPOTENCY_CONFLICT", {}),
    ("hold on an unknown account", "CreateHold",
     lambda w: W.CreateHoldRequest(hold_id="h", debit_account_id="ghost", credit_account_id=w["revenue"],
                                   amount=twd(10), kind=W.TRANSFER_KIND_FARE),
     NOT_FOUND, "UNKNOWN_ACCOUNT", {}),
    ("hold beyond available", "CreateHold",
     lambda w: W.CreateHoldRequest(hold_id="h", debit_account_id="poor", credit_account_id=w["revenue"],
                                   amount=twd(51), kind=W.TRANSFER_KIND_FARE),
     PRECONDITION, "INSUFFICIENT_FUNDS", {}),
    ("hold with an expiry in the past", "CreateHold",
     lambda w: W.CreateHoldRequest(hold_id="h", debit_account_id="rich", credit_account_id=w["revenue"],
                                   amount=twd(10), kind=W.TRANSFER_KIND_FARE,
                                   expires_at=w["db"].clock() - timedelta(seconds=1)),
     INVALID, "INVALID_ARGUMENT", {"field": "expires_at"}),
    ("hold id reused with another amount", "CreateHold",
     lambda w: W.CreateHoldRequest(hold_id="pending", debit_account_id="rich", credit_account_id=w["revenue"],
                                   amount=twd(301), kind=W.TRANSFER_KIND_FARE),
     CONFLICT, "IDEMPOTENCY_CONFLICT", {}),
    ("post of an unknown hold", "PostHold", lambda w: W.PostHoldRequest(hold_id="ghost"),
     NOT_FOUND, "NOT_FOUND", {"resource": "hold"}),
    ("post beyond the held amount", "PostHold", lambda w: W.PostHoldRequest(hold_id="pending", amount=twd(301)),
     INVALID, "INVALID_AMOUNT", {}),
    ("post in another currency", "PostHold", lambda w: W.PostHoldRequest(hold_id="pending", amount=twd(10, "JPY")),
     INVALID, "INVALID_CURRENCY", {}),
    ("post of a voided hold", "PostHold", lambda w: W.PostHoldRequest(hold_id="voided"),
     PRECONDITION, "INVALID_STATE", {}),
    ("post with splits not summing to the amount", "PostHold",
     lambda w: W.PostHoldRequest(hold_id="pending", amount=twd(100), splits=[
         split_pb2.SplitLine(party=split_pb2.PARTY_TRANSIT_OPERATOR, party_id="op", amount=twd(99), contract_id="c",
                             contract_version=1)]),
     INVALID, "INVALID_AMOUNT", {}),
    ("void of a malformed hold id", "VoidHold", lambda w: W.VoidHoldRequest(hold_id=""),
     INVALID, "INVALID_ARGUMENT", {}),
    ("balance of an unknown account", "GetBalance", lambda w: W.GetBalanceRequest(account_id="ghost"),
     NOT_FOUND, "UNKNOWN_ACCOUNT", {}),
    ("account with an unknown category", "CreateAccount",
     lambda w: W.CreateAccountRequest(account_id="new", rider_category="pirate"),
     INVALID, "INVALID_ARGUMENT", {"field": "rider_category"}),
    ("account in another currency", "CreateAccount", lambda w: W.CreateAccountRequest(account_id="new", currency="USD"),
     INVALID, "INVALID_CURRENCY", {}),
    ("account id reused with another payload", "CreateAccount",
     lambda w: W.CreateAccountRequest(account_id="rich", rider_category="student"),
     CONFLICT, "IDEMPOTENCY_CONFLICT", {}),
    ("card linked elsewhere", "LinkCard", lambda w: W.LinkCardRequest(account_id="poor", card_uid=UID),
     CONFLICT, "CREDENTIAL_IN_USE", {}),
    ("card uid of a wrong length", "LinkCard", lambda w: W.LinkCardRequest(account_id="poor", card_uid=b"\x01"),
     INVALID, "INVALID_ARGUMENT", {"field": "card_uid"}),
    ("block without a reason", "BlockAccount", lambda w: W.BlockAccountRequest(account_id="rich"),
     INVALID, "INVALID_ARGUMENT", {"field": "reason"}),
    ("unknown card", "ResolveCredential",
     lambda w: W.ResolveCredentialRequest(credential=credential_pb2.Credential(card_uid=b"\x01\x02\x03\x04")),
     NOT_FOUND, "UNKNOWN_CREDENTIAL", {}),
    ("phone QR not yet supported", "ResolveCredential",
     lambda w: W.ResolveCredentialRequest(credential=credential_pb2.Credential(phone_qr=b"payload")),
     INVALID, "UNSUPPORTED_CREDENTIAL", {}),
    ("NFC token not yet supported", "ResolveCredential",
     lambda w: W.ResolveCredentialRequest(credential=credential_pb2.Credential(nfc_token="tok")),
     INVALID, "UNSUPPORTED_CREDENTIAL", {}),
    ("no credential", "ResolveCredential", lambda w: W.ResolveCredentialRequest(),
     INVALID, "INVALID_ARGUMENT", {}),
    ("page size too large", "ListHistory", lambda w: W.ListHistoryRequest(account_id="rich", page_size=101),
     INVALID, "INVALID_ARGUMENT", {"field": "page_size"}),
    ("forged page token", "ListHistory", lambda w: W.ListHistoryRequest(account_id="rich", page_token="forged"),
     INVALID, "INVALID_ARGUMENT", {"field": "page_token"}),
]


@pytest.mark.parametrize(("rpc", "make", "code", "reason", "metadata"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_a_precise_status_and_reason_and_changes_nothing(
        world: dict[str, Any], rpc: str, make: Callable[[dict], Any], code: grpc.StatusCode, reason: str,
        metadata: dict) -> None:
    db = world["db"]
    before = db.snapshot()
    with pytest.raises(grpc.RpcError) as failure:
        getattr(world["stub"], rpc)(make(world))
    info = error_info(failure.value)
    assert (failure.value.code(), info.reason if info else None) == (code, reason), failure.value.details()
    assert info.domain == "wallet.citytap"
    assert metadata.items() <= dict(info.metadata).items()
    assert db.snapshot() == before
    assert db.invariant_violations() == []


def test_posting_an_expired_hold_over_the_wire(world: dict[str, Any]) -> None:
    db, stub = world["db"], world["stub"]
    db.clock.advance(600)
    code, reason = rpc_error(stub.PostHold, W.PostHoldRequest(hold_id="pending"))
    assert (code, reason) == (PRECONDITION, "HOLD_EXPIRED")
    assert stub.VoidHold(W.VoidHoldRequest(hold_id="pending")).hold.status == W.HOLD_STATUS_EXPIRED
    assert stub.GetBalance(W.GetBalanceRequest(account_id="rich")).held.amount_minor == 0
