"""Split contracts: versioned, effective-dated and immutable, kept in PostgreSQL.

A contract covers one revenue kind and scope (fares of one transit operator; merchant
payments of one merchant category, or the default of the kind). Version 1 claims the kind and
scope; later versions must follow one by one, keep the kind and scope, and take effect after
the previous version and at least the configured lead time after they are made, so the
services that cache contracts (merchant, fare gate) pick a version up before it applies and a
recorded split never changes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool

from libs import errors
from libs.splits import Term
from services.settlement.domain import ContractVersion, NewContractVersion, check_new_version, terms_from_json, \
    terms_to_json

PAGE_SIZE_DEFAULT = 50
PAGE_SIZE_MAX = 100
_COLUMNS = "contract_id, version, revenue_kind, scope, effective_from, terms, currency, note, created_at, request_hash"


def _row(row: tuple) -> ContractVersion:
    terms = row[5] if isinstance(row[5], list) else json.loads(row[5])
    return ContractVersion(row[0], row[1], row[2], row[3], row[4], terms_from_json(terms), row[6], row[7], row[8])


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _offset(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if not text.startswith("o:"):
            raise ValueError
        offset = int(text[2:])
        if offset < 0:
            raise ValueError
        return offset
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "page_token is not one this service gave out",
                                     field="page_token") from None


class Contracts:
    """The contract book over settlement's schema."""

    def __init__(self, pool: ConnectionPool, *, schema: str, lead_time_s: int, currency: str,
                 clock: Callable[[], datetime]) -> None:
        self._pool = pool
        self._schema = schema
        self._lead_time_s = lead_time_s
        self._currency = currency
        self._clock = clock

    @property
    def currency(self) -> str:
        return self._currency

    def create_version(self, request: NewContractVersion) -> ContractVersion:
        """Record `request`, or return the version already recorded under its id and number."""
        if request.currency != self._currency:
            raise errors.InvalidArgument("INVALID_CURRENCY", f"fixed fees are in {self._currency}",
                                         field="terms.fixed_fee")
        fingerprint = request.fingerprint()
        now = self._clock()
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute(f"SET LOCAL search_path TO {self._schema}")
                # Versions of one contract are made one at a time.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('citytap.contract.' || %s))", (request.contract_id,))
                existing = conn.execute(f"SELECT {_COLUMNS} FROM contracts WHERE contract_id = %s AND version = %s",
                                        (request.contract_id, request.version)).fetchone()
                if existing is not None:
                    if bytes(existing[9]) != fingerprint:
                        raise errors.Conflict("IDEMPOTENCY_CONFLICT",
                                              f"version {request.version} of contract {request.contract_id} "
                                              "already exists with other terms",
                                              field="version")
                    return _row(existing)
                check_new_version(request, now=now, lead_time_s=self._lead_time_s)
                latest = conn.execute(f"SELECT {_COLUMNS} FROM contracts WHERE contract_id = %s "
                                      "ORDER BY version DESC LIMIT 1", (request.contract_id,)).fetchone()
                self._check_follows(request, None if latest is None else _row(latest))
                conn.execute(
                    "INSERT INTO contracts (contract_id, version, revenue_kind, scope, effective_from, terms, currency,"
                    " note, request_hash, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (request.contract_id, request.version, request.revenue_kind, request.scope,
                     request.effective_from, json.dumps(terms_to_json(request.terms)), request.currency,
                     request.note, fingerprint, now))
        except pg_errors.UniqueViolation as exc:
            if "contracts_one_per_scope" in str(exc):
                raise errors.Conflict(
                    "CONTRACT_SCOPE_TAKEN",
                    f"another contract already covers {request.revenue_kind} scope {request.scope!r}; "
                    "make a new version of it instead", field="scope") from None
            raise
        return ContractVersion(request.contract_id, request.version, request.revenue_kind, request.scope,
                               request.effective_from, request.terms, request.currency, request.note, now)

    def seed_initial(self, requests: Sequence[NewContractVersion]) -> int:
        """Record the partnership's initial contracts into an EMPTY contract book, each taking
        effect when it says (even in the past), and return how many were recorded; a book that
        already holds any version is left as it is and 0 is returned.

        The lead time exists so that services caching contracts learn of a version before it
        applies. At go-live (the first start of settlement on a new database) no service has
        split anything yet, so there is nothing a backdated first version could disagree with.
        Every other check of CreateContractVersion applies, and the versions go in as one
        transaction or not at all."""
        now = self._clock()
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(f"SET LOCAL search_path TO {self._schema}")
            conn.execute("LOCK TABLE contracts IN EXCLUSIVE MODE")
            if conn.execute("SELECT EXISTS (SELECT 1 FROM contracts)").fetchone()[0]:
                return 0
            latest: dict[str, ContractVersion] = {}
            for request in requests:
                if request.currency != self._currency:
                    raise errors.InvalidArgument("INVALID_CURRENCY", f"fixed fees are in {self._currency}",
                                                 field="terms.fixed_fee", contract_id=request.contract_id)
                check_new_version(request, now=now, lead_time_s=self._lead_time_s, initial=True)
                self._check_follows(request, latest.get(request.contract_id))
                conn.execute(
                    "INSERT INTO contracts (contract_id, version, revenue_kind, scope, effective_from, terms, currency,"
                    " note, request_hash, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (request.contract_id, request.version, request.revenue_kind, request.scope,
                     request.effective_from, json.dumps(terms_to_json(request.terms)), request.currency,
                     request.note, request.fingerprint(), now))
                latest[request.contract_id] = ContractVersion(
                    request.contract_id, request.version, request.revenue_kind, request.scope, request.effective_from,
                    request.terms, request.currency, request.note, now)
        return len(requests)

    @staticmethod
    def _check_follows(request: NewContractVersion, latest: ContractVersion | None) -> None:
        expected = 1 if latest is None else latest.version + 1
        if request.version != expected:
            raise errors.InvalidArgument("INVALID_ARGUMENT",
                                         f"the next version of contract {request.contract_id} is {expected}",
                                         field="version", expected=str(expected))
        if latest is None:
            return
        if (request.revenue_kind, request.scope) != (latest.revenue_kind, latest.scope):
            raise errors.InvalidArgument("INVALID_ARGUMENT",
                                         f"contract {request.contract_id} covers {latest.revenue_kind} scope "
                                         f"{latest.scope!r}; its kind and scope never change", field="scope")
        if request.effective_from <= latest.effective_from:
            raise errors.InvalidArgument("EFFECTIVE_TOO_SOON",
                                         f"version {request.version} must take effect after version {latest.version} "
                                         f"({latest.effective_from.isoformat()})", field="effective_from")

    def list_versions(self, *, contract_id: str = "", revenue_kind: str = "", scope: str | None = None,
                      page_size: int = 0, page_token: str = "") -> tuple[list[ContractVersion], str]:
        """Versions newest first (by creation, then version), filtered, one page."""
        if page_size < 0 or page_size > PAGE_SIZE_MAX:
            raise errors.InvalidArgument("INVALID_ARGUMENT", f"page_size is 1 to {PAGE_SIZE_MAX}, or 0 for "
                                         f"{PAGE_SIZE_DEFAULT}", field="page_size")
        size = page_size or PAGE_SIZE_DEFAULT
        offset = _offset(page_token)
        where, params = [], []
        if contract_id:
            where.append("contract_id = %s")
            params.append(contract_id)
        if revenue_kind:
            where.append("revenue_kind = %s")
            params.append(revenue_kind)
        if scope is not None:
            where.append("scope = %s")
            params.append(scope)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        with self._pool.connection() as conn:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM {self._schema}.contracts {clause} "
                "ORDER BY created_at DESC, contract_id, version DESC LIMIT %s OFFSET %s",
                (*params, size + 1, offset)).fetchall()
        token = _page_token(offset + size) if len(rows) > size else ""
        return [_row(r) for r in rows[:size]], token

    def all_versions(self, conn: psycopg.Connection | None = None) -> list[ContractVersion]:
        """Every version (few: one per contract change), for exports and kind lookups."""
        query = f"SELECT {_COLUMNS} FROM {self._schema}.contracts ORDER BY contract_id, version"
        if conn is not None:
            return [_row(r) for r in conn.execute(query).fetchall()]
        with self._pool.connection() as own:
            return [_row(r) for r in own.execute(query).fetchall()]


