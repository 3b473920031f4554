"""Rider accounts and credentials against real PostgreSQL and Redis: categories, idempotent
creation, card links stored only as keyed hashes, and the Redis deny list fare-gate reads,
which blocks write before they commit and which can always be rebuilt from PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest

from libs import errors
from libs.redis_client import create_redis
from services.wallet.deny_list import RedisDenyList
from services.wallet.domain import (
    CARDS_PER_ACCOUNT_MAX,
    AccountKind,
    AccountStatus,
    BlockReason,
    CreateAccountRequest,
    TransferKind,
    TransferRequest,
    card_hash,
    deny_member_for_account,
    deny_member_for_card,
)
from tests.integration.wallet_support import TEST_CARD_HASH_KEY, WalletDb, open_wallet_db

UID = bytes.fromhex("04a1b2c3d4e5f6")
OTHER_UID = bytes.fromhex("0badcafe")


@pytest.fixture()
def redis_deny(redis_url: str) -> Iterator[RedisDenyList]:
    client = create_redis(redis_url)
    deny = RedisDenyList(client, key=f"test:wallet:deny:{uuid.uuid4().hex[:8]}")
    yield deny
    client.delete(deny.key)
    client.close()


@pytest.fixture()
def db(postgres_dsn: str, scratch_schema: str, redis_deny: RedisDenyList) -> Iterator[WalletDb]:
    wallet = open_wallet_db(postgres_dsn, scratch_schema, deny_list=redis_deny)
    yield wallet
    wallet.pool.close()


def create(account_id: str, **changes: object) -> CreateAccountRequest:
    values: dict = dict(account_id=account_id, kind=AccountKind.RIDER_WALLET, currency="", rider_category="",
                        category_expires_at=None, owner_id="")
    values.update(changes)
    return CreateAccountRequest(**values)


# --- accounts --------------------------------------------------------------------------------------


def test_system_accounts_exist_once_per_currency_with_well_known_ids(db: WalletDb) -> None:
    assert db.ledger.ensure_system_accounts() == []  # the fixture opened them already
    rows = db.query("SELECT id, kind, floor_minor FROM {s}.accounts ORDER BY id")
    assert rows == sorted([(f"system:{k}:TWD", k.upper().replace("-", "_"), None) for k in
                           ("operator-revenue", "city-revenue", "platform-fees", "stripe-clearing", "suspense")])
    assert db.event_types() == ["AccountCreated"] * 5


def test_create_account_is_idempotent_and_refuses_a_changed_payload(db: WalletDb) -> None:
    expires = db.clock() + timedelta(days=365)
    first = db.ledger.create_account(create("rider-1", rider_category="student", category_expires_at=expires))
    assert (first.kind, first.currency, first.floor_minor, first.rider_category, first.status) == (
        AccountKind.RIDER_WALLET, "TWD", 0, "student", AccountStatus.ACTIVE)
    assert db.ledger.create_account(create("rider-1", rider_category="student", category_expires_at=expires)) == first
    with pytest.raises(errors.Conflict) as info:
        db.ledger.create_account(create("rider-1", rider_category="adult"))
    assert info.value.reason == "IDEMPOTENCY_CONFLICT"
    assert db.event_types().count("AccountCreated") == 6


def test_account_requests_are_checked_against_configuration(db: WalletDb) -> None:
    before = db.snapshot()
    for request, reason in [
        (create("r", rider_category="pirate"), "INVALID_ARGUMENT"),
        (create("r", currency="USD"), "INVALID_CURRENCY"),
        (create("r", rider_category="student", category_expires_at=db.clock()), "INVALID_ARGUMENT"),
        (create("r", kind=AccountKind.SUSPENSE), "INVALID_ARGUMENT"),
        (create("system:mine"), "INVALID_ARGUMENT"),
        (create("m", kind=AccountKind.MERCHANT_PAYABLE), "INVALID_ARGUMENT"),
    ]:
        with pytest.raises(errors.InvalidArgument) as info:
            db.ledger.create_account(request)
        assert info.value.reason == reason, request
    assert db.snapshot() == before


def test_merchant_payables_have_an_owner_and_a_zero_floor(db: WalletDb) -> None:
    merchant = db.ledger.create_account(create("m-1", kind=AccountKind.MERCHANT_PAYABLE, owner_id="shop-42"))
    assert (merchant.owner_id, merchant.floor_minor) == ("shop-42", 0)
    assert db.events()[-1].account_key == "shop-42"


def test_a_rider_category_lapses_back_to_the_default(db: WalletDb) -> None:
    rider = db.ledger.create_account(create("rider-1", rider_category="student",
                                            category_expires_at=db.clock() + timedelta(days=30)))
    db.ledger.link_card(rider.account_id, UID)
    assert db.ledger.resolve_card(UID).rider_category == "student"
    db.clock.advance(30 * 24 * 3600)
    assert db.ledger.resolve_card(UID).rider_category == ""


# --- cards -----------------------------------------------------------------------------------------


def test_a_card_is_stored_only_as_its_keyed_hash(db: WalletDb) -> None:
    rider = db.rider()
    card = db.ledger.link_card(rider, UID, "blue card")
    [(stored,)] = db.query("SELECT card_hash FROM {s}.cards")
    assert bytes(stored) == card_hash(TEST_CARD_HASH_KEY, UID) and UID not in bytes(stored)
    dump = repr(db.query("SELECT * FROM {s}.cards")) + repr(db.query("SELECT payload FROM {s}.outbox_events"))
    assert UID.hex() not in dump and repr(UID)[2:-1] not in dump
    resolved = db.ledger.resolve_card(UID)
    assert (resolved.account_id, resolved.status) == (rider, AccountStatus.ACTIVE)
    account, cards = db.ledger.get_account(rider)
    assert [(c.card_id, c.label) for c in cards] == [(card.card_id, "blue card")]


def test_one_card_one_account(db: WalletDb) -> None:
    alice, bob = db.rider(), db.rider()
    card = db.ledger.link_card(alice, UID)
    assert db.ledger.link_card(alice, UID, "relabel ignored") == card  # linking again returns the link
    before = db.snapshot()
    with pytest.raises(errors.Conflict) as info:
        db.ledger.link_card(bob, UID)
    assert info.value.reason == "CREDENTIAL_IN_USE"
    assert db.snapshot() == before
    # Once unlinked, the card may move to another account.
    unlinked_at = db.ledger.unlink_card(alice, card.card_id)
    assert db.ledger.unlink_card(alice, card.card_id) == unlinked_at  # unlinking twice succeeds both times
    db.ledger.link_card(bob, UID)
    assert db.ledger.resolve_card(UID).account_id == bob
    assert db.event_types().count("CardLinked") == 2 and db.event_types().count("CardUnlinked") == 1


def test_card_errors(db: WalletDb) -> None:
    rider, merchant = db.rider(), db.merchant()
    with pytest.raises(errors.NotFound) as info:
        db.ledger.resolve_card(UID)
    assert info.value.reason == "UNKNOWN_CREDENTIAL"
    with pytest.raises(errors.InvalidArgument):
        db.ledger.link_card(rider, b"\x01\x02")
    with pytest.raises(errors.InvalidArgument):
        db.ledger.link_card(merchant, UID)
    with pytest.raises(errors.NotFound) as info:
        db.ledger.link_card("nobody", UID)
    assert info.value.reason == "UNKNOWN_ACCOUNT"
    other_card = db.ledger.link_card(db.rider(), OTHER_UID)
    with pytest.raises(errors.NotFound) as info:
        db.ledger.unlink_card(rider, other_card.card_id)  # someone else's card
    assert info.value.metadata["resource"] == "card"
    for n in range(CARDS_PER_ACCOUNT_MAX):
        db.ledger.link_card(rider, bytes([n + 1, 2, 3, 4]))
    with pytest.raises(errors.LimitExceeded):
        db.ledger.link_card(rider, bytes([99, 2, 3, 4]))


# --- blocking and the deny list --------------------------------------------------------------------


def test_block_and_unblock_put_the_account_and_its_cards_on_and_off_the_deny_list(
        db: WalletDb, redis_deny: RedisDenyList) -> None:
    rider = db.rider(funded_minor=500)
    db.ledger.link_card(rider, UID)
    members = {deny_member_for_account(rider), deny_member_for_card(card_hash(TEST_CARD_HASH_KEY, UID))}
    blocked = db.ledger.block_account(rider, BlockReason.LOST_OR_STOLEN, "reported at the counter")
    assert (blocked.status, blocked.block_reason) == (AccountStatus.BLOCKED, BlockReason.LOST_OR_STOLEN)
    assert redis_deny.members() == members
    assert db.ledger.resolve_card(UID).status is AccountStatus.BLOCKED
    assert db.ledger.block_account(rider, BlockReason.FRAUD_SUSPECTED) == blocked  # unchanged
    with pytest.raises(errors.FailedPrecondition) as info:
        db.ledger.link_card(rider, OTHER_UID)
    assert info.value.reason == "ACCOUNT_BLOCKED"
    with pytest.raises(errors.FailedPrecondition):
        db.ledger.create_transfers([TransferRequest("f", rider, db.sys(AccountKind.OPERATOR_REVENUE), 1, "TWD",
                                                    TransferKind.FARE)])
    active = db.ledger.unblock_account(rider, "found it")
    assert active.status is AccountStatus.ACTIVE and active.block_reason is None
    assert redis_deny.members() == set()
    assert db.ledger.unblock_account(rider) == active
    assert db.event_types().count("AccountBlocked") == 1 and db.event_types().count("AccountUnblocked") == 1


def test_unlinking_a_blocked_accounts_card_takes_the_card_off_the_deny_list(
        db: WalletDb, redis_deny: RedisDenyList) -> None:
    rider = db.rider()
    card = db.ledger.link_card(rider, UID)
    db.ledger.block_account(rider, BlockReason.LOST_OR_STOLEN)
    db.ledger.unlink_card(rider, card.card_id)
    assert redis_deny.members() == {deny_member_for_account(rider)}


def test_the_deny_list_is_rebuilt_from_postgresql(db: WalletDb, redis_deny: RedisDenyList) -> None:
    blocked, active = db.rider(), db.rider()
    db.ledger.link_card(blocked, UID)
    db.ledger.link_card(active, OTHER_UID)
    db.ledger.block_account(blocked, BlockReason.UNPAID_FARES)
    expected = redis_deny.members()
    # Redis lost everything, and then picked up a stale entry: the rebuild restores the truth.
    redis_deny.replace(["account:stale", deny_member_for_account(active)])
    assert db.ledger.rebuild_deny_list() == 2
    assert redis_deny.members() == expected
    db.ledger.unblock_account(blocked)
    assert db.ledger.rebuild_deny_list() == 0
    assert redis_deny.members() == set()


def test_a_block_that_cannot_reach_redis_changes_nothing(postgres_dsn: str, scratch_schema: str) -> None:
    unreachable = RedisDenyList(create_redis("redis://127.0.0.1:1/0", timeout_s=0.2), key="test:unreachable")
    wallet = open_wallet_db(postgres_dsn, scratch_schema, deny_list=unreachable)
    try:
        rider = wallet.rider()
        before = wallet.snapshot()
        with pytest.raises(errors.Unavailable):
            wallet.ledger.block_account(rider, BlockReason.LOST_OR_STOLEN)
        assert wallet.snapshot() == before
    finally:
        wallet.pool.close()
