"""The merchant service's use cases and their PostgreSQL state.

`Merchants` holds every use case: onboarding through Stripe Connect, the webhook that
verifies a merchant, API keys, till charges and refunds. Each is a few short transactions
around at most one call to another system (the wallet, Stripe or settlement), never a
transaction held open across such a call.

Charges, step by step (refunds follow the same shape):

1. Decide: check the request, the merchant (VERIFIED), the credential (`credentials.py`),
   the split contract in force now and the rider's limits; then, under a per-rider advisory
   lock so two tills cannot both pass the day limit, record the charge PENDING with its
   split fixed. A refused charge records nothing.
2. Post: one linked batch in the wallet whose transfer ids derive from the charge id.
3. Confirm: mark it SUCCEEDED and enqueue ChargeSucceeded in the same transaction. If the
   wallet refused the batch (insufficient funds, a blocked account), the PENDING row is
   deleted instead and the wallet's reason is returned.

If the wallet's answer is lost (UNAVAILABLE), the charge stays PENDING and counts against the
rider's day; the till retries with the same order id, which posts the same batch again (the
wallet answers with the original transfers, or refuses it for good) and confirms or removes
the row.

A charge (or refund) still PENDING `in_doubt_after_s` after it was recorded is in doubt: a
till that never retried. Retries stop posting it then (they are answered UNAVAILABLE until
it is settled), and once a further margin has passed (the wallet's deadline and some, so no
post of it can still be in flight) `settle_in_doubt` asks the wallet (GetTransfers) whether
its batch was posted: if so it is confirmed and its event published, as if the till had
retried; if not it is removed unpaid and the order id is free again. Nothing the ledger
moved is left unrecorded here, and nothing is charged that the till gave up on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from citytap.common.v1 import credential_pb2
from citytap.merchant.v1 import events_pb2
from libs import errors, outbox, qr_nonces, splits
from libs.money import MoneyError
from libs.protos import timestamp_pb
from libs.stripe_webhooks import WebhookResponse
from services.merchant import convert
from services.merchant.domain import (
    API_KEYS_PER_MERCHANT_MAX,
    CHARGE_TRANSFER_PREFIX,
    REFUND_TRANSFER_PREFIX,
    SCOPE_CHARGES_READ,
    SCOPE_CHARGES_WRITE,
    SCOPE_REFUNDS_WRITE,
    ApiKey,
    Caller,
    Charge,
    ChargeInput,
    ChargeStatus,
    CredentialKind,
    Limits,
    Merchant,
    MerchantStatus,
    OnboardInput,
    Refund,
    RefundInput,
    ScopedVersion,
    ServiceDay,
    charge_plan,
    charge_status,
    check_label,
    check_limits,
    check_merchant_id,
    check_client_id,
    check_scopes,
    contract_in_force,
    new_api_key,
    parse_api_key,
    payable_account_id,
    refund_plan,
    secret_matches,
    splits_from_json,
    splits_to_json,
)
from services.merchant.stripe_gateway import AccountLink, StripeGateway, StripeRefused, StripeUnavailable, WebhookRejected
from services.merchant.credentials import CredentialResolver
from services.merchant.wallet_client import WalletClient, WalletRefused

log = logging.getLogger("citytap.merchant")

TOPIC = "citytap.merchant.v1.events"
IN_DOUBT_AFTER_S_DEFAULT = 60
SETTLE_MARGIN_S_DEFAULT = 30.0
SETTLE_BATCH_MAX = 100
STRIPE_KEY_ACCOUNT = "citytap:merchant-account:"
STRIPE_KEY_LINK = "citytap:merchant-link:"


class ContractSource(Protocol):
    def versions(self, *, refresh: bool = False) -> list[ScopedVersion]: ...


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _advisory_key(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)


class Merchants:
    """The use cases of the merchant service over its schema, the wallet, Stripe and settlement."""

    def __init__(self, pool: ConnectionPool, *, schema: str, wallet: WalletClient, credentials: CredentialResolver,
                 contracts: ContractSource, stripe: StripeGateway, limits: Limits, service_day: ServiceDay,
                 nonces: Any, clock: Callable[[], datetime] = utc_now, in_doubt_after_s: int = IN_DOUBT_AFTER_S_DEFAULT,
                 settle_margin_s: float = SETTLE_MARGIN_S_DEFAULT) -> None:
        """`nonces` is the Redis client holding the network's phone QR claims (libs.qr_nonces);
        `in_doubt_after_s` and `settle_margin_s` as in the module docstring."""
        self._pool = pool
        self._in_doubt_after = timedelta(seconds=in_doubt_after_s)
        self._settle_after = timedelta(seconds=in_doubt_after_s + settle_margin_s)
        self._nonces = nonces
        self._schema = schema
        self._wallet = wallet
        self._credentials = credentials
        self._contracts = contracts
        self._stripe = stripe
        self.limits = limits
        self._service_day = service_day
        self._clock = clock

    # --- plumbing ---------------------------------------------------------------------------

    def _sql(self, text: str) -> str:
        return text.replace("{s}", f'"{self._schema}"')

    def _tx(self, work: Callable[[psycopg.Connection], Any]) -> Any:
        try:
            with self._pool.connection() as conn, conn.transaction():
                return work(conn)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise errors.Unavailable("UNAVAILABLE", "the merchant database is unavailable; retry with the same id",
                                     dependency="postgres") from exc

    def _one(self, conn: psycopg.Connection, text: str, params: Sequence[Any] = ()) -> dict | None:
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(self._sql(text), params).fetchone()

    def _all(self, conn: psycopg.Connection, text: str, params: Sequence[Any] = ()) -> list[dict]:
        with conn.cursor(row_factory=dict_row) as cur:
            return cur.execute(self._sql(text), params).fetchall()

    def _emit(self, conn: psycopg.Connection, merchant_id: str, occurred_at: datetime, **payload: Any) -> None:
        outbox.enqueue(conn, self._schema, TOPIC, convert.envelope(merchant_id, occurred_at, **payload))

    # --- merchants --------------------------------------------------------------------------

    @staticmethod
    def _merchant(row: dict) -> Merchant:
        return Merchant(row["id"], row["name"], row["category"], row["country"], row["email"],
                        MerchantStatus(row["status"]), row["stripe_account_id"], row["payable_account_id"],
                        row["created_at"], row["verified_at"], bytes(row["request_hash"]))

    def get_merchant(self, merchant_id: str, conn: psycopg.Connection | None = None) -> Merchant:
        check_merchant_id(merchant_id)
        if conn is None:
            return self._tx(lambda c: self.get_merchant(merchant_id, c))
        row = self._one(conn, "SELECT * FROM {s}.merchants WHERE id = %s", (merchant_id,))
        if row is None:
            raise errors.NotFound("NOT_FOUND", f"no merchant {merchant_id}", resource="merchant")
        return self._merchant(row)

    def onboard(self, request: OnboardInput) -> tuple[Merchant, AccountLink]:
        """Register the merchant (idempotent on its id), open its payable in the wallet, make
        its Connect account, and return it with a fresh onboarding link."""
        request = request.validate()
        fingerprint = request.fingerprint()

        def register(conn: psycopg.Connection) -> Merchant:
            row = self._one(conn, "SELECT * FROM {s}.merchants WHERE id = %s FOR UPDATE", (request.merchant_id,))
            if row is None:
                row = self._one(conn, "INSERT INTO {s}.merchants (id, name, category, country, email, request_hash,"
                                " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING"
                                " RETURNING *", (request.merchant_id, request.name, request.category, request.country,
                                                 request.email, fingerprint, self._clock()))
                if row is None:  # a concurrent Onboard of the same id won; compare with it
                    row = self._one(conn, "SELECT * FROM {s}.merchants WHERE id = %s", (request.merchant_id,))
            merchant = self._merchant(row)  # type: ignore[arg-type]
            if merchant.request_hash != fingerprint:
                raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"merchant {request.merchant_id} exists with other details",
                                      merchant_id=request.merchant_id)
            return merchant

        merchant = self._tx(register)
        if merchant.payable_account_id is None:
            try:
                payable = self._wallet.open_payable(account_id=payable_account_id(merchant.merchant_id),
                                                    merchant_id=merchant.merchant_id, currency=self.limits.currency)
            except WalletRefused as refusal:
                raise refusal.error from refusal
            self._tx(lambda c: c.execute(self._sql("UPDATE {s}.merchants SET payable_account_id = %s WHERE id = %s"
                                                   " AND payable_account_id IS NULL"), (payable, merchant.merchant_id)))
        if merchant.stripe_account_id is None:
            account = self._stripe_call(lambda: self._stripe.create_connected_account(
                merchant_id=merchant.merchant_id, name=merchant.name, category=merchant.category,
                country=merchant.country, email=merchant.email,
                idempotency_key=f"{STRIPE_KEY_ACCOUNT}{merchant.merchant_id}"))

            def store(conn: psycopg.Connection) -> None:
                row = self._one(conn, "UPDATE {s}.merchants SET stripe_account_id = %s WHERE id = %s"
                                " AND stripe_account_id IS NULL RETURNING *", (account.account_id, merchant.merchant_id))
                if row is not None:
                    stored = self._merchant(row)
                    self._emit(conn, stored.merchant_id, self._clock(), merchant_onboarded=events_pb2.MerchantOnboarded(
                        merchant=convert.merchant_pb(stored, self.limits)))

            self._tx(store)
        merchant = self.get_merchant(merchant.merchant_id)
        assert merchant.stripe_account_id is not None
        link = self._stripe_call(lambda: self._stripe.create_account_link(
            account_id=merchant.stripe_account_id, return_url=request.return_url,  # type: ignore[arg-type]
            refresh_url=request.refresh_url, idempotency_key=f"{STRIPE_KEY_LINK}{merchant.merchant_id}:{uuid.uuid4().hex}"))
        return merchant, link

    @staticmethod
    def _stripe_call(call: Callable[[], Any]) -> Any:
        try:
            return call()
        except StripeUnavailable as exc:
            raise errors.Unavailable("UNAVAILABLE", "Stripe could not be reached; retry with the same merchant id",
                                     dependency="stripe") from exc
        except StripeRefused as exc:
            raise errors.InvalidArgument("INVALID_ARGUMENT", f"Stripe refused the merchant's details: {exc.message}",
                                         stripe_code=exc.code) from exc

    def handle_webhook(self, payload: bytes, signature_header: str | None) -> WebhookResponse:
        """A Stripe Connect delivery: verified before it is read, deduplicated on the event id;
        account.updated with charges_enabled marks the merchant VERIFIED (once)."""
        try:
            event = self._stripe.verify_event(payload, signature_header)
        except WebhookRejected as rejected:
            log.warning("webhook rejected", extra={"fields": {"reason": rejected.reason, "detail": rejected.message}})
            return WebhookResponse(400, rejected.reason)
        if event.livemode != self._stripe.livemode:
            return WebhookResponse(200, "IGNORED_MODE", event.event_id, event.event_type)
        if event.event_type != "account.updated" or event.account is None:
            return WebhookResponse(200, "IGNORED", event.event_id, event.event_type)
        account = event.account

        def work(conn: psycopg.Connection) -> str:
            now = self._clock()
            first = self._one(conn, "INSERT INTO {s}.stripe_webhook_events (event_id, event_type, object_id, outcome,"
                              " received_at) VALUES (%s, %s, %s, '', %s) ON CONFLICT (event_id) DO NOTHING RETURNING 1",
                              (event.event_id, event.event_type, event.object_id, now))
            if first is None:
                return "DUPLICATE"
            row = self._one(conn, "SELECT * FROM {s}.merchants WHERE stripe_account_id = %s FOR UPDATE",
                            (account.account_id,))
            if row is None:
                outcome = "UNKNOWN_ACCOUNT"
            elif not account.charges_enabled:
                outcome = "NOT_ENABLED"
            elif row["status"] == MerchantStatus.VERIFIED.value:
                outcome = "ALREADY_VERIFIED"
            elif row["status"] != MerchantStatus.ONBOARDING.value or row["payable_account_id"] is None:
                outcome = "IGNORED_STATE"
            else:
                conn.execute(self._sql("UPDATE {s}.merchants SET status = 'VERIFIED', verified_at = %s WHERE id = %s"),
                             (now, row["id"]))
                self._emit(conn, row["id"], now, merchant_verified=events_pb2.MerchantVerified(
                    merchant_id=row["id"], stripe_account_id=account.account_id,
                    verified_at=timestamp_pb(now)))
                outcome = "VERIFIED"
            conn.execute(self._sql("UPDATE {s}.stripe_webhook_events SET outcome = %s WHERE event_id = %s"),
                         (outcome, event.event_id))
            return outcome

        try:
            outcome = self._tx(work)
        except errors.Unavailable:
            return WebhookResponse(503, "RETRY", event.event_id, event.event_type)
        return WebhookResponse(200, outcome, event.event_id, event.event_type)

    # --- API keys ---------------------------------------------------------------------------

    @staticmethod
    def _api_key(row: dict) -> ApiKey:
        return ApiKey(row["id"], row["merchant_id"], row["label"], row["secret_prefix"], tuple(row["scopes"]),
                      row["created_at"], row["revoked_at"])

    def create_api_key(self, merchant_id: str, label: str, scopes: Sequence[str]) -> tuple[ApiKey, str]:
        """A new key; its secret is returned here once and only its SHA-256 is kept."""
        check_merchant_id(merchant_id)
        check_label(label)
        granted = check_scopes(list(scopes))
        key = new_api_key()

        def work(conn: psycopg.Connection) -> ApiKey:
            if self._one(conn, "SELECT id FROM {s}.merchants WHERE id = %s FOR UPDATE", (merchant_id,)) is None:
                raise errors.NotFound("NOT_FOUND", f"no merchant {merchant_id}", resource="merchant")
            live = self._one(conn, "SELECT count(*) AS n FROM {s}.api_keys WHERE merchant_id = %s AND revoked_at IS NULL",
                             (merchant_id,))
            if live is not None and live["n"] >= API_KEYS_PER_MERCHANT_MAX:
                raise errors.LimitExceeded("LIMIT_EXCEEDED", f"a merchant has at most {API_KEYS_PER_MERCHANT_MAX} live "
                                           "keys; revoke one first", limit="api_keys")
            row = self._one(conn, "INSERT INTO {s}.api_keys (id, merchant_id, label, secret_prefix, secret_hash, scopes,"
                            " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING *",
                            (key.key_id, merchant_id, label, key.secret_prefix, key.secret_hash, list(granted),
                             self._clock()))
            return self._api_key(row)  # type: ignore[arg-type]

        return self._tx(work), key.secret

    def revoke_api_key(self, merchant_id: str, key_id: str) -> ApiKey:
        """Stop a key from working; revoking a revoked key returns it unchanged."""
        check_merchant_id(merchant_id)
        check_client_id(key_id, "key_id")

        def work(conn: psycopg.Connection) -> ApiKey:
            row = self._one(conn, "UPDATE {s}.api_keys SET revoked_at = coalesce(revoked_at, %s) WHERE id = %s"
                            " AND merchant_id = %s RETURNING *", (self._clock(), key_id, merchant_id))
            if row is None:
                raise errors.NotFound("NOT_FOUND", f"merchant {merchant_id} has no key {key_id}", resource="api_key")
            return self._api_key(row)

        return self._tx(work)

    def authenticate(self, secret: str | None) -> Caller:
        """The merchant and scopes of a presented key; UNAUTHENTICATED when it is not a live key."""
        key_id = parse_api_key(secret)
        row = self._tx(lambda c: self._one(c, "SELECT merchant_id, secret_hash, scopes, revoked_at FROM {s}.api_keys"
                                              " WHERE id = %s", (key_id,)))
        if row is None or not secret_matches(secret or "", bytes(row["secret_hash"])):
            raise errors.Unauthenticated("API_KEY_INVALID", "the merchant API key is not known")
        if row["revoked_at"] is not None:
            raise errors.Unauthenticated("API_KEY_REVOKED", "the merchant API key was revoked")
        return Caller(row["merchant_id"], key_id, tuple(row["scopes"]))

    # --- charges ----------------------------------------------------------------------------

    @staticmethod
    def _charge(row: dict) -> Charge:
        return Charge(row["id"], row["merchant_id"], row["order_id"], row["rider_account_id"],
                      CredentialKind(row["credential_kind"]), row["amount_minor"], row["currency"], row["description"],
                      row["service_day"], ChargeStatus(row["status"]), row["refunded_minor"],
                      splits_from_json(row["splits"]), row["transfer_id"], row["created_at"], bytes(row["request_hash"]))

    def _find_charge(self, conn: psycopg.Connection, merchant_id: str, order_id: str) -> Charge | None:
        row = self._one(conn, "SELECT * FROM {s}.charges WHERE merchant_id = %s AND order_id = %s",
                        (merchant_id, order_id))
        return self._charge(row) if row is not None else None

    def _replay(self, existing: Charge, fingerprint: bytes) -> Charge:
        if existing.request_hash != fingerprint:
            raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"order {existing.order_id} was charged with another payload",
                                  order_id=existing.order_id)
        return existing if existing.status is not ChargeStatus.PENDING else self._confirm_charge(existing)

    def charge(self, caller: Caller, request: ChargeInput, credential: credential_pb2.Credential) -> Charge:
        """Take payment at a till: idempotent on (merchant, order id); see the module docstring."""
        request = request.validate(self.limits)
        caller.require(SCOPE_CHARGES_WRITE, request.merchant_id)
        fingerprint = request.fingerprint()

        def look_up(conn: psycopg.Connection) -> tuple[Charge | None, Merchant | None]:
            found = self._find_charge(conn, request.merchant_id, request.order_id)
            return (found, None) if found is not None else (None, self.get_merchant(request.merchant_id, conn))

        existing, merchant = self._tx(look_up)
        if existing is not None:
            return self._replay(existing, fingerprint)
        assert merchant is not None
        if merchant.status is not MerchantStatus.VERIFIED:
            raise errors.FailedPrecondition("MERCHANT_NOT_VERIFIED", f"merchant {merchant.merchant_id} is "
                                            f"{merchant.status.value.lower()} and cannot charge yet")
        if request.credential_kind is CredentialKind.FACE and request.amount_minor > self.limits.face_minor:  # type: ignore[operator]
            # Before the face service is even asked: no face match may pay this much.
            check_limits(request.amount_minor, 0, self.limits, face=True)  # type: ignore[arg-type]
        now = self._clock()
        charge_id = str(uuid.uuid4())  # also the face match's reference, for the audit trail
        rider = self._credentials.resolve(credential, now=now, reference_id=charge_id)
        if rider.blocked:
            raise errors.FailedPrecondition("ACCOUNT_BLOCKED", "the rider's account is blocked")
        try:
            dated = contract_in_force(self._contracts.versions(), merchant.category, now)
        except errors.FailedPrecondition:
            # A cached list may predate a contract made since (a stack with no lead time): ask once more.
            dated = contract_in_force(self._contracts.versions(refresh=True), merchant.category, now)
        try:
            lines = splits.split(dated.terms, request.amount_minor, request.currency,  # type: ignore[arg-type]
                                 merchant_id=merchant.merchant_id)
        except MoneyError as exc:
            raise errors.FailedPrecondition("NO_SPLIT_CONTRACT", f"the split contract in force cannot split this "
                                            f"payment: {exc.message}") from exc
        day = self._service_day.of(now)

        def decide(conn: psycopg.Connection) -> Charge:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_advisory_key(f"citytap.merchant.rider:{rider.account_id}"),))
            again = self._find_charge(conn, request.merchant_id, request.order_id)
            if again is not None:
                return again
            spent = self._one(conn, "SELECT coalesce(sum(amount_minor), 0) AS spent FROM {s}.charges"
                              " WHERE rider_account_id = %s AND service_day = %s", (rider.account_id, day))
            check_limits(request.amount_minor, int(spent["spent"]), self.limits,  # type: ignore[index, arg-type]
                         face=rider.kind is CredentialKind.FACE)
            if rider.nonce is not None:  # a phone QR code pays once
                conn.execute(self._sql("DELETE FROM {s}.qr_nonces WHERE forget_at < %s"), (now,))
                fresh = self._one(conn, "INSERT INTO {s}.qr_nonces (nonce, charge_id, forget_at) VALUES (%s, %s, %s)"
                                  " ON CONFLICT (nonce) DO NOTHING RETURNING 1", (rider.nonce, charge_id,
                                                                                  rider.nonce_expires_at))
                if fresh is None:
                    raise errors.FailedPrecondition("CREDENTIAL_REPLAYED", "this phone QR code has already paid; "
                                                    "the phone shows a new one")
                # The network's claim too: a code a gate (or another till) took pays nowhere else.
                ttl_s = max(1, math.ceil((rider.nonce_expires_at - now).total_seconds()))  # type: ignore[operator]
                if not qr_nonces.claim(self._nonces, rider.nonce, nonce_owner, ttl_s=ttl_s):
                    raise errors.FailedPrecondition("CREDENTIAL_REPLAYED", "this phone QR code has already been used "
                                                    "at a gate or till; the phone shows a new one")
                claimed.append(rider.nonce)
            row = self._one(conn, "INSERT INTO {s}.charges (id, merchant_id, order_id, request_hash, rider_account_id,"
                            " credential_kind, amount_minor, currency, description, service_day, status, splits,"
                            " transfer_id, created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                            " 'PENDING', %s, %s, %s, %s) ON CONFLICT (merchant_id, order_id) DO NOTHING RETURNING *",
                            (charge_id, request.merchant_id, request.order_id, fingerprint, rider.account_id,
                             rider.kind.value, request.amount_minor, request.currency,
                             request.description, day, splits_to_json(lines),
                             f"{CHARGE_TRANSFER_PREFIX}{charge_id}", now, now))
            if row is None:  # the same order id committed by another till in the meantime
                return self._find_charge(conn, request.merchant_id, request.order_id)  # type: ignore[return-value]
            return self._charge(row)

        nonce_owner = f"merchant:charge:{charge_id}"
        claimed: list[bytes] = []
        try:
            decided = self._tx(decide)
        except BaseException:
            for nonce in claimed:  # the charge was not recorded: the code has not paid
                qr_nonces.release(self._nonces, nonce, nonce_owner)
            raise
        if decided.charge_id != charge_id:
            return self._replay(decided, fingerprint)
        return self._confirm_charge(decided)

    def _refuse_if_in_doubt(self, created_at: datetime, what: str) -> None:
        """A retry of a PENDING charge or refund older than `in_doubt_after_s` does not post it:
        settle_in_doubt decides it, and the retry after that gets the answer."""
        if self._clock() - created_at > self._in_doubt_after:
            raise errors.Unavailable("UNAVAILABLE", f"the {what} was left in doubt and is being settled with the "
                                     "wallet; retry with the same id in a minute", dependency="wallet")

    def _confirm_charge(self, charge: Charge) -> Charge:
        self._refuse_if_in_doubt(charge.created_at, "charge")
        try:
            self._wallet.post_batch(charge_plan(charge), charge.currency)
        except WalletRefused as refusal:
            self._tx(lambda c: c.execute(self._sql("DELETE FROM {s}.charges WHERE id = %s AND status = 'PENDING'"),
                                         (charge.charge_id,)))
            raise refusal.error from refusal
        return self._mark_charged(charge)

    def _mark_charged(self, charge: Charge) -> Charge:
        """Record a charge whose batch the wallet posted: SUCCEEDED, with its event."""

        def confirm(conn: psycopg.Connection) -> Charge:
            row = self._one(conn, "UPDATE {s}.charges SET status = 'SUCCEEDED', updated_at = %s WHERE id = %s"
                            " AND status = 'PENDING' RETURNING *", (self._clock(), charge.charge_id))
            if row is None:  # another retry confirmed it first
                row = self._one(conn, "SELECT * FROM {s}.charges WHERE id = %s", (charge.charge_id,))
                return self._charge(row)  # type: ignore[arg-type]
            confirmed = self._charge(row)
            self._emit(conn, confirmed.merchant_id, confirmed.created_at,
                       charge_succeeded=events_pb2.ChargeSucceeded(charge=convert.charge_pb(confirmed)))
            return confirmed

        return self._tx(confirm)

    # --- refunds ----------------------------------------------------------------------------

    @staticmethod
    def _refund(row: dict) -> Refund:
        return Refund(row["id"], row["refund_id"], row["merchant_id"], row["charge_id"], row["amount_minor"],
                      row["currency"], row["note"], splits_from_json(row["splits"]), row["transfer_id"],
                      row["status"] == "PENDING", row["created_at"], bytes(row["request_hash"]))

    def _charge_of(self, conn: psycopg.Connection, merchant_id: str, charge_id: str, *, lock: bool = False) -> Charge:
        row = self._one(conn, "SELECT * FROM {s}.charges WHERE id = %s AND merchant_id = %s"
                        + (" FOR UPDATE" if lock else ""), (charge_id, merchant_id))
        if row is None:  # another merchant's charge is as unknown as a charge that does not exist
            raise errors.NotFound("NOT_FOUND", f"merchant {merchant_id} has no charge {charge_id}", resource="charge")
        return self._charge(row)

    def refund(self, caller: Caller, request: RefundInput) -> tuple[Refund, Charge]:
        """Give back all or part of a charge, idempotent on (merchant, refund id); never more than
        what is left of it."""
        request = request.validate()
        caller.require(SCOPE_REFUNDS_WRITE, request.merchant_id)
        fingerprint = request.fingerprint()
        refund_key = str(uuid.uuid4())

        def decide(conn: psycopg.Connection) -> Refund:
            existing = self._one(conn, "SELECT * FROM {s}.refunds WHERE merchant_id = %s AND refund_id = %s",
                                 (request.merchant_id, request.refund_id))
            if existing is not None:
                return self._refund(existing)
            charge = self._charge_of(conn, request.merchant_id, request.charge_id, lock=True)
            if charge.status is ChargeStatus.PENDING:
                raise errors.FailedPrecondition("INVALID_STATE", "the charge is not confirmed yet; retry the charge first")
            if request.currency != charge.currency:
                raise errors.InvalidArgument("INVALID_CURRENCY", f"the charge was in {charge.currency}",
                                             field="amount.currency")
            earlier = [splits_from_json(r["splits"]) for r in self._all(
                conn, "SELECT splits FROM {s}.refunds WHERE charge_id = %s ORDER BY seq", (charge.charge_id,))]
            refundable = charge.amount_minor - sum(line.amount_minor for lines in earlier for line in lines)
            if request.amount_minor > refundable:  # type: ignore[operator]
                raise errors.InvalidArgument("INVALID_AMOUNT", f"at most {refundable} minor units of the charge are left "
                                             "to refund", field="amount", refundable_minor=str(refundable))
            lines = splits.split_refund(charge.splits, request.amount_minor, earlier)  # type: ignore[arg-type]
            row = self._one(conn, "INSERT INTO {s}.refunds (id, merchant_id, refund_id, charge_id, request_hash,"
                            " amount_minor, currency, note, splits, transfer_id, status, created_at) VALUES (%s, %s, %s,"
                            " %s, %s, %s, %s, %s, %s, %s, 'PENDING', %s) RETURNING *",
                            (refund_key, request.merchant_id, request.refund_id, charge.charge_id, fingerprint,
                             request.amount_minor, request.currency, request.note, splits_to_json(lines),
                             f"{REFUND_TRANSFER_PREFIX}{refund_key}", self._clock()))
            return self._refund(row)  # type: ignore[arg-type]

        try:
            refund = self._tx(decide)
        except pg_errors.UniqueViolation:  # the same refund id committed concurrently: answer through it
            refund = self._tx(lambda c: self._refund(self._one(  # type: ignore[arg-type]
                c, "SELECT * FROM {s}.refunds WHERE merchant_id = %s AND refund_id = %s",
                (request.merchant_id, request.refund_id))))
        if refund.request_hash != fingerprint:
            raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"refund {request.refund_id} was made with another payload",
                                  refund_id=request.refund_id)
        if refund.pending:
            return self._confirm_refund(refund)
        charge = self._tx(lambda c: self._charge_of(c, refund.merchant_id, refund.charge_id))
        return refund, charge

    def _confirm_refund(self, refund: Refund) -> tuple[Refund, Charge]:
        self._refuse_if_in_doubt(refund.created_at, "refund")
        charge = self._tx(lambda c: self._charge_of(c, refund.merchant_id, refund.charge_id))
        try:
            self._wallet.post_batch(refund_plan(charge, refund), refund.currency)
        except WalletRefused as refusal:
            self._tx(lambda c: c.execute(self._sql("DELETE FROM {s}.refunds WHERE id = %s AND status = 'PENDING'"),
                                         (refund.refund_key,)))
            raise refusal.error from refusal
        return self._mark_refunded(refund)

    def _mark_refunded(self, refund: Refund) -> tuple[Refund, Charge]:
        """Record a refund whose batch the wallet posted: SUCCEEDED, the charge's refunded
        amount and status updated, with its event."""

        def confirm(conn: psycopg.Connection) -> tuple[Refund, Charge]:
            current = self._charge_of(conn, refund.merchant_id, refund.charge_id, lock=True)
            row = self._one(conn, "UPDATE {s}.refunds SET status = 'SUCCEEDED' WHERE id = %s AND status = 'PENDING'"
                            " RETURNING *", (refund.refund_key,))
            if row is None:  # another retry confirmed it first
                again = self._one(conn, "SELECT * FROM {s}.refunds WHERE id = %s", (refund.refund_key,))
                return self._refund(again), current  # type: ignore[arg-type]
            refunded = current.refunded_minor + refund.amount_minor
            status = charge_status(current.amount_minor, refunded)
            updated = self._charge(self._one(conn, "UPDATE {s}.charges SET refunded_minor = %s, status = %s,"  # type: ignore[arg-type]
                                             " updated_at = %s WHERE id = %s RETURNING *",
                                             (refunded, status.value, self._clock(), current.charge_id)))
            confirmed = self._refund(row)
            self._emit(conn, updated.merchant_id, confirmed.created_at, charge_refunded=events_pb2.ChargeRefunded(
                refund=convert.refund_pb(confirmed), charge=convert.charge_pb(updated)))
            return confirmed, updated

        return self._tx(confirm)

    # --- charges and refunds left in doubt -------------------------------------------------------

    def settle_in_doubt(self, *, batch_max: int = SETTLE_BATCH_MAX) -> dict[str, int]:
        """Settle PENDING charges and refunds recorded more than `in_doubt_after_s` plus the
        margin ago (see the module docstring); return how many were confirmed and removed."""
        cutoff = self._clock() - self._settle_after
        limit = min(batch_max, SETTLE_BATCH_MAX)
        charges, refunds = self._tx(lambda c: (
            [self._charge(r) for r in self._all(c, "SELECT * FROM {s}.charges WHERE status = 'PENDING'"
                                                " AND created_at < %s ORDER BY created_at LIMIT %s", (cutoff, limit))],
            [self._refund(r) for r in self._all(c, "SELECT * FROM {s}.refunds WHERE status = 'PENDING'"
                                                " AND created_at < %s ORDER BY created_at LIMIT %s", (cutoff, limit))]))
        posted = self._wallet.posted([c.transfer_id for c in charges] + [r.transfer_id for r in refunds])
        counts = {"charges_confirmed": 0, "charges_removed": 0, "refunds_confirmed": 0, "refunds_removed": 0}
        for charge in charges:
            if charge.transfer_id in posted:
                self._mark_charged(charge)
                counts["charges_confirmed"] += 1
            elif self._remove_unpaid("charges", charge.charge_id):
                counts["charges_removed"] += 1
        for refund in refunds:
            if refund.transfer_id in posted:
                self._mark_refunded(refund)
                counts["refunds_confirmed"] += 1
            elif self._remove_unpaid("refunds", refund.refund_key):
                counts["refunds_removed"] += 1
        if any(counts.values()):
            log.warning("settled charges and refunds left in doubt", extra={"fields": counts})
        return counts

    def _remove_unpaid(self, table: str, row_id: str) -> bool:
        return bool(self._tx(lambda c: c.execute(self._sql(f"DELETE FROM {{s}}.{table} WHERE id = %s"
                                                           " AND status = 'PENDING'"), (row_id,)).rowcount))

    def get_charge(self, caller: Caller, merchant_id: str, charge_id: str) -> tuple[Charge, list[Refund]]:
        """One of the caller's charges with its confirmed refunds; another merchant's is NOT_FOUND."""
        check_merchant_id(merchant_id)
        check_client_id(charge_id, "charge_id")
        caller.require(SCOPE_CHARGES_READ, merchant_id)

        def work(conn: psycopg.Connection) -> tuple[Charge, list[Refund]]:
            charge = self._charge_of(conn, merchant_id, charge_id)
            if charge.status is ChargeStatus.PENDING:  # not confirmed: it may yet be refused
                raise errors.NotFound("NOT_FOUND", f"charge {charge_id} is not confirmed", resource="charge")
            refunds = [self._refund(r) for r in self._all(conn, "SELECT * FROM {s}.refunds WHERE charge_id = %s AND"
                                                                " status = 'SUCCEEDED' ORDER BY seq",
                                                          (charge_id,))]
            return charge, refunds

        return self._tx(work)
