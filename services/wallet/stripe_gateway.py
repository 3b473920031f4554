"""The wallet's Stripe adapter: the only module in CityTap that imports the `stripe` SDK.

It owns everything about talking to Stripe, so the rest of the wallet deals in its own terms:

- **One explicit client.** `StripeGateway` builds a `stripe.StripeClient` with the configured
  API base (stripe-mock in tests), the pinned API version `STRIPE_API_VERSION`, a bounded
  HTTP timeout and a bounded number of retries. Nothing is global and nothing is created at
  import time.
- **Idempotency keys on every write.** Every method that writes takes a keyword-only
  `idempotency_key`; the caller derives it from its own client-generated id, so a retry of
  the same use case is the same Stripe request and can never charge or refund twice.
- **Bounded retries, only for retryable errors.** The SDK retries (at most
  `max_network_retries` times, with backoff) connection errors, HTTP 409 lock conflicts,
  5xx answers and answers that carry `Stripe-Should-Retry: true`; it never retries a card
  decline or an invalid request. Because the idempotency key is set, such a retry is safe.
- **Errors in our terms.** SDK exceptions become `StripeUnavailable` (nothing happened, or we
  cannot know: retry later with the same key) or `StripeRefused` (Stripe said no: retrying
  the same request will not help), each with Stripe's request id for support tickets.
- **Money converted at the boundary.** The ledger counts ISO 4217 minor units; Stripe
  counts "the currency's smallest unit" with a few special cases. `to_stripe_amount` and
  `from_stripe_amount` are the only places the two meet (see `_STRIPE_SCALE`).
- **Webhooks verified before they are parsed.** `verify_event` checks the Stripe-Signature
  header (HMAC-SHA256 over "timestamp.payload", scheme v1, with a tolerance) with the SDK's
  verifier on the raw bytes, and only then decodes the JSON into small plain records.

TWD (the wallet's default currency). ISO 4217 gives the New Taiwan dollar two decimals and
so does Stripe's API: an amount of NT$100 is sent as 10000. But Stripe lists TWD among its
special cases: it treats TWD as zero-decimal for payouts, which must be whole dollars
(amounts evenly divisible by 100), even though charges may carry cents. Card payments in
Taiwan are made in whole dollars too. We therefore keep the ledger in ISO minor units (so a
fare that includes a discounted fraction stays exact) and send them to Stripe unchanged
(scale 1), but refuse any top-up or refund amount that is not a whole number of dollars
(`INVALID_AMOUNT`): every amount that reaches Stripe can then be charged, refunded and paid
out without rounding, and the clearing account reconciles with Stripe to the unit. HUF has
the same rule. ISK is two-decimal at Stripe but zero-decimal in ISO 4217, so its ledger
amount is multiplied by 100. Three-decimal currencies (KWD, BHD, JOD, OMR, TND) must end
in 0 at Stripe.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import stripe

from libs import errors

log = logging.getLogger("citytap.wallet.stripe")

# The Stripe API version every request and every webhook endpoint of CityTap uses. It is
# pinned here rather than taken from the SDK, so an SDK upgrade cannot silently change the
# shape of the objects we read; the webhook endpoint in Stripe's dashboard must be created
# with this same version so the events it sends match what `verify_event` reads.
STRIPE_API_VERSION = "2026-10-28.endive"

# Stripe's documented default tolerance for webhook timestamps (and ours): five minutes.
WEBHOOK_TOLERANCE_S_DEFAULT = 300
# Limits on what we send: Stripe allows 50 metadata keys of 40 characters, values of 500.
METADATA_KEYS_MAX = 20
METADATA_VALUE_CHARS_MAX = 500
IDEMPOTENCY_KEY_CHARS_MAX = 255
TIMEOUT_S_MAX = 60.0
NETWORK_RETRIES_MAX = 5

_STRIPE_ID = re.compile(r"^[A-Za-z0-9_]{1,255}$")

# currency -> (Stripe amount per ledger minor unit, Stripe amount must be a multiple of this).
# Everything not listed is sent unchanged, with no divisibility rule (USD, EUR, JPY, KRW ...:
# Stripe's smallest unit and ISO 4217's minor unit coincide).
_STRIPE_SCALE: dict[str, tuple[int, int]] = {
    "TWD": (1, 100),  # two-decimal, but charged and paid out in whole dollars (see above)
    "HUF": (1, 100),  # the same special case as TWD
    "ISK": (100, 100),  # zero-decimal in ISO 4217, sent as two-decimal with 00 cents
    "BHD": (1, 10), "JOD": (1, 10), "KWD": (1, 10), "OMR": (1, 10), "TND": (1, 10),
}


# --- money at the boundary ----------------------------------------------------------------


def to_stripe_amount(amount_minor: int, currency: str) -> int:
    """The `amount` Stripe expects for `amount_minor` ISO minor units of `currency`.

    Raises InvalidArgument(INVALID_AMOUNT) when Stripe could not take the amount exactly
    (not positive, or cents of a currency charged in whole units)."""
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int) or amount_minor <= 0:
        raise errors.InvalidArgument("INVALID_AMOUNT", "the amount must be a positive whole number of minor units",
                                     field="amount")
    scale, multiple = _STRIPE_SCALE.get(currency, (1, 1))
    amount = amount_minor * scale
    if amount % multiple:
        step = multiple // scale
        raise errors.InvalidArgument(
            "INVALID_AMOUNT", f"{currency} amounts go to Stripe in multiples of {step} minor units "
                              f"(whole units of the currency); got {amount_minor}",
            field="amount", multiple_minor=str(step))
    return amount


def from_stripe_amount(amount: int, currency: str) -> int:
    """The ledger's minor units for a Stripe `amount` in `currency` (upper or lower case)."""
    scale, _ = _STRIPE_SCALE.get(currency.upper(), (1, 1))
    if amount % scale:
        raise ValueError(f"a Stripe {currency} amount of {amount} is not a whole number of ledger minor units")
    return amount // scale


