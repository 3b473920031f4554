"""Top-ups through Stripe against the real PostgreSQL and stripe-mock.

stripe-mock validates every request we send against Stripe's OpenAPI spec and answers with
canned objects, but keeps no state and never calls back. So the tests play Stripe's part
for webhooks: they sign event payloads with the endpoint's secret exactly as Stripe does
(`t=<unix time>,v1=<hex HMAC-SHA256 of "t.payload">`) and POST them to the real endpoint.

Every test runs the wallet in a scratch schema (001_ledger.sql + 050_top_ups.sql) and
checks the ledger itself afterwards: balances, the transfers posted, and that the sum over
all accounts is zero.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import psycopg
import pytest

from citytap.common.v1 import money_pb2
from citytap.wallet.v1 import events_pb2, wallet_pb2, wallet_pb2_grpc
from libs import errors, outbox
from libs.grpc_server import Registration, create_server
from libs.postgres import create_pool, migrate_folder
from services.wallet.domain import AccountKind, CreateAccountRequest, TransferKind, TransferRequest
from services.wallet.ledger import Ledger, LedgerConfig
from services.wallet.stripe_gateway import StripeGateway, StripeRefused
from libs.service import BaseApp
from services.wallet.topups import (
    RefundState,
    TopUpConfig,
    TopUpRpcs,
    TopUps,
    TopUpStatus,
    auto_reload_top_up_id,
    credit_transfer_id,
    service_day,
    wire_top_ups,
)
from services.wallet.webhooks import WebhookResponse, WebhookServer

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "wallet" / "migrations"
SECRET = "whsec_citytap_topup_tests_0123456789"
STORED_VALUE_MAX = 1_000_000  # NT$10,000
TOP_UP_MAX = 500_000          # NT$5,000
TOP_UP_MIN = 10_000           # NT$100
TAIPEI_NOON = datetime(2026, 11, 30, 4, 0, tzinfo=timezone.utc)  # 12:00 in Taipei


class MemoryDenyList:
    def __init__(self) -> None:
        self.members: set[str] = set()

    def add(self, members: Any) -> None:
        self.members |= set(members)

    def remove(self, members: Any) -> None:
        self.members -= set(members)

    def replace(self, members: Any) -> None:
        self.members = set(members)


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Wallet:
    """One scratch wallet: ledger, top-ups, the webhook endpoint, and helpers to play Stripe."""

    def __init__(self, dsn: str, schema: str, api_base: str) -> None:
        migrate_folder(dsn, schema, MIGRATIONS)
        self.dsn, self.schema, self.api_base = dsn, schema, api_base
        self.ledger_pool = create_pool(dsn, name="test-ledger", max_size=8)
        self.top_up_pool = create_pool(dsn, name="test-top-ups", max_size=8)
        with self.ledger_pool.connection() as conn:
            outbox.ensure_table(conn, schema)
        self.clock = Clock(TAIPEI_NOON)
        self.ledger = Ledger(self.ledger_pool, schema=schema, config=LedgerConfig(
            currency="TWD", rider_categories=("adult",), rider_floor_minor=0, stored_value_max_minor=STORED_VALUE_MAX,
            card_hash_key=b"k" * 32), deny_list=MemoryDenyList(), clock=self.clock)
        self.ledger.ensure_system_accounts()
        self.config = TopUpConfig(webhook_secret=SECRET, top_up_min_minor=TOP_UP_MIN, top_up_max_minor=TOP_UP_MAX,
                                  pending_ttl_s=3600, resume_after_s=1)
        self.gateway = self.make_gateway(api_base)
        self.top_ups = self.service(self.gateway)
        self.server = WebhookServer("127.0.0.1:0", self.top_ups.handle_webhook, concurrency_max=4)
        self.server.start()

    def make_gateway(self, api_base: str, retries: int = 1) -> StripeGateway:
        return StripeGateway(api_key="sk_test_citytap", api_base=api_base, webhook_secret=SECRET,
                             timeout_s=5.0, connect_timeout_s=1.0, max_network_retries=retries)

    def service(self, gateway: Any) -> TopUps:
        return TopUps(self.top_up_pool, ledger=self.ledger, gateway=gateway, config=self.config, clock=self.clock)

    def close(self) -> None:
        self.server.close()
        self.top_up_pool.close()
        self.ledger_pool.close()

    # --- the ledger -------------------------------------------------------------------------

    def rider(self) -> str:
        account_id = f"rider-{uuid.uuid4().hex[:12]}"
        self.ledger.create_account(CreateAccountRequest(account_id, AccountKind.RIDER_WALLET, "TWD", "", None, ""))
        return account_id

    def balance(self, account_id: str) -> int:
        return self.ledger.get_balance(account_id).account.balance_minor

    def available(self, account_id: str) -> int:
        return self.ledger.get_balance(account_id).account.available_minor

    def spend(self, account_id: str, amount_minor: int) -> None:
        self.ledger.create_transfers([TransferRequest(
            transfer_id=f"fare-{uuid.uuid4().hex[:12]}", debit_account_id=account_id,
            credit_account_id=self.ledger.system_account(AccountKind.OPERATOR_REVENUE), amount_minor=amount_minor,
            currency="TWD", kind=TransferKind.FARE)])

    def sql(self, query: str, *params: Any) -> list[tuple]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(query.replace("{s}", self.schema), params).fetchall()

    def transfers(self) -> list[tuple]:
        return self.sql("SELECT id, debit_account_id, credit_account_id, amount_minor, kind FROM {s}.transfers ORDER BY seq")

    def snapshot(self) -> tuple:
        """Everything a bad webhook must leave untouched."""
        return (self.transfers(), self.sql("SELECT id, status, transfer_id, refunded_amount_minor FROM {s}.top_ups ORDER BY id"),
                self.sql("SELECT event_id FROM {s}.stripe_webhook_events ORDER BY 1"),
                self.sql("SELECT event_id FROM {s}.outbox_events ORDER BY seq"))

    def assert_ledger_balanced(self) -> None:
        [(total,)] = self.sql("SELECT coalesce(sum(balance_minor), 0) FROM {s}.accounts")
        assert total == 0

    def events(self, name: str) -> list[Any]:
        rows = self.sql("SELECT payload FROM {s}.outbox_events WHERE event_type = %s ORDER BY seq",
                        f"citytap.wallet.v1.{name}")
        return [events_pb2.WalletEvent.FromString(bytes(r[0])) for r in rows]

    # --- playing Stripe ---------------------------------------------------------------------

    def event(self, event_type: str, obj: dict[str, Any], event_id: str | None = None) -> bytes:
        return json.dumps({
            "id": event_id or f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2026-10-28.endive",
            "created": int(time.time()), "livemode": False, "type": event_type, "data": {"object": obj},
        }).encode()

    def intent_event(self, top_up: Any, event_type: str = "payment_intent.succeeded", *, event_id: str | None = None,
                     amount: int | None = None, **extra: Any) -> bytes:
        obj = {"id": top_up.payment_intent_id, "object": "payment_intent",
               "amount": top_up.amount_minor if amount is None else amount, "currency": "twd",
               "status": "succeeded" if event_type.endswith("succeeded") else "requires_payment_method",
               "metadata": {"top_up_id": top_up.top_up_id, "account_id": top_up.account_id}, **extra}
        return self.event(event_type, obj, event_id)

    @staticmethod
    def sign(payload: bytes, *, secret: str = SECRET, at: int | None = None) -> str:
        timestamp = int(time.time()) if at is None else at
        mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
        return f"t={timestamp},v1={mac}"

    def post(self, payload: bytes, signature: str | None = "sign", *, path: str = "/stripe/webhook",
             method: str = "POST", headers: dict[str, str] | None = None) -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        sent = dict(headers or {})
        if signature == "sign":
            signature = self.sign(payload)
        if signature is not None:
            sent["Stripe-Signature"] = signature
        sent.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=payload, headers=sent)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        outcome = json.loads(body)["outcome"] if body else ""
        return response.status, outcome

    def paid(self, account_id: str, amount_minor: int) -> Any:
        """A top-up started, paid and credited through a signed webhook."""
        top_up = self.top_ups.top_up(f"tu-{uuid.uuid4().hex[:12]}", account_id, amount_minor, "TWD")
        assert self.post(self.intent_event(top_up)) == (200, "CREDITED")
        return self.top_ups.get_top_up(top_up.top_up_id)


@pytest.fixture()
def wallet(postgres_dsn: str, scratch_schema: str, stripe_api_base: str) -> Iterator[Wallet]:
    w = Wallet(postgres_dsn, scratch_schema, stripe_api_base)
    try:
        yield w
    finally:
        w.close()


def refused(exc_type: type[errors.CityTapError], reason: str, call: Any, *args: Any, **kwargs: Any) -> errors.CityTapError:
    with pytest.raises(exc_type) as info:
        call(*args, **kwargs)
    assert info.value.reason == reason, info.value
    return info.value


# --- TopUp --------------------------------------------------------------------------------------


def test_top_up_creates_a_payment_intent_and_returns_its_client_secret(wallet: Wallet) -> None:
    rider = wallet.rider()
    top_up = wallet.top_ups.top_up("tu-1", rider, 50_000, "TWD")
    assert top_up.status is TopUpStatus.PENDING
    assert top_up.payment_intent_id and top_up.payment_intent_id.startswith("pi_")
    assert top_up.client_secret and "_secret_" in top_up.client_secret
    assert wallet.balance(rider) == 0  # nothing is credited before Stripe confirms the payment
    [(status, intent)] = wallet.sql("SELECT status, payment_intent_id FROM {s}.top_ups WHERE id = 'tu-1'")
    assert (status, intent) == ("PENDING", top_up.payment_intent_id)


def test_retrying_a_top_up_returns_the_same_top_up_and_client_secret(wallet: Wallet) -> None:
    rider = wallet.rider()
    first = wallet.top_ups.top_up("tu-1", rider, 50_000, "TWD")
    again = wallet.top_ups.top_up("tu-1", rider, 50_000, "TWD")
    assert (again.payment_intent_id, again.client_secret, again.created_at) == \
        (first.payment_intent_id, first.client_secret, first.created_at)
    assert wallet.sql("SELECT count(*) FROM {s}.top_ups") == [(1,)]


def test_a_reused_top_up_id_with_another_payload_is_a_conflict(wallet: Wallet) -> None:
    rider, other = wallet.rider(), wallet.rider()
    wallet.top_ups.top_up("tu-1", rider, 50_000, "TWD")
    refused(errors.Conflict, "IDEMPOTENCY_CONFLICT", wallet.top_ups.top_up, "tu-1", rider, 60_000, "TWD")
    refused(errors.Conflict, "IDEMPOTENCY_CONFLICT", wallet.top_ups.top_up, "tu-1", other, 50_000, "TWD")


def test_top_up_refuses_bad_input_before_anything_is_recorded(wallet: Wallet) -> None:
    rider = wallet.rider()
    refused(errors.InvalidArgument, "INVALID_AMOUNT", wallet.top_ups.top_up, "tu-1", rider, 0, "TWD")
    refused(errors.InvalidArgument, "INVALID_AMOUNT", wallet.top_ups.top_up, "tu-1", rider, -100, "TWD")
    refused(errors.InvalidArgument, "INVALID_AMOUNT", wallet.top_ups.top_up, "tu-1", rider, 10_050, "TWD")  # NT$100.50
    refused(errors.InvalidArgument, "INVALID_CURRENCY", wallet.top_ups.top_up, "tu-1", rider, 50_000, "USD")
    refused(errors.InvalidArgument, "INVALID_ARGUMENT", wallet.top_ups.top_up, "bad id!", rider, 50_000, "TWD")
    refused(errors.InvalidArgument, "INVALID_ARGUMENT", wallet.top_ups.top_up, "x" * 61, rider, 50_000, "TWD")
    refused(errors.InvalidArgument, "INVALID_ARGUMENT", wallet.top_ups.top_up, "ar-mine", rider, 50_000, "TWD")
    refused(errors.NotFound, "UNKNOWN_ACCOUNT", wallet.top_ups.top_up, "tu-1", "no-such-rider", 50_000, "TWD")
    refused(errors.InvalidArgument, "INVALID_ARGUMENT", wallet.top_ups.top_up, "tu-1",
            wallet.ledger.system_account(AccountKind.OPERATOR_REVENUE), 50_000, "TWD")
    assert wallet.sql("SELECT count(*) FROM {s}.top_ups") == [(0,)]


def test_per_top_up_limits_at_their_edges(wallet: Wallet) -> None:
    rider = wallet.rider()
    assert wallet.top_ups.top_up("tu-max", rider, TOP_UP_MAX, "TWD").status is TopUpStatus.PENDING
    assert wallet.top_ups.top_up("tu-min", rider, TOP_UP_MIN, "TWD").status is TopUpStatus.PENDING
    error = refused(errors.LimitExceeded, "LIMIT_EXCEEDED", wallet.top_ups.top_up, "tu-over", rider, TOP_UP_MAX + 100,
                    "TWD")
    assert error.metadata["limit"] == "top_up"
    refused(errors.InvalidArgument, "INVALID_AMOUNT", wallet.top_ups.top_up, "tu-under", rider, TOP_UP_MIN - 100, "TWD")


def test_stored_value_limit_counts_the_balance_and_pending_top_ups(wallet: Wallet) -> None:
    rider = wallet.rider()
    wallet.paid(rider, 400_000)                                          # balance NT$4,000
    wallet.top_ups.top_up("tu-pending", rider, 500_000, "TWD")           # NT$5,000 started, not paid
    assert wallet.top_ups.top_up("tu-edge", rider, 100_000, "TWD").status is TopUpStatus.PENDING  # exactly NT$10,000
    error = refused(errors.LimitExceeded, "LIMIT_EXCEEDED", wallet.top_ups.top_up, "tu-past", rider, TOP_UP_MIN, "TWD")
    assert (error.metadata["limit"], error.metadata["headroom_minor"]) == ("stored_value", "0")
    # An unpaid top-up stops counting once it is older than the pending TTL.
    wallet.clock.now += timedelta(seconds=wallet.config.pending_ttl_s + 1)
    assert wallet.top_ups.top_up("tu-later", rider, 500_000, "TWD").status is TopUpStatus.PENDING


def test_concurrent_top_ups_cannot_together_pass_the_stored_value_limit(wallet: Wallet) -> None:
    rider = wallet.rider()
    wallet.paid(rider, 500_000)

    def attempt(n: int) -> str:
        try:
            wallet.top_ups.top_up(f"tu-race-{n}", rider, 200_000, "TWD")
            return "ok"
        except errors.LimitExceeded:
            return "limit"

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(attempt, range(6)))
    assert sorted(results) == ["limit"] * 4 + ["ok"] * 2  # 500,000 + 2 x 200,000 <= 1,000,000 < + 3 x 200,000


def test_stripe_unreachable_leaves_the_top_up_retriable(wallet: Wallet) -> None:
    rider = wallet.rider()
    offline = wallet.service(wallet.make_gateway("http://127.0.0.1:9", retries=0))  # nothing listens on port 9
    refused(errors.Unavailable, "UNAVAILABLE", offline.top_up, "tu-1", rider, 50_000, "TWD")
    [(status, intent)] = wallet.sql("SELECT status, payment_intent_id FROM {s}.top_ups WHERE id = 'tu-1'")
    assert (status, intent) == ("PENDING", None)
    top_up = wallet.top_ups.top_up("tu-1", rider, 50_000, "TWD")  # the client retries, Stripe is back
    assert top_up.payment_intent_id and top_up.client_secret
    assert wallet.balance(rider) == 0


def test_stripe_refusing_the_payment_intent_marks_the_top_up_failed(wallet: Wallet) -> None:
    class Refusing:
        livemode = False

        def create_payment_intent(self, **_: Any) -> Any:
            raise StripeRefused("amount too small", code="amount_too_small", request_id="req_1")

    rider = wallet.rider()
    refusing = wallet.service(Refusing())
    error = refused(errors.FailedPrecondition, "PAYMENT_FAILED", refusing.top_up, "tu-1", rider, 50_000, "TWD")
    assert error.metadata["stripe_code"] == "amount_too_small"
    assert wallet.top_ups.get_top_up("tu-1").status is TopUpStatus.FAILED
    # A retry does not charge again: it repeats the refusal.
    refused(errors.FailedPrecondition, "PAYMENT_FAILED", wallet.top_ups.top_up, "tu-1", rider, 50_000, "TWD")
    assert wallet.balance(rider) == 0


# --- webhooks -------------------------------------------------------------------------------------


def test_succeeded_webhook_credits_exactly_once_when_delivered_three_times_concurrently(wallet: Wallet) -> None:
    rider = wallet.rider()
    top_up = wallet.top_ups.top_up("tu-1", rider, 50_000, "TWD")
    payload = wallet.intent_event(top_up, event_id="evt_once")
    barrier = threading.Barrier(3)

    def deliver(_: int) -> tuple[int, str]:
        barrier.wait()
        return wallet.post(payload)

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(deliver, range(3)))
    assert all(status == 200 for status, _ in results)
    assert sorted(outcome for _, outcome in results).count("CREDITED") == 1
    assert wallet.post(payload) == (200, "DUPLICATE")  # and once more, later
    # The same payment announced under other event ids (Stripe may send more than one).
    with ThreadPoolExecutor(3) as pool:
        others = list(pool.map(lambda n: wallet.post(wallet.intent_event(top_up)), range(3)))
    assert others == [(200, "ALREADY_CREDITED")] * 3
    assert wallet.balance(rider) == 50_000
    credits = [t for t in wallet.transfers() if t[4] == "TOP_UP"]
    assert credits == [(credit_transfer_id("tu-1"), wallet.ledger.system_account(AccountKind.STRIPE_CLEARING), rider,
                        50_000, "TOP_UP")]
    done = wallet.top_ups.get_top_up("tu-1")
    assert (done.status, done.transfer_id) == (TopUpStatus.SUCCEEDED, "tu:tu-1")
    [event] = wallet.events("TopUpSucceeded")
    assert (event.account_key, event.top_up_succeeded.top_up.status) == (rider, wallet_pb2.TOP_UP_STATUS_SUCCEEDED)
    assert wallet.sql("SELECT count(*) FROM {s}.stripe_webhook_events") == [(4,)]
    wallet.assert_ledger_balanced()


def test_bad_deliveries_are_refused_and_change_nothing(wallet: Wallet) -> None:
    rider = wallet.rider()
    credited = wallet.paid(rider, 50_000)
    pending = wallet.top_ups.top_up("tu-pending", rider, 20_000, "TWD")
    before = wallet.snapshot()
    good = wallet.intent_event(pending)
    now = int(time.time())
    cases = [
        ("forged signature", good, wallet.sign(good, secret="whsec_not_the_real_secret_at_all"), 400, "BAD_SIGNATURE"),
        ("no signature", good, None, 400, "BAD_SIGNATURE"),
        ("garbage signature", good, "t=abc,v1=zzz", 400, "BAD_SIGNATURE"),
        ("body changed after signing", good.replace(b"20000", b"90000"), wallet.sign(good), 400, "BAD_SIGNATURE"),
        ("stale, 301 s old", good, wallet.sign(good, at=now - 301), 400, "STALE"),
        ("from the future", good, wallet.sign(good, at=now + 400), 400, "STALE"),
        ("malformed JSON, valid signature", b'{"id": "evt_x", "type": ', "sign", 400, "MALFORMED"),
        ("JSON that is not an event", b'{"hello": "world"}', "sign", 400, "MALFORMED"),
    ]
    for name, payload, signature, status, outcome in cases:
        assert wallet.post(payload, signature) == (status, outcome), name
    assert wallet.snapshot() == before
    # Acknowledged (so Stripe stops retrying) but nothing moves:
    replayed = wallet.event("payment_intent.succeeded", json.loads(good)["data"]["object"],
                            event_id=wallet.sql("SELECT event_id FROM {s}.stripe_webhook_events")[0][0])
    assert wallet.post(replayed) == (200, "DUPLICATE")  # a known event id, whatever it now says
    unknown = replace(pending, top_up_id="tu-nobody", payment_intent_id="pi_nobody")
    assert wallet.post(wallet.intent_event(unknown)) == (200, "UNKNOWN_TOP_UP")
    assert wallet.post(wallet.event("customer.created", {"id": "cus_1", "object": "customer"})) == (200, "IGNORED")
    assert wallet.post(wallet.intent_event(pending, amount=90_000)) == (200, "MISMATCH")
    assert wallet.snapshot()[:2] == before[:2]  # no transfer, no top-up changed
    assert wallet.balance(rider) == credited.amount_minor
    assert wallet.top_ups.get_top_up("tu-pending").status is TopUpStatus.PENDING


def test_the_endpoint_speaks_only_signed_posts_to_its_path(wallet: Wallet) -> None:
    payload = b"{}"
    assert wallet.post(payload, path="/other") == (404, "NOT_FOUND")
    assert wallet.post(b"", None, method="GET") == (405, "METHOD_NOT_ALLOWED")
    for headers, status in (({"Content-Length": str(256 * 1024 + 1)}, 413), ({}, 411)):
        conn = http.client.HTTPConnection("127.0.0.1", wallet.server.port, timeout=5)
        conn.putrequest("POST", "/stripe/webhook")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()  # no body is sent: the answer comes from the headers alone
        assert conn.getresponse().status == status
        conn.close()


def test_the_endpoint_sheds_load_and_survives_handler_errors() -> None:
    release = threading.Event()
    calls: list[bytes] = []

    def handle(body: bytes, signature: str | None) -> WebhookResponse:
        calls.append(body)
        if body == b"boom":
            raise RuntimeError("bug")
        release.wait(5)
        return WebhookResponse(200, "OK")

    server = WebhookServer("127.0.0.1:0", handle, concurrency_max=1)
    server.start()
    try:
        def post(body: bytes) -> int:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request("POST", "/stripe/webhook", body=body)
            status = conn.getresponse().status
            conn.close()
            return status

        with ThreadPoolExecutor(2) as pool:
            slow = pool.submit(post, b"slow")
            while not calls:
                time.sleep(0.01)
            assert post(b"second") == 503  # the one processing slot is taken: Stripe redelivers later
            release.set()
            assert slow.result() == 200
        assert post(b"boom") == 500
        assert post(b"fine") == 200
    finally:
        server.close()


def test_payment_failed_marks_failed_and_a_later_success_still_credits(wallet: Wallet) -> None:
    rider = wallet.rider()
    top_up = wallet.top_ups.top_up("tu-1", rider, 50_000, "TWD")
    failed = wallet.intent_event(top_up, "payment_intent.payment_failed",
                                 last_payment_error={"code": "card_declined", "decline_code": "insufficient_funds"})
    assert wallet.post(failed) == (200, "MARKED_FAILED")
    row = wallet.top_ups.get_top_up("tu-1")
    assert (row.status, row.failure_code) == (TopUpStatus.FAILED, "insufficient_funds")
    assert wallet.balance(rider) == 0
    # The rider retries in the app with another card: the same PaymentIntent succeeds.
    assert wallet.post(wallet.intent_event(top_up)) == (200, "CREDITED")
    # A failure delivered late (Stripe does not promise order) does not undo the success.
    assert wallet.post(wallet.intent_event(top_up, "payment_intent.payment_failed")) == (200, "IGNORED_STATE")
    assert wallet.top_ups.get_top_up("tu-1").status is TopUpStatus.SUCCEEDED
    assert wallet.balance(rider) == 50_000


def test_a_paid_top_up_that_no_longer_fits_is_refunded_to_the_card(wallet: Wallet) -> None:
    rider = wallet.rider()
    early = wallet.top_ups.top_up("tu-early", rider, 500_000, "TWD")
    wallet.clock.now += timedelta(seconds=wallet.config.pending_ttl_s + 1)  # it stops counting as pending
    wallet.paid(rider, 500_000)
    wallet.paid(rider, 100_000)                                           # balance NT$6,000
    # The rider pays the old top-up after all: crediting it would pass NT$10,000.
    assert wallet.post(wallet.intent_event(early)) == (200, "OVER_LIMIT")
    row = wallet.top_ups.get_top_up("tu-early")
    assert (row.status, row.transfer_id, row.refunded_amount_minor) == (TopUpStatus.REFUNDED, None, 500_000)
    assert wallet.balance(rider) == 600_000
    assert wallet.post(wallet.intent_event(early)) == (200, "OVER_LIMIT")  # redelivery changes nothing
    assert len(wallet.events("TopUpRefunded")) == 1
    wallet.assert_ledger_balanced()


# --- RefundTopUp ---------------------------------------------------------------------------------


def test_refund_partial_then_full_and_idempotent(wallet: Wallet) -> None:
    rider = wallet.rider()
    top_up = wallet.paid(rider, 100_000)
    clearing = wallet.ledger.system_account(AccountKind.STRIPE_CLEARING)
    refund, after = wallet.top_ups.refund_top_up("rf-1", top_up.top_up_id, 30_000, "TWD", note="asked by phone")
    assert (refund.state, refund.debit_transfer_id) == (RefundState.SUCCEEDED, "tur:rf-1")
    assert refund.stripe_refund_id and refund.stripe_refund_id.startswith("re_")
    assert (after.status, after.refunded_amount_minor) == (TopUpStatus.PARTIALLY_REFUNDED, 30_000)
    assert wallet.balance(rider) == 70_000
    assert wallet.balance(clearing) == -70_000  # Stripe owes us what riders keep
    again, _ = wallet.top_ups.refund_top_up("rf-1", top_up.top_up_id, 30_000, "TWD")
    assert again == refund
    assert wallet.balance(rider) == 70_000
    refused(errors.Conflict, "IDEMPOTENCY_CONFLICT", wallet.top_ups.refund_top_up, "rf-1", top_up.top_up_id, 20_000, "TWD")
    error = refused(errors.InvalidArgument, "INVALID_AMOUNT", wallet.top_ups.refund_top_up, "rf-2", top_up.top_up_id,
                    70_100, "TWD")
    assert error.metadata["refundable_minor"] == "70000"
    full, after = wallet.top_ups.refund_top_up("rf-3", top_up.top_up_id, 70_000, "TWD")
    assert (after.status, after.refunded_amount_minor) == (TopUpStatus.REFUNDED, 100_000)
    assert wallet.balance(rider) == 0 and wallet.balance(clearing) == 0
    refused(errors.FailedPrecondition, "INVALID_STATE", wallet.top_ups.refund_top_up, "rf-4", top_up.top_up_id, 100,
            "TWD")
    refunds = [t for t in wallet.transfers() if t[4] == "TOP_UP_REFUND"]
    assert refunds == [("tur:rf-1", rider, clearing, 30_000, "TOP_UP_REFUND"),
                       ("tur:rf-3", rider, clearing, 70_000, "TOP_UP_REFUND")]
    assert [e.top_up_refunded.refund.refund_id for e in wallet.events("TopUpRefunded")] == ["rf-1", "rf-3"]
    wallet.assert_ledger_balanced()


def test_refund_is_limited_to_what_the_wallet_has_available(wallet: Wallet) -> None:
    rider = wallet.rider()
    top_up = wallet.paid(rider, 100_000)
    wallet.spend(rider, 80_000)  # the rider rode the metro with most of it
    error = refused(errors.FailedPrecondition, "INSUFFICIENT_FUNDS", wallet.top_ups.refund_top_up, "rf-1",
                    top_up.top_up_id, 50_000, "TWD")
    assert error.metadata["refund_id"] == "rf-1"
    assert wallet.balance(rider) == 20_000
    refused(errors.FailedPrecondition, "INSUFFICIENT_FUNDS", wallet.top_ups.refund_top_up, "rf-1", top_up.top_up_id,
            50_000, "TWD")  # a retry repeats the answer
    refund, after = wallet.top_ups.refund_top_up("rf-2", top_up.top_up_id, 20_000, "TWD")
    assert refund.state is RefundState.SUCCEEDED and after.refunded_amount_minor == 20_000
    assert wallet.balance(rider) == 0
    refused(errors.NotFound, "NOT_FOUND", wallet.top_ups.refund_top_up, "rf-3", "tu-nothing", 100, "TWD")
    pending = wallet.top_ups.top_up("tu-unpaid", rider, 20_000, "TWD")
    refused(errors.FailedPrecondition, "INVALID_STATE", wallet.top_ups.refund_top_up, "rf-4", pending.top_up_id, 100,
            "TWD")
    wallet.assert_ledger_balanced()


def test_a_blocked_wallet_cannot_be_refunded_and_nothing_moves(wallet: Wallet) -> None:
    from services.wallet.domain import BlockReason
    rider = wallet.rider()
    top_up = wallet.paid(rider, 100_000)
    wallet.ledger.block_account(rider, BlockReason.FRAUD_SUSPECTED)
    before = wallet.transfers()
    refused(errors.FailedPrecondition, "ACCOUNT_BLOCKED", wallet.top_ups.refund_top_up, "rf-1", top_up.top_up_id,
            10_000, "TWD")
    refused(errors.FailedPrecondition, "ACCOUNT_BLOCKED", wallet.top_ups.refund_top_up, "rf-1", top_up.top_up_id,
            10_000, "TWD")
    assert wallet.transfers() == before and wallet.balance(rider) == 100_000
    wallet.ledger.unblock_account(rider)
    refund, _ = wallet.top_ups.refund_top_up("rf-2", top_up.top_up_id, 100_000, "TWD")  # the failed one reserved nothing
    assert refund.state is RefundState.SUCCEEDED


def test_a_refund_stripe_refuses_is_put_back_into_the_wallet(wallet: Wallet) -> None:
    class RefusingRefunds:
        livemode = False

        def __init__(self, real: StripeGateway) -> None:
            self.real = real
            self.calls = 0

        def create_refund(self, **_: Any) -> Any:
            self.calls += 1
            raise StripeRefused("charge already refunded", code="charge_already_refunded", request_id="req_2")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    rider = wallet.rider()
    top_up = wallet.paid(rider, 100_000)
    gateway = RefusingRefunds(wallet.gateway)
    refusing = wallet.service(gateway)
    error = refused(errors.FailedPrecondition, "PAYMENT_FAILED", refusing.refund_top_up, "rf-1", top_up.top_up_id,
                    40_000, "TWD")
    assert error.metadata["stripe_code"] == "charge_already_refunded"
    assert wallet.balance(rider) == 100_000
    clearing = wallet.ledger.system_account(AccountKind.STRIPE_CLEARING)
    moved = [t for t in wallet.transfers() if t[0].startswith(("tur:", "tuc:"))]
    assert moved == [("tur:rf-1", rider, clearing, 40_000, "TOP_UP_REFUND"),
                     ("tuc:rf-1", clearing, rider, 40_000, "CORRECTION")]
    refused(errors.FailedPrecondition, "PAYMENT_FAILED", refusing.refund_top_up, "rf-1", top_up.top_up_id, 40_000, "TWD")
    assert gateway.calls == 1 and len(wallet.transfers()) == len(moved) + 1  # + the credit; nothing new
    after = wallet.top_ups.get_top_up(top_up.top_up_id)
    assert (after.status, after.refunded_amount_minor) == (TopUpStatus.SUCCEEDED, 0)
    refund, _ = wallet.top_ups.refund_top_up("rf-2", top_up.top_up_id, 100_000, "TWD")  # all still refundable
    assert refund.state is RefundState.SUCCEEDED
    wallet.assert_ledger_balanced()


def test_a_refund_interrupted_by_a_stripe_outage_is_finished_later(wallet: Wallet) -> None:
    rider = wallet.rider()
    top_up = wallet.paid(rider, 100_000)
    offline = wallet.service(wallet.make_gateway("http://127.0.0.1:9", retries=0))
    refused(errors.Unavailable, "UNAVAILABLE", offline.refund_top_up, "rf-1", top_up.top_up_id, 30_000, "TWD")
    # The money left the wallet first, so it cannot be spent while the refund is in doubt.
    assert wallet.balance(rider) == 70_000 and wallet.available(rider) == 70_000
    assert wallet.sql("SELECT state FROM {s}.top_up_refunds WHERE id = 'rf-1'") == [("DEBITED",)]
    wallet.clock.now += timedelta(seconds=5)
    report = wallet.top_ups.run_maintenance_once()  # the worker finishes it (or the client retries)
    assert report.refunds_resumed == 1
    refund, after = wallet.top_ups.refund_top_up("rf-1", top_up.top_up_id, 30_000, "TWD")
    assert refund.state is RefundState.SUCCEEDED and after.refunded_amount_minor == 30_000
    assert wallet.balance(rider) == 70_000
    assert len(wallet.events("TopUpRefunded")) == 1


def test_a_refund_that_fails_later_at_stripe_returns_the_money(wallet: Wallet) -> None:
    rider = wallet.rider()
    top_up = wallet.paid(rider, 100_000)
    refund, _ = wallet.top_ups.refund_top_up("rf-1", top_up.top_up_id, 30_000, "TWD")
    failed = wallet.event("refund.failed", {
        "id": refund.stripe_refund_id, "object": "refund", "amount": 30_000, "currency": "twd", "status": "failed",
        "payment_intent": top_up.payment_intent_id, "failure_reason": "expired_or_canceled_card",
        "metadata": {"refund_id": "rf-1", "top_up_id": top_up.top_up_id}})
    assert wallet.post(failed) == (200, "REFUND_FAILED")
    assert wallet.post(failed) == (200, "DUPLICATE")
    assert wallet.balance(rider) == 100_000
    after = wallet.top_ups.get_top_up(top_up.top_up_id)
    assert (after.status, after.refunded_amount_minor) == (TopUpStatus.SUCCEEDED, 0)
    assert wallet.sql("SELECT state, failure_code FROM {s}.top_up_refunds") == [("FAILED", "expired_or_canceled_card")]
    wallet.assert_ledger_balanced()


# --- auto-reload ---------------------------------------------------------------------------------


def test_auto_reload_fires_once_per_service_day_below_the_threshold(wallet: Wallet) -> None:
    rider = wallet.rider()
    wallet.paid(rider, 100_000)
    wallet.top_ups.configure_auto_reload(rider, threshold_minor=20_000, amount_minor=50_000, customer_id="cus_Rider1",
                                         payment_method_id="pm_card_visa")
    assert wallet.top_ups.run_auto_reload_once() == 0  # NT$1,000 is above the NT$200 threshold
    wallet.spend(rider, 90_000)                         # NT$100 left
    assert wallet.top_ups.run_auto_reload_once() == 1
    day = service_day(wallet.clock.now, wallet.config.zone, wallet.config.service_day_start)
    reload = wallet.top_ups.get_top_up(auto_reload_top_up_id(rider, day))
    assert (reload.status, reload.amount_minor) == (TopUpStatus.PENDING, 50_000)
    assert reload.payment_intent_id and reload.stripe_customer_id == "cus_Rider1"  # stripe-mock took the charge
    assert wallet.top_ups.run_auto_reload_once() == 0  # still below, but not twice in a day
    assert wallet.post(wallet.intent_event(reload)) == (200, "CREDITED")
    assert wallet.balance(rider) == 60_000
    wallet.spend(rider, 50_000)
    assert wallet.top_ups.run_auto_reload_once() == 0  # below again the same day: no second charge
    wallet.clock.now = wallet.clock.now.replace(hour=20, minute=29)  # 04:29 next morning in Taipei: same day
    assert wallet.top_ups.run_auto_reload_once() == 0
    wallet.clock.now = wallet.clock.now.replace(hour=20, minute=30)  # 04:30: a new service day
    assert wallet.top_ups.run_auto_reload_once() == 1
    assert wallet.top_ups.run_auto_reload_once() == 0
    assert wallet.sql("SELECT service_day::text FROM {s}.auto_reload_runs ORDER BY 1") == [("2026-11-30",), ("2026-12-01",)]


def test_auto_reload_respects_its_switch_blocked_accounts_and_the_stored_value_limit(wallet: Wallet) -> None:
    low, blocked, full = wallet.rider(), wallet.rider(), wallet.rider()
    for rider in (low, blocked, full):
        wallet.top_ups.configure_auto_reload(rider, threshold_minor=20_000, amount_minor=50_000,
                                             customer_id="cus_R", payment_method_id="pm_card_visa")
    wallet.top_ups.disable_auto_reload(low)
    from services.wallet.domain import BlockReason
    wallet.ledger.block_account(blocked, BlockReason.LOST_OR_STOLEN)
    wallet.top_ups.top_up("tu-big", full, 500_000, "TWD")  # pending: NT$5,000 ...
    wallet.top_ups.top_up("tu-big2", full, 480_000, "TWD")  # ... + NT$4,800 leaves room for NT$200 only
    assert wallet.top_ups.run_auto_reload_once() == 0
    refused(errors.InvalidArgument, "INVALID_ARGUMENT", wallet.top_ups.configure_auto_reload, low, threshold_minor=1,
            amount_minor=50_000, customer_id="not-a-customer", payment_method_id="pm_1")
    refused(errors.InvalidArgument, "INVALID_AMOUNT", wallet.top_ups.configure_auto_reload, low,
            threshold_minor=600_000, amount_minor=500_000, customer_id="cus_R", payment_method_id="pm_1")
    refused(errors.LimitExceeded, "LIMIT_EXCEEDED", wallet.top_ups.configure_auto_reload, low,
            threshold_minor=1_000, amount_minor=TOP_UP_MAX + 100, customer_id="cus_R", payment_method_id="pm_1")


def test_an_auto_reload_charge_that_stripe_declines_is_not_retried_the_same_day(wallet: Wallet) -> None:
    class Declining:
        livemode = False
        calls = 0

        def create_payment_intent(self, **kwargs: Any) -> Any:
            Declining.calls += 1
            assert kwargs["off_session"] and kwargs["customer_id"] == "cus_R"
            raise StripeRefused("Your card was declined.", code="card_declined", decline_code="insufficient_funds")

    rider = wallet.rider()
    declining = wallet.service(Declining())
    declining.configure_auto_reload(rider, threshold_minor=20_000, amount_minor=50_000, customer_id="cus_R",
                                    payment_method_id="pm_card_visa")
    assert declining.run_auto_reload_once() == 1
    assert declining.run_maintenance_once().auto_reloads_started == 0
    assert Declining.calls == 1
    [(status, code)] = wallet.sql("SELECT status, failure_code FROM {s}.top_ups")
    assert (status, code) == ("FAILED", "insufficient_funds")


# --- gRPC ------------------------------------------------------------------------------------------


class _Servicer(TopUpRpcs, wallet_pb2_grpc.WalletServiceServicer):
    pass


def test_top_up_rpcs_through_a_real_grpc_server(wallet: Wallet) -> None:
    servicer = _Servicer()
    servicer.attach_top_ups(wallet.top_ups)
    server = create_server("127.0.0.1:0", [Registration(wallet_pb2_grpc.add_WalletServiceServicer_to_server, servicer,
                                                        "citytap.wallet.v1.WalletService")], domain="wallet.citytap")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    stub = wallet_pb2_grpc.WalletServiceStub(channel)
    try:
        rider = wallet.rider()
        twd = lambda amount: money_pb2.Money(amount_minor=amount, currency="TWD")  # noqa: E731
        response = stub.TopUp(wallet_pb2.TopUpRequest(top_up_id="tu-g", account_id=rider, amount=twd(50_000)), timeout=10)
        assert response.client_secret and response.top_up.status == wallet_pb2.TOP_UP_STATUS_PENDING
        with pytest.raises(grpc.RpcError) as info:
            stub.TopUp(wallet_pb2.TopUpRequest(top_up_id="tu-h", account_id=rider, amount=twd(TOP_UP_MAX + 100)),
                       timeout=10)
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as info:
            stub.TopUp(wallet_pb2.TopUpRequest(top_up_id="tu-g", account_id=rider, amount=twd(60_000)), timeout=10)
        assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
        assert wallet.post(wallet.intent_event(wallet.top_ups.get_top_up("tu-g"))) == (200, "CREDITED")
        refund = stub.RefundTopUp(wallet_pb2.RefundTopUpRequest(refund_id="rf-g", top_up_id="tu-g", amount=twd(10_000)),
                                  timeout=10)
        assert (refund.refund.transfer_id, refund.top_up.status) == ("tur:rf-g", wallet_pb2.TOP_UP_STATUS_PARTIALLY_REFUNDED)
        assert refund.top_up.refunded_amount.amount_minor == 10_000
        with pytest.raises(grpc.RpcError) as info:
            stub.RefundTopUp(wallet_pb2.RefundTopUpRequest(refund_id="rf-h", top_up_id="tu-g"), timeout=10)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    finally:
        channel.close()
        server.stop(0)


# --- wiring ------------------------------------------------------------------------------------------


def test_wire_top_ups_serves_the_endpoint_and_runs_the_worker_until_close(wallet: Wallet) -> None:
    settings = SimpleNamespace(
        postgres_dsn=wallet.dsn, stripe_api_base=wallet.api_base, stripe_api_key="sk_test_citytap",
        stripe_webhook_secret=SECRET, webhook_listen="127.0.0.1:0", top_up_min_minor=TOP_UP_MIN,
        top_up_max_minor=TOP_UP_MAX, top_up_pending_ttl_s=3600, auto_reload_interval_s=1,
        service_day_timezone="Asia/Taipei", service_day_start=datetime.min.time().replace(hour=4, minute=30),
        stripe_timeout_ms=5_000, stripe_max_network_retries=1)
    server = create_server("127.0.0.1:0", [], domain="wallet.citytap")
    app = BaseApp(server)
    top_ups = wire_top_ups(app, wallet.ledger, settings, clock=wallet.clock)
    app.start()
    try:
        rider = wallet.rider()
        top_up = top_ups.top_up("tu-wired", rider, 50_000, "TWD")
        conn = http.client.HTTPConnection("127.0.0.1", top_ups.webhook_port, timeout=10)
        payload = wallet.intent_event(top_up)
        conn.request("POST", "/stripe/webhook", body=payload, headers={"Stripe-Signature": wallet.sign(payload)})
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (200, {"outcome": "CREDITED"})
        conn.close()
        assert wallet.balance(rider) == 50_000
    finally:
        started = time.monotonic()
        app.close()
    assert time.monotonic() - started < 5  # the endpoint and the worker stop promptly
    with pytest.raises(OSError):
        http.client.HTTPConnection("127.0.0.1", top_ups.webhook_port, timeout=2).request("POST", "/stripe/webhook")
