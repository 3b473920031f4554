"""The demo city, end to end, against the running stack (`make demo`).

1. Every service reports SERVING.
2. The event backbone: a diagnostic event is written to a PostgreSQL outbox in one
   transaction, the outbox relay publishes it to the real Kafka broker, and a consumer with a
   PostgreSQL inbox receives and records it exactly once.
3. A morning in the demo city: card riders tap through metro gates and bus validators (the
   gate emulator plays services/fare_gate/emulator/scenarios/morning.json against the real
   fare gate and wallet): distance fares, a metro-to-bus transfer discount, the daily cap,
   a retry, a double tap, passback, an empty wallet and an exit without entry.
   Every fare is split at the moment it is charged under the transit-fare contract
   (scripts/demo_contracts.py makes the demo city's contracts once per stack and waits for
   them to take effect).
4. The ledger adds up: what the riders were charged is what the operator's revenue, the
   city's revenue and the platform's fees received between them, and the sum over every
   wallet account is zero.
5. A phone rider pays by signed QR code at the gates (scripts/demo_phone.py), and a face rider
   enrols with consent and is matched (scripts/demo_face.py).
6. A shop joins through Stripe Connect and a rider buys by card (scripts/demo_merchant.py).
7. The day is closed, each party's report printed, and reconciliation ends with zero
   differences (scripts/demo_settlement.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

from citytap.common.v1 import diagnostics_pb2
from citytap.settlement.v1 import settlement_pb2_grpc
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs import outbox
from libs.events import ConsumerLoop, Publisher, ensure_topics
from libs.grpc_client import connect
from libs.grpc_health_probe import check
from libs.outbox import OutboxRelay
from libs.postgres import PostgresInbox, create_pool
from scripts import demo_contracts, demo_face, demo_merchant, demo_phone, demo_settlement

SERVICES = ["fare_gate", "wallet", "face", "merchant", "settlement"]
TOPIC = "citytap.diagnostics.v1.events"
SCHEMA = "demo"
ROOT = Path(__file__).resolve().parents[1]
SCENARIO = ROOT / "services" / "fare_gate" / "emulator" / "scenarios" / "morning.json"
FARE_ACCOUNTS = {"operator revenue": "system:operator-revenue:TWD", "city revenue (its share)": "system:city-revenue:TWD",
                 "platform fees (its share)": "system:platform-fees:TWD"}


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    env = os.environ
    step("services")
    unhealthy = 0
    for name in SERVICES:
        address = env[f"CITYTAP_{name.upper()}_ADDRESS"]
        status = check(address, timeout_s=2)
        unhealthy += status != "SERVING"
        print(f"  {name:<11} {address:<18} {status}")
    if unhealthy:
        print("demo: some services are not serving; see `make status` and .local/stack/logs", file=sys.stderr)
        return 1

    step("event round trip: PostgreSQL outbox -> Kafka -> consumer inbox")
    dsn, bootstrap = env["CITYTAP_POSTGRES_DSN"], env["CITYTAP_KAFKA_BOOTSTRAP"]
    ensure_topics(bootstrap, [TOPIC])
    pool = create_pool(dsn, name="citytap-demo", max_size=3)
    with pool.connection() as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        outbox.ensure_table(conn, SCHEMA)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.pings_received (event_id text PRIMARY KEY, message text,"
                     " received_at timestamptz NOT NULL DEFAULT now())")

    event = diagnostics_pb2.DiagnosticEvent(event_id=str(uuid.uuid4()), account_key="demo-city")
    event.occurred_at.GetCurrentTime()
    event.ping_sent.message = "hello from the demo city"
    started = time.perf_counter()
    with pool.connection() as conn, conn.transaction():
        outbox.enqueue(conn, SCHEMA, TOPIC, event)
    print(f"  written to the outbox     event_id={event.event_id}")

    publisher = Publisher(bootstrap, client_id="citytap-demo")
    relay = OutboxRelay(pool, schema=SCHEMA, publisher=publisher)
    group = f"citytap-demo-{uuid.uuid4().hex[:8]}"

    def record(received: diagnostics_pb2.DiagnosticEvent, tx: object) -> None:
        # Each demo run joins a new consumer group, which also reads earlier runs' pings.
        tx.execute(f"INSERT INTO {SCHEMA}.pings_received (event_id, message) VALUES (%s, %s)"  # type: ignore[attr-defined]
                   " ON CONFLICT (event_id) DO NOTHING",
                   (received.event_id, received.ping_sent.message))

    consumer = ConsumerLoop(bootstrap=bootstrap, group_id=group, topics=[TOPIC],
                            envelope_type=diagnostics_pb2.DiagnosticEvent, handler=record,
                            inbox=PostgresInbox(pool, schema=SCHEMA, consumer=group))
    deadline = time.monotonic() + 30
    relayed = 0
    while time.monotonic() < deadline:
        relayed += relay.relay_once()
        consumer.run_once()
        with pool.connection() as conn:
            row = conn.execute(f"SELECT message FROM {SCHEMA}.pings_received WHERE event_id = %s",
                               (event.event_id,)).fetchone()
        if row:
            break
    elapsed_ms = (time.perf_counter() - started) * 1000
    consumer.close()
    publisher.close()
    pool.close()
    if not row:
        print("demo: the event did not come back through Kafka within 30 s", file=sys.stderr)
        return 1
    print(f"  relayed to Kafka topic    {TOPIC} ({relayed} outbox row(s) published)")
    print(f"  consumed and recorded     message={row[0]!r} in {elapsed_ms:.0f} ms (includes joining a new group)")
    step("the demo city's split contracts (settlement)")
    settlement = settlement_pb2_grpc.SettlementServiceStub(connect(env["CITYTAP_SETTLEMENT_ADDRESS"],
                                                                   default_timeout_s=10))
    # After a new contract takes effect, the fare gate's worker may take half its cache TTL to read it.
    settle_s = int(env.get("CITYTAP_FARE_GATE_CONTRACT_CACHE_TTL_S", "30")) / 2 + 1
    demo_contracts.merchant_payments(settlement)
    demo_contracts.transit_fares(settlement, settle_s=settle_s)
    if not morning_in_the_city(env):
        return 1
    try:
        demo_phone.run(env)
        demo_face.run(env)
        demo_merchant.run(env)
        demo_settlement.run(env)
    except RuntimeError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print("\ndemo: every service is SERVING, the event made the round trip through the real broker, the")
    print("      riders' journeys were priced, charged and split, phone and face riders paid, a shop joined")
    print("      and sold, the ledger adds up, and the day closed and reconciled with zero differences.")
    return 0


def fare_accounts(stub: wallet_pb2_grpc.WalletServiceStub) -> dict[str, int]:
    """The balances of the accounts fares end up in: operator revenue, city revenue, platform fees."""
    return {name: stub.GetBalance(wallet_pb2.GetBalanceRequest(account_id=account_id)).balance.amount_minor
            for name, account_id in FARE_ACCOUNTS.items()}


def morning_in_the_city(env: os._Environ[str]) -> bool:
    step("a morning in the demo city: card riders at metro gates and bus validators")
    wallet = wallet_pb2_grpc.WalletServiceStub(connect(env["CITYTAP_WALLET_ADDRESS"], default_timeout_s=5))
    before = fare_accounts(wallet)
    with tempfile.TemporaryDirectory() as scratch:
        results_path = Path(scratch) / "morning.json"
        played = subprocess.run(
            [sys.executable, "-m", "services.fare_gate.emulator", "scenario", str(SCENARIO), "--setup",
             "--fund", "loadtests.taps:ledger_funder", "--shift-to-now", "--json-out", str(results_path)],
            cwd=ROOT, env=env, timeout=300)
        if played.returncode != 0:
            print("demo: the scenario did not play as expected (see above)", file=sys.stderr)
            return False
        taps = json.loads(results_path.read_text())
    charged: dict[str, int] = {}
    for tap in taps:
        answer = tap.get("answer") or {}
        charged.setdefault(answer.get("tap_id", tap["tap_id"]), answer.get("fare_minor", 0))
    fares_minor = sum(charged.values())
    after = fare_accounts(wallet)
    gains = {name: after[name] - before[name] for name in FARE_ACCOUNTS}

    step("the ledger adds up")
    print(f"  fares charged at the gates           TWD {fares_minor / 100:>10.2f}")
    for name, gain in gains.items():
        print(f"  {name + ' received':<36} TWD {gain / 100:>10.2f}")
    with psycopg.connect(env["CITYTAP_POSTGRES_DSN"], connect_timeout=5) as conn:
        sums = conn.execute("SELECT currency, sum(balance_minor)::bigint, count(*) FROM wallet.accounts"
                            " GROUP BY currency").fetchall()
    for currency, total, accounts in sums:
        print(f"  sum over all {accounts} wallet accounts ({currency})  {total:>10d} minor units")
    balanced = all(total == 0 for _, total, _ in sums)
    if fares_minor != sum(gains.values()) or not balanced:
        print("demo: the ledger does not add up", file=sys.stderr)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
