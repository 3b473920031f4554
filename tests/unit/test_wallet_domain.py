"""The wallet's pure domain: validation, idempotency fingerprints, card hashing, page tokens,
and the arithmetic of one ledger transaction (floors, limits, blocked accounts, overflow)."""

from __future__ import annotations

import ast
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from libs import errors
from services.wallet import domain
from services.wallet.domain import (
    Account,
    AccountKind,
    AccountStatus,
    Book,
    CreateAccountRequest,
    Hold,
    HoldRequest,
    Party,
    PostHoldRequest,
    SplitLine,
    TransferKind,
    TransferRequest,
)

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
INT64_MAX = 2**63 - 1


def transfer(**changes: object) -> TransferRequest:
    base = TransferRequest("t-1", "rider-1", "system:operator-revenue:TWD", 100, "TWD", TransferKind.FARE)
    return replace(base, **changes)


def account(account_id: str = "rider-1", *, kind: AccountKind = AccountKind.RIDER_WALLET, balance: int = 0,
            pending_debits: int = 0, pending_credits: int = 0, floor: int | None = 0,
            status: AccountStatus = AccountStatus.ACTIVE, currency: str = "TWD", owner: str = "") -> Account:
    return Account(account_id, kind, currency, floor, balance, pending_debits, pending_credits, "", None, owner,
                   status, None, NOW)


def system(account_id: str = "system:operator-revenue:TWD", balance: int = 0, pending_credits: int = 0) -> Account:
    return account(account_id, kind=AccountKind.OPERATOR_REVENUE, floor=None, balance=balance,
                   pending_credits=pending_credits)


def reason_of(excinfo: pytest.ExceptionInfo) -> str:
    return excinfo.value.reason


# --- the domain is pure ---------------------------------------------------------------------