# --- what we read back --------------------------------------------------------------------


@dataclass(frozen=True)
class PaymentIntent:
    """The parts of a Stripe PaymentIntent the wallet uses, amounts in ledger minor units."""

    payment_intent_id: str
    status: str
    amount_minor: int
    currency: str  # upper case, as the ledger writes it
    metadata: Mapping[str, str]
    client_secret: str = field(default="", repr=False)  # lets the rider's app pay; never logged
    failure_code: str = ""


@dataclass(frozen=True)
class Refund:
    """The parts of a Stripe Refund the wallet uses."""

    stripe_refund_id: str
    status: str  # pending, requires_action, succeeded, failed or canceled
    amount_minor: int
    currency: str
    payment_intent_id: str
    metadata: Mapping[str, str]
    failure_reason: str = ""


@dataclass(frozen=True)
class WebhookEvent:
    """A verified Stripe event. `payment_intent` or `refund` is set when the event's object
    is one; other objects are left unread (the handler acknowledges and ignores them)."""

    event_id: str
    event_type: str
    livemode: bool
    object_id: str
    payment_intent: PaymentIntent | None = None
    refund: Refund | None = None


# --- errors -------------------------------------------------------------------------------


class StripeFailure(Exception):
    """Base of what a Stripe call can fail with; carries Stripe's request id when known."""

    def __init__(self, message: str, *, code: str = "", http_status: int | None = None, request_id: str = "") -> None:
        self.message = message
        self.code = code
        self.http_status = http_status
        self.request_id = request_id
        super().__init__(f"{code or 'stripe_error'}: {message}" + (f" (request {request_id})" if request_id else ""))


class StripeUnavailable(StripeFailure):
    """Stripe could not be reached, timed out, rate-limited us, failed internally, or rejected
    our credentials: the outcome is unknown or not the rider's fault. Retry later with the
    same idempotency key; Stripe replays the original answer if the request went through."""


class StripeRefused(StripeFailure):
    """Stripe answered and refused: a declined card, an invalid request, a refund larger
    than what is left. The same request will be refused again."""

    def __init__(self, message: str, *, code: str = "", decline_code: str = "", http_status: int | None = None,
                 request_id: str = "") -> None:
        super().__init__(message, code=code, http_status=http_status, request_id=request_id)
        self.decline_code = decline_code


