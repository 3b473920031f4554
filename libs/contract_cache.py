"""Split contracts of one revenue kind, fetched from the settlement service and cached.

The settlement service owns the contracts (versioned, effective-dated, immutable). The
services that move money (the fare gate for fares, the merchant service for purchases) split
each payment under the version in force at that moment, with `libs.splits`. This module
lists every version of one revenue kind through `SettlementService.ListContracts` (all pages,
bounded), turns them into `libs.splits` terms, and keeps the list for `ttl_s` seconds. The
cache is safe because a new version can only take effect after settlement's lead time
(longer than the TTL), so a cached list already holds every version that can be in force
while it is used; the choice of version for a given moment (`in_force`) is made per payment.

A version whose terms cannot be applied (settlement validates them, so this is a fault) fails
the fetch with NO_SPLIT_CONTRACT rather than being skipped, which could let an older version
split a payment. If settlement cannot be reached, a list fetched within the last
`stale_s_max` seconds is still used (versions never change once made); with nothing that
recent the fetch raises UNAVAILABLE and the caller decides (a merchant charge is refused and
retried; a fare is posted unsplit, see services/fare_gate/fare_split.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import grpc

from citytap.common.v1 import split_pb2
from citytap.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from libs import errors, splits
from libs.money import MoneyError
from libs.settings import non_negative_int

log = logging.getLogger("citytap.contracts")

PAGE_SIZE = 100
PAGES_MAX = 20  # 2,000 versions: far more than one kind of revenue ever needs
STALE_S_MAX = 3600.0
# A contract version takes effect at least the settlement service's lead time after it is made;
# a cache that lived longer than that could miss a version already in force.
CONTRACT_CACHE_TTL_S_MAX = 300


def cache_ttl_s(text: str) -> int:
    """Setting parser: seconds a fetched contract list is reused, 0 (never) up to CONTRACT_CACHE_TTL_S_MAX."""
    value = non_negative_int(text)
    if value > CONTRACT_CACHE_TTL_S_MAX:
        raise ValueError(f"expected at most {CONTRACT_CACHE_TTL_S_MAX} seconds (contracts take effect after a lead time)")
    return value


@dataclass(frozen=True, slots=True)
class ScopedVersion:
    """A contract version with the scope it covers (an operator id, a merchant category, or
    "" for the kind's default contract)."""

    scope: str
    dated: splits.DatedVersion


def terms_of(version: settlement_pb2.ContractVersion, currency: str) -> splits.ContractTerms:
    terms = []
    for term in version.terms:
        fee = term.fixed_fee.amount_minor if term.HasField("fixed_fee") else 0
        if fee and term.fixed_fee.currency != currency:
            raise MoneyError("INVALID_SPLIT", f"a fixed fee in {term.fixed_fee.currency}, not {currency}")
        terms.append(splits.Term(party=split_pb2.Party.Name(term.party).removeprefix("PARTY_"), party_id=term.party_id,
                                 basis_points=term.basis_points, fixed_fee_minor=fee, remainder=term.remainder))
    return splits.ContractTerms(version.contract_id, version.version, tuple(terms))


def to_scoped(version: settlement_pb2.ContractVersion, currency: str) -> ScopedVersion:
    effective_from = version.effective_from.ToDatetime(tzinfo=timezone.utc)
    return ScopedVersion(version.scope, splits.DatedVersion(terms_of(version, currency), effective_from))


def in_force(versions: Iterable[ScopedVersion], scopes: Sequence[str], moment: datetime) -> splits.DatedVersion | None:
    """The version in force at `moment` of the first of `scopes` that has one (a scope's own
    contract before the default's, say), or None."""
    listed = list(versions)
    for scope in scopes:
        found = splits.version_at([v.dated for v in listed if v.scope == scope], moment)
        if found is not None:
            return found
    return None


class ContractCache:
    """One revenue kind's contract versions from the settlement service, reused for `ttl_s`."""

    def __init__(self, channel: grpc.Channel, *, revenue_kind: int, currency: str, timeout_s: float, ttl_s: float,
                 stale_s_max: float = STALE_S_MAX, monotonic: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0 or ttl_s < 0:
            raise ValueError("timeout_s must be positive and ttl_s zero or more")
        self._stub = settlement_pb2_grpc.SettlementServiceStub(channel)
        self._revenue_kind = revenue_kind
        self._currency = currency
        self._timeout_s = timeout_s
        self._ttl_s = ttl_s
        self._stale_s_max = stale_s_max
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._versions: list[ScopedVersion] | None = None
        self._fetched_at = 0.0
        self.fetches = 0

    def versions(self, *, refresh: bool = False) -> list[ScopedVersion]:
        """The versions, fetched again when the cached list is older than the TTL or `refresh`."""
        with self._lock:
            now = self._monotonic()
            if not refresh and self._versions is not None and now - self._fetched_at < self._ttl_s:
                return self._versions
            try:
                self._versions = self._fetch()
                self._fetched_at = now
            except grpc.RpcError as exc:
                if self._versions is not None and now - self._fetched_at < self._stale_s_max:
                    log.warning("settlement unreachable; using contracts fetched earlier",
                                extra={"fields": {"age_s": round(now - self._fetched_at, 1), "code": exc.code().name}})
                    return self._versions
                raise errors.Unavailable("UNAVAILABLE", "the split contracts could not be fetched from settlement",
                                         dependency="settlement") from exc
            return self._versions

    def cached(self) -> list[ScopedVersion] | None:
        """The last fetched list without fetching (for a hot path kept fresh by a worker calling
        `versions(refresh=True)`): None when nothing was fetched within `stale_s_max`."""
        with self._lock:
            if self._versions is None or self._monotonic() - self._fetched_at >= self._stale_s_max:
                return None
            return self._versions

    def _fetch(self) -> list[ScopedVersion]:
        found: list[ScopedVersion] = []
        token = ""
        for _ in range(PAGES_MAX):
            answer = self._stub.ListContracts(settlement_pb2.ListContractsRequest(
                revenue_kind=self._revenue_kind, page_size=PAGE_SIZE, page_token=token),  # type: ignore[arg-type]
                timeout=self._timeout_s)
            for version in answer.contracts:
                try:
                    found.append(to_scoped(version, self._currency))
                except MoneyError as exc:
                    # Skipping it could let an older version split a payment this one governs.
                    log.error("split contract version unusable", extra={"fields": {
                        "contract_id": version.contract_id, "version": version.version, "error": str(exc)}})
                    raise errors.FailedPrecondition(
                        "NO_SPLIT_CONTRACT", f"split contract {version.contract_id} version {version.version} "
                        f"cannot be applied: {exc.message}", contract_id=version.contract_id) from exc
            token = answer.next_page_token
            if not token:
                break
        self.fetches += 1
        return found
