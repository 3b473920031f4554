"""Helpers for fare-gate's integration tests: a real wallet and a real fare gate, each built
through its own composition root on port 0 over scratch schemas of the test stack's
PostgreSQL, with the stack's Redis and Kafka; riders funded through the wallet's ledger;
taps sent over gRPC.

The wallet is a separate instance on its own schema, so the fares it books (to its own
operator revenue account) are exactly the ones these tests made, and the books can be
checked to the cent afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2
from psycopg import sql

from citytap.common.v1 import credential_pb2
from citytap.fare_gate.v1 import fare_gate_pb2, fare_gate_pb2_grpc
from libs.grpc_client import connect, error_reason
from libs.settings import load
from services.fare_gate.bootstrap import build as build_fare_gate
from services.fare_gate.settings import Settings as FareGateSettings
from services.wallet.bootstrap import build as build_wallet
from services.wallet.deny_list import deny_list_key
from services.wallet.devices import revocation_set_key
from services.wallet.domain import AccountKind, BlockReason, CreateAccountRequest
from services.wallet.settings import Settings as WalletSettings

TEST_CARD_HASH_KEY = bytes(range(32))
TEST_ISSUER_SEED = bytes(range(100, 132))
ENTRY = fare_gate_pb2.TAP_DIRECTION_ENTRY
EXIT = fare_gate_pb2.TAP_DIRECTION_EXIT
VALIDATE = fare_gate_pb2.TAP_DIRECTION_VALIDATE
OPEN = fare_gate_pb2.TAP_DECISION_OPEN
DENY = fare_gate_pb2.TAP_DECISION_DENY
R = fare_gate_pb2  # reason names: R.TAP_REASON_OK ...

# What these tests let a gate send: taps up to two days old, so a whole service day of
# journeys (and journeys overdue for their exit) can be replayed in a few seconds.
TAP_AGE_S_MAX = 2 * 24 * 3600


def _env(**extra: str) -> dict[str, str]:
    for name in ("CITYTAP_POSTGRES_DSN", "CITYTAP_KAFKA_BOOTSTRAP", "CITYTAP_REDIS_URL"):
        if not os.environ.get(name):
            pytest.fail(f"{name} is not set: run the integration tier through `make test`, which starts the stack")
    return {**os.environ, "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", **extra}


def tapped(at: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at)
    return stamp


def service_day_start(now: datetime) -> datetime:
    """04:30 Asia/Taipei (20:30 UTC) of the service day that contains `now`."""
    start = now.replace(hour=20, minute=30, second=0, microsecond=0)
    return start if start <= now else start - timedelta(days=1)


@dataclass
class Rider:
    account_id: str
    card_uid: bytes
    funded_minor: int


@dataclass
class FareGateStack:
    wallet_app: Any
    fare_gate_app: Any
    wallet_schema: str
    fare_gate_schema: str
    dsn: str
    channel: grpc.Channel
    stub: fare_gate_pb2_grpc.FareGateServiceStub
    riders: list[Rider] = field(default_factory=list)

    @property
    def ledger(self) -> Any:
        return self.wallet_app.ledger

    @property
    def service(self) -> Any:
        return self.fare_gate_app.fare_gate

    @property
    def revenue_account(self) -> str:
        return self.ledger.system_account(AccountKind.OPERATOR_REVENUE)

    # --- riders -----------------------------------------------------------------------------

    def rider(self, funded_minor: int = 50_000, *, category: str = "") -> Rider:
        account_id = f"rider-{uuid.uuid4().hex[:12]}"
        self.ledger.create_account(CreateAccountRequest(account_id, AccountKind.RIDER_WALLET, "", category, None, ""))
        card_uid = os.urandom(7)
        self.ledger.link_card(account_id, card_uid)
        if funded_minor:
            self.ledger.credit_from_clearing(f"fund-{account_id}", account_id, funded_minor)
        rider = Rider(account_id, card_uid, funded_minor)
        self.riders.append(rider)
        return rider

    def block(self, rider: Rider) -> None:
        self.ledger.block_account(rider.account_id, BlockReason.STAFF_DECISION, "test")

    def balance(self, rider: Rider) -> tuple[int, int]:
        """(posted balance, held) of the rider's wallet."""
        account = self.ledger.get_balance(rider.account_id).account
        return account.balance_minor, account.pending_debits_minor

    # --- taps ---------------------------------------------------------------------------------

    def request(self, card_uid: bytes | None, gate_id: str, direction: int, at: datetime | None = None, *,
                stop_id: str = "", route_id: str = "", tap_id: str | None = None) -> fare_gate_pb2.TapRequest:
        request = fare_gate_pb2.TapRequest(
            tap_id=str(uuid.uuid4()) if tap_id is None else tap_id, gate_id=gate_id, stop_id=stop_id,
            direction=direction, route_id=route_id, tapped_at=tapped(at or datetime.now(timezone.utc)))
        if card_uid is not None:
            request.credential.CopyFrom(credential_pb2.Credential(card_uid=card_uid))
        return request

    def tap(self, rider: Rider | bytes, gate_id: str, direction: int, at: datetime | None = None, **kw: Any
            ) -> fare_gate_pb2.TapResponse:
        uid = rider.card_uid if isinstance(rider, Rider) else rider
        return self.stub.Tap(self.request(uid, gate_id, direction, at, **kw))

    def refused(self, request: Any, method: str = "Tap") -> tuple[grpc.StatusCode, str | None, str]:
        with pytest.raises(grpc.RpcError) as info:
            getattr(self.stub, method)(request)
        return info.value.code(), error_reason(info.value), info.value.details() or ""

    # --- the databases --------------------------------------------------------------------------

    def query(self, text: str, params: Any = None) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            return conn.execute(text.replace("{fg}", f'"{self.fare_gate_schema}"')
                                .replace("{w}", f'"{self.wallet_schema}"'), params).fetchall()

    def snapshot(self) -> dict[str, Any]:
        """Every row count and balance a refused tap must leave as it was."""
        counts = {f"fg.{t}": self.query(f"SELECT count(*) FROM {{fg}}.{t}")[0][0]
                  for t in ("taps", "journeys", "rider_fare_states", "outbox_events")}
        counts.update({f"w.{t}": self.query(f"SELECT count(*) FROM {{w}}.{t}")[0][0]
                       for t in ("transfers", "holds", "hold_resolutions")})
        balances = self.query("SELECT id, balance_minor, pending_debits_minor FROM {w}.accounts ORDER BY id")
        return {"counts": counts, "balances": balances}

    def event_types(self, account_id: str) -> list[str]:
        rows = self.query("SELECT event_type FROM {fg}.outbox_events WHERE key = %s ORDER BY seq", (account_id.encode(),))
        return [r[0].rsplit(".", 1)[1] for r in rows]


