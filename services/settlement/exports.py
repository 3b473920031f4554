"""The complete export: accounts, ledger, contracts and settlement, in open formats.

For audit, and so the city can leave the partnership with all of its data: every table is
written as CSV (UTF-8, header row, amounts in integer minor units, times in ISO 8601 UTC) or
Apache Parquet, beside a `datapackage.json` that describes every table and column in the
Frictionless Data Package / Table Schema format. Accounts and the ledger come from the
wallet's read-only ListAccounts and ListTransfers RPCs (settlement never reads the wallet's
tables); the rest from settlement's own schema.

An export is idempotent on its client-generated `export_id`: the same id with the same
request returns the original files; with another request it is refused with
IDEMPOTENCY_CONFLICT. Files go to `<export dir>/<export_id>/`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from citytap.settlement.v1 import settlement_pb2
from citytap.wallet.v1 import wallet_pb2
from libs import errors
from services.settlement.domain import ID_PATTERN, ServiceDayClock, parse_day

FETCH_ROWS = 10_000

# (name, Table Schema type, description)
Column = tuple[str, str, str]


@dataclass(frozen=True)
class Table:
    name: str
    description: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]


TABLES = {
    "accounts": Table("accounts", "Every account of the ledger with its posted balance when exported.", (
        ("account_id", "string", "The account's id."),
        ("kind", "string", "RIDER_WALLET, OPERATOR_REVENUE, CITY_REVENUE, PLATFORM_FEES, MERCHANT_PAYABLE, "
                           "STRIPE_CLEARING or SUSPENSE."),
        ("status", "string", "ACTIVE or BLOCKED."),
        ("currency", "string", "ISO 4217 code of the account's currency."),
        ("owner_id", "string", "The merchant owning a merchant payable account; empty otherwise."),
        ("rider_category", "string", "The GTFS-Fares rider category of a rider wallet; empty means the default."),
        ("floor_minor", "integer", "Lowest balance allowed, in minor units; empty when there is none."),
        ("balance_minor", "integer", "Posted balance in minor units: credits minus debits."),
        ("created_at", "datetime", "When the account was opened (UTC)."),
    ), ("account_id",)),
    "transfers": Table("transfers", "Every posted transfer of the double-entry ledger; transfers never change.", (
        ("transfer_id", "string", "The transfer's client-generated id."),
        ("debit_account_id", "string", "The account the amount left."),
        ("credit_account_id", "string", "The account the amount entered."),
        ("amount_minor", "integer", "The amount moved, in minor units, always positive."),
        ("currency", "string", "ISO 4217 code."),
        ("kind", "string", "FARE, MERCHANT_PAYMENT, MERCHANT_REFUND, TOP_UP, TOP_UP_REFUND, CORRECTION, PAYOUT or FEE."),
        ("hold_id", "string", "The hold this transfer posted; empty when none."),
        ("corrects_transfer_id", "string", "The transfer this one corrects or refunds; empty when none."),
        ("reference", "string", "The caller's reference, such as a journey or order id."),
        ("posted_at", "datetime", "When the ledger posted it (UTC)."),
    ), ("transfer_id",)),
    "transfer_splits": Table("transfer_splits", "The split lines recorded with each transfer when it was posted.", (
        ("transfer_id", "string", "The transfer split."),
        ("line_no", "integer", "The line's position within the transfer, from 0."),
        ("party", "string", "MERCHANT, TRANSIT_OPERATOR, CITY or PLATFORM."),
        ("party_id", "string", "The receiving party's id."),
        ("amount_minor", "integer", "The party's share in minor units; the lines of a transfer sum to its amount."),
        ("currency", "string", "ISO 4217 code."),
        ("contract_id", "string", "The split contract the share was computed under."),
        ("contract_version", "integer", "The version of that contract in force at the time."),
    ), ("transfer_id", "line_no")),
    "contracts": Table("contracts", "Every version of every split contract; versions never change.", (
        ("contract_id", "string", "The contract's id, stable across versions."),
        ("version", "integer", "The version number, from 1."),
        ("revenue_kind", "string", "TRANSIT_FARE or MERCHANT_PAYMENT."),
        ("scope", "string", "Operator id for fares, merchant category code for merchant payments, empty for the "
                            "default."),
        ("effective_from", "datetime", "When the version took or takes effect (UTC)."),
        ("currency", "string", "Currency of the fixed fees."),
        ("note", "string", "Why the version was made."),
        ("created_at", "datetime", "When the version was recorded (UTC)."),
    ), ("contract_id", "version")),
    "contract_terms": Table("contract_terms", "The parties' terms of each contract version, in order.", (
        ("contract_id", "string", "The contract."),
        ("version", "integer", "The version."),
        ("term_no", "integer", "The term's position, from 0; fixed fees are taken in this order."),
        ("party", "string", "MERCHANT, TRANSIT_OPERATOR, CITY or PLATFORM."),
        ("party_id", "string", "The party's id; empty for the merchant means the paying merchant."),
        ("basis_points", "integer", "Share of what remains after fixed fees, in 1/100 of a percent."),
        ("fixed_fee_minor", "integer", "Fixed amount taken first from each movement, in minor units."),
        ("remainder", "boolean", "True for the party taking what the others' basis points leave of 10000."),
    ), ("contract_id", "version", "term_no")),
    "settlement_lines": Table("settlement_lines", "Each party's share of each money movement, by service day.", (
        ("transfer_id", "string", "The wallet transfer the share comes from."),
        ("line_no", "integer", "The split line's position within the transfer."),
        ("service_day", "date", "The service day the movement happened in (04:30 to 04:29 local time)."),
        ("settle_day", "date", "The service day it was paid with (later when it arrived after its day closed)."),
        ("source_event_id", "string", "The event it was learned from."),
        ("revenue_kind", "string", "TRANSIT_FARE or MERCHANT_PAYMENT."),
        ("transfer_kind", "string", "The wallet transfer's kind."),
        ("occurred_at", "datetime", "When the movement happened (UTC)."),
        ("gross_minor", "integer", "The whole movement in minor units; negative for refunds and corrections."),
        ("party", "string", "MERCHANT, TRANSIT_OPERATOR, CITY or PLATFORM."),
        ("party_id", "string", "The party's id."),
        ("amount_minor", "integer", "The party's share in minor units; negative when taken back."),
        ("currency", "string", "ISO 4217 code."),
        ("contract_id", "string", "The contract the share was computed under."),
        ("contract_version", "integer", "Its version."),
    ), ("transfer_id", "line_no")),
    "service_days": Table("service_days", "Service days and whether they are closed.", (
        ("service_day", "date", "The day."),
        ("status", "string", "OPEN, CLOSING or CLOSED."),
        ("closed_at", "datetime", "When it was closed (UTC)."),
        ("line_count", "integer", "How many settlement lines it settled."),
    ), ("service_day",)),
    "day_totals": Table("day_totals", "Each party's settlement per closed day: lines + carried in = paid + carried "
                                      "out.", (
        ("service_day", "date", "The day."),
        ("party", "string", "The kind of party."),
        ("party_id", "string", "The party's id."),
        ("currency", "string", "ISO 4217 code."),
        ("lines_minor", "integer", "Sum of the party's lines that day."),
        ("line_count", "integer", "How many lines."),
        ("gross_minor", "integer", "Sum of the gross of the movements it shared in."),
        ("carry_in_minor", "integer", "Carried in from its last closed day."),
        ("paid_minor", "integer", "Paid out (or, for the platform, kept)."),
        ("carry_out_minor", "integer", "Carried to its next closed day."),
    ), ("service_day", "party", "party_id")),
    "payouts": Table("payouts", "Payouts to parties through Stripe transfers.", (
        ("payout_id", "string", "The settlement batch id, also the Stripe idempotency key."),
        ("service_day", "date", "The day paid for."),
        ("party", "string", "The kind of party."),
        ("party_id", "string", "The party's id."),
        ("amount_minor", "integer", "The amount paid, in minor units."),
        ("currency", "string", "ISO 4217 code."),
        ("stripe_account_id", "string", "The connected account paid."),
        ("status", "string", "PENDING or SENT."),
        ("stripe_id", "string", "The Stripe transfer id."),
        ("created_at", "datetime", "When the payout was recorded (UTC)."),
    ), ("payout_id",)),
    "reconciliations": Table("reconciliations", "Reconciliation runs.", (
        ("reconciliation_id", "string", "The run's id."),
        ("service_day", "date", "The day reconciled."),
        ("report_sha256", "string", "SHA-256 of the provider report file used."),
        ("matched_count", "integer", "Movements that agreed on every side."),
        ("difference_count", "integer", "Differences found."),
        ("unexplained_count", "integer", "Differences without a known cause."),
        ("created_at", "datetime", "When the run finished (UTC)."),
    ), ("reconciliation_id",)),
    "reconciliation_differences": Table("reconciliation_differences", "Every difference of every run, with its cause.", (
        ("reconciliation_id", "string", "The run."),
        ("n", "integer", "The difference's position in the run."),
        ("kind", "string", "MISSING_IN_LEDGER, MISSING_IN_SETTLEMENT, MISSING_AT_PROVIDER, AMOUNT_MISMATCH, "
                           "DUPLICATE or UNKNOWN_ID."),
        ("reference_id", "string", "The transfer, payout or Stripe id concerned."),
        ("ledger_minor", "integer", "The ledger's amount; empty when the ledger lacks it."),
        ("settlement_minor", "integer", "Settlement's amount; empty when settlement lacks it."),
        ("provider_minor", "integer", "The provider's amount; empty when the provider lacks it."),
        ("currency", "string", "ISO 4217 code."),
        ("cause", "string", "The cause, in words."),
        ("explained", "boolean", "True when the cause is known and expected."),
    ), ("reconciliation_id", "n")),
}


def _cell(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def _ts(message: Any, field: str) -> datetime | None:
    return getattr(message, field).ToDatetime(tzinfo=timezone.utc) if message.HasField(field) else None


class Exporter:
    """The Export use case."""

    def __init__(self, pool: ConnectionPool, *, schema: str, export_dir: str, days: ServiceDayClock,
                 ledger_reader: Any, clock: Callable[[], datetime]) -> None:
        self._pool = pool
        self._schema = schema
        self._dir = Path(export_dir)
        self._days = days
        self._ledger = ledger_reader
        self._clock = clock

    def export_pb(self, request: settlement_pb2.ExportRequest) -> settlement_pb2.ExportResponse:
        if not ID_PATTERN.match(request.export_id):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "export_id must be a client-generated UUID (1-64 letters, "
                                                             "digits, '.', '_', ':' or '-')", field="export_id")
        fmt = {settlement_pb2.EXPORT_FORMAT_CSV: "csv", settlement_pb2.EXPORT_FORMAT_PARQUET: "parquet"}.get(
            request.format)
        if fmt is None:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "format must be CSV or PARQUET", field="format")
        through = parse_day(request.through_service_day, "through_service_day") if request.through_service_day else None
        fingerprint = hashlib.sha256(f"{fmt}|{request.through_service_day}".encode()).digest()
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT request_hash, result FROM {self._schema}.exports WHERE export_id = %s",
                               (request.export_id,)).fetchone()
        if row is not None:
            if bytes(row[0]) != fingerprint:
                raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"export {request.export_id} was made with another "
                                                              "format or day", field="export_id")
            return settlement_pb2.ExportResponse.FromString(bytes(row[1]))
        if fmt == "parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise errors.FailedPrecondition("INVALID_STATE", "Parquet needs the pyarrow package, which is not "
                                                                 "installed here; export as CSV") from None
        response = self._write(request.export_id, fmt, through)
        with self._pool.connection() as conn:
            conn.execute(f"INSERT INTO {self._schema}.exports (export_id, request_hash, result, created_at) VALUES "
                         "(%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (request.export_id, fingerprint, response.SerializeToString(), self._clock()))
            stored = conn.execute(f"SELECT result FROM {self._schema}.exports WHERE export_id = %s",
                                  (request.export_id,)).fetchone()
        return settlement_pb2.ExportResponse.FromString(bytes(stored[0]))

    # --- writing --------------------------------------------------------------------------------

    def _write(self, export_id: str, fmt: str, through: date | None) -> settlement_pb2.ExportResponse:
        s = self._schema
        with self._pool.connection() as conn:
            last_closed = conn.execute(f"SELECT max(service_day) FROM {s}.service_days WHERE status = 'CLOSED'"
                                       ).fetchone()[0]
        through = through or last_closed
        ledger_end = self._days.bounds(through)[1] if through else None
        day_limit = through or date(1, 1, 1)
        folder = self._dir / export_id
        tmp = self._dir / f".{export_id}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        files = []
        sources: list[tuple[str, Iterable[tuple]]] = [
            ("accounts", self._accounts()),
            ("transfers", self._transfers(ledger_end, with_splits=False)),
            ("transfer_splits", self._transfers(ledger_end, with_splits=True)),
            ("contracts", self._query(f"SELECT contract_id, version, revenue_kind, scope, effective_from, currency, note,"
                                      f" created_at FROM {s}.contracts ORDER BY contract_id, version")),
            ("contract_terms", self._contract_terms()),
            ("settlement_lines", self._query(
                f"SELECT transfer_id, line_no, service_day, settle_day, source_event_id, revenue_kind, transfer_kind, "
                f"occurred_at, gross_minor, party, party_id, amount_minor, currency, contract_id, contract_version "
                f"FROM {s}.settlement_lines WHERE settle_day <= %s ORDER BY settle_day, transfer_id, line_no",
                (day_limit,))),
            ("service_days", self._query(f"SELECT service_day, status, closed_at, line_count FROM {s}.service_days "
                                         "WHERE service_day <= %s ORDER BY service_day", (day_limit,))),
            ("day_totals", self._query(
                f"SELECT service_day, party, party_id, currency, lines_minor, line_count, gross_minor, carry_in_minor,"
                f" paid_minor, carry_out_minor FROM {s}.day_totals WHERE service_day <= %s "
                "ORDER BY service_day, party, party_id", (day_limit,))),
            ("payouts", self._query(
                f"SELECT payout_id, service_day, party, party_id, amount_minor, currency, stripe_account_id, status, "
                f"stripe_id, created_at FROM {s}.payouts WHERE service_day <= %s ORDER BY service_day, payout_id",
                (day_limit,))),
            ("reconciliations", self._query(
                f"SELECT reconciliation_id, service_day, report_sha256, matched_count, difference_count, "
                f"unexplained_count, created_at FROM {s}.reconciliations WHERE service_day <= %s "
                "ORDER BY created_at, reconciliation_id", (day_limit,))),
            ("reconciliation_differences", self._query(
                f"SELECT d.reconciliation_id, d.n, d.kind, d.reference_id, d.ledger_minor, d.settlement_minor, "
                f"d.provider_minor, d.currency, d.cause, d.explained FROM {s}.reconciliation_differences d JOIN "
                f"{s}.reconciliations r USING (reconciliation_id) WHERE r.service_day <= %s "
                "ORDER BY r.created_at, d.reconciliation_id, d.n", (day_limit,))),
        ]
        resources = []
        for name, rows in sources:
            table = TABLES[name]
            path = tmp / f"{name}.{fmt}"
            count = _write_csv(path, table, rows) if fmt == "csv" else _write_parquet(path, table, rows)
            digest = _sha256(path)
            rel = f"{export_id}/{name}.{fmt}"
            files.append(settlement_pb2.ExportFile(table=name, path=rel, row_count=count, sha256=digest))
            resources.append(_resource(table, f"{name}.{fmt}", fmt, count, digest))
        package = {
            "profile": "tabular-data-package", "name": f"citytap-export-{export_id}".lower(),
            "title": "CityTap complete export: accounts, ledger, contracts and settlement",
            "created": self._clock().isoformat(),
            "description": ("Amounts are integers in ISO 4217 minor units; times are ISO 8601 in UTC; service days run "
                            "04:30 to 04:29 local time and are named by the date they start on. "
                            + (f"Settlement through service day {through.isoformat()}." if through else
                               "No service day was closed yet.")),
            "resources": resources,
        }
        (tmp / "datapackage.json").write_text(json.dumps(package, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.replace(folder)
        return settlement_pb2.ExportResponse(export_id=export_id, files=files, schema_path=f"{export_id}/datapackage.json")

    def _query(self, sql: str, params: tuple = ()) -> Iterator[tuple]:
        with self._pool.connection() as conn, conn.transaction():
            with conn.cursor(name="citytap_export") as cursor:
                cursor.itersize = FETCH_ROWS
                cursor.execute(sql, params)
                yield from cursor

    def _contract_terms(self) -> Iterator[tuple]:
        for contract_id, version, terms in self._query(f"SELECT contract_id, version, terms FROM "
                                                       f"{self._schema}.contracts ORDER BY contract_id, version"):
            rows = terms if isinstance(terms, list) else json.loads(terms)
            for n, t in enumerate(rows):
                yield (contract_id, version, n, t["party"], t["party_id"], t["basis_points"], t["fixed_fee_minor"],
                       t["remainder"])

    def _accounts(self) -> Iterator[tuple]:
        for entry in self._ledger.accounts():
            a = entry.account
            yield (a.account_id, wallet_pb2.AccountKind.Name(a.kind).removeprefix("ACCOUNT_KIND_"),
                   wallet_pb2.AccountStatus.Name(a.status).removeprefix("ACCOUNT_STATUS_"), a.currency, a.owner_id,
                   a.rider_category, a.floor.amount_minor if a.HasField("floor") else None,
                   entry.balance.amount_minor, _ts(a, "created_at"))

    def _transfers(self, end: datetime | None, *, with_splits: bool) -> Iterator[tuple]:
        for t in self._ledger.transfer_messages(None, end):
            if with_splits:
                for n, line in enumerate(t.splits):
                    party = line.party
                    yield (t.transfer_id, n, _party(party), line.party_id, line.amount.amount_minor,
                           line.amount.currency, line.contract_id, line.contract_version)
            else:
                yield (t.transfer_id, t.debit_account_id, t.credit_account_id, t.amount.amount_minor, t.amount.currency,
                       wallet_pb2.TransferKind.Name(t.kind).removeprefix("TRANSFER_KIND_"), t.hold_id,
                       t.corrects_transfer_id, t.reference, _ts(t, "posted_at"))


def _party(value: int) -> str:
    from citytap.common.v1 import split_pb2

    return split_pb2.Party.Name(value).removeprefix("PARTY_")


def _write_csv(path: Path, table: Table, rows: Iterable[tuple]) -> int:
    count = 0
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c[0] for c in table.columns])
        for row in rows:
            writer.writerow(["" if v is None else _cell(v) for v in row])
            count += 1
    return count


def _write_parquet(path: Path, table: Table, rows: Iterable[tuple]) -> int:
    import pyarrow as pa
    from pyarrow import parquet

    types = {"string": pa.string(), "integer": pa.int64(), "boolean": pa.bool_(),
             "datetime": pa.timestamp("us", tz="UTC"), "date": pa.date32()}
    schema = pa.schema([pa.field(name, types[kind]) for name, kind, _ in table.columns])
    count = 0
    with parquet.ParquetWriter(path, schema) as writer:
        batch: list[tuple] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= FETCH_ROWS:
                writer.write_table(pa.Table.from_pylist([dict(zip(schema.names, r)) for r in batch], schema=schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(pa.Table.from_pylist([dict(zip(schema.names, r)) for r in batch], schema=schema))
            count += len(batch)
    return count


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resource(table: Table, path: str, fmt: str, count: int, digest: str) -> dict:
    resource: dict[str, Any] = {
        "name": table.name, "path": path, "profile": "tabular-data-resource", "description": table.description,
        "format": fmt, "hash": f"sha256:{digest}", "rows": count,
        "schema": {"fields": [{"name": n, "type": t, "description": d} for n, t, d in table.columns],
                   "primaryKey": list(table.primary_key)},
    }
    if fmt == "csv":
        resource.update(mediatype="text/csv", encoding="utf-8")
    else:
        resource.update(mediatype="application/vnd.apache.parquet")
    return resource
