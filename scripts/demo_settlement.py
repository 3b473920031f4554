"""The demo city's settlement day: close it, print each party's report, reconcile to zero.

`run(env)` is the last step of `make demo` (after the riders and the shop):

1. A settlement instance, built by the service's own composition root on a schema of its own
   (`demo_settlement_<id>`; the previous run's is dropped), consumes the wallet's and the
   merchant service's events from the real Kafka broker, from the beginning of each topic,
   and files every split movement as settlement lines.
2. The demo's service day has not ended (it is today), so the instance's clock is moved
   forward past the day's end and the grace period, and nothing else is changed: every open
   day up to the demo's is closed in order, with a payout to each party's Stripe connected
   account (stripe-mock). Parties other than merchants get demo connected accounts; merchants
   are paid on the account Stripe verified for them.
3. Each party's report of the day is printed (the city's share among them), with the CSV
   and PDF files written for it.
4. Reconciliation runs three ways. stripe-mock keeps no state and has no reporting API, so
   the demo writes the payout reconciliation report Stripe would produce for the money CityTap
   moved through it that day: the top-ups (the scenario's riders are funded straight into the
   ledger as top-ups, standing in for card payments) and the day's payouts. It must end with
   zero differences.

Raises RuntimeError with a plain explanation when a step does not go as it should.
Run alone: `source infra/env.sh && .venv/bin/python -m scripts.demo_settlement`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import psycopg
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition

from citytap.common.v1 import split_pb2
from citytap.settlement.v1 import settlement_pb2 as pb
from citytap.settlement.v1 import settlement_pb2_grpc
from libs.grpc_client import connect
from libs.settings import load
from services.settlement.bootstrap import build, service_days
from services.settlement.provider_report import ReportItem, write
from services.settlement.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
# Reading the topics from their start: waits while the lag shrinks, up to CATCH_UP_S_MAX.
CATCH_UP_S_MAX = 900
STALLED_S_MAX = 30
DIFFERENCES_SHOWN = 20


def _say(text: str) -> None:
    print(text, flush=True)


def _nt(amount_minor: int) -> str:
    sign = "-" if amount_minor < 0 else ""
    major, cents = divmod(abs(amount_minor), 100)
    return f"NT${sign}{major:,}.{cents:02d}"


DEMO_DIR = ROOT / ".local" / "demo-settlement"


def _settings(env: Mapping[str, str], schema: str, **extra: str) -> Settings:
    base = DEMO_DIR / schema  # a folder per run: reports of an earlier run's payouts never mix in
    return load(Settings, {**env, "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", "CITYTAP_SETTLEMENT_SCHEMA": schema,
                           "CITYTAP_SETTLEMENT_REPORT_DIR": str(base / "reports"),
                           "CITYTAP_SETTLEMENT_EXPORT_DIR": str(base / "exports"),
                           # The running settlement service publishes the city's settlement events; this
                           # demo instance keeps its own in its outbox.
                           "CITYTAP_OUTBOX_RELAY_IN_PROCESS": "false", **extra})


def _wait_caught_up(settings: Settings) -> None:
    """Until both consumer groups have committed every record the topics hold now."""
    topics = [settings.wallet_topic, settings.merchant_topic]
    probe = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, client_id="citytap-demo-probe")
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, client_id="citytap-demo-probe")
    try:
        partitions = [TopicPartition(t, p) for t in topics for p in (probe.partitions_for_topic(t) or ())]
        ends = probe.end_offsets(partitions)
        started = last_progress = time.monotonic()
        reported = started
        fewest: int | None = None
        while True:
            behind = 0
            for name, topic in (("wallet", settings.wallet_topic), ("merchant", settings.merchant_topic)):
                group = f"citytap-{settings.schema}-{name}"
                committed = admin.list_group_offsets({group: None}).get(group, {})
                for tp, end in ends.items():
                    if tp.topic == topic:
                        done = committed.get(tp)
                        behind += end - (done.offset if done is not None and done.offset >= 0 else 0)
            if behind <= 0:
                return
            now = time.monotonic()
            if fewest is None or behind < fewest:
                fewest, last_progress = behind, now
            if now - last_progress > STALLED_S_MAX or now - started > CATCH_UP_S_MAX:
                raise RuntimeError(f"settlement did not catch up with the wallet and merchant events "
                                   f"({behind} records behind after {now - started:.0f} s); a stack that ran "
                                   "benchmarks holds many events: `make reset` starts it empty")
            if now - reported >= 10:
                print(f"  (settlement is reading the stack's earlier events: {behind:,} records to go)", flush=True)
                reported = now
            time.sleep(0.5)
    finally:
        probe.close()
        admin.close()


def _provider_report(conn: psycopg.Connection, schema: str, day: date) -> bytes:
    """The day's payout reconciliation report as Stripe would write it, from what CityTap sent it."""
    items = []
    for payout_id, stripe_id, amount, created in conn.execute(
            f"SELECT payout_id, stripe_id, amount_minor, created_at FROM {schema}.payouts WHERE service_day = %s "
            "AND status = 'SENT' ORDER BY payout_id", (day,)):
        items.append(ReportItem(f"txn_{uuid.uuid4().hex[:16]}", created, "TWD", -amount, "transfer",
                                source_id=stripe_id, payout_id=payout_id, description="CityTap settlement payout"))
    for transfer_id, kind, stripe_id, reference, amount, occurred in conn.execute(
            f"SELECT transfer_id, kind, stripe_id, reference_id, amount_minor, occurred_at FROM "
            f"{schema}.provider_movements WHERE service_day = %s ORDER BY occurred_at", (day,)):
        if kind == "TOP_UP":
            items.append(ReportItem(f"txn_{uuid.uuid4().hex[:16]}", occurred, "TWD", amount, "charge",
                                    payment_intent_id=stripe_id, top_up_id=reference, fee_minor=amount * 3 // 100))
        else:
            items.append(ReportItem(f"txn_{uuid.uuid4().hex[:16]}", occurred, "TWD", amount, "refund",
                                    refund_id=stripe_id, refund_reference=reference))
    return write(items)


def run(env: Mapping[str, str]) -> None:
    """Close the demo day, print every party's report, and reconcile it to zero differences."""
    _say("\n== the settlement day: close it, pay each party, report, reconcile three ways")
    schema = f"demo_settlement_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(env["CITYTAP_POSTGRES_DSN"], autocommit=True, connect_timeout=5) as conn:
        for (old,) in conn.execute("SELECT schema_name FROM information_schema.schemata "
                                   "WHERE schema_name LIKE 'demo\\_settlement\\_%'").fetchall():
            conn.execute(f'DROP SCHEMA "{old}" CASCADE')
    if DEMO_DIR.is_dir():
        for old_dir in DEMO_DIR.glob("demo_settlement_*"):
            shutil.rmtree(old_dir, ignore_errors=True)

    settings = _settings(env, schema)
    days = service_days(settings)
    demo_day = days.day_of(datetime.now(timezone.utc))
    started = time.perf_counter()
    app = build(settings, consume=True)
    app.start()
    try:
        _wait_caught_up(settings)
        with app.pool.connection() as conn:
            parties = conn.execute(f"SELECT DISTINCT party, party_id FROM {schema}.settlement_lines "
                                   "WHERE party <> 'MERCHANT' ORDER BY 1, 2").fetchall()
            open_days = [d for (d,) in conn.execute(f"SELECT service_day FROM {schema}.service_days WHERE status = "
                                                    "'OPEN' AND service_day <= %s ORDER BY service_day", (demo_day,))]
            lines_today = conn.execute(f"SELECT count(*), count(DISTINCT transfer_id) FROM {schema}.settlement_lines "
                                       "WHERE settle_day = %s", (demo_day,)).fetchone()
    finally:
        app.close()
    _say(f"  events consumed             every wallet and merchant event on the broker, each filed once "
         f"({time.perf_counter() - started:.1f} s)")
    _say(f"  service day {demo_day.isoformat()}      {lines_today[0]} settlement lines from "
         f"{lines_today[1]} split movements")
    if demo_day not in open_days:
        open_days.append(demo_day)

    # Demo connected accounts for the parties that are not merchants; the platform keeps its share.
    platform_ids = [pid for party, pid in parties if party == "PLATFORM"]
    accounts = ",".join(f"{party}:{pid}=acct_1Demo{hashlib.sha256(pid.encode()).hexdigest()[:10]}"
                        for party, pid in parties if party != "PLATFORM")
    extra = {"CITYTAP_SETTLEMENT_PARTY_ACCOUNTS": accounts}
    if len(platform_ids) == 1:
        extra["CITYTAP_SETTLEMENT_PLATFORM_PARTY_ID"] = platform_ids[0]
    settings = _settings(env, schema, **extra)
    _, end = days.bounds(demo_day)
    later = end + timedelta(seconds=settings.close_grace_s + 60)
    _say(f"  the demo day ends at {end.astimezone(days.zone):%H:%M} tomorrow; the instance's clock moves to "
         f"{later.astimezone(days.zone):%Y-%m-%d %H:%M} local time, past the {settings.close_grace_s} s grace period")
    app = build(settings, clock=lambda: later, consume=False)
    app.server.start()
    app.server.set_serving(True)
    channel = connect(f"127.0.0.1:{app.server.port}", default_timeout_s=300)
    stub = settlement_pb2_grpc.SettlementServiceStub(channel)
    try:
        for day in open_days:
            closed = stub.CloseDay(pb.CloseDayRequest(service_day=day.isoformat()))
        again = stub.CloseDay(pb.CloseDayRequest(service_day=demo_day.isoformat()))
        if again != closed:
            raise RuntimeError("closing the day a second time did not return the original result")
        _say(f"  closed                      {len(open_days)} day(s); {demo_day.isoformat()}: {len(closed.totals)} "
             f"parties, {len(closed.payouts)} Stripe transfers (stripe-mock); closing again returns the same result")
        for total in closed.totals:
            kind = split_pb2.Party.Name(total.party).removeprefix("PARTY_")
            report = stub.GetReport(pb.GetReportRequest(party=total.party, party_id=total.party_id,
                                                        service_day=demo_day.isoformat(), page_size=1))
            payout = (f"paid {_nt(report.payout.amount.amount_minor)} ({report.payout.stripe_id})"
                      if report.HasField("payout") else
                      "kept in the platform's Stripe balance" if kind == "PLATFORM" else "carried to the next day")
            marker = "  <- the city's share" if kind == "CITY" else ""
            _say(f"  {kind:<17} {total.party_id:<36} {report.total.line_count:>5} lines  gross "
                 f"{_nt(report.gross.amount_minor):>14}  share {_nt(report.total.amount.amount_minor):>12}  "
                 f"{payout}{marker}")
            _say(f"  {'':<17} {Path(settings.report_dir) / report.pdf_path} (and .csv)")
        if not closed.totals:
            _say("  no split movement reached settlement today: the day closes empty")
        with app.pool.connection() as conn:
            report_csv = _provider_report(conn, schema, demo_day)
        path = Path(settings.report_dir) / demo_day.isoformat() / "stripe_payout_reconciliation.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(report_csv)
        result = stub.Reconcile(pb.ReconcileRequest(service_day=demo_day.isoformat(), provider_report_csv=report_csv))
        _say(f"  reconciliation              ledger vs settlement lines vs Stripe's report ({path}): "
             f"{result.matched_count} movements agree, {len(result.differences)} differences, "
             f"{result.unexplained_count} unexplained")
        for d in result.differences[:DIFFERENCES_SHOWN]:
            _say(f"    {pb.DifferenceKind.Name(d.kind)} {d.reference_id}: {d.cause}")
        if len(result.differences) > DIFFERENCES_SHOWN:
            _say(f"    ... and {len(result.differences) - DIFFERENCES_SHOWN} more, all in the reconciliation's report")
        if result.differences:
            raise RuntimeError("the settlement day does not reconcile to zero differences (see above). The demo "
                               "closes today early, so it needs a stack nothing else is using: after benchmarks, "
                               "the fare gate is still closing their unfinished journeys; `make reset` first")
    finally:
        channel.close()
        app.server.stop(0)
        app.close()


if __name__ == "__main__":
    try:
        run(os.environ)
    except RuntimeError as exc:
        print(f"demo_settlement: {exc}", file=sys.stderr)
        sys.exit(1)
