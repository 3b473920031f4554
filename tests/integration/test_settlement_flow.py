"""Settlement end to end on the real stack: the real wallet ledger (scratch schema) posts
fares, merchant payments and refunds with split lines; its outbox events go through the real
Kafka broker (every one delivered twice) to settlement's consumers; days are closed with
payouts to stripe-mock; reports are written; reconciliation runs three ways against a
provider report, clean and with each kind of injected discrepancy.

The scenario runs once per module (service days 2030-01-01 and 2030-01-02, Asia/Taipei) and
each test checks one part of it.
"""

from __future__ import annotations

import csv
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import psycopg
import pytest

from citytap.common.v1 import split_pb2
from citytap.merchant.v1 import events_pb2 as merchant_events
from citytap.merchant.v1 import merchant_pb2
from citytap.settlement.v1 import settlement_pb2 as pb
from citytap.wallet.v1 import events_pb2 as wallet_events
from libs.events import CONTENT_TYPE, Publisher, ensure_topics
from libs.grpc_client import error_info, error_reason
from libs.grpc_server import create_server
from libs.protos import money_pb, timestamp_pb
from libs.splits import ContractTerms, Term, split, split_refund
from services.settlement.provider_report import ReportItem, write
from services.wallet.domain import AccountKind, Party, SplitLine, TransferKind, TransferRequest
from services.wallet.exports import LedgerExports
from services.wallet.servicer import WalletServicer, registration
from tests.integration.settlement_support import FakeClock, Running, start_settlement, stop_settlement
from tests.integration.wallet_support import FakeClock as WalletClock
from tests.integration.wallet_support import WalletDb, open_wallet_db

UTC = timezone.utc
DAY1, DAY2 = "2030-01-01", "2030-01-02"
# Service day 2030-01-01 runs 2029-12-31 20:30 UTC to 2030-01-01 20:30 UTC (04:30 Asia/Taipei).
DAY1_NOON = datetime(2030, 1, 1, 4, 0, tzinfo=UTC)
DAY2_NOON = datetime(2030, 1, 2, 4, 0, tzinfo=UTC)
DAY1_CLOSABLE = datetime(2030, 1, 1, 21, 30, tzinfo=UTC)  # end + 1 h grace
FARE = ContractTerms("fare-metro", 1, (Term("TRANSIT_OPERATOR", "metro", 0, 0, True), Term("CITY", "city", 500),
                                       Term("PLATFORM", "platform", 150)))
SHOP = ContractTerms("shop-default", 1, (Term("MERCHANT", "", 0, 0, True), Term("CITY", "city", 100),
                                         Term("PLATFORM", "platform", 150, 300)))


def wallet_lines(lines: list) -> tuple[SplitLine, ...]:
    return tuple(SplitLine(Party(l.party), l.party_id, l.amount_minor, l.currency, l.contract_id, l.contract_version)
                 for l in lines)


