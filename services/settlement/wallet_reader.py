"""The ledger side, read from the wallet's read-only ListTransfers and ListAccounts RPCs.

The only settlement module that calls the wallet. Settlement never reads the wallet's tables:
each service owns its schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import grpc

from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs import errors
from libs.grpc_client import connect
from libs.protos import timestamp_pb
from services.settlement.reconcile import LedgerTransfer, ledger_transfers

PAGE_SIZE = 1000
CALL_TIMEOUT_S = 30.0
PAGES_MAX = 100_000  # 100M transfers: a bound, not a plan


class WalletLedgerReader:
    """Pages through the wallet's ledger over gRPC."""

    def __init__(self, address: str) -> None:
        self._channel = connect(address, default_timeout_s=CALL_TIMEOUT_S)
        self._stub = wallet_pb2_grpc.WalletServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def transfer_messages(self, start: datetime | None = None, end: datetime | None = None
                          ) -> Iterator[wallet_pb2.Transfer]:
        token = ""
        for _ in range(PAGES_MAX):
            request = wallet_pb2.ListTransfersRequest(page_size=PAGE_SIZE, page_token=token)
            if start is not None:
                request.start_at.CopyFrom(timestamp_pb(start))
            if end is not None:
                request.end_at.CopyFrom(timestamp_pb(end))
            page = self._call(self._stub.ListTransfers, request)
            yield from page.transfers
            token = page.next_page_token
            if not token:
                return
        raise RuntimeError("ListTransfers did not finish within its page bound")

    def transfers_between(self, start: datetime, end: datetime) -> Iterator[LedgerTransfer]:
        return ledger_transfers(self.transfer_messages(start, end))

    def accounts(self) -> Iterator[wallet_pb2.AccountBalance]:
        token = ""
        for _ in range(PAGES_MAX):
            page = self._call(self._stub.ListAccounts, wallet_pb2.ListAccountsRequest(page_size=PAGE_SIZE,
                                                                                      page_token=token))
            yield from page.accounts
            token = page.next_page_token
            if not token:
                return
        raise RuntimeError("ListAccounts did not finish within its page bound")

    @staticmethod
    def _call(method: object, request: object) -> object:
        try:
            return method(request)  # type: ignore[operator]
        except grpc.RpcError as exc:
            raise errors.Unavailable("UNAVAILABLE", f"the wallet could not be read: {exc.code().name}",  # type: ignore[attr-defined]
                                     dependency="wallet") from exc
