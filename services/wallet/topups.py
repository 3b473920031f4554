"""Top-ups through Stripe: the use cases, their PostgreSQL state, and the wiring.

Money enters a rider wallet only one way: Stripe confirms a PaymentIntent, and the ledger
posts `Ledger.credit_from_clearing` (STRIPE_CLEARING -> rider wallet) under a transfer id
derived from the top-up id, so however many times Stripe tells us, the wallet is credited
once. Money leaves back to the card only after the ledger has taken it out of the wallet.
See TOPUPS.md for the design, the order of every step and why.

Use cases (methods of `TopUps`):

- `top_up`: validate, record the top-up PENDING, create the PaymentIntent (the Stripe
  idempotency key is derived from the top-up id), store its id, return the client secret.
- `handle_webhook`: verify, dedupe on the Stripe event id, then credit on
  payment_intent.succeeded, mark FAILED on payment_intent.payment_failed / canceled, and
  give the money back to the wallet when Stripe reports a refund failed.
- `refund_top_up`: reserve the amount on the top-up, debit the wallet to STRIPE_CLEARING,
  then refund through Stripe; if Stripe refuses, a correcting transfer puts it back.
- `configure_auto_reload` / `disable_auto_reload` / `get_auto_reload` (Python only: no RPC
  exists yet), and `run_auto_reload(stop)`, the worker that charges saved cards off-session
  at most once per rider per service day and finishes whatever a crash or an outage left
  half-done (unsent auto-reload charges, refunds, over-limit refunds).

The composition root calls `wire_top_ups(app, ledger, settings)`; the servicer delegates
TopUp and RefundTopUp to `top_up_rpc` / `refund_top_up_rpc` (or mixes in `TopUpRpcs`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import random
import re
import threading
import time as _time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import grpc
import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from citytap.wallet.v1 import events_pb2, wallet_pb2
from libs import errors, outbox
from libs.postgres import create_pool
from services.wallet import convert
from services.wallet.domain import (
    ID_PATTERN,
    AccountKind,
    AccountStatus,
    TransferKind,
    TransferRequest,
    check_amount,
    check_currency,
    check_id,
    check_text,
)
from services.wallet.ledger import TOPIC, Ledger, utc_now
from services.wallet.stripe_gateway import (
    WEBHOOK_TOLERANCE_S_DEFAULT,
    PaymentIntent,
    Refund,
    StripeFailure,
    StripeGateway,
    StripeRefused,
    StripeUnavailable,
    WebhookEvent,
    WebhookRejected,
    to_stripe_amount,
)
from services.wallet.webhooks import WebhookResponse, WebhookServer

log = logging.getLogger("citytap.wallet.top_ups")

T = TypeVar("T")

# Client ids of top-ups and refunds leave room for the 4-character prefixes of the ledger
# transfer ids derived from them (transfer ids are at most 64 characters).
CLIENT_ID_CHARS_MAX = 60
NOTE_CHARS_MAX = 500
CREDIT_PREFIX = "tu:"        # the credit of top-up X is transfer "tu:X"
REFUND_PREFIX = "tur:"       # the debit of refund R is transfer "tur:R"
REVERSAL_PREFIX = "tuc:"     # the correction that undoes refund R (Stripe refused it) is "tuc:R"
AUTO_RELOAD_PREFIX = "ar-"   # auto-reload top-up ids: "ar-" + 40 hex digits
# Stripe idempotency keys: distinct namespaces so a top-up id and a refund id never collide.
STRIPE_KEY_TOP_UP = "citytap:top-up:"
STRIPE_KEY_REFUND = "citytap:top-up-refund:"
STRIPE_KEY_OVER_LIMIT = "citytap:top-up-over-limit:"
# Stripe keeps idempotency keys for 24 hours: an auto-reload charge whose outcome we never
# learned is re-sent (same key) only within this window, after that it is given up.
STRIPE_KEY_REPLAY_S = 23 * 3600

TX_ATTEMPTS_MAX = 4
TX_RETRY_BACKOFF_S_MAX = 0.05
REFUND_STEPS_MAX = 8
AUTO_RELOAD_PAGES_PER_PASS_MAX = 20
RESUME_BATCH_MAX = 50
WORKER_BACKOFF_S_MAX = 60.0

_CUSTOMER_ID = re.compile(r"^cus_[A-Za-z0-9_]{1,200}$")
_PAYMENT_METHOD_ID = re.compile(r"^(pm|card|src)_[A-Za-z0-9_]{1,200}$")


# --- configuration ----------------------------------------------------------------------


@dataclass(frozen=True)
class TopUpConfig:
    """Everything the top-up flow needs besides the ledger (which brings the currency and the
    stored-value limit). Built by `top_up_config(settings)`; tests build it directly."""

    webhook_secret: str = field(repr=False)
    webhook_listen: str = "127.0.0.1:0"
    top_up_min_minor: int = 10_000          # NT$100
    top_up_max_minor: int = 500_000         # NT$5,000
    pending_ttl_s: int = 3600               # how long an unpaid top-up counts against the stored-value limit
    auto_reload_interval_s: float = 60.0
    service_day_timezone: str = "Asia/Taipei"
    service_day_start: time = time(4, 30)
    webhook_tolerance_s: int = WEBHOOK_TOLERANCE_S_DEFAULT
    webhook_concurrency_max: int = 4
    webhook_body_bytes_max: int = 256 * 1024
    auto_reload_batch_max: int = 100
    resume_after_s: int = 60                # a refund or charge untouched this long is finished by the worker
    stripe_timeout_s: float = 10.0
    stripe_max_network_retries: int = 2

    def __post_init__(self) -> None:
        if not 0 < self.top_up_min_minor <= self.top_up_max_minor:
            raise ValueError("top-up limits must satisfy 0 < min <= max")
        if self.pending_ttl_s <= 0 or self.auto_reload_interval_s <= 0 or self.resume_after_s <= 0:
            raise ValueError("pending_ttl_s, auto_reload_interval_s and resume_after_s must be positive")
        if not 1 <= self.webhook_concurrency_max <= 64:
            raise ValueError("webhook_concurrency_max must be in 1..64")
        if not 1024 <= self.webhook_body_bytes_max <= 16 * 1024 * 1024:
            raise ValueError("webhook_body_bytes_max must be in 1 KiB..16 MiB")
        if not 1 <= self.auto_reload_batch_max <= 1000:
            raise ValueError("auto_reload_batch_max must be in 1..1000")
        ZoneInfo(self.service_day_timezone)  # raises for an unknown zone

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.service_day_timezone)


def top_up_config(settings: Any) -> TopUpConfig:
    """The TopUpConfig of the wallet's Settings (field names as listed in TOPUPS.md; optional
    ones fall back to the defaults above)."""
    values: dict[str, Any] = {"webhook_secret": str(settings.stripe_webhook_secret)}
    optional = {
        "webhook_listen": "webhook_listen",
        "top_up_min_minor": "top_up_min_minor",
        "top_up_max_minor": "top_up_max_minor",
        "pending_ttl_s": "top_up_pending_ttl_s",
        "auto_reload_interval_s": "auto_reload_interval_s",
        "service_day_timezone": "service_day_timezone",
        "service_day_start": "service_day_start",
        "stripe_max_network_retries": "stripe_max_network_retries",
    }
    for name, attribute in optional.items():
        if hasattr(settings, attribute):
            values[name] = getattr(settings, attribute)
    if hasattr(settings, "stripe_timeout_ms"):
        values["stripe_timeout_s"] = settings.stripe_timeout_ms / 1000
    return TopUpConfig(**values)


# Parsers for the wallet's settings module (pure: they read no environment).


class WebhookSecret(str):
    """A webhook signing secret that never prints."""

    def __repr__(self) -> str:
        return "WebhookSecret(<hidden>)"


def webhook_secret(text: str) -> WebhookSecret:
    """A Stripe webhook signing secret, `whsec_...`."""
    value = text.strip()
    if not value.startswith("whsec_") or len(value) < 16:
        raise ValueError("expected the endpoint's signing secret, whsec_ followed by at least 10 characters")
    return WebhookSecret(value)


def service_day(moment: datetime, zone: ZoneInfo, start: time) -> date:
    """The service day `moment` belongs to: named after the local date it starts on, so with
    a 04:30 start, 01:00 on the 2nd belongs to the day of the 1st."""
    if moment.tzinfo is None:
        raise ValueError("service_day needs an aware datetime")
    local = moment.astimezone(zone)
    day = local.date()
    if local.time() < start:
        day -= timedelta(days=1)
    return day


# --- records ------------------------------------------------------------------------------


class TopUpStatus(enum.Enum):
    PENDING = "PENDING"                      # waiting for the rider (or Stripe) to pay
    SUCCEEDED = "SUCCEEDED"                  # paid and credited
    FAILED = "FAILED"                        # not paid (yet: a PaymentIntent may still be retried by the app)
    OVER_LIMIT = "OVER_LIMIT"                # paid, but crediting would pass the stored-value limit: refunding to the card
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"


class TopUpOrigin(enum.Enum):
    RIDER = "RIDER"
    AUTO_RELOAD = "AUTO_RELOAD"


class RefundState(enum.Enum):
    RESERVED = "RESERVED"      # counted against the top-up; nothing moved yet
    DEBITING = "DEBITING"      # balance checked; the ledger debit is being posted
    DEBITED = "DEBITED"        # the wallet was debited to STRIPE_CLEARING; Stripe refund not confirmed yet
    REVERSING = "REVERSING"    # Stripe refused or failed the refund; the amount is being put back
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"          # nothing left the wallet in the end


_CREDITED = (TopUpStatus.SUCCEEDED, TopUpStatus.PARTIALLY_REFUNDED, TopUpStatus.REFUNDED)
_REFUND_OPEN = (RefundState.RESERVED, RefundState.DEBITING, RefundState.DEBITED, RefundState.REVERSING)


@dataclass(frozen=True)
class TopUp:
    top_up_id: str
    account_id: str
    amount_minor: int
    currency: str
    origin: TopUpOrigin
    status: TopUpStatus
    request_hash: bytes
    payment_intent_id: str | None
    client_secret: str | None = field(repr=False)
    stripe_customer_id: str | None
    stripe_payment_method_id: str | None
    transfer_id: str | None
    refunded_amount_minor: int
    failure_code: str
    created_at: datetime
    updated_at: datetime

    @property
    def credited(self) -> bool:
        return self.transfer_id is not None


@dataclass(frozen=True)
class TopUpRefund:
    refund_id: str
    top_up_id: str
    account_id: str
    amount_minor: int
    currency: str
    state: RefundState
    request_hash: bytes
    note: str
    debit_transfer_id: str | None
    reversal_transfer_id: str | None
    stripe_refund_id: str | None
    failure_reason: str
    failure_code: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class AutoReload:
    account_id: str
    threshold_minor: int
    amount_minor: int
    currency: str
    stripe_customer_id: str
    stripe_payment_method_id: str
    enabled: bool
    updated_at: datetime


@dataclass(frozen=True)
class MaintenanceReport:
    """What one pass of the auto-reload worker did."""

    auto_reloads_started: int = 0
    charges_resumed: int = 0
    refunds_resumed: int = 0
    over_limit_refunded: int = 0


def credit_transfer_id(top_up_id: str) -> str:
    return CREDIT_PREFIX + top_up_id


def refund_transfer_id(refund_id: str) -> str:
    return REFUND_PREFIX + refund_id


def reversal_transfer_id(refund_id: str) -> str:
    return REVERSAL_PREFIX + refund_id


def auto_reload_top_up_id(account_id: str, day: date) -> str:
    """Deterministic, so a crash between deciding and charging resumes the same top-up."""
    return AUTO_RELOAD_PREFIX + hashlib.sha256(f"{account_id}|{day.isoformat()}".encode()).hexdigest()[:40]


def _fingerprint(tag: str, values: Sequence[object]) -> bytes:
    return hashlib.sha256(json.dumps([tag, *values], separators=(",", ":")).encode()).digest()


def check_client_id(value: object, field_name: str) -> str:
    check_id(value, field_name)
    assert isinstance(value, str)
    if len(value) > CLIENT_ID_CHARS_MAX:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} must be at most {CLIENT_ID_CHARS_MAX} characters",
                                     field=field_name)
    return value


# --- PostgreSQL -----------------------------------------------------------------------------

_SCHEMA = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_TOP_UP_COLUMNS = (
    "id AS top_up_id, account_id, amount_minor, currency, origin, status, request_hash, payment_intent_id,"
    " client_secret, stripe_customer_id, stripe_payment_method_id, transfer_id, refunded_amount_minor, failure_code,"
    " created_at, updated_at"
)
_REFUND_COLUMNS = (
    "r.id AS refund_id, r.top_up_id, t.account_id, r.amount_minor, r.currency, r.state, r.request_hash, r.note,"
    " r.debit_transfer_id, r.reversal_transfer_id, r.stripe_refund_id, r.failure_reason, r.failure_code, r.created_at,"
    " r.updated_at"
)
_AUTO_RELOAD_COLUMNS = (
    "r.account_id, r.threshold_minor, r.amount_minor, r.currency, r.stripe_customer_id, r.stripe_payment_method_id,"
    " r.enabled, r.updated_at"
)


def _top_up(row: dict[str, Any] | None) -> TopUp | None:
    if row is None:
        return None
    row = dict(row, origin=TopUpOrigin(row["origin"]), status=TopUpStatus(row["status"]),
               request_hash=bytes(row["request_hash"]))
    return TopUp(**row)


def _refund(row: dict[str, Any] | None) -> TopUpRefund | None:
    if row is None:
        return None
    return TopUpRefund(**dict(row, state=RefundState(row["state"]), request_hash=bytes(row["request_hash"])))


def _auto_reload(row: dict[str, Any] | None) -> AutoReload | None:
    return AutoReload(**row) if row is not None else None


class _Store:
    """Every SQL statement of the top-up flow (tables of migrations/050_top_ups.sql)."""

    def __init__(self, schema: str) -> None:
        if not _SCHEMA.match(schema):
            raise ValueError(f"bad schema name {schema!r}")
        self._s = f'"{schema}"'

    def _q(self, text: str) -> str:
        return text.replace("{s}", self._s)

    def _one(self, conn: psycopg.Connection, query: str, params: Sequence[object]) -> dict[str, Any] | None:
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(self._q(query), params).fetchone()

    def _all(self, conn: psycopg.Connection, query: str, params: Sequence[object]) -> list[dict[str, Any]]:
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(self._q(query), params).fetchall()

    # top-ups

    def get_top_up(self, conn: psycopg.Connection, top_up_id: str, *, lock: bool = False) -> TopUp | None:
        return _top_up(self._one(conn, f"SELECT {_TOP_UP_COLUMNS} FROM {{s}}.top_ups WHERE id = %s"
                                       + (" FOR UPDATE" if lock else ""), (top_up_id,)))

    def get_top_up_by_intent(self, conn: psycopg.Connection, payment_intent_id: str, *, lock: bool = False) -> TopUp | None:
        return _top_up(self._one(conn, f"SELECT {_TOP_UP_COLUMNS} FROM {{s}}.top_ups WHERE payment_intent_id = %s"
                                       + (" FOR UPDATE" if lock else ""), (payment_intent_id,)))

    def insert_top_up(self, conn: psycopg.Connection, *, top_up_id: str, account_id: str, amount_minor: int,
                      currency: str, origin: TopUpOrigin, request_hash: bytes, now: datetime,
                      customer_id: str | None = None, payment_method_id: str | None = None) -> TopUp | None:
        return _top_up(self._one(conn, (
            "INSERT INTO {s}.top_ups (id, account_id, amount_minor, currency, origin, status, request_hash,"
            " stripe_customer_id, stripe_payment_method_id, created_at, updated_at)"
            " VALUES (%s, %s, %s, %s, %s, 'PENDING', %s, %s, %s, %s, %s)"
            f" ON CONFLICT (id) DO NOTHING RETURNING {_TOP_UP_COLUMNS}"),
            (top_up_id, account_id, amount_minor, currency, origin.value, request_hash, customer_id, payment_method_id,
             now, now)))

    def pending_sum(self, conn: psycopg.Connection, account_id: str, since: datetime) -> int:
        row = self._one(conn, "SELECT coalesce(sum(amount_minor), 0) AS total FROM {s}.top_ups"
                              " WHERE account_id = %s AND status = 'PENDING' AND created_at > %s", (account_id, since))
        return int(row["total"]) if row else 0

    def set_intent(self, conn: psycopg.Connection, top_up_id: str, intent: PaymentIntent, keep_secret: bool,
                   now: datetime) -> None:
        conn.execute(self._q(
            "UPDATE {s}.top_ups SET payment_intent_id = %s, client_secret = %s, updated_at = %s"
            " WHERE id = %s AND payment_intent_id IS NULL"),
            (intent.payment_intent_id, intent.client_secret if keep_secret else None, now, top_up_id))

    def _transition(self, conn: psycopg.Connection, top_up_id: str, from_statuses: Collection[TopUpStatus],
                    assignments: str, params: Sequence[object], now: datetime) -> TopUp | None:
        return _top_up(self._one(conn, (
            f"UPDATE {{s}}.top_ups SET {assignments}, updated_at = %s WHERE id = %s AND status = ANY(%s)"
            f" RETURNING {_TOP_UP_COLUMNS}"),
            (*params, now, top_up_id, [s.value for s in from_statuses])))

    def mark_failed(self, conn: psycopg.Connection, top_up_id: str, code: str, now: datetime) -> TopUp | None:
        return self._transition(conn, top_up_id, [TopUpStatus.PENDING], "status = 'FAILED', failure_code = %s",
                                (code[:100],), now)

    def mark_succeeded(self, conn: psycopg.Connection, top_up_id: str, transfer_id: str, payment_intent_id: str,
                       now: datetime) -> TopUp | None:
        return self._transition(
            conn, top_up_id, [TopUpStatus.PENDING, TopUpStatus.FAILED],
            "status = 'SUCCEEDED', transfer_id = %s, payment_intent_id = coalesce(payment_intent_id, %s),"
            " failure_code = ''", (transfer_id, payment_intent_id), now)

    def mark_over_limit(self, conn: psycopg.Connection, top_up_id: str, payment_intent_id: str,
                        now: datetime) -> TopUp | None:
        return self._transition(
            conn, top_up_id, [TopUpStatus.PENDING, TopUpStatus.FAILED],
            "status = 'OVER_LIMIT', payment_intent_id = coalesce(payment_intent_id, %s), failure_code = 'STORED_VALUE_LIMIT'",
            (payment_intent_id,), now)

    def mark_over_limit_refunded(self, conn: psycopg.Connection, top_up_id: str, now: datetime) -> TopUp | None:
        return self._transition(conn, top_up_id, [TopUpStatus.OVER_LIMIT],
                                "status = 'REFUNDED', refunded_amount_minor = amount_minor", (), now)

    def add_refunded(self, conn: psycopg.Connection, top_up_id: str, delta_minor: int, now: datetime) -> TopUp | None:
        """Move the refunded sum by `delta_minor` (negative when a refund failed later) and
        derive the status from it."""
        return _top_up(self._one(conn, (
            "UPDATE {s}.top_ups SET refunded_amount_minor = refunded_amount_minor + %s,"
            " status = CASE WHEN refunded_amount_minor + %s = amount_minor THEN 'REFUNDED'"
            "               WHEN refunded_amount_minor + %s > 0 THEN 'PARTIALLY_REFUNDED' ELSE 'SUCCEEDED' END,"
            " updated_at = %s WHERE id = %s AND transfer_id IS NOT NULL"
            f" RETURNING {_TOP_UP_COLUMNS}"), (delta_minor, delta_minor, delta_minor, now, top_up_id)))

    def unsent_auto_reloads(self, conn: psycopg.Connection, *, created_after: datetime, created_before: datetime,
                            limit: int) -> list[TopUp]:
        return [t for t in (_top_up(r) for r in self._all(conn, (
            f"SELECT {_TOP_UP_COLUMNS} FROM {{s}}.top_ups WHERE status = 'PENDING' AND payment_intent_id IS NULL"
            " AND origin = 'AUTO_RELOAD' AND created_at > %s AND created_at <= %s ORDER BY created_at LIMIT %s"),
            (created_after, created_before, limit))) if t is not None]

    def expire_unsent_auto_reloads(self, conn: psycopg.Connection, *, created_before: datetime, now: datetime) -> int:
        cur = conn.execute(self._q(
            "UPDATE {s}.top_ups SET status = 'FAILED', failure_code = 'NOT_SENT', updated_at = %s"
            " WHERE status = 'PENDING' AND payment_intent_id IS NULL AND origin = 'AUTO_RELOAD' AND created_at <= %s"),
            (now, created_before))
        return cur.rowcount

    def over_limit_top_ups(self, conn: psycopg.Connection, *, updated_before: datetime, limit: int) -> list[TopUp]:
        return [t for t in (_top_up(r) for r in self._all(conn, (
            f"SELECT {_TOP_UP_COLUMNS} FROM {{s}}.top_ups WHERE status = 'OVER_LIMIT' AND updated_at <= %s"
            " ORDER BY updated_at LIMIT %s"), (updated_before, limit))) if t is not None]

    # webhook events

    def event_seen(self, conn: psycopg.Connection, event_id: str) -> bool:
        return self._one(conn, "SELECT 1 AS seen FROM {s}.stripe_webhook_events WHERE event_id = %s", (event_id,)) is not None

    def record_event(self, conn: psycopg.Connection, event: WebhookEvent | None, outcome: str,
                     top_up_id: str | None, now: datetime) -> None:
        if event is None:
            return
        conn.execute(self._q(
            "INSERT INTO {s}.stripe_webhook_events (event_id, event_type, object_id, top_up_id, outcome, received_at)"
            " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING"),
            (event.event_id, event.event_type[:100], event.object_id[:255], top_up_id, outcome, now))

    # refunds

    def get_refund(self, conn: psycopg.Connection, refund_id: str, *, lock: bool = False) -> TopUpRefund | None:
        return _refund(self._one(conn, (
            f"SELECT {_REFUND_COLUMNS} FROM {{s}}.top_up_refunds r JOIN {{s}}.top_ups t ON t.id = r.top_up_id"
            " WHERE r.id = %s") + (" FOR UPDATE OF r" if lock else ""), (refund_id,)))

    def get_refund_by_stripe_id(self, conn: psycopg.Connection, stripe_refund_id: str) -> TopUpRefund | None:
        return _refund(self._one(conn, (
            f"SELECT {_REFUND_COLUMNS} FROM {{s}}.top_up_refunds r JOIN {{s}}.top_ups t ON t.id = r.top_up_id"
            " WHERE r.stripe_refund_id = %s"), (stripe_refund_id,)))

    def reserved_refund_sum(self, conn: psycopg.Connection, top_up_id: str) -> int:
        row = self._one(conn, "SELECT coalesce(sum(amount_minor), 0) AS total FROM {s}.top_up_refunds"
                              " WHERE top_up_id = %s AND state <> 'FAILED'", (top_up_id,))
        return int(row["total"]) if row else 0

    def insert_refund(self, conn: psycopg.Connection, *, refund_id: str, top_up_id: str, amount_minor: int,
                      currency: str, request_hash: bytes, note: str, now: datetime) -> None:
        conn.execute(self._q(
            "INSERT INTO {s}.top_up_refunds (id, top_up_id, amount_minor, currency, state, request_hash, note,"
            " created_at, updated_at) VALUES (%s, %s, %s, %s, 'RESERVED', %s, %s, %s, %s)"),
            (refund_id, top_up_id, amount_minor, currency, request_hash, note, now, now))

    def move_refund(self, conn: psycopg.Connection, refund_id: str, from_state: RefundState, to_state: RefundState,
                    now: datetime, **values: object) -> bool:
        """Move a refund from `from_state` to `to_state` (setting `values`); False when another
        worker moved it first."""
        allowed = {"debit_transfer_id", "reversal_transfer_id", "stripe_refund_id", "failure_reason", "failure_code"}
        if not set(values) <= allowed:
            raise ValueError(f"unknown refund columns {set(values) - allowed}")
        assignments = "".join(f", {name} = %s" for name in values)
        cur = conn.execute(self._q(
            f"UPDATE {{s}}.top_up_refunds SET state = %s, updated_at = %s{assignments} WHERE id = %s AND state = %s"),
            (to_state.value, now, *values.values(), refund_id, from_state.value))
        return cur.rowcount == 1

    def open_refunds(self, conn: psycopg.Connection, *, updated_before: datetime, limit: int) -> list[str]:
        return [r["id"] for r in self._all(conn, (
            "SELECT id FROM {s}.top_up_refunds WHERE state = ANY(%s) AND updated_at <= %s ORDER BY updated_at LIMIT %s"),
            ([s.value for s in _REFUND_OPEN], updated_before, limit))]

    # auto-reload

    def upsert_auto_reload(self, conn: psycopg.Connection, reload: AutoReload) -> AutoReload:
        row = self._one(conn, (
            "INSERT INTO {s}.auto_reloads AS r (account_id, threshold_minor, amount_minor, currency, stripe_customer_id,"
            " stripe_payment_method_id, enabled, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (account_id) DO UPDATE SET threshold_minor = excluded.threshold_minor,"
            " amount_minor = excluded.amount_minor, currency = excluded.currency,"
            " stripe_customer_id = excluded.stripe_customer_id,"
            " stripe_payment_method_id = excluded.stripe_payment_method_id, enabled = excluded.enabled,"
            f" updated_at = excluded.updated_at RETURNING {_AUTO_RELOAD_COLUMNS}"),
            (reload.account_id, reload.threshold_minor, reload.amount_minor, reload.currency,
             reload.stripe_customer_id, reload.stripe_payment_method_id, reload.enabled, reload.updated_at))
        result = _auto_reload(row)
        assert result is not None
        return result

    def get_auto_reload(self, conn: psycopg.Connection, account_id: str) -> AutoReload | None:
        return _auto_reload(self._one(conn, f"SELECT {_AUTO_RELOAD_COLUMNS} FROM {{s}}.auto_reloads r"
                                            " WHERE r.account_id = %s", (account_id,)))

    def disable_auto_reload(self, conn: psycopg.Connection, account_id: str, now: datetime) -> AutoReload | None:
        return _auto_reload(self._one(conn, (
            "UPDATE {s}.auto_reloads r SET enabled = false, updated_at = %s WHERE account_id = %s"
            f" RETURNING {_AUTO_RELOAD_COLUMNS}"), (now, account_id)))

    def auto_reload_candidates(self, conn: psycopg.Connection, day: date, after_account_id: str,
                               limit: int) -> list[AutoReload]:
        """Enabled auto-reloads of active riders whose available balance is below their
        threshold and who have not been reloaded this service day. A pre-filter: each one is
        re-checked through the ledger before it is charged."""
        return [a for a in (_auto_reload(r) for r in self._all(conn, (
            f"SELECT {_AUTO_RELOAD_COLUMNS} FROM {{s}}.auto_reloads r JOIN {{s}}.accounts a ON a.id = r.account_id"
            " WHERE r.enabled AND r.account_id > %s AND a.status = 'ACTIVE'"
            " AND a.balance_minor - a.pending_debits_minor < r.threshold_minor"
            " AND NOT EXISTS (SELECT 1 FROM {s}.auto_reload_runs x WHERE x.account_id = r.account_id"
            "                 AND x.service_day = %s)"
            " ORDER BY r.account_id LIMIT %s"), (after_account_id, day, limit))) if a is not None]

    def run_exists(self, conn: psycopg.Connection, account_id: str, day: date) -> bool:
        return self._one(conn, "SELECT 1 AS found FROM {s}.auto_reload_runs WHERE account_id = %s AND service_day = %s",
                         (account_id, day)) is not None

    def insert_run(self, conn: psycopg.Connection, account_id: str, day: date, top_up_id: str, now: datetime) -> None:
        conn.execute(self._q(
            "INSERT INTO {s}.auto_reload_runs (account_id, service_day, top_up_id, created_at) VALUES (%s, %s, %s, %s)"),
            (account_id, day, top_up_id, now))


# --- the service ----------------------------------------------------------------------------


def _payment_failed(code: str, request_id: str = "") -> errors.FailedPrecondition:
    meta = {"stripe_code": code or "unknown"}
    if request_id:
        meta["stripe_request_id"] = request_id
    return errors.FailedPrecondition("PAYMENT_FAILED", f"Stripe refused the payment ({code or 'no code'})", **meta)


def _stripe_unavailable(exc: StripeFailure, what: str) -> errors.Unavailable:
    meta = {"stripe_request_id": exc.request_id} if exc.request_id else {}
    return errors.Unavailable("UNAVAILABLE", f"Stripe is unreachable; retry {what} with the same id", **meta)


class TopUps:
    """The top-up use cases over the wallet's schema, its ledger and a Stripe gateway.

    `pool` should be the top-up flow's own pool (see `wire_top_ups`): a webhook holds one of
    its connections (the top-up row lock) while the ledger posts through the ledger's pool.
    """

    def __init__(self, pool: ConnectionPool, *, ledger: Ledger, gateway: StripeGateway, config: TopUpConfig,
                 clock: Callable[[], datetime] = utc_now, topic: str = TOPIC) -> None:
        self._pool = pool
        self._ledger = ledger
        self._gateway = gateway
        self.config = config
        self._clock = clock
        self._topic = topic
        self.schema = ledger.schema
        self.currency = ledger.config.currency
        self.stored_value_max_minor = ledger.config.stored_value_max_minor
        self._store = _Store(self.schema)
        self.webhook_port: int | None = None  # set by wire_top_ups once the endpoint is bound

    # --- plumbing ---------------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the clock must return aware datetimes")
        return now

    def _tx(self, work: Callable[[psycopg.Connection], T], *, retry_unique: Collection[str] = ()) -> T:
        for attempt in range(1, TX_ATTEMPTS_MAX + 1):
            try:
                with self._pool.connection() as conn, conn.transaction():
                    return work(conn)
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                if attempt == TX_ATTEMPTS_MAX:
                    raise errors.Unavailable("UNAVAILABLE", "the wallet is busy; retry with the same ids") from exc
                _time.sleep(random.uniform(0, TX_RETRY_BACKOFF_S_MAX))
            except pg_errors.UniqueViolation as exc:
                if exc.diag.constraint_name in retry_unique and attempt < TX_ATTEMPTS_MAX:
                    continue  # a concurrent request inserted the same id: answer through the replay path
                raise
            except PoolTimeout as exc:
                raise errors.Unavailable("UNAVAILABLE", "no database connection is free; retry") from exc
            except psycopg.OperationalError as exc:
                raise errors.Unavailable("UNAVAILABLE", "the database is unreachable; retry with the same ids") from exc
        raise AssertionError("unreachable")

    def _lock_account(self, conn: psycopg.Connection, account_id: str) -> None:
        """Serialize the stored-value checks of one account's new top-ups (transaction-scoped)."""
        digest = hashlib.sha256(f"citytap.wallet.top-up.{self.schema}.{account_id}".encode()).digest()
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (int.from_bytes(digest[:8], "big", signed=True),))

    def _emit(self, conn: psycopg.Connection, account_id: str, at: datetime, **payload: Any) -> None:
        outbox.enqueue(conn, self.schema, self._topic, convert.wallet_event(account_id, at, **payload))

    def _check_money(self, amount_minor: object, currency: object) -> tuple[int, str]:
        amount = check_amount(amount_minor, "amount")
        code = check_currency(currency, "amount.currency")
        if code != self.currency:
            raise errors.InvalidArgument("INVALID_CURRENCY", f"this wallet takes top-ups in {self.currency}",
                                         field="amount.currency")
        to_stripe_amount(amount, code)  # refuses amounts Stripe could not take exactly (TWD cents)
        return amount, code

    def _check_top_up_amount(self, amount_minor: int) -> None:
        if amount_minor < self.config.top_up_min_minor:
            raise errors.InvalidArgument("INVALID_AMOUNT", f"a top-up is at least {self.config.top_up_min_minor} minor units",
                                         field="amount", min_minor=str(self.config.top_up_min_minor))
        if amount_minor > self.config.top_up_max_minor:
            raise errors.LimitExceeded("LIMIT_EXCEEDED", f"a top-up is at most {self.config.top_up_max_minor} minor units",
                                       field="amount", limit="top_up", limit_minor=str(self.config.top_up_max_minor))

    def _rider(self, account_id: str) -> Any:
        """The rider account, through the ledger (UNKNOWN_ACCOUNT if missing)."""
        account = self._ledger.get_balance(account_id).account
        if account.kind is not AccountKind.RIDER_WALLET:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "top-ups credit rider wallets only", field="account_id")
        return account

    def _headroom(self, conn: psycopg.Connection, account: Any, now: datetime) -> int:
        """How much more may be topped up: the stored-value limit minus the balance, the
        pending credits, and the top-ups started within `pending_ttl_s` and not yet paid."""
        pending = self._store.pending_sum(conn, account.account_id, now - timedelta(seconds=self.config.pending_ttl_s))
        return self.stored_value_max_minor - (account.balance_minor + account.pending_credits_minor + pending)

    # --- TopUp ----------------------------------------------------------------------------

    def top_up(self, top_up_id: str, account_id: str, amount_minor: int, currency: str) -> TopUp:
        """Start a top-up; the returned TopUp carries the PaymentIntent's client secret.
        The same id and payload returns the same top-up; another payload is a conflict."""
        check_client_id(top_up_id, "top_up_id")
        if top_up_id.startswith(AUTO_RELOAD_PREFIX):
            raise errors.InvalidArgument("INVALID_ARGUMENT", f"top-up ids starting with {AUTO_RELOAD_PREFIX!r} are "
                                         "reserved for auto-reload", field="top_up_id")
        check_id(account_id, "account_id")
        amount, code = self._check_money(amount_minor, currency)
        self._check_top_up_amount(amount)
        fingerprint = _fingerprint("top-up.v1", [account_id, amount, code])

        def work(conn: psycopg.Connection) -> TopUp:
            existing = self._store.get_top_up(conn, top_up_id)
            if existing is not None:
                return self._replay(existing, fingerprint)
            self._lock_account(conn, account_id)
            now = self._now()
            account = self._rider(account_id)
            headroom = self._headroom(conn, account, now)
            if amount > headroom:
                raise errors.LimitExceeded(
                    "LIMIT_EXCEEDED", f"a wallet holds at most {self.stored_value_max_minor} minor units, counting "
                                      f"top-ups in progress; at most {max(headroom, 0)} more can be added",
                    field="amount", limit="stored_value", limit_minor=str(self.stored_value_max_minor),
                    headroom_minor=str(max(headroom, 0)), account_id=account_id)
            row = self._store.insert_top_up(conn, top_up_id=top_up_id, account_id=account_id, amount_minor=amount,
                                            currency=code, origin=TopUpOrigin.RIDER, request_hash=fingerprint, now=now)
            if row is None:  # a concurrent request won the insert
                raced = self._store.get_top_up(conn, top_up_id)
                assert raced is not None
                return self._replay(raced, fingerprint)
            return row

        row = self._tx(work, retry_unique={"top_ups_pkey"})
        return self._ensure_payment_intent(row)[0]

    @staticmethod
    def _replay(existing: TopUp, fingerprint: bytes) -> TopUp:
        if existing.request_hash != fingerprint:
            raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"top-up {existing.top_up_id} exists with a different payload",
                                  top_up_id=existing.top_up_id)
        return existing

    def get_top_up(self, top_up_id: str) -> TopUp:
        check_client_id(top_up_id, "top_up_id")
        row = self._tx(lambda conn: self._store.get_top_up(conn, top_up_id))
        if row is None:
            raise errors.NotFound("NOT_FOUND", f"no top-up {top_up_id}", resource="top_up", top_up_id=top_up_id)
        return row

    def _ensure_payment_intent(self, row: TopUp) -> tuple[TopUp, PaymentIntent | None]:
        """Create the top-up's PaymentIntent unless it has one. Stripe unreachable: the top-up
        stays PENDING without one, and a retry (same id) sends the same request again.
        Stripe refuses: the top-up is FAILED and nothing was charged."""
        if row.payment_intent_id is not None or row.status is not TopUpStatus.PENDING:
            if row.status is TopUpStatus.FAILED and row.payment_intent_id is None:
                raise _payment_failed(row.failure_code)
            return row, None
        off_session = row.origin is TopUpOrigin.AUTO_RELOAD
        try:
            intent = self._gateway.create_payment_intent(
                amount_minor=row.amount_minor, currency=row.currency, idempotency_key=STRIPE_KEY_TOP_UP + row.top_up_id,
                metadata={"top_up_id": row.top_up_id, "account_id": row.account_id, "origin": row.origin.value},
                description="CityTap top-up", customer_id=row.stripe_customer_id,
                payment_method_id=row.stripe_payment_method_id, off_session=off_session)
        except StripeUnavailable as exc:
            log.warning("payment intent not created; the top-up stays pending",
                        extra={"fields": {"top_up_id": row.top_up_id, "error": str(exc)}})
            raise _stripe_unavailable(exc, "the top-up") from exc
        except StripeRefused as exc:
            code = exc.decline_code or exc.code
            self._tx(lambda conn: self._store.mark_failed(conn, row.top_up_id, code, self._now()))
            log.info("payment intent refused", extra={"fields": {"top_up_id": row.top_up_id, "code": code,
                                                                 "stripe_request_id": exc.request_id}})
            raise _payment_failed(code, exc.request_id) from exc

        def store(conn: psycopg.Connection) -> TopUp:
            self._store.set_intent(conn, row.top_up_id, intent, not off_session, self._now())
            stored = self._store.get_top_up(conn, row.top_up_id)
            assert stored is not None
            return stored

        return self._tx(store), intent

    # --- webhooks -------------------------------------------------------------------------

    def handle_webhook(self, payload: bytes, signature_header: str | None) -> WebhookResponse:
        """The webhook endpoint's whole job: verify, dedupe, dispatch. Returns the HTTP status
        and a short outcome; 5xx only when a retry by Stripe can help."""
        try:
            event = self._gateway.verify_event(payload, signature_header)
        except WebhookRejected as exc:
            log.warning("webhook rejected", extra={"fields": {"reason": exc.reason, "detail": exc.message}})
            return WebhookResponse(400, exc.reason)
        try:
            if event.livemode != self._gateway.livemode:
                log.warning("webhook from the other Stripe mode ignored", extra={"fields": {"event_id": event.event_id}})
                return WebhookResponse(200, "IGNORED_MODE", event.event_id, event.event_type)
            if self._tx(lambda conn: self._store.event_seen(conn, event.event_id)):
                return WebhookResponse(200, "DUPLICATE", event.event_id, event.event_type)
            outcome = self._dispatch(event)
            return WebhookResponse(200, outcome, event.event_id, event.event_type)
        except errors.Unavailable as exc:
            log.warning("webhook not processed; Stripe will redeliver",
                        extra={"fields": {"event_id": event.event_id, "error": str(exc)}})
            return WebhookResponse(503, "RETRY", event.event_id, event.event_type)
        except Exception:  # noqa: BLE001 - a 500 makes Stripe redeliver; the cause is logged
            log.exception("webhook failed", extra={"fields": {"event_id": event.event_id, "type": event.event_type}})
            return WebhookResponse(500, "ERROR", event.event_id, event.event_type)

    def _dispatch(self, event: WebhookEvent) -> str:
        kind = event.event_type
        if kind == "payment_intent.succeeded" and event.payment_intent is not None:
            outcome, over_limit = self._settle_success(event.payment_intent, event)
            if over_limit is not None:
                self._refund_over_limit(over_limit)
            return outcome
        if kind in ("payment_intent.payment_failed", "payment_intent.canceled") and event.payment_intent is not None:
            return self._settle_failure(event.payment_intent, event)
        if kind in ("refund.failed", "refund.updated", "charge.refund.updated") and event.refund is not None:
            return self._refund_updated(event.refund, event)
        return "IGNORED"

    def _find_for_intent(self, conn: psycopg.Connection, intent: PaymentIntent) -> TopUp | None:
        top_up_id = intent.metadata.get("top_up_id", "")
        row = None
        if top_up_id and ID_PATTERN.match(top_up_id):
            row = self._store.get_top_up(conn, top_up_id, lock=True)
        if row is None:
            row = self._store.get_top_up_by_intent(conn, intent.payment_intent_id, lock=True)
        return row

    @staticmethod
    def _mismatch(row: TopUp, intent: PaymentIntent, *, check_amount_too: bool) -> str:
        if row.payment_intent_id is not None and row.payment_intent_id != intent.payment_intent_id:
            return "payment intent"
        if intent.metadata.get("account_id", row.account_id) != row.account_id:
            return "account"
        if check_amount_too and (intent.amount_minor != row.amount_minor or intent.currency != row.currency):
            return "amount"
        return ""

    def _settle_success(self, intent: PaymentIntent, event: WebhookEvent | None) -> tuple[str, TopUp | None]:
        """Credit the top-up Stripe says was paid, exactly once. The top-up row stays locked
        while the ledger posts the credit, so concurrent deliveries of the same payment run
        one after the other; the credit's transfer id is derived from the top-up id, so even a
        crash between the credit and the status update is replayed, not doubled."""

        def work(conn: psycopg.Connection) -> tuple[str, TopUp | None]:
            now = self._now()
            row = self._find_for_intent(conn, intent)
            if row is None:
                log.warning("payment for an unknown top-up acknowledged",
                            extra={"fields": {"payment_intent_id": intent.payment_intent_id,
                                              "event_id": event.event_id if event else ""}})
                self._store.record_event(conn, event, "UNKNOWN_TOP_UP", None, now)
                return "UNKNOWN_TOP_UP", None
            problem = self._mismatch(row, intent, check_amount_too=True)
            if problem:
                log.error("payment does not match its top-up; not credited, needs reconciliation",
                          extra={"fields": {"top_up_id": row.top_up_id, "mismatch": problem,
                                            "payment_intent_id": intent.payment_intent_id}})
                self._store.record_event(conn, event, "MISMATCH", row.top_up_id, now)
                return "MISMATCH", None
            if row.credited:
                self._store.record_event(conn, event, "ALREADY_CREDITED", row.top_up_id, now)
                return "ALREADY_CREDITED", None
            if row.status in (TopUpStatus.OVER_LIMIT, TopUpStatus.REFUNDED):
                self._store.record_event(conn, event, "OVER_LIMIT", row.top_up_id, now)
                return "OVER_LIMIT", row if row.status is TopUpStatus.OVER_LIMIT else None
            try:
                transfer = self._ledger.credit_from_clearing(credit_transfer_id(row.top_up_id), row.account_id,
                                                             row.amount_minor, kind=TransferKind.TOP_UP,
                                                             reference=intent.payment_intent_id)
            except errors.LimitExceeded:
                # Paid, but the wallet filled up since the top-up started (another credit
                # landed): the money goes back to the card instead (see _refund_over_limit).
                over = self._store.mark_over_limit(conn, row.top_up_id, intent.payment_intent_id, now)
                log.warning("top-up paid over the stored-value limit; refunding it to the card",
                            extra={"fields": {"top_up_id": row.top_up_id}})
                self._store.record_event(conn, event, "OVER_LIMIT", row.top_up_id, now)
                return "OVER_LIMIT", over
            done = self._store.mark_succeeded(conn, row.top_up_id, transfer.transfer_id, intent.payment_intent_id, now)
            assert done is not None, "the locked top-up was pending or failed"
            self._emit(conn, done.account_id, now, top_up_succeeded=events_pb2.TopUpSucceeded(top_up=top_up_to_proto(done)))
            self._store.record_event(conn, event, "CREDITED", row.top_up_id, now)
            log.info("top-up credited", extra={"fields": {"top_up_id": row.top_up_id, "amount_minor": row.amount_minor}})
            return "CREDITED", None

        return self._tx(work)

    def _settle_failure(self, intent: PaymentIntent, event: WebhookEvent) -> str:
        def work(conn: psycopg.Connection) -> str:
            now = self._now()
            row = self._find_for_intent(conn, intent)
            if row is None:
                log.warning("failure of an unknown top-up acknowledged",
                            extra={"fields": {"payment_intent_id": intent.payment_intent_id}})
                self._store.record_event(conn, event, "UNKNOWN_TOP_UP", None, now)
                return "UNKNOWN_TOP_UP"
            if self._mismatch(row, intent, check_amount_too=False):
                self._store.record_event(conn, event, "MISMATCH", row.top_up_id, now)
                return "MISMATCH"
            code = intent.failure_code or ("canceled" if event.event_type.endswith("canceled") else "payment_failed")
            # Only a pending top-up fails: Stripe does not promise order, and a later success
            # (the rider paid with another card) must win over an earlier failure.
            failed = self._store.mark_failed(conn, row.top_up_id, code, now)
            outcome = "MARKED_FAILED" if failed is not None else "IGNORED_STATE"
            self._store.record_event(conn, event, outcome, row.top_up_id, now)
            return outcome

        return self._tx(work)

    def _refund_over_limit(self, row: TopUp) -> bool:
        """Give a paid-but-uncreditable top-up back to the card; True once Stripe accepted it.
        On failure the worker tries again (same idempotency key)."""
        if row.payment_intent_id is None:
            log.error("over-limit top-up without a payment intent", extra={"fields": {"top_up_id": row.top_up_id}})
            return False
        try:
            refund = self._gateway.create_refund(
                payment_intent_id=row.payment_intent_id, amount_minor=row.amount_minor, currency=row.currency,
                idempotency_key=STRIPE_KEY_OVER_LIMIT + row.top_up_id,
                metadata={"top_up_id": row.top_up_id, "account_id": row.account_id, "purpose": "over_limit"})
        except StripeFailure as exc:
            log.error("over-limit refund not made yet; the worker retries",
                      extra={"fields": {"top_up_id": row.top_up_id, "error": str(exc)}})
            return False

        def work(conn: psycopg.Connection) -> None:
            now = self._now()
            done = self._store.mark_over_limit_refunded(conn, row.top_up_id, now)
            if done is not None:
                message = wallet_pb2.TopUpRefund(
                    refund_id=f"over-limit:{row.top_up_id}"[:64], top_up_id=row.top_up_id,
                    amount=convert.money(row.amount_minor, row.currency), stripe_refund_id=refund.stripe_refund_id,
                    created_at=convert.timestamp(now))
                self._emit(conn, done.account_id, now, top_up_refunded=events_pb2.TopUpRefunded(
                    refund=message, top_up=top_up_to_proto(done)))

        self._tx(work)
        return True

    def _refund_updated(self, refund: Refund, event: WebhookEvent) -> str:
        """A refund Stripe had accepted failed later (refund.failed): the money did not reach
        the card, so it goes back into the wallet through the same correction as a refusal."""
        if refund.status != "failed":
            return "IGNORED"

        def work(conn: psycopg.Connection) -> tuple[str, str | None]:
            now = self._now()
            row = self._store.get_refund_by_stripe_id(conn, refund.stripe_refund_id)
            if row is None:
                refund_id = refund.metadata.get("refund_id", "")
                row = self._store.get_refund(conn, refund_id) if ID_PATTERN.match(refund_id) else None
            if row is not None:
                # Lock in the order every refund path uses: the top-up, then the refund.
                self._store.get_top_up(conn, row.top_up_id, lock=True)
                row = self._store.get_refund(conn, row.refund_id, lock=True)
            if row is None:
                log.error("a refund we do not know failed at Stripe; needs reconciliation",
                          extra={"fields": {"stripe_refund_id": refund.stripe_refund_id,
                                            "metadata": dict(refund.metadata)}})
                self._store.record_event(conn, event, "UNKNOWN_REFUND", refund.metadata.get("top_up_id"), now)
                return "UNKNOWN_REFUND", None
            if row.state is RefundState.DEBITED:
                # Stripe's answer to our refund request was lost, so it is not settled on our
                # side yet; asking again with the same idempotency key replays that first
                # answer, not this failure. Not recorded, answered 503: Stripe redelivers the
                # event after the retry or the worker has settled the refund.
                raise errors.Unavailable("UNAVAILABLE", f"refund {row.refund_id} is not settled yet",
                                         refund_id=row.refund_id)
            if row.state is not RefundState.SUCCEEDED:
                # Being reversed already, or it never reached Stripe.
                self._store.record_event(conn, event, "IGNORED_STATE", row.top_up_id, now)
                return "IGNORED_STATE", None
            self._store.move_refund(conn, row.refund_id, RefundState.SUCCEEDED, RefundState.REVERSING, now,
                                    failure_reason="PAYMENT_FAILED", failure_code=refund.failure_reason or "refund_failed")
            self._store.add_refunded(conn, row.top_up_id, -row.amount_minor, now)
            self._store.record_event(conn, event, "REFUND_FAILED", row.top_up_id, now)
            return "REFUND_FAILED", row.refund_id

        outcome, refund_id = self._tx(work)
        if refund_id is not None:
            try:
                self._advance_refund(self._load_refund(refund_id))
            except errors.CityTapError:
                pass  # the refund is FAILED (raised by design) or the worker finishes the reversal
        return outcome

    # --- RefundTopUp ----------------------------------------------------------------------

    def refund_top_up(self, refund_id: str, top_up_id: str, amount_minor: int, currency: str,
                      note: str = "") -> tuple[TopUpRefund, TopUp]:
        """Give back `amount_minor` of a credited top-up to the card it was paid with; at most
        what is left unrefunded and what the wallet has available. Idempotent on refund_id
        (the note is kept from the first call and is not part of the payload compared)."""
        check_client_id(refund_id, "refund_id")
        check_client_id(top_up_id, "top_up_id")
        amount, code = self._check_money(amount_minor, currency)
        check_text(note, "note", NOTE_CHARS_MAX)
        fingerprint = _fingerprint("top-up-refund.v1", [top_up_id, amount, code])

        def replay(existing: TopUpRefund) -> str:
            if existing.request_hash != fingerprint:
                raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"refund {refund_id} exists with a different payload",
                                      refund_id=refund_id)
            return existing.refund_id

        def work(conn: psycopg.Connection) -> str:
            existing = self._store.get_refund(conn, refund_id)
            if existing is not None:
                return replay(existing)
            top_up = self._store.get_top_up(conn, top_up_id, lock=True)
            if top_up is None:
                raise errors.NotFound("NOT_FOUND", f"no top-up {top_up_id}", resource="top_up", top_up_id=top_up_id)
            existing = self._store.get_refund(conn, refund_id)  # a concurrent twin may have committed meanwhile
            if existing is not None:
                return replay(existing)
            if top_up.status not in (TopUpStatus.SUCCEEDED, TopUpStatus.PARTIALLY_REFUNDED):
                raise errors.FailedPrecondition("INVALID_STATE", f"top-up {top_up_id} is {top_up.status.name}, "
                                                "only a credited top-up with something left can be refunded",
                                                top_up_id=top_up_id, status=top_up.status.name)
            refundable = top_up.amount_minor - self._store.reserved_refund_sum(conn, top_up_id)
            if amount > refundable:
                raise errors.InvalidArgument("INVALID_AMOUNT", f"at most {refundable} of top-up {top_up_id} can still "
                                             "be refunded", field="amount", refundable_minor=str(refundable))
            self._store.insert_refund(conn, refund_id=refund_id, top_up_id=top_up_id, amount_minor=amount,
                                      currency=code, request_hash=fingerprint, note=note, now=self._now())
            return refund_id

        self._tx(work, retry_unique={"top_up_refunds_pkey"})
        refund = self._advance_refund(self._load_refund(refund_id))
        return refund, self.get_top_up(refund.top_up_id)

    def _load_refund(self, refund_id: str) -> TopUpRefund:
        refund = self._tx(lambda conn: self._store.get_refund(conn, refund_id))
        if refund is None:
            raise errors.NotFound("NOT_FOUND", f"no refund {refund_id}", resource="refund", refund_id=refund_id)
        return refund

    def _move(self, refund: TopUpRefund, to_state: RefundState, **values: object) -> TopUpRefund:
        """Record the next state (compare-and-set); return the refund as it now is."""
        self._tx(lambda conn: self._store.move_refund(conn, refund.refund_id, refund.state, to_state, self._now(),
                                                      **values))
        return self._load_refund(refund.refund_id)

    def _advance_refund(self, refund: TopUpRefund) -> TopUpRefund:
        """Drive a refund to SUCCEEDED or FAILED, resuming wherever an earlier attempt (or a
        crash) left it. Order: ledger debit first, Stripe second, correction on refusal, so
        the money is never both in the wallet and on its way back to the card."""
        for _ in range(REFUND_STEPS_MAX):
            state = refund.state
            if state is RefundState.SUCCEEDED:
                return refund
            if state is RefundState.FAILED:
                raise self._refund_error(refund)
            if state is RefundState.RESERVED:
                # Refund only what the rider could spend: the ledger's floor may allow a
                # negative allowance, a refund must not use it.
                available = self._ledger.get_balance(refund.account_id).account.available_minor
                if available < refund.amount_minor:
                    refund = self._move(refund, RefundState.FAILED, failure_reason="INSUFFICIENT_FUNDS",
                                        failure_code=f"available {available}")
                else:
                    refund = self._move(refund, RefundState.DEBITING)
            elif state is RefundState.DEBITING:
                try:
                    [transfer] = self._ledger.create_transfers([self._refund_debit(refund)], internal=True)
                except errors.Unavailable:
                    raise
                except errors.CityTapError as exc:
                    self._move(refund, RefundState.FAILED, failure_reason=exc.reason, failure_code=exc.message[:100])
                    raise
                refund = self._move(refund, RefundState.DEBITED, debit_transfer_id=transfer.transfer_id)
            elif state is RefundState.DEBITED:
                refund = self._refund_at_stripe(refund)
            elif state is RefundState.REVERSING:
                try:
                    [transfer] = self._ledger.create_transfers([self._refund_reversal(refund)], internal=True,
                                                               credit_kind=AccountKind.RIDER_WALLET)
                except errors.CityTapError as exc:
                    log.error("refund refused by Stripe; putting the amount back into the wallet failed, the worker "
                              "retries", extra={"fields": {"refund_id": refund.refund_id, "error": str(exc)}})
                    raise errors.Unavailable("UNAVAILABLE", "the refund was refused; returning the amount to the wallet "
                                                            "is pending, retry with the same refund_id") from exc
                refund = self._move(refund, RefundState.FAILED, reversal_transfer_id=transfer.transfer_id)
        raise errors.Unavailable("UNAVAILABLE", f"refund {refund.refund_id} is still moving; retry with the same id")

    def _refund_debit(self, refund: TopUpRefund) -> TransferRequest:
        return TransferRequest(
            transfer_id=refund_transfer_id(refund.refund_id), debit_account_id=refund.account_id,
            credit_account_id=self._ledger.system_account(AccountKind.STRIPE_CLEARING), amount_minor=refund.amount_minor,
            currency=refund.currency, kind=TransferKind.TOP_UP_REFUND,
            corrects_transfer_id=credit_transfer_id(refund.top_up_id), reference=refund.refund_id)

    def _refund_reversal(self, refund: TopUpRefund) -> TransferRequest:
        return TransferRequest(
            transfer_id=reversal_transfer_id(refund.refund_id),
            debit_account_id=self._ledger.system_account(AccountKind.STRIPE_CLEARING), credit_account_id=refund.account_id,
            amount_minor=refund.amount_minor, currency=refund.currency, kind=TransferKind.CORRECTION,
            corrects_transfer_id=refund_transfer_id(refund.refund_id), reference=refund.refund_id)

    def _refund_at_stripe(self, refund: TopUpRefund) -> TopUpRefund:
        top_up = self.get_top_up(refund.top_up_id)
        assert top_up.payment_intent_id is not None, "a credited top-up has its payment intent"
        try:
            stripe_refund = self._gateway.create_refund(
                payment_intent_id=top_up.payment_intent_id, amount_minor=refund.amount_minor, currency=refund.currency,
                idempotency_key=STRIPE_KEY_REFUND + refund.refund_id,
                metadata={"refund_id": refund.refund_id, "top_up_id": refund.top_up_id, "account_id": refund.account_id})
        except StripeUnavailable as exc:
            log.warning("refund debited but not yet sent to Stripe; retry or the worker finishes it",
                        extra={"fields": {"refund_id": refund.refund_id, "error": str(exc)}})
            raise _stripe_unavailable(exc, "the refund") from exc
        except StripeRefused as exc:
            log.warning("Stripe refused a refund; the amount goes back into the wallet",
                        extra={"fields": {"refund_id": refund.refund_id, "code": exc.code,
                                          "stripe_request_id": exc.request_id}})
            return self._move(refund, RefundState.REVERSING, failure_reason="PAYMENT_FAILED",
                              failure_code=exc.code or "refused")
        if stripe_refund.status in ("failed", "canceled"):
            return self._move(refund, RefundState.REVERSING, failure_reason="PAYMENT_FAILED",
                              failure_code=stripe_refund.failure_reason or stripe_refund.status)

        def work(conn: psycopg.Connection) -> None:
            now = self._now()
            self._store.get_top_up(conn, refund.top_up_id, lock=True)
            if not self._store.move_refund(conn, refund.refund_id, RefundState.DEBITED, RefundState.SUCCEEDED, now,
                                           stripe_refund_id=stripe_refund.stripe_refund_id):
                return  # a concurrent resume finished it
            updated = self._store.add_refunded(conn, refund.top_up_id, refund.amount_minor, now)
            assert updated is not None
            done = self._store.get_refund(conn, refund.refund_id)
            assert done is not None
            self._emit(conn, updated.account_id, now, top_up_refunded=events_pb2.TopUpRefunded(
                refund=refund_to_proto(done), top_up=top_up_to_proto(updated)))

        self._tx(work)
        log.info("top-up refunded", extra={"fields": {"refund_id": refund.refund_id, "amount_minor": refund.amount_minor}})
        return self._load_refund(refund.refund_id)

    @staticmethod
    def _refund_error(refund: TopUpRefund) -> errors.CityTapError:
        if refund.failure_reason == "PAYMENT_FAILED":
            return _payment_failed(refund.failure_code)
        if refund.failure_reason == "INSUFFICIENT_FUNDS":
            return errors.FailedPrecondition("INSUFFICIENT_FUNDS", "the wallet's available balance does not cover the "
                                             "refund", account_id=refund.account_id, refund_id=refund.refund_id)
        return errors.FailedPrecondition(refund.failure_reason or "INVALID_STATE",
                                         f"refund {refund.refund_id} failed: {refund.failure_code}",
                                         refund_id=refund.refund_id)

    # --- auto-reload ----------------------------------------------------------------------

    def configure_auto_reload(self, account_id: str, *, threshold_minor: int, amount_minor: int, customer_id: str,
                              payment_method_id: str, enabled: bool = True) -> AutoReload:
        """Save a rider's auto-reload: when the available balance is below `threshold_minor`,
        charge `amount_minor` to the saved card (Stripe customer + payment method), at most
        once per service day. Replaces any earlier setting. (Python only: no RPC yet.)"""
        check_id(account_id, "account_id")
        amount, _ = self._check_money(amount_minor, self.currency)
        self._check_top_up_amount(amount)
        threshold = check_amount(threshold_minor, "threshold")
        if threshold + amount > self.stored_value_max_minor:
            raise errors.InvalidArgument("INVALID_AMOUNT", "threshold plus reload amount exceeds the stored-value limit, "
                                         "so the reload could never be credited", field="threshold",
                                         limit_minor=str(self.stored_value_max_minor))
        if not isinstance(customer_id, str) or not _CUSTOMER_ID.match(customer_id):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "customer_id must be a Stripe customer id (cus_...)",
                                         field="customer_id")
        if not isinstance(payment_method_id, str) or not _PAYMENT_METHOD_ID.match(payment_method_id):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "payment_method_id must be a Stripe payment method id "
                                         "(pm_...)", field="payment_method_id")
        self._rider(account_id)
        reload = AutoReload(account_id, threshold, amount, self.currency, customer_id, payment_method_id, bool(enabled),
                            self._now())
        return self._tx(lambda conn: self._store.upsert_auto_reload(conn, reload))

    def get_auto_reload(self, account_id: str) -> AutoReload | None:
        check_id(account_id, "account_id")
        return self._tx(lambda conn: self._store.get_auto_reload(conn, account_id))

    def disable_auto_reload(self, account_id: str) -> AutoReload | None:
        check_id(account_id, "account_id")
        return self._tx(lambda conn: self._store.disable_auto_reload(conn, account_id, self._now()))

    def run_auto_reload_once(self) -> int:
        """One sweep over riders below their threshold; returns how many charges were started."""
        now = self._now()
        day = service_day(now, self.config.zone, self.config.service_day_start)
        started = 0
        after = ""
        for _ in range(AUTO_RELOAD_PAGES_PER_PASS_MAX):
            page = self._tx(lambda conn: self._store.auto_reload_candidates(conn, day, after,
                                                                            self.config.auto_reload_batch_max))
            for reload in page:
                try:
                    started += self._start_auto_reload(reload, day)
                except Exception:  # noqa: BLE001 - one rider's failure must not stop the others
                    log.exception("auto-reload failed", extra={"fields": {"account_id": reload.account_id}})
            if len(page) < self.config.auto_reload_batch_max:
                break
            after = page[-1].account_id
        return started

    def _start_auto_reload(self, reload: AutoReload, day: date) -> bool:
        top_up_id = auto_reload_top_up_id(reload.account_id, day)

        def work(conn: psycopg.Connection) -> TopUp | None:
            self._lock_account(conn, reload.account_id)
            if self._store.run_exists(conn, reload.account_id, day):
                return None
            now = self._now()
            account = self._rider(reload.account_id)
            if account.status is not AccountStatus.ACTIVE or account.available_minor >= reload.threshold_minor:
                return None
            if reload.amount_minor > self._headroom(conn, account, now):
                log.info("auto-reload skipped: it would pass the stored-value limit",
                         extra={"fields": {"account_id": reload.account_id}})
                return None
            fingerprint = _fingerprint("auto-reload.v1", [reload.account_id, reload.amount_minor, reload.currency])
            row = self._store.insert_top_up(
                conn, top_up_id=top_up_id, account_id=reload.account_id, amount_minor=reload.amount_minor,
                currency=reload.currency, origin=TopUpOrigin.AUTO_RELOAD, request_hash=fingerprint, now=now,
                customer_id=reload.stripe_customer_id, payment_method_id=reload.stripe_payment_method_id)
            if row is None:
                return None
            # The unique (account_id, service_day) key is the guarantee of one charge a day.
            self._store.insert_run(conn, reload.account_id, day, top_up_id, now)
            return row

        row = self._tx(work, retry_unique={"auto_reload_runs_pkey"})
        if row is None:
            return False
        log.info("auto-reload started", extra={"fields": {"account_id": reload.account_id, "top_up_id": top_up_id}})
        self._charge_auto_reload(row)
        return True

    def _charge_auto_reload(self, row: TopUp) -> None:
        try:
            row, intent = self._ensure_payment_intent(row)
        except errors.FailedPrecondition as exc:
            log.info("auto-reload declined; no retry this service day",
                     extra={"fields": {"top_up_id": row.top_up_id, "reason": exc.reason, **exc.metadata}})
            return
        except errors.Unavailable:
            return  # still PENDING without a payment intent: the next pass re-sends it (same key)
        if intent is not None and intent.status == "succeeded":
            # Off-session charges usually succeed synchronously: credit now rather than wait
            # for the webhook (which then finds it credited).
            _, over_limit = self._settle_success(intent, None)
            if over_limit is not None:
                self._refund_over_limit(over_limit)

    def run_maintenance_once(self) -> MaintenanceReport:
        """One pass of the worker: auto-reloads, then finish what outages left half-done."""
        now = self._now()
        started = self.run_auto_reload_once()
        resumed = 0
        unsent = self._tx(lambda conn: self._store.unsent_auto_reloads(
            conn, created_after=now - timedelta(seconds=STRIPE_KEY_REPLAY_S),
            created_before=now - timedelta(seconds=self.config.resume_after_s), limit=RESUME_BATCH_MAX))
        for row in unsent:
            self._charge_auto_reload(row)
            resumed += 1
        expired = self._tx(lambda conn: self._store.expire_unsent_auto_reloads(
            conn, created_before=now - timedelta(seconds=STRIPE_KEY_REPLAY_S), now=now))
        if expired:
            log.warning("auto-reload charges never sent were given up", extra={"fields": {"count": expired}})
        refunds = 0
        for refund_id in self._tx(lambda conn: self._store.open_refunds(
                conn, updated_before=now - timedelta(seconds=self.config.resume_after_s), limit=RESUME_BATCH_MAX)):
            try:
                self._advance_refund(self._load_refund(refund_id))
            except errors.CityTapError as exc:
                if isinstance(exc, errors.Unavailable):
                    log.warning("refund still unfinished", extra={"fields": {"refund_id": refund_id, "error": str(exc)}})
            refunds += 1
        over = 0
        for row in self._tx(lambda conn: self._store.over_limit_top_ups(
                conn, updated_before=now - timedelta(seconds=self.config.resume_after_s), limit=RESUME_BATCH_MAX)):
            over += self._refund_over_limit(row)
        return MaintenanceReport(started, resumed, refunds, over)

    def run_auto_reload(self, stop: threading.Event) -> None:
        """The worker the composition root registers with `app.add_worker`: one maintenance
        pass every `auto_reload_interval_s` until `stop` is set; failures back off (bounded)."""
        backoff_s = self.config.auto_reload_interval_s
        while not stop.is_set():
            try:
                report = self.run_maintenance_once()
                if report != MaintenanceReport():
                    log.info("top-up maintenance pass", extra={"fields": vars(report)})
                backoff_s = self.config.auto_reload_interval_s
                stop.wait(self.config.auto_reload_interval_s)
            except Exception:  # noqa: BLE001 - keep running after transient failures
                log.exception("top-up maintenance failed; retrying", extra={"fields": {"backoff_s": backoff_s}})
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, WORKER_BACKOFF_S_MAX)