@dataclass
class World:
    wallet: WalletDb
    settlement: Running
    publisher: Publisher
    wallet_topic: str
    merchant_topic: str
    merchant_payable: str
    rider: str
    relayed_seq: int = 0
    fares: dict[str, int] = field(default_factory=dict)
    closes: dict[str, pb.CloseDayResponse] = field(default_factory=dict)
    charge_id: str = ""
    late_fare: str = ""
    skipped_transfer: str = ""
    phantom_transfer: str = ""

    def query(self, text: str, params: tuple = ()) -> list[tuple]:
        with self.settlement.app.pool.connection() as conn:
            return conn.execute(text.replace("{s}", self.settlement.settings.schema), params).fetchall()

    def relay(self, *, skip: frozenset[str] = frozenset()) -> int:
        """Publish the wallet's new outbox events to the test topic, each one twice."""
        with self.wallet.pool.connection() as conn:
            rows = conn.execute(f'SELECT seq, event_id, key, event_type, payload FROM "{self.wallet.schema}".outbox_events'
                                " WHERE seq > %s ORDER BY seq", (self.relayed_seq,)).fetchall()
        sent = 0
        for seq, event_id, key, kind, payload in rows:
            self.relayed_seq = seq
            event = wallet_events.WalletEvent.FromString(bytes(payload))
            ids = {t.transfer_id for t in event.transfer_posted.transfers}
            if ids & skip:
                continue
            headers = [("event-type", kind.encode()), ("event-id", event_id.encode()), ("content-type", CONTENT_TYPE)]
            for _ in range(2):
                self.publisher.publish_raw(self.wallet_topic, bytes(key) if key else None, bytes(payload), headers)
            sent += 1
        self.publisher.flush()
        return sent

    def merchant_event(self, **payload: object) -> None:
        event = merchant_events.MerchantEvent(event_id=str(uuid.uuid4()), account_key="m-1", **payload)
        event.occurred_at.GetCurrentTime()
        for _ in range(2):
            self.publisher.publish(self.merchant_topic, event)
        self.publisher.flush()

    def wait_for_lines(self, transfer_ids: set[str], timeout_s: float = 40) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = {r[0] for r in self.query("SELECT DISTINCT transfer_id FROM {s}.settlement_lines "
                                              "WHERE transfer_id = ANY(%s)", (list(transfer_ids),))}
            if found == transfer_ids:
                return
            time.sleep(0.2)
        pytest.fail(f"settlement did not file lines for {sorted(transfer_ids - found)} within {timeout_s} s")

    def fare(self, transfer_id: str, amount: int) -> None:
        lines = split(FARE, amount, "TWD")
        self.wallet.ledger.create_transfers([TransferRequest(
            transfer_id, self.rider, self.wallet.sys(AccountKind.OPERATOR_REVENUE), amount, "TWD", TransferKind.FARE,
            wallet_lines(lines))])
        self.fares[transfer_id] = amount


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    import os

    dsn, bootstrap = os.environ["CITYTAP_POSTGRES_DSN"], os.environ["CITYTAP_KAFKA_BOOTSTRAP"]
    suffix = uuid.uuid4().hex[:10]
    wallet_schema, settlement_schema = f"t_w{suffix}", f"t_s{suffix}"
    wallet_topic, merchant_topic = f"test.wallet.{suffix}", f"test.merchant.{suffix}"
    ensure_topics(bootstrap, [wallet_topic, merchant_topic])
    wallet_clock = WalletClock(datetime(2029, 12, 31, 12, 0, tzinfo=UTC))  # service day 2029-12-31
    wallet = open_wallet_db(dsn, wallet_schema, clock=wallet_clock)
    servicer = WalletServicer(wallet.ledger)
    servicer.attach_exports(LedgerExports(wallet.pool, schema=wallet_schema))
    wallet_server = create_server("127.0.0.1:0", [registration(servicer)], domain="wallet.citytap")
    wallet_server.start()
    wallet_server.set_serving(True)
    settlement = start_settlement(settlement_schema, tmp_path_factory.mktemp("settlement"),
                                  clock=FakeClock(DAY1_NOON), consume=True,
                                  CITYTAP_WALLET_ADDRESS=f"127.0.0.1:{wallet_server.port}",
                                  CITYTAP_SETTLEMENT_WALLET_TOPIC=wallet_topic,
                                  CITYTAP_SETTLEMENT_MERCHANT_TOPIC=merchant_topic)
    publisher = Publisher(bootstrap, client_id=f"test-{suffix}")
    rider = "rider-" + suffix
    from services.wallet.domain import CreateAccountRequest

    wallet.ledger.create_account(CreateAccountRequest(rider, AccountKind.RIDER_WALLET, "", "", None, ""))
    wallet.ledger.credit_from_clearing(f"fund-{rider}", rider, 900_000)  # on 2029-12-31: not the days settled
    merchant_payable = "mpay-" + suffix
    wallet.ledger.create_account(CreateAccountRequest(merchant_payable, AccountKind.MERCHANT_PAYABLE, "", "", None,
                                                      "m-1"))
    world = World(wallet, settlement, publisher, wallet_topic, merchant_topic, merchant_payable, rider)
    try:
        run_scenario(world)
        yield world
    finally:
        publisher.close()
        stop_settlement(settlement)
        wallet_server.stop(0)
        wallet.pool.close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            for schema in (wallet_schema, settlement_schema):
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def run_scenario(world: World) -> None:
    wallet, stub = world.wallet, world.settlement.stub
    # Day 1: fares and a merchant payment, every event delivered twice.
    wallet.clock.advance((DAY1_NOON - wallet.clock()).total_seconds())
    for n, amount in enumerate([3500, 2000, 1999, 4301, 1]):
        world.fare(f"fare-1-{n}", amount)
        wallet.clock.advance(60)
    charge_lines = split(SHOP, 12_345, "TWD", merchant_id="m-1")
    world.charge_id = "pay-1"
    wallet.ledger.create_transfers([TransferRequest("pay-1", world.rider, world.merchant_payable, 12_345, "TWD",
                                                    TransferKind.MERCHANT_PAYMENT, wallet_lines(charge_lines))])
    # A fare whose event never reaches settlement, and a charge settlement hears of that the ledger never posted.
    world.skipped_transfer = "fare-1-skipped"
    world.fare(world.skipped_transfer, 700)
    world.relay(skip=frozenset({world.skipped_transfer}))
    world.merchant_event(merchant_verified=merchant_events.MerchantVerified(merchant_id="m-1",
                                                                            stripe_account_id="acct_1Shop"))
    world.phantom_transfer = "pay-phantom"
    phantom = merchant_pb2.Charge(charge_id="ch-phantom", merchant_id="m-1", transfer_id=world.phantom_transfer,
                                  amount=money_pb(500, "TWD"), created_at=timestamp_pb(DAY1_NOON),
                                  splits=[split_pb2.SplitLine(party=split_pb2.PARTY_MERCHANT, party_id="m-1",
                                                              amount=money_pb(500, "TWD"), contract_id="shop-default",
                                                              contract_version=1)])
    world.merchant_event(charge_succeeded=merchant_events.ChargeSucceeded(charge=phantom))
    day1 = {f"fare-1-{n}" for n in range(5)} | {"pay-1", world.phantom_transfer}
    world.wait_for_lines(day1)

    # Too early: within the grace period after the day's end.
    world.settlement.clock.set(DAY1_CLOSABLE - timedelta(seconds=1))
    with pytest.raises(grpc.RpcError) as info:
        stub.CloseDay(pb.CloseDayRequest(service_day=DAY1))
    assert error_reason(info.value) == "SERVICE_DAY_OPEN"
    assert error_info(info.value).metadata["closable_at"] == DAY1_CLOSABLE.isoformat()
    world.settlement.clock.set(DAY1_CLOSABLE)
    world.closes[DAY1] = stub.CloseDay(pb.CloseDayRequest(service_day=DAY1))

    # A day-1 fare whose event arrives after day 1 closed is paid with day 2.
    world.late_fare = "fare-1-late"
    world.fare(world.late_fare, 1000)  # posted at day-1 time
    # Day 2: a partial refund of the day-1 charge, and a fare.
    wallet.clock.advance((DAY2_NOON - wallet.clock()).total_seconds())
    refund_lines = split_refund(charge_lines, 10_000)
    wallet.ledger.create_transfers([TransferRequest("refund-1", world.merchant_payable, world.rider, 10_000, "TWD",
                                                    TransferKind.MERCHANT_REFUND, wallet_lines(refund_lines),
                                                    corrects_transfer_id="pay-1")])
    world.fare("fare-2-0", 2500)
    wallet.ledger.credit_from_clearing("topup-day2", world.rider, 50_000, reference="top-up through Stripe")
    world.relay()
    world.wait_for_lines({world.late_fare, "refund-1", "fare-2-0"})
    deadline = time.monotonic() + 20
    while not world.query("SELECT 1 FROM {s}.provider_movements WHERE transfer_id = 'topup-day2'"):
        assert time.monotonic() < deadline, "the day-2 top-up never reached settlement"
        time.sleep(0.2)
    world.settlement.clock.set(DAY1_CLOSABLE + timedelta(days=1))
    # Three finance clerks close day 2 at the same moment: one close happens, all see its result.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: stub.CloseDay(pb.CloseDayRequest(service_day=DAY2)), range(3)))
    assert results[0] == results[1] == results[2]
    world.closes[DAY2] = results[0]


