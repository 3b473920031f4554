"""Money as integer minor units, and largest-remainder allocation.

Money never touches a float: constructors refuse floats (and bools, which are ints in
Python), and allocation works in exact integer arithmetic so the parts of a split always sum
to the whole. `allocate` gives each party its exact share rounded down, then hands the
remaining minor units one each to the parties with the largest fractional remainders (ties
go to the earlier party, so the result is deterministic).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from libs.errors import InvalidArgument

# PostgreSQL bigint and protobuf int64 bound every amount we store or send.
AMOUNT_MINOR_MAX = 2**63 - 1

_CURRENCY = re.compile(r"^[A-Z]{3}$")


class MoneyError(InvalidArgument, ValueError):
    """An amount, currency or split that money cannot hold; `reason` is machine-readable.

    It is an `InvalidArgument`, so a handler that lets it escape answers INVALID_ARGUMENT
    with this reason rather than INTERNAL."""


def check_amount(amount_minor: object) -> int:
    """Return `amount_minor` if it is an int within int64, else raise MoneyError."""
    if isinstance(amount_minor, bool) or not isinstance(amount_minor, int):
        raise MoneyError("INVALID_AMOUNT", f"amount must be an integer number of minor units, got {type(amount_minor).__name__}")
    if not -AMOUNT_MINOR_MAX <= amount_minor <= AMOUNT_MINOR_MAX:
        raise MoneyError("INVALID_AMOUNT", "amount does not fit in a signed 64-bit integer")
    return amount_minor


def check_currency(currency: object) -> str:
    """Return `currency` if it is an upper-case ISO 4217 alphabetic code, else raise."""
    if not isinstance(currency, str) or not _CURRENCY.match(currency):
        raise MoneyError("INVALID_CURRENCY", f"currency must be a three-letter ISO 4217 code such as TWD, got {currency!r}")
    return currency


@dataclass(frozen=True, slots=True)
class Money:
    """An exact amount of one currency, in that currency's minor units."""

    amount_minor: int
    currency: str

    def __post_init__(self) -> None:
        check_amount(self.amount_minor)
        check_currency(self.currency)

    def __add__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount_minor + other.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same_currency(other)
        return Money(self.amount_minor - other.amount_minor, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount_minor, self.currency)

    def _same_currency(self, other: Money) -> None:
        if other.currency != self.currency:
            raise MoneyError("INVALID_CURRENCY", f"cannot combine {self.currency} with {other.currency}")

    def allocate(self, weights: Sequence[int]) -> list[Money]:
        """Split this amount in proportion to `weights`; see `allocate`."""
        return [Money(part, self.currency) for part in allocate(self.amount_minor, weights)]


def allocate(total_minor: int, weights: Sequence[int]) -> list[int]:
    """Split `total_minor` in proportion to integer `weights` by largest remainder.

    The parts always sum to `total_minor` and each part differs from its exact share
    `total_minor * w / sum(weights)` by less than one minor unit. Weights are non-negative
    integers (basis points, say) with a positive sum; a negative total is split as the
    mirror image of the positive one, so refunds split exactly like the charge they undo.
    """
    check_amount(total_minor)
    if not weights:
        raise MoneyError("INVALID_SPLIT", "a split needs at least one party")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise MoneyError("INVALID_SPLIT", f"split weights must be integers, got {type(weight).__name__}")
        if weight < 0:
            raise MoneyError("INVALID_SPLIT", "split weights must not be negative")
    weight_sum = sum(weights)
    if weight_sum == 0:
        raise MoneyError("INVALID_SPLIT", "split weights must not all be zero")
    if total_minor < 0:
        return [-part for part in allocate(-total_minor, weights)]
    floors = []
    remainders = []
    for index, weight in enumerate(weights):
        quotient, remainder = divmod(total_minor * weight, weight_sum)
        floors.append(quotient)
        remainders.append((remainder, -index))
    leftover = total_minor - sum(floors)
    # leftover < len(weights): each floor lost less than one unit.
    for _, neg_index in sorted(remainders, reverse=True)[:leftover]:
        floors[-neg_index] += 1
    return floors
