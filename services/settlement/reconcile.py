"""Three-way reconciliation of a closed service day: ledger, settlement lines, provider report.

The three sources and what each should hold for a day:

- **Ledger** (the wallet, through its read-only ListTransfers RPC): every transfer posted in
  the day's time range.
- **Settlement**: the lines filed for movements of that day (by `service_day`, the day they
  happened in), the Stripe movements learned from top-up events, and the day's payouts.
- **Provider**: the rows of Stripe's payout reconciliation report that finance staff import.

Which sources should agree on which movements:

| movement | ledger | settlement | provider | matched by |
|---|---|---|---|---|
| revenue with split lines (fares, merchant payments, refunds, corrections) | yes | lines | - | transfer id; amount = sum of the lines |
| top-up, top-up refund | yes | provider movement | `charge` / `refund` row | transfer id; Stripe PaymentIntent or refund id, or CityTap's id in the metadata |
| payout of the day | - | payout | `transfer` row | Stripe transfer id, or the payout id in the metadata |

Every disagreement is a `Difference` of one kind (missing in the ledger, missing in
settlement, missing at the provider, amount mismatch, duplicate, unknown id). A difference
is *explained* only when its cause is known and expected: a movement missing at the provider
that happened after the newest row of the report (the report was run before it; the next one
will hold it), or a top-up refund missing at the provider that the ledger reversed with a
correction because Stripe refused it. Everything else is unexplained, and a day is reconciled
only with zero unexplained differences.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from psycopg_pool import ConnectionPool

from citytap.settlement.v1 import events_pb2, settlement_pb2
from citytap.wallet.v1 import wallet_pb2
from libs import errors, outbox
from libs.protos import money_pb, timestamp_pb
from services.settlement.domain import ServiceDayClock, parse_day, signed
from services.settlement.provider_report import ProviderRow, parse

log = logging.getLogger("citytap.settlement.reconcile")

TOPIC = "citytap.settlement.v1.events"
PROVIDER_KINDS = {"TOP_UP": "charge", "TOP_UP_REFUND": "refund"}


@dataclass(frozen=True)
class LedgerTransfer:
    """A posted transfer as the ledger reports it."""

    transfer_id: str
    kind: str
    amount_minor: int  # positive, as posted
    currency: str
    posted_at: datetime
    has_splits: bool
    split_sum_minor: int
    corrects_transfer_id: str = ""


@dataclass(frozen=True)
class ProviderMovement:
    transfer_id: str
    kind: str
    stripe_id: str
    reference_id: str
    amount_minor: int  # signed
    currency: str
    occurred_at: datetime


@dataclass(frozen=True)
class DayPayout:
    payout_id: str
    stripe_id: str
    amount_minor: int
    currency: str
    created_at: datetime


@dataclass
class Finding:
    kind: str
    reference_id: str
    currency: str
    ledger_minor: int | None = None
    settlement_minor: int | None = None
    provider_minor: int | None = None
    cause: str = ""
    explained: bool = False


@dataclass
class Outcome:
    matched: int = 0
    differences: list[Finding] = field(default_factory=list)

    @property
    def unexplained(self) -> int:
        return sum(1 for d in self.differences if not d.explained)


def compare(*, ledger: list[LedgerTransfer], lines: dict[str, int], provider_movements: list[ProviderMovement],
            payouts: list[DayPayout], report: list[ProviderRow], start: datetime, end: datetime,
            known_elsewhere: set[str], currency: str) -> Outcome:
    """Compare the three sides of one day (pure). `lines` maps transfer id -> sum of its lines
    (signed); `known_elsewhere` holds Stripe and CityTap ids of other days' movements, so a
    report row belonging to another day is not reported as unknown."""
    outcome = Outcome()
    newest = max((row.created_at for row in report), default=None)

    # Duplicates within each source.
    for txn, count in Counter(row.balance_transaction_id for row in report).items():
        if count > 1:
            outcome.differences.append(Finding("DUPLICATE", txn, currency, cause=f"the provider report lists balance "
                                                                                 f"transaction {txn} {count} times"))
    seen_rows = {row.balance_transaction_id: row for row in report}
    rows = list(seen_rows.values())
    for transfer_id, count in Counter(t.transfer_id for t in ledger).items():
        if count > 1:
            outcome.differences.append(Finding("DUPLICATE", transfer_id, currency,
                                               cause=f"the ledger listed transfer {transfer_id} {count} times"))
    ledger_by_id = {t.transfer_id: t for t in ledger}

    # Revenue: ledger transfers with split lines against settlement lines.
    revenue_ids = {t.transfer_id for t in ledger_by_id.values() if t.has_splits} | set(lines)
    for transfer_id in sorted(revenue_ids):
        posted = ledger_by_id.get(transfer_id)
        filed = lines.get(transfer_id)
        ledger_amount = signed(posted.amount_minor, posted.kind) if posted else None
        if posted is None:
            outcome.differences.append(Finding("MISSING_IN_LEDGER", transfer_id, currency, settlement_minor=filed,
                                               cause="settlement filed lines for a transfer the ledger did not post "
                                                     "that day"))
        elif filed is None:
            outcome.differences.append(Finding("MISSING_IN_SETTLEMENT", transfer_id, currency, ledger_minor=ledger_amount,
                                               cause="the ledger posted a split transfer settlement never filed "
                                                     "(its event was not consumed)"))
        elif filed != ledger_amount or signed(posted.split_sum_minor, posted.kind) != ledger_amount:
            outcome.differences.append(Finding("AMOUNT_MISMATCH", transfer_id, currency, ledger_minor=ledger_amount,
                                               settlement_minor=filed,
                                               cause="the settlement lines do not add up to the posted amount"))
        else:
            outcome.matched += 1

    # Money through Stripe: top-ups and their refunds.
    by_transfer = {m.transfer_id: m for m in provider_movements}
    reversals = {t.corrects_transfer_id: t for t in ledger_by_id.values()
                 if t.kind == "CORRECTION" and not t.has_splits and t.corrects_transfer_id}
    stripe_ids = {t.transfer_id for t in ledger_by_id.values() if t.kind in PROVIDER_KINDS} | set(by_transfer)
    used_rows: set[str] = set()
    for transfer_id in sorted(stripe_ids):
        posted = ledger_by_id.get(transfer_id)
        movement = by_transfer.get(transfer_id)
        ledger_amount = signed(posted.amount_minor, posted.kind) if posted else None
        if posted is None:
            outcome.differences.append(Finding("MISSING_IN_LEDGER", transfer_id, currency,
                                               settlement_minor=movement.amount_minor if movement else None,
                                               cause="a Stripe movement settlement learned of has no ledger transfer "
                                                     "that day"))
            continue
        if movement is None:
            outcome.differences.append(Finding("MISSING_IN_SETTLEMENT", transfer_id, currency, ledger_minor=ledger_amount,
                                               cause="the ledger posted a top-up movement settlement never learned of"))
            continue
        matches = [row for row in rows if row.reporting_category == PROVIDER_KINDS[movement.kind] and (
            (movement.stripe_id and movement.stripe_id in (row.payment_intent_id, row.refund_id, row.source_id))
            or (movement.reference_id and movement.reference_id in (row.top_up_id, row.citytap_refund_id)))]
        finding = _against_provider(transfer_id, movement.amount_minor, movement.occurred_at, matches, newest, currency,
                                    ledger_amount=ledger_amount)
        reversal = reversals.get(transfer_id)
        if finding is not None and finding.kind == "MISSING_AT_PROVIDER" and reversal is not None \
                and reversal.amount_minor == posted.amount_minor:
            finding.explained = True
            finding.cause = (f"Stripe refused this top-up refund and the ledger gave the money back with correction "
                             f"{reversal.transfer_id}, so no refund reached the provider")
        used_rows.update(row.balance_transaction_id for row in matches)
        if finding is None:
            outcome.matched += 1
        else:
            outcome.differences.append(finding)

    # Payouts of the day against the provider's transfer rows.
    for payout in payouts:
        matches = [row for row in rows if row.reporting_category == "transfer" and (
            (payout.stripe_id and row.source_id == payout.stripe_id) or row.payout_id == payout.payout_id)]
        used_rows.update(row.balance_transaction_id for row in matches)
        finding = _against_provider(payout.payout_id, -payout.amount_minor, payout.created_at, matches, newest,
                                    currency, settlement_amount=payout.amount_minor)
        if finding is None:
            outcome.matched += 1
        else:
            outcome.differences.append(finding)

    # Provider rows of CityTap's kinds that nothing claimed.
    for row in rows:
        if row.balance_transaction_id in used_rows or row.reporting_category not in ("charge", "refund", "transfer"):
            continue
        ids = {row.source_id, row.payment_intent_id, row.refund_id, row.top_up_id, row.citytap_refund_id,
               row.payout_id} - {""}
        if ids & known_elsewhere:
            continue  # another day's movement: that day's reconciliation covers it
        if row.reporting_category != "transfer" and not start <= row.created_at < end:
            continue  # outside the day, and not a payout: not this day's concern
        outcome.differences.append(Finding("UNKNOWN_ID", row.source_id or row.balance_transaction_id, currency,
                                           provider_minor=row.gross_minor,
                                           cause=f"the provider report's {row.reporting_category} on line {row.line} "
                                                 "names ids CityTap does not know"))
    return outcome


def _against_provider(reference: str, expected_minor: int, happened_at: datetime, matches: list[ProviderRow],
                      newest: datetime | None, currency: str, *, ledger_amount: int | None = None,
                      settlement_amount: int | None = None) -> Finding | None:
    settlement_minor = settlement_amount if settlement_amount is not None else expected_minor
    if not matches:
        explained = newest is not None and happened_at > newest
        cause = ("it happened after the newest row of the provider report, so the next report will hold it"
                 if explained else "the provider report does not hold it")
        return Finding("MISSING_AT_PROVIDER", reference, currency, ledger_minor=ledger_amount,
                       settlement_minor=settlement_minor, cause=cause, explained=explained)
    if len(matches) > 1:
        return Finding("DUPLICATE", reference, currency, ledger_minor=ledger_amount, settlement_minor=settlement_minor,
                       provider_minor=sum(r.gross_minor for r in matches),
                       cause=f"the provider report holds it {len(matches)} times (lines "
                             f"{', '.join(str(r.line) for r in matches)})")
    row = matches[0]
    if row.currency != currency or abs(row.gross_minor) != abs(expected_minor):
        return Finding("AMOUNT_MISMATCH", reference, currency, ledger_minor=ledger_amount,
                       settlement_minor=settlement_minor, provider_minor=row.gross_minor,
                       cause=f"the provider's gross on line {row.line} is {row.gross_minor} {row.currency}")
    return None


# --- the use case ------------------------------------------------------------------------------


class Reconciler:
    """The Reconcile use case: gathers the three sides, compares, records the run, publishes."""

    def __init__(self, pool: ConnectionPool, *, schema: str, days: ServiceDayClock, currency: str,
                 ledger_reader: object, clock: Callable[[], datetime]) -> None:
        self._pool = pool
        self._schema = schema
        self._days = days
        self._currency = currency
        self._ledger = ledger_reader
        self._clock = clock

    def reconcile_pb(self, day_text: str, report_csv: bytes) -> settlement_pb2.ReconcileResponse:
        return self.reconcile(parse_day(day_text), report_csv)

    def reconcile(self, day: date, report_csv: bytes) -> settlement_pb2.ReconcileResponse:
        s = self._schema
        report = parse(report_csv)  # refuses a malformed file before anything is read or written
        start, end = self._days.bounds(day)
        with self._pool.connection() as conn:
            status = conn.execute(f"SELECT status FROM {s}.service_days WHERE service_day = %s", (day,)).fetchone()
            if status is None or status[0] != "CLOSED":
                raise errors.FailedPrecondition("INVALID_STATE", f"service day {day.isoformat()} is not closed; close "
                                                                 "it before reconciling", service_day=day.isoformat())
            lines = {tid: total for tid, total in conn.execute(
                f"SELECT transfer_id, sum(amount_minor)::bigint FROM {s}.settlement_lines WHERE service_day = %s "
                "GROUP BY transfer_id", (day,))}
            movements = [ProviderMovement(*row) for row in conn.execute(
                f"SELECT transfer_id, kind, stripe_id, reference_id, amount_minor, currency, occurred_at "
                f"FROM {s}.provider_movements WHERE service_day = %s", (day,))]
            payouts = [DayPayout(*row) for row in conn.execute(
                f"SELECT payout_id, stripe_id, amount_minor, currency, created_at FROM {s}.payouts "
                "WHERE service_day = %s AND status = 'SENT'", (day,))]
            known = {r[0] for r in conn.execute(
                f"SELECT stripe_id FROM {s}.payouts WHERE service_day <> %s UNION SELECT payout_id FROM {s}.payouts "
                f"WHERE service_day <> %s UNION SELECT stripe_id FROM {s}.provider_movements WHERE service_day <> %s "
                f"UNION SELECT reference_id FROM {s}.provider_movements WHERE service_day <> %s",
                (day, day, day, day))} - {""}
        ledger = list(self._ledger.transfers_between(start, end))  # type: ignore[attr-defined]
        outcome = compare(ledger=ledger, lines=lines, provider_movements=movements, payouts=payouts, report=report,
                          start=start, end=end, known_elsewhere=known, currency=self._currency)
        return self._record(day, report_csv, outcome)

    def _record(self, day: date, report_csv: bytes, outcome: Outcome) -> settlement_pb2.ReconcileResponse:
        s = self._schema
        now = self._clock()
        run_id = str(uuid.uuid4())
        differences = [settlement_pb2.Difference(
            kind=settlement_pb2.DifferenceKind.Value("DIFFERENCE_KIND_" + f.kind), reference_id=f.reference_id,
            ledger_amount=money_pb(f.ledger_minor, f.currency) if f.ledger_minor is not None else None,
            settlement_amount=money_pb(f.settlement_minor, f.currency) if f.settlement_minor is not None else None,
            provider_amount=money_pb(f.provider_minor, f.currency) if f.provider_minor is not None else None,
            cause=f.cause, explained=f.explained) for f in outcome.differences]
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(f"INSERT INTO {s}.reconciliations (reconciliation_id, service_day, report_sha256, "
                         "matched_count, difference_count, unexplained_count, created_at) VALUES (%s, %s, %s, %s, %s, "
                         "%s, %s)", (run_id, day, hashlib.sha256(report_csv).hexdigest(), outcome.matched,
                                     len(outcome.differences), outcome.unexplained, now))
            with conn.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO {s}.reconciliation_differences (reconciliation_id, n, kind, reference_id, "
                    "ledger_minor, settlement_minor, provider_minor, currency, cause, explained) VALUES (%s, %s, %s, "
                    "%s, %s, %s, %s, %s, %s, %s)",
                    [(run_id, n, f.kind, f.reference_id, f.ledger_minor, f.settlement_minor, f.provider_minor,
                      f.currency, f.cause, f.explained) for n, f in enumerate(outcome.differences)])
            outbox.enqueue(conn, s, TOPIC, events_pb2.SettlementEvent(
                event_id=str(uuid.uuid4()), occurred_at=timestamp_pb(now), account_key=day.isoformat(),
                reconciliation_completed=events_pb2.ReconciliationCompleted(
                    service_day=day.isoformat(), reconciliation_id=run_id, matched_count=outcome.matched,
                    difference_count=len(outcome.differences), unexplained_count=outcome.unexplained)))
        log.info("reconciliation finished", extra={"fields": {"day": day.isoformat(), "matched": outcome.matched,
                                                              "differences": len(outcome.differences),
                                                              "unexplained": outcome.unexplained}})
        return settlement_pb2.ReconcileResponse(reconciliation_id=run_id, matched_count=outcome.matched,
                                                differences=differences, unexplained_count=outcome.unexplained)


def ledger_transfers(messages: Iterable[wallet_pb2.Transfer]) -> Iterable[LedgerTransfer]:
    """LedgerTransfers from the wallet's `Transfer` messages."""
    for t in messages:
        yield LedgerTransfer(
            transfer_id=t.transfer_id, kind=wallet_pb2.TransferKind.Name(t.kind).removeprefix("TRANSFER_KIND_"),
            amount_minor=t.amount.amount_minor, currency=t.amount.currency,
            posted_at=t.posted_at.ToDatetime(tzinfo=timezone.utc), has_splits=bool(t.splits),
            split_sum_minor=sum(s.amount.amount_minor for s in t.splits), corrects_transfer_id=t.corrects_transfer_id)