def totals(response: pb.CloseDayResponse) -> dict[tuple[str, str], int]:
    return {(split_pb2.Party.Name(t.party).removeprefix("PARTY_"), t.party_id): t.amount.amount_minor
            for t in response.totals}


def payouts(response: pb.CloseDayResponse) -> dict[str, int]:
    return {p.party_id: p.amount.amount_minor for p in response.payouts}


def test_day_totals_are_the_sums_of_the_split_lines_and_duplicates_changed_nothing(world: World) -> None:
    day1 = totals(world.closes[DAY1])
    fares = [split(FARE, world.fares[f"fare-1-{n}"], "TWD") for n in range(5)]
    charge = split(SHOP, 12_345, "TWD", merchant_id="m-1")
    expected_metro = sum(lines[0].amount_minor for lines in fares)
    assert day1[("TRANSIT_OPERATOR", "metro")] == expected_metro
    assert day1[("CITY", "city")] == sum(lines[1].amount_minor for lines in fares) + charge[1].amount_minor
    assert day1[("PLATFORM", "platform")] == sum(lines[2].amount_minor for lines in fares) + charge[2].amount_minor
    assert day1[("MERCHANT", "m-1")] == charge[0].amount_minor + 500  # with the phantom charge
    assert sum(day1.values()) == sum(world.fares[f"fare-1-{n}"] for n in range(5)) + 12_345 + 500
    # Every event was delivered twice; each movement has exactly one line per party.
    assert world.query("SELECT transfer_id, line_no, count(*) FROM {s}.settlement_lines GROUP BY 1, 2 "
                       "HAVING count(*) > 1") == []
    assert world.settlement.app.wallet_consumer.duplicates >= 1
    assert world.closes[DAY1].status == pb.SERVICE_DAY_STATUS_CLOSED


