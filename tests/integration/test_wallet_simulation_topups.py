"""The seeded simulation with money entering the way it really does: Stripe top-ups.

It extends the ledger simulation of test_wallet_simulation.py (same model, same ledger
operations: payments, linked splits, holds posted, voided and expired, sweeps, blocks, bad
input, retries) and takes away its stand-in for top-ups (a direct credit from Stripe
clearing). Here money enters only through the real `TopUps` service against stripe-mock:

- TopUp with client ids (new, retried with the same payload, reused with another payload,
  malformed), each creating a PaymentIntent at stripe-mock; riders pay at once, later, or
  never, and sometimes fill the wallet and then pay a top-up abandoned long ago, which no
  longer fits (it is refunded to the card);
- signed webhook deliveries through the handler the HTTP endpoint uses, and a share of them
  as real HTTP POSTs to a `WebhookServer` bound on port 0: payment_intent.succeeded,
  .payment_failed and .canceled, refund.failed and events the wallet ignores; delivered out of
  order, the same Stripe event id again, the same PaymentIntent under a new event id, and
  bad deliveries (forged, unsigned, stale, malformed, unknown, mismatched, live mode);
- RefundTopUp, partial and full, retried with the same id or reusing it with another payload;
- the top-up worker's pass (auto-reload once per service day, resuming refunds and
  over-limit refunds) and jumps of hours on the clock.

stripe-mock keeps no state and never calls back, so `SimStripe` (a wrapper around the real
gateway) plays the rest of Stripe: it replays the first answer for an idempotency key as
Stripe does, it keeps the PaymentIntents and refunds, it emits the events Stripe would send,
and it injects faults the seed chooses (unreachable, the answer lost after Stripe acted, a
refusal, a refund that fails synchronously or days later). The simulation announces every
Stripe call it expects (and the fault) before it makes the wallet act; an unexpected call or
an expected call not made fails the step.

The model predicts every answer (result or error reason, HTTP status and webhook outcome),
every balance, every top-up's status, PaymentIntent, refunded sum and failure code, every
refund's state, every recorded webhook event and the outbox. After EVERY step the test checks
the ledger invariants of the base simulation and the top-up invariants straight from the
tables (each top-up credited at most once and exactly when its credit exists, refunded never
above what was credited and equal to the succeeded refunds, each refund's transfers matching
its state, only the top-up flow moving Stripe clearing, no wallet above the stored-value
maximum, one auto-reload per rider and service day), and the model against the database.

At the end Stripe becomes healthy, the worker runs and every queued event is delivered; then
every paid PaymentIntent must be accounted for to the minor unit: what the wallet kept plus
what went back to the card (plus a reversal still waiting for room under the stored-value
limit) equals what the rider paid, and nothing unpaid was ever credited.

A failure names the seed and step: `WALLET_SIM_SEED=<seed> WALLET_SIM_STEPS=<step+1>`
reproduces it (WALLET_SIM_STEPS default 3000, WALLET_SIM_SEED default 20300101, shared with
the ledger simulation).
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from datetime import time as day_time
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from libs import errors
from libs.postgres import create_pool
from services.wallet.domain import ID_PATTERN, AccountKind, TransferKind, TransferRequest
from services.wallet.ledger import LAZY_EXPIRY_MAX, Ledger
from services.wallet.stripe_gateway import STRIPE_API_VERSION, StripeGateway, StripeRefused, StripeUnavailable
from services.wallet.topups import (
    AUTO_RELOAD_PREFIX,
    CLIENT_ID_CHARS_MAX,
    RESUME_BATCH_MAX,
    STRIPE_KEY_OVER_LIMIT,
    STRIPE_KEY_REFUND,
    STRIPE_KEY_REPLAY_S,
    STRIPE_KEY_TOP_UP,
    MaintenanceReport,
    RefundState,
    TopUpConfig,
    TopUps,
    auto_reload_top_up_id,
    credit_transfer_id,
    refund_transfer_id,
    reversal_transfer_id,
    service_day,
)
from services.wallet.webhooks import WebhookServer
from tests.integration.test_wallet_simulation import (
    FULL_CHECK_EVERY,
    LENIENT_FLOOR,
    SEED,
    STEPS,
    STORED_VALUE_MAX,
    Refused,
    Simulation,
    Tx,
)
from tests.integration.wallet_support import WalletDb, open_wallet_db

SECRET = "whsec_citytap_simulation_0123456789"
CURRENCY = "TWD"
TOP_UP_MIN = 200           # scaled to the simulation's NT$200 stored-value maximum
TOP_UP_MAX = 12_000
TOP_UP_USUAL_MAX = 6_000   # most top-ups are smaller; those that fill the wallet may go up to TOP_UP_MAX
PENDING_TTL_S = 900
RESUME_AFTER_S = 60
HTTP_SHARE = 0.25          # deliveries sent as real HTTP POSTs; the rest call the endpoint's handler
ZONE = ZoneInfo("Asia/Taipei")
DAY_START = day_time(4, 30)
# Riders with auto-reload: (threshold, amount).
AUTO_RELOADS = {"rider-0": (2_000, 5_000), "rider-5": (2_500, 4_000)}
OPEN_REFUND_STATES = ("RESERVED", "DEBITING", "DEBITED", "REVERSING")
CREDITED_STATUSES = ("SUCCEEDED", "PARTIALLY_REFUNDED")


# --- the model of the top-up flow -----------------------------------------------------------


@dataclass
class MTopUp:
    top_up_id: str
    account_id: str
    amount: int
    origin: str  # RIDER or AUTO_RELOAD
    created_at: datetime
    updated_at: datetime
    status: str = "PENDING"
    has_intent: bool = False   # the row knows its PaymentIntent
    has_secret: bool = False   # ... and keeps its client secret
    credited: bool = False
    refunded: int = 0
    failure_code: str = ""
    over_limit_refunded: bool = False  # TopUpRefunded published for a paid top-up that never fitted

    @property
    def key(self) -> str:
        return STRIPE_KEY_TOP_UP + self.top_up_id


@dataclass
class MRefund:
    refund_id: str
    top_up_id: str
    account_id: str
    amount: int
    updated_at: datetime
    state: str = "RESERVED"
    debited: bool = False
    reversed: bool = False
    has_stripe_id: bool = False
    failure_reason: str = ""
    ever_succeeded: bool = False  # TopUpRefunded published
    stuck_at_limit: bool = False  # its reversal was last refused by the stored-value limit

    @property
    def key(self) -> str:
        return STRIPE_KEY_REFUND + self.refund_id


@dataclass
class MAutoReload:
    threshold: int
    amount: int
    enabled: bool = True


class FlowTx(Tx):
    """A Tx whose ledger sub-transactions can be rolled back alone: a top-up flow commits
    several transactions in turn, and one refused by the ledger undoes only its own work."""

    def savepoint(self) -> tuple:
        return ({k: replace(v) for k, v in self.accounts.items()}, {k: replace(v) for k, v in self.holds.items()},
                dict(self.transfers), self.events)

    def rollback(self, point: tuple) -> None:
        accounts, holds, transfers, events = point
        self.accounts = {k: replace(v) for k, v in accounts.items()}
        self.holds = {k: replace(v) for k, v in holds.items()}
        self.transfers = dict(transfers)
        self.events = events


# --- Stripe, as the simulation plays it -------------------------------------------------------


@dataclass
class Plan:
    """What the next Stripe call with one idempotency key meets: `fault` is ok, unavailable
    (nothing reached Stripe), lost (Stripe acted, the answer never came back) or refused;
    `status` is the status of the object Stripe creates (when this call creates it)."""

    fault: str
    status: str = ""


@dataclass
class StripeIntent:
    payment_intent_id: str
    top_up_id: str
    account_id: str
    origin: str
    amount: int
    status: str  # open, succeeded or canceled
    abandoned: bool = False  # the rider closed the payment page; paid late, if ever

    def as_object(self, status: str, *, decline: str | None = None, amount: int | None = None,
                  account_id: str | None = None) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.payment_intent_id, "object": "payment_intent", "currency": "twd", "status": status,
            "amount": self.amount if amount is None else amount,
            "metadata": {"top_up_id": self.top_up_id, "account_id": account_id or self.account_id,
                         "origin": self.origin}}
        if decline is not None:
            obj["last_payment_error"] = {"code": "card_declined", **({"decline_code": decline} if decline else {})}
        return obj


@dataclass
class StripeRefund:
    stripe_refund_id: str
    payment_intent_id: str
    amount: int
    status: str  # succeeded (on its way to the card) or failed
    metadata: dict[str, str]

    def as_object(self, status: str) -> dict[str, Any]:
        obj = {"id": self.stripe_refund_id, "object": "refund", "amount": self.amount, "currency": "twd",
               "status": status, "payment_intent": self.payment_intent_id, "metadata": dict(self.metadata)}
        if status == "failed":
            obj["failure_reason"] = "expired_or_canceled_card"
        return obj


@dataclass
class Delivery:
    """One Stripe event; Stripe signs it afresh each time it delivers it."""

    event_id: str
    event_type: str
    obj: dict[str, Any]
    body: bytes


def event_body(event_id: str, event_type: str, obj: dict[str, Any], *, livemode: bool = False) -> bytes:
    return json.dumps({"id": event_id, "object": "event", "api_version": STRIPE_API_VERSION,
                       "created": int(time.time()), "livemode": livemode, "type": event_type,
                       "data": {"object": obj}}).encode()


def sign(payload: bytes, *, secret: str = SECRET, at: int | None = None) -> str:
    timestamp = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


class SimStripe:
    """The gateway the wallet talks to: the real StripeGateway (so stripe-mock validates every
    request we send) plus what stripe-mock cannot do: idempotent replay of the first answer,
    state, events, and the faults the simulation planned."""

    livemode = False

    def __init__(self, real: StripeGateway) -> None:
        self.real = real
        self.plans: dict[str, Plan] = {}
        self.answers: dict[str, Any] = {}      # idempotency key -> the first answer, replayed afterwards
        self.requests: dict[str, tuple] = {}   # idempotency key -> the request it was first used with
        self.intents: dict[str, StripeIntent] = {}
        self.refunds: dict[str, StripeRefund] = {}
        self.outgoing: list[Delivery] = []     # events Stripe still has to deliver (or redeliver)
        self.violations: list[str] = []
        self.calls: Counter[str] = Counter()
        self.event_count = 0

    # --- the simulation's side ------------------------------------------------------------

    def expect(self, key: str, plan: Plan) -> None:
        assert key not in self.plans, f"two Stripe calls planned with key {key} in one step"
        self.plans[key] = plan

    def settle(self) -> None:
        """After each step: every planned call happened, nothing unplanned did."""
        problems = self.violations + [f"the expected Stripe call {key} was not made" for key in self.plans]
        self.violations, self.plans = [], {}
        assert not problems, "Stripe saw what the model did not expect: " + "; ".join(problems)

    def emit(self, event_type: str, obj: dict[str, Any]) -> Delivery:
        self.event_count += 1
        event_id = f"evt_sim{self.event_count:06d}"
        delivery = Delivery(event_id, event_type, obj, event_body(event_id, event_type, obj))
        self.outgoing.append(delivery)
        return delivery

    def refunded(self, payment_intent_id: str) -> int:
        return sum(r.amount for r in self.refunds.values()
                   if r.payment_intent_id == payment_intent_id and r.status == "succeeded")

    # --- the gateway's interface ------------------------------------------------------------

    def verify_event(self, payload: bytes, signature_header: str | None, **kwargs: Any) -> Any:
        return self.real.verify_event(payload, signature_header, **kwargs)

    def _plan(self, key: str, request: tuple) -> Plan:
        plan = self.plans.pop(key, None)
        if plan is None:
            self.violations.append(f"unexpected Stripe call with key {key}")
            raise StripeUnavailable("the simulation did not expect this call", code="unexpected")
        if self.requests.setdefault(key, request) != request:
            self.violations.append(f"key {key} reused for another request {request} (Stripe: IdempotencyError)")
        self.calls[plan.fault] += 1
        if plan.fault == "unavailable":
            raise StripeUnavailable("could not connect to Stripe", code="APIConnectionError")
        return plan

    def create_payment_intent(self, **kwargs: Any) -> Any:
        key = kwargs["idempotency_key"]
        plan = self._plan(key, ("payment_intent", kwargs["amount_minor"], kwargs["currency"],
                                kwargs.get("customer_id"), kwargs.get("off_session", False)))
        if plan.fault == "refused":
            raise StripeRefused("Your card was declined.", code="card_declined", decline_code="insufficient_funds",
                                http_status=402, request_id="req_sim")
        if key not in self.answers:
            made = self.real.create_payment_intent(**kwargs)
            metadata = dict(kwargs["metadata"])
            answer = replace(made, status=plan.status, metadata=metadata)  # Stripe echoes the metadata
            self.answers[key] = answer
            intent = StripeIntent(answer.payment_intent_id, metadata["top_up_id"], metadata["account_id"],
                                  metadata.get("origin", ""), kwargs["amount_minor"],
                                  "succeeded" if plan.status == "succeeded" else "open")
            self.intents[intent.payment_intent_id] = intent
            if intent.status == "succeeded":  # an off-session charge that went through at once
                self.emit("payment_intent.succeeded", intent.as_object("succeeded"))
        if plan.fault == "lost":
            raise StripeUnavailable("read timed out", code="APIConnectionError")
        return self.answers[key]

    def create_refund(self, **kwargs: Any) -> Any:
        key = kwargs["idempotency_key"]
        plan = self._plan(key, ("refund", kwargs["payment_intent_id"], kwargs["amount_minor"], kwargs["currency"]))
        if plan.fault == "refused":
            raise StripeRefused("The charge has already been refunded.", code="charge_already_refunded",
                                http_status=400, request_id="req_sim")
        if key not in self.answers:
            intent = self.intents.get(kwargs["payment_intent_id"])
            left = intent.amount - self.refunded(intent.payment_intent_id) if intent else 0
            if intent is None or intent.status != "succeeded" or kwargs["amount_minor"] > left:
                self.violations.append(f"refund {key} of {kwargs['amount_minor']} on {kwargs['payment_intent_id']}: "
                                       f"Stripe has {intent} with {left} left to refund")
                raise StripeRefused("Refund amount is greater than unrefunded amount on charge",
                                    code="amount_too_large", request_id="req_sim")
            made = self.real.create_refund(**kwargs)
            answer = replace(made, status=plan.status, metadata=dict(kwargs["metadata"]), currency=kwargs["currency"],
                             amount_minor=kwargs["amount_minor"], payment_intent_id=intent.payment_intent_id,
                             failure_reason="expired_or_canceled_card" if plan.status == "failed" else "")
            self.answers[key] = answer
            refund = StripeRefund(answer.stripe_refund_id, intent.payment_intent_id, kwargs["amount_minor"],
                                  "failed" if plan.status == "failed" else "succeeded", dict(kwargs["metadata"]))
            self.refunds[refund.stripe_refund_id] = refund
            if "refund_id" in refund.metadata:
                self.emit("refund.created", refund.as_object(plan.status))  # an event the wallet ignores
        if plan.fault == "lost":
            raise StripeUnavailable("read timed out", code="APIConnectionError")
        return self.answers[key]


# --- the simulation -------------------------------------------------------------------------------


class TopUpSimulation(Simulation):
    def __init__(self, db: WalletDb, lenient: Ledger, seed: int, stripe_api_base: str) -> None:
        super().__init__(db, lenient, seed)
        self.stripe = SimStripe(StripeGateway(api_key="sk_test_citytap", api_base=stripe_api_base, webhook_secret=SECRET,
                                              timeout_s=5.0, connect_timeout_s=2.0, max_network_retries=0))
        self.config = TopUpConfig(webhook_secret=SECRET, top_up_min_minor=TOP_UP_MIN, top_up_max_minor=TOP_UP_MAX,
                                  pending_ttl_s=PENDING_TTL_S, resume_after_s=RESUME_AFTER_S,
                                  service_day_timezone=ZONE.key, service_day_start=DAY_START)
        self.pool = create_pool(db.dsn, name="test-sim-top-ups", max_size=4)
        self.top_ups = TopUps(self.pool, ledger=db.ledger, gateway=self.stripe, config=self.config, clock=db.clock)
        self.server = WebhookServer("127.0.0.1:0", self.top_ups.handle_webhook, concurrency_max=4)
        self.server.start()
        self.topups: dict[str, MTopUp] = {}
        self.refunds: dict[str, MRefund] = {}
        self.recorded: dict[str, str] = {}  # Stripe event id -> outcome, as stripe_webhook_events has them
        self.delivered: list[Delivery] = []
        self.auto_reloads: dict[str, MAutoReload] = {}
        self.runs: set[tuple[str, Any]] = set()
        self.healthy = False  # True: Stripe answers everything (the final drain)
        self.ghosts = 0
        self.current = "setup"
        for account_id, (threshold, amount) in AUTO_RELOADS.items():
            self.top_ups.configure_auto_reload(account_id, threshold_minor=threshold, amount_minor=amount,
                                               customer_id=f"cus_Sim{account_id[-1]}", payment_method_id="pm_card_visa")
            self.auto_reloads[account_id] = MAutoReload(threshold, amount)

    def close(self) -> None:
        self.server.close()
        self.pool.close()

    # --- plumbing ---------------------------------------------------------------------------

    def run(self, name: str, predict: Callable[[FlowTx], Any], call: Callable[[], Any],
            check: Callable[[Any, Any], None] | None = None, label: Callable[[Any], str] | None = None) -> Any:
        """Predict (which also announces the Stripe calls), act, then compare. A flow commits
        step by step, so what the model did is kept even when the answer is an error."""
        tx = FlowTx(self.model)
        try:
            predicted, expected = predict(tx), None
        except Refused as exc:
            predicted, expected = None, exc.reason
        try:
            actual, got = call(), None
        except errors.CityTapError as exc:
            actual, got = None, exc.reason
        self.stripe.settle()
        assert got == expected, f"{name}: the model predicted {expected or 'success'}, the wallet answered {got or 'success'}"
        tx.commit()
        if check is not None and actual is not None:
            check(predicted, actual)
        self.stats[f"{name}:{got or (label(actual) if label else 'ok')}"] += 1
        return actual

    def plan(self, key: str, kind: str, *, off_session: bool = False, may_fail: bool = False) -> Plan:
        """Decide what the next Stripe call with `key` meets, and announce it."""
        cached = self.stripe.answers.get(key)
        if self.healthy:
            fault = "ok"
        elif cached is not None:  # Stripe acted before: it replays that answer (if it is reached at all)
            fault = self.rng.choices(["ok", "unavailable", "lost"], [80, 12, 8])[0]
        else:
            fault = self.rng.choices(["ok", "unavailable", "lost", "refused"], [76, 8, 10, 6])[0]
        if cached is not None:
            status = cached.status
        elif kind == "payment_intent":
            status = "succeeded" if off_session and self.rng.random() < 0.6 else "requires_payment_method"
        else:
            status = "failed" if may_fail and not self.healthy and self.rng.random() < 0.05 else \
                self.rng.choice(["succeeded", "pending"])
        plan = Plan(fault, status)
        self.stripe.expect(key, plan)
        return plan

    def intent_of(self, mt: MTopUp) -> str | None:
        answer = self.stripe.answers.get(mt.key)
        return answer.payment_intent_id if mt.has_intent and answer is not None else None

    def stripe_intent(self, mt: MTopUp) -> StripeIntent | None:
        answer = self.stripe.answers.get(mt.key)
        return self.stripe.intents.get(answer.payment_intent_id) if answer is not None else None

    def lazy_balance(self, tx: FlowTx, account_id: str) -> None:
        """Ledger.get_balance: expires the account's due holds first (its own transaction)."""
        if tx.account(account_id).pending_debits:
            tx.expire_due({account_id}, self.now(), LAZY_EXPIRY_MAX)

    def ledger_transfer(self, tx: FlowTx, request: TransferRequest) -> None:
        """One internal Ledger.create_transfers: lazy expiry, the transfer, its event; all or nothing."""
        point = tx.savepoint()
        try:
            tx.expire_due({request.debit_account_id, request.credit_account_id}, self.now(), LAZY_EXPIRY_MAX)
            tx.transfer(request)
            tx.events += 1
        except Refused:
            tx.rollback(point)
            raise

    def pending_sum(self, account_id: str) -> int:
        since = self.now() - timedelta(seconds=PENDING_TTL_S)
        return sum(t.amount for t in self.topups.values()
                   if t.account_id == account_id and t.status == "PENDING" and t.created_at > since)

    def headroom(self, tx: FlowTx, account_id: str) -> int:
        account = tx.account(account_id)
        return self.model.stored_value_max - (account.balance + account.pending_credits + self.pending_sum(account_id))

    def reserved(self, mt: MTopUp) -> int:
        return sum(r.amount for r in self.refunds.values() if r.top_up_id == mt.top_up_id and r.state != "FAILED")

    def set_refunded(self, mt: MTopUp, delta: int) -> None:
        mt.refunded += delta
        mt.status = "REFUNDED" if mt.refunded == mt.amount else "PARTIALLY_REFUNDED" if mt.refunded > 0 else "SUCCEEDED"
        mt.updated_at = self.now()

    def move(self, refund: MRefund, state: str, failure_reason: str | None = None) -> None:
        refund.state = state
        refund.updated_at = self.now()
        if failure_reason is not None:
            refund.failure_reason = failure_reason

    # --- TopUp ------------------------------------------------------------------------------

    def predict_top_up(self, tx: FlowTx, top_up_id: str, account_id: str, amount: int, currency: str) -> MTopUp:
        if not ID_PATTERN.match(top_up_id) or len(top_up_id) > CLIENT_ID_CHARS_MAX \
                or top_up_id.startswith(AUTO_RELOAD_PREFIX) or not ID_PATTERN.match(account_id):
            raise Refused("INVALID_ARGUMENT")
        _check_money(amount, currency)
        if amount < TOP_UP_MIN:
            raise Refused("INVALID_AMOUNT")
        if amount > TOP_UP_MAX:
            raise Refused("LIMIT_EXCEEDED")
        existing = self.topups.get(top_up_id)
        if existing is not None:
            if (existing.account_id, existing.amount) != (account_id, amount):
                raise Refused("IDEMPOTENCY_CONFLICT")
            return self.predict_payment_intent(tx, existing)
        if account_id not in self.model.accounts:
            raise Refused("UNKNOWN_ACCOUNT")
        self.lazy_balance(tx, account_id)
        if self.model.accounts[account_id].kind is not AccountKind.RIDER_WALLET:
            raise Refused("INVALID_ARGUMENT")
        if amount > self.headroom(tx, account_id):
            raise Refused("LIMIT_EXCEEDED")
        mt = MTopUp(top_up_id, account_id, amount, "RIDER", self.now(), self.now())
        self.topups[top_up_id] = mt
        return self.predict_payment_intent(tx, mt)

    def predict_payment_intent(self, tx: FlowTx, mt: MTopUp) -> MTopUp:
        """TopUps._ensure_payment_intent; for auto-reload also the synchronous credit."""
        if mt.has_intent or mt.status != "PENDING":
            if mt.status == "FAILED" and not mt.has_intent:
                raise Refused("PAYMENT_FAILED")
            return mt
        off_session = mt.origin == "AUTO_RELOAD"
        plan = self.plan(mt.key, "payment_intent", off_session=off_session)
        if plan.fault in ("unavailable", "lost"):
            raise Refused("UNAVAILABLE")
        if plan.fault == "refused":
            mt.status, mt.failure_code, mt.updated_at = "FAILED", "insufficient_funds", self.now()
            raise Refused("PAYMENT_FAILED")
        mt.has_intent, mt.has_secret, mt.updated_at = True, not off_session, self.now()
        if off_session and plan.status == "succeeded":
            answer = self.stripe_plan_object(mt)
            _, over = self.predict_settle_success(tx, answer, None)
            if over is not None:
                self.predict_over_limit_refund(tx, over)
        return mt

    def stripe_plan_object(self, mt: MTopUp) -> dict[str, Any]:
        """The PaymentIntent Stripe is about to answer with (its id is not known yet: the model
        finds the top-up by its metadata, as the wallet does)."""
        return {"id": None, "amount": mt.amount, "currency": "twd",
                "metadata": {"top_up_id": mt.top_up_id, "account_id": mt.account_id}}

    def check_top_up(self, predicted: MTopUp, actual: Any) -> None:
        mt = self.topups[actual.top_up_id]
        got = (actual.status.value, actual.payment_intent_id, actual.client_secret, actual.amount_minor,
               actual.account_id, actual.refunded_amount_minor)
        answer = self.stripe.answers.get(mt.key)
        secret = answer.client_secret if mt.has_secret and answer is not None else None
        assert got == (mt.status, self.intent_of(mt), secret, mt.amount, mt.account_id, mt.refunded), \
            f"TopUp {mt.top_up_id} answered {got}, the model has {mt}"

    def top_up_call(self, top_up_id: str, account_id: str, amount: int, currency: str = CURRENCY) -> str:
        self.run("top_up", lambda tx: self.predict_top_up(tx, top_up_id, account_id, amount, currency),
                 lambda: self.top_ups.top_up(top_up_id, account_id, amount, currency), self.check_top_up)
        return f"top-up {top_up_id} {account_id} {amount} {currency}"

    def op_tu_start(self) -> str:
        rider = self.rng.choice(self.riders)
        top_up_id = self.next_id("tu")
        amount = 100 * self.rng.randint(TOP_UP_MIN // 100, TOP_UP_USUAL_MAX // 100)
        currency = CURRENCY
        fill = self.rng.random() < 0.3
        if fill:  # fill the wallet up to the stored-value maximum, or just past it
            account = self.model.accounts[rider]
            room = self.model.stored_value_max - account.balance - account.pending_credits - self.pending_sum(rider)
            amount = min(max(room // 100 * 100 + self.rng.choice([0, 0, 0, 100]), TOP_UP_MIN), TOP_UP_MAX)
        if self.rng.random() < 0.12:  # bad input: refused before anything is recorded or sent
            case = self.rng.randrange(10)
            if case == 0:
                amount = self.rng.choice([0, -100])
            elif case == 1:
                amount = TOP_UP_MIN - 100
            elif case == 2:
                amount += self.rng.randint(1, 99)  # cents of TWD: Stripe could not take it
            elif case == 3:
                amount = TOP_UP_MAX + 100
            elif case == 4:
                currency = "USD"
            elif case == 5:
                top_up_id = self.rng.choice(["bad id!", "x" * (CLIENT_ID_CHARS_MAX + 1), AUTO_RELOAD_PREFIX + "mine"])
            elif case == 6:
                rider = "ghost-account"
            elif case == 7:
                rider = self.rng.choice(self.merchants + [self.clearing])
            else:  # the most one top-up may be: often more than the wallet has room for
                amount = TOP_UP_MAX
        outcome = self.top_up_call(top_up_id, rider, amount, currency)
        started = self.topups.get(top_up_id)
        intent = self.stripe_intent(started) if started is not None and started.has_intent else None
        if intent is None or intent.status != "open":
            return outcome
        since = self.now() - timedelta(seconds=PENDING_TTL_S)
        abandoned = [i for i in self.stripe.intents.values() if i.status == "open" and i.abandoned
                     and i.account_id == rider and self.topups[i.top_up_id].created_at <= since]
        if fill and abandoned:
            # The rider fills the wallet, then finds the payment page of a top-up abandoned long
            # ago (it no longer counts against the limit) and pays that too: it no longer fits.
            outcome += "; " + self.stripe_attempt(intent, 0.0, at_once=True)
            outcome += "; late " + self.stripe_attempt(self.rng.choice(abandoned), 0.0, at_once=True)
        elif self.rng.random() < 0.6:  # the rider pays in the app at once (the common case)
            outcome += "; " + self.stripe_attempt(intent, self.rng.random() * 0.8)
        elif self.rng.random() < 0.5:
            intent.abandoned = True
        return outcome

    def op_tu_retry(self) -> str:
        if not self.topups:
            return "top-up retry (nothing yet)"
        mt = self.rng.choice(list(self.topups.values()))
        roll = self.rng.random()
        if roll < 0.75:  # the client's retry: the same id and payload
            return self.top_up_call(mt.top_up_id, mt.account_id, mt.amount)
        if roll < 0.9:
            other = mt.amount + 100 if mt.amount < TOP_UP_MAX else mt.amount - 100
            return self.top_up_call(mt.top_up_id, mt.account_id, other)
        others = [r for r in self.riders if r != mt.account_id]
        return self.top_up_call(mt.top_up_id, self.rng.choice(others), mt.amount)

    # --- webhooks ---------------------------------------------------------------------------

    def find_for_intent(self, obj: dict[str, Any]) -> MTopUp | None:
        top_up_id = obj.get("metadata", {}).get("top_up_id", "")
        if top_up_id and ID_PATTERN.match(top_up_id) and top_up_id in self.topups:
            return self.topups[top_up_id]
        return next((t for t in self.topups.values() if obj["id"] is not None and self.intent_of(t) == obj["id"]), None)

    def mismatch(self, mt: MTopUp, obj: dict[str, Any], *, amount_too: bool) -> bool:
        known = self.intent_of(mt)
        if obj["id"] is not None and known is not None and known != obj["id"]:
            return True
        if obj.get("metadata", {}).get("account_id", mt.account_id) != mt.account_id:
            return True
        return amount_too and (obj["amount"] != mt.amount or obj["currency"].upper() != CURRENCY)

    def record(self, event_id: str | None, outcome: str) -> str:
        if event_id is not None:
            self.recorded[event_id] = outcome
        return outcome

    def predict_settle_success(self, tx: FlowTx, obj: dict[str, Any], event_id: str | None) -> tuple[str, MTopUp | None]:
        mt = self.find_for_intent(obj)
        if mt is None:
            return self.record(event_id, "UNKNOWN_TOP_UP"), None
        if self.mismatch(mt, obj, amount_too=True):
            return self.record(event_id, "MISMATCH"), None
        if mt.credited:
            return self.record(event_id, "ALREADY_CREDITED"), None
        if mt.status in ("OVER_LIMIT", "REFUNDED"):
            return self.record(event_id, "OVER_LIMIT"), mt if mt.status == "OVER_LIMIT" else None
        credit = TransferRequest(credit_transfer_id(mt.top_up_id), self.clearing, mt.account_id, mt.amount, CURRENCY,
                                 TransferKind.TOP_UP)
        try:
            self.ledger_transfer(tx, credit)
        except Refused as exc:
            assert exc.reason == "LIMIT_EXCEEDED", f"the model did not expect a credit refused with {exc.reason}"
            mt.status, mt.has_intent, mt.failure_code, mt.updated_at = "OVER_LIMIT", True, "STORED_VALUE_LIMIT", self.now()
            return self.record(event_id, "OVER_LIMIT"), mt
        mt.status, mt.credited, mt.has_intent, mt.failure_code, mt.updated_at = "SUCCEEDED", True, True, "", self.now()
        tx.events += 1  # TopUpSucceeded
        return self.record(event_id, "CREDITED"), None

    def predict_over_limit_refund(self, tx: FlowTx, mt: MTopUp) -> bool:
        plan = self.plan(STRIPE_KEY_OVER_LIMIT + mt.top_up_id, "refund")
        if plan.fault != "ok":
            return False
        mt.status, mt.refunded, mt.over_limit_refunded, mt.updated_at = "REFUNDED", mt.amount, True, self.now()
        tx.events += 1  # TopUpRefunded
        return True

    def predict_settle_failure(self, obj: dict[str, Any], event_id: str, event_type: str) -> str:
        mt = self.find_for_intent(obj)
        if mt is None:
            return self.record(event_id, "UNKNOWN_TOP_UP")
        if self.mismatch(mt, obj, amount_too=False):
            return self.record(event_id, "MISMATCH")
        error = obj.get("last_payment_error")
        code = (error.get("decline_code") or error.get("code") or "payment_failed") if error else ""
        code = code or ("canceled" if event_type.endswith("canceled") else "payment_failed")
        if mt.status != "PENDING":
            return self.record(event_id, "IGNORED_STATE")
        mt.status, mt.failure_code, mt.updated_at = "FAILED", code, self.now()
        return self.record(event_id, "MARKED_FAILED")

    def find_refund(self, obj: dict[str, Any]) -> MRefund | None:
        for refund in self.refunds.values():
            if refund.has_stripe_id and self.stripe.answers[refund.key].stripe_refund_id == obj["id"]:
                return refund
        refund_id = obj.get("metadata", {}).get("refund_id", "")
        return self.refunds.get(refund_id) if ID_PATTERN.match(refund_id) else None

    def predict_refund_updated(self, tx: FlowTx, obj: dict[str, Any], event_id: str) -> tuple[int, str]:
        if obj["status"] != "failed":
            return 200, "IGNORED"
        refund = self.find_refund(obj)
        if refund is None:
            return 200, self.record(event_id, "UNKNOWN_REFUND")
        if refund.state == "DEBITED":
            # Our side never learned Stripe's answer; a retry would replay it (not the failure),
            # so the event must come back once the refund is finished: 503, nothing recorded.
            return 503, "RETRY"
        if refund.state != "SUCCEEDED":
            return 200, self.record(event_id, "IGNORED_STATE")
        self.move(refund, "REVERSING", "PAYMENT_FAILED")
        self.set_refunded(self.topups[refund.top_up_id], -refund.amount)
        self.record(event_id, "REFUND_FAILED")
        try:
            self.predict_advance(tx, refund)
        except Refused:
            pass
        return 200, "REFUND_FAILED"

    def predict_delivery(self, tx: FlowTx, delivery: Delivery) -> tuple[int, str]:
        if delivery.event_id in self.recorded:
            return 200, "DUPLICATE"
        obj, kind = delivery.obj, delivery.event_type
        if obj.get("object") == "payment_intent":
            if kind == "payment_intent.succeeded":
                outcome, over = self.predict_settle_success(tx, obj, delivery.event_id)
                if over is not None:
                    self.predict_over_limit_refund(tx, over)
                return 200, outcome
            if kind in ("payment_intent.payment_failed", "payment_intent.canceled"):
                return 200, self.predict_settle_failure(obj, delivery.event_id, kind)
        if obj.get("object") == "refund" and kind in ("refund.failed", "refund.updated", "charge.refund.updated"):
            return self.predict_refund_updated(tx, obj, delivery.event_id)
        return 200, "IGNORED"

    def post(self, body: bytes, signature: str | None, via_http: bool) -> tuple[int, str]:
        if not via_http:
            response = self.top_ups.handle_webhook(body, signature)
            return response.status, response.outcome
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=10)
        try:
            headers = {"Content-Type": "application/json", **({"Stripe-Signature": signature} if signature else {})}
            conn.request("POST", "/stripe/webhook", body=body, headers=headers)
            response = conn.getresponse()
            return response.status, json.loads(response.read())["outcome"]
        finally:
            conn.close()

    def deliver(self, delivery: Delivery, name: str = "webhook") -> int:
        via_http = self.rng.random() < HTTP_SHARE
        self.stats["webhook_http" if via_http else "webhook_handler"] += 1
        answer = self.run(name, lambda tx: self.predict_delivery(tx, delivery),
                          lambda: self.post(delivery.body, sign(delivery.body), via_http),
                          _same_answer(f"{delivery.event_type} {delivery.event_id}"), label=lambda a: a[1])
        if answer[0] == 200:
            self.delivered.append(delivery)
        else:
            self.stripe.outgoing.append(delivery)  # Stripe redelivers it later
        return answer[0]

    def op_stripe_pay(self) -> str:
        """At Stripe: a rider pays (or a card is declined, or the intent is canceled), often
        long after the top-up started."""
        open_intents = [i for i in self.stripe.intents.values() if i.status == "open" and not i.abandoned]
        if not open_intents:
            return "stripe pay (nothing open)"
        intent = open_intents[0] if self.rng.random() < 0.25 else self.rng.choice(open_intents)
        return self.stripe_attempt(intent, self.rng.random())

    def stripe_attempt(self, intent: StripeIntent, roll: float, *, at_once: bool = False) -> str:
        if roll < 0.65:
            intent.status = "succeeded"
            delivery = self.stripe.emit("payment_intent.succeeded", intent.as_object("succeeded"))
        elif roll < 0.92:
            decline = self.rng.choice(["insufficient_funds", "expired_card", ""])
            delivery = self.stripe.emit("payment_intent.payment_failed",
                                        intent.as_object("requires_payment_method", decline=decline))
        else:
            intent.status = "canceled"
            delivery = self.stripe.emit("payment_intent.canceled", intent.as_object("canceled"))
        if at_once or self.rng.random() < 0.6:  # delivered at once; otherwise it waits in Stripe's queue
            self.stripe.outgoing.remove(delivery)
            self.deliver(delivery)
        return f"stripe {delivery.event_type} {intent.payment_intent_id} ({intent.top_up_id})"

    def op_deliver(self) -> str:
        """Stripe delivers one queued event, in no particular order."""
        if not self.stripe.outgoing:
            return "deliver (nothing queued)"
        delivery = self.stripe.outgoing.pop(self.rng.randrange(len(self.stripe.outgoing)))
        status = self.deliver(delivery)
        return f"deliver {delivery.event_type} {delivery.event_id}: {status}"

    def op_redeliver(self) -> str:
        """The same Stripe event id again (Stripe did not see our 200, or just retries)."""
        if not self.delivered:
            return "redeliver (nothing yet)"
        delivery = self.rng.choice(self.delivered[-200:])
        self.deliver(delivery, "webhook_again")
        return f"redeliver {delivery.event_type} {delivery.event_id}"

    def op_resend(self) -> str:
        """The same PaymentIntent announced under a new event id."""
        about_intents = [d for d in self.delivered[-200:] if d.obj.get("object") == "payment_intent"]
        if not about_intents:
            return "resend (nothing yet)"
        original = self.rng.choice(about_intents)
        delivery = self.stripe.emit(original.event_type, original.obj)
        self.stripe.outgoing.remove(delivery)
        self.deliver(delivery, "webhook_new_id")
        return f"resend {original.event_type} as {delivery.event_id}"

    def op_refund_fails_at_stripe(self) -> str:
        """At Stripe, days later: a refund on its way to the card fails (an expired card)."""
        refunds = [r for r in self.stripe.refunds.values() if r.status == "succeeded" and "refund_id" in r.metadata]
        # Mostly refunds whose answer we lost (the wallet still has them DEBITED): the hard case.
        in_doubt = [r for r in refunds if self.refunds[r.metadata["refund_id"]].state == "DEBITED"]
        if not in_doubt and (not refunds or self.rng.random() < 0.6):
            return "refund fails (nothing picked)"
        refund = self.rng.choice(in_doubt or refunds)
        refund.status = "failed"
        delivery = self.stripe.emit("refund.failed", refund.as_object("failed"))
        return f"stripe refund.failed {refund.stripe_refund_id} ({refund.metadata['refund_id']}) as {delivery.event_id}"

    def op_bad_webhook(self) -> str:
        """Deliveries that must change nothing (or only be recorded and acknowledged); the
        kinds take turns, so every run sends each of them several times."""
        intents = list(self.stripe.intents.values())
        self.ghosts += 1
        case = self.ghosts % 10
        if case <= 4 and intents:  # a real-looking event, refused before anything is parsed or done
            intent = self.rng.choice(intents)
            body = event_body(f"evt_bad{self.ghosts:06d}", "payment_intent.succeeded", intent.as_object("succeeded"))
            now = int(time.time())
            signature, expected = [
                (sign(body, secret="whsec_not_the_endpoint_secret_at_all"), (400, "BAD_SIGNATURE")),
                (None, (400, "BAD_SIGNATURE")),
                (sign(body, at=now - 301), (400, "STALE")),
                (sign(body, at=now + 400), (400, "STALE")),
                (sign(body), (400, "BAD_SIGNATURE")),  # then tampered with below
            ][case]
            if case == 4:
                body = body.replace(b'"amount": ', b'"amount": 9')
            return self.deliver_bad(f"bad {expected[1]}", body, signature, lambda tx: expected)
        if case == 5:
            body = b'{"id": "evt_x", "object": "event", "type": '
            return self.deliver_bad("bad malformed", body, sign(body), lambda tx: (400, "MALFORMED"))
        if case == 6:
            delivery = Delivery(f"evt_ghost{self.ghosts:06d}", "payment_intent.succeeded",
                                {"id": f"pi_ghost{self.ghosts}", "object": "payment_intent", "amount": 5_000,
                                 "currency": "twd", "status": "succeeded",
                                 "metadata": {"top_up_id": f"tu-ghost-{self.ghosts}"}}, b"")
        elif case == 7:
            delivery = Delivery(f"evt_ghost{self.ghosts:06d}", "refund.failed",
                                {"id": f"re_ghost{self.ghosts}", "object": "refund", "amount": 1_000, "currency": "twd",
                                 "status": "failed", "metadata": {"refund_id": f"rf-ghost-{self.ghosts}"}}, b"")
        elif intents and case == 8:  # signed and well formed, but not what we asked Stripe for
            intent = self.rng.choice(intents)
            other = self.rng.choice([r for r in self.riders if r != intent.account_id])
            obj = intent.as_object("succeeded", **self.rng.choice([{"amount": intent.amount + 100},
                                                                   {"account_id": other}]))
            delivery = Delivery(f"evt_odd{self.ghosts:06d}", "payment_intent.succeeded", obj, b"")
        else:
            delivery = Delivery(f"evt_odd{self.ghosts:06d}", "customer.created",
                                {"id": "cus_Other", "object": "customer"}, b"")
        delivery.body = event_body(delivery.event_id, delivery.event_type, delivery.obj)
        if case == 9:  # an event of the other Stripe mode
            body = event_body(delivery.event_id, delivery.event_type, delivery.obj, livemode=True)
            return self.deliver_bad("bad live mode", body, sign(body), lambda tx: (200, "IGNORED_MODE"))
        self.deliver(delivery, "webhook_odd")
        return f"odd webhook {delivery.event_type} {delivery.event_id}"

    def deliver_bad(self, name: str, body: bytes, signature: str | None,
                    predict: Callable[[FlowTx], tuple[int, str]]) -> str:
        via_http = self.rng.random() < HTTP_SHARE
        self.run("webhook_bad", predict, lambda: self.post(body, signature, via_http), _same_answer(name),
                 label=lambda a: a[1])
        return name

    # --- RefundTopUp ------------------------------------------------------------------------

    def predict_refund(self, tx: FlowTx, refund_id: str, top_up_id: str, amount: int, currency: str) -> MRefund:
        for value in (refund_id, top_up_id):
            if not ID_PATTERN.match(value) or len(value) > CLIENT_ID_CHARS_MAX:
                raise Refused("INVALID_ARGUMENT")
        _check_money(amount, currency)
        existing = self.refunds.get(refund_id)
        if existing is not None:
            if (existing.top_up_id, existing.amount) != (top_up_id, amount):
                raise Refused("IDEMPOTENCY_CONFLICT")
            self.predict_advance(tx, existing)
            return existing
        mt = self.topups.get(top_up_id)
        if mt is None:
            raise Refused("NOT_FOUND")
        if mt.status not in CREDITED_STATUSES:
            raise Refused("INVALID_STATE")
        if amount > mt.amount - self.reserved(mt):
            raise Refused("INVALID_AMOUNT")
        refund = MRefund(refund_id, top_up_id, mt.account_id, amount, self.now())
        self.refunds[refund_id] = refund
        self.predict_advance(tx, refund)
        return refund

    def predict_advance(self, tx: FlowTx, refund: MRefund) -> None:
        """TopUps._advance_refund: drive it to SUCCEEDED (return) or FAILED (Refused)."""
        for _ in range(8):
            if refund.state == "SUCCEEDED":
                return
            if refund.state == "FAILED":
                reason = refund.failure_reason
                raise Refused(reason if reason in ("PAYMENT_FAILED", "INSUFFICIENT_FUNDS") else reason or "INVALID_STATE")
            if refund.state == "RESERVED":
                self.lazy_balance(tx, refund.account_id)
                account = tx.account(refund.account_id)
                if account.balance - account.pending_debits < refund.amount:
                    self.move(refund, "FAILED", "INSUFFICIENT_FUNDS")
                else:
                    self.move(refund, "DEBITING")
            elif refund.state == "DEBITING":
                try:
                    self.ledger_transfer(tx, TransferRequest(
                        refund_transfer_id(refund.refund_id), refund.account_id, self.clearing, refund.amount, CURRENCY,
                        TransferKind.TOP_UP_REFUND, corrects_transfer_id=credit_transfer_id(refund.top_up_id)))
                except Refused as exc:
                    self.move(refund, "FAILED", exc.reason)
                    raise
                refund.debited = True
                self.move(refund, "DEBITED")
            elif refund.state == "DEBITED":
                self.predict_refund_at_stripe(tx, refund)
            elif refund.state == "REVERSING":
                try:
                    self.ledger_transfer(tx, TransferRequest(
                        reversal_transfer_id(refund.refund_id), self.clearing, refund.account_id, refund.amount,
                        CURRENCY, TransferKind.CORRECTION, corrects_transfer_id=refund_transfer_id(refund.refund_id)))
                except Refused as exc:
                    refund.stuck_at_limit = exc.reason == "LIMIT_EXCEEDED"
                    raise Refused("UNAVAILABLE") from None
                refund.reversed, refund.stuck_at_limit = True, False
                self.move(refund, "FAILED")
        raise Refused("UNAVAILABLE")

    def predict_refund_at_stripe(self, tx: FlowTx, refund: MRefund) -> None:
        plan = self.plan(refund.key, "refund", may_fail=True)
        if plan.fault in ("unavailable", "lost"):
            raise Refused("UNAVAILABLE")
        if plan.fault == "refused" or plan.status in ("failed", "canceled"):
            self.move(refund, "REVERSING", "PAYMENT_FAILED")
            return
        self.move(refund, "SUCCEEDED")
        refund.has_stripe_id = refund.ever_succeeded = True
        self.set_refunded(self.topups[refund.top_up_id], refund.amount)
        tx.events += 1  # TopUpRefunded

    def check_refund(self, predicted: MRefund, actual: Any) -> None:
        refund, top_up = actual
        mr, mt = self.refunds[refund.refund_id], self.topups[top_up.top_up_id]
        got = (refund.state.value, refund.amount_minor, top_up.status.value, top_up.refunded_amount_minor)
        assert got == (mr.state, mr.amount, mt.status, mt.refunded), f"RefundTopUp answered {got}, the model has {mr}, {mt}"

    def refund_call(self, refund_id: str, top_up_id: str, amount: int, currency: str = CURRENCY) -> str:
        self.run("refund", lambda tx: self.predict_refund(tx, refund_id, top_up_id, amount, currency),
                 lambda: self.top_ups.refund_top_up(refund_id, top_up_id, amount, currency, note="simulation"),
                 self.check_refund)
        return f"refund {refund_id} of {top_up_id}: {amount} {currency}"

    def op_refund(self) -> str:
        refund_id = self.next_id("rf")
        credited = [t for t in self.topups.values() if t.status in CREDITED_STATUSES]
        if credited and self.rng.random() < 0.85:
            mt = self.rng.choice(credited)
            left = mt.amount - self.reserved(mt)
            roll = self.rng.random()
            if roll < 0.35:
                amount = max(left, 100)  # all that is left
            elif roll < 0.8:
                amount = 100 * self.rng.randint(1, max(1, left // 100))
            elif roll < 0.9:
                amount = left + 100
            elif roll < 0.95:
                amount = self.rng.randint(1, 99)
            else:
                amount = 0
            return self.refund_call(refund_id, mt.top_up_id, amount)
        if self.topups and self.rng.random() < 0.7:  # not refundable in its state (pending, failed, refunded ...)
            mt = self.rng.choice(list(self.topups.values()))
            return self.refund_call(refund_id, mt.top_up_id, 100)
        return self.refund_call(self.rng.choice([refund_id, "bad id!"]), "tu-nothing", 100,
                                self.rng.choice([CURRENCY, "USD"]))

    def op_refund_retry(self) -> str:
        if not self.refunds:
            return "refund retry (nothing yet)"
        refund = self.rng.choice(list(self.refunds.values()))
        if self.rng.random() < 0.75:
            return self.refund_call(refund.refund_id, refund.top_up_id, refund.amount)
        return self.refund_call(refund.refund_id, refund.top_up_id, refund.amount + 100)

    # --- the worker, auto-reload and time ---------------------------------------------------------

    def predict_maintenance(self, tx: FlowTx, open_refunds: list[str], over_limit: list[str]) -> MaintenanceReport:
        now = self.now()
        day = service_day(now, ZONE, DAY_START)
        started = 0
        candidates = sorted(
            account_id for account_id, reload in self.auto_reloads.items()
            if reload.enabled and not self.model.accounts[account_id].blocked and (account_id, day) not in self.runs
            and self.model.accounts[account_id].balance - self.model.accounts[account_id].pending_debits < reload.threshold)
        for account_id in candidates:
            reload = self.auto_reloads[account_id]
            self.lazy_balance(tx, account_id)
            account = tx.account(account_id)
            if account.balance - account.pending_debits >= reload.threshold or reload.amount > self.headroom(tx, account_id):
                continue
            mt = MTopUp(auto_reload_top_up_id(account_id, day), account_id, reload.amount, "AUTO_RELOAD", now, now)
            self.topups[mt.top_up_id] = mt
            self.runs.add((account_id, day))
            started += 1
            self.predict_charge(tx, mt)
        unsent = sorted((t for t in self.topups.values()
                         if t.origin == "AUTO_RELOAD" and t.status == "PENDING" and not t.has_intent
                         and now - timedelta(seconds=STRIPE_KEY_REPLAY_S) < t.created_at
                         <= now - timedelta(seconds=RESUME_AFTER_S)), key=lambda t: t.created_at)[:RESUME_BATCH_MAX]
        for mt in unsent:
            self.predict_charge(tx, mt)
        for mt in self.topups.values():
            if mt.origin == "AUTO_RELOAD" and mt.status == "PENDING" and not mt.has_intent \
                    and mt.created_at <= now - timedelta(seconds=STRIPE_KEY_REPLAY_S):
                mt.status, mt.failure_code, mt.updated_at = "FAILED", "NOT_SENT", now
        due = now - timedelta(seconds=RESUME_AFTER_S)
        expected_open = sorted(r.refund_id for r in self.refunds.values()
                               if r.state in OPEN_REFUND_STATES and r.updated_at <= due)
        assert sorted(open_refunds) == expected_open[:RESUME_BATCH_MAX], \
            f"open refunds the worker will resume: {open_refunds}, the model has {expected_open}"
        for refund_id in open_refunds:  # in the database's order (ties of updated_at included)
            try:
                self.predict_advance(tx, self.refunds[refund_id])
            except Refused:
                pass
        expected_over = sorted(t.top_up_id for t in self.topups.values()
                               if t.status == "OVER_LIMIT" and t.updated_at <= due)
        assert sorted(over_limit) == expected_over[:RESUME_BATCH_MAX], \
            f"over-limit top-ups the worker will refund: {over_limit}, the model has {expected_over}"
        refunded = sum(self.predict_over_limit_refund(tx, self.topups[i]) for i in over_limit)
        return MaintenanceReport(started, len(unsent), len(open_refunds), refunded)

    def predict_charge(self, tx: FlowTx, mt: MTopUp) -> None:
        """TopUps._charge_auto_reload: refusals and outages end quietly."""
        try:
            self.predict_payment_intent(tx, mt)
        except Refused:
            pass

    def op_maintenance(self) -> str:
        due = self.now() - timedelta(seconds=RESUME_AFTER_S)
        open_refunds = [r[0] for r in self.db.query(
            "SELECT id FROM {s}.top_up_refunds WHERE state = ANY(%s) AND updated_at <= %s ORDER BY updated_at LIMIT %s",
            (list(OPEN_REFUND_STATES), due, RESUME_BATCH_MAX))]
        over_limit = [r[0] for r in self.db.query(
            "SELECT id FROM {s}.top_ups WHERE status = 'OVER_LIMIT' AND updated_at <= %s ORDER BY updated_at LIMIT %s",
            (due, RESUME_BATCH_MAX))]
        report = self.run("maintenance", lambda tx: self.predict_maintenance(tx, open_refunds, over_limit),
                          self.top_ups.run_maintenance_once, _same_report)
        self.stats.update({f"worker_{name}": count for name, count in vars(report).items() if count})
        return f"maintenance {report}"

    def op_auto_reload_toggle(self) -> str:
        account_id = self.rng.choice(sorted(self.auto_reloads))
        reload = self.auto_reloads[account_id]
        if reload.enabled:
            self.top_ups.disable_auto_reload(account_id)
            reload.enabled = False
            return f"auto-reload off {account_id}"

        def predict(tx: FlowTx) -> None:
            self.lazy_balance(tx, account_id)
            reload.enabled = True

        self.run("auto_reload_on", predict, lambda: self.top_ups.configure_auto_reload(
            account_id, threshold_minor=reload.threshold, amount_minor=reload.amount,
            customer_id=f"cus_Sim{account_id[-1]}", payment_method_id="pm_card_visa"))
        return f"auto-reload on {account_id}"

    def op_jump(self) -> str:
        hours = self.rng.randint(3, 10)
        self.db.clock.advance(hours * 3600)
        return f"clock +{hours}h"

    def step(self) -> str:
        names, weights = zip(*self.OPERATIONS, strict=True)
        self.current = self.rng.choices(names, weights)[0]
        return getattr(self, self.current)()

    OPERATIONS: list[tuple[str, float]] = [
        # The ledger's operations, without its stand-in top-up (a direct credit from clearing).
        (name, weight) for name, weight in Simulation.OPERATIONS if name != "op_top_up"
    ] + [
        ("op_tu_start", 10), ("op_tu_retry", 3), ("op_stripe_pay", 8), ("op_deliver", 10), ("op_redeliver", 3),
        ("op_resend", 2), ("op_refund", 5), ("op_refund_retry", 2), ("op_refund_fails_at_stripe", 1.5),
        ("op_bad_webhook", 2), ("op_maintenance", 2), ("op_auto_reload_toggle", 0.5), ("op_jump", 0.3),
    ]

    # --- checks ---------------------------------------------------------------------------------

    def check(self, full: bool) -> None:
        super().check(full)
        params = {"clearing": self.clearing, "max": self.model.stored_value_max}
        with self.db.pool.connection() as conn:
            rows = conn.execute(TOP_UP_INVARIANTS_QUERY.replace("{s}", f'"{self.db.schema}"'), params).fetchall()
            assert not rows, "top-up invariants broken:\n  " + "\n  ".join(
                f"{list(TOP_UP_INVARIANTS)[index]}: {example}" for index, example in rows[:10])
            actual = {r[0]: tuple(r[1:]) for r in conn.execute(
                f'SELECT id, status, payment_intent_id, transfer_id IS NOT NULL, refunded_amount_minor, failure_code,'
                f' client_secret IS NOT NULL FROM "{self.db.schema}".top_ups').fetchall()}
            expected = {t.top_up_id: (t.status, self.intent_of(t), t.credited, t.refunded, t.failure_code, t.has_secret)
                        for t in self.topups.values()}
            assert actual == expected, f"top-ups differ from the model: {_diff(actual, expected)}"
            actual = {r[0]: tuple(r[1:]) for r in conn.execute(
                f'SELECT id, state, debit_transfer_id IS NOT NULL, reversal_transfer_id IS NOT NULL, stripe_refund_id,'
                f' failure_reason FROM "{self.db.schema}".top_up_refunds').fetchall()}
            expected = {r.refund_id: (r.state, r.debited, r.reversed,
                                      self.stripe.answers[r.key].stripe_refund_id if r.has_stripe_id else None,
                                      r.failure_reason) for r in self.refunds.values()}
            assert actual == expected, f"refunds differ from the model: {_diff(actual, expected)}"
            [(recorded,)] = conn.execute(f'SELECT count(*) FROM "{self.db.schema}".stripe_webhook_events').fetchall()
            assert recorded == len(self.recorded), f"{recorded} webhook events recorded, the model has {len(self.recorded)}"
            if full:
                rows = conn.execute(f'SELECT event_id, outcome FROM "{self.db.schema}".stripe_webhook_events').fetchall()
                assert dict(rows) == self.recorded, "recorded webhook outcomes differ from the model"
                rows = conn.execute(f'SELECT account_id, service_day FROM "{self.db.schema}".auto_reload_runs').fetchall()
                assert set(rows) == self.runs, "auto-reload runs differ from the model"
        # What Stripe holds agrees with the wallet: nothing credited that was not paid, every
        # succeeded refund and every over-limit refund exists at Stripe.
        for mt in self.topups.values():
            intent = self.stripe_intent(mt)
            if mt.credited or mt.status == "OVER_LIMIT" or mt.over_limit_refunded:
                assert intent is not None and intent.status == "succeeded", f"{mt.top_up_id} credited but not paid: {intent}"
            if mt.over_limit_refunded:
                assert STRIPE_KEY_OVER_LIMIT + mt.top_up_id in self.stripe.answers
        for refund in self.refunds.values():
            if refund.ever_succeeded:
                assert refund.key in self.stripe.answers, f"refund {refund.refund_id} succeeded but Stripe has none"

    def check_events(self) -> None:
        super().check_events()
        succeeded: Counter[str] = Counter()
        refunded: Counter[str] = Counter()
        for event in self.db.events():
            kind = event.WhichOneof("payload")
            if kind == "top_up_succeeded":
                succeeded[event.top_up_succeeded.top_up.top_up_id] += 1
            elif kind == "top_up_refunded":
                refunded[event.top_up_refunded.refund.refund_id] += 1
        assert succeeded == Counter([t.top_up_id for t in self.topups.values() if t.credited]), "TopUpSucceeded events"
        assert refunded == Counter([r.refund_id for r in self.refunds.values() if r.ever_succeeded]
                                   + [f"over-limit:{t.top_up_id}"[:64] for t in self.topups.values()
                                      if t.over_limit_refunded]), "TopUpRefunded events"

    def drain(self) -> None:
        """Stripe is healthy again: the worker finishes what is open, every queued event arrives."""
        self.healthy = True
        for _ in range(4):
            self.db.clock.advance(RESUME_AFTER_S + 1)
            self.op_maintenance()
            self.check(full=False)
            for delivery in list(self.stripe.outgoing):
                self.stripe.outgoing.remove(delivery)
                self.deliver(delivery)
                self.check(full=False)
        assert not self.stripe.outgoing, f"events Stripe could never deliver: {self.stripe.outgoing}"
        self.check(full=True)

    def check_settled(self) -> None:
        """Every paid PaymentIntent is accounted for to the minor unit."""
        for mt in self.topups.values():
            refunds = [r for r in self.refunds.values() if r.top_up_id == mt.top_up_id]
            assert all(r.state in ("SUCCEEDED", "FAILED", "REVERSING") for r in refunds), f"refund left open: {refunds}"
            kept = (mt.amount if mt.credited else 0) - sum(r.amount for r in refunds if r.debited and not r.reversed)
            intent = self.stripe_intent(mt)
            if intent is None or intent.status != "succeeded":
                assert kept == 0 and not mt.credited, f"{mt.top_up_id} was never paid but the wallet kept {kept}"
                continue
            back = self.stripe.refunded(intent.payment_intent_id)
            waiting = sum(r.amount for r in refunds if r.state == "REVERSING")
            assert all(r.stuck_at_limit for r in refunds if r.state == "REVERSING"), refunds
            assert mt.status != "OVER_LIMIT", f"{mt.top_up_id} is still waiting for its over-limit refund"
            assert kept + back + waiting == intent.amount, \
                f"{mt.top_up_id}: paid {intent.amount}, the wallet kept {kept}, {back} went back to the card, " \
                f"{waiting} is waiting to be put back: {mt} {refunds}"


def _check_money(amount: int, currency: str) -> None:
    """TopUps._check_money: positive, the wallet's currency, whole dollars."""
    if amount <= 0:
        raise Refused("INVALID_AMOUNT")
    if currency != CURRENCY:
        raise Refused("INVALID_CURRENCY")
    if amount % 100:
        raise Refused("INVALID_AMOUNT")


def _same_answer(what: str) -> Callable[[Any, Any], None]:
    def check(predicted: Any, actual: Any) -> None:
        assert actual == predicted, f"webhook {what}: the model predicted {predicted}, the endpoint answered {actual}"
    return check


def _same_report(predicted: Any, actual: Any) -> None:
    assert actual == predicted, f"the worker's pass did {actual}, the model predicted {predicted}"


def _diff(actual: dict, expected: dict) -> dict:
    return {k: (actual.get(k), expected.get(k)) for k in set(actual) | set(expected) if actual.get(k) != expected.get(k)}


TOP_UP_INVARIANTS = {
    "a top-up is credited exactly when its one credit transfer exists, for its amount, clearing -> its wallet":
        "SELECT t.id FROM {s}.top_ups t LEFT JOIN {s}.transfers x ON x.id = 'tu:' || t.id"
        " WHERE (t.transfer_id IS NOT NULL) <> (x.id IS NOT NULL)"
        "    OR (x.id IS NOT NULL AND (t.transfer_id <> x.id OR x.amount_minor <> t.amount_minor OR x.kind <> 'TOP_UP'"
        "        OR x.credit_account_id <> t.account_id OR x.debit_account_id <> %(clearing)s))",
    "every TOP_UP transfer is the credit of a top-up":
        "SELECT x.id FROM {s}.transfers x WHERE x.kind = 'TOP_UP'"
        " AND NOT EXISTS (SELECT 1 FROM {s}.top_ups t WHERE t.transfer_id = x.id)",
    "refunded never exceeds what was credited, equals the succeeded refunds, and the status says so":
        "SELECT t.id, t.status, t.amount_minor, t.refunded_amount_minor, r.done, r.held FROM {s}.top_ups t"
        " LEFT JOIN (SELECT top_up_id, coalesce(sum(amount_minor) FILTER (WHERE state = 'SUCCEEDED'), 0) AS done,"
        "                   coalesce(sum(amount_minor) FILTER (WHERE state <> 'FAILED'), 0) AS held"
        "            FROM {s}.top_up_refunds GROUP BY 1) r ON r.top_up_id = t.id"
        " WHERE t.refunded_amount_minor > t.amount_minor OR coalesce(r.held, 0) > t.amount_minor"
        "    OR (t.transfer_id IS NOT NULL AND t.refunded_amount_minor <> coalesce(r.done, 0))"
        "    OR (t.transfer_id IS NULL AND r.top_up_id IS NOT NULL)"
        "    OR (t.transfer_id IS NULL AND t.refunded_amount_minor <> 0 AND t.status <> 'REFUNDED')"
        "    OR (t.status IN ('PENDING', 'FAILED', 'OVER_LIMIT', 'SUCCEEDED') AND t.refunded_amount_minor <> 0)"
        "    OR (t.status = 'PARTIALLY_REFUNDED' AND t.refunded_amount_minor NOT BETWEEN 1 AND t.amount_minor - 1)"
        "    OR (t.status = 'REFUNDED' AND t.refunded_amount_minor <> t.amount_minor)",
    "a refund's ledger transfers match its state, amount and accounts":
        "SELECT r.id, r.state FROM {s}.top_up_refunds r JOIN {s}.top_ups t ON t.id = r.top_up_id"
        " LEFT JOIN {s}.transfers d ON d.id = 'tur:' || r.id LEFT JOIN {s}.transfers c ON c.id = 'tuc:' || r.id"
        " WHERE (d.id IS NOT NULL) <> (r.debit_transfer_id IS NOT NULL)"
        "    OR (c.id IS NOT NULL) <> (r.reversal_transfer_id IS NOT NULL)"
        "    OR (d.id IS NOT NULL AND (d.amount_minor <> r.amount_minor OR d.kind <> 'TOP_UP_REFUND'"
        "        OR d.debit_account_id <> t.account_id OR d.credit_account_id <> %(clearing)s"
        "        OR d.corrects_transfer_id <> 'tu:' || t.id))"
        "    OR (c.id IS NOT NULL AND (c.amount_minor <> r.amount_minor OR c.kind <> 'CORRECTION'"
        "        OR c.debit_account_id <> %(clearing)s OR c.credit_account_id <> t.account_id))"
        "    OR (r.state = 'RESERVED' AND (d.id IS NOT NULL OR c.id IS NOT NULL))"
        "    OR (r.state IN ('DEBITED', 'SUCCEEDED', 'REVERSING') AND (d.id IS NULL OR c.id IS NOT NULL))"
        "    OR (r.state = 'FAILED' AND (d.id IS NULL) <> (c.id IS NULL))",
    "only the top-up flow moves money through Stripe clearing":
        "SELECT x.id, x.kind FROM {s}.transfers x"
        " WHERE (x.debit_account_id = %(clearing)s OR x.credit_account_id = %(clearing)s)"
        "   AND NOT (x.kind = 'TOP_UP' AND x.id LIKE 'tu:%%' OR x.kind = 'TOP_UP_REFUND' AND x.id LIKE 'tur:%%'"
        "            OR x.kind = 'CORRECTION' AND x.id LIKE 'tuc:%%')"
        " UNION ALL SELECT x.id, x.kind FROM {s}.transfers x WHERE x.kind IN ('TOP_UP_REFUND', 'CORRECTION')"
        "   AND NOT EXISTS (SELECT 1 FROM {s}.top_up_refunds r WHERE x.id IN (r.debit_transfer_id, r.reversal_transfer_id))",
    "no rider wallet holds more than the stored-value maximum":
        "SELECT id, balance_minor, pending_credits_minor FROM {s}.accounts"
        " WHERE kind = 'RIDER_WALLET' AND balance_minor + pending_credits_minor > %(max)s",
    "one auto-reload per rider and service day, each an auto-reload top-up of that rider, and back":
        "SELECT r.account_id, r.service_day::text FROM {s}.auto_reload_runs r JOIN {s}.top_ups t ON t.id = r.top_up_id"
        " WHERE t.origin <> 'AUTO_RELOAD' OR t.account_id <> r.account_id"
        " UNION ALL SELECT account_id, service_day::text FROM {s}.auto_reload_runs GROUP BY 1, 2 HAVING count(*) > 1"
        " UNION ALL SELECT t.id, '' FROM {s}.top_ups t WHERE t.origin = 'AUTO_RELOAD'"
        "   AND NOT EXISTS (SELECT 1 FROM {s}.auto_reload_runs r WHERE r.top_up_id = t.id)",
}


# All of them in one round trip after every step: (index of the invariant, an example row).
TOP_UP_INVARIANTS_QUERY = " UNION ALL ".join(
    f"(SELECT {index}, to_jsonb(q)::text FROM ({text}) q LIMIT 5)" for index, text in enumerate(TOP_UP_INVARIANTS.values()))


@pytest.fixture()
def db(postgres_dsn: str, scratch_schema: str) -> Iterator[WalletDb]:
    wallet = open_wallet_db(postgres_dsn, scratch_schema, stored_value_max_minor=STORED_VALUE_MAX)
    yield wallet
    wallet.pool.close()


def test_seeded_simulation_with_stripe_top_ups_and_webhooks_keeps_every_invariant(db: WalletDb,
                                                                                  stripe_api_base: str) -> None:
    lenient = db.another_ledger(rider_floor_minor=LENIENT_FLOOR, stored_value_max_minor=STORED_VALUE_MAX)
    simulation = TopUpSimulation(db, lenient, SEED, stripe_api_base)
    started = time.monotonic()
    last, step = "setup", -1
    try:
        for step in range(STEPS):
            last = simulation.step()
            simulation.check(full=step % FULL_CHECK_EVERY == 0 or step == STEPS - 1)
        simulation.current = "the final drain (Stripe healthy, the worker runs, every queued event delivered)"
        simulation.drain()
        simulation.check_events()
        simulation.check_settled()
    except AssertionError as exc:
        raise AssertionError(
            f"top-up simulation failed at step {step} in {simulation.current} (the step before: {last}) with seed "
            f"{SEED}; reproduce with "
            f"WALLET_SIM_SEED={SEED} WALLET_SIM_STEPS={step + 1} "
            f"pytest tests/integration/test_wallet_simulation_topups.py\n{exc}") from exc
    finally:
        simulation.close()
    elapsed = time.monotonic() - started
    stats = simulation.stats
    credited = sum(t.credited for t in simulation.topups.values())
    print(f"\nwallet top-up simulation: seed {SEED}, {STEPS} steps in {elapsed:.1f}s; "
          f"{len(simulation.topups)} top-ups ({credited} credited), {len(simulation.refunds)} refunds, "
          f"{len(simulation.recorded)} webhook events recorded, {sum(simulation.stripe.calls.values())} Stripe calls "
          f"{dict(simulation.stripe.calls)}, {len(simulation.model.transfers)} transfers, {simulation.model.events} events;"
          f" top-ups {dict(Counter(f'{t.origin}:{t.status}' for t in simulation.topups.values()))};"
          f" refunds {dict(Counter(r.state for r in simulation.refunds.values()))};"
          f" outcomes {dict(sorted(stats.items()))}")
    if STEPS >= 1000:  # the run must actually have exercised the interesting paths
        for outcome in ("top_up:ok", "top_up:LIMIT_EXCEEDED", "top_up:IDEMPOTENCY_CONFLICT", "top_up:UNAVAILABLE",
                        "top_up:PAYMENT_FAILED", "top_up:INVALID_AMOUNT", "webhook:CREDITED", "webhook:MARKED_FAILED",
                        "webhook:IGNORED", "webhook:OVER_LIMIT", "webhook:REFUND_FAILED", "webhook:RETRY",
                        "webhook_again:DUPLICATE", "webhook_new_id:ALREADY_CREDITED", "webhook_bad:BAD_SIGNATURE",
                        "webhook_bad:STALE", "webhook_odd:MISMATCH", "webhook_odd:UNKNOWN_TOP_UP", "webhook_http",
                        "refund:ok", "refund:INVALID_AMOUNT", "refund:INSUFFICIENT_FUNDS", "refund:UNAVAILABLE",
                        "refund:PAYMENT_FAILED", "refund:IDEMPOTENCY_CONFLICT", "refund:INVALID_STATE",
                        "maintenance:ok", "worker_refunds_resumed", "hold:ok", "post:ok", "void:ok", "post:HOLD_EXPIRED", "pay:ok"):
            assert stats[outcome] > 0, f"the simulation never produced {outcome}: {dict(stats)}"


def test_a_refund_failure_reported_while_the_refund_is_in_doubt_is_redelivered_not_lost(
        db: WalletDb, stripe_api_base: str) -> None:
    """Found by the simulation. Stripe accepted a refund but its answer was lost (the wallet
    has it DEBITED); then the refund failed at Stripe. The retry replays Stripe's first answer
    (accepted), so if the refund.failed event were recorded as handled now, the rider would be
    debited while the card never got the money. It is answered 503 instead, and acted on
    when Stripe redelivers it after the refund is settled."""
    lenient = db.another_ledger(rider_floor_minor=LENIENT_FLOOR, stored_value_max_minor=STORED_VALUE_MAX)
    simulation = TopUpSimulation(db, lenient, SEED, stripe_api_base)
    stripe, top_ups = simulation.stripe, simulation.top_ups
    try:
        stripe.expect(STRIPE_KEY_TOP_UP + "tu-1", Plan("ok", "requires_payment_method"))
        top_up = top_ups.top_up("tu-1", "rider-1", 5_000, CURRENCY)
        intent = stripe.intents[top_up.payment_intent_id]
        intent.status = "succeeded"
        paid = stripe.emit("payment_intent.succeeded", intent.as_object("succeeded"))
        assert simulation.post(paid.body, sign(paid.body), via_http=True) == (200, "CREDITED")
        stripe.expect(STRIPE_KEY_REFUND + "rf-1", Plan("lost", "pending"))
        with pytest.raises(errors.Unavailable):
            top_ups.refund_top_up("rf-1", "tu-1", 2_000, CURRENCY)
        assert db.balance("rider-1")[0] == 3_000  # debited first, the refund is in doubt
        [refund] = stripe.refunds.values()
        refund.status = "failed"  # days later at Stripe: the card is closed
        failed = stripe.emit("refund.failed", refund.as_object("failed"))
        assert simulation.post(failed.body, sign(failed.body), via_http=True) == (503, "RETRY")
        assert db.query("SELECT count(*) FROM {s}.stripe_webhook_events WHERE event_id = %s", (failed.event_id,)) == [(0,)]
        stripe.expect(STRIPE_KEY_REFUND + "rf-1", Plan("ok"))  # the retry: Stripe replays its first answer
        settled, _ = top_ups.refund_top_up("rf-1", "tu-1", 2_000, CURRENCY)
        assert settled.state is RefundState.SUCCEEDED
        assert simulation.post(failed.body, sign(failed.body), via_http=False) == (200, "REFUND_FAILED")  # redelivered
        stripe.settle()
        assert db.balance("rider-1")[0] == 5_000  # the money is back in the wallet
        after = top_ups.get_top_up("tu-1")
        assert (after.status.value, after.refunded_amount_minor) == ("SUCCEEDED", 0)
        assert db.query("SELECT state, reversal_transfer_id FROM {s}.top_up_refunds") == [("FAILED", "tuc:rf-1")]
        assert not db.invariant_violations()
    finally:
        simulation.close()
