"""The wallet's pure domain: ledger vocabulary, request validation, idempotency hashing and
the arithmetic of one ledger transaction.

Nothing here does I/O or imports grpc, psycopg or redis. The service layer
(`services.wallet.ledger`) reads and locks rows, then asks this module whether a request is
well formed (`validate_*`), what its idempotency fingerprint is (`*_hash`), and what the
locked accounts look like after applying it (`Book`), which raises the precise error when a
floor, limit or status forbids it. The database enforces the same invariants again with
constraints and triggers (see migrations/001_ledger.sql): this module gives the caller a
precise reason, the database makes a bug here unable to corrupt the ledger.

Sign convention: an account's balance is credits minus debits. A transfer debits one account
and credits another by the same amount, so the sum of all balances is always zero; system
accounts (no floor) may go negative, rider wallets and merchant payables may not go below
their floor. `available = balance - pending debits` (what pending holds reserve).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

from libs import errors
from libs.money import AMOUNT_MINOR_MAX

# --- limits (every list, text and batch has a maximum) ------------------------------------

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")
BATCH_TRANSFERS_MAX = 32
# Independent transfers in one PostTransferBatch call: one transaction, one lock pass.
INDEPENDENT_TRANSFERS_MAX = 256
# Transfers linked to a hold's post (a fare's split moves).
POST_LINKED_TRANSFERS_MAX = 8
SPLIT_LINES_MAX = 16
REFERENCE_CHARS_MAX = 128
LABEL_CHARS_MAX = 64
NOTE_CHARS_MAX = 500
CARDS_PER_ACCOUNT_MAX = 8
CARD_UID_LENGTHS = (4, 7, 10)
HISTORY_PAGE_SIZE_DEFAULT = 50
HISTORY_PAGE_SIZE_MAX = 100
BALANCE_HOLDS_LISTED_MAX = 100
CARD_HASH_KEY_BYTES_MIN = 32
# Ids starting with this prefix belong to the wallet's own system accounts.
SYSTEM_ID_PREFIX = "system:"


# --- vocabulary -------------------------------------------------------------------------


class AccountKind(enum.Enum):
    RIDER_WALLET = "RIDER_WALLET"
    OPERATOR_REVENUE = "OPERATOR_REVENUE"
    CITY_REVENUE = "CITY_REVENUE"
    PLATFORM_FEES = "PLATFORM_FEES"
    MERCHANT_PAYABLE = "MERCHANT_PAYABLE"
    STRIPE_CLEARING = "STRIPE_CLEARING"
    SUSPENSE = "SUSPENSE"


# System accounts have no floor and exist once per currency with a well-known id.
SYSTEM_KINDS = (
    AccountKind.OPERATOR_REVENUE,
    AccountKind.CITY_REVENUE,
    AccountKind.PLATFORM_FEES,
    AccountKind.STRIPE_CLEARING,
    AccountKind.SUSPENSE,
)
# What CreateAccount may open; system accounts are opened by the wallet itself.
CLIENT_KINDS = (AccountKind.RIDER_WALLET, AccountKind.MERCHANT_PAYABLE)


class AccountStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    BLOCKED = "BLOCKED"


class BlockReason(enum.Enum):
    LOST_OR_STOLEN = "LOST_OR_STOLEN"
    UNPAID_FARES = "UNPAID_FARES"
    FRAUD_SUSPECTED = "FRAUD_SUSPECTED"
    STAFF_DECISION = "STAFF_DECISION"


class TransferKind(enum.Enum):
    FARE = "FARE"
    MERCHANT_PAYMENT = "MERCHANT_PAYMENT"
    MERCHANT_REFUND = "MERCHANT_REFUND"
    TOP_UP = "TOP_UP"
    TOP_UP_REFUND = "TOP_UP_REFUND"
    CORRECTION = "CORRECTION"
    PAYOUT = "PAYOUT"
    FEE = "FEE"
    REVENUE_SHARE = "REVENUE_SHARE"


# Kinds only the wallet's own top-up flow may post (through `Ledger.credit_from_clearing`);
# CreateTransfers refuses them so no caller can mint stored value.
INTERNAL_TRANSFER_KINDS = frozenset({TransferKind.TOP_UP, TransferKind.TOP_UP_REFUND})
# Kinds that may name the transfer they correct.
CORRECTING_KINDS = frozenset({TransferKind.CORRECTION, TransferKind.MERCHANT_REFUND, TransferKind.TOP_UP_REFUND})


class HoldStatus(enum.Enum):
    PENDING = "PENDING"
    POSTED = "POSTED"
    VOIDED = "VOIDED"
    EXPIRED = "EXPIRED"


class Party(enum.Enum):
    MERCHANT = "MERCHANT"
    TRANSIT_OPERATOR = "TRANSIT_OPERATOR"
    CITY = "CITY"
    PLATFORM = "PLATFORM"


def is_system_account(account_id: str) -> bool:
    return account_id.startswith(SYSTEM_ID_PREFIX)


def system_account_id(kind: AccountKind, currency: str) -> str:
    """The well-known id of a system account, such as `system:operator-revenue:TWD`."""
    if kind not in SYSTEM_KINDS:
        raise ValueError(f"{kind.name} is not a system account kind")
    return f"{SYSTEM_ID_PREFIX}{kind.value.lower().replace('_', '-')}:{currency}"


# --- records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    account_id: str
    kind: AccountKind
    currency: str
    floor_minor: int | None
    balance_minor: int
    pending_debits_minor: int
    pending_credits_minor: int
    rider_category: str
    category_expires_at: datetime | None
    owner_id: str
    status: AccountStatus
    block_reason: BlockReason | None
    created_at: datetime
    request_hash: bytes = b""

    @property
    def available_minor(self) -> int:
        """The posted balance minus what pending holds reserve."""
        return self.balance_minor - self.pending_debits_minor

    def category_in_force(self, now: datetime) -> str:
        """The rider category that applies at `now`; empty (the default) once it lapsed."""
        if self.category_expires_at is not None and self.category_expires_at <= now:
            return ""
        return self.rider_category


@dataclass(frozen=True)
class SplitLine:
    party: Party
    party_id: str
    amount_minor: int
    currency: str
    contract_id: str
    contract_version: int


@dataclass(frozen=True)
class TransferRequest:
    """One transfer as a client asked for it (validated and normalized)."""

    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    kind: TransferKind
    splits: tuple[SplitLine, ...] = ()
    corrects_transfer_id: str = ""
    reference: str = ""


@dataclass(frozen=True)
class Transfer:
    """A posted transfer: immutable once written."""

    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    kind: TransferKind
    splits: tuple[SplitLine, ...]
    hold_id: str
    corrects_transfer_id: str
    reference: str
    posted_at: datetime
    debit_balance_after_minor: int
    credit_balance_after_minor: int
    request_hash: bytes


@dataclass(frozen=True)
class HoldRequest:
    hold_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    kind: TransferKind
    expires_at: datetime | None
    reference: str = ""


@dataclass(frozen=True)
class Hold:
    hold_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    currency: str
    kind: TransferKind
    reference: str
    created_at: datetime
    expires_at: datetime
    request_hash: bytes
    status: HoldStatus = HoldStatus.PENDING
    posted_amount_minor: int = 0
    transfer_id: str = ""
    resolved_at: datetime | None = None
    resolution_hash: bytes | None = None

    def is_due(self, now: datetime) -> bool:
        """A pending hold whose expiry has come; it may no longer be posted."""
        return self.status is HoldStatus.PENDING and self.expires_at <= now


@dataclass(frozen=True)
class PostHoldRequest:
    hold_id: str
    amount_minor: int | None  # None: the whole held amount
    currency: str | None
    splits: tuple[SplitLine, ...] = ()
    linked: tuple[TransferRequest, ...] = ()  # posted after the hold's transfer, all or none with it


@dataclass(frozen=True)
class CreateAccountRequest:
    account_id: str
    kind: AccountKind
    currency: str
    rider_category: str
    category_expires_at: datetime | None
    owner_id: str


@dataclass(frozen=True)
class Card:
    card_id: str
    account_id: str
    card_hash: bytes
    label: str
    linked_at: datetime
    unlinked_at: datetime | None = None


@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    transfer_id: str
    kind: TransferKind
    delta_minor: int
    balance_after_minor: int
    currency: str
    counterparty_kind: AccountKind
    reference: str
    posted_at: datetime


# --- validation ---------------------------------------------------------------------------


def _where(field_name: str, index: int | None) -> dict[str, str]:
    meta = {"field": field_name}
    if index is not None:
        meta["index"] = str(index)
    return meta


def check_id(value: object, field_name: str, *, index: int | None = None) -> str:
    """A client id: 1 to 64 characters of A-Z a-z 0-9 . _ : -"""
    if not isinstance(value, str) or not ID_PATTERN.match(value):
        raise errors.InvalidArgument(
            "INVALID_ARGUMENT", f"{field_name} must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_', ':' or '-'",
            **_where(field_name, index))
    return value


def check_amount(value: object, field_name: str, *, index: int | None = None) -> int:
    """A positive integer number of minor units that fits in int64."""
    if value is None:
        raise errors.InvalidArgument("INVALID_AMOUNT", f"{field_name} is required", **_where(field_name, index))
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.InvalidArgument("INVALID_AMOUNT", f"{field_name} must be an integer number of minor units",
                                     **_where(field_name, index))
    if value <= 0:
        raise errors.InvalidArgument("INVALID_AMOUNT", f"{field_name} must be greater than zero, got {value}",
                                     **_where(field_name, index))
    if value > AMOUNT_MINOR_MAX:
        raise errors.InvalidArgument("INVALID_AMOUNT", f"{field_name} does not fit in a signed 64-bit integer",
                                     **_where(field_name, index))
    return value


def check_currency(value: object, field_name: str, *, index: int | None = None) -> str:
    if not isinstance(value, str) or not CURRENCY_PATTERN.match(value):
        raise errors.InvalidArgument("INVALID_CURRENCY", f"{field_name} must be a three-letter ISO 4217 code such as TWD",
                                     **_where(field_name, index))
    return value


def check_text(value: object, field_name: str, chars_max: int, *, index: int | None = None) -> str:
    if not isinstance(value, str) or len(value) > chars_max:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} must be text of at most {chars_max} characters",
                                     **_where(field_name, index))
    return value


def check_splits(splits: Sequence[SplitLine], amount_minor: int, currency: str, field_name: str, *,
                 index: int | None = None) -> tuple[SplitLine, ...]:
    """Split lines are either absent or sum exactly to the amount, in its currency."""
    if len(splits) > SPLIT_LINES_MAX:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} has more than {SPLIT_LINES_MAX} lines",
                                     **_where(field_name, index))
    total = 0
    for number, line in enumerate(splits):
        where = f"{field_name}[{number}]"
        if not isinstance(line.party, Party):
            raise errors.InvalidArgument("INVALID_ARGUMENT", f"{where}.party must be set", **_where(where, index))
        check_id(line.party_id, f"{where}.party_id", index=index)
        check_id(line.contract_id, f"{where}.contract_id", index=index)
        if isinstance(line.contract_version, bool) or not isinstance(line.contract_version, int) or line.contract_version < 1:
            raise errors.InvalidArgument("INVALID_ARGUMENT", f"{where}.contract_version must be 1 or more",
                                         **_where(where, index))
        if isinstance(line.amount_minor, bool) or not isinstance(line.amount_minor, int) or line.amount_minor < 0:
            raise errors.InvalidArgument("INVALID_AMOUNT", f"{where}.amount must be zero or more",
                                         **_where(where, index))
        if line.currency != currency:
            raise errors.InvalidArgument("INVALID_CURRENCY", f"{where}.amount must be in {currency}",
                                         **_where(where, index))
        total += line.amount_minor
    if splits and total != amount_minor:
        raise errors.InvalidArgument("INVALID_AMOUNT", f"{field_name} sum to {total}, not to the amount {amount_minor}",
                                     **_where(field_name, index))
    return tuple(splits)


def validate_transfer(request: TransferRequest, *, index: int | None = None, internal: bool = False) -> TransferRequest:
    """Check everything about one transfer that needs no database; return it unchanged."""
    check_id(request.transfer_id, "transfer_id", index=index)
    check_id(request.debit_account_id, "debit_account_id", index=index)
    check_id(request.credit_account_id, "credit_account_id", index=index)
    if request.debit_account_id == request.credit_account_id:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "debit and credit accounts must differ",
                                     **_where("credit_account_id", index))
    check_amount(request.amount_minor, "amount", index=index)
    check_currency(request.currency, "amount.currency", index=index)
    if not isinstance(request.kind, TransferKind):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "kind must be set", **_where("kind", index))
    if request.kind in INTERNAL_TRANSFER_KINDS and not internal:
        raise errors.InvalidArgument(
            "INVALID_ARGUMENT", f"{request.kind.name} transfers are made by the wallet's top-up flow, not by CreateTransfers",
            **_where("kind", index))
    if request.corrects_transfer_id:
        check_id(request.corrects_transfer_id, "corrects_transfer_id", index=index)
        if request.kind not in CORRECTING_KINDS:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "only corrections and refunds name a corrected transfer",
                                         **_where("corrects_transfer_id", index))
        if request.corrects_transfer_id == request.transfer_id:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "a transfer cannot correct itself",
                                         **_where("corrects_transfer_id", index))
    check_text(request.reference, "reference", REFERENCE_CHARS_MAX, index=index)
    check_splits(request.splits, request.amount_minor, request.currency, "splits", index=index)
    return request


def validate_batch(requests: Sequence[TransferRequest], *, internal: bool = False) -> tuple[TransferRequest, ...]:
    if not requests:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "at least one transfer is required", field="transfers")
    if len(requests) > BATCH_TRANSFERS_MAX:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"at most {BATCH_TRANSFERS_MAX} transfers go in one batch",
                                     field="transfers")
    seen: set[str] = set()
    for index, request in enumerate(requests):
        validate_transfer(request, index=index, internal=internal)
        if request.transfer_id in seen:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "a transfer id appears twice in the batch",
                                         field="transfer_id", index=str(index))
        seen.add(request.transfer_id)
    return tuple(requests)


def check_independent_batch(transfer_ids: Sequence[str]) -> None:
    """The shape of a PostTransferBatch call: 1 to INDEPENDENT_TRANSFERS_MAX distinct ids."""
    if not transfer_ids:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "at least one transfer is required", field="transfers")
    if len(transfer_ids) > INDEPENDENT_TRANSFERS_MAX:
        raise errors.InvalidArgument(
            "INVALID_ARGUMENT", f"at most {INDEPENDENT_TRANSFERS_MAX} transfers go in one batch", field="transfers")
    seen: set[str] = set()
    for index, transfer_id in enumerate(transfer_ids):
        if transfer_id in seen:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "a transfer id appears twice in the batch",
                                         field="transfer_id", index=str(index))
        seen.add(transfer_id)


def validate_hold(request: HoldRequest) -> HoldRequest:
    check_id(request.hold_id, "hold_id")
    check_id(request.debit_account_id, "debit_account_id")
    check_id(request.credit_account_id, "credit_account_id")
    if request.debit_account_id == request.credit_account_id:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "debit and credit accounts must differ", field="credit_account_id")
    check_amount(request.amount_minor, "amount")
    check_currency(request.currency, "amount.currency")
    if not isinstance(request.kind, TransferKind):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "kind must be set", field="kind")
    if request.kind in INTERNAL_TRANSFER_KINDS or request.kind is TransferKind.REVENUE_SHARE:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{request.kind.name} is not a kind a hold can have", field="kind")
    check_text(request.reference, "reference", REFERENCE_CHARS_MAX)
    return request


def hold_expiry(request: HoldRequest, now: datetime, *, ttl_default_s: int, ttl_max_s: int) -> datetime:
    """When a new hold expires: as asked (in the future, within the maximum) or by default."""
    if request.expires_at is None:
        return _add_seconds(now, ttl_default_s)
    if request.expires_at <= now:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "expires_at must be in the future", field="expires_at")
    if request.expires_at > _add_seconds(now, ttl_max_s):
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"a hold may last at most {ttl_max_s} s", field="expires_at")
    return request.expires_at


def validate_post(request: PostHoldRequest) -> PostHoldRequest:
    check_id(request.hold_id, "hold_id")
    if request.amount_minor is not None:
        check_amount(request.amount_minor, "amount")
        check_currency(request.currency, "amount.currency")
    # Splits are checked against the posted amount once the hold is known (`resolve_post`).
    if len(request.linked) > POST_LINKED_TRANSFERS_MAX:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"at most {POST_LINKED_TRANSFERS_MAX} linked transfers",
                                     field="linked_transfers")
    seen = {request.hold_id}
    for index, linked in enumerate(request.linked):
        validate_transfer(linked, index=index)
        if linked.transfer_id in seen:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "a linked transfer id repeats the hold's or another's",
                                         field="linked_transfers.transfer_id", index=str(index))
        if linked.corrects_transfer_id:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "a linked transfer cannot be a correction",
                                         field="linked_transfers.corrects_transfer_id", index=str(index))
        seen.add(linked.transfer_id)
    return request


def resolve_post(request: PostHoldRequest, hold: Hold) -> tuple[int, tuple[SplitLine, ...]]:
    """The amount and splits a post of `hold` moves; refuses more than the held amount."""
    amount = hold.amount_minor if request.amount_minor is None else request.amount_minor
    if request.currency is not None and request.currency != hold.currency:
        raise errors.InvalidArgument("INVALID_CURRENCY", f"the hold is in {hold.currency}", field="amount.currency")
    if amount > hold.amount_minor:
        raise errors.InvalidArgument("INVALID_AMOUNT", f"cannot post more than the held {hold.amount_minor}",
                                     field="amount")
    return amount, check_splits(request.splits, amount, hold.currency, "splits")


def validate_create_account(request: CreateAccountRequest, *, currency: str, rider_categories: Sequence[str]) -> CreateAccountRequest:
    """Check and normalize a CreateAccount request: the currency defaults to `currency`."""
    check_id(request.account_id, "account_id")
    if request.account_id.startswith(SYSTEM_ID_PREFIX):
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"ids starting with {SYSTEM_ID_PREFIX!r} are reserved",
                                     field="account_id")
    if request.kind not in CLIENT_KINDS:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "CreateAccount opens rider wallets and merchant payables only",
                                     field="kind")
    account_currency = request.currency or currency
    check_currency(account_currency, "currency")
    if account_currency != currency:
        raise errors.InvalidArgument("INVALID_CURRENCY", f"this wallet keeps accounts in {currency}", field="currency")
    if request.kind is AccountKind.RIDER_WALLET:
        if request.owner_id:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "only merchant payables have an owner", field="owner_id")
        if request.rider_category and request.rider_category not in rider_categories:
            raise errors.InvalidArgument("INVALID_ARGUMENT",
                                         f"rider_category must be one of {', '.join(rider_categories)}",
                                         field="rider_category")
        if request.category_expires_at is not None and not request.rider_category:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "only a named rider category can expire",
                                         field="category_expires_at")
    else:
        check_id(request.owner_id, "owner_id")
        if request.rider_category or request.category_expires_at is not None:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "only rider wallets have a rider category",
                                         field="rider_category")
    return replace(request, currency=account_currency)


def check_card_uid(card_uid: object) -> bytes:
    if not isinstance(card_uid, bytes) or len(card_uid) not in CARD_UID_LENGTHS:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "card_uid must be 4, 7 or 10 bytes", field="card_uid")
    return card_uid


def card_hash(key: bytes, card_uid: bytes) -> bytes:
    """The keyed hash a card is stored and looked up by: HMAC-SHA256(key, uid)."""
    if len(key) < CARD_HASH_KEY_BYTES_MIN:
        raise ValueError(f"the card hash key must be at least {CARD_HASH_KEY_BYTES_MIN} bytes")
    return hmac.new(key, check_card_uid(card_uid), hashlib.sha256).digest()


def encode_page_token(account_id: str, seq: int) -> str:
    """An opaque token naming where the next page of `account_id`'s history starts."""
    return base64.urlsafe_b64encode(f"v1|{account_id}|{seq}".encode()).decode().rstrip("=")