def test_payouts_pay_whole_dollars_and_carry_the_rest(world: World) -> None:
    day1 = world.closes[DAY1]
    paid = payouts(day1)
    sums = totals(day1)
    assert set(paid) == {"metro", "city", "m-1"}  # the platform keeps its share in its own balance
    for party_id, amount in paid.items():
        assert amount % 100 == 0 and amount > 0
    rows = world.query("SELECT party_id, lines_minor, carry_in_minor, paid_minor, carry_out_minor FROM {s}.day_totals "
                       "WHERE service_day = %s", (DAY1,))
    for party_id, lines, carry_in, paid_minor, carry_out in rows:
        assert lines + carry_in == paid_minor + carry_out
        assert 0 <= carry_out < 100 or party_id == "platform"
        assert sums[next(k for k in sums if k[1] == party_id)] == lines
    assert all(p.stripe_id.startswith("tr_") for p in day1.payouts)


def test_closing_twice_returns_the_original_result(world: World) -> None:
    world.settlement.clock.advance(3600)
    again = world.settlement.stub.CloseDay(pb.CloseDayRequest(service_day=DAY1))
    assert again == world.closes[DAY1]
    assert world.query("SELECT count(*) FROM {s}.payouts WHERE service_day = %s", (DAY1,))[0][0] == 3


def test_refunds_and_late_events_land_in_the_next_settlement(world: World) -> None:
    day2 = totals(world.closes[DAY2])
    refund = split_refund(split(SHOP, 12_345, "TWD", merchant_id="m-1"), 10_000)
    late, fare2 = split(FARE, 1000, "TWD"), split(FARE, 2500, "TWD")
    assert day2[("CITY", "city")] == late[1].amount_minor + fare2[1].amount_minor - refund[1].amount_minor
    # The merchant gave back more than it earned that day: nothing is paid, the debt is carried.
    carry_in = world.query("SELECT carry_out_minor FROM {s}.day_totals WHERE service_day = %s AND party_id = 'm-1'",
                           (DAY1,))[0][0]
    assert day2[("MERCHANT", "m-1")] == -refund[0].amount_minor
    row = world.query("SELECT carry_in_minor, paid_minor, carry_out_minor FROM {s}.day_totals WHERE service_day = %s "
                      "AND party_id = 'm-1'", (DAY2,))[0]
    assert row == (carry_in, 0, carry_in - refund[0].amount_minor)
    assert "m-1" not in payouts(world.closes[DAY2])
    assert world.query("SELECT count(*) FROM {s}.payouts WHERE service_day = %s", (DAY2,))[0][0] == len(
        world.closes[DAY2].payouts)
    late_line = world.query("SELECT service_day, settle_day FROM {s}.settlement_lines WHERE transfer_id = %s",
                            (world.late_fare,))[0]
    assert [d.isoformat() for d in late_line] == [DAY1, DAY2]


