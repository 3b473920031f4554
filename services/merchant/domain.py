"""The merchant service's pure domain: vocabulary, records, validation, API keys, limits,
the service day, the choice of split contract and the wallet transfers a charge or a refund
posts. No I/O: no grpc, psycopg, stripe or clock here (times are passed in).

How a charge is recorded in the wallet (one linked batch, all or nothing):

    rider wallet     -> merchant payable   the full amount, MERCHANT_PAYMENT, with the split lines
    merchant payable -> city revenue       the city's share, FEE           (when not zero)
    merchant payable -> platform fees      the platform's share, FEE       (when not zero)

so the merchant payable keeps exactly the merchant's share and the ledger itself holds the
split. A refund is the mirror image, as correcting transfers: each party's share of the
refund goes back to the merchant payable first (CORRECTION of its share transfer), then the
payable pays the rider (MERCHANT_REFUND of the payment, with the refund's split lines).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from libs import errors, splits
from libs.contract_cache import ScopedVersion, in_force
from libs.money import AMOUNT_MINOR_MAX

# --- vocabulary ---------------------------------------------------------------------------

SCOPE_CHARGES_WRITE = "charges:write"
SCOPE_REFUNDS_WRITE = "refunds:write"
SCOPE_CHARGES_READ = "charges:read"
SCOPES = (SCOPE_CHARGES_WRITE, SCOPE_REFUNDS_WRITE, SCOPE_CHARGES_READ)
# A key made without scopes is a till key: it charges and reads, but cannot refund.
DEFAULT_SCOPES = (SCOPE_CHARGES_WRITE, SCOPE_CHARGES_READ)

API_KEY_PREFIX = "ctk_"
API_KEY_ID_HEX_CHARS = 16
API_KEY_SECRET_BYTES = 32
# "ctk_" + key id: identifies the key, and carries none of the secret's randomness.
SECRET_PREFIX_CHARS = len(API_KEY_PREFIX) + API_KEY_ID_HEX_CHARS
API_KEYS_PER_MERCHANT_MAX = 50
_API_KEY = re.compile(r"^ctk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")

MERCHANT_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")
CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
CATEGORY = re.compile(r"^\d{4}$")
COUNTRY = re.compile(r"^[A-Z]{2}$")
EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}\.[^@\s]{2,63}$")
NAME_CHARS_MAX = 100
LABEL_CHARS_MAX = 64
DESCRIPTION_CHARS_MAX = 200
NOTE_CHARS_MAX = 500
URL_CHARS_MAX = 500
# The wallet account that holds what a merchant is owed: "merchant:<merchant id>".
PAYABLE_PREFIX = "merchant:"
# Ledger transfer ids: "mch:<charge id>" is the payment, "mch:<charge id>:<n>" the n-th share;
# "mrf:<refund key>" is the refund, "mrf:<refund key>:<n>" the correction of the n-th share.
CHARGE_TRANSFER_PREFIX = "mch:"
REFUND_TRANSFER_PREFIX = "mrf:"


class MerchantStatus(enum.Enum):
    ONBOARDING = "ONBOARDING"
    VERIFIED = "VERIFIED"
    SUSPENDED = "SUSPENDED"


class ChargeStatus(enum.Enum):
    PENDING = "PENDING"        # decided and recorded, the wallet's answer not yet known
    SUCCEEDED = "SUCCEEDED"
    PARTIALLY_REFUNDED = "PARTIALLY_REFUNDED"
    REFUNDED = "REFUNDED"


class CredentialKind(enum.Enum):
    CARD = "CARD"
    PHONE_QR = "PHONE_QR"
    NFC = "NFC"
    FACE = "FACE"


# The wallet's system account kind that receives each party's share (ids system:<kind>:<currency>).
PARTY_ACCOUNT_KINDS = {"CITY": "city-revenue", "PLATFORM": "platform-fees", "TRANSIT_OPERATOR": "operator-revenue"}


def payable_account_id(merchant_id: str) -> str:
    return f"{PAYABLE_PREFIX}{merchant_id}"


def system_account_id(party: str, currency: str) -> str:
    """The wallet's system account for a party's share, such as `system:city-revenue:TWD`."""
    return f"system:{PARTY_ACCOUNT_KINDS[party]}:{currency}"


# --- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-rider limits: the most one charge takes, and the most a rider pays in a service day."""

    per_purchase_minor: int
    per_day_minor: int
    currency: str
    face_minor: int = 0  # the most a face match alone may pay; 0: faces cannot pay


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    name: str
    category: str
    country: str
    email: str
    status: MerchantStatus
    stripe_account_id: str | None
    payable_account_id: str | None
    created_at: datetime
    verified_at: datetime | None
    request_hash: bytes = field(repr=False, default=b"")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    merchant_id: str
    label: str
    secret_prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class Caller:
    """Who a till call comes from: the merchant and the scopes of its key."""

    merchant_id: str
    key_id: str
    scopes: tuple[str, ...]

    def require(self, scope: str, merchant_id: str) -> None:
        """Refuse unless the key acts for `merchant_id` and carries `scope`."""
        if merchant_id != self.merchant_id:
            raise errors.PermissionDenied("API_KEY_WRONG_MERCHANT", "the API key belongs to another merchant",
                                          field="merchant_id")
        if scope not in self.scopes:
            raise errors.PermissionDenied("API_KEY_SCOPE_MISSING", f"the API key lacks the {scope} scope", scope=scope)


