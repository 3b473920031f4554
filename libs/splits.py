"""Revenue splits: contract terms in, split lines out, always summing exactly to the amount.

Pure: no I/O, no protobuf. The settlement service keeps the contracts (versioned and
effective-dated) and the services that move money (merchant charges, fare posts) call
`split` at the moment a payment happens and `split_refund` when it is given back, then record
the lines with the transfer.

How an amount is shared under a contract version:

1. Fixed fees come first, in the order of the terms. A fee never takes more than is left,
   so a payment smaller than the fees pays them in order until it runs out (no share is
   ever negative).
2. What remains is shared by basis points with `libs.money.allocate` (largest remainder),
   so the parts always sum to the amount and each is within one minor unit of its exact
   share.
3. At most one term may be the *remainder party* (for example the merchant): its basis
   points are whatever the other terms leave of 10,000. Otherwise the basis points of all
   terms must sum to exactly 10,000.

Refunds are taken back from the parties in proportion to what each still holds of the
payment (its share minus what earlier refunds took back), again by largest remainder. So a
full refund returns every share exactly, and partial refunds, however many, never take more
from a party than it received.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from libs.money import MoneyError, allocate, check_amount, check_currency

BASIS_POINTS_TOTAL = 10_000
TERMS_MAX = 16

# The kinds of party, as named by citytap.common.v1.Party without the PARTY_ prefix.
PARTIES = ("MERCHANT", "TRANSIT_OPERATOR", "CITY", "PLATFORM")


@dataclass(frozen=True, slots=True)
class Term:
    """One party's terms: a fixed fee taken first, then basis points of the rest.

    `party_id` empty means "whichever merchant took the payment" (given to `split` as
    `merchant_id`); it is only allowed for the merchant. `remainder` marks the one party
    whose basis points are what the others leave of 10,000 (its own `basis_points` must be 0).
    """

    party: str
    party_id: str
    basis_points: int = 0
    fixed_fee_minor: int = 0
    remainder: bool = False


@dataclass(frozen=True, slots=True)
class SplitLine:
    """One party's share of one money movement, under the contract version that made it."""

    party: str
    party_id: str
    amount_minor: int
    currency: str
    contract_id: str
    contract_version: int


@dataclass(frozen=True, slots=True)
class ContractTerms:
    """The terms of one contract version, checked when made (see `check_terms`)."""

    contract_id: str
    version: int
    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        if not self.contract_id:
            raise MoneyError("INVALID_SPLIT", "a contract needs an id")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise MoneyError("INVALID_SPLIT", "a contract version is a whole number from 1")
        check_terms(self.terms)

    def effective_basis_points(self) -> list[int]:
        """Each term's basis points, with the remainder party's filled in."""
        named = sum(t.basis_points for t in self.terms if not t.remainder)
        return [BASIS_POINTS_TOTAL - named if t.remainder else t.basis_points for t in self.terms]