def test_reports_as_csv_and_pdf_for_each_party(world: World) -> None:
    stub = world.settlement.stub
    report = stub.GetReport(pb.GetReportRequest(party=split_pb2.PARTY_CITY, party_id="city", service_day=DAY1,
                                                page_size=2))
    assert report.total.amount.amount_minor == totals(world.closes[DAY1])[("CITY", "city")]
    assert len(report.lines) == 2 and report.next_page_token
    assert report.payout.party_id == "city"
    base = Path(world.settlement.settings.report_dir)
    rows = list(csv.DictReader((base / report.csv_path).open()))
    assert len(rows) == report.total.line_count == 6
    assert sum(int(r["amount_minor"]) for r in rows) == report.total.amount.amount_minor
    pdf = (base / report.pdf_path).read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") >= 3
    # A merchant's report holds only its own movements.
    merchant = stub.GetReport(pb.GetReportRequest(party=split_pb2.PARTY_MERCHANT, party_id="m-1", service_day=DAY1))
    assert {line.transfer_id for line in merchant.lines} == {"pay-1", world.phantom_transfer}
    for bad, reason in [(pb.GetReportRequest(party=split_pb2.PARTY_CITY, party_id="city", service_day="2030-01-05"),
                         "INVALID_STATE"),
                        (pb.GetReportRequest(party=split_pb2.PARTY_CITY, party_id="nobody", service_day=DAY1),
                         "NOT_FOUND"),
                        (pb.GetReportRequest(party=split_pb2.PARTY_CITY, party_id="city", service_day="01/01/2030"),
                         "INVALID_ARGUMENT")]:
        with pytest.raises(grpc.RpcError) as info:
            stub.GetReport(bad)
        assert error_reason(info.value) == reason