class WebhookRejected(Exception):
    """A webhook delivery that must not be processed; `reason` is BAD_SIGNATURE, STALE or
    MALFORMED. The endpoint answers 400 without touching anything."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


def _translate(exc: stripe.StripeError) -> StripeFailure:
    request_id = getattr(exc, "request_id", None) or ""
    status = getattr(exc, "http_status", None)
    code = getattr(exc, "code", None) or ""
    message = getattr(exc, "user_message", None) or str(exc)
    if isinstance(exc, stripe.CardError):
        detail = getattr(exc, "error", None)  # the body's "error" object carries the decline code
        decline_code = _text(getattr(detail, "decline_code", None)) if detail is not None else ""
        return StripeRefused(message, code=code or "card_declined", decline_code=decline_code, http_status=status,
                             request_id=request_id)
    if isinstance(exc, (stripe.APIConnectionError, stripe.RateLimitError, stripe.AuthenticationError,
                        stripe.PermissionError)):
        return StripeUnavailable(message, code=code or type(exc).__name__, http_status=status, request_id=request_id)
    if isinstance(exc, (stripe.InvalidRequestError, stripe.IdempotencyError)):
        return StripeRefused(message, code=code or type(exc).__name__, http_status=status, request_id=request_id)
    # APIError (5xx, or a 409 because a request with the same key is still in flight, once the
    # SDK's retries are spent) and anything unexpected: we cannot know what happened, so never
    # assume a refusal.
    return StripeUnavailable(message, code=code or type(exc).__name__, http_status=status, request_id=request_id)


# --- the gateway --------------------------------------------------------------------------


def _metadata(values: Mapping[str, str]) -> dict[str, str]:
    if len(values) > METADATA_KEYS_MAX:
        raise ValueError(f"at most {METADATA_KEYS_MAX} metadata keys")
    out = {}
    for key, value in values.items():
        if not isinstance(value, str) or len(value) > METADATA_VALUE_CHARS_MAX:
            raise ValueError(f"metadata {key!r} must be text of at most {METADATA_VALUE_CHARS_MAX} characters")
        out[key] = value
    return out


def _check_key(idempotency_key: str) -> str:
    if not idempotency_key or len(idempotency_key) > IDEMPOTENCY_KEY_CHARS_MAX:
        raise ValueError("every Stripe write needs an idempotency key of 1 to 255 characters")
    return idempotency_key


def _check_stripe_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not _STRIPE_ID.match(value):
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{what} is not a Stripe id", field=what)
    return value


class StripeGateway:
    """Talks to Stripe (or stripe-mock) with one explicit client. Thread-safe."""

    def __init__(self, *, api_key: str, api_base: str, webhook_secret: str,
                 webhook_tolerance_s: int = WEBHOOK_TOLERANCE_S_DEFAULT, timeout_s: float = 10.0,
                 connect_timeout_s: float = 3.0, max_network_retries: int = 2,
                 api_version: str = STRIPE_API_VERSION) -> None:
        if not api_key:
            raise ValueError("a Stripe API key is required")
        if not webhook_secret or not webhook_secret.strip():
            raise ValueError("a webhook signing secret (whsec_...) is required")
        if not 0 < webhook_tolerance_s <= 3600:
            raise ValueError("webhook_tolerance_s must be in 1..3600")
        if not 0 < connect_timeout_s <= timeout_s <= TIMEOUT_S_MAX:
            raise ValueError(f"timeouts must satisfy 0 < connect_timeout_s <= timeout_s <= {TIMEOUT_S_MAX}")
        if not 0 <= max_network_retries <= NETWORK_RETRIES_MAX:
            raise ValueError(f"max_network_retries must be in 0..{NETWORK_RETRIES_MAX}")
        self._webhook_secret = webhook_secret
        self._tolerance_s = webhook_tolerance_s
        self.api_base = api_base
        self.api_version = api_version
        # Events carry `livemode`; a test-mode key must never act on live events and back.
        self.livemode = api_key.startswith(("sk_live_", "rk_live_"))
        self._client = stripe.StripeClient(
            api_key,
            stripe_version=api_version,
            base_addresses={"api": api_base},
            max_network_retries=max_network_retries,
            http_client=stripe.RequestsClient(timeout=(connect_timeout_s, timeout_s)),
        )

    def __repr__(self) -> str:  # never print keys or secrets
        return f"StripeGateway(api_base={self.api_base!r}, api_version={self.api_version!r})"

    # --- writes ---------------------------------------------------------------------------

    def create_payment_intent(self, *, amount_minor: int, currency: str, idempotency_key: str,
                              metadata: Mapping[str, str], description: str = "",
                              customer_id: str | None = None, payment_method_id: str | None = None,
                              off_session: bool = False) -> PaymentIntent:
        """Create a card PaymentIntent. With `off_session`, charge the saved `payment_method_id`
        of `customer_id` now, without the rider present (confirm=True, off_session=True)."""
        params: dict[str, Any] = {
            "amount": to_stripe_amount(amount_minor, currency),
            "currency": currency.lower(),
            "payment_method_types": ["card"],
            "metadata": _metadata(metadata),
        }
        if description:
            params["description"] = description[:500]
        if off_session:
            if not customer_id or not payment_method_id:
                raise ValueError("an off-session charge needs a customer and a saved payment method")
            params.update(customer=_check_stripe_id(customer_id, "customer_id"),
                          payment_method=_check_stripe_id(payment_method_id, "payment_method_id"),
                          confirm=True, off_session=True)
        options = {"idempotency_key": _check_key(idempotency_key)}
        try:
            intent = self._client.v1.payment_intents.create(params=params, options=options)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return _payment_intent(intent)

    def create_refund(self, *, payment_intent_id: str, amount_minor: int, currency: str, idempotency_key: str,
                      metadata: Mapping[str, str]) -> Refund:
        """Refund `amount_minor` of a succeeded PaymentIntent back to the card it was paid with."""
        params: dict[str, Any] = {
            "payment_intent": _check_stripe_id(payment_intent_id, "payment_intent_id"),
            "amount": to_stripe_amount(amount_minor, currency),
            "reason": "requested_by_customer",
            "metadata": _metadata(metadata),
        }
        options = {"idempotency_key": _check_key(idempotency_key)}
        try:
            refund = self._client.v1.refunds.create(params=params, options=options)  # type: ignore[arg-type]
        except stripe.StripeError as exc:
            raise _translate(exc) from exc
        return _refund(refund, currency)

    # --- webhooks -------------------------------------------------------------------------

    def verify_event(self, payload: bytes, signature_header: str | None, *, now_s: float | None = None) -> WebhookEvent:
        """Verify `payload` against its Stripe-Signature header, then decode it.

        Raises WebhookRejected: BAD_SIGNATURE (missing, malformed or wrong signature),
        STALE (a correct signature whose timestamp is more than the tolerance away from now),
        MALFORMED (a correctly signed body that is not a Stripe event we can read)."""
        now_s = time.time() if now_s is None else now_s
        if not signature_header:
            raise WebhookRejected("BAD_SIGNATURE", "no Stripe-Signature header")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError:
            raise WebhookRejected("BAD_SIGNATURE", "the body is not UTF-8, so it cannot carry a valid signature") from None
        try:
            # No tolerance here: freshness is checked below against our own clock, in both
            # directions, once we know the signature itself is genuine.
            stripe.WebhookSignature.verify_header(text, signature_header, self._webhook_secret, tolerance=None)
        except stripe.SignatureVerificationError as exc:
            raise WebhookRejected("BAD_SIGNATURE", str(exc).split(".")[0]) from None
        signed_at = _signed_timestamp(signature_header)
        if abs(now_s - signed_at) > self._tolerance_s:
            raise WebhookRejected("STALE", f"signed at {signed_at}, more than {self._tolerance_s}s from now")
        return _event_from_json(text)


def _signed_timestamp(header: str) -> int:
    """The `t=` of a header the SDK has already accepted."""
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        if key == "t":
            return int(value)
    raise WebhookRejected("BAD_SIGNATURE", "no timestamp in the Stripe-Signature header")


def _text(value: object, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


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
    object_id = _text(obj.get("id"))
    livemode = body.get("livemode") is True
    try:
        if obj.get("object") == "payment_intent":
            return WebhookEvent(event_id, event_type, livemode, object_id, payment_intent=_payment_intent(obj))
        if obj.get("object") == "refund":
            return WebhookEvent(event_id, event_type, livemode, object_id, refund=_refund(obj))
    except (KeyError, TypeError, ValueError) as exc:
        raise WebhookRejected("MALFORMED", f"the event's {obj.get('object')} is incomplete: {exc}") from None
    return WebhookEvent(event_id, event_type, livemode, object_id)


def _get(obj: Any, name: str) -> Any:
    """Read a field of an SDK StripeObject or of a plain dict from a webhook body."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _amount_of(obj: Any, currency: str) -> int:
    amount = _get(obj, "amount")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
        raise ValueError("amount is not a whole number")
    return from_stripe_amount(amount, currency)


