"""The demo city's first shop: a merchant joins the network and a rider buys tea by card.

`run(env)` talks only to the running services (`make demo` starts them) and plays Stripe
where Stripe would call us, with webhooks signed exactly as Stripe signs them:

1. A split contract for merchant payments is in force (made through the settlement service
   if none is: the city takes 2.5 %, the platform 1.5 % plus NT$1, the merchant the rest).
2. A tea house onboards: the merchant service makes its Stripe Connect account (stripe-mock)
   and its payable account in the wallet, and returns the onboarding link. It gets a till
   key; a charge is refused while Stripe has not verified it.
3. Stripe's signed account.updated (charges enabled) reaches the merchant's webhook: verified.
4. A rider opens a wallet, links a card and tops up NT$500 (a PaymentIntent at stripe-mock,
   then Stripe's signed payment_intent.succeeded at the wallet's webhook).
5. The rider buys a pot of oolong tea for NT$185 by card; the split is printed, as recorded
   in the ledger. The shop refunds NT$40 of it; the refund's split is printed.
6. The ledger adds up: the parties' shares, and the sum over every wallet account is zero.

Raises RuntimeError with a plain explanation when a step does not go as it should.
Run alone: `source infra/env.sh && .venv/bin/python -m scripts.demo_merchant`.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
import uuid
from collections.abc import Mapping

import grpc
import psycopg

from citytap.common.v1 import credential_pb2, split_pb2
from citytap.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from citytap.settlement.v1 import settlement_pb2_grpc
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs.grpc_client import connect, error_info
from libs.protos import money_pb
from libs.stripe_webhooks import sign_payload
from scripts import demo_contracts
from scripts.demo_contracts import CURRENCY

TEA_CATEGORY = "5814"  # fast food and tea shops
PARTY_NAMES = {split_pb2.PARTY_MERCHANT: "merchant", split_pb2.PARTY_CITY: "city",
               split_pb2.PARTY_PLATFORM: "platform", split_pb2.PARTY_TRANSIT_OPERATOR: "operator"}


def _say(text: str) -> None:
    print(text, flush=True)


def _nt(amount_minor: int) -> str:
    return f"NT${amount_minor / 100:,.2f}"


def _reason(exc: grpc.RpcError) -> str:
    info = error_info(exc)
    return info.reason if info is not None else exc.code().name  # type: ignore[attr-defined]


def _post(listen: str, payload: bytes, secret: str) -> tuple[int, str]:
    host, _, port = listen.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=10)
    conn.request("POST", "/stripe/webhook", body=payload,
                 headers={"Content-Type": "application/json", "Stripe-Signature": sign_payload(payload, secret)})
    answer = conn.getresponse()
    body = answer.read()
    conn.close()
    return answer.status, json.loads(body).get("outcome", "") if body else ""


def _event(event_type: str, obj: dict, *, account: str | None = None) -> bytes:
    body = {"id": f"evt_demo_{uuid.uuid4().hex[:20]}", "object": "event", "api_version": "2026-10-28.endive",
            "created": int(time.time()), "livemode": False, "type": event_type, "data": {"object": obj}}
    if account:
        body["account"] = account
    return json.dumps(body).encode()


def _print_split(title: str, lines: list) -> None:
    parts = ", ".join(f"{PARTY_NAMES.get(s.party, '?')} {_nt(s.amount.amount_minor)}" for s in lines)
    _say(f"  {title:<27} {parts}  (contract {lines[0].contract_id} v{lines[0].contract_version})")


def run(env: Mapping[str, str]) -> None:
    """Onboard a shop, verify it by Stripe webhook, and let a rider pay it by card."""
    _say("\n== a shop joins the network: Stripe Connect onboarding, a till key, a purchase by card")
    merchants = merchant_pb2_grpc.MerchantServiceStub(connect(env["CITYTAP_MERCHANT_ADDRESS"], default_timeout_s=15))
    wallet = wallet_pb2_grpc.WalletServiceStub(connect(env["CITYTAP_WALLET_ADDRESS"], default_timeout_s=15))
    settlement = settlement_pb2_grpc.SettlementServiceStub(connect(env["CITYTAP_SETTLEMENT_ADDRESS"],
                                                                   default_timeout_s=10))
    demo_contracts.merchant_payments(settlement)

    merchant_id = str(uuid.uuid4())
    onboarded = merchants.Onboard(merchant_pb2.OnboardRequest(
        merchant_id=merchant_id, name="Lin's Tea House", category=TEA_CATEGORY, country="TW",
        email="owner@lins-tea.example", return_url="https://merchants.citytap.example/onboarded",
        refresh_url="https://merchants.citytap.example/onboard-again"))
    shop = onboarded.merchant
    _say(f"  onboarded                   {shop.name}: Stripe account {shop.stripe_account_id}, "
         f"payable {shop.payable_account_id}")
    _say(f"  onboarding link             {onboarded.onboarding_url}")
    key = merchants.CreateApiKey(merchant_pb2.CreateApiKeyRequest(
        merchant_id=merchant_id, label="front till", scopes=["charges:write", "charges:read", "refunds:write"]))
    auth = [("authorization", f"Bearer {key.secret}")]
    _say(f"  till key                    {key.api_key.secret_prefix}... (secret shown once, stored as SHA-256)")

    # The rider: a wallet, a card, and NT$500 topped up through Stripe.
    rider_id, card_uid = f"rider-{uuid.uuid4().hex[:12]}", uuid.uuid4().bytes[:7]
    wallet.CreateAccount(wallet_pb2.CreateAccountRequest(account_id=rider_id))
    wallet.LinkCard(wallet_pb2.LinkCardRequest(account_id=rider_id, card_uid=card_uid, label="EasyCard"))
    top_up_id = f"demo-{uuid.uuid4().hex[:12]}"
    top_up = wallet.TopUp(wallet_pb2.TopUpRequest(top_up_id=top_up_id, account_id=rider_id,
                                                  amount=money_pb(50_000, CURRENCY))).top_up
    paid = _event("payment_intent.succeeded", {
        "id": top_up.payment_intent_id, "object": "payment_intent", "amount": 50_000, "currency": "twd",
        "status": "succeeded", "metadata": {"top_up_id": top_up_id, "account_id": rider_id}})
    status, outcome = _post(env["CITYTAP_WALLET_WEBHOOK_LISTEN"], paid, env["CITYTAP_STRIPE_WEBHOOK_SECRET"])
    if (status, outcome) != (200, "CREDITED"):
        raise RuntimeError(f"the wallet did not credit the rider's top-up: {status} {outcome}")
    _say(f"  rider                       {rider_id}: card linked, topped up {_nt(50_000)} through Stripe")

    tea = merchant_pb2.ChargeRequest(merchant_id=merchant_id, order_id="order-0001",
                                     credential=credential_pb2.Credential(card_uid=card_uid),
                                     amount=money_pb(18_500, CURRENCY), description="a pot of oolong tea")
    try:
        merchants.Charge(tea, metadata=auth)
        raise RuntimeError("a shop Stripe has not verified was allowed to charge")
    except grpc.RpcError as exc:
        if _reason(exc) != "MERCHANT_NOT_VERIFIED":
            raise
        _say("  charge before verification refused: MERCHANT_NOT_VERIFIED")

    verified = _event("account.updated", {"id": shop.stripe_account_id, "object": "account", "charges_enabled": True,
                                          "details_submitted": True, "payouts_enabled": True},
                      account=shop.stripe_account_id)
    status, outcome = _post(env["CITYTAP_MERCHANT_WEBHOOK_LISTEN"], verified, env["CITYTAP_MERCHANT_WEBHOOK_SECRET"])
    if (status, outcome) != (200, "VERIFIED"):
        raise RuntimeError(f"the merchant service did not verify the shop: {status} {outcome}")
    _say("  Stripe account.updated (signed webhook): charges enabled -> VERIFIED")

    charge = merchants.Charge(tea, metadata=auth).charge
    again = merchants.Charge(tea, metadata=auth).charge  # the till retries: the same charge, no second payment
    if again.charge_id != charge.charge_id:
        raise RuntimeError("a retried charge made a second payment")
    _say(f"  bought                      {charge.description} for {_nt(charge.amount.amount_minor)} by card "
         f"(charge {charge.charge_id}, retried once: same charge)")
    _print_split("split at the moment of sale", list(charge.splits))
    refund = merchants.Refund(merchant_pb2.RefundRequest(
        refund_id=f"refund-{uuid.uuid4().hex[:8]}", merchant_id=merchant_id, charge_id=charge.charge_id,
        amount=money_pb(4_000, CURRENCY), note="one cup returned"), metadata=auth)
    _print_split(f"refund of {_nt(4_000)}", list(refund.refund.splits))

    balance = wallet.GetBalance(wallet_pb2.GetBalanceRequest(account_id=rider_id)).balance.amount_minor
    payable = wallet.GetBalance(wallet_pb2.GetBalanceRequest(account_id=shop.payable_account_id)).balance.amount_minor
    kept = sum(s.amount.amount_minor for s in charge.splits if s.party == split_pb2.PARTY_MERCHANT) - \
        sum(s.amount.amount_minor for s in refund.refund.splits if s.party == split_pb2.PARTY_MERCHANT)
    _say(f"  rider's wallet now          {_nt(balance)}; the shop's payable holds {_nt(payable)} (its share)")
    with psycopg.connect(env["CITYTAP_POSTGRES_DSN"], connect_timeout=5) as conn:
        sums = conn.execute("SELECT currency, sum(balance_minor)::bigint FROM wallet.accounts GROUP BY currency").fetchall()
    if balance != 50_000 - 18_500 + 4_000 or payable != kept or any(total != 0 for _, total in sums):
        raise RuntimeError(f"the ledger does not add up: rider {balance}, payable {payable} (expected {kept}), "
                           f"sums {sums}")
    _say("  the ledger adds up: every share where the split says, and all wallet accounts sum to zero")


if __name__ == "__main__":
    try:
        run(os.environ)
    except (RuntimeError, grpc.RpcError, KeyError) as exc:
        print(f"demo_merchant: {exc}", file=sys.stderr)
        sys.exit(1)