def load_initial(path: Path, *, currency: str) -> list[NewContractVersion]:
    """The contract versions of an initial-contracts file; ValueError naming every problem.

    The file is a JSON list of versions: {"contract_id", "version", "revenue_kind"
    (TRANSIT_FARE or MERCHANT_PAYMENT), "scope", "effective_from" (ISO 8601 with a UTC offset),
    "note", "terms": [{"party", "party_id", "basis_points", "fixed_fee_minor", "remainder"}]}.
    Fixed fees are in the settlement currency."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable JSON file: {exc}") from exc
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of contract versions")
    found, problems = [], []
    for index, row in enumerate(rows):
        try:
            effective_from = datetime.fromisoformat(row["effective_from"])
            if effective_from.tzinfo is None:
                raise ValueError("effective_from needs a UTC offset")
            terms = tuple(Term(t["party"], t.get("party_id", ""), int(t.get("basis_points", 0)),
                               int(t.get("fixed_fee_minor", 0)), bool(t.get("remainder", False)))
                          for t in row["terms"])
            found.append(NewContractVersion(
                contract_id=str(row["contract_id"]), version=int(row["version"]), revenue_kind=str(row["revenue_kind"]),
                scope=str(row.get("scope", "")), effective_from=effective_from, terms=terms, currency=currency,
                note=str(row.get("note", ""))))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problems.append(f"{path}: version {index}: {type(exc).__name__}: {exc}")
    if problems:
        raise ValueError("\n".join(problems))
    return found
