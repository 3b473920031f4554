"""Closing a service day of 1M transactions: time and rate of CloseDay on the real stack.

    make bench-settlement                   # the dev stack up, then this with infra/env.sh
    python -m loadtests.settlement_close --help

In order:

1. Setup, not timed: a settlement instance built by the service's own composition root on a
   schema of its own (dropped at the end), served in-process on port 0, paying out to the
   stack's stripe-mock. The day's settlement lines are **loaded in bulk, not through the
   event pipeline**: each transaction's split lines are computed with `libs.splits` (the code
   the merchant service and the fare gate split with) for every distinct amount, then one
   INSERT ... SELECT over generate_series expands them to `--transactions` movements (70%
   fares to one operator, 30% merchant payments spread over `--merchants` merchants), three
   lines each. The load time is printed apart.
2. The measurement: one CloseDay call through gRPC, from request to response: totals per
   party, carry-overs, one Stripe transfer per party with an account (idempotency key = the
   payout id), the stored result and the DayClosed event.
3. Also timed: GetReport for the city (the party with a line in every transaction), which
   writes its CSV with COPY and its PDF with charts.
4. The pipeline the bulk load stands in for, measured apart on `--ingest-events` events:
   wallet `TransferPosted` envelopes (one fare with three split lines each) published to a
   topic of this run on the real broker, consumed by settlement's ConsumerLoop with its
   PostgreSQL inbox, one transaction per event; events/s from the first publish until the
   last line is filed.

The figures print as a table, and as JSON in `.local/bench/settlement_close.json`. The exit
status is 0 whatever the verdict (a benchmark reports, it is not a gate); 1 only when it
could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from datetime import date, timedelta
from pathlib import Path

import psycopg

from citytap.common.v1 import split_pb2
from citytap.settlement.v1 import settlement_pb2 as pb
from citytap.settlement.v1 import settlement_pb2_grpc
from libs.grpc_client import connect
from libs.settings import load
from libs.splits import ContractTerms, Term, split
from services.settlement.bootstrap import build, service_days
from services.settlement.settings import Settings

TARGET_S = 300.0
DAY = date(2031, 3, 3)
FARE = ContractTerms("bench-fare", 1, (Term("TRANSIT_OPERATOR", "metro", 0, 0, True), Term("CITY", "city", 500),
                                       Term("PLATFORM", "platform", 150)))
SHOP = ContractTerms("bench-shop", 1, (Term("MERCHANT", "", 0, 0, True), Term("CITY", "city", 100),
                                       Term("PLATFORM", "platform", 150, 300)))
FARE_AMOUNTS = range(1_000, 6_001, 5)          # NT$10.00 to NT$60.00
SHOP_AMOUNTS = range(3_000, 300_001, 397)      # NT$30 to NT$3,000


def load_lines(conn: psycopg.Connection, schema: str, transactions: int, merchants: int) -> None:
    """Bulk-load the day's lines: splits per distinct amount from libs.splits, expanded in SQL."""
    conn.execute("CREATE TEMP TABLE bench_splits (kind text, amount_index int, amount_minor bigint, line_no int, "
                 "party text, party_id text, share_minor bigint, contract_id text)")
    with conn.cursor() as cursor, cursor.copy("COPY bench_splits FROM STDIN") as copy:
        for kind, contract, amounts in (("FARE", FARE, FARE_AMOUNTS), ("MERCHANT_PAYMENT", SHOP, SHOP_AMOUNTS)):
            for index, amount in enumerate(amounts):
                for line_no, line in enumerate(split(contract, amount, "TWD", merchant_id="{merchant}")):
                    copy.write_row((kind, index, amount, line_no, line.party, line.party_id, line.amount_minor,
                                    line.contract_id))
    start, _ = service_days_of_env().bounds(DAY)
    conn.execute(f"""
        INSERT INTO {schema}.settlement_lines (transfer_id, line_no, service_day, settle_day, source_event_id,
            revenue_kind, transfer_kind, occurred_at, gross_minor, party, party_id, amount_minor, currency,
            contract_id, contract_version)
        SELECT 'bench-' || g.n, s.line_no, %(day)s, %(day)s, 'bench-event-' || g.n,
               CASE WHEN g.kind = 'FARE' THEN 'TRANSIT_FARE' ELSE 'MERCHANT_PAYMENT' END, g.kind,
               %(start)s + (g.n * interval '86 milliseconds'), s.amount_minor, s.party,
               CASE WHEN s.party_id = '{{merchant}}' THEN 'bench-m' || ((g.n / 10) %% %(merchants)s) ELSE s.party_id END,
               s.share_minor, 'TWD', s.contract_id, 1
          FROM (SELECT n, CASE WHEN n %% 10 < 7 THEN 'FARE' ELSE 'MERCHANT_PAYMENT' END AS kind
                  FROM generate_series(1::bigint, %(transactions)s) AS n) g
          JOIN bench_splits s ON s.kind = g.kind AND s.amount_index =
               (g.n * 7919) %% (CASE WHEN g.kind = 'FARE' THEN %(fares)s ELSE %(shops)s END)
    """, {"day": DAY, "start": start, "merchants": merchants, "transactions": transactions,
          "fares": len(FARE_AMOUNTS), "shops": len(SHOP_AMOUNTS)})
    conn.execute(f"INSERT INTO {schema}.service_days (service_day) VALUES (%s) ON CONFLICT DO NOTHING", (DAY,))
    for m in range(merchants):
        conn.execute(f"INSERT INTO {schema}.party_accounts (party, party_id, stripe_account_id, updated_at) "
                     "VALUES ('MERCHANT', %s, %s, now())", (f"bench-m{m}", f"acct_1BenchM{m}"))
    conn.execute(f"ANALYZE {schema}.settlement_lines")


