"""Settlement's pure logic: service days, the provider report format, and the three-way comparison."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from libs import errors
from services.settlement.domain import ServiceDayClock, parse_day, payout_id, signed
from services.settlement.provider_report import ReportItem, parse, write
from services.settlement.reconcile import DayPayout, LedgerTransfer, ProviderMovement, compare
from services.settlement.stripe_payouts import payable_minor

UTC = timezone.utc
DAYS = ServiceDayClock(ZoneInfo("Asia/Taipei"), time(4, 30))
START, END = DAYS.bounds(date(2030, 1, 1))


def test_service_day_runs_from_0430_to_0429_local_time() -> None:
    assert START == datetime(2029, 12, 31, 20, 30, tzinfo=UTC)
    assert END == datetime(2030, 1, 1, 20, 30, tzinfo=UTC)
    assert DAYS.day_of(START) == date(2030, 1, 1)
    assert DAYS.day_of(START - timedelta(microseconds=1)) == date(2029, 12, 31)
    assert DAYS.day_of(END - timedelta(microseconds=1)) == date(2030, 1, 1)
    assert DAYS.day_of(END) == date(2030, 1, 2)
    with pytest.raises(ValueError):
        DAYS.day_of(datetime(2030, 1, 1))


@pytest.mark.parametrize("text", ["", "2030-1-1", "2030-02-30", "01/01/2030", "2030-01-01T00:00"])
def test_bad_days_are_refused(text: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        parse_day(text)


def test_payout_ids_are_stable_and_distinct() -> None:
    day = date(2030, 1, 1)
    assert payout_id(day, "CITY", "city") == payout_id(day, "CITY", "city")
    assert len({payout_id(day, "CITY", "city"), payout_id(day, "CITY", "town"),
                payout_id(day + timedelta(days=1), "CITY", "city")}) == 3


def test_refunds_and_corrections_count_negative() -> None:
    assert signed(100, "FARE") == 100 and signed(100, "MERCHANT_PAYMENT") == 100
    assert signed(100, "MERCHANT_REFUND") == -100 and signed(100, "CORRECTION") == -100


def test_twd_payouts_are_whole_dollars() -> None:
    assert payable_minor(12_399, "TWD") == 12_300
    assert payable_minor(99, "TWD") == 0
    assert payable_minor(-500, "TWD") == 0
    assert payable_minor(12_399, "USD") == 12_399


def test_the_report_format_round_trips_exactly() -> None:
    items = [ReportItem("txn_1", datetime(2030, 1, 1, 3, 0, tzinfo=UTC), "TWD", 35_000, "charge",
                        source_id="ch_1", payment_intent_id="pi_1", top_up_id="tu-1", fee_minor=1_050),
             ReportItem("txn_2", datetime(2030, 1, 1, 4, 0, tzinfo=UTC), "TWD", -12_300, "transfer",
                        source_id="tr_1", payout_id="po-1"),
             ReportItem("txn_3", datetime(2030, 1, 1, 5, 0, tzinfo=UTC), "JPY", 500, "charge")]
    data = write(items)
    assert b"350.00,10.50,339.50" in data and b",twd," in data
    rows = parse(data)
    assert [(r.balance_transaction_id, r.gross_minor, r.fee_minor, r.net_minor, r.currency) for r in rows] == [
        ("txn_1", 35_000, 1_050, 33_950, "TWD"), ("txn_2", -12_300, 0, -12_300, "TWD"), ("txn_3", 500, 0, 500, "JPY")]
    assert rows[0].top_up_id == "tu-1" and rows[1].payout_id == "po-1"
    assert rows[0].created_at == datetime(2030, 1, 1, 3, 0, tzinfo=UTC)


def test_a_report_with_extra_columns_in_another_order_and_a_bom_is_read() -> None:
    data = ("\ufeffreporting_category,automatic_payout_id,net,fee,gross,currency,created_utc,balance_transaction_id,x\n"
            "charge,po_1,99.00,1.00,100.00,twd,2030-01-01 03:00:00,txn_9,extra\n").encode()
    [row] = parse(data)
    assert (row.balance_transaction_id, row.gross_minor, row.net_minor) == ("txn_9", 10_000, 9_900)


def _ledger(transfer_id: str, kind: str, amount: int, *, splits: bool) -> LedgerTransfer:
    return LedgerTransfer(transfer_id, kind, amount, "TWD", START + timedelta(hours=1), splits, amount if splits else 0)


def test_top_ups_compare_three_ways() -> None:
    at = START + timedelta(hours=1)
    ledger = [_ledger("topup-1", "TOP_UP", 50_000, splits=False), _ledger("topup-2", "TOP_UP", 20_000, splits=False),
              _ledger("topup-3", "TOP_UP", 30_000, splits=False), _ledger("refund-1", "TOP_UP_REFUND", 5_000,
                                                                          splits=False),
              _ledger("topup-4", "TOP_UP", 10_000, splits=False)]
    movements = [ProviderMovement("topup-1", "TOP_UP", "pi_1", "tu-1", 50_000, "TWD", at),
                 ProviderMovement("topup-2", "TOP_UP", "pi_2", "tu-2", 20_000, "TWD", at),
                 ProviderMovement("topup-3", "TOP_UP", "pi_3", "tu-3", 30_000, "TWD", at),
                 ProviderMovement("refund-1", "TOP_UP_REFUND", "re_1", "rf-1", -5_000, "TWD", at),
                 ProviderMovement("topup-9", "TOP_UP", "pi_9", "tu-9", 1_000, "TWD", at)]
    report = parse(write([
        ReportItem("txn_a", at, "TWD", 50_000, "charge", payment_intent_id="pi_1"),           # agrees
        ReportItem("txn_b", at, "TWD", 19_900, "charge", payment_intent_id="pi_2"),           # amount differs
        ReportItem("txn_c", at, "TWD", -5_000, "refund", refund_id="re_1"),                   # agrees
        ReportItem("txn_d", at, "TWD", 30_000, "charge", top_up_id="tu-3"),                   # agrees, by metadata
        ReportItem("txn_e", at, "TWD", 7_000, "charge", payment_intent_id="pi_unknown"),       # unknown
        ReportItem("txn_f", at - timedelta(days=2), "TWD", 8_000, "charge", payment_intent_id="pi_old"),  # other day
        ReportItem("txn_g", at, "TWD", 6_000, "charge", payment_intent_id="pi_prev"),         # another day's top-up
    ]))
    outcome = compare(ledger=ledger, lines={}, provider_movements=movements, payouts=[], report=report, start=START,
                      end=END, known_elsewhere={"pi_prev"}, currency="TWD")
    found = sorted((d.kind, d.reference_id) for d in outcome.differences)
    assert found == [("AMOUNT_MISMATCH", "topup-2"), ("MISSING_IN_LEDGER", "topup-9"),
                     ("MISSING_IN_SETTLEMENT", "topup-4"), ("UNKNOWN_ID", "txn_e")]
    assert outcome.matched == 3 and outcome.unexplained == 4


def test_a_provider_row_matching_a_movement_twice_is_a_duplicate() -> None:
    at = START + timedelta(hours=2)
    payout = DayPayout("po-1", "tr_1", 12_300, "TWD", at)
    report = parse(write([ReportItem("txn_1", at, "TWD", -12_300, "transfer", source_id="tr_1"),
                          ReportItem("txn_2", at, "TWD", -12_300, "transfer", payout_id="po-1")]))
    outcome = compare(ledger=[], lines={}, provider_movements=[], payouts=[payout], report=report, start=START,
                      end=END, known_elsewhere=set(), currency="TWD")
    assert [(d.kind, d.reference_id) for d in outcome.differences] == [("DUPLICATE", "po-1")]


def test_revenue_lines_that_do_not_add_up_are_an_amount_mismatch() -> None:
    ledger = [_ledger("fare-1", "FARE", 3_500, splits=True), _ledger("refund-1", "MERCHANT_REFUND", 1_000, splits=True)]
    outcome = compare(ledger=ledger, lines={"fare-1": 3_499, "refund-1": -1_000}, provider_movements=[], payouts=[],
                      report=[], start=START, end=END, known_elsewhere=set(), currency="TWD")
    assert [(d.kind, d.ledger_minor, d.settlement_minor) for d in outcome.differences] == [
        ("AMOUNT_MISMATCH", 3_500, 3_499)]
    assert outcome.matched == 1


def test_only_the_payouts_adapter_imports_stripe_in_settlement() -> None:
    import re
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "services" / "settlement"
    importing = re.compile(r"^\s*(import stripe\b|from stripe\b)", re.MULTILINE)
    assert [p.name for p in sorted(folder.rglob("*.py")) if importing.search(p.read_text())] == ["stripe_payouts.py"]


def test_the_pinned_stripe_api_version_is_the_wallets() -> None:
    from services.settlement.stripe_payouts import STRIPE_API_VERSION
    from services.wallet.stripe_gateway import STRIPE_API_VERSION as WALLET_VERSION

    assert STRIPE_API_VERSION == WALLET_VERSION


def test_a_refund_stripe_refused_and_the_ledger_reversed_is_explained() -> None:
    at = START + timedelta(hours=1)
    ledger = [_ledger("tur:rf-1", "TOP_UP_REFUND", 5_000, splits=False),
              replace(_ledger("tuc:rf-1", "CORRECTION", 5_000, splits=False), corrects_transfer_id="tur:rf-1"),
              _ledger("tur:rf-2", "TOP_UP_REFUND", 3_000, splits=False)]
    movements = [ProviderMovement("tur:rf-1", "TOP_UP_REFUND", "", "rf-1", -5_000, "TWD", at),
                 ProviderMovement("tur:rf-2", "TOP_UP_REFUND", "re_2", "rf-2", -3_000, "TWD", at)]
    report = parse(write([ReportItem("txn_x", at + timedelta(hours=1), "TWD", -25, "stripe_fee")]))
    outcome = compare(ledger=ledger, lines={}, provider_movements=movements, payouts=[], report=report, start=START,
                      end=END, known_elsewhere=set(), currency="TWD")
    found = {d.reference_id: (d.kind, d.explained) for d in outcome.differences}
    assert found == {"tur:rf-1": ("MISSING_AT_PROVIDER", True), "tur:rf-2": ("MISSING_AT_PROVIDER", False)}
    assert outcome.unexplained == 1
