"""Settlement's pure domain: service days, contract versions, signs of movements.

No I/O and no protobuf here: the repository, the servicer and the adapters convert at
their edges.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

from libs import errors
from libs.splits import ContractTerms, Term, check_terms

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
SCOPE_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{0,64}$")
NOTE_CHARS_MAX = 500
DAY_PATTERN = re.compile(r"^\d{4}-\d{2}-\d{2}$")

REVENUE_KINDS = ("TRANSIT_FARE", "MERCHANT_PAYMENT")

# Transfer kinds whose split lines take money back from the parties.
REVERSING_TRANSFER_KINDS = frozenset({"MERCHANT_REFUND", "CORRECTION", "TOP_UP_REFUND"})
# The revenue kind a transfer kind belongs to when its contract does not say.
REVENUE_KIND_OF_TRANSFER = {"FARE": "TRANSIT_FARE", "CORRECTION": "TRANSIT_FARE",
                            "MERCHANT_PAYMENT": "MERCHANT_PAYMENT", "MERCHANT_REFUND": "MERCHANT_PAYMENT"}


# --- service days -----------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceDayClock:
    """Where service days begin and end: `start` local time in `zone` (04:30 Asia/Taipei)."""

    zone: ZoneInfo
    start: time

    def day_of(self, moment: datetime) -> date:
        """The service day `moment` belongs to, named after the local date it starts on."""
        if moment.tzinfo is None:
            raise ValueError("day_of needs an aware datetime")
        local = moment.astimezone(self.zone)
        day = local.date()
        if local.time() < self.start:
            day -= timedelta(days=1)
        return day

    def bounds(self, day: date) -> tuple[datetime, datetime]:
        """The UTC instants [start, end) of service day `day` (a DST change is handled by the zone)."""
        begin = datetime.combine(day, self.start, tzinfo=self.zone)
        end = datetime.combine(day + timedelta(days=1), self.start, tzinfo=self.zone)
        return begin.astimezone(timezone.utc), end.astimezone(timezone.utc)


def parse_day(text: str, field: str = "service_day") -> date:
    """A service day written YYYY-MM-DD, or InvalidArgument naming `field`."""
    if not DAY_PATTERN.match(text or ""):
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field} must be a date written YYYY-MM-DD, got {text!r}",
                                     field=field)
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field} {text!r} is not a calendar date",
                                     field=field) from None


def payout_id(day: date, party: str, party_id: str) -> str:
    """The settlement batch id of a party's payout for a day: stable, so a retried close
    sends the same Stripe idempotency key and can never pay twice."""
    return "po-" + str(uuid.uuid5(uuid.NAMESPACE_URL, f"citytap:settlement:{day.isoformat()}:{party}:{party_id}"))


# --- contracts --------------------------------------------------------------------------


@dataclass(frozen=True)
class NewContractVersion:
    """A checked CreateContractVersion request."""

    contract_id: str
    version: int
    revenue_kind: str
    scope: str
    effective_from: datetime
    terms: tuple[Term, ...]
    currency: str
    note: str

    def fingerprint(self) -> bytes:
        """What makes two requests "the same payload" for idempotent retries."""
        body = {
            "contract_id": self.contract_id, "version": self.version, "revenue_kind": self.revenue_kind,
            "scope": self.scope, "effective_from": self.effective_from.isoformat(), "currency": self.currency,
            "terms": terms_to_json(self.terms), "note": self.note,
        }
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()


@dataclass(frozen=True)
class ContractVersion:
    """A recorded contract version."""

    contract_id: str
    version: int
    revenue_kind: str
    scope: str
    effective_from: datetime
    terms: tuple[Term, ...]
    currency: str
    note: str
    created_at: datetime

    def contract_terms(self) -> ContractTerms:
        return ContractTerms(self.contract_id, self.version, self.terms)


def terms_to_json(terms: tuple[Term, ...]) -> list[dict]:
    return [{"party": t.party, "party_id": t.party_id, "basis_points": t.basis_points,
             "fixed_fee_minor": t.fixed_fee_minor, "remainder": t.remainder} for t in terms]


def terms_from_json(rows: list[dict]) -> tuple[Term, ...]:
    return tuple(Term(r["party"], r["party_id"], int(r["basis_points"]), int(r["fixed_fee_minor"]),
                      bool(r["remainder"])) for r in rows)


def check_new_version(request: NewContractVersion, *, now: datetime, lead_time_s: int, initial: bool = False) -> None:
    """Raise a libs.errors error unless `request` may be recorded at `now`. An `initial` version
    (the partnership's starting terms, recorded into an empty contract book before any money
    moved, see Contracts.seed_initial) may take effect at any time."""
    if not ID_PATTERN.match(request.contract_id):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "contract_id must be 1-64 letters, digits, '.', '_', ':' or '-'",
                                     field="contract_id")
    if request.version < 1:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "version starts at 1", field="version")
    if request.revenue_kind not in REVENUE_KINDS:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "revenue_kind must be TRANSIT_FARE or MERCHANT_PAYMENT",
                                     field="revenue_kind")
    if not SCOPE_PATTERN.match(request.scope):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "scope must be at most 64 letters, digits, '.', '_', ':' or '-'",
                                     field="scope")
    if len(request.note) > NOTE_CHARS_MAX:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"note is at most {NOTE_CHARS_MAX} characters", field="note")
    check_terms(request.terms)
    for index, term in enumerate(request.terms):
        if term.party == "MERCHANT" and request.revenue_kind == "TRANSIT_FARE" and not term.party_id:
            raise errors.InvalidArgument("INVALID_SPLIT", f"term {index}: a fare contract has no paying merchant",
                                         field=f"terms[{index}].party_id")
    if request.revenue_kind == "MERCHANT_PAYMENT" and not any(
            t.party == "MERCHANT" and not t.party_id for t in request.terms):
        raise errors.InvalidArgument("INVALID_SPLIT", "a merchant-payment contract needs a term for the paying merchant "
                                                      "(party MERCHANT with an empty party_id)", field="terms")
    earliest = now + timedelta(seconds=lead_time_s)
    if not initial and request.effective_from < earliest:
        raise errors.InvalidArgument(
            "EFFECTIVE_TOO_SOON",
            f"a contract version takes effect at least {lead_time_s} s after it is made, so every service "
            f"picks it up before it applies; the earliest allowed now is {earliest.isoformat()}",
            field="effective_from", earliest=earliest.isoformat())


def signed(amount_minor: int, transfer_kind: str) -> int:
    """A movement's amount as settlement counts it: negative when it takes money back."""
    return -amount_minor if transfer_kind in REVERSING_TRANSFER_KINDS else amount_minor
