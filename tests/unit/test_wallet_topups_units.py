"""Pure logic of the Stripe top-up flow: money at the Stripe boundary, webhook signatures,
service days, configuration, derived ids, error translation, and the one-module rule."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from datetime import date, datetime, time as clock_time, timezone
from pathlib import Path
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import stripe

from citytap.wallet.v1 import wallet_pb2
from libs import errors
from services.wallet.domain import ID_PATTERN
from services.wallet.stripe_gateway import (
    STRIPE_API_VERSION,
    StripeGateway,
    StripeRefused,
    StripeUnavailable,
    WebhookRejected,
    _translate,
    from_stripe_amount,
    to_stripe_amount,
)
from libs.settings import clock_time as service_day_start
from libs.settings import timezone_name
from services.wallet.topups import (
    CLIENT_ID_CHARS_MAX,
    TopUp,
    TopUpConfig,
    TopUpOrigin,
    TopUpStatus,
    auto_reload_top_up_id,
    check_client_id,
    credit_transfer_id,
    refund_transfer_id,
    reversal_transfer_id,
    service_day,
    top_up_config,
    top_up_to_proto,
    webhook_secret,
)

ROOT = Path(__file__).resolve().parents[2]
SECRET = "whsec_unit_test_secret_abcdef"
TAIPEI = ZoneInfo("Asia/Taipei")


def gateway(**overrides: object) -> StripeGateway:
    # Building the client makes no network call; these tests never send a request.
    options = {"api_key": "sk_test_unit", "api_base": "http://127.0.0.1:1", "webhook_secret": SECRET, **overrides}
    return StripeGateway(**options)  # type: ignore[arg-type]


def sign(payload: bytes, *, secret: str = SECRET, at: int | None = None) -> str:
    timestamp = int(time.time()) if at is None else at
    return f"t={timestamp},v1=" + hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()


def event(obj: dict, event_type: str = "payment_intent.succeeded") -> bytes:
    return json.dumps({"id": "evt_1", "object": "event", "type": event_type, "livemode": False,
                       "data": {"object": obj}}).encode()


INTENT = {"id": "pi_1", "object": "payment_intent", "amount": 50_000, "currency": "twd", "status": "succeeded",
          "metadata": {"top_up_id": "tu-1", "account_id": "rider-1"}}


# --- money at the boundary -------------------------------------------------------------------


@pytest.mark.parametrize(("amount", "currency", "expected"), [
    (10_000, "TWD", 10_000),   # NT$100 is 10000 at Stripe too (two-decimal)
    (100, "TWD", 100),         # NT$1
    (1, "USD", 1),
    (500, "JPY", 500),         # zero-decimal in ISO and at Stripe
    (5, "ISK", 500),           # zero-decimal in ISO, two-decimal at Stripe
    (5_120, "KWD", 5_120),     # three-decimal, last digit 0
])
def test_amounts_go_to_stripe_in_its_units(amount: int, currency: str, expected: int) -> None:
    assert to_stripe_amount(amount, currency) == expected
    assert from_stripe_amount(expected, currency.lower()) == amount


@pytest.mark.parametrize(("amount", "currency"), [
    (10_050, "TWD"),  # NT$100.50: Stripe charges and pays out TWD in whole dollars
    (99, "TWD"),
    (5_125, "KWD"),
    (0, "TWD"), (-100, "TWD"), (True, "USD"), (1.0, "USD"),
])
def test_amounts_stripe_cannot_take_exactly_are_refused(amount: object, currency: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        to_stripe_amount(amount, currency)  # type: ignore[arg-type]
    assert info.value.reason == "INVALID_AMOUNT"


def test_a_stripe_amount_that_is_not_whole_ledger_units_is_an_error() -> None:
    with pytest.raises(ValueError):
        from_stripe_amount(550, "isk")


# --- webhook signatures -------------------------------------------------------------------------


def test_a_correctly_signed_event_is_decoded_into_ledger_units() -> None:
    payload = event(INTENT)
    verified = gateway().verify_event(payload, sign(payload))
    assert (verified.event_id, verified.event_type, verified.livemode) == ("evt_1", "payment_intent.succeeded", False)
    intent = verified.payment_intent
    assert intent is not None and verified.refund is None
    assert (intent.payment_intent_id, intent.amount_minor, intent.currency) == ("pi_1", 50_000, "TWD")
    assert dict(intent.metadata) == {"top_up_id": "tu-1", "account_id": "rider-1"}


def test_any_one_valid_v1_signature_is_enough_during_secret_rotation() -> None:
    payload = event(INTENT)
    now = int(time.time())
    old = sign(payload, secret="whsec_the_old_secret_xx", at=now).split(",")[1]
    header = f"t={now},{old},v1={sign(payload, at=now).split('v1=')[1]},v0=ignored"
    assert gateway().verify_event(payload, header).event_id == "evt_1"


@pytest.mark.parametrize(("make_header", "reason"), [
    (lambda p: None, "BAD_SIGNATURE"),
    (lambda p: "", "BAD_SIGNATURE"),
    (lambda p: "v1=abc", "BAD_SIGNATURE"),
    (lambda p: "t=notanumber,v1=abc", "BAD_SIGNATURE"),
    (lambda p: sign(p).replace("v1=", "v0="), "BAD_SIGNATURE"),
    (lambda p: sign(p, secret="whsec_someone_else_1234"), "BAD_SIGNATURE"),
    (lambda p: sign(p + b" "), "BAD_SIGNATURE"),
    (lambda p: sign(p, at=int(time.time()) - 301), "STALE"),
    (lambda p: sign(p, at=int(time.time()) + 301), "STALE"),
])
def test_bad_signatures_and_stale_timestamps_are_rejected(make_header, reason: str) -> None:  # noqa: ANN001
    payload = event(INTENT)
    with pytest.raises(WebhookRejected) as info:
        gateway().verify_event(payload, make_header(payload))
    assert info.value.reason == reason


def test_the_tolerance_edge_is_inclusive() -> None:
    payload = event(INTENT)
    now = time.time()
    assert gateway().verify_event(payload, sign(payload, at=int(now) - 300), now_s=int(now)).event_id == "evt_1"


def test_a_body_that_is_not_utf8_cannot_be_verified() -> None:
    payload = b"\xff\xfe" + event(INTENT)
    with pytest.raises(WebhookRejected) as info:
        gateway().verify_event(payload, "t=1,v1=00")
    assert info.value.reason == "BAD_SIGNATURE"


@pytest.mark.parametrize("payload", [
    b"{not json",
    b"[]",
    b'{"object": "event"}',
    json.dumps({"id": "evt_1", "object": "event", "type": "x", "data": {}}).encode(),
    json.dumps({"id": "evt_1", "object": "event", "type": "payment_intent.succeeded",
                "data": {"object": {"object": "payment_intent", "id": "pi_1"}}}).encode(),  # no amount, no currency
    event(dict(INTENT, amount="50000")),
])
def test_signed_bodies_that_are_not_readable_events_are_malformed(payload: bytes) -> None:
    with pytest.raises(WebhookRejected) as info:
        gateway().verify_event(payload, sign(payload))
    assert info.value.reason == "MALFORMED"


def test_refund_events_and_other_objects() -> None:
    refund = {"id": "re_1", "object": "refund", "amount": 3_000, "currency": "twd", "status": "failed",
              "payment_intent": "pi_1", "failure_reason": "lost_or_stolen_card", "metadata": {"refund_id": "rf-1"}}
    payload = event(refund, "refund.failed")
    verified = gateway().verify_event(payload, sign(payload))
    assert verified.refund is not None and verified.payment_intent is None
    assert (verified.refund.stripe_refund_id, verified.refund.amount_minor, verified.refund.failure_reason) == \
        ("re_1", 3_000, "lost_or_stolen_card")
    payload = event({"id": "cus_1", "object": "customer"}, "customer.created")
    other = gateway().verify_event(payload, sign(payload))
    assert (other.object_id, other.payment_intent, other.refund) == ("cus_1", None, None)


def test_gateway_settings_are_bounded_and_secrets_do_not_print() -> None:
    with pytest.raises(ValueError):
        gateway(webhook_secret="")
    with pytest.raises(ValueError):
        gateway(max_network_retries=9)
    with pytest.raises(ValueError):
        gateway(timeout_s=120.0)
    text = repr(gateway())
    assert SECRET not in text and "sk_test_unit" not in text
    assert gateway().api_version == STRIPE_API_VERSION
    assert gateway(api_key="sk_live_x").livemode and not gateway().livemode


# --- errors -----------------------------------------------------------------------------------------


def test_sdk_errors_become_refused_or_unavailable() -> None:
    card = stripe.CardError("declined", None, "card_declined", http_status=402, headers={"request-id": "req_1"},
                            json_body={"error": {"type": "card_error", "code": "card_declined",
                                                 "decline_code": "insufficient_funds"}})
    refused = _translate(card)
    assert isinstance(refused, StripeRefused)
    assert (refused.code, refused.decline_code, refused.request_id) == ("card_declined", "insufficient_funds", "req_1")
    assert isinstance(_translate(stripe.InvalidRequestError("no such intent", "id", "resource_missing",
                                                            http_status=404)), StripeRefused)
    assert isinstance(_translate(stripe.IdempotencyError("key reused", http_status=400)), StripeRefused)
    for retryable in (stripe.APIConnectionError("down"), stripe.RateLimitError("slow down", http_status=429),
                      stripe.APIError("boom", http_status=500), stripe.APIError("in flight", http_status=409),
                      stripe.AuthenticationError("bad key", http_status=401)):
        assert isinstance(_translate(retryable), StripeUnavailable), retryable


# --- service days, settings, ids --------------------------------------------------------------------


@pytest.mark.parametrize(("local", "expected"), [
    (datetime(2026, 12, 1, 4, 29, 59), date(2026, 11, 30)),
    (datetime(2026, 12, 1, 4, 30, 0), date(2026, 12, 1)),
    (datetime(2026, 12, 1, 23, 59), date(2026, 12, 1)),
    (datetime(2026, 12, 2, 0, 30), date(2026, 12, 1)),
])
def test_service_day_runs_from_0430_to_0429_local_time(local: datetime, expected: date) -> None:
    moment = local.replace(tzinfo=TAIPEI).astimezone(timezone.utc)
    assert service_day(moment, TAIPEI, clock_time(4, 30)) == expected
    with pytest.raises(ValueError):
        service_day(local, TAIPEI, clock_time(4, 30))


def test_setting_parsers() -> None:
    assert service_day_start("04:30") == clock_time(4, 30)
    for bad in ("4:30", "24:00", "04:60", "noon"):
        with pytest.raises(ValueError):
            service_day_start(bad)
    assert timezone_name("Asia/Taipei") == "Asia/Taipei"
    with pytest.raises(ValueError):
        timezone_name("Mars/Olympus")
    secret = webhook_secret("whsec_0123456789abcdef")
    assert secret == "whsec_0123456789abcdef" and "0123" not in repr(secret)
    for bad in ("sk_test_123456789012", "whsec_"):
        with pytest.raises(ValueError):
            webhook_secret(bad)


def test_top_up_config_from_settings_and_its_bounds() -> None:
    settings = SimpleNamespace(stripe_webhook_secret="whsec_0123456789abcdef", webhook_listen="127.0.0.1:8443",
                               top_up_max_minor=300_000, top_up_pending_ttl_s=600, stripe_timeout_ms=4_000,
                               service_day_start=clock_time(5, 0))
    config = top_up_config(settings)
    assert (config.webhook_listen, config.top_up_max_minor, config.pending_ttl_s, config.stripe_timeout_s,
            config.service_day_start, config.top_up_min_minor) == \
        ("127.0.0.1:8443", 300_000, 600, 4.0, clock_time(5, 0), 10_000)
    assert "0123456789" not in repr(config)
    with pytest.raises(ValueError):
        TopUpConfig(webhook_secret="whsec_x", top_up_min_minor=600_000, top_up_max_minor=500_000)
    with pytest.raises(Exception):
        TopUpConfig(webhook_secret="whsec_x", service_day_timezone="Nowhere/Town")


def test_derived_transfer_ids_fit_the_ledger_and_are_deterministic() -> None:
    longest = "a" * CLIENT_ID_CHARS_MAX
    for derived in (credit_transfer_id(longest), refund_transfer_id(longest), reversal_transfer_id(longest)):
        assert ID_PATTERN.match(derived), derived
    assert len({credit_transfer_id("x"), refund_transfer_id("x"), reversal_transfer_id("x")}) == 3
    first = auto_reload_top_up_id("rider-1", date(2026, 12, 1))
    assert first == auto_reload_top_up_id("rider-1", date(2026, 12, 1))
    assert first != auto_reload_top_up_id("rider-1", date(2026, 12, 2))
    assert first != auto_reload_top_up_id("rider-2", date(2026, 12, 1))
    assert len(first) <= CLIENT_ID_CHARS_MAX and ID_PATTERN.match(first)
    with pytest.raises(errors.InvalidArgument):
        check_client_id("a" * (CLIENT_ID_CHARS_MAX + 1), "top_up_id")


def test_top_up_statuses_map_to_the_contract() -> None:
    now = datetime(2026, 12, 1, tzinfo=timezone.utc)
    base = TopUp("tu-1", "rider-1", 50_000, "TWD", TopUpOrigin.RIDER, TopUpStatus.PENDING, b"", "pi_1", "secret",
                 None, None, None, 0, "", now, now)
    expected = {
        TopUpStatus.PENDING: wallet_pb2.TOP_UP_STATUS_PENDING,
        TopUpStatus.SUCCEEDED: wallet_pb2.TOP_UP_STATUS_SUCCEEDED,
        TopUpStatus.FAILED: wallet_pb2.TOP_UP_STATUS_FAILED,
        TopUpStatus.OVER_LIMIT: wallet_pb2.TOP_UP_STATUS_FAILED,
        TopUpStatus.PARTIALLY_REFUNDED: wallet_pb2.TOP_UP_STATUS_PARTIALLY_REFUNDED,
        TopUpStatus.REFUNDED: wallet_pb2.TOP_UP_STATUS_REFUNDED,
    }
    for status, proto in expected.items():
        message = top_up_to_proto(TopUp(**{**base.__dict__, "status": status}))
        assert message.status == proto
        assert (message.amount.amount_minor, message.amount.currency, message.payment_intent_id) == (50_000, "TWD", "pi_1")
    assert "secret" not in repr(base)  # the client secret never reaches logs


def test_one_adapter_per_service_imports_the_stripe_sdk() -> None:
    """Each service that talks to Stripe does it through one module of its own, which pins
    the API version; nothing else in the project imports the SDK."""
    importing = re.compile(r"^\s*(import stripe\b|from stripe\b)", re.MULTILINE)
    offenders = []
    for folder in ("services", "libs", "loadtests", "scripts", "phone_app"):
        for path in (ROOT / folder).rglob("*.py"):
            if importing.search(path.read_text(encoding="utf-8", errors="replace")):
                offenders.append(str(path.relative_to(ROOT)))
    assert sorted(offenders) == ["services/merchant/stripe_gateway.py", "services/settlement/stripe_payouts.py",
                                 "services/wallet/stripe_gateway.py"]