def _payment_intent(obj: Any) -> PaymentIntent:
    intent_id, currency = _get(obj, "id"), _get(obj, "currency")
    if not isinstance(intent_id, str) or not intent_id or not isinstance(currency, str) or len(currency) != 3:
        raise ValueError("a PaymentIntent needs an id and a currency")
    error = _get(obj, "last_payment_error")
    failure = ""
    if error:
        failure = _text(_get(error, "decline_code")) or _text(_get(error, "code")) or "payment_failed"
    return PaymentIntent(
        payment_intent_id=intent_id, status=_text(_get(obj, "status")), amount_minor=_amount_of(obj, currency),
        currency=currency.upper(), metadata=_str_map(_get(obj, "metadata")),
        client_secret=_text(_get(obj, "client_secret")), failure_code=failure,
    )


def _refund(obj: Any, currency_hint: str = "") -> Refund:
    refund_id = _get(obj, "id")
    currency = _text(_get(obj, "currency")) or currency_hint
    if not isinstance(refund_id, str) or not refund_id or len(currency) != 3:
        raise ValueError("a Refund needs an id and a currency")
    intent = _get(obj, "payment_intent")
    intent_id = intent if isinstance(intent, str) else _text(_get(intent, "id")) if intent else ""
    return Refund(
        stripe_refund_id=refund_id, status=_text(_get(obj, "status")), amount_minor=_amount_of(obj, currency),
        currency=currency.upper(), payment_intent_id=intent_id, metadata=_str_map(_get(obj, "metadata")),
        failure_reason=_text(_get(obj, "failure_reason")),
    )
