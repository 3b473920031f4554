"""Merchant onboarding through Stripe Connect (stripe-mock), the verifying webhook, API keys
and their isolation, against the real stack: a real wallet, the settlement contract book and
the merchant service built by its composition root."""

from __future__ import annotations

import hashlib
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from citytap.merchant.v1 import merchant_pb2
from libs.stripe_webhooks import sign_payload
from tests.integration.merchant_support import (  # noqa: F401 - the fixture is used by name
    CATEGORY,
    WEBHOOK_SECRET,
    MerchantStack,
    bearer,
    card_credential,
    expect_error,
    merchant_stack,
)
from libs.protos import money_pb

pytestmark = pytest.mark.integration


def test_onboard_opens_the_payable_and_the_connect_account_once(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    merchant_id = str(uuid.uuid4())
    first, answer = stack.onboard(merchant_id)
    assert first.stripe_account_id.startswith("acct_")
    assert first.payable_account_id == f"merchant:{merchant_id}"
    assert answer.merchant.status == merchant_pb2.MERCHANT_STATUS_ONBOARDING
    assert answer.onboarding_url.startswith("https://")
    assert answer.merchant.per_purchase_limit.amount_minor == 100_000
    assert answer.merchant.per_day_limit.amount_minor == 300_000
    account, _cards = stack.wallet.ledger.get_account(first.payable_account_id)
    assert (account.kind.value, account.owner_id) == ("MERCHANT_PAYABLE", merchant_id)

    again, _ = stack.onboard(merchant_id)  # a retry: same merchant, same Stripe account
    assert again == first
    code, reason, _ = expect_error(stack.stub.Onboard, merchant_pb2.OnboardRequest(
        merchant_id=merchant_id, name="Another Name", category=CATEGORY, country="TW", email="owner@lins-tea.example",
        return_url="https://x.example/r", refresh_url="https://x.example/f"))
    assert (code, reason) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    kinds = [e.WhichOneof("payload") for e in stack.events(merchant_id)]
    assert kinds == ["merchant_onboarded"]
    got = stack.stub.GetMerchant(merchant_pb2.GetMerchantRequest(merchant_id=merchant_id)).merchant
    assert (got.stripe_account_id, got.status) == (first.stripe_account_id, merchant_pb2.MERCHANT_STATUS_ONBOARDING)


@pytest.mark.parametrize("field, value", [
    ("merchant_id", ""), ("merchant_id", "has space"), ("name", ""), ("category", "58"), ("category", "food"),
    ("country", "Taiwan"), ("email", "not-an-email"), ("return_url", "ftp://x"), ("refresh_url", ""),
])
def test_bad_onboarding_requests_are_refused_and_change_nothing(merchant_stack: MerchantStack, field: str,
                                                                value: str) -> None:
    before = merchant_stack.snapshot()
    request = dict(merchant_id=str(uuid.uuid4()), name="Tea", category=CATEGORY, country="TW", email="a@b.example",
                   return_url="https://x.example/r", refresh_url="https://x.example/f")
    request[field] = value
    code, reason, meta = expect_error(merchant_stack.stub.Onboard, merchant_pb2.OnboardRequest(**request))
    assert (code, reason, meta.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", field)
    assert merchant_stack.snapshot() == before


def test_unknown_merchants_are_not_found(merchant_stack: MerchantStack) -> None:
    stub = merchant_stack.stub
    nobody = str(uuid.uuid4())
    for call, request in [(stub.GetMerchant, merchant_pb2.GetMerchantRequest(merchant_id=nobody)),
                          (stub.CreateApiKey, merchant_pb2.CreateApiKeyRequest(merchant_id=nobody)),
                          (stub.RevokeApiKey, merchant_pb2.RevokeApiKeyRequest(merchant_id=nobody, key_id="0123abcd"))]:
        code, reason, meta = expect_error(call, request)
        assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
        assert meta["resource"] in {"merchant", "api_key"}


def test_charges_are_refused_until_stripe_enables_them(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    merchant, _ = stack.onboard()
    secret = stack.key(merchant.merchant_id)
    rider, uid = stack.rider()
    request = merchant_pb2.ChargeRequest(merchant_id=merchant.merchant_id, order_id="order-1",
                                         credential=card_credential(uid), amount=money_pb(5_000, "TWD"))
    before = stack.snapshot()
    code, reason, _ = expect_error(stack.stub.Charge, request, metadata=bearer(secret))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MERCHANT_NOT_VERIFIED")
    assert stack.snapshot() == before

    # Stripe reports the account, but charges are not enabled yet: still refused.
    assert stack.post_webhook(stack.account_event(merchant.stripe_account_id, charges_enabled=False)) == \
        (200, "NOT_ENABLED")
    assert expect_error(stack.stub.Charge, request, metadata=bearer(secret))[1] == "MERCHANT_NOT_VERIFIED"

    assert stack.post_webhook(stack.account_event(merchant.stripe_account_id)) == (200, "VERIFIED")
    got = stack.stub.GetMerchant(merchant_pb2.GetMerchantRequest(merchant_id=merchant.merchant_id)).merchant
    assert got.status == merchant_pb2.MERCHANT_STATUS_VERIFIED and got.HasField("verified_at")
    charge = stack.stub.Charge(request, metadata=bearer(secret)).charge
    assert charge.status == merchant_pb2.CHARGE_STATUS_SUCCEEDED
    assert stack.balance(rider) == 500_000 - 5_000
    # A later account.updated changes nothing and publishes nothing more.
    assert stack.post_webhook(stack.account_event(merchant.stripe_account_id)) == (200, "ALREADY_VERIFIED")
    kinds = [e.WhichOneof("payload") for e in stack.events(merchant.merchant_id)]
    assert kinds == ["merchant_onboarded", "merchant_verified", "charge_succeeded"]


def test_forged_stale_malformed_and_replayed_webhooks_change_nothing(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    merchant, _ = stack.onboard()
    good = stack.account_event(merchant.stripe_account_id, event_id=f"evt_{uuid.uuid4().hex[:24]}")
    now = int(time.time())
    before = stack.snapshot()
    cases = [
        ("forged with another secret", good, sign_payload(good, "whsec_someone_else_entirely_0000"), "BAD_SIGNATURE"),
        ("no signature", good, None, "BAD_SIGNATURE"),
        ("garbage signature", good, "t=abc,v1=zzz", "BAD_SIGNATURE"),
        ("body changed after signing", good.replace(b'"charges_enabled": true', b'"charges_enabled": false'),
         sign_payload(good, WEBHOOK_SECRET), "BAD_SIGNATURE"),
        ("stale, 301 s old", good, sign_payload(good, WEBHOOK_SECRET, timestamp=now - 301), "STALE"),
        ("from the future, 301 s ahead", good, sign_payload(good, WEBHOOK_SECRET, timestamp=now + 301), "STALE"),
        ("signed JSON that is not an event", b'{"hello": "world"}', "sign", "MALFORMED"),
        ("signed text that is not JSON", b'{"id": "evt_1", ', "sign", "MALFORMED"),
    ]
    for name, payload, signature, outcome in cases:
        assert stack.post_webhook(payload, signature) == (400, outcome), name
    assert stack.snapshot() == before
    assert stack.post_webhook(good, sign_payload(good, WEBHOOK_SECRET, timestamp=now - 299)) == (200, "VERIFIED")
    after = stack.snapshot()
    # The same event again, freshly signed (Stripe retries re-sign): answered once, changes nothing.
    assert stack.post_webhook(good) == (200, "DUPLICATE")
    assert stack.snapshot() == after
    assert stack.post_webhook(stack.account_event("acct_nobodyweknow")) == (200, "UNKNOWN_ACCOUNT")
    assert stack.post_webhook(stack.account_event(merchant.stripe_account_id, event_type="account.application.deauthorized")) \
        == (200, "IGNORED")
    assert stack.post_webhook(stack.account_event(merchant.stripe_account_id, livemode=True)) == (200, "IGNORED_MODE")
    assert stack.post_webhook(good, path="/elsewhere") == (404, "NOT_FOUND")
    assert stack.post_webhook(good, method="GET")[0] == 405


def test_one_event_delivered_concurrently_verifies_once(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    merchant, _ = stack.onboard()
    event = stack.account_event(merchant.stripe_account_id)
    with ThreadPoolExecutor(4) as pool:
        outcomes = sorted(pool.map(lambda _: stack.post_webhook(event), range(4)))
    assert outcomes == [(200, "DUPLICATE")] * 3 + [(200, "VERIFIED")]
    kinds = [e.WhichOneof("payload") for e in stack.events(merchant.merchant_id)]
    assert kinds.count("merchant_verified") == 1


# --- API keys ---------------------------------------------------------------------------------


def test_a_key_secret_is_shown_once_and_stored_only_as_its_hash(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    merchant, _ = stack.onboard()
    answer = stack.stub.CreateApiKey(merchant_pb2.CreateApiKeyRequest(merchant_id=merchant.merchant_id, label="till 3"))
    key, secret = answer.api_key, answer.secret
    assert secret.startswith("ctk_") and len(secret) >= 60
    assert secret.startswith(key.secret_prefix) and len(key.secret_prefix) < len(secret) - 40
    assert list(key.scopes) == ["charges:write", "charges:read"]
    rows = stack.query("SELECT id, label, secret_prefix, secret_hash, scopes::text FROM {m}.api_keys WHERE id = %s",
                       (key.key_id,))
    assert len(rows) == 1
    assert bytes(rows[0][3]) == hashlib.sha256(secret.encode()).digest()
    secret_part = secret.rsplit("_", 1)[1]
    for column in rows[0]:
        assert secret_part not in str(column)
    # Nothing ever returns the secret again.
    revoked = stack.stub.RevokeApiKey(merchant_pb2.RevokeApiKeyRequest(merchant_id=merchant.merchant_id,
                                                                       key_id=key.key_id))
    assert secret_part not in str(revoked)


def test_keys_act_only_within_their_scopes(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    merchant = stack.verified_merchant()
    till = stack.key(merchant.merchant_id)                     # charges:write + charges:read
    refunder = stack.key(merchant.merchant_id, "refunds:write")
    reader = stack.key(merchant.merchant_id, "charges:read")
    _, uid = stack.rider()
    charge = stack.charge(till, merchant.merchant_id, uid, 2_000)
    refund = merchant_pb2.RefundRequest(refund_id="r-1", merchant_id=merchant.merchant_id, charge_id=charge.charge_id,
                                        amount=money_pb(500, "TWD"))
    assert expect_error(stack.stub.Refund, refund, metadata=bearer(till))[:2] == \
        (grpc.StatusCode.PERMISSION_DENIED, "API_KEY_SCOPE_MISSING")
    assert stack.stub.Refund(refund, metadata=bearer(refunder)).charge.refunded_amount.amount_minor == 500
    charge_request = merchant_pb2.ChargeRequest(merchant_id=merchant.merchant_id, order_id="o-2",
                                                credential=card_credential(uid), amount=money_pb(100, "TWD"))
    for secret in (refunder, reader):
        assert expect_error(stack.stub.Charge, charge_request, metadata=bearer(secret))[:2] == \
            (grpc.StatusCode.PERMISSION_DENIED, "API_KEY_SCOPE_MISSING")
    seen = stack.stub.GetCharge(merchant_pb2.GetChargeRequest(merchant_id=merchant.merchant_id,
                                                              charge_id=charge.charge_id), metadata=bearer(reader))
    assert [r.refund_id for r in seen.refunds] == ["r-1"]
    assert expect_error(stack.stub.GetCharge, merchant_pb2.GetChargeRequest(
        merchant_id=merchant.merchant_id, charge_id=charge.charge_id), metadata=bearer(refunder))[1] == \
        "API_KEY_SCOPE_MISSING"
    code, reason, _ = expect_error(stack.stub.CreateApiKey, merchant_pb2.CreateApiKeyRequest(
        merchant_id=merchant.merchant_id, scopes=["charges:write", "payouts:write"]))
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


def test_revoked_missing_and_wrong_keys_are_refused(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    merchant = stack.verified_merchant()
    answer = stack.stub.CreateApiKey(merchant_pb2.CreateApiKeyRequest(merchant_id=merchant.merchant_id))
    other = stack.key(merchant.merchant_id)
    _, uid = stack.rider()
    request = merchant_pb2.ChargeRequest(merchant_id=merchant.merchant_id, order_id="o-1",
                                         credential=card_credential(uid), amount=money_pb(100, "TWD"))
    revoke = merchant_pb2.RevokeApiKeyRequest(merchant_id=merchant.merchant_id, key_id=answer.api_key.key_id)
    first = stack.stub.RevokeApiKey(revoke).api_key
    second = stack.stub.RevokeApiKey(revoke).api_key  # revoking twice succeeds both times
    assert first.HasField("revoked_at") and first.revoked_at == second.revoked_at
    before = stack.snapshot()
    wrong_secret = answer.secret[:-4] + ("AAAA" if not answer.secret.endswith("AAAA") else "BBBB")
    cases = [
        ("revoked", bearer(answer.secret), "API_KEY_REVOKED"),
        ("no key", [], "API_KEY_INVALID"),
        ("not a key", bearer("hello"), "API_KEY_INVALID"),
        ("a known key id with the wrong secret", bearer(wrong_secret), "API_KEY_INVALID"),
        ("an unknown key", bearer("ctk_0123456789abcdef_" + "A" * 43), "API_KEY_INVALID"),
    ]
    for name, metadata, reason in cases:
        assert expect_error(stack.stub.Charge, request, metadata=metadata)[:2] == \
            (grpc.StatusCode.UNAUTHENTICATED, reason), name
    assert stack.snapshot() == before
    assert stack.stub.Charge(request, metadata=bearer(other)).charge.amount.amount_minor == 100


def test_a_merchant_never_sees_or_acts_on_another_merchants_charges(merchant_stack: MerchantStack) -> None:
    stack = merchant_stack
    alice, bob = stack.verified_merchant(name="Alice Bakery"), stack.verified_merchant(name="Bob Noodles")
    alice_key = stack.key(alice.merchant_id, "charges:write", "charges:read", "refunds:write")
    bob_key_answer = stack.stub.CreateApiKey(merchant_pb2.CreateApiKeyRequest(merchant_id=bob.merchant_id))
    bob_key = bob_key_answer.secret
    _, uid = stack.rider()
    bobs_charge = stack.charge(bob_key, bob.merchant_id, uid, 3_000, order_id="shared-order-id")
    before = stack.snapshot()
    as_bob = [
        (stack.stub.Charge, merchant_pb2.ChargeRequest(merchant_id=bob.merchant_id, order_id="x",
                                                       credential=card_credential(uid), amount=money_pb(100, "TWD"))),
        (stack.stub.Refund, merchant_pb2.RefundRequest(refund_id="x", merchant_id=bob.merchant_id,
                                                       charge_id=bobs_charge.charge_id, amount=money_pb(100, "TWD"))),
        (stack.stub.GetCharge, merchant_pb2.GetChargeRequest(merchant_id=bob.merchant_id,
                                                             charge_id=bobs_charge.charge_id)),
        (stack.stub.GetMerchant, merchant_pb2.GetMerchantRequest(merchant_id=bob.merchant_id)),
        (stack.stub.CreateApiKey, merchant_pb2.CreateApiKeyRequest(merchant_id=bob.merchant_id)),
        (stack.stub.RevokeApiKey, merchant_pb2.RevokeApiKeyRequest(merchant_id=bob.merchant_id,
                                                                   key_id=bob_key_answer.api_key.key_id)),
    ]
    for call, request in as_bob:
        assert expect_error(call, request, metadata=bearer(alice_key))[:2] == \
            (grpc.StatusCode.PERMISSION_DENIED, "API_KEY_WRONG_MERCHANT"), call
    # Naming herself but Bob's charge or key: it does not exist for her.
    as_alice = [
        (stack.stub.Refund, merchant_pb2.RefundRequest(refund_id="x", merchant_id=alice.merchant_id,
                                                       charge_id=bobs_charge.charge_id, amount=money_pb(100, "TWD"))),
        (stack.stub.GetCharge, merchant_pb2.GetChargeRequest(merchant_id=alice.merchant_id,
                                                             charge_id=bobs_charge.charge_id)),
        (stack.stub.RevokeApiKey, merchant_pb2.RevokeApiKeyRequest(merchant_id=alice.merchant_id,
                                                                   key_id=bob_key_answer.api_key.key_id)),
    ]
    for call, request in as_alice:
        assert expect_error(call, request, metadata=bearer(alice_key))[:2] == \
            (grpc.StatusCode.NOT_FOUND, "NOT_FOUND"), call
    assert stack.snapshot() == before
    # The same order id is Alice's own business: her charge is a new one, not Bob's.
    mine = stack.charge(alice_key, alice.merchant_id, uid, 3_000, order_id="shared-order-id")
    assert mine.charge_id != bobs_charge.charge_id and mine.merchant_id == alice.merchant_id
    assert stack.charge(bob_key, bob.merchant_id, uid, 3_000, order_id="shared-order-id").charge_id == \
        bobs_charge.charge_id
