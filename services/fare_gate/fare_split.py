"""How a fare is shared among the transit operator, the city and the platform, at the moment it
is charged (issue "City payment network": transit fares are split like merchant payments).

Every fare is paid from the rider to the operator's revenue account. `FareSplitter.plan`
turns it into:

- the fare's split lines, computed with `libs.splits` under the REVENUE_KIND_TRANSIT_FARE
  contract version in force at that moment (the operator's own contract, else the kind's
  default), recorded on the fare's transfer; and
- one linked transfer (kind REVENUE_SHARE) per line of a party other than the operator, from
  the operator's revenue to that party's account, posted in the same wallet transaction as
  the fare (PostHold's linked transfers, or a linked CreateTransfers batch). So the ledger
  itself holds each party's share, and the parts always sum to the fare.

A refund of an over-charged fare (a negative fare after a transfer discount) is split under
the version in force when the refund is made, and its linked transfers move each party's
part back to the operator's revenue before it goes to the rider. When versions change
between a fare and its refund, the give-backs follow the newer version; the amounts still sum
exactly to the refund.

Contracts come from the settlement service through `libs.contract_cache.ContractCache`,
which a worker refreshes in the background so the tap path reads a cached list. If no
version is known for the moment of a fare (settlement unreachable for longer than the cache
keeps a stale list, or no contract was ever made) the fare is posted unsplit: the whole
amount stays in the operator's revenue, the rider is never refused for it, and the gate logs
an error for each such fare so the back office can split it by a later correction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from libs import errors, splits
from libs.contract_cache import ScopedVersion, in_force
from libs.money import MoneyError

log = logging.getLogger("citytap.fare_gate.fare_split")
LOG_INTERVAL_S = 60.0  # an unsplit fare is logged at most this often per cause

# The parties a transit contract may name, and which of the wallet's accounts receives each.
OPERATOR = "TRANSIT_OPERATOR"


@dataclass(frozen=True, slots=True)
class ShareMove:
    """A linked transfer of one party's share (kind REVENUE_SHARE)."""

    transfer_id: str
    debit_account_id: str
    credit_account_id: str
    amount_minor: int


@dataclass(frozen=True, slots=True)
class FarePlan:
    """The split lines of one fare (or refund) and the share moves that go with it."""

    lines: tuple[splits.SplitLine, ...]
    moves: tuple[ShareMove, ...]


class FareSplitter:
    """Plans fare splits from the contract versions `versions()` returns (a cache)."""

    def __init__(self, versions: Callable[[], Sequence[ScopedVersion] | None], *, operator_id: str, currency: str,
                 revenue_account_id: str, party_accounts: dict[str, str],
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._versions = versions  # None: no list is known (settlement never answered, or too long ago)
        self._monotonic = monotonic
        self._last_logged: dict[str, float] = {}
        self.unsplit = 0  # fares posted unsplit since start
        self._operator_id = operator_id
        self._currency = currency
        self._revenue = revenue_account_id
        self._accounts = dict(party_accounts)  # party ("CITY", "PLATFORM") -> wallet account id

    def contracts_known(self) -> bool:
        """Whether a contract list is at hand (fetched, and not too long ago)."""
        try:
            return self._versions() is not None
        except errors.CityTapError:
            return False

    def plan(self, transfer_id: str, amount_minor: int, moment: datetime, *, refund: bool = False) -> FarePlan | None:
        """The plan for a fare of `amount_minor` (> 0) charged at `moment` under the transfer id
        `transfer_id`; with `refund`, for giving that much back. None: post it unsplit (logged)."""
        try:
            versions = self._versions()
        except errors.CityTapError as exc:
            return self._unsplit("the split contracts are not available", transfer_id=transfer_id, reason=exc.reason)
        if versions is None:
            return self._unsplit("the split contracts are not available", transfer_id=transfer_id,
                                 reason="NOT_FETCHED")
        version = in_force(versions, (self._operator_id, ""), moment)
        if version is None:
            return self._unsplit("no transit-fare contract is in force", transfer_id=transfer_id,
                                 operator_id=self._operator_id, at=moment.isoformat())
        try:
            lines = splits.split(version.terms, amount_minor, self._currency)
            moves = []
            for number, line in enumerate(lines):
                if line.amount_minor == 0 or (line.party == OPERATOR and line.party_id == self._operator_id):
                    continue
                account = self._accounts.get(line.party)
                if account is None:
                    raise MoneyError("INVALID_SPLIT", f"a transit contract cannot pay {line.party} {line.party_id}")
                move_id = f"{transfer_id}:share:{number}"
                moves.append(ShareMove(move_id, account, self._revenue, line.amount_minor) if refund
                             else ShareMove(move_id, self._revenue, account, line.amount_minor))
        except MoneyError as exc:
            return self._unsplit("its contract cannot be applied", transfer_id=transfer_id,
                                 contract_id=version.terms.contract_id, version=version.terms.version,
                                 error=exc.message)
        return FarePlan(tuple(lines), tuple(moves))

    def _unsplit(self, why: str, **fields: object) -> None:
        """Count a fare posted unsplit; log it at most once a minute per cause, with the count."""
        self.unsplit += 1
        now = self._monotonic()
        if now - self._last_logged.get(why, -LOG_INTERVAL_S) >= LOG_INTERVAL_S:
            self._last_logged[why] = now
            log.error(f"fare posted unsplit: {why}", extra={"fields": {**fields, "unsplit_since_start": self.unsplit}})
        return None