@dataclass(frozen=True)
class Charge:
    charge_id: str
    merchant_id: str
    order_id: str
    rider_account_id: str
    credential_kind: CredentialKind
    amount_minor: int
    currency: str
    description: str
    service_day: date
    status: ChargeStatus
    refunded_minor: int
    splits: tuple[splits.SplitLine, ...]
    transfer_id: str
    created_at: datetime
    request_hash: bytes = field(repr=False, default=b"")


@dataclass(frozen=True)
class Refund:
    refund_key: str          # the server's id of the refund row, used in ledger ids
    refund_id: str           # the client's id
    merchant_id: str
    charge_id: str
    amount_minor: int
    currency: str
    note: str
    splits: tuple[splits.SplitLine, ...]
    transfer_id: str
    pending: bool
    created_at: datetime
    request_hash: bytes = field(repr=False, default=b"")


# --- validation ---------------------------------------------------------------------------


def _text(value: str, field_name: str, chars_max: int, *, required: bool = False) -> str:
    if len(value) > chars_max or (required and not value.strip()):
        need = "1 to" if required else "at most"
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} must be {need} {chars_max} characters",
                                     field=field_name)
    return value


def check_merchant_id(value: str, field_name: str = "merchant_id") -> str:
    if not MERCHANT_ID.match(value):
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} must be 1 to 40 characters of A-Z, a-z, 0-9,"
                                     " '_' or '-' (a UUID)", field=field_name)
    return value


def check_client_id(value: str, field_name: str) -> str:
    if not CLIENT_ID.match(value):
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} must be 1 to 64 characters of A-Z, a-z, 0-9,"
                                     " '.', '_', ':' or '-'", field=field_name)
    return value


def check_url(value: str, field_name: str) -> str:
    if not value.startswith(("https://", "http://")) or len(value) > URL_CHARS_MAX or any(c.isspace() for c in value):
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} must be an http(s) URL of at most "
                                     f"{URL_CHARS_MAX} characters", field=field_name)
    return value


@dataclass(frozen=True)
class OnboardInput:
    merchant_id: str
    name: str
    category: str
    country: str
    email: str
    return_url: str
    refresh_url: str

    def validate(self) -> OnboardInput:
        check_merchant_id(self.merchant_id)
        _text(self.name, "name", NAME_CHARS_MAX, required=True)
        if not CATEGORY.match(self.category):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "category must be a four-digit ISO 18245 merchant category "
                                         "code such as 5814", field="category")
        if not COUNTRY.match(self.country):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "country must be an ISO 3166-1 alpha-2 code such as TW",
                                         field="country")
        if not EMAIL.match(self.email):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "email must be an email address", field="email")
        check_url(self.return_url, "return_url")
        check_url(self.refresh_url, "refresh_url")
        return self

    def fingerprint(self) -> bytes:
        # The URLs are not part of it: a retry may come back from another page.
        return _fingerprint("onboard.v1", [self.merchant_id, self.name, self.category, self.country, self.email])


@dataclass(frozen=True)
class ChargeInput:
    merchant_id: str
    order_id: str
    credential_kind: CredentialKind | None
    credential_digest: bytes    # SHA-256 of the serialized credential: part of the fingerprint only
    amount_minor: int | None
    currency: str
    description: str

    def validate(self, limits: Limits) -> ChargeInput:
        check_merchant_id(self.merchant_id)
        check_client_id(self.order_id, "order_id")
        if self.credential_kind is None:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "credential must hold exactly one credential",
                                         field="credential")
        check_amount(self.amount_minor, "amount")
        if self.currency != limits.currency:
            raise errors.InvalidArgument("INVALID_CURRENCY", f"merchants charge in {limits.currency}",
                                         field="amount.currency")
        _text(self.description, "description", DESCRIPTION_CHARS_MAX)
        return self

    def fingerprint(self) -> bytes:
        return _fingerprint("charge.v1", [self.merchant_id, self.order_id, self.credential_digest.hex(),
                                          self.amount_minor, self.currency, self.description])