# --- protobuf -------------------------------------------------------------------------------

_STATUS_TO_PROTO = {
    TopUpStatus.PENDING: wallet_pb2.TOP_UP_STATUS_PENDING,
    TopUpStatus.SUCCEEDED: wallet_pb2.TOP_UP_STATUS_SUCCEEDED,
    TopUpStatus.FAILED: wallet_pb2.TOP_UP_STATUS_FAILED,
    TopUpStatus.OVER_LIMIT: wallet_pb2.TOP_UP_STATUS_FAILED,  # nothing credited; the card is being refunded
    TopUpStatus.PARTIALLY_REFUNDED: wallet_pb2.TOP_UP_STATUS_PARTIALLY_REFUNDED,
    TopUpStatus.REFUNDED: wallet_pb2.TOP_UP_STATUS_REFUNDED,
}


def top_up_to_proto(top_up: TopUp) -> wallet_pb2.TopUp:
    return wallet_pb2.TopUp(
        top_up_id=top_up.top_up_id, account_id=top_up.account_id,
        amount=convert.money(top_up.amount_minor, top_up.currency), status=_STATUS_TO_PROTO[top_up.status],
        payment_intent_id=top_up.payment_intent_id or "",
        refunded_amount=convert.money(top_up.refunded_amount_minor, top_up.currency),
        transfer_id=top_up.transfer_id or "", created_at=convert.timestamp(top_up.created_at))


