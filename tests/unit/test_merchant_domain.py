"""The merchant service's pure domain: API keys, scopes, the service day, limits, the choice of
split contract, the ledger plans of charges and refunds, the Stripe webhook check and the
settings."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import date, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs import errors, splits
from libs.settings import SettingsError, load
from libs.stripe_webhooks import sign_payload
from services.merchant import stripe_gateway as merchant_stripe
from services.merchant.domain import (
    DEFAULT_SCOPES,
    SECRET_PREFIX_CHARS,
    Caller,
    Charge,
    ChargeStatus,
    CredentialKind,
    Limits,
    Refund,
    ScopedVersion,
    ServiceDay,
    charge_plan,
    check_limits,
    check_scopes,
    contract_in_force,
    new_api_key,
    parse_api_key,
    refund_plan,
    secret_matches,
    splits_from_json,
    splits_to_json,
)
from services.merchant.settings import Settings
from services.wallet import stripe_gateway as wallet_stripe

pytestmark = pytest.mark.unit

UTC = timezone.utc
TAIPEI = timezone(timedelta(hours=8))
LIMITS = Limits(per_purchase_minor=100_000, per_day_minor=300_000, currency="TWD")


# --- API keys and scopes ----------------------------------------------------------------------


def test_a_new_key_is_random_parsable_and_checked_only_by_its_hash() -> None:
    first, second = new_api_key(), new_api_key()
    assert first.secret != second.secret and first.key_id != second.key_id
    assert parse_api_key(first.secret) == first.key_id
    assert first.secret_hash == hashlib.sha256(first.secret.encode()).digest()
    assert secret_matches(first.secret, first.secret_hash)
    assert not secret_matches(second.secret, first.secret_hash)
    # The shown prefix is "ctk_" and the key id: none of the 256 secret bits.
    assert first.secret_prefix == first.secret[:SECRET_PREFIX_CHARS] == f"ctk_{first.key_id}"
    assert first.secret not in repr(first)


@pytest.mark.parametrize("text", [None, "", "Bearer", "ctk_", "ctk_0123456789abcdef_short",
                                  "ctk_0123456789ABCDEF_" + "A" * 43, "xtk_0123456789abcdef_" + "A" * 43])
def test_malformed_keys_are_unauthenticated(text: str | None) -> None:
    with pytest.raises(errors.Unauthenticated) as info:
        parse_api_key(text)
    assert info.value.reason == "API_KEY_INVALID"


def test_scopes_default_to_a_till_key_and_refuse_unknown_or_repeated_ones() -> None:
    assert check_scopes([]) == DEFAULT_SCOPES == ("charges:write", "charges:read")
    assert check_scopes(["refunds:write", "charges:write"]) == ("charges:write", "refunds:write")
    for bad in (["payouts:write"], ["charges:write", "charges:write"], [""]):
        with pytest.raises(errors.InvalidArgument):
            check_scopes(bad)


def test_a_caller_acts_only_for_its_merchant_and_within_its_scopes() -> None:
    caller = Caller("m-1", "k", ("charges:write",))
    caller.require("charges:write", "m-1")
    with pytest.raises(errors.PermissionDenied) as info:
        caller.require("charges:write", "m-2")
    assert info.value.reason == "API_KEY_WRONG_MERCHANT"
    with pytest.raises(errors.PermissionDenied) as info:
        caller.require("refunds:write", "m-1")
    assert (info.value.reason, info.value.metadata["scope"]) == ("API_KEY_SCOPE_MISSING", "refunds:write")


# --- service day and limits -------------------------------------------------------------------


def test_the_service_day_turns_at_0430_in_taipei() -> None:
    day = ServiceDay("Asia/Taipei", datetime.min.time().replace(hour=4, minute=30))
    assert day.of(datetime(2030, 1, 2, 4, 29, 59, 999999, tzinfo=TAIPEI)) == date(2030, 1, 1)
    assert day.of(datetime(2030, 1, 2, 4, 30, tzinfo=TAIPEI)) == date(2030, 1, 2)
    assert day.of(datetime(2030, 1, 1, 20, 30, tzinfo=UTC)) == date(2030, 1, 2)  # 04:30 Taipei
    with pytest.raises(ValueError):
        day.of(datetime(2030, 1, 1, 12, 0))


@pytest.mark.parametrize("amount, spent, refused", [
    (100_000, 0, None), (100_001, 0, "per_purchase"), (100_000, 200_000, None), (1, 299_999, None),
    (2, 299_999, "per_day"), (1, 300_000, "per_day"), (1, 350_000, "per_day"),
])
def test_limits_at_their_edges(amount: int, spent: int, refused: str | None) -> None:
    if refused is None:
        check_limits(amount, spent, LIMITS)
        return
    with pytest.raises(errors.LimitExceeded) as info:
        check_limits(amount, spent, LIMITS)
    assert (info.value.reason, info.value.metadata["limit"]) == ("LIMIT_EXCEEDED", refused)


def test_a_face_alone_pays_at_most_the_face_limit() -> None:
    limits = Limits(100_000, 300_000, "TWD", face_minor=50_000)
    check_limits(50_000, 0, limits, face=True)
    check_limits(50_001, 0, limits)  # a card may
    with pytest.raises(errors.LimitExceeded) as info:
        check_limits(50_001, 0, limits, face=True)
    assert info.value.metadata["limit"] == "face"
    with pytest.raises(errors.LimitExceeded):
        check_limits(1, 0, Limits(100_000, 300_000, "TWD"), face=True)  # no face limit set: faces cannot pay


# --- contracts and ledger plans ---------------------------------------------------------------


def _version(contract_id: str, version: int, effective: datetime, terms: tuple[splits.Term, ...], scope: str = ""):
    return ScopedVersion(scope, splits.DatedVersion(splits.ContractTerms(contract_id, version, terms), effective))


DEFAULT_TERMS = (splits.Term("CITY", "city", 250), splits.Term("PLATFORM", "platform", 150, 100),
                 splits.Term("MERCHANT", "", 0, 0, remainder=True))
T0 = datetime(2030, 1, 1, tzinfo=UTC)


def test_the_category_contract_wins_once_in_force_and_the_default_covers_the_rest() -> None:
    versions = [_version("default", 1, T0, DEFAULT_TERMS), _version("default", 2, T0 + timedelta(days=2), DEFAULT_TERMS),
                _version("cafes", 1, T0 + timedelta(days=1), DEFAULT_TERMS, scope="5814")]
    assert contract_in_force(versions, "5814", T0 + timedelta(hours=1)).terms.contract_id == "default"
    assert contract_in_force(versions, "5814", T0 + timedelta(days=1)).terms.contract_id == "cafes"
    assert contract_in_force(versions, "5411", T0 + timedelta(days=2)).terms.version == 2
    assert contract_in_force(versions, "5411", T0 + timedelta(days=2) - timedelta(microseconds=1)).terms.version == 1
    with pytest.raises(errors.FailedPrecondition) as info:
        contract_in_force(versions, "5814", T0 - timedelta(seconds=1))
    assert info.value.reason == "NO_SPLIT_CONTRACT"


def _charge(amount: int, lines: list[splits.SplitLine]) -> Charge:
    return Charge("c-1", "m-1", "o-1", "rider-1", CredentialKind.CARD, amount, "TWD", "", date(2030, 1, 1),
                  ChargeStatus.SUCCEEDED, 0, tuple(lines), "mch:c-1", T0)


def _net(plan: list, account: str) -> int:
    return sum(p.amount_minor for p in plan if p.credit_account_id == account) - \
        sum(p.amount_minor for p in plan if p.debit_account_id == account)


@settings(max_examples=150, deadline=None)
@given(amount=st.integers(min_value=1, max_value=10**9),
       refunds=st.lists(st.integers(min_value=1, max_value=10**9), max_size=6))
def test_charge_and_refund_plans_move_exactly_each_partys_share(amount: int, refunds: list[int]) -> None:
    contract = splits.ContractTerms("default", 1, DEFAULT_TERMS)
    lines = splits.split(contract, amount, "TWD", merchant_id="m-1")
    charge = _charge(amount, lines)
    plan = charge_plan(charge)
    assert plan[0].splits == tuple(lines) and sum(s.amount_minor for s in plan[0].splits) == amount
    assert all(p.amount_minor > 0 for p in plan)
    shares = {line.party: line.amount_minor for line in lines}
    assert _net(plan, "merchant:m-1") == shares["MERCHANT"]
    assert _net(plan, "system:city-revenue:TWD") == shares["CITY"]
    assert _net(plan, "system:platform-fees:TWD") == shares["PLATFORM"]
    assert _net(plan, "rider-1") == -amount
    earlier: list[tuple[splits.SplitLine, ...]] = []
    left = amount
    for number, wanted in enumerate(refunds):
        part = min(wanted, left)
        if part == 0:
            break
        refund_lines = tuple(splits.split_refund(lines, part, earlier))
        refund = Refund(f"r-{number}", f"r-{number}", "m-1", "c-1", part, "TWD", "", refund_lines,
                        f"mrf:r-{number}", False, T0)
        back = refund_plan(charge, refund)
        assert back[-1].kind == "MERCHANT_REFUND" and back[-1].corrects_transfer_id == "mch:c-1"
        assert _net(back, "rider-1") == part
        by_party = {line.party: line.amount_minor for line in refund_lines}
        assert _net(back, "merchant:m-1") == -by_party["MERCHANT"]
        assert _net(back, "system:city-revenue:TWD") == -by_party["CITY"]
        # The shares come back to the payable before it pays the rider.
        assert all(p.credit_account_id == "merchant:m-1" for p in back[:-1])
        earlier.append(refund_lines)
        left -= part
    if left == 0:
        totals = {party: sum(l.amount_minor for r in earlier for l in r if l.party == party) for party in shares}
        assert totals == shares


def test_split_lines_survive_their_stored_form() -> None:
    lines = splits.split(splits.ContractTerms("default", 3, DEFAULT_TERMS), 12_345, "TWD", merchant_id="m-1")
    assert splits_from_json(splits_to_json(lines)) == tuple(lines)
    assert splits_from_json(json.loads(splits_to_json(lines))) == tuple(lines)


# --- Stripe webhooks and the adapter ------------------------------------------------------------


def test_the_merchant_pins_the_same_stripe_api_version_as_the_wallet() -> None:
    assert merchant_stripe.STRIPE_API_VERSION == wallet_stripe.STRIPE_API_VERSION


def _gateway() -> merchant_stripe.StripeGateway:
    return merchant_stripe.StripeGateway(api_key="sk_test_x", api_base="http://127.0.0.1:9",
                                         webhook_secret="whsec_unit_test_secret_000000")


def _event(charges_enabled: bool = True) -> bytes:
    return json.dumps({"id": "evt_1", "object": "event", "type": "account.updated", "livemode": False,
                       "data": {"object": {"id": "acct_1", "object": "account",
                                           "charges_enabled": charges_enabled}}}).encode()


def test_webhooks_are_verified_before_they_are_read() -> None:
    gateway, body, now = _gateway(), _event(), int(time.time())
    event = gateway.verify_event(body, sign_payload(body, "whsec_unit_test_secret_000000", timestamp=now))
    assert (event.event_id, event.event_type, event.account) == (
        "evt_1", "account.updated", merchant_stripe.ConnectedAccount("acct_1", True, False))
    cases = [
        (body, None, "BAD_SIGNATURE"),
        (body, sign_payload(body, "whsec_another_secret_00000000", timestamp=now), "BAD_SIGNATURE"),
        (_event(False), sign_payload(body, "whsec_unit_test_secret_000000", timestamp=now), "BAD_SIGNATURE"),
        (body, sign_payload(body, "whsec_unit_test_secret_000000", timestamp=now - 301), "STALE"),
        (body, sign_payload(body, "whsec_unit_test_secret_000000", timestamp=now + 301), "STALE"),
        (b"[]", sign_payload(b"[]", "whsec_unit_test_secret_000000", timestamp=now), "MALFORMED"),
    ]
    for payload, header, reason in cases:
        with pytest.raises(merchant_stripe.WebhookRejected) as info:
            gateway.verify_event(payload, header)
        assert info.value.reason == reason
    assert "whsec" not in repr(gateway) and "sk_test" not in repr(gateway)


# --- settings -----------------------------------------------------------------------------------

BASE_ENV = {
    "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", "CITYTAP_POSTGRES_DSN": "postgresql://x@127.0.0.1:1/citytap",
    "CITYTAP_KAFKA_BOOTSTRAP": "127.0.0.1:9092", "CITYTAP_WALLET_ADDRESS": "127.0.0.1:50052",
    "CITYTAP_SETTLEMENT_ADDRESS": "127.0.0.1:50055", "CITYTAP_STRIPE_API_BASE": "http://127.0.0.1:12111",
    "CITYTAP_STRIPE_API_KEY": "sk_test_x", "CITYTAP_MERCHANT_WEBHOOK_SECRET": "whsec_unit_test_secret_000000",
    "CITYTAP_REDIS_URL": "redis://127.0.0.1:6379/0",
}


def test_settings_default_to_taiwans_limits_and_the_taipei_service_day() -> None:
    loaded = load(Settings, BASE_ENV)
    assert (loaded.per_purchase_limit_minor, loaded.per_day_limit_minor, loaded.currency) == (100_000, 300_000, "TWD")
    assert (loaded.service_day_timezone, loaded.service_day_start.isoformat()) == ("Asia/Taipei", "04:30:00")
    assert "whsec" not in repr(loaded)


@pytest.mark.parametrize("name, value", [
    ("CITYTAP_MERCHANT_WEBHOOK_SECRET", "short"), ("CITYTAP_MERCHANT_SERVICE_DAY_START", "4:30"),
    ("CITYTAP_MERCHANT_SERVICE_DAY_TIMEZONE", "Mars/Olympus"), ("CITYTAP_MERCHANT_PER_DAY_LIMIT_MINOR", "0"),
    ("CITYTAP_MERCHANT_CONTRACT_CACHE_TTL_S", "301"), ("CITYTAP_MERCHANT_CURRENCY", "twd"),
    ("CITYTAP_SETTLEMENT_ADDRESS", "nowhere"), ("CITYTAP_REDIS_URL", "http://127.0.0.1:6379"),
])
def test_bad_settings_are_named(name: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(Settings, BASE_ENV | {name: value})
    assert any(problem.startswith(name) for problem in info.value.problems)


def test_only_the_adapter_imports_the_stripe_sdk_in_the_merchant_service() -> None:
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "services" / "merchant"
    importing = re.compile(r"^\s*(import stripe\b|from stripe\b)", re.MULTILINE)
    offenders = sorted(p.name for p in folder.rglob("*.py") if importing.search(p.read_text(encoding="utf-8")))
    assert offenders == ["stripe_gateway.py"]
