"""Per-party reports of a closed service day: lines, totals and payout, as CSV and as PDF.

The files are written the first time a party's report is asked for and then reused: a closed
day's lines and totals never change, so neither do its reports. They live under the
configured report directory as `<day>/<party>-<party_id>.csv` and `.pdf`.

The PDF (matplotlib, Agg backend, PdfPages) has three pages: the summary of the day (lines,
gross, share, carried in, paid, carried out, payout and its Stripe id); the party's daily
volume over the last 30 closed days; and how the movements the party shared in were split
by party. A merchant's report only ever shows that merchant's own movements.
"""

from __future__ import annotations

import base64
import os
import re
from datetime import date, timedelta
from pathlib import Path

import psycopg
from psycopg_pool import ConnectionPool

from citytap.settlement.v1 import settlement_pb2
from libs import errors
from libs.protos import money_pb, timestamp_pb
from services.settlement import convert
from services.settlement.closing import Closing
from services.settlement.domain import parse_day

PAGE_SIZE_DEFAULT = 500
PAGE_SIZE_MAX = 1000
CHART_DAYS = 30
_SAFE = re.compile(r"[^A-Za-z0-9._-]")

LINE_COLUMNS = ("service_day", "settle_day", "transfer_id", "line_no", "occurred_at", "revenue_kind", "transfer_kind",
                "gross_minor", "amount_minor", "currency", "contract_id", "contract_version", "source_event_id")


def _major(amount_minor: int) -> float:
    """For chart axes only (never for money arithmetic): minor units as major units."""
    return amount_minor / 100


