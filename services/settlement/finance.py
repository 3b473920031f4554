"""The finance CLI: close a service day, show reports, reconcile, export, list contracts.

    python -m services.settlement.finance close-day 2030-01-01
    python -m services.settlement.finance day 2030-01-01
    python -m services.settlement.finance report 2030-01-01 [--party CITY --party-id city]
    python -m services.settlement.finance reconcile 2030-01-01 --provider-report payout_reconciliation.csv
    python -m services.settlement.finance export --format csv [--through 2030-01-01] [--export-id UUID]
    python -m services.settlement.finance contracts [--kind TRANSIT_FARE]

It talks to the running settlement service at CITYTAP_SETTLEMENT_ADDRESS. Exit codes:
0 done (for `reconcile`: zero unexplained differences); 1 reconciliation found unexplained
differences, or the service or one of its dependencies is unavailable (retry); 2 bad input:
a malformed argument or file, or a request the service refused as it stands (a day not yet
closable, a report for an open day, an unknown party), with a message naming the problem.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc

from citytap.common.v1 import split_pb2
from citytap.settlement.v1 import settlement_pb2 as pb
from citytap.settlement.v1 import settlement_pb2_grpc
from libs.grpc_client import connect, error_info
from libs.settings import SettingsError, load
from services.settlement.settings import FinanceSettings

DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
PARTIES = ("MERCHANT", "TRANSIT_OPERATOR", "CITY", "PLATFORM")
REPORT_BYTES_MAX = 4 * 1024 * 1024
BAD_INPUT_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
                   grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE}


class BadInput(Exception):
    """The command line or a file named on it is wrong: exit 2."""


def money(amount: Any) -> str:
    minor = amount.amount_minor
    sign = "-" if minor < 0 else ""
    major, cents = divmod(abs(minor), 100)
    return f"{amount.currency or 'TWD'} {sign}{major:,}.{cents:02d}"


def party(value: int) -> str:
    return split_pb2.Party.Name(value).removeprefix("PARTY_")


def day_arg(text: str) -> str:
    if not DAY.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a service day written YYYY-MM-DD")
    return text


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m services.settlement.finance",
                                   description="CityTap finance: close days, reports, reconciliation, export.")
    root.add_argument("--timeout-s", type=float, default=600.0, help="deadline of each call (default 600)")
    commands = root.add_subparsers(dest="command", required=True)
    close = commands.add_parser("close-day", help="close a service day and pay each party")
    close.add_argument("day", type=day_arg)
    day = commands.add_parser("day", help="show a service day's status, totals and payouts")
    day.add_argument("day", type=day_arg)
    report = commands.add_parser("report", help="show a party's report of a closed day (every party's without --party)")
    report.add_argument("day", type=day_arg)
    report.add_argument("--party", choices=PARTIES)
    report.add_argument("--party-id")
    reconcile = commands.add_parser("reconcile", help="reconcile a closed day against Stripe's payout reconciliation "
                                                      "report")
    reconcile.add_argument("day", type=day_arg)
    reconcile.add_argument("--provider-report", required=True, type=Path, help="the CSV downloaded from Stripe")
    export = commands.add_parser("export", help="export accounts, ledger, contracts and settlement")
    export.add_argument("--format", choices=("csv", "parquet"), default="csv")
    export.add_argument("--through", type=day_arg, default="", help="last service day to include (default: last "
                                                                      "closed)")
    export.add_argument("--export-id", default="", help="reuse to retry the same export (default: a new UUID)")
    contracts = commands.add_parser("contracts", help="list split contract versions, newest first")
    contracts.add_argument("--kind", choices=("TRANSIT_FARE", "MERCHANT_PAYMENT"))
    contracts.add_argument("--contract-id", default="")
    return root


def print_totals(out: TextIO, totals: Sequence[Any], payouts: Sequence[Any]) -> None:
    paid = {(p.party, p.party_id): p for p in payouts}
    out.write(f"  {'party':<17} {'party id':<24} {'lines':>8} {'share':>18} {'paid out':>18}  stripe transfer\n")
    for total in totals:
        payout = paid.get((total.party, total.party_id))
        out.write(f"  {party(total.party):<17} {total.party_id:<24} {total.line_count:>8,} {money(total.amount):>18} "
                  f"{money(payout.amount) if payout else '-':>18}  {payout.stripe_id if payout else ''}\n")


def run(argv: Sequence[str], out: TextIO, *, stub: Any = None, settings: FinanceSettings | None = None) -> int:
    args = parser().parse_args(argv)
    settings = settings or load(FinanceSettings, os.environ)
    if stub is None:
        stub = settlement_pb2_grpc.SettlementServiceStub(connect(settings.settlement_address,
                                                                 default_timeout_s=args.timeout_s))
    if args.command == "close-day":
        response = stub.CloseDay(pb.CloseDayRequest(service_day=args.day))
        out.write(f"service day {response.service_day} closed at {response.closed_at.ToJsonString()}\n")
        print_totals(out, response.totals, response.payouts)
        return 0
    if args.command == "day":
        response = stub.GetServiceDay(pb.GetServiceDayRequest(service_day=args.day))
        status = pb.ServiceDayStatus.Name(response.status).removeprefix("SERVICE_DAY_STATUS_")
        out.write(f"service day {response.service_day}: {status}, {response.line_count:,} settlement lines\n")
        if response.totals:
            print_totals(out, response.totals, response.payouts)
        return 0
    if args.command == "report":
        if (args.party is None) != (args.party_id is None):
            raise BadInput("--party and --party-id go together")
        if args.party is None:
            day = stub.GetServiceDay(pb.GetServiceDayRequest(service_day=args.day))
            targets = [(t.party, t.party_id) for t in day.totals]
            if day.status != pb.SERVICE_DAY_STATUS_CLOSED:
                raise BadInput(f"service day {args.day} is not closed yet; run close-day first")
        else:
            targets = [(split_pb2.Party.Value("PARTY_" + args.party), args.party_id)]
        for kind, party_id in targets:
            report = stub.GetReport(pb.GetReportRequest(party=kind, party_id=party_id, service_day=args.day, page_size=1))
            payout = f"{money(report.payout.amount)} ({report.payout.stripe_id})" if report.HasField("payout") else "none"
            out.write(f"{party(kind)} {party_id}, service day {args.day}\n"
                      f"  lines {report.total.line_count:,}   gross shared in {money(report.gross)}   "
                      f"share {money(report.total.amount)}   payout {payout}\n"
                      f"  csv {Path(settings.report_dir) / report.csv_path}\n"
                      f"  pdf {Path(settings.report_dir) / report.pdf_path}\n")
        return 0
    if args.command == "reconcile":
        path: Path = args.provider_report
        if not path.is_file():
            raise BadInput(f"{path}: no such file")
        if path.stat().st_size > REPORT_BYTES_MAX:
            raise BadInput(f"{path}: larger than 4 MiB; download the report for one payout period")
        response = stub.Reconcile(pb.ReconcileRequest(service_day=args.day, provider_report_csv=path.read_bytes()))
        out.write(f"reconciliation {response.reconciliation_id} of {args.day}: {response.matched_count} movements "
                  f"agree, {len(response.differences)} differences, {response.unexplained_count} unexplained\n")
        for d in response.differences:
            kind = pb.DifferenceKind.Name(d.kind).removeprefix("DIFFERENCE_KIND_")
            amounts = "  ".join(f"{name} {money(getattr(d, field))}" for name, field in (
                ("ledger", "ledger_amount"), ("settlement", "settlement_amount"), ("provider", "provider_amount"))
                if d.HasField(field))
            out.write(f"  {'explained  ' if d.explained else 'UNEXPLAINED'} {kind:<22} {d.reference_id}  {amounts}\n"
                      f"              {d.cause}\n")
        return 0 if response.unexplained_count == 0 else 1
    if args.command == "export":
        fmt = pb.EXPORT_FORMAT_CSV if args.format == "csv" else pb.EXPORT_FORMAT_PARQUET
        export_id = args.export_id or str(uuid.uuid4())
        response = stub.Export(pb.ExportRequest(export_id=export_id, format=fmt, through_service_day=args.through))
        base = Path(settings.export_dir)
        out.write(f"export {response.export_id}: schema {base / response.schema_path}\n")
        for f in response.files:
            out.write(f"  {f.table:<28} {f.row_count:>10,} rows  {base / f.path}  sha256 {f.sha256[:16]}...\n")
        return 0
    kind = pb.RevenueKind.Value("REVENUE_KIND_" + args.kind) if args.kind else 0
    token = ""
    while True:
        page = stub.ListContracts(pb.ListContractsRequest(contract_id=args.contract_id, revenue_kind=kind,
                                                          page_size=100, page_token=token))
        for c in page.contracts:
            terms = ", ".join(f"{party(t.party)} {t.party_id or '(paying merchant)'} "
                              f"{'remainder' if t.remainder else f'{t.basis_points} bp'}"
                              + (f" + {money(t.fixed_fee)}" if t.HasField("fixed_fee") else "") for t in c.terms)
            out.write(f"{c.contract_id} v{c.version} {pb.RevenueKind.Name(c.revenue_kind).removeprefix('REVENUE_KIND_')}"
                      f" scope {c.scope or '(default)'} from {c.effective_from.ToJsonString()}: {terms}\n")
        token = page.next_page_token
        if not token:
            return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv, sys.stdout)
    except BadInput as exc:
        print(f"finance: {exc}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"finance: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        info = error_info(exc)
        reason = f" [{info.reason}]" if info is not None else ""
        print(f"finance: {exc.code().name}{reason}: {exc.details()}", file=sys.stderr)
        return 2 if exc.code() in BAD_INPUT_CODES else 1


if __name__ == "__main__":
    sys.exit(main())