def check_terms(terms: Sequence[Term]) -> None:
    """Raise MoneyError(INVALID_SPLIT) unless `terms` form a valid contract."""
    if not terms:
        raise MoneyError("INVALID_SPLIT", "a contract needs at least one party")
    if len(terms) > TERMS_MAX:
        raise MoneyError("INVALID_SPLIT", f"a contract has at most {TERMS_MAX} parties")
    seen: set[tuple[str, str]] = set()
    remainders = 0
    named_bp = 0
    for index, term in enumerate(terms):
        where = f"term {index}"
        if term.party not in PARTIES:
            raise MoneyError("INVALID_SPLIT", f"{where}: party must be one of {', '.join(PARTIES)}, got {term.party!r}")
        if not term.party_id and term.party != "MERCHANT":
            raise MoneyError("INVALID_SPLIT", f"{where}: only the merchant may leave party_id empty")
        if (term.party, term.party_id) in seen:
            raise MoneyError("INVALID_SPLIT", f"{where}: {term.party} {term.party_id!r} appears twice")
        seen.add((term.party, term.party_id))
        for name, value in (("basis_points", term.basis_points), ("fixed_fee_minor", term.fixed_fee_minor)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise MoneyError("INVALID_SPLIT", f"{where}: {name} must be a whole number, zero or more")
        check_amount(term.fixed_fee_minor)
        if term.basis_points > BASIS_POINTS_TOTAL:
            raise MoneyError("INVALID_SPLIT", f"{where}: basis points are at most {BASIS_POINTS_TOTAL}")
        if term.remainder:
            remainders += 1
            if term.basis_points:
                raise MoneyError("INVALID_SPLIT", f"{where}: the remainder party's basis_points must be 0")
        else:
            named_bp += term.basis_points
    if remainders > 1:
        raise MoneyError("INVALID_SPLIT", "at most one party may take the remainder")
    if remainders == 0 and named_bp != BASIS_POINTS_TOTAL:
        raise MoneyError("INVALID_SPLIT", f"basis points must sum to {BASIS_POINTS_TOTAL}, got {named_bp}")
    if remainders == 1 and named_bp > BASIS_POINTS_TOTAL:
        raise MoneyError("INVALID_SPLIT", f"basis points of the named parties exceed {BASIS_POINTS_TOTAL}")


def split(contract: ContractTerms, amount_minor: int, currency: str, *, merchant_id: str = "") -> list[SplitLine]:
    """Share `amount_minor` (zero or more) among the contract's parties, in term order.

    The lines sum exactly to `amount_minor`. `merchant_id` fills a merchant term whose
    party_id is empty; it is required when the contract has one.
    """
    check_amount(amount_minor)
    check_currency(currency)
    if amount_minor < 0:
        raise MoneyError("INVALID_AMOUNT", "a payment to split is zero or more; refunds use split_refund")
    fees = []
    left = amount_minor
    for term in contract.terms:
        fee = min(term.fixed_fee_minor, left)
        fees.append(fee)
        left -= fee
    bps = contract.effective_basis_points()
    if sum(bps) == 0:  # every share is fixed fees: what is left goes to the first party
        shares = [left] + [0] * (len(bps) - 1)
    else:
        shares = allocate(left, bps)
    lines = []
    for term, fee, share in zip(contract.terms, fees, shares):
        party_id = term.party_id
        if not party_id:
            if not merchant_id:
                raise MoneyError("INVALID_SPLIT", "the contract shares with the paying merchant: merchant_id is required")
            party_id = merchant_id
        lines.append(SplitLine(term.party, party_id, fee + share, currency, contract.contract_id, contract.version))
    return lines


def split_refund(original: Sequence[SplitLine], refund_minor: int,
                 already_refunded: Iterable[Sequence[SplitLine]] = ()) -> list[SplitLine]:
    """The lines taking `refund_minor` back from the parties of `original`.

    Each party gives back in proportion to what it still holds: its original share minus
    what the `already_refunded` line lists (earlier refunds of the same payment, each in
    `original`'s order) took back. Raises MoneyError(INVALID_AMOUNT) when the refund is not
    positive or is more than what remains of the payment.
    """
    check_amount(refund_minor)
    if not original:
        raise MoneyError("INVALID_SPLIT", "the payment has no split lines to refund")
    remaining = [line.amount_minor for line in original]
    for earlier in already_refunded:
        if len(earlier) != len(original):
            raise MoneyError("INVALID_SPLIT", "an earlier refund does not have the payment's parties")
        for index, line in enumerate(earlier):
            remaining[index] -= line.amount_minor
    if any(r < 0 for r in remaining):
        raise MoneyError("INVALID_SPLIT", "earlier refunds took back more than a party received")
    if refund_minor <= 0:
        raise MoneyError("INVALID_AMOUNT", "a refund is more than zero")
    if refund_minor > sum(remaining):
        raise MoneyError("INVALID_AMOUNT", f"the refund of {refund_minor} is more than the {sum(remaining)} left to refund")
    parts = allocate(refund_minor, remaining)
    return [SplitLine(o.party, o.party_id, part, o.currency, o.contract_id, o.contract_version)
            for o, part in zip(original, parts)]


@dataclass(frozen=True, slots=True)
class DatedVersion:
    """A contract version and the moment it takes effect (aware datetime)."""

    terms: ContractTerms
    effective_from: datetime


def version_at(versions: Iterable[DatedVersion], moment: datetime) -> DatedVersion | None:
    """The version in force at `moment`: the latest `effective_from` at or before it.

    A version takes effect exactly at its `effective_from`; None when none has yet."""
    if moment.tzinfo is None:
        raise ValueError("version_at needs an aware datetime")
    best: DatedVersion | None = None
    for dated in versions:
        if dated.effective_from <= moment and (best is None or dated.effective_from > best.effective_from
                                               or (dated.effective_from == best.effective_from
                                                   and dated.terms.version > best.terms.version)):
            best = dated
    return best