class Reports:
    """The GetReport use case and the report files."""

    def __init__(self, pool: ConnectionPool, *, schema: str, report_dir: str, closing: Closing) -> None:
        self._pool = pool
        self._schema = schema
        self._dir = Path(report_dir)
        self._closing = closing

    def get_report_pb(self, party: str, party_id: str, day_text: str, *, page_size: int = 0,
                      page_token: str = "") -> settlement_pb2.GetReportResponse:
        day = parse_day(day_text)
        if page_size < 0 or page_size > PAGE_SIZE_MAX:
            raise errors.InvalidArgument("INVALID_ARGUMENT", f"page_size is 1 to {PAGE_SIZE_MAX}, or 0 for "
                                                             f"{PAGE_SIZE_DEFAULT}", field="page_size")
        size = page_size or PAGE_SIZE_DEFAULT
        offset = _offset(page_token)
        s = self._schema
        with self._pool.connection() as conn:
            status = conn.execute(f"SELECT status FROM {s}.service_days WHERE service_day = %s", (day,)).fetchone()
            if status is None or status[0] != "CLOSED":
                raise errors.FailedPrecondition("INVALID_STATE", f"service day {day.isoformat()} is not closed; "
                                                                 "reports are made for closed days only",
                                                service_day=day.isoformat())
            total = conn.execute(f"SELECT currency, lines_minor, line_count, gross_minor, carry_in_minor, paid_minor,"
                                 f" carry_out_minor FROM {s}.day_totals WHERE service_day = %s AND party = %s AND "
                                 "party_id = %s", (day, party, party_id)).fetchone()
            if total is None:
                raise errors.NotFound("NOT_FOUND", f"{party} {party_id!r} has no settlement on {day.isoformat()}",
                                      resource="party_total")
            currency, amount, count, gross = total[0], total[1], total[2], total[3]
            rows = conn.execute(
                f"SELECT transfer_id, line_no, service_day, source_event_id, revenue_kind, occurred_at, gross_minor,"
                f" party, party_id, amount_minor, currency, contract_id, contract_version FROM {s}.settlement_lines "
                "WHERE settle_day = %s AND party = %s AND party_id = %s ORDER BY occurred_at, transfer_id, line_no "
                "LIMIT %s OFFSET %s", (day, party, party_id, size + 1, offset)).fetchall()
            payouts = self._closing.payouts_of(conn, day, (party, party_id))
            csv_path, pdf_path = self.write_files(conn, day, party, party_id)
        lines = [settlement_pb2.SettlementLine(
            line_id=f"{r[0]}#{r[1]}", service_day=r[2].isoformat(), transfer_id=r[0], source_event_id=r[3],
            revenue_kind=convert.enum_value(settlement_pb2.RevenueKind, "REVENUE_KIND_",
                                            r[4] if r[4] != "UNSPECIFIED" else ""),
            occurred_at=timestamp_pb(r[5]), gross=money_pb(r[6], r[10]),
            split=convert.split_line_pb(r[7], r[8], r[9], r[10], r[11], r[12])) for r in rows[:size]]
        return settlement_pb2.GetReportResponse(
            lines=lines, next_page_token=_token(offset + size) if len(rows) > size else "",
            total=settlement_pb2.PartyTotal(party=convert.party_value(party), party_id=party_id,
                                            amount=money_pb(amount, currency), line_count=count),
            gross=money_pb(gross, currency), payout=payouts[0] if payouts else None,
            csv_path=csv_path, pdf_path=pdf_path)

    # --- files --------------------------------------------------------------------------------

    def _paths(self, day: date, party: str, party_id: str) -> tuple[str, str]:
        stem = f"{day.isoformat()}/{party}-{_SAFE.sub('_', party_id)}"
        return f"{stem}.csv", f"{stem}.pdf"

    def write_files(self, conn: psycopg.Connection, day: date, party: str, party_id: str) -> tuple[str, str]:
        """Write the party's CSV and PDF for `day` unless they exist; return their relative paths."""
        csv_rel, pdf_rel = self._paths(day, party, party_id)
        csv_file, pdf_file = self._dir / csv_rel, self._dir / pdf_rel
        csv_file.parent.mkdir(parents=True, exist_ok=True)
        if not csv_file.exists():
            tmp = csv_file.with_suffix(f".csv.{os.getpid()}.tmp")
            columns = ", ".join(
                "to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS occurred_at"
                if c == "occurred_at" else c for c in LINE_COLUMNS)
            with tmp.open("wb") as out, conn.cursor() as cursor:
                with cursor.copy(f"COPY (SELECT {columns} FROM {self._schema}.settlement_lines WHERE settle_day = "
                                 f"{_literal(day)} AND party = {_literal(party)} AND party_id = {_literal(party_id)} "
                                 "ORDER BY occurred_at, transfer_id, line_no) TO STDOUT WITH (FORMAT csv, HEADER)"
                                 ) as copy:
                    for chunk in copy:
                        out.write(chunk)
            tmp.replace(csv_file)
        if not pdf_file.exists():
            self._write_pdf(conn, day, party, party_id, pdf_file)
        return csv_rel, pdf_rel

    def _write_pdf(self, conn: psycopg.Connection, day: date, party: str, party_id: str, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.backends.backend_pdf import PdfPages

        s = self._schema
        currency, amount, count, gross, carry_in, paid, carry_out = conn.execute(
            f"SELECT currency, lines_minor, line_count, gross_minor, carry_in_minor, paid_minor, carry_out_minor "
            f"FROM {s}.day_totals WHERE service_day = %s AND party = %s AND party_id = %s",
            (day, party, party_id)).fetchone()
        payout = conn.execute(f"SELECT payout_id, stripe_id FROM {s}.payouts WHERE service_day = %s AND party = %s "
                              "AND party_id = %s", (day, party, party_id)).fetchone()
        history = conn.execute(
            f"SELECT service_day, lines_minor, gross_minor FROM {s}.day_totals WHERE party = %s AND party_id = %s AND "
            "service_day > %s AND service_day <= %s ORDER BY service_day",
            (party, party_id, day - timedelta(days=CHART_DAYS), day)).fetchall()
        split = conn.execute(
            f"SELECT o.party, sum(o.amount_minor)::bigint FROM {s}.settlement_lines mine JOIN {s}.settlement_lines o "
            "ON o.transfer_id = mine.transfer_id WHERE mine.settle_day = %s AND mine.party = %s AND mine.party_id = %s "
            "GROUP BY o.party ORDER BY o.party", (day, party, party_id)).fetchall()
        tmp = path.with_suffix(f".pdf.{os.getpid()}.tmp")
        with PdfPages(tmp) as pdf:
            fig = plt.figure(figsize=(8.27, 11.69))
            fig.text(0.08, 0.94, f"CityTap settlement report: {party} {party_id}", fontsize=15, weight="bold")
            fig.text(0.08, 0.91, f"Service day {day.isoformat()} (04:30 to 04:29 local time)", fontsize=10)
            rows = [("Settlement lines", f"{count:,}"), ("Gross of the movements shared in", _fmt(gross, currency)),
                    ("Share of the day", _fmt(amount, currency)), ("Carried in from earlier days", _fmt(carry_in, currency)),
                    ("Paid out", _fmt(paid, currency)), ("Carried to the next day", _fmt(carry_out, currency)),
                    ("Payout (settlement batch) id", payout[0] if payout else "none"),
                    ("Stripe transfer", payout[1] if payout else "none")]
            for index, (label, value) in enumerate(rows):
                fig.text(0.08, 0.85 - index * 0.03, label, fontsize=10)
                fig.text(0.55, 0.85 - index * 0.03, value, fontsize=10, family="monospace")
            fig.text(0.08, 0.55, "Amounts are exact in minor units in the CSV report beside this file.", fontsize=8)
            pdf.savefig(fig)
            plt.close(fig)

            fig, ax = plt.subplots(figsize=(8.27, 5.5))
            labels = [d.strftime("%m-%d") for d, _, _ in history]
            ax.bar(labels, [_major(g) for _, _, g in history], color="#c7d7ea", label="gross shared in")
            ax.bar(labels, [_major(a) for _, a, _ in history], color="#2b6cb0", label="share")
            ax.set_title(f"Daily volume, last {CHART_DAYS} days ({currency})")
            ax.tick_params(axis="x", rotation=60, labelsize=7)
            ax.legend()
            fig.tight_layout()
            pdf.savefig(fig)
            plt.close(fig)

            fig, ax = plt.subplots(figsize=(8.27, 5.5))
            parties = [p for p, _ in split]
            ax.barh(parties, [_major(v) for _, v in split], color=["#2b6cb0" if p == party else "#a0aec0"
                                                                  for p in parties])
            ax.set_title(f"Split by party of the movements {party} {party_id} shared in ({currency})")
            for index, (_, value) in enumerate(split):
                ax.text(0, index, f" {_fmt(value, currency)}", va="center", fontsize=8)
            fig.tight_layout()
            pdf.savefig(fig)
            plt.close(fig)
        tmp.replace(path)


def _fmt(amount_minor: int, currency: str) -> str:
    sign = "-" if amount_minor < 0 else ""
    major, minor = divmod(abs(amount_minor), 100)
    return f"{sign}{currency} {major:,}.{minor:02d}"


def _literal(value: object) -> str:
    """A SQL literal for COPY, which takes no parameters; values are dates and checked ids."""
    text = value.isoformat() if isinstance(value, date) else str(value)
    return "'" + text.replace("'", "''") + "'"


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _offset(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        if not text.startswith("o:") or int(text[2:]) < 0:
            raise ValueError
        return int(text[2:])
    except (ValueError, UnicodeDecodeError):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "page_token is not one this service gave out",
                                     field="page_token") from None
