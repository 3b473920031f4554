"""Helpers for the wallet's integration tests: a ledger on a scratch schema with a
controllable clock, an in-process gRPC server, database snapshots, and the ledger invariants
checked straight from the tables.

Test modules import the fixtures they use from here (`from tests.integration.wallet_support
import ...`), which is how pytest finds fixtures defined outside conftest.py.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from psycopg_pool import ConnectionPool

from citytap.wallet.v1 import events_pb2, wallet_pb2_grpc
from libs import outbox
from libs.grpc_client import connect, error_reason
from libs.grpc_server import Server, create_server
from libs.postgres import create_pool, migrate_folder
from services.wallet.deny_list import MemoryDenyList
from services.wallet.domain import AccountKind, CreateAccountRequest
from services.wallet.ledger import Ledger, LedgerConfig
from services.wallet.servicer import WalletServicer, registration

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "wallet" / "migrations"
CURRENCY = "TWD"
START = datetime(2030, 1, 1, 8, 0, tzinfo=timezone.utc)
TEST_CARD_HASH_KEY = bytes(range(32))


class FakeClock:
    """A clock tests set or move by hand; thread-safe so concurrent tests (and services) can share it."""

    def __init__(self, start: datetime = START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def set(self, moment: datetime) -> None:
        with self._lock:
            self._now = moment

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now


def config(**overrides: Any) -> LedgerConfig:
    values: dict[str, Any] = dict(currency=CURRENCY, rider_categories=("adult", "student", "senior", "disabled"),
                                  rider_floor_minor=0, stored_value_max_minor=1_000_000,
                                  card_hash_key=TEST_CARD_HASH_KEY)
    values.update(overrides)
    return LedgerConfig(**values)


@dataclass
class WalletDb:
    """A migrated scratch schema with a pool and a ledger over it."""

    dsn: str
    schema: str
    pool: ConnectionPool
    clock: FakeClock
    ledger: Ledger
    deny_list: Any
    _extra: list[Ledger] = field(default_factory=list)

    def another_ledger(self, **overrides: Any) -> Ledger:
        """A second ledger on the same schema with other settings (another floor, say)."""
        ledger = Ledger(self.pool, schema=self.schema, config=config(**overrides), deny_list=self.deny_list,
                        clock=self.clock)
        self._extra.append(ledger)
        return ledger

    def sys(self, kind: AccountKind) -> str:
        return self.ledger.system_account(kind)

    def rider(self, account_id: str | None = None, *, funded_minor: int = 0, ledger: Ledger | None = None,
              category: str = "") -> str:
        """Open a rider wallet (funded from Stripe clearing when asked) and return its id."""
        account_id = account_id or f"rider-{uuid.uuid4().hex[:10]}"
        (ledger or self.ledger).create_account(
            CreateAccountRequest(account_id, AccountKind.RIDER_WALLET, "", category, None, ""))
        if funded_minor:
            self.ledger.credit_from_clearing(f"fund-{account_id}", account_id, funded_minor)
        return account_id

    def merchant(self, account_id: str | None = None) -> str:
        account_id = account_id or f"merchant-{uuid.uuid4().hex[:10]}"
        self.ledger.create_account(CreateAccountRequest(account_id, AccountKind.MERCHANT_PAYABLE, "", "", None,
                                                        f"owner-{account_id}"))
        return account_id

    def query(self, text: str, params: Any = None) -> list[tuple]:
        with self.pool.connection() as conn:
            return conn.execute(text.replace("{s}", f'"{self.schema}"'), params).fetchall()

    def balance(self, account_id: str) -> tuple[int, int, int]:
        """(balance, pending debits, pending credits) straight from the table."""
        return self.query("SELECT balance_minor, pending_debits_minor, pending_credits_minor FROM {s}.accounts"
                          " WHERE id = %s", (account_id,))[0]

    def events(self) -> list[events_pb2.WalletEvent]:
        return [events_pb2.WalletEvent.FromString(bytes(r[0]))
                for r in self.query("SELECT payload FROM {s}.outbox_events ORDER BY seq")]

    def event_types(self) -> list[str]:
        return [r[0].rsplit(".", 1)[1] for r in self.query("SELECT event_type FROM {s}.outbox_events ORDER BY seq")]

    def snapshot(self) -> dict[str, Any]:
        """Everything a refused request must leave untouched."""
        counts = {table: self.query(f"SELECT count(*) FROM {{s}}.{table}")[0][0]
                  for table in ("accounts", "transfers", "transfer_splits", "holds", "hold_resolutions",
                                "pending_holds", "cards", "outbox_events")}
        accounts = self.query("SELECT id, balance_minor, pending_debits_minor, pending_credits_minor, status,"
                              " rider_category FROM {s}.accounts ORDER BY id")
        cards = self.query("SELECT id, unlinked_at FROM {s}.cards ORDER BY id")
        return {"counts": counts, "accounts": accounts, "cards": cards}

    def invariant_violations(self) -> list[str]:
        return invariant_violations(self.pool, self.schema)


INVARIANTS = {
    "the sum of balances per currency is zero":
        "SELECT currency, sum(balance_minor) FROM {s}.accounts GROUP BY currency HAVING sum(balance_minor) <> 0",
    "no available balance is below its floor":
        "SELECT id, balance_minor, pending_debits_minor, floor_minor FROM {s}.accounts"
        " WHERE floor_minor IS NOT NULL AND balance_minor - pending_debits_minor < floor_minor",
    "every balance equals the replay of its transfers":
        "SELECT a.id, a.balance_minor, coalesce(c.total, 0) - coalesce(d.total, 0) FROM {s}.accounts a"
        " LEFT JOIN (SELECT credit_account_id AS id, sum(amount_minor) AS total FROM {s}.transfers GROUP BY 1) c"
        "   ON c.id = a.id"
        " LEFT JOIN (SELECT debit_account_id AS id, sum(amount_minor) AS total FROM {s}.transfers GROUP BY 1) d"
        "   ON d.id = a.id"
        " WHERE a.balance_minor <> coalesce(c.total, 0) - coalesce(d.total, 0)",
    "pending columns equal the sums of the pending holds (system accounts keep none)":
        "SELECT a.id, a.pending_debits_minor, coalesce(d.total, 0), a.pending_credits_minor, coalesce(c.total, 0)"
        " FROM {s}.accounts a"
        " LEFT JOIN (SELECT h.debit_account_id AS id, sum(h.amount_minor) AS total FROM {s}.holds h"
        "   WHERE NOT EXISTS (SELECT 1 FROM {s}.hold_resolutions r WHERE r.hold_id = h.id) GROUP BY 1) d ON d.id = a.id"
        " LEFT JOIN (SELECT h.credit_account_id AS id, sum(h.amount_minor) AS total FROM {s}.holds h"
        "   WHERE NOT EXISTS (SELECT 1 FROM {s}.hold_resolutions r WHERE r.hold_id = h.id) GROUP BY 1) c ON c.id = a.id"
        " WHERE CASE WHEN a.id LIKE 'system:%%' THEN (a.pending_debits_minor, a.pending_credits_minor) <> (0, 0)"
        "   ELSE a.pending_debits_minor <> coalesce(d.total, 0) OR a.pending_credits_minor <> coalesce(c.total, 0) END",
    "every hold is either pending or resolved, never both or neither":
        "SELECT h.id FROM {s}.holds h LEFT JOIN {s}.pending_holds p ON p.hold_id = h.id"
        " LEFT JOIN {s}.hold_resolutions r ON r.hold_id = h.id WHERE (p.hold_id IS NULL) = (r.hold_id IS NULL)",
    "no hold is resolved twice":
        "SELECT hold_id FROM {s}.hold_resolutions GROUP BY 1 HAVING count(*) > 1"
        " UNION ALL SELECT hold_id FROM {s}.transfers WHERE hold_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1",
    "a hold is posted exactly when a transfer of the posted amount exists":
        "SELECT r.hold_id FROM {s}.hold_resolutions r LEFT JOIN {s}.transfers t ON t.hold_id = r.hold_id"
        " WHERE (r.outcome = 'POSTED') <> (t.id IS NOT NULL)"
        "    OR (t.id IS NOT NULL AND (t.amount_minor <> r.posted_amount_minor OR t.amount_minor > "
        "        (SELECT amount_minor FROM {s}.holds h WHERE h.id = r.hold_id)))",
    "each account's latest running balance equals its balance":
        "SELECT a.id FROM {s}.accounts a JOIN LATERAL ("
        "  SELECT CASE WHEN t.debit_account_id = a.id THEN t.debit_balance_after_minor"
        "              ELSE t.credit_balance_after_minor END AS after FROM {s}.transfers t"
        "   WHERE t.debit_account_id = a.id OR t.credit_account_id = a.id ORDER BY t.seq DESC LIMIT 1) last ON true"
        " WHERE last.after <> a.balance_minor",
}


def invariant_violations(pool: ConnectionPool, schema: str) -> list[str]:
    """The invariants of the ledger that do not hold right now, each with example rows."""
    found = []
    with pool.connection() as conn:
        for name, text in INVARIANTS.items():
            rows = conn.execute(text.replace("{s}", f'"{schema}"')).fetchall()
            if rows:
                found.append(f"{name}: {rows[:5]}")
    return found


def open_wallet_db(dsn: str, schema: str, *, clock: FakeClock | None = None, pool_max: int = 8,
                   deny_list: Any = None, **overrides: Any) -> WalletDb:
    migrate_folder(dsn, schema, MIGRATIONS)
    pool = create_pool(dsn, name=f"test-{schema}", max_size=pool_max)
    with pool.connection() as conn:
        outbox.ensure_table(conn, schema)
    clock = clock or FakeClock()
    deny_list = deny_list if deny_list is not None else MemoryDenyList()
    ledger = Ledger(pool, schema=schema, config=config(**overrides), deny_list=deny_list, clock=clock)
    ledger.ensure_system_accounts()
    return WalletDb(dsn, schema, pool, clock, ledger, deny_list)


@pytest.fixture()
def wallet_db(postgres_dsn: str, scratch_schema: str) -> Iterator[WalletDb]:
    db = open_wallet_db(postgres_dsn, scratch_schema)
    yield db
    db.pool.close()


@dataclass
class GrpcWallet:
    db: WalletDb
    server: Server
    channel: grpc.Channel
    stub: wallet_pb2_grpc.WalletServiceStub


@pytest.fixture()
def grpc_wallet(wallet_db: WalletDb) -> Iterator[GrpcWallet]:
    """The real servicer behind a real in-process server on port 0, over `wallet_db`."""
    server = create_server("127.0.0.1:0", [registration(WalletServicer(wallet_db.ledger))], domain="wallet.citytap")
    server.start()
    server.set_serving(True)
    channel = connect(f"127.0.0.1:{server.port}", default_timeout_s=10)
    yield GrpcWallet(wallet_db, server, channel, wallet_pb2_grpc.WalletServiceStub(channel))
    channel.close()
    server.stop(0)


def rpc_error(call: Any, request: Any) -> tuple[grpc.StatusCode, str | None]:
    """Call and expect a failure; return its status code and ErrorInfo reason."""
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), error_reason(info.value)


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value else default