def refund_to_proto(refund: TopUpRefund) -> wallet_pb2.TopUpRefund:
    return wallet_pb2.TopUpRefund(
        refund_id=refund.refund_id, top_up_id=refund.top_up_id,
        amount=convert.money(refund.amount_minor, refund.currency), stripe_refund_id=refund.stripe_refund_id or "",
        transfer_id=refund.debit_transfer_id or "", created_at=convert.timestamp(refund.created_at))


def _money_of(message: Any) -> tuple[int, str]:
    if not message.HasField("amount"):
        raise errors.InvalidArgument("INVALID_AMOUNT", "amount is required", field="amount")
    return message.amount.amount_minor, message.amount.currency


def top_up_rpc(service: TopUps, request: wallet_pb2.TopUpRequest) -> wallet_pb2.TopUpResponse:
    """WalletService.TopUp."""
    amount, currency = _money_of(request)
    top_up = service.top_up(request.top_up_id, request.account_id, amount, currency)
    return wallet_pb2.TopUpResponse(top_up=top_up_to_proto(top_up), client_secret=top_up.client_secret or "")


def refund_top_up_rpc(service: TopUps, request: wallet_pb2.RefundTopUpRequest) -> wallet_pb2.RefundTopUpResponse:
    """WalletService.RefundTopUp."""
    amount, currency = _money_of(request)
    refund, top_up = service.refund_top_up(request.refund_id, request.top_up_id, amount, currency, request.note)
    return wallet_pb2.RefundTopUpResponse(refund=refund_to_proto(refund), top_up=top_up_to_proto(top_up))


