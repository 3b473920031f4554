"""Fares split at the moment they are charged, through the real stack: the fare gate reads the
transit-fare contract from a real settlement servicer (contract book on a scratch schema), and
the wallet posts each fare with its split lines and, in the same transaction, the moves of
the city's and the platform's shares. Every figure is worked out in the test."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from libs.grpc_server import create_server
from libs.postgres import create_pool, migrate_folder
from libs.splits import Term
from services.settlement.contracts import Contracts
from services.settlement.domain import NewContractVersion
from services.settlement.servicer import SettlementServicer
from services.settlement.servicer import registration as settlement_registration
from tests.integration.fare_gate_support import (
    ENTRY,
    EXIT,
    OPEN,
    VALIDATE,
    FareGateStack,
    close_fare_gate_stack,
    open_fare_gate_stack,
)
from tests.integration.wallet_support import invariant_violations

ROOT = Path(__file__).resolve().parents[2]
OPERATOR = "metro-op"
CITY = "system:city-revenue:TWD"
PLATFORM = "system:platform-fees:TWD"
READY_WAIT_S_MAX = 20.0


@pytest.fixture(scope="module")
def stack(postgres_dsn: str) -> Iterator[FareGateStack]:
    """A fare gate whose transit-fare contract is: city 10 %, platform 2 % plus NT$0.50, the
    operator the rest; version 2, from `V2_FROM`, gives the city 20 % and the platform nothing."""
    schema = f"fs_{uuid.uuid4().hex[:10]}"
    migrate_folder(postgres_dsn, schema, ROOT / "services" / "settlement" / "migrations")
    pool = create_pool(postgres_dsn, name="test-fare-split", max_size=2)
    made_at = datetime.now(timezone.utc) - timedelta(days=2)  # versions take effect a lead time after they are made
    book = Contracts(pool, schema=schema, lead_time_s=60, currency="TWD", clock=lambda: made_at)
    for version, effective_from, terms in (
            (1, made_at + timedelta(hours=1), (Term("TRANSIT_OPERATOR", OPERATOR, remainder=True),
                                               Term("CITY", "taipei", basis_points=1_000),
                                               Term("PLATFORM", "citytap", basis_points=200, fixed_fee_minor=50))),
            (2, V2_FROM, (Term("TRANSIT_OPERATOR", OPERATOR, remainder=True), Term("CITY", "taipei", basis_points=2_000)))):
        book.create_version(NewContractVersion(contract_id="fares-metro-op", version=version, revenue_kind="TRANSIT_FARE",
                                               scope=OPERATOR, effective_from=effective_from, terms=terms,
                                               currency="TWD", note="test"))
    servicer = SettlementServicer()
    servicer.attach(contracts=book)
    server = create_server("127.0.0.1:0", [settlement_registration(servicer)], domain="settlement.citytap")
    server.start()
    server.set_serving(True)
    opened = open_fare_gate_stack(CITYTAP_SETTLEMENT_ADDRESS=f"127.0.0.1:{server.port}",
                                  CITYTAP_FARE_GATE_OPERATOR_ID=OPERATOR, CITYTAP_FARE_GATE_CONTRACT_CACHE_TTL_S="2")
    try:
        splitter = opened.service.splitter
        deadline = time.monotonic() + READY_WAIT_S_MAX
        while not splitter.contracts_known():
            assert time.monotonic() < deadline, "the fare gate never read the contracts"
            time.sleep(0.1)
        yield opened
    finally:
        close_fare_gate_stack(opened)
        server.stop(0)
        pool.close()
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


# Version 2 takes effect 3 hours ago; journeys below are replayed before and after it.
V2_FROM = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(hours=3)


def splits_of(stack: FareGateStack, transfer_id: str) -> list[tuple[str, str, int, str, int]]:
    return [tuple(r) for r in stack.query(
        "SELECT party, party_id, amount_minor, contract_id, contract_version FROM {w}.transfer_splits"
        " WHERE transfer_id = %s ORDER BY line_no", (transfer_id,))]


def moves_of(stack: FareGateStack, transfer_id: str) -> list[tuple[str, str, str, int, str]]:
    return [tuple(r) for r in stack.query(
        "SELECT id, debit_account_id, credit_account_id, amount_minor, kind FROM {w}.transfers"
        " WHERE id LIKE %s ORDER BY id", (f"{transfer_id}:share:%",))]


def test_an_exit_posts_the_fare_with_its_split_and_the_share_moves(stack: FareGateStack) -> None:
    rider = stack.rider(50_000)
    revenue = stack.revenue_account
    before = {a: stack.query("SELECT balance_minor FROM {w}.accounts WHERE id = %s", (a,))[0][0]
              for a in (revenue, CITY, PLATFORM)}
    t0 = V2_FROM - timedelta(hours=1)  # under version 1
    entry = stack.tap(rider, "HBR-G1", ENTRY, t0)
    exit_ = stack.tap(rider, "UNI-G2", EXIT, t0 + timedelta(minutes=20))  # NT$25.00
    assert (entry.decision, exit_.decision, exit_.fare_charged.amount_minor) == (OPEN, OPEN, 2500)
    [transfer_id] = [r[0] for r in stack.query("SELECT transfer_id FROM {fg}.journeys WHERE journey_id = %s",
                                               (entry.journey_id,))]
    # 2,500: the platform's fee of 50 first; 2,450 by basis points: city 10 % = 245, platform
    # 2 % = 49, the operator the remaining 88 % = 2,156.
    assert splits_of(stack, transfer_id) == [("TRANSIT_OPERATOR", OPERATOR, 2_156, "fares-metro-op", 1),
                                             ("CITY", "taipei", 245, "fares-metro-op", 1),
                                             ("PLATFORM", "citytap", 99, "fares-metro-op", 1)]
    assert moves_of(stack, transfer_id) == [(f"{transfer_id}:share:1", revenue, CITY, 245, "REVENUE_SHARE"),
                                            (f"{transfer_id}:share:2", revenue, PLATFORM, 99, "REVENUE_SHARE")]
    after = {a: stack.query("SELECT balance_minor FROM {w}.accounts WHERE id = %s", (a,))[0][0]
             for a in (revenue, CITY, PLATFORM)}
    assert (after[revenue] - before[revenue], after[CITY] - before[CITY], after[PLATFORM] - before[PLATFORM]) == (
        2_156, 245, 99)
    pool = create_pool(stack.dsn, name="test-fare-split-check", max_size=1)
    try:
        assert invariant_violations(pool, stack.wallet_schema) == []
    finally:
        pool.close()


def test_a_bus_fare_after_the_new_version_is_split_under_it(stack: FareGateStack) -> None:
    rider = stack.rider(50_000)
    request = stack.request(rider.card_uid, "BUS2-V1", VALIDATE, V2_FROM + timedelta(minutes=5), stop_id="BUS_CEN")
    bus = stack.stub.Tap(request)
    assert (bus.decision, bus.fare_charged.amount_minor) == (OPEN, 1_500)
    [transfer_id] = [r[0] for r in stack.query("SELECT transfer_id FROM {fg}.journeys WHERE journey_id = %s",
                                               (bus.journey_id,))]
    assert splits_of(stack, transfer_id) == [("TRANSIT_OPERATOR", OPERATOR, 1_200, "fares-metro-op", 2),
                                             ("CITY", "taipei", 300, "fares-metro-op", 2)]
    assert [m[2:4] for m in moves_of(stack, transfer_id)] == [(CITY, 300)]
    # A retried tap repeats its answer and moves nothing again.
    assert stack.stub.Tap(request) == bus
    assert len(moves_of(stack, transfer_id)) == 1 and stack.balance(rider) == (50_000 - 1_500, 0)