def measure_ingest(settings: Settings, events: int) -> dict[str, object]:
    """Events/s through the real consumer path: Kafka -> ConsumerLoop -> inbox -> lines."""
    from citytap.wallet.v1 import events_pb2, wallet_pb2
    from libs.events import Publisher, ensure_topics
    from libs.protos import money_pb, timestamp_pb

    suffix = uuid.uuid4().hex[:8]
    topic = f"bench.wallet.{suffix}"
    ensure_topics(settings.kafka_bootstrap, [topic])
    ingest_schema = f"{settings.schema}_ingest"
    bench = load(Settings, {**os.environ, "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0",
                            "CITYTAP_SETTLEMENT_SCHEMA": ingest_schema, "CITYTAP_SETTLEMENT_WALLET_TOPIC": topic,
                            "CITYTAP_SETTLEMENT_MERCHANT_TOPIC": f"bench.merchant.{suffix}",
                            "CITYTAP_OUTBOX_RELAY_IN_PROCESS": "false",
                            "CITYTAP_WALLET_ADDRESS": os.environ.get("CITYTAP_WALLET_ADDRESS", "127.0.0.1:1")})
    start, _ = service_days(settings).bounds(DAY)
    publisher = Publisher(settings.kafka_bootstrap, client_id=f"bench-{suffix}", linger_ms=20)
    app = build(bench, consume=True)
    try:
        app.start()
        print(f"ingesting {events:,} TransferPosted events through Kafka and the consumer ...", flush=True)
        started = time.perf_counter()
        for n in range(events):
            amount = FARE_AMOUNTS[n % len(FARE_AMOUNTS)]
            lines = split(FARE, amount, "TWD")
            transfer = wallet_pb2.Transfer(
                transfer_id=f"ingest-{n}", debit_account_id=f"rider-{n % 5000}", credit_account_id="operator",
                amount=money_pb(amount, "TWD"), kind=wallet_pb2.TRANSFER_KIND_FARE,
                posted_at=timestamp_pb(start + timedelta(milliseconds=50 * n)),
                splits=[split_pb2.SplitLine(party=split_pb2.Party.Value("PARTY_" + l.party), party_id=l.party_id,
                                            amount=money_pb(l.amount_minor, "TWD"), contract_id=l.contract_id,
                                            contract_version=l.contract_version) for l in lines])
            envelope = events_pb2.WalletEvent(event_id=str(uuid.uuid4()), account_key=transfer.debit_account_id,
                                              transfer_posted=events_pb2.TransferPosted(transfers=[transfer]))
            envelope.occurred_at.CopyFrom(transfer.posted_at)
            publisher.publish(topic, envelope)
        publisher.flush(timeout_s=60)
        deadline = time.monotonic() + 900
        with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
            while True:
                filed = conn.execute(f"SELECT count(*) FROM {ingest_schema}.settlement_lines").fetchone()[0]
                if filed >= 3 * events or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        elapsed = time.perf_counter() - started
        return {"ingest_events": events, "ingest_s": round(elapsed, 1), "ingest_lines": filed,
                "ingest_events_per_s": round(events / elapsed)}
    finally:
        publisher.close()
        app.close()
        with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {ingest_schema} CASCADE")


_SETTINGS: Settings | None = None


def service_days_of_env():  # noqa: ANN201 - the ServiceDayClock of the loaded settings
    assert _SETTINGS is not None
    return service_days(_SETTINGS)