@dataclass(frozen=True)
class RefundInput:
    refund_id: str
    merchant_id: str
    charge_id: str
    amount_minor: int | None
    currency: str
    note: str

    def validate(self) -> RefundInput:
        check_client_id(self.refund_id, "refund_id")
        check_merchant_id(self.merchant_id)
        check_client_id(self.charge_id, "charge_id")
        check_amount(self.amount_minor, "amount")
        if not re.match(r"^[A-Z]{3}$", self.currency):
            raise errors.InvalidArgument("INVALID_CURRENCY", "amount.currency must be an ISO 4217 code",
                                         field="amount.currency")
        _text(self.note, "note", NOTE_CHARS_MAX)
        return self

    def fingerprint(self) -> bytes:
        # The note is kept from the first call and is not part of the payload compared.
        return _fingerprint("refund.v1", [self.refund_id, self.merchant_id, self.charge_id, self.amount_minor,
                                          self.currency])


def check_amount(value: int | None, field_name: str) -> int:
    if value is None:
        raise errors.InvalidArgument("INVALID_AMOUNT", f"{field_name} is required", field=field_name)
    if value <= 0:
        raise errors.InvalidArgument("INVALID_AMOUNT", f"{field_name} must be greater than zero, got {value}",
                                     field=field_name)
    if value > AMOUNT_MINOR_MAX:
        raise errors.InvalidArgument("INVALID_AMOUNT", f"{field_name} does not fit in 64 bits", field=field_name)
    return value


def check_scopes(requested: Sequence[str]) -> tuple[str, ...]:
    """The scopes of a new key: known, each once; none asked means the till default."""
    if not requested:
        return DEFAULT_SCOPES
    unknown = [s for s in requested if s not in SCOPES]
    if unknown:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}",
                                     field="scopes")
    if len(set(requested)) != len(requested):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "a scope is listed twice", field="scopes")
    return tuple(s for s in SCOPES if s in requested)


def check_label(label: str) -> str:
    return _text(label, "label", LABEL_CHARS_MAX)


def _fingerprint(tag: str, values: Iterable[object]) -> bytes:
    return hashlib.sha256(json.dumps([tag, *values], separators=(",", ":")).encode()).digest()


# --- API keys -----------------------------------------------------------------------------


@dataclass(frozen=True)
class NewApiKey:
    key_id: str
    secret: str = field(repr=False)
    secret_hash: bytes = field(repr=False)
    secret_prefix: str = ""


def new_api_key() -> NewApiKey:
    """A fresh key: `ctk_<16 hex key id>_<32 random bytes, base64url>`; only its SHA-256 is stored.

    256 random bits make the hash as good as an HMAC: nothing can be guessed from it, and
    there is no low-entropy password to stretch, so a plain SHA-256 is enough."""
    key_id = secrets.token_hex(API_KEY_ID_HEX_CHARS // 2)
    secret_part = base64.urlsafe_b64encode(secrets.token_bytes(API_KEY_SECRET_BYTES)).rstrip(b"=").decode()
    secret = f"{API_KEY_PREFIX}{key_id}_{secret_part}"
    return NewApiKey(key_id, secret, hash_secret(secret), secret[:SECRET_PREFIX_CHARS])


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_api_key(secret: str | None) -> str:
    """The key id of a well-formed secret; API_KEY_INVALID otherwise."""
    match = _API_KEY.match(secret or "")
    if not match:
        raise errors.Unauthenticated("API_KEY_INVALID", "a merchant API key is required in the authorization metadata "
                                     "as 'Bearer ctk_...'")
    return match.group(1)


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), stored_hash)


# --- the service day and limits -----------------------------------------------------------


@dataclass(frozen=True)
class ServiceDay:
    """Service days run from `start` local time in `timezone` to the same time the next day,
    and are named by the date they start on."""

    timezone: str
    start: time

    def of(self, moment: datetime) -> date:
        if moment.tzinfo is None:
            raise ValueError("a service day needs an aware datetime")
        local = moment.astimezone(ZoneInfo(self.timezone))
        shifted = local - timedelta(hours=self.start.hour, minutes=self.start.minute)
        return shifted.date()


def check_limits(amount_minor: int, spent_today_minor: int, limits: Limits, *, face: bool = False) -> None:
    """LIMIT_EXCEEDED when the charge passes the per-purchase limit, the face-only limit (a
    charge by face alone), or the rider's day total."""
    if face and amount_minor > limits.face_minor:
        raise errors.LimitExceeded("LIMIT_EXCEEDED", f"a face alone pays at most {limits.face_minor} minor units",
                                   limit="face", limit_minor=str(limits.face_minor))
    if amount_minor > limits.per_purchase_minor:
        raise errors.LimitExceeded("LIMIT_EXCEEDED", f"a charge takes at most {limits.per_purchase_minor} minor units",
                                   limit="per_purchase", limit_minor=str(limits.per_purchase_minor))
    headroom = max(0, limits.per_day_minor - spent_today_minor)
    if amount_minor > headroom:
        raise errors.LimitExceeded("LIMIT_EXCEEDED", f"the rider may pay {headroom} more minor units this service day",
                                   limit="per_day", limit_minor=str(limits.per_day_minor), headroom_minor=str(headroom))


