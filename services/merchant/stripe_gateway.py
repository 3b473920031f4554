"""The merchant service's Stripe adapter: the only module of the service that imports `stripe`.

It does three things, in the merchant service's own terms:

- **Connect onboarding.** `create_connected_account` makes an Express connected account for
  a merchant (idempotency key derived from the merchant id, so a retried Onboard never makes
  a second account) and `create_account_link` makes the short-lived onboarding link where the
  merchant completes KYC at Stripe.
- **Webhooks verified before they are parsed.** `verify_event` checks the Stripe-Signature
  header (HMAC-SHA256 over "timestamp.payload", scheme v1) with the SDK's verifier on the raw
  bytes, then that the signature is at most `webhook_tolerance_s` (300 s) from our clock in
  either direction, and only then decodes the JSON into a small plain record.
- **One explicit client, pinned.** `stripe.StripeClient` with the configured API base
  (stripe-mock in tests), the API version `STRIPE_API_VERSION` (the same as the wallet's, so
  one webhook endpoint configuration fits both), a bounded timeout and bounded retries.
  SDK errors become `StripeUnavailable` (retry later with the same key) or `StripeRefused`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import stripe

# The Stripe API version of every request and webhook; it must equal the wallet's
# (services/wallet/stripe_gateway.py), which a unit test checks.
STRIPE_API_VERSION = "2026-10-28.endive"
WEBHOOK_TOLERANCE_S_DEFAULT = 300
IDEMPOTENCY_KEY_CHARS_MAX = 255
TIMEOUT_S_MAX = 60.0
NETWORK_RETRIES_MAX = 5

_STRIPE_ID = re.compile(r"^[A-Za-z0-9_]{1,255}$")


@dataclass(frozen=True)
class ConnectedAccount:
    """A Stripe Connect account as the merchant service needs it."""

    account_id: str
    charges_enabled: bool
    details_submitted: bool


@dataclass(frozen=True)
class AccountLink:
    """An onboarding link and when it stops working."""

    url: str
    expires_at: datetime


@dataclass(frozen=True)
class WebhookEvent:
    """A verified Stripe event; `account` is set when the event's object is an account."""

    event_id: str
    event_type: str
    livemode: bool
    object_id: str
    account: ConnectedAccount | None = None


class StripeFailure(Exception):
    """Base of what a Stripe call can fail with; carries Stripe's request id when known."""

    def __init__(self, message: str, *, code: str = "", request_id: str = "") -> None:
        self.message = message
        self.code = code
        self.request_id = request_id
        super().__init__(f"{code or 'stripe_error'}: {message}" + (f" (request {request_id})" if request_id else ""))


class StripeUnavailable(StripeFailure):
    """Stripe could not be reached or failed: retry later with the same idempotency key."""


class StripeRefused(StripeFailure):
    """Stripe answered and refused, such as an invalid request; the same request fails again."""