class TopUpRpcs:
    """Mix into WalletServicer (before the generated base class) to serve TopUp and
    RefundTopUp; `attach_top_ups` gives it the service once the composition root built it."""

    _top_ups: TopUps | None = None

    def attach_top_ups(self, top_ups: TopUps) -> None:
        self._top_ups = top_ups

    def _top_up_service(self) -> TopUps:
        if self._top_ups is None:
            raise errors.Unavailable("UNAVAILABLE", "the wallet is still starting")
        return self._top_ups

    def TopUp(self, request: wallet_pb2.TopUpRequest, context: grpc.ServicerContext) -> wallet_pb2.TopUpResponse:
        return top_up_rpc(self._top_up_service(), request)

    def RefundTopUp(self, request: wallet_pb2.RefundTopUpRequest,
                    context: grpc.ServicerContext) -> wallet_pb2.RefundTopUpResponse:
        return refund_top_up_rpc(self._top_up_service(), request)


# --- wiring ---------------------------------------------------------------------------------


def wire_top_ups(app: Any, ledger: Ledger, settings: Any, *, clock: Callable[[], datetime] = utc_now,
                 gateway: StripeGateway | None = None) -> TopUps:
    """Called by the wallet's composition root after the ledger is built: opens the top-up
    flow's own small connection pool, the Stripe gateway, binds the webhook endpoint (served
    from `app.start()`), registers the auto-reload worker, and returns the service."""
    config = top_up_config(settings)
    # Its own pool: a webhook keeps one connection (the top-up row lock) while the ledger
    # posts through the ledger's pool, so the two can never starve each other.
    pool = create_pool(settings.postgres_dsn, name="citytap-wallet-top-ups",
                       max_size=config.webhook_concurrency_max + 8)
    app.on_close(pool.close)
    if gateway is None:
        gateway = StripeGateway(api_key=settings.stripe_api_key, api_base=settings.stripe_api_base,
                                webhook_secret=config.webhook_secret, webhook_tolerance_s=config.webhook_tolerance_s,
                                timeout_s=config.stripe_timeout_s, connect_timeout_s=min(3.0, config.stripe_timeout_s),
                                max_network_retries=config.stripe_max_network_retries)
    top_ups = TopUps(pool, ledger=ledger, gateway=gateway, config=config, clock=clock)
    server = WebhookServer(config.webhook_listen, top_ups.handle_webhook,
                           concurrency_max=config.webhook_concurrency_max, body_bytes_max=config.webhook_body_bytes_max)
    app.on_close(server.close)
    app.add_worker(server.run)
    app.add_worker(top_ups.run_auto_reload)
    top_ups.webhook_port = server.port
    return top_ups


__all__ = [
    "AutoReload", "MaintenanceReport", "TopUp", "TopUpConfig", "TopUpRefund", "TopUpRpcs", "TopUps", "TopUpStatus",
    "auto_reload_top_up_id", "credit_transfer_id", "refund_to_proto", "refund_top_up_rpc", "service_day",
    "top_up_config", "top_up_rpc", "top_up_to_proto", "webhook_secret",
    "wire_top_ups",
]