# --- split contracts ----------------------------------------------------------------------


def contract_in_force(versions: Iterable[ScopedVersion], category: str, moment: datetime) -> splits.DatedVersion:
    """The version splitting a payment in `category` at `moment`: the category's own contract
    in force then, else the default contract's; NO_SPLIT_CONTRACT when neither is."""
    found = in_force(versions, (category, ""), moment)
    if found is not None:
        return found
    raise errors.FailedPrecondition("NO_SPLIT_CONTRACT", f"no merchant-payment split contract is in force for category "
                                    f"{category} or by default", category=category)


# --- ledger plans -------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedTransfer:
    """One transfer of a batch, in the wallet's terms (kind names as in wallet.proto)."""

    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int
    kind: str                          # MERCHANT_PAYMENT, FEE, CORRECTION or MERCHANT_REFUND
    reference: str
    splits: tuple[splits.SplitLine, ...] = ()
    corrects_transfer_id: str = ""


def _share_account(line: splits.SplitLine, merchant_id: str) -> str | None:
    """Where a party's share ends up; None for the charging merchant (it stays in the payable)."""
    if line.party == "MERCHANT":
        if line.party_id != merchant_id:
            raise errors.FailedPrecondition("NO_SPLIT_CONTRACT", "the split contract shares a merchant payment with "
                                            "another merchant, which the ledger cannot record", party_id=line.party_id)
        return None
    return system_account_id(line.party, line.currency)


def charge_plan(charge: Charge) -> list[PlannedTransfer]:
    payable = payable_account_id(charge.merchant_id)
    payment_id = f"{CHARGE_TRANSFER_PREFIX}{charge.charge_id}"
    plan = [PlannedTransfer(payment_id, charge.rider_account_id, payable, charge.amount_minor, "MERCHANT_PAYMENT",
                            f"charge:{charge.charge_id}", tuple(charge.splits))]
    for index, line in enumerate(charge.splits, start=1):
        account = _share_account(line, charge.merchant_id)
        if account is not None and line.amount_minor > 0:
            plan.append(PlannedTransfer(f"{payment_id}:{index}", payable, account, line.amount_minor, "FEE",
                                        f"charge:{charge.charge_id}:{line.party}"))
    return plan


def refund_plan(charge: Charge, refund: Refund) -> list[PlannedTransfer]:
    """The shares come back to the payable first, so it never dips below its floor of zero."""
    payable = payable_account_id(charge.merchant_id)
    payment_id = f"{CHARGE_TRANSFER_PREFIX}{charge.charge_id}"
    refund_transfer_id = f"{REFUND_TRANSFER_PREFIX}{refund.refund_key}"
    plan = []
    for index, line in enumerate(refund.splits, start=1):
        account = _share_account(line, charge.merchant_id)
        if account is not None and line.amount_minor > 0:
            plan.append(PlannedTransfer(f"{refund_transfer_id}:{index}", account, payable, line.amount_minor,
                                        "CORRECTION", f"refund:{refund.refund_key}:{line.party}",
                                        corrects_transfer_id=f"{payment_id}:{index}"))
    plan.append(PlannedTransfer(refund_transfer_id, payable, charge.rider_account_id, refund.amount_minor,
                                "MERCHANT_REFUND", f"refund:{refund.refund_key}", tuple(refund.splits),
                                corrects_transfer_id=payment_id))
    return plan


def charge_status(amount_minor: int, refunded_minor: int) -> ChargeStatus:
    if refunded_minor <= 0:
        return ChargeStatus.SUCCEEDED
    return ChargeStatus.REFUNDED if refunded_minor >= amount_minor else ChargeStatus.PARTIALLY_REFUNDED


# --- split lines as stored ----------------------------------------------------------------


def splits_to_json(lines: Sequence[splits.SplitLine]) -> str:
    return json.dumps([{"party": s.party, "party_id": s.party_id, "amount_minor": s.amount_minor,
                        "currency": s.currency, "contract_id": s.contract_id,
                        "contract_version": s.contract_version} for s in lines])


def splits_from_json(value: str | list | None) -> tuple[splits.SplitLine, ...]:
    rows: list[Mapping] = json.loads(value) if isinstance(value, str) else (value or [])
    return tuple(splits.SplitLine(r["party"], r["party_id"], int(r["amount_minor"]), r["currency"], r["contract_id"],
                                  int(r["contract_version"])) for r in rows)