class WebhookRejected(Exception):
    """A delivery that must not be processed; `reason` is BAD_SIGNATURE, STALE or MALFORMED."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


def _translate(exc: stripe.StripeError) -> StripeFailure:
    request_id = getattr(exc, "request_id", None) or ""
    code = getattr(exc, "code", None) or type(exc).__name__
    message = getattr(exc, "user_message", None) or str(exc)
    if isinstance(exc, (stripe.InvalidRequestError, stripe.IdempotencyError, stripe.CardError)):
        return StripeRefused(message, code=code, request_id=request_id)
    return StripeUnavailable(message, code=code, request_id=request_id)


def _key(idempotency_key: str) -> str:
    if not idempotency_key or len(idempotency_key) > IDEMPOTENCY_KEY_CHARS_MAX:
        raise ValueError("every Stripe write needs an idempotency key of 1 to 255 characters")
    return idempotency_key


class StripeGateway:
    """Talks to Stripe (or stripe-mock) with one explicit client. Thread-safe."""

    def __init__(self, *, api_key: str, api_base: str, webhook_secret: str,
                 webhook_tolerance_s: int = WEBHOOK_TOLERANCE_S_DEFAULT, timeout_s: float = 10.0,
                 max_network_retries: int = 2) -> None:
        if not api_key:
            raise ValueError("a Stripe API key is required")
        if not webhook_secret:
            raise ValueError("a webhook signing secret (whsec_...) is required")
        if not 0 < webhook_tolerance_s <= 3600:
            raise ValueError("webhook_tolerance_s must be in 1..3600")
        if not 0 < timeout_s <= TIMEOUT_S_MAX:
            raise ValueError(f"timeout_s must be in (0, {TIMEOUT_S_MAX}]")
        if not 0 <= max_network_retries <= NETWORK_RETRIES_MAX:
            raise ValueError(f"max_network_retries must be in 0..{NETWORK_RETRIES_MAX}")
        self._webhook_secret = webhook_secret
        self._tolerance_s = webhook_tolerance_s
        self.api_base = api_base
        self.livemode = api_key.startswith(("sk_live_", "rk_live_"))
        self._client = stripe.StripeClient(
            api_key, stripe_version=STRIPE_API_VERSION, base_addresses={"api": api_base},
            max_network_retries=max_network_retries,
            http_client=stripe.RequestsClient(timeout=(min(3.0, timeout_s), timeout_s)),
        )

    def __repr__(self) -> str:  # never print keys or secrets
        return f"StripeGateway(api_base={self.api_base!r}, api_version={STRIPE_API_VERSION!r})"

    def create_connected_account(self, *, merchant_id: str, name: str, category: str, country: str, email: str,
                                 idempotency_key: str) -> ConnectedAccount:
        """An Express connected account that can receive transfers (the merchant's payouts)."""
        params: dict[str, Any] = {
            "type": "express",
            "country": country,
            "email": email,
            "business_profile": {"name": name, "mcc": category},
            "capabilities": {"transfers": {"requested": True}},
            "metadata": {"citytap_merchant_id": merchant_id},
        }
        try:
            account = self._client.v1.accounts.create(params=params,  # type: ignore[arg-type]
                                                      options={"idempotency_key": _key(idempotency_key)})
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return _account(account)

    def create_account_link(self, *, account_id: str, return_url: str, refresh_url: str,
                            idempotency_key: str) -> AccountLink:
        """A fresh onboarding link for the connected account."""
        if not _STRIPE_ID.match(account_id):
            raise ValueError("not a Stripe account id")
        params = {"account": account_id, "type": "account_onboarding", "return_url": return_url,
                  "refresh_url": refresh_url}
        try:
            link = self._client.v1.account_links.create(params=params,  # type: ignore[arg-type]
                                                        options={"idempotency_key": _key(idempotency_key)})
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return AccountLink(url=str(link.url), expires_at=datetime.fromtimestamp(int(link.expires_at), timezone.utc))

    def verify_event(self, payload: bytes, signature_header: str | None, *, now_s: float | None = None) -> WebhookEvent:
        """Verify `payload` against its Stripe-Signature header, then decode it.

        Raises WebhookRejected: BAD_SIGNATURE (missing, malformed or wrong signature), STALE
        (a genuine signature more than the tolerance away from now, either way), MALFORMED (a
        correctly signed body that is not a Stripe event we can read)."""
        now_s = time.time() if now_s is None else now_s
        if not signature_header:
            raise WebhookRejected("BAD_SIGNATURE", "no Stripe-Signature header")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise WebhookRejected("BAD_SIGNATURE", "the body is not UTF-8, so it cannot carry a valid signature") from None
        try:
            # Freshness is checked below against our own clock, in both directions.
            stripe.WebhookSignature.verify_header(text, signature_header, self._webhook_secret, tolerance=None)
        except stripe.SignatureVerificationError as exc:
            raise WebhookRejected("BAD_SIGNATURE", str(exc).split(".")[0]) from None
        signed_at = _signed_timestamp(signature_header)
        if abs(now_s - signed_at) > self._tolerance_s:
            raise WebhookRejected("STALE", f"signed at {signed_at}, more than {self._tolerance_s}s from now")
        return _event_from_json(text)


def _signed_timestamp(header: str) -> int:
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t" and value.isdigit():
            return int(value)
    raise WebhookRejected("BAD_SIGNATURE", "no timestamp in the Stripe-Signature header")


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return obj[name]
    except (KeyError, TypeError):
        return None


def _account(obj: Any) -> ConnectedAccount:
    account_id = _get(obj, "id")
    if not isinstance(account_id, str) or not _STRIPE_ID.match(account_id):
        raise ValueError("an account needs an id")
    return ConnectedAccount(account_id=account_id, charges_enabled=_get(obj, "charges_enabled") is True,
                            details_submitted=_get(obj, "details_submitted") is True)


def _event_from_json(text: str) -> WebhookEvent:
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise WebhookRejected("MALFORMED", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("object") != "event":
        raise WebhookRejected("MALFORMED", "the body is not a Stripe event")
    event_id, event_type = body.get("id"), body.get("type")
    if not isinstance(event_id, str) or not _STRIPE_ID.match(event_id) or not isinstance(event_type, str) \
            or not event_type or len(event_type) > 100:
        raise WebhookRejected("MALFORMED", "the event has no valid id or type")
    data = body.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise WebhookRejected("MALFORMED", "the event has no data.object")
    object_id = obj.get("id") if isinstance(obj.get("id"), str) else ""
    livemode = body.get("livemode") is True
    if obj.get("object") == "account":
        try:
            return WebhookEvent(event_id, event_type, livemode, object_id, account=_account(obj))
        except ValueError as exc:
            raise WebhookRejected("MALFORMED", f"the event's account is incomplete: {exc}") from None
    return WebhookEvent(event_id, event_type, livemode, object_id)