def open_fare_gate_stack(**fare_gate_env: str) -> FareGateStack:
    suffix = uuid.uuid4().hex[:8]
    wallet_schema, fare_gate_schema = f"wallet_fg_{suffix}", f"fare_gate_{suffix}"
    wallet_env = _env(CITYTAP_WALLET_SCHEMA=wallet_schema, CITYTAP_WALLET_WEBHOOK_LISTEN="127.0.0.1:0")
    wallet_env.setdefault("CITYTAP_WALLET_CARD_HASH_KEY", TEST_CARD_HASH_KEY.hex())
    wallet_env.setdefault("CITYTAP_STRIPE_WEBHOOK_SECRET", "whsec_fare_gate_tests_0123456789")
    wallet_env.setdefault("CITYTAP_WALLET_DEVICE_ISSUER_SEED", TEST_ISSUER_SEED.hex())
    wallet_app = build_wallet(load(WalletSettings, wallet_env))
    wallet_app.server.start()
    wallet_app.start()
    wallet_app.server.set_serving(True)
    env = _env(CITYTAP_FARE_GATE_SCHEMA=fare_gate_schema,
               CITYTAP_WALLET_ADDRESS=f"127.0.0.1:{wallet_app.server.port}",
               CITYTAP_FARE_GATE_DENY_LIST_KEY=deny_list_key(wallet_schema),
               CITYTAP_FARE_GATE_DEVICE_REVOCATIONS_KEY=revocation_set_key(wallet_schema),
               CITYTAP_FARE_GATE_TAP_AGE_S_MAX=str(TAP_AGE_S_MAX),
               CITYTAP_FARE_GATE_HOLD_GRACE_S=str(3 * 24 * 3600),
               # Generous on a shared, busy box: these tests are about decisions, not speed.
               CITYTAP_FARE_GATE_WALLET_TIMEOUT_MS="2000",
               CITYTAP_FARE_GATE_ACCOUNT_LOCK_TIMEOUT_MS="10000",
               # The tests run the incomplete-journey sweep themselves, when they mean to.
               CITYTAP_FARE_GATE_INCOMPLETE_SWEEP_INTERVAL_MS=str(3600 * 1000),
               **fare_gate_env)
    fare_gate_app = build_fare_gate(load(FareGateSettings, env))
    fare_gate_app.server.start()
    fare_gate_app.start()
    fare_gate_app.server.set_serving(True)
    channel = connect(f"127.0.0.1:{fare_gate_app.server.port}", default_timeout_s=10)
    return FareGateStack(wallet_app, fare_gate_app, wallet_schema, fare_gate_schema, env["CITYTAP_POSTGRES_DSN"],
                         channel, fare_gate_pb2_grpc.FareGateServiceStub(channel))


def close_fare_gate_stack(stack: FareGateStack) -> None:
    stack.channel.close()
    for app in (stack.fare_gate_app, stack.wallet_app):
        app.server.stop(0)
        app.close()
    with psycopg.connect(stack.dsn, autocommit=True) as conn:
        for schema in (stack.fare_gate_schema, stack.wallet_schema):
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(scope="module")
def stack() -> Iterator[FareGateStack]:
    opened = open_fare_gate_stack()
    yield opened
    close_fare_gate_stack(opened)