def test_the_domain_imports_no_io_library() -> None:
    tree = ast.parse(Path(domain.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"grpc", "psycopg", "psycopg_pool", "redis", "kafka", "stripe", "google", "citytap"}


# --- ids, amounts, currencies -----------------------------------------------------------------


@pytest.mark.parametrize("good", ["a", "A-9", "tap:2030-01-01.gate_7", "x" * 64, "0"])
def test_well_formed_ids_pass(good: str) -> None:
    assert domain.check_id(good, "id") == good


@pytest.mark.parametrize("bad", ["", "x" * 65, "has space", "slash/no", "üml", "semi;colon", None, 42])
def test_malformed_ids_are_invalid_arguments_naming_the_field(bad: object) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        domain.check_id(bad, "debit_account_id", index=3)
    assert info.value.reason == "INVALID_ARGUMENT"
    assert info.value.metadata == {"field": "debit_account_id", "index": "3"}


@pytest.mark.parametrize("bad", [0, -1, -(2**63), 2**63, 10**30, None, 1.5, True, "100"])
def test_zero_negative_overflowing_or_non_integer_amounts_are_invalid(bad: object) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        domain.check_amount(bad, "amount")
    assert info.value.reason == "INVALID_AMOUNT"


def test_the_largest_int64_amount_is_valid() -> None:
    assert domain.check_amount(INT64_MAX, "amount") == INT64_MAX


@pytest.mark.parametrize("bad", ["", "twd", "TW", "TWDX", "T1D", None])
def test_malformed_currencies_are_invalid_currency(bad: object) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        domain.check_currency(bad, "amount.currency")
    assert info.value.reason == "INVALID_CURRENCY"


# --- transfer and batch validation ---------------------------------------------------------------


def test_a_valid_transfer_passes_unchanged() -> None:
    request = transfer(reference="journey-1")
    assert domain.validate_transfer(request) is request


@pytest.mark.parametrize(("changes", "reason", "field"), [
    ({"transfer_id": ""}, "INVALID_ARGUMENT", "transfer_id"),
    ({"credit_account_id": "rider-1"}, "INVALID_ARGUMENT", "credit_account_id"),
    ({"amount_minor": 0}, "INVALID_AMOUNT", "amount"),
    ({"amount_minor": -5}, "INVALID_AMOUNT", "amount"),
    ({"amount_minor": 2**63}, "INVALID_AMOUNT", "amount"),
    ({"currency": "usd"}, "INVALID_CURRENCY", "amount.currency"),
    ({"kind": None}, "INVALID_ARGUMENT", "kind"),
    ({"kind": TransferKind.TOP_UP}, "INVALID_ARGUMENT", "kind"),
    ({"reference": "r" * 129}, "INVALID_ARGUMENT", "reference"),
    ({"corrects_transfer_id": "t-0"}, "INVALID_ARGUMENT", "corrects_transfer_id"),
    ({"kind": TransferKind.CORRECTION, "corrects_transfer_id": "t-1"}, "INVALID_ARGUMENT", "corrects_transfer_id"),
])
def test_invalid_transfers_name_reason_and_field(changes: dict, reason: str, field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        domain.validate_transfer(transfer(**changes), index=2)
    assert (info.value.reason, info.value.metadata["field"], info.value.metadata["index"]) == (reason, field, "2")


def test_top_up_kinds_are_admitted_only_for_the_wallets_own_flow() -> None:
    request = transfer(kind=TransferKind.TOP_UP)
    assert domain.validate_transfer(request, internal=True) is request


def test_batches_are_bounded_non_empty_and_free_of_duplicate_ids() -> None:
    with pytest.raises(errors.InvalidArgument):
        domain.validate_batch([])
    with pytest.raises(errors.InvalidArgument):
        domain.validate_batch([transfer(transfer_id=f"t-{i}") for i in range(domain.BATCH_TRANSFERS_MAX + 1)])
    with pytest.raises(errors.InvalidArgument) as info:
        domain.validate_batch([transfer(transfer_id="a"), transfer(transfer_id="b"), transfer(transfer_id="a")])
    assert info.value.metadata["index"] == "2"
    assert len(domain.validate_batch([transfer(transfer_id=f"t-{i}") for i in range(32)])) == 32


def split(party: Party, amount: int, **changes: object) -> SplitLine:
    return replace(SplitLine(party, "party-1", amount, "TWD", "contract-1", 1), **changes)


def test_splits_must_sum_to_the_amount_in_its_currency() -> None:
    good = (split(Party.TRANSIT_OPERATOR, 70), split(Party.CITY, 30))
    assert domain.validate_transfer(transfer(splits=good)).splits == good
    for bad, reason in [
        ((split(Party.TRANSIT_OPERATOR, 70), split(Party.CITY, 29)), "INVALID_AMOUNT"),
        ((split(Party.TRANSIT_OPERATOR, 100, currency="USD"),), "INVALID_CURRENCY"),
        ((split(Party.TRANSIT_OPERATOR, 101), split(Party.CITY, -1)), "INVALID_AMOUNT"),
        ((split(Party.TRANSIT_OPERATOR, 100, contract_version=0),), "INVALID_ARGUMENT"),
        ((split(Party.TRANSIT_OPERATOR, 100, party_id=""),), "INVALID_ARGUMENT"),
        (tuple(split(Party.CITY, 0) for _ in range(domain.SPLIT_LINES_MAX)) + (split(Party.CITY, 100),),
         "INVALID_ARGUMENT"),
    ]:
        with pytest.raises(errors.InvalidArgument) as info:
            domain.validate_transfer(transfer(splits=bad))
        assert info.value.reason == reason


# --- holds ---------------------------------------------------------------------------------------


def hold_request(**changes: object) -> HoldRequest:
    base = HoldRequest("h-1", "rider-1", "system:operator-revenue:TWD", 300, "TWD", TransferKind.FARE, None)
    return replace(base, **changes)


def test_hold_expiry_defaults_and_is_bounded() -> None:
    request = hold_request()
    assert domain.hold_expiry(request, NOW, ttl_default_s=60, ttl_max_s=3600) == NOW + timedelta(seconds=60)
    asked = NOW + timedelta(seconds=100)
    assert domain.hold_expiry(hold_request(expires_at=asked), NOW, ttl_default_s=60, ttl_max_s=3600) == asked
    for bad in (NOW, NOW - timedelta(seconds=1), NOW + timedelta(seconds=3601)):
        with pytest.raises(errors.InvalidArgument):
            domain.hold_expiry(hold_request(expires_at=bad), NOW, ttl_default_s=60, ttl_max_s=3600)


def test_holds_cannot_be_top_ups_or_between_one_account() -> None:
    with pytest.raises(errors.InvalidArgument):
        domain.validate_hold(hold_request(kind=TransferKind.TOP_UP))
    with pytest.raises(errors.InvalidArgument):
        domain.validate_hold(hold_request(credit_account_id="rider-1"))
    with pytest.raises(errors.InvalidArgument) as info:
        domain.validate_hold(hold_request(amount_minor=0))
    assert info.value.reason == "INVALID_AMOUNT"


def placed(amount: int = 300) -> Hold:
    return Hold("h-1", "rider-1", "system:operator-revenue:TWD", amount, "TWD", TransferKind.FARE, "", NOW,
                NOW + timedelta(minutes=5), b"")


def test_a_post_defaults_to_the_full_amount_and_never_exceeds_it() -> None:
    assert domain.resolve_post(PostHoldRequest("h-1", None, None), placed())[0] == 300
    assert domain.resolve_post(PostHoldRequest("h-1", 120, "TWD"), placed())[0] == 120
    with pytest.raises(errors.InvalidArgument) as info:
        domain.resolve_post(PostHoldRequest("h-1", 301, "TWD"), placed())
    assert info.value.reason == "INVALID_AMOUNT"
    with pytest.raises(errors.InvalidArgument) as info:
        domain.resolve_post(PostHoldRequest("h-1", 100, "JPY"), placed())
    assert info.value.reason == "INVALID_CURRENCY"


def test_a_hold_is_due_from_its_expiry_on() -> None:
    hold = placed()
    assert not hold.is_due(hold.expires_at - timedelta(microseconds=1))
    assert hold.is_due(hold.expires_at)


# --- idempotency fingerprints ---------------------------------------------------------------------


def test_transfer_fingerprints_are_stable_and_cover_every_client_field() -> None:
    base = transfer(splits=(split(Party.CITY, 100),), reference="r")
    assert domain.transfer_hash(base) == domain.transfer_hash(replace(base))
    assert domain.transfer_hash(base) == domain.transfer_hash(replace(base, transfer_id="another id"))  # id is the key
    variants = [
        {"debit_account_id": "rider-2"}, {"credit_account_id": "x"}, {"amount_minor": 101}, {"currency": "USD"},
        {"kind": TransferKind.FEE}, {"reference": "s"}, {"splits": ()},
        {"splits": (split(Party.CITY, 100, contract_version=2),)},
        {"kind": TransferKind.CORRECTION, "corrects_transfer_id": "t-0"},
    ]
    hashes = {domain.transfer_hash(replace(base, **v)) for v in variants}
    assert len(hashes) == len(variants)
    assert domain.transfer_hash(base) not in hashes


def test_hold_fingerprints_include_an_asked_expiry_but_not_a_defaulted_one() -> None:
    base = hold_request()
    assert domain.hold_hash(base) == domain.hold_hash(hold_request())
    assert domain.hold_hash(base) != domain.hold_hash(hold_request(expires_at=NOW))
    assert domain.hold_hash(hold_request(expires_at=NOW)) == domain.hold_hash(
        hold_request(expires_at=NOW.astimezone(timezone(timedelta(hours=8)))))  # same instant, other zone
    assert domain.hold_hash(base) != domain.hold_hash(hold_request(amount_minor=301))


def test_post_fingerprints_match_unset_and_explicit_full_amounts() -> None:
    full, _ = domain.resolve_post(PostHoldRequest("h-1", None, None), placed())
    explicit, _ = domain.resolve_post(PostHoldRequest("h-1", 300, "TWD"), placed())
    assert domain.post_hash(full, ()) == domain.post_hash(explicit, ())
    assert domain.post_hash(300, ()) != domain.post_hash(299, ())
    assert domain.post_hash(300, ()) != domain.post_hash(300, (split(Party.CITY, 300),))


def test_fingerprints_of_different_request_types_never_collide() -> None:
    assert domain.transfer_hash(transfer()) != domain.hold_hash(hold_request())


# --- accounts, cards, page tokens ---------------------------------------------------------------


def create(**changes: object) -> CreateAccountRequest:
    return replace(CreateAccountRequest("rider-1", AccountKind.RIDER_WALLET, "", "", None, ""), **changes)


CATEGORIES = ("adult", "student")


def test_create_account_defaults_the_currency_and_checks_the_category() -> None:
    assert domain.validate_create_account(create(), currency="TWD", rider_categories=CATEGORIES).currency == "TWD"
    assert domain.validate_create_account(create(rider_category="student", category_expires_at=NOW), currency="TWD",
                                          rider_categories=CATEGORIES).rider_category == "student"


@pytest.mark.parametrize(("changes", "reason"), [
    ({"account_id": "system:operator-revenue:TWD"}, "INVALID_ARGUMENT"),
    ({"account_id": "bad id"}, "INVALID_ARGUMENT"),
    ({"kind": AccountKind.OPERATOR_REVENUE}, "INVALID_ARGUMENT"),
    ({"currency": "USD"}, "INVALID_CURRENCY"),
    ({"currency": "usd"}, "INVALID_CURRENCY"),
    ({"rider_category": "pirate"}, "INVALID_ARGUMENT"),
    ({"category_expires_at": NOW}, "INVALID_ARGUMENT"),
    ({"owner_id": "m-1"}, "INVALID_ARGUMENT"),
    ({"kind": AccountKind.MERCHANT_PAYABLE}, "INVALID_ARGUMENT"),
    ({"kind": AccountKind.MERCHANT_PAYABLE, "owner_id": "m-1", "rider_category": "adult"}, "INVALID_ARGUMENT"),
])
def test_invalid_account_requests_are_refused(changes: dict, reason: str) -> None:
    with pytest.raises(errors.InvalidArgument) as info:
        domain.validate_create_account(create(**changes), currency="TWD", rider_categories=CATEGORIES)
    assert info.value.reason == reason


def test_a_lapsed_category_falls_back_to_the_default() -> None:
    student = replace(account(), rider_category="student", category_expires_at=NOW)
    assert student.category_in_force(NOW - timedelta(seconds=1)) == "student"
    assert student.category_in_force(NOW) == ""


def test_card_hashes_are_keyed_and_refuse_bad_uids_and_short_keys() -> None:
    key = bytes(range(32))
    uid = bytes.fromhex("04a1b2c3d4e5f6")
    digest = domain.card_hash(key, uid)
    assert len(digest) == 32 and uid not in digest
    assert digest == domain.card_hash(key, uid)
    assert digest != domain.card_hash(bytes(reversed(key)), uid)
    for bad in (b"", b"\x01\x02\x03", bytes(8), "04a1b2c3"):
        with pytest.raises(errors.InvalidArgument):
            domain.card_hash(key, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        domain.card_hash(bytes(31), uid)


def test_page_tokens_round_trip_and_belong_to_one_account() -> None:
    token = domain.encode_page_token("rider-1", 42)
    assert domain.decode_page_token(token, "rider-1") == 42
    assert domain.decode_page_token("", "rider-1") is None
    for bad in (token + "x", "!!!", domain.encode_page_token("rider-2", 42), domain.encode_page_token("rider-1", 0)):
        with pytest.raises(errors.InvalidArgument):
            domain.decode_page_token(bad, "rider-1")


def test_page_sizes() -> None:
    assert domain.page_size(0) == 50
    assert domain.page_size(100) == 100
    for bad in (-1, 101):
        with pytest.raises(errors.InvalidArgument):
            domain.page_size(bad)


# --- the arithmetic of a transaction ---------------------------------------------------------------


def book(*accounts: Account, stored_value_max: int = 1000) -> Book:
    return Book({a.account_id: a for a in accounts}, stored_value_max)


def test_transfers_move_balances_and_keep_the_sum_zero() -> None:
    b = book(account(balance=500), system())
    assert b.transfer(transfer(amount_minor=200)) == (300, 200)
    assert b.balance("rider-1") + b.balance("system:operator-revenue:TWD") == 500


def test_a_zero_floor_gives_insufficient_funds_and_counts_pending_holds() -> None:
    b = book(account(balance=500, pending_debits=400), system())
    with pytest.raises(errors.FailedPrecondition) as info:
        b.transfer(transfer(amount_minor=101), index=4)
    assert info.value.reason == "INSUFFICIENT_FUNDS"
    assert info.value.metadata["index"] == "4"
    assert book(account(balance=500, pending_debits=400), system()).transfer(transfer(amount_minor=100)) == (400, 100)


def test_a_negative_allowance_gives_floor_breach_once_used_up() -> None:
    assert book(account(balance=100, floor=-300), system()).transfer(transfer(amount_minor=400))[0] == -300
    with pytest.raises(errors.FailedPrecondition) as info:
        book(account(balance=100, floor=-300), system()).transfer(transfer(amount_minor=401))
    assert info.value.reason == "FLOOR_BREACH"


def test_system_accounts_have_no_floor() -> None:
    b = book(system("system:stripe-clearing:TWD"), account())
    assert b.transfer(transfer(debit_account_id="system:stripe-clearing:TWD", credit_account_id="rider-1",
                               amount_minor=700, kind=TransferKind.TOP_UP)) == (-700, 700)


def test_the_stored_value_limit_counts_pending_credits() -> None:
    clearing = system("system:stripe-clearing:TWD")
    top_up = transfer(debit_account_id="system:stripe-clearing:TWD", credit_account_id="rider-1",
                      kind=TransferKind.TOP_UP)
    assert book(clearing, account(balance=900)).transfer(replace(top_up, amount_minor=100))[1] == 1000
    with pytest.raises(errors.LimitExceeded) as info:
        book(clearing, account(balance=800, pending_credits=150)).transfer(replace(top_up, amount_minor=51))
    assert info.value.reason == "LIMIT_EXCEEDED"


def test_blocked_accounts_cannot_pay_but_can_be_credited() -> None:
    blocked = account(balance=500, status=AccountStatus.BLOCKED)
    with pytest.raises(errors.FailedPrecondition) as info:
        book(blocked, system()).transfer(transfer())
    assert info.value.reason == "ACCOUNT_BLOCKED"
    credit = transfer(debit_account_id="system:operator-revenue:TWD", credit_account_id="rider-1",
                      kind=TransferKind.CORRECTION)
    assert book(blocked, system()).transfer(credit)[1] == 600


def test_unknown_accounts_and_wrong_currencies_are_named() -> None:
    with pytest.raises(errors.NotFound) as info:
        book(system()).transfer(transfer(), index=1)
    assert (info.value.reason, info.value.metadata["field"]) == ("UNKNOWN_ACCOUNT", "debit_account_id")
    with pytest.raises(errors.InvalidArgument) as info:
        book(account(balance=500), system()).transfer(transfer(currency="USD"))
    assert info.value.reason == "INVALID_CURRENCY"


def test_overflowing_balances_are_invalid_amounts() -> None:
    b = book(system("system:suspense:TWD"), system())
    move = transfer(debit_account_id="system:suspense:TWD", amount_minor=INT64_MAX, kind=TransferKind.CORRECTION)
    b.transfer(move)
    with pytest.raises(errors.InvalidArgument) as info:
        b.transfer(move)
    assert info.value.reason == "INVALID_AMOUNT"


def test_holds_reserve_then_post_for_less_releasing_the_rest() -> None:
    b = book(account(balance=500), system())
    b.reserve(hold_request(amount_minor=300))
    with pytest.raises(errors.FailedPrecondition):
        book(account(balance=500, pending_debits=300), system()).reserve(hold_request(amount_minor=201))
    after = book(account(balance=500, pending_debits=300), system(pending_credits=300)).post(placed(300), 120)
    assert after == (380, 120)


def test_posting_never_breaches_a_floor_the_hold_respected() -> None:
    # The whole balance is held: releasing first makes posting all of it legal.
    assert book(account(balance=300, pending_debits=300), system(pending_credits=300)).post(placed(300), 300) == (0, 300)


def test_a_blocked_account_may_still_settle_a_hold_placed_before_the_block() -> None:
    blocked = account(balance=300, pending_debits=300, status=AccountStatus.BLOCKED)
    assert book(blocked, system(pending_credits=300)).post(placed(300), 200) == (100, 200)


def test_event_keys_prefer_riders_then_merchant_owners_then_the_debit_account() -> None:
    rider, revenue = account(), system()
    merchant = account("merchant-1", kind=AccountKind.MERCHANT_PAYABLE, owner="m-42")
    fees = system("system:platform-fees:TWD")
    assert domain.event_account_key([(merchant, fees), (rider, merchant)]) == "rider-1"
    assert domain.event_account_key([(revenue, merchant)]) == "m-42"
    assert domain.event_account_key([(revenue, fees)]) == "system:operator-revenue:TWD"


def test_system_account_ids_are_well_known_and_valid_ids() -> None:
    for kind in domain.SYSTEM_KINDS:
        assert domain.check_id(domain.system_account_id(kind, "TWD"), "id").startswith("system:")
    assert domain.system_account_id(AccountKind.STRIPE_CLEARING, "TWD") == "system:stripe-clearing:TWD"
    with pytest.raises(ValueError):
        domain.system_account_id(AccountKind.RIDER_WALLET, "TWD")
