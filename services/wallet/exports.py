"""Read-only ledger exports: ListTransfers and ListAccounts, for settlement's reconciliation
and the city's complete data export; and GetTransfers, for a caller whose answer was lost
(a till's charge left in doubt) to learn whether its transfers were posted.

The settlement service never reads the wallet's tables (each service owns its schema); it
asks through these two RPCs instead. Both page by the ledger's own order (a transfer's `seq`,
an account's creation), so a page boundary never skips or repeats a row even while new
transfers are posted. `ExportRpcs` is mixed into the servicer; the composition root calls
`servicer.attach_exports(LedgerExports(pool, schema=...))`.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from typing import Any

import grpc
from psycopg_pool import ConnectionPool

from citytap.wallet.v1 import wallet_pb2
from libs import errors
from services.wallet import convert
from services.wallet.domain import check_id
from services.wallet.repository import _ACCOUNT_COLUMNS, _TRANSFER_COLUMNS, Repository, _account

GET_TRANSFERS_MAX = 100
PAGE_SIZE_DEFAULT = 500
PAGE_SIZE_MAX = 1000
_SCHEMA = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _token(kind: str, position: Any) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{position}".encode()).decode()


def _position(kind: str, token: str) -> str | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        text = ""
    prefix = f"{kind}:"
    if not text.startswith(prefix):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "page_token is not one this service gave out",
                                     field="page_token")
    return text[len(prefix):]


def _page_size(requested: int) -> int:
    if requested < 0 or requested > PAGE_SIZE_MAX:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"page_size is 1 to {PAGE_SIZE_MAX}, or 0 for "
                                                         f"{PAGE_SIZE_DEFAULT}", field="page_size")
    return requested or PAGE_SIZE_DEFAULT


class LedgerExports:
    """Pages of transfers (with splits) and accounts straight from the ledger's tables."""

    def __init__(self, pool: ConnectionPool, *, schema: str) -> None:
        if not _SCHEMA.match(schema):
            raise ValueError(f"bad schema name {schema!r}")
        self._pool = pool
        self._schema = schema
        self._repository = Repository(schema)

    def list_transfers(self, *, start_at: datetime | None, end_at: datetime | None, page_size: int,
                       page_token: str) -> tuple[list[wallet_pb2.Transfer], str]:
        size = _page_size(page_size)
        after = _position("seq", page_token)
        try:
            after_seq = int(after) if after is not None else 0
        except ValueError:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "page_token is not one this service gave out",
                                         field="page_token") from None
        where, params = ["seq > %s"], [after_seq]
        if start_at is not None:
            where.append("posted_at >= %s")
            params.append(start_at)
        if end_at is not None:
            where.append("posted_at < %s")
            params.append(end_at)
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT seq, {_TRANSFER_COLUMNS} FROM {self._schema}.transfers WHERE "
                                f"{' AND '.join(where)} ORDER BY seq LIMIT %s", (*params, size + 1)).fetchall()
            page = rows[:size]
            splits = self._repository._splits(conn, [r[1] for r in page]) if page else {}
        transfers = [convert.transfer_to_proto(Repository._transfer(r[1:], splits.get(r[1], ()))) for r in page]
        token = _token("seq", page[-1][0]) if len(rows) > size else ""
        return transfers, token

    def get_transfers(self, transfer_ids: list[str]) -> list[wallet_pb2.Transfer]:
        """The posted transfers among `transfer_ids`, in the order asked; unknown ids left out."""
        if not 0 < len(transfer_ids) <= GET_TRANSFERS_MAX:
            raise errors.InvalidArgument("INVALID_ARGUMENT", f"transfer_ids holds 1 to {GET_TRANSFERS_MAX} ids",
                                         field="transfer_ids")
        for index, transfer_id in enumerate(transfer_ids):
            check_id(transfer_id, "transfer_ids", index=index)
        if len(set(transfer_ids)) != len(transfer_ids):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "transfer_ids names an id twice", field="transfer_ids")
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT {_TRANSFER_COLUMNS} FROM {self._schema}.transfers WHERE id = ANY(%s)",
                                (transfer_ids,)).fetchall()
            splits = self._repository._splits(conn, [r[0] for r in rows]) if rows else {}
        found = {r[0]: convert.transfer_to_proto(Repository._transfer(r, splits.get(r[0], ()))) for r in rows}
        return [found[t] for t in transfer_ids if t in found]

    def list_accounts(self, *, page_size: int, page_token: str) -> tuple[list[wallet_pb2.AccountBalance], str]:
        size = _page_size(page_size)
        after = _position("acct", page_token)
        params: list[Any] = []
        where = ""
        if after is not None:
            stamp, _, account_id = after.partition("|")
            try:
                after_at = datetime.fromisoformat(stamp)
            except ValueError:
                raise errors.InvalidArgument("INVALID_ARGUMENT", "page_token is not one this service gave out",
                                             field="page_token") from None
            where = "WHERE (created_at, id) > (%s, %s)"
            params = [after_at, account_id]
        with self._pool.connection() as conn:
            rows = conn.execute(f"SELECT {_ACCOUNT_COLUMNS} FROM {self._schema}.accounts {where} "
                                "ORDER BY created_at, id LIMIT %s", (*params, size + 1)).fetchall()
        page = [_account(r) for r in rows[:size]]
        accounts = [wallet_pb2.AccountBalance(account=convert.account_to_proto(a),
                                              balance=convert.money(a.balance_minor, a.currency)) for a in page]
        token = _token("acct", f"{page[-1].created_at.isoformat()}|{page[-1].account_id}") if len(rows) > size else ""
        return accounts, token


class ExportRpcs:
    """The ListTransfers, ListAccounts and GetTransfers RPCs, mixed into the wallet's servicer."""

    _exports: LedgerExports | None = None

    def attach_exports(self, exports: LedgerExports) -> None:
        self._exports = exports

    def _ledger_exports(self) -> LedgerExports:
        if self._exports is None:
            raise errors.Unavailable("UNAVAILABLE", "the wallet is still starting")
        return self._exports

    def ListTransfers(self, request: wallet_pb2.ListTransfersRequest,
                      context: grpc.ServicerContext) -> wallet_pb2.ListTransfersResponse:
        start_at = convert.datetime_from_proto(request, "start_at")
        end_at = convert.datetime_from_proto(request, "end_at")
        if start_at is not None and end_at is not None and end_at < start_at:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "end_at is before start_at", field="end_at")
        transfers, token = self._ledger_exports().list_transfers(start_at=start_at, end_at=end_at,
                                                                 page_size=request.page_size,
                                                                 page_token=request.page_token)
        return wallet_pb2.ListTransfersResponse(transfers=transfers, next_page_token=token)

    def ListAccounts(self, request: wallet_pb2.ListAccountsRequest,
                     context: grpc.ServicerContext) -> wallet_pb2.ListAccountsResponse:
        accounts, token = self._ledger_exports().list_accounts(page_size=request.page_size,
                                                               page_token=request.page_token)
        return wallet_pb2.ListAccountsResponse(accounts=accounts, next_page_token=token)

    def GetTransfers(self, request: wallet_pb2.GetTransfersRequest,
                     context: grpc.ServicerContext) -> wallet_pb2.GetTransfersResponse:
        return wallet_pb2.GetTransfersResponse(transfers=self._ledger_exports().get_transfers(list(request.transfer_ids)))