def main(argv: list[str] | None = None) -> int:
    global _SETTINGS
    parser = argparse.ArgumentParser(prog="python -m loadtests.settlement_close", description=__doc__.split("\n")[0])
    parser.add_argument("--transactions", type=int, default=1_000_000)
    parser.add_argument("--merchants", type=int, default=200)
    parser.add_argument("--ingest-events", type=int, default=10_000,
                        help="events for the ingestion measurement (0 skips it)")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark's schema for inspection")
    args = parser.parse_args(argv)
    schema = f"bench_settlement_{uuid.uuid4().hex[:8]}"
    scratch = Path(tempfile.mkdtemp(prefix="citytap-bench-settlement-"))
    party_accounts = "TRANSIT_OPERATOR:metro=acct_1BenchMetro,CITY:city=acct_1BenchCity"
    try:
        _SETTINGS = settings = load(Settings, {**os.environ, "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0",
                                               "CITYTAP_SETTLEMENT_SCHEMA": schema,
                                               "CITYTAP_SETTLEMENT_REPORT_DIR": str(scratch / "reports"),
                                               "CITYTAP_SETTLEMENT_EXPORT_DIR": str(scratch / "exports"),
                                               "CITYTAP_SETTLEMENT_PARTY_ACCOUNTS": party_accounts,
                                               "CITYTAP_OUTBOX_RELAY_IN_PROCESS": "false",
                                               "CITYTAP_WALLET_ADDRESS": os.environ.get("CITYTAP_WALLET_ADDRESS",
                                                                                        "127.0.0.1:1")})
    except Exception as exc:  # noqa: BLE001 - report and stop
        print(f"bench-settlement: cannot start: {exc} (is the stack up and infra/env.sh sourced?)", file=sys.stderr)
        return 1
    _, end = service_days(settings).bounds(DAY)
    clock_now = end + timedelta(seconds=settings.close_grace_s + 60)
    app = build(settings, clock=lambda: clock_now, consume=False)
    app.server.start()
    app.server.set_serving(True)
    results: dict[str, object] = {"transactions": args.transactions, "merchants": args.merchants,
                                  "service_day": DAY.isoformat(), "lines_loaded_in_bulk": True}
    try:
        print(f"loading {args.transactions:,} transactions' settlement lines in bulk (INSERT ... SELECT over "
              f"generate_series with libs.splits shares; not through the event pipeline) ...", flush=True)
        started = time.perf_counter()
        with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
            load_lines(conn, schema, args.transactions, args.merchants)
            lines = conn.execute(f"SELECT count(*) FROM {schema}.settlement_lines").fetchone()[0]
        results["load_s"] = round(time.perf_counter() - started, 1)
        results["lines"] = lines
        print(f"  {lines:,} lines in {results['load_s']} s", flush=True)

        stub = settlement_pb2_grpc.SettlementServiceStub(connect(f"127.0.0.1:{app.server.port}",
                                                                 default_timeout_s=900))
        started = time.perf_counter()
        closed = stub.CloseDay(pb.CloseDayRequest(service_day=DAY.isoformat()))
        close_s = time.perf_counter() - started
        results.update(close_s=round(close_s, 2), transactions_per_s=round(args.transactions / close_s),
                       parties=len(closed.totals), payouts=len(closed.payouts))
        total_minor = sum(t.amount.amount_minor for t in closed.totals)
        started = time.perf_counter()
        report = stub.GetReport(pb.GetReportRequest(party=split_pb2.PARTY_CITY, party_id="city",
                                                    service_day=DAY.isoformat(), page_size=1))
        results["city_report_s"] = round(time.perf_counter() - started, 2)
        results["city_report_lines"] = report.total.line_count
        if args.ingest_events > 0:
            results.update(measure_ingest(settings, args.ingest_events))
        verdict = "PASS" if close_s <= TARGET_S else "FAIL"
        results["verdict"] = verdict
        print(f"\nCloseDay of {args.transactions:,} transactions ({lines:,} lines, {len(closed.totals)} parties, "
              f"{len(closed.payouts)} Stripe transfers to stripe-mock)")
        print(f"  close time            {close_s:10.2f} s      target <= {TARGET_S:.0f} s   {verdict}")
        print(f"  rate                  {args.transactions / close_s:10,.0f} transactions/s")
        print(f"  day total             {total_minor:>10,} minor units across all parties")
        print(f"  city report (CSV+PDF) {results['city_report_s']:10.2f} s for {report.total.line_count:,} lines")
        print(f"  load (bulk, untimed)  {results['load_s']:10.1f} s")
        if "ingest_events_per_s" in results:
            print(f"  ingestion pipeline    {results['ingest_events_per_s']:10,.0f} events/s (Kafka -> ConsumerLoop -> "
                  f"inbox -> lines, {results['ingest_events']:,} events, one transaction each)")
        out = Path(".local/bench")
        out.mkdir(parents=True, exist_ok=True)
        (out / "settlement_close.json").write_text(json.dumps(results, indent=2) + "\n")
        return 0
    finally:
        app.server.stop(0)
        app.close()
        if not args.keep:
            with psycopg.connect(settings.postgres_dsn, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


if __name__ == "__main__":
    sys.exit(main())
