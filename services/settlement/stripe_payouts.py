"""Settlement's Stripe adapter: the only module of the settlement service that imports `stripe`.

Each party's payout for a service day is a Stripe Transfer from the platform's balance to the
party's connected account, created with the payout id (the settlement batch id) as the
idempotency key, so a retried close can never pay twice. The API version is pinned to the
same version as the wallet's (`services/wallet/stripe_gateway.py`), so both services read
Stripe objects of the same shape.

Money at the boundary: the ledger counts ISO 4217 minor units. Stripe pays TWD and HUF out
in whole units of the currency only, so `payable_minor` rounds a party's net down to a whole
unit; the cents left over are carried to the party's next payout, never lost.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import stripe

log = logging.getLogger("citytap.settlement.stripe")

STRIPE_API_VERSION = "2026-10-28.endive"  # the wallet's pinned version; see the module docstring
TIMEOUT_S_MAX = 60.0
NETWORK_RETRIES_MAX = 5
_ACCOUNT = re.compile(r"^acct_[A-Za-z0-9]{1,64}$")

# currency -> payouts must be a multiple of this many minor units (whole units of the currency).
_PAYOUT_MULTIPLE_MINOR = {"TWD": 100, "HUF": 100}


def payable_minor(amount_minor: int, currency: str) -> int:
    """The part of `amount_minor` Stripe can pay out: rounded down to what the currency allows."""
    if amount_minor <= 0:
        return 0
    multiple = _PAYOUT_MULTIPLE_MINOR.get(currency, 1)
    return amount_minor - amount_minor % multiple


class PayoutFailed(Exception):
    """A transfer could not be created. `retryable` is True when the outcome is unknown or the
    cause is on Stripe's side (retry with the same idempotency key), False when Stripe refused."""

    def __init__(self, message: str, *, retryable: bool, request_id: str = "") -> None:
        self.retryable = retryable
        self.request_id = request_id
        super().__init__(message + (f" (request {request_id})" if request_id else ""))


@dataclass(frozen=True)
class SentTransfer:
    """The parts of a Stripe Transfer settlement keeps."""

    stripe_id: str
    amount: int
    currency: str


class StripePayouts:
    """Creates payouts as Stripe Transfers to connected accounts. Thread-safe."""

    def __init__(self, *, api_key: str, api_base: str, timeout_s: float = 10.0, max_network_retries: int = 2) -> None:
        if not api_key:
            raise ValueError("a Stripe API key is required")
        if not 0 < timeout_s <= TIMEOUT_S_MAX:
            raise ValueError(f"timeout_s must be in (0, {TIMEOUT_S_MAX}]")
        if not 0 <= max_network_retries <= NETWORK_RETRIES_MAX:
            raise ValueError(f"max_network_retries must be in 0..{NETWORK_RETRIES_MAX}")
        self.api_base = api_base
        self._client = stripe.StripeClient(
            api_key, stripe_version=STRIPE_API_VERSION, base_addresses={"api": api_base},
            max_network_retries=max_network_retries,
            http_client=stripe.RequestsClient(timeout=(min(3.0, timeout_s), timeout_s)))

    def __repr__(self) -> str:  # never print the key
        return f"StripePayouts(api_base={self.api_base!r})"

    def send(self, *, payout_id: str, destination: str, amount_minor: int, currency: str, service_day: str,
             party: str, party_id: str) -> SentTransfer:
        """Transfer `amount_minor` to the connected account `destination`, idempotently on `payout_id`."""
        if not _ACCOUNT.match(destination):
            raise PayoutFailed(f"{destination!r} is not a Stripe connected account id", retryable=False)
        if amount_minor <= 0 or payable_minor(amount_minor, currency) != amount_minor:
            raise PayoutFailed(f"{amount_minor} {currency} cannot be paid out exactly", retryable=False)
        params = {
            "amount": amount_minor, "currency": currency.lower(), "destination": destination,
            "transfer_group": f"settlement-{service_day}",
            "description": f"CityTap settlement {service_day} for {party} {party_id}"[:350],
            "metadata": {"payout_id": payout_id, "service_day": service_day, "party": party, "party_id": party_id},
        }
        try:
            transfer = self._client.v1.transfers.create(params=params,  # type: ignore[arg-type]
                                                        options={"idempotency_key": payout_id})
        except stripe.StripeError as exc:
            request_id = getattr(exc, "request_id", None) or ""
            refused = isinstance(exc, (stripe.InvalidRequestError, stripe.IdempotencyError, stripe.CardError))
            raise PayoutFailed(str(getattr(exc, "user_message", None) or exc), retryable=not refused,
                               request_id=request_id) from exc
        return SentTransfer(str(transfer.id), int(transfer.amount), str(transfer.currency))