def decode_page_token(token: str, account_id: str) -> int | None:
    """The position a token names; None for the first page. Refuses tokens of other accounts."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        version, owner, seq = text.split("|")
        position = int(seq)
    except (ValueError, UnicodeDecodeError):
        position, version, owner = -1, "", ""
    if version != "v1" or owner != account_id or position < 1 or encode_page_token(owner, position) != token:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "page_token is not a token of this account's history",
                                     field="page_token")
    return position


def page_size(requested: int) -> int:
    if requested == 0:
        return HISTORY_PAGE_SIZE_DEFAULT
    if not 1 <= requested <= HISTORY_PAGE_SIZE_MAX:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"page_size must be 0 to {HISTORY_PAGE_SIZE_MAX}",
                                     field="page_size")
    return requested


# --- idempotency fingerprints -----------------------------------------------------------
#
# A request's hash covers exactly what the client chose (never server-set values such as
# posted_at or a defaulted expiry), in a fixed order, under a versioned tag; changing what a
# hash covers needs a new tag so retries of old requests still match their stored hash.


def _fingerprint(tag: str, fields: Iterable[object]) -> bytes:
    text = json.dumps([tag, *fields], separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).digest()


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _splits(splits: Sequence[SplitLine]) -> list[list[object]]:
    return [[s.party.value, s.party_id, s.amount_minor, s.currency, s.contract_id, s.contract_version] for s in splits]


def transfer_hash(request: TransferRequest) -> bytes:
    return _fingerprint("transfer.v1", [
        request.debit_account_id, request.credit_account_id, request.amount_minor, request.currency,
        request.kind.value, _splits(request.splits), request.corrects_transfer_id, request.reference,
    ])


def hold_hash(request: HoldRequest) -> bytes:
    return _fingerprint("hold.v1", [
        request.debit_account_id, request.credit_account_id, request.amount_minor, request.currency,
        request.kind.value, _time(request.expires_at), request.reference,
    ])


def post_hash(amount_minor: int, splits: Sequence[SplitLine], linked: Sequence[TransferRequest] = ()) -> bytes:
    """A post's fingerprint uses the resolved amount, so 'unset' and 'the full amount' match.
    Linked transfers are part of it (each by id and payload); a post without any keeps the
    fingerprint it always had."""
    if not linked:
        return _fingerprint("post.v1", [amount_minor, _splits(splits)])
    return _fingerprint("post.v2", [amount_minor, _splits(splits),
                                    [[t.transfer_id, transfer_hash(t).hex()] for t in linked]])


def account_hash(request: CreateAccountRequest) -> bytes:
    return _fingerprint("account.v1", [
        request.kind.value, request.currency, request.rider_category, _time(request.category_expires_at),
        request.owner_id,
    ])


def system_account_hash(kind: AccountKind, currency: str) -> bytes:
    return _fingerprint("system-account.v1", [kind.value, currency])


# --- the arithmetic of one ledger transaction -------------------------------------------

INT64_MIN = -(2**63)


def _fits(value: int) -> bool:
    return INT64_MIN <= value <= AMOUNT_MINOR_MAX


@dataclass
class _Position:
    account: Account
    balance: int
    pending_debits: int
    pending_credits: int


@dataclass
class Book:
    """A working copy of the accounts one transaction has locked.

    Apply requests in order; each method checks what the database will check again (floors,
    pending amounts that never go negative) plus what only the service knows (blocked
    accounts, the stored-value limit, int64 overflow), and raises the precise error with the
    failing request's index.
    """

    accounts: Mapping[str, Account]
    stored_value_max_minor: int
    _positions: dict[str, _Position] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._positions = {
            a.account_id: _Position(a, a.balance_minor, a.pending_debits_minor, a.pending_credits_minor)
            for a in self.accounts.values()
        }

    def balance(self, account_id: str) -> int:
        return self._positions[account_id].balance

    def available_of(self, account_ids: Iterable[str], *, riders_only: bool) -> dict[str, int]:
        """The available balance (balance less pending debits) of each of `account_ids` the
        book holds (only rider wallets, with `riders_only`), as the applied requests left it.
        System accounts are left out: the book does not lock them, so it does not know their
        balance."""
        found = {}
        for account_id in account_ids:
            position = self._positions.get(account_id)
            if position is None or is_system_account(account_id):
                continue
            if riders_only and position.account.kind is not AccountKind.RIDER_WALLET:
                continue
            found[account_id] = position.balance - position.pending_debits
        return found

    def _position(self, account_id: str, field_name: str, index: int | None) -> _Position:
        position = self._positions.get(account_id)
        if position is None:
            raise errors.NotFound("UNKNOWN_ACCOUNT", f"no account {account_id}", resource="account",
                                  account_id=account_id, **_where(field_name, index))
        return position

    def _pair(self, debit_id: str, credit_id: str, currency: str, index: int | None) -> tuple[_Position, _Position]:
        debit = self._position(debit_id, "debit_account_id", index)
        credit = self._position(credit_id, "credit_account_id", index)
        for position, name in ((debit, "debit_account_id"), (credit, "credit_account_id")):
            if position.account.currency != currency:
                raise errors.InvalidArgument(
                    "INVALID_CURRENCY", f"account {position.account.account_id} holds {position.account.currency}, not {currency}",
                    account_id=position.account.account_id, **_where(name, index))
        if debit.account.status is AccountStatus.BLOCKED:
            raise errors.FailedPrecondition("ACCOUNT_BLOCKED", f"account {debit_id} is blocked and cannot pay",
                                            account_id=debit_id, **_where("debit_account_id", index))
        return debit, credit

    @staticmethod
    def _check_floor(position: _Position, index: int | None) -> None:
        floor = position.account.floor_minor
        available = position.balance - position.pending_debits
        if floor is not None and available < floor:
            # Zero floor: plain insufficient funds. Negative floor: the allowance ran out.
            reason = "FLOOR_BREACH" if floor < 0 else "INSUFFICIENT_FUNDS"
            raise errors.FailedPrecondition(
                reason, f"account {position.account.account_id} cannot go below its floor of {floor}",
                account_id=position.account.account_id, floor_minor=str(floor),
                **({"index": str(index)} if index is not None else {}))

    def _check_stored_value(self, position: _Position, index: int | None) -> None:
        if position.account.kind is not AccountKind.RIDER_WALLET:
            return
        if position.balance + position.pending_credits > self.stored_value_max_minor:
            raise errors.LimitExceeded(
                "LIMIT_EXCEEDED", f"a wallet holds at most {self.stored_value_max_minor} minor units",
                account_id=position.account.account_id, limit="stored_value",
                limit_minor=str(self.stored_value_max_minor), **({"index": str(index)} if index is not None else {}))

    @staticmethod
    def _check_fits(*positions: _Position, index: int | None) -> None:
        for position in positions:
            if not all(_fits(v) for v in (position.balance, position.pending_debits, position.pending_credits,
                                          position.balance - position.pending_debits)):
                raise errors.InvalidArgument("INVALID_AMOUNT", "the amount would overflow an account's balance",
                                             account_id=position.account.account_id,
                                             **({"index": str(index)} if index is not None else {}))

    def transfer(self, request: TransferRequest, index: int | None = None) -> tuple[int, int]:
        """Apply a transfer; return (debit balance after, credit balance after). A refused
        transfer leaves the book as it was, so the next request of a batch sees no trace of it."""
        debit, credit = self._pair(request.debit_account_id, request.credit_account_id, request.currency, index)
        debit.balance -= request.amount_minor
        credit.balance += request.amount_minor
        try:
            self._check_fits(debit, credit, index=index)
            self._check_floor(debit, index)
            self._check_stored_value(credit, index)
        except errors.CityTapError:
            debit.balance += request.amount_minor
            credit.balance -= request.amount_minor
            raise
        return debit.balance, credit.balance

    def reserve(self, request: HoldRequest) -> None:
        """Place a hold: reserve the amount on the debit side, announce it on the credit side.
        System accounts keep no pending sums (see migration 080), like the database."""
        debit, credit = self._pair(request.debit_account_id, request.credit_account_id, request.currency, None)
        if not is_system_account(debit.account.account_id):
            debit.pending_debits += request.amount_minor
        if not is_system_account(credit.account.account_id):
            credit.pending_credits += request.amount_minor
        self._check_fits(debit, credit, index=None)
        self._check_floor(debit, None)
        self._check_stored_value(credit, None)

    def release(self, hold: Hold) -> None:
        """Release a pending hold's reservation (void, expiry, or the first half of a post)."""
        debit = self._positions[hold.debit_account_id]
        credit = self._positions[hold.credit_account_id]
        if not is_system_account(hold.debit_account_id):
            debit.pending_debits -= hold.amount_minor
        if not is_system_account(hold.credit_account_id):
            credit.pending_credits -= hold.amount_minor
        if debit.pending_debits < 0 or credit.pending_credits < 0:
            raise AssertionError(f"releasing hold {hold.hold_id} would make a pending sum negative")

    def post(self, hold: Hold, amount_minor: int) -> tuple[int, int]:
        """Post a pending hold for `amount_minor` (at most its amount). The reservation is
        released first, so a post never breaches a floor or the stored-value limit that the
        hold already respected; blocked accounts may still settle holds placed before."""
        self.release(hold)
        debit = self._positions[hold.debit_account_id]
        credit = self._positions[hold.credit_account_id]
        debit.balance -= amount_minor
        credit.balance += amount_minor
        self._check_fits(debit, credit, index=None)
        self._check_floor(debit, None)
        return debit.balance, credit.balance


def event_account_key(sides: Sequence[tuple[Account, Account]]) -> str:
    """The Kafka key of an event about these (debit, credit) pairs, per WalletEvent.account_key:
    the first rider account taking part; else the owner of the first merchant payable; else
    the first debit account."""
    for debit, credit in sides:
        for account in (debit, credit):
            if account.kind is AccountKind.RIDER_WALLET:
                return account.account_id
    for debit, credit in sides:
        for account in (debit, credit):
            if account.kind is AccountKind.MERCHANT_PAYABLE:
                return account.owner_id or account.account_id
    return sides[0][0].account_id


# --- deny list members --------------------------------------------------------------------


def deny_member_for_account(account_id: str) -> str:
    return f"account:{account_id}"


def deny_member_for_card(card_hash_value: bytes) -> str:
    return f"card:{card_hash_value.hex()}"


def _add_seconds(moment: datetime, seconds: int) -> datetime:
    return moment + timedelta(seconds=seconds)
