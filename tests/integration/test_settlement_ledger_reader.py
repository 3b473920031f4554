"""The wallet's read-only ListTransfers, ListAccounts and GetTransfers (services/wallet/exports.py),
read by settlement's WalletLedgerReader (and a plain stub) over a real in-process gRPC server on
the real PostgreSQL: every transfer once across page boundaries, the time window, transfers by
id, and bad requests refused."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest

from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs.grpc_client import connect, error_reason
from libs.grpc_server import create_server
from libs.protos import timestamp_pb
from services.settlement import wallet_reader
from services.settlement.wallet_reader import WalletLedgerReader
from services.wallet.domain import AccountKind, Party, SplitLine, TransferKind, TransferRequest
from services.wallet.exports import LedgerExports
from services.wallet.servicer import WalletServicer, registration
from tests.integration.wallet_support import WalletDb, wallet_db  # noqa: F401 - fixture


@pytest.fixture()
def served(wallet_db: WalletDb) -> Iterator[tuple[WalletDb, str]]:  # noqa: F811
    servicer = WalletServicer(wallet_db.ledger)
    servicer.attach_exports(LedgerExports(wallet_db.pool, schema=wallet_db.schema))
    server = create_server("127.0.0.1:0", [registration(servicer)], domain="wallet.citytap")
    server.start()
    server.set_serving(True)
    yield wallet_db, f"127.0.0.1:{server.port}"
    server.stop(0)


def test_pages_hold_every_transfer_once_with_its_splits(served: tuple[WalletDb, str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    db, address = served
    rider = db.rider(funded_minor=100_000)
    start = db.clock()
    for n in range(7):
        db.clock.advance(60)
        db.ledger.create_transfers([TransferRequest(
            f"fare-{n}", rider, db.sys(AccountKind.OPERATOR_REVENUE), 1000 + n, "TWD", TransferKind.FARE,
            (SplitLine(Party.TRANSIT_OPERATOR, "metro", 900 + n, "TWD", "fare", 1),
             SplitLine(Party.CITY, "city", 100, "TWD", "fare", 1)))])
    monkeypatch.setattr(wallet_reader, "PAGE_SIZE", 3)  # force several pages
    reader = WalletLedgerReader(address)
    try:
        everything = list(reader.transfer_messages())
        assert [t.transfer_id for t in everything] == [f"fund-{rider}"] + [f"fare-{n}" for n in range(7)]
        window = list(reader.transfers_between(start + timedelta(seconds=120), start + timedelta(seconds=300)))
        assert [t.transfer_id for t in window] == ["fare-1", "fare-2", "fare-3"]
        assert all(t.has_splits and t.split_sum_minor == t.amount_minor for t in window)
        accounts = {a.account.account_id: a.balance.amount_minor for a in reader.accounts()}
        assert accounts[rider] == 100_000 - sum(1000 + n for n in range(7))
        assert sum(accounts.values()) == 0
    finally:
        reader.close()


def test_bad_requests_are_refused(served: tuple[WalletDb, str]) -> None:
    db, address = served
    stub = wallet_pb2_grpc.WalletServiceStub(connect(address, default_timeout_s=5))
    now = db.clock()
    for call, request in [
        (stub.ListTransfers, wallet_pb2.ListTransfersRequest(page_size=1001)),
        (stub.ListTransfers, wallet_pb2.ListTransfersRequest(page_token="bm9wZQ==")),
        (stub.ListTransfers, wallet_pb2.ListTransfersRequest(start_at=timestamp_pb(now),
                                                             end_at=timestamp_pb(now - timedelta(seconds=1)))),
        (stub.ListAccounts, wallet_pb2.ListAccountsRequest(page_token="garbage")),
        (stub.GetTransfers, wallet_pb2.GetTransfersRequest()),
        (stub.GetTransfers, wallet_pb2.GetTransfersRequest(transfer_ids=[f"t-{n}" for n in range(101)])),
        (stub.GetTransfers, wallet_pb2.GetTransfersRequest(transfer_ids=["t-1", "t-1"])),
        (stub.GetTransfers, wallet_pb2.GetTransfersRequest(transfer_ids=["not an id!"])),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(request)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(info.value) == "INVALID_ARGUMENT"


def test_get_transfers_answers_the_posted_ones_in_the_order_asked(served: tuple[WalletDb, str]) -> None:
    db, address = served
    rider = db.rider(funded_minor=10_000)
    for n in range(3):
        db.ledger.create_transfers([TransferRequest(
            f"fare-{n}", rider, db.sys(AccountKind.OPERATOR_REVENUE), 100 + n, "TWD", TransferKind.FARE,
            (SplitLine(Party.TRANSIT_OPERATOR, "metro", 90 + n, "TWD", "fare", 1),
             SplitLine(Party.CITY, "city", 10, "TWD", "fare", 1)))])
    stub = wallet_pb2_grpc.WalletServiceStub(connect(address, default_timeout_s=5))
    asked = ["fare-2", "never-posted", "fare-0", f"fund-{rider}"]
    found = stub.GetTransfers(wallet_pb2.GetTransfersRequest(transfer_ids=asked)).transfers
    assert [t.transfer_id for t in found] == ["fare-2", "fare-0", f"fund-{rider}"]
    assert [t.amount.amount_minor for t in found] == [102, 100, 10_000]
    assert [s.amount.amount_minor for s in found[0].splits] == [92, 10]
    assert list(stub.GetTransfers(wallet_pb2.GetTransfersRequest(transfer_ids=["never-posted"])).transfers) == []
    full = [f"x-{n}" for n in range(99)] + ["fare-1"]  # the most one call may ask
    assert [t.transfer_id for t in stub.GetTransfers(wallet_pb2.GetTransfersRequest(transfer_ids=full)).transfers] \
        == ["fare-1"]