def clean_report(world: World, day: str) -> list[ReportItem]:
    """What Stripe's report holds for the day: its payouts, and its top-ups (by CityTap's id in the metadata)."""
    rows = world.query("SELECT payout_id, stripe_id, amount_minor, created_at FROM {s}.payouts WHERE service_day = %s "
                       "ORDER BY payout_id", (day,))
    items = [ReportItem(f"txn_{n}{uuid.uuid4().hex[:8]}", created + timedelta(seconds=5), "TWD", -amount, "transfer",
                        source_id=stripe_id, payout_id=payout_id) for n, (payout_id, stripe_id, amount, created)
             in enumerate(rows)]
    for transfer_id, amount, at in world.query("SELECT transfer_id, amount_minor, occurred_at FROM "
                                               "{s}.provider_movements WHERE service_day = %s", (day,)):
        items.append(ReportItem(f"txn_{uuid.uuid4().hex[:12]}", at, "TWD", amount, "charge", top_up_id=transfer_id,
                                fee_minor=amount * 3 // 100))
    return items


def kinds(response: pb.ReconcileResponse) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for d in response.differences:
        found.setdefault(pb.DifferenceKind.Name(d.kind).removeprefix("DIFFERENCE_KIND_"), []).append(d.reference_id)
    return found


def test_reconciliation_lists_each_injected_discrepancy_with_its_kind(world: World) -> None:
    items = clean_report(world, DAY1)
    assert len(items) == 3
    missing, mismatched, duplicated = items
    injected = [
        replace(mismatched, gross_minor=mismatched.gross_minor - 100),   # the provider paid another amount
        duplicated, replace(duplicated, balance_transaction_id=duplicated.balance_transaction_id),  # listed twice
        ReportItem("txn_stranger", DAY1_NOON, "TWD", -4200, "transfer", source_id="tr_stranger"),  # unknown to us
        ReportItem("txn_fee", DAY1_NOON, "TWD", -25, "stripe_fee"),  # not a kind CityTap compares
    ]  # and `missing` is left out
    response = world.settlement.stub.Reconcile(pb.ReconcileRequest(service_day=DAY1, provider_report_csv=write(injected)))
    found = kinds(response)
    missing_payout = world.query("SELECT payout_id FROM {s}.payouts WHERE stripe_id = %s", (missing.source_id,))[0][0]
    assert found == {
        "MISSING_AT_PROVIDER": [missing_payout],
        "AMOUNT_MISMATCH": [mismatched.payout_id],
        "DUPLICATE": [duplicated.balance_transaction_id],
        "UNKNOWN_ID": ["tr_stranger"],
        "MISSING_IN_SETTLEMENT": [world.skipped_transfer],
        "MISSING_IN_LEDGER": [world.phantom_transfer],
    }
    assert response.unexplained_count == len(response.differences) == 6
    by_kind = {d.kind: d for d in response.differences}
    mismatch = by_kind[pb.DIFFERENCE_KIND_AMOUNT_MISMATCH]
    assert mismatch.provider_amount.amount_minor == mismatched.gross_minor - 100
    assert by_kind[pb.DIFFERENCE_KIND_MISSING_IN_SETTLEMENT].ledger_amount.amount_minor == 700
    assert not by_kind[pb.DIFFERENCE_KIND_MISSING_IN_SETTLEMENT].HasField("settlement_amount")
    # Five fares, the late fare (it happened on day 1) and the charge agree between ledger and settlement; the
    # payout listed twice agrees in amount (its second row is the DUPLICATE).
    assert response.matched_count == 8
    stored = world.query("SELECT difference_count, unexplained_count FROM {s}.reconciliations "
                         "WHERE reconciliation_id = %s", (response.reconciliation_id,))
    assert stored == [(6, 6)]


def test_a_day_reconciles_to_zero_differences_with_a_matching_report(world: World) -> None:
    # Day 2 has no injected movement; its payouts (metro, city) all appear at the provider.
    response = world.settlement.stub.Reconcile(pb.ReconcileRequest(service_day=DAY2,
                                                                   provider_report_csv=write(clean_report(world, DAY2))))
    assert kinds(response) == {}
    assert response.unexplained_count == 0
    # refund-1 and fare-2-0 (ledger and settlement), the top-up (all three sides), then the payouts.
    assert response.matched_count == 3 + len(payouts(world.closes[DAY2]))


def test_a_report_run_before_a_payout_explains_its_absence(world: World) -> None:
    items = clean_report(world, DAY2)
    assert items
    # The report's newest row is an hour older than the day's payouts: it was run before them.
    early = [ReportItem("txn_fee_early", min(i.created_at for i in items) - timedelta(hours=1), "TWD", -25,
                        "stripe_fee")]
    response = world.settlement.stub.Reconcile(pb.ReconcileRequest(service_day=DAY2, provider_report_csv=write(early)))
    missing = [d for d in response.differences if d.kind == pb.DIFFERENCE_KIND_MISSING_AT_PROVIDER]
    assert len(missing) == len(items) and all(d.explained for d in missing)  # the payouts and the top-up
    assert all("newest row" in d.cause for d in missing)
    assert response.unexplained_count == 0


@pytest.mark.parametrize("report, column", [
    (b"", ""),
    (b"\xff\xfe not utf-8", ""),
    (b"balance_transaction_id,created_utc,currency,gross,fee,net\n", "reporting_category"),
    (b"balance_transaction_id,created_utc,currency,gross,fee,net,reporting_category\ntxn_1,2030-01-01 04:00:00,twd,"
     b"1.005,0.00,1.005,charge\n", "gross"),
    (b"balance_transaction_id,created_utc,currency,gross,fee,net,reporting_category\ntxn_1,yesterday,twd,"
     b"1.00,0.00,1.00,charge\n", "created_utc"),
    (b"balance_transaction_id,created_utc,currency,gross,fee,net,reporting_category\ntxn_1,2030-01-01 04:00:00,twd,"
     b"1.00,0.10,1.00,charge\n", "net"),
    (b"balance_transaction_id,created_utc,currency,gross,fee,net,reporting_category\ntxn_1,2030-01-01 04:00:00,twd\n",
     ""),
])
def test_malformed_report_files_are_refused_and_change_nothing(world: World, report: bytes, column: str) -> None:
    before = world.query("SELECT count(*) FROM {s}.reconciliations")[0][0]
    with pytest.raises(grpc.RpcError) as info:
        world.settlement.stub.Reconcile(pb.ReconcileRequest(service_day=DAY1, provider_report_csv=report))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(info.value) == "MALFORMED_REPORT"
    metadata = error_info(info.value).metadata
    assert "line" in metadata and metadata.get("column", "") == column
    assert world.query("SELECT count(*) FROM {s}.reconciliations")[0][0] == before


def test_reconciling_an_open_day_is_refused(world: World) -> None:
    with pytest.raises(grpc.RpcError) as info:
        world.settlement.stub.Reconcile(pb.ReconcileRequest(service_day="2030-01-03",
                                                            provider_report_csv=write([])))
    assert error_reason(info.value) == "INVALID_STATE"


def test_export_writes_every_table_with_a_schema_and_is_idempotent(world: World) -> None:
    stub = world.settlement.stub
    export_id = str(uuid.uuid4())
    first = stub.Export(pb.ExportRequest(export_id=export_id, format=pb.EXPORT_FORMAT_CSV))
    tables = {f.table: f for f in first.files}
    assert set(tables) >= {"accounts", "transfers", "transfer_splits", "contracts", "contract_terms",
                           "settlement_lines", "day_totals", "payouts", "reconciliations", "reconciliation_differences"}
    base = Path(world.settlement.settings.export_dir)
    package = json.loads((base / first.schema_path).read_text())
    assert {r["name"] for r in package["resources"]} == set(tables)
    transfers = list(csv.DictReader((base / tables["transfers"].path).open()))
    assert {t["transfer_id"] for t in transfers} >= {"pay-1", "refund-1", world.skipped_transfer}
    assert tables["transfers"].row_count == len(transfers)
    assert tables["settlement_lines"].row_count == world.query("SELECT count(*) FROM {s}.settlement_lines")[0][0]
    for resource in package["resources"]:
        header = (base / export_id / resource["path"]).open().readline().strip().split(",")
        assert header == [f["name"] for f in resource["schema"]["fields"]]
    again = stub.Export(pb.ExportRequest(export_id=export_id, format=pb.EXPORT_FORMAT_CSV))
    assert again == first
    with pytest.raises(grpc.RpcError) as info:
        stub.Export(pb.ExportRequest(export_id=export_id, format=pb.EXPORT_FORMAT_PARQUET))
    assert error_reason(info.value) == "IDEMPOTENCY_CONFLICT"
    parquet = stub.Export(pb.ExportRequest(export_id=str(uuid.uuid4()), format=pb.EXPORT_FORMAT_PARQUET,
                                           through_service_day=DAY1))
    from pyarrow import parquet as pq

    lines = next(f for f in parquet.files if f.table == "settlement_lines")
    table = pq.read_table(base / lines.path)
    assert table.num_rows == lines.row_count == world.query(
        "SELECT count(*) FROM {s}.settlement_lines WHERE settle_day <= %s", (DAY1,))[0][0]


def test_finance_cli_shows_days_reports_and_reconciliation(world: World, tmp_path: Path) -> None:
    import io

    from services.settlement import finance
    from services.settlement.settings import FinanceSettings

    settings = FinanceSettings(settlement_address="127.0.0.1:1", report_dir=world.settlement.settings.report_dir,
                               export_dir=world.settlement.settings.export_dir)

    def cli(*argv: str) -> tuple[int, str]:
        out = io.StringIO()
        return finance.run(list(argv), out, stub=world.settlement.stub, settings=settings), out.getvalue()

    code, text = cli("close-day", DAY1)  # closed already: the original result
    assert code == 0 and "metro" in text and "tr_" in text
    code, text = cli("day", DAY1)
    assert code == 0 and "CLOSED" in text
    code, text = cli("report", DAY1)
    assert code == 0 and text.count(".pdf") == 4 and "CITY city" in text
    report = tmp_path / "report.csv"
    report.write_bytes(write(clean_report(world, DAY2)))
    code, text = cli("reconcile", DAY2, "--provider-report", str(report))
    assert code == 0 and "0 unexplained" in text
    report.write_bytes(write([]))
    code, text = cli("reconcile", DAY2, "--provider-report", str(report))
    assert code == 1 and "UNEXPLAINED MISSING_AT_PROVIDER" in text
    code, text = cli("contracts")
    assert code == 0


@pytest.mark.parametrize("argv, message", [
    (["close-day", "2030-13-45x"], "YYYY-MM-DD"),
    (["reconcile", DAY1, "--provider-report", "/nonexistent/report.csv"], "no such file"),
    (["report", DAY1, "--party", "CITY"], "go together"),
    (["export", "--format", "xml"], "invalid choice"),
])
def test_finance_cli_refuses_bad_input_with_exit_code_2(argv: list[str], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from services.settlement import finance

    try:
        code = finance.main(argv)
    except SystemExit as exc:  # argparse exits 2 itself
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_finance_cli_names_a_refused_request(world: World, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from services.settlement import finance

    monkeypatch.setenv("CITYTAP_SETTLEMENT_ADDRESS", f"127.0.0.1:{world.settlement.app.server.port}")
    assert finance.main(["report", "2030-01-09", "--party", "CITY", "--party-id", "city"]) == 2
    assert "INVALID_STATE" in capsys.readouterr().err
