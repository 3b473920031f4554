"""Crash tests (issue 3): kill the wallet process and the outbox relay mid-flow; afterwards
every committed transfer has exactly one event and every event has its transfer.

Both tests run the real wallet (`python -m services.wallet`, its relay switched off) and
the standalone relay (`python -m libs.outbox_relay`) as subprocesses against the stack's
PostgreSQL, Kafka, Redis and stripe-mock, on a fresh schema and ports of their own, and
kill them with SIGKILL (see wallet_crash_support.py).

1. Under load: client threads, one rider each, open their account, fund it through the
   real top-up flow (TopUp, then a signed payment_intent.succeeded webhook), then pay fares,
   pay merchants in linked batches, tap (hold, then post less), abandon taps (void), leave
   short holds to expire, top up again, and replay acknowledged batches. Every write has a
   client-generated id that is reused on every retry; each client retries until each of its
   operations is acknowledged. Meanwhile the wallet and the relay are each killed at seeded
   random moments and restarted. Then the outbox is drained, the topic read, and the
   tables, the outbox, the topic and the clients' own record of what was acknowledged
   must all agree (see `audit` and `check_clients`).
2. One linked batch, many times: send it, kill the wallet 0-20 ms later, and look: the
   batch is in the ledger whole with its one outbox event, or not at all; the retry (same
   ids) completes it exactly once.

Knobs: WALLET_CRASH_SEED, WALLET_CRASH_CLIENTS, WALLET_CRASH_WALLET_KILLS,
WALLET_CRASH_RELAY_KILLS, WALLET_CRASH_BATCH_KILLS; WALLET_CRASH_KEEP_SCHEMA=1 keeps the
schema for inspection. A failure prints the seed and the tail of both processes' logs.
"""

from __future__ import annotations

import os
import random
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import psycopg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from psycopg import sql

from citytap.common.v1 import money_pb2
from citytap.wallet.v1 import events_pb2, wallet_pb2, wallet_pb2_grpc
from libs.events import ensure_topics
from libs.postgres import create_pool
from tests.integration.wallet_crash_support import (
    CALL_TIMEOUT_S,
    RETRYABLE,
    TOPIC,
    Audit,
    CrashRig,
    Retrier,
    Stats,
    audit,
    channel,
    deliver_webhook,
    end_offsets,
    payment_succeeded,
    query,
    read_records,
    wait_until,
)
from tests.integration.wallet_support import env_int, invariant_violations

SEED = env_int("WALLET_CRASH_SEED", 20300303)
CLIENTS = env_int("WALLET_CRASH_CLIENTS", 6)
WALLET_KILLS = env_int("WALLET_CRASH_WALLET_KILLS", 10)
RELAY_KILLS = env_int("WALLET_CRASH_RELAY_KILLS", 20)
BATCH_KILLS = env_int("WALLET_CRASH_BATCH_KILLS", 20)
OPS_PER_CLIENT_MIN = 15
BATCH_WARMUPS = 5

CURRENCY = "TWD"
REVENUE = "system:operator-revenue:TWD"
CITY = "system:city-revenue:TWD"
FEES = "system:platform-fees:TWD"
CLEARING = "system:stripe-clearing:TWD"
FIRST_TOP_UP = 300_000
STORED_VALUE_MAX = 1_000_000
EXPIRING_HOLD_S = 2.0


def twd(amount_minor: int) -> money_pb2.Money:
    return money_pb2.Money(amount_minor=amount_minor, currency=CURRENCY)


def transfer(transfer_id: str, debit: str, credit: str, amount: int, kind: int) -> wallet_pb2.Transfer:
    return wallet_pb2.Transfer(transfer_id=transfer_id, debit_account_id=debit, credit_account_id=credit,
                               amount=twd(amount), kind=kind)


@pytest.fixture()
def crash_schema(postgres_dsn: str) -> Iterator[str]:
    name = f"crash_{uuid.uuid4().hex[:10]}"
    yield name
    if os.environ.get("WALLET_CRASH_KEEP_SCHEMA") != "1":
        with psycopg.connect(postgres_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture()
def rig(crash_schema: str, tmp_path: Path, kafka_bootstrap: str) -> Iterator[CrashRig]:
    ensure_topics(kafka_bootstrap, [TOPIC])  # so the start offsets can be taken before the wallet runs
    rig = CrashRig(crash_schema, tmp_path, extra_env={"CITYTAP_WALLET_HOLD_SWEEP_INTERVAL_MS": "200"})
    try:
        yield rig
    finally:
        rig.close()  # pass or fail, no wallet or relay outlives the test


# --- a rider client and what it knows was acknowledged ------------------------------------------


@dataclass
class Acknowledged:
    """Everything the wallet acknowledged to one client."""

    transfers: dict[str, tuple[str, str, int]] = field(default_factory=dict)  # id -> (debit, credit, amount)
    holds: dict[str, str] = field(default_factory=dict)                        # id -> outcome it must reach
    refused_holds: set[str] = field(default_factory=set)
    top_ups: dict[str, int] = field(default_factory=dict)
    batches: list[tuple[wallet_pb2.CreateTransfersRequest, wallet_pb2.CreateTransfersResponse]] = \
        field(default_factory=list)


class RiderClient:
    """One rider's app: sequential operations, each retried with the same ids until acknowledged.

    It keeps its own model of the rider's balance (exact) and reserved funds (conservative:
    a hold left to expire stays counted), so it never asks for more than is available and
    a refusal for funds or limits is a failure of the test."""

    def __init__(self, index: int, tag: str, rig: CrashRig, merchants: list[str], stats: Stats) -> None:
        self.rng = random.Random(f"{SEED}:client:{index}")
        self.tag = f"{tag}-c{index}"
        self.rider = f"{self.tag}-rider"
        self.rig = rig
        self.merchants = merchants
        self.stats = stats
        self.retrier = Retrier(stats)
        self._channel = channel(rig.address)
        self.stub = wallet_pb2_grpc.WalletServiceStub(self._channel)
        self.balance = 0
        self.reserved = 0
        self.merchant_net: Counter[str] = Counter()
        self.acked = Acknowledged()
        self.ops: Counter[str] = Counter()
        self._ids = 0

    def new_id(self, kind: str) -> str:
        self._ids += 1
        return f"{self.tag}-{kind}-{self._ids}"

    def close(self) -> None:
        self._channel.close()

    def call(self, method: Callable, request: object) -> object:
        return self.retrier.call(method, request)[0]

    def run(self, keep_going: threading.Event, abort: threading.Event) -> None:
        self.call(self.stub.CreateAccount, wallet_pb2.CreateAccountRequest(account_id=self.rider))
        self.ops["create account"] += 1
        self.top_up(FIRST_TOP_UP)
        while not abort.is_set() and (keep_going.is_set() or sum(self.ops.values()) < OPS_PER_CLIENT_MIN):
            self.step()

    def step(self) -> None:
        available = self.balance - self.reserved
        if available < 25_000:
            amount = self.rng.choice([50_000, 100_000, 200_000])
            if self.balance + amount > STORED_VALUE_MAX - 100_000:
                raise AssertionError(f"{self.rider}: funds reserved by expiring holds filled the wallet")
            self.top_up(amount)
            return
        r = self.rng.random()
        if r < 0.28:
            self.fare()
        elif r < 0.45:
            self.merchant_payment()
        elif r < 0.68:
            self.tap()
        elif r < 0.78:
            self.abandoned_tap()
        elif r < 0.86:
            self.expiring_hold()
        elif r < 0.93 and self.balance + 50_000 <= STORED_VALUE_MAX - 100_000:
            self.top_up(self.rng.choice([10_000, 20_000, 50_000]))
        elif self.acked.batches:
            self.replay()
        else:
            self.fare()

    # --- operations ---

    def top_up(self, amount: int) -> None:
        top_up_id = self.new_id("tu")
        response = self.call(self.stub.TopUp, wallet_pb2.TopUpRequest(top_up_id=top_up_id, account_id=self.rider,
                                                                      amount=twd(amount)))
        intent = response.top_up.payment_intent_id
        assert intent and response.client_secret, response
        # Stripe's part: the payment succeeded, and it tells the webhook endpoint (again and
        # again until it is answered 200, as Stripe redelivers).
        payload = payment_succeeded(f"evt_{uuid.uuid4().hex[:24]}", intent, top_up_id, self.rider, amount)
        outcome = deliver_webhook(self.rig.webhook_port, payload, self.rig.webhook_secret, self.stats)
        self.stats.add(f"webhook outcome {outcome}")
        if self.rng.random() < 0.25:  # Stripe delivers the same event twice
            assert deliver_webhook(self.rig.webhook_port, payload, self.rig.webhook_secret, self.stats) == "DUPLICATE"
            self.ops["duplicate webhook"] += 1
        self.balance += amount
        self.acked.top_ups[top_up_id] = amount
        self.acked.transfers[f"tu:{top_up_id}"] = (CLEARING, self.rider, amount)
        self.ops["top-up"] += 1

    def post_batch(self, transfers: list[wallet_pb2.Transfer]) -> None:
        request = wallet_pb2.CreateTransfersRequest(transfers=transfers)
        response = self.call(self.stub.CreateTransfers, request)
        assert [t.transfer_id for t in response.transfers] == [t.transfer_id for t in transfers], response
        for t in transfers:
            self.acked.transfers[t.transfer_id] = (t.debit_account_id, t.credit_account_id, t.amount.amount_minor)
            if t.debit_account_id == self.rider:
                self.balance -= t.amount.amount_minor
            for account, sign in ((t.credit_account_id, 1), (t.debit_account_id, -1)):
                if account in self.merchants:
                    self.merchant_net[account] += sign * t.amount.amount_minor
        self.acked.batches.append((request, response))

    def fare(self) -> None:
        self.post_batch([transfer(self.new_id("fare"), self.rider, REVENUE, self.rng.randint(500, 4000),
                                  wallet_pb2.TRANSFER_KIND_FARE)])
        self.ops["fare"] += 1

    def merchant_payment(self) -> None:
        """A payment and its split, linked: the merchant is paid, the platform takes its fee
        from the merchant, and sometimes the same batch pays a fare too."""
        merchant = self.rng.choice(self.merchants)
        amount = self.rng.randint(1000, 8000)
        batch = [transfer(self.new_id("pay"), self.rider, merchant, amount, wallet_pb2.TRANSFER_KIND_MERCHANT_PAYMENT),
                 transfer(self.new_id("fee"), merchant, FEES, max(1, amount * 3 // 100), wallet_pb2.TRANSFER_KIND_FEE)]
        if self.rng.random() < 0.5:
            batch.append(transfer(self.new_id("fare"), self.rider, CITY, self.rng.randint(500, 4000),
                                  wallet_pb2.TRANSFER_KIND_FARE))
        self.post_batch(batch)
        self.ops["linked batch"] += 1

    def place_hold(self, hold_id: str, amount: int, expires_at: datetime | None = None) -> None:
        request = wallet_pb2.CreateHoldRequest(hold_id=hold_id, debit_account_id=self.rider, credit_account_id=REVENUE,
                                               amount=twd(amount), kind=wallet_pb2.TRANSFER_KIND_FARE)
        if expires_at is not None:
            stamp = Timestamp()
            stamp.FromDatetime(expires_at)
            request.expires_at.CopyFrom(stamp)
        response = self.call(self.stub.CreateHold, request)
        assert response.hold.hold_id == hold_id and response.hold.amount.amount_minor == amount, response

    def tap(self) -> None:
        """Tap in (hold the maximum fare), tap out (post the actual fare, releasing the rest)."""
        held = self.rng.randint(1000, 5000)
        hold_id = self.new_id("hold")
        self.place_hold(hold_id, held)
        fare = self.rng.randint(300, held)
        response = self.call(self.stub.PostHold, wallet_pb2.PostHoldRequest(hold_id=hold_id, amount=twd(fare)))
        assert response.transfer.transfer_id == hold_id and response.transfer.amount.amount_minor == fare, response
        assert response.hold.status == wallet_pb2.HOLD_STATUS_POSTED, response
        self.balance -= fare
        self.acked.holds[hold_id] = "POSTED"
        self.acked.transfers[hold_id] = (self.rider, REVENUE, fare)
        self.ops["tap (hold, post)"] += 1

    def abandoned_tap(self) -> None:
        hold_id = self.new_id("hold")
        self.place_hold(hold_id, self.rng.randint(1000, 5000))
        response = self.call(self.stub.VoidHold, wallet_pb2.VoidHoldRequest(hold_id=hold_id))
        assert response.hold.status == wallet_pb2.HOLD_STATUS_VOIDED, response
        self.acked.holds[hold_id] = "VOIDED"
        self.ops["tap (hold, void)"] += 1

    def expiring_hold(self) -> None:
        """A hold nobody settles: the sweeper (or the next debit, lazily) expires it. If the
        wallet stayed down past its expiry before the first attempt committed, the retry is
        a new request whose expiry is in the past, and refused; it must then leave no trace."""
        amount = self.rng.randint(500, 2000)
        hold_id = self.new_id("hold")
        expires_at = datetime.now(timezone.utc) + timedelta(seconds=EXPIRING_HOLD_S)
        try:
            self.place_hold(hold_id, amount, expires_at)
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.INVALID_ARGUMENT and datetime.now(timezone.utc) >= expires_at:
                self.acked.refused_holds.add(hold_id)
                self.ops["expiring hold refused as expired"] += 1
                return
            raise
        self.reserved += amount
        self.acked.holds[hold_id] = "EXPIRED"
        self.ops["expiring hold"] += 1

    def replay(self) -> None:
        """Send an acknowledged batch again, as a client that lost the answer would."""
        request, first = self.rng.choice(self.acked.batches)
        again = self.call(self.stub.CreateTransfers, request)
        assert list(again.transfers) == list(first.transfers), (first, again)
        self.ops["replayed batch"] += 1


def unpublished(dsn: str, schema: str) -> int:
    return query(dsn, schema, "SELECT count(*) FROM {s}.outbox_events WHERE published_at IS NULL")[0][0]


def drain(rig: CrashRig, dsn: str) -> float:
    """Stop the wallet gracefully, make sure a relay runs, and wait until it has published
    every outbox row; returns the seconds waited."""
    code = rig.wallet.terminate()
    assert code == 0, f"the wallet stopped with {code}:\n{rig.wallet.tail()}"
    rig.check_relay()
    if not rig.relay.alive():
        rig.relay.start()
    waited = wait_until("the relay publishes the whole outbox", lambda: unpublished(dsn, rig.schema) == 0,
                        timeout_s=30)
    code = rig.relay.terminate()
    assert code == 0, f"the relay stopped with {code}:\n{rig.relay.tail()}"
    return waited


def report(title: str, figures: dict[str, object]) -> None:
    print(f"\n[wallet-crash] {title}")
    for name, value in figures.items():
        print(f"  {name:<44} {value}")


def assert_audit(result: Audit) -> None:
    assert not result.problems, "\n".join(result.problems[:50])
    assert result.distinct_events == result.outbox_rows
    assert result.records == result.distinct_events + result.duplicates


# --- 1. under load, kill the wallet and the relay at random ----------------------------------------


def test_killing_the_wallet_and_the_relay_under_load_neither_loses_nor_invents_an_event(
        rig: CrashRig, postgres_dsn: str, kafka_bootstrap: str) -> None:
    started = time.monotonic()
    tag = f"k{uuid.uuid4().hex[:8]}"
    stats = Stats()
    start_offsets = end_offsets(kafka_bootstrap)
    clients: list[RiderClient] = []
    try:
        rig.start_wallet()
        rig.relay.start()
        setup = channel(rig.address)
        stub = wallet_pb2_grpc.WalletServiceStub(setup)
        merchants = [f"{tag}-merchant-{i}" for i in range(2)]
        for merchant in merchants:
            Retrier(stats).call(stub.CreateAccount, wallet_pb2.CreateAccountRequest(
                account_id=merchant, kind=wallet_pb2.ACCOUNT_KIND_MERCHANT_PAYABLE, owner_id=f"{merchant}-owner"))
        setup.close()

        clients = [RiderClient(i, tag, rig, merchants, stats) for i in range(CLIENTS)]
        keep_going, abort = threading.Event(), threading.Event()
        keep_going.set()
        failures: list[str] = []
        kills: Counter[str] = Counter()

        def guarded(name: str, work: Callable[[], None]) -> threading.Thread:
            def run() -> None:
                try:
                    work()
                except BaseException:  # noqa: BLE001 - reported by the main thread
                    failures.append(f"{name}:\n{traceback.format_exc()}")
                    abort.set()
            thread = threading.Thread(target=run, name=name, daemon=True)
            thread.start()
            return thread

        def kill_wallet_repeatedly() -> None:
            rng = random.Random(f"{SEED}:wallet")
            for _ in range(WALLET_KILLS):
                if abort.wait(rng.uniform(0.4, 1.8)):
                    return
                if stats.inflight():
                    kills["wallet kills with calls in flight"] += 1
                rig.wallet.kill()
                time.sleep(rng.uniform(0.0, 0.3))
                rig.start_wallet()

        def kill_relay_repeatedly() -> None:
            rng = random.Random(f"{SEED}:relay")
            for _ in range(RELAY_KILLS):
                # Down for a moment, a backlog builds; the restarted relay publishes it in one
                # batch soon after it starts, which is when the next kill is likeliest to land.
                if abort.wait(rng.uniform(0.15, 1.0)):
                    return
                rig.check_relay()
                if unpublished(postgres_dsn, rig.schema):
                    kills["relay kills with rows unpublished"] += 1
                rig.relay.kill()
                time.sleep(rng.uniform(0.0, 0.5))
                rig.relay.start()

        load_started = time.monotonic()
        workers = [guarded(f"client-{c.rider}", lambda c=c: c.run(keep_going, abort)) for c in clients]
        chaos = [guarded("wallet chaos", kill_wallet_repeatedly), guarded("relay chaos", kill_relay_repeatedly)]
        for thread in chaos:
            thread.join(timeout=120)
        keep_going.clear()
        for thread in workers:
            thread.join(timeout=60)
        load_s = time.monotonic() - load_started
        assert not failures, "\n".join(failures)
        assert not any(t.is_alive() for t in chaos + workers), "a client or chaos thread did not finish"

        # Let the holds left to expire expire (the sweeper runs every 200 ms), then drain.
        wait_until("every hold is resolved", lambda: query(
            postgres_dsn, rig.schema, "SELECT count(*) FROM {s}.pending_holds")[0][0] == 0, timeout_s=20)
        drain_s = drain(rig, postgres_dsn)
        records = read_records(kafka_bootstrap, start_offsets, end_offsets(kafka_bootstrap))
        result = audit(postgres_dsn, rig.schema, records, tag)

        ops: Counter[str] = Counter()
        for client in clients:
            ops.update(client.ops)
        report(f"under load (seed {SEED}, {CLIENTS} clients, schema {rig.schema})", {
            "wallet kills (SIGKILL, restarted)": rig.wallet.kills,
            "  of which with calls in flight": kills["wallet kills with calls in flight"],
            "relay kills (SIGKILL, restarted)": rig.relay.kills,
            "  of which with outbox rows unpublished": kills["relay kills with rows unpublished"],
            "wallet restart to SERVING, max s": f"{max(rig.serving_waits_s):.2f}",
            "operations acknowledged": sum(ops.values()),
            **{f"  {name}": n for name, n in sorted(ops.items())},
            "calls retried after a crash": stats["retried calls"],
            "  retries: UNAVAILABLE / DEADLINE_EXCEEDED":
                f"{stats['retry:UNAVAILABLE']} / {stats['retry:DEADLINE_EXCEEDED']}",
            "webhooks redelivered after a crash": stats["retried webhooks"],
            "webhook outcomes": {k.split()[-1]: v for k, v in stats.counts.items() if k.startswith("webhook outcome")},
            "transfers / holds / resolutions / accounts":
                f"{result.transfers} / {result.holds} / {result.resolutions} / {result.accounts}",
            "outbox rows": result.outbox_rows,
            "events on the topic (records)": result.records,
            "distinct events": result.distinct_events,
            "duplicates (republished by a killed relay)": result.duplicates,
            "event types": dict(result.event_types),
            "load s / drain s / whole test s": f"{load_s:.1f} / {drain_s:.1f} / {time.monotonic() - started:.1f}",
        })

        assert_audit(result)
        check_clients(postgres_dsn, rig.schema, clients, merchants)
        assert rig.wallet.kills == WALLET_KILLS and rig.relay.kills == RELAY_KILLS
        assert kills["wallet kills with calls in flight"] > 0, "no kill of the wallet interrupted a call"
        assert kills["relay kills with rows unpublished"] > 0, "no kill of the relay left work behind"
        assert stats["retried calls"] > 0, "no client call was retried: the kills were not felt"
        assert result.transfers > 0 and result.event_types["transfer_posted"] > 0
        assert result.event_types["hold_posted"] > 0 and result.event_types["hold_expired"] > 0
    except BaseException:
        print(f"\n[wallet-crash] failed with WALLET_CRASH_SEED={SEED}\n{rig.diagnostics()}")
        raise
    finally:
        for client in clients:
            client.close()


def check_clients(dsn: str, schema: str, clients: list[RiderClient], merchants: list[str]) -> None:
    """Every acknowledged operation is in the ledger exactly once, nothing else is, every
    balance is what the clients' own record says, and the ledger's invariants hold."""
    expected_transfers: dict[str, tuple[str, str, int]] = {}
    expected_holds: dict[str, str] = {}
    expected_top_ups: dict[str, int] = {}
    refused: set[str] = set()
    for client in clients:
        expected_transfers.update(client.acked.transfers)
        expected_holds.update(client.acked.holds)
        expected_top_ups.update(client.acked.top_ups)
        refused |= client.acked.refused_holds
    tags = tuple(c.tag + "-" for c in clients)

    transfers = {r[0]: (r[1], r[2], r[3]) for r in query(
        dsn, schema, "SELECT id, debit_account_id, credit_account_id, amount_minor FROM {s}.transfers")}
    mine = {tid: row for tid, row in transfers.items() if tid.startswith(tags) or tid.startswith("tu:")}
    assert set(transfers) == set(mine), f"transfers nobody asked for: {sorted(set(transfers) - set(mine))[:10]}"
    missing = sorted(set(expected_transfers) - set(transfers))
    extra = sorted(set(transfers) - set(expected_transfers))
    assert not missing, f"acknowledged but not in the ledger: {missing[:10]}"
    assert not extra, f"in the ledger but never acknowledged: {extra[:10]}"
    differ = [tid for tid, row in expected_transfers.items() if transfers[tid] != row]
    assert not differ, f"posted differently from what was acknowledged: {differ[:10]}"

    outcomes = dict(query(dsn, schema, "SELECT h.id, coalesce(r.outcome, 'PENDING') FROM {s}.holds h"
                                       " LEFT JOIN {s}.hold_resolutions r ON r.hold_id = h.id"))
    assert outcomes == expected_holds, {h: (outcomes.get(h), expected_holds.get(h))
                                        for h in set(outcomes) | set(expected_holds)
                                        if outcomes.get(h) != expected_holds.get(h)}
    assert not refused & set(outcomes), "a hold refused as expired was placed after all"

    top_ups = dict(query(dsn, schema, "SELECT id, amount_minor FROM {s}.top_ups WHERE status = 'SUCCEEDED'"))
    assert top_ups == expected_top_ups
    assert query(dsn, schema, "SELECT count(*) FROM {s}.top_ups WHERE status <> 'SUCCEEDED'")[0][0] == 0

    balances = {r[0]: (r[1], r[2]) for r in query(
        dsn, schema, "SELECT id, balance_minor, pending_debits_minor FROM {s}.accounts")}
    for client in clients:
        assert balances[client.rider] == (client.balance, 0), (client.rider, balances[client.rider], client.balance)
    net: Counter[str] = Counter()
    for client in clients:
        net.update(client.merchant_net)
    for merchant in merchants:
        assert balances[merchant][0] == net[merchant], (merchant, balances[merchant], net[merchant])

    pool = create_pool(dsn, name="test-wallet-crash-invariants", max_size=1)
    try:
        assert invariant_violations(pool, schema) == []
    finally:
        pool.close()


# --- 2. one linked batch, killed mid-call again and again -------------------------------------------


def outbox_batches(dsn: str, schema: str) -> dict[str, list[tuple[str, list[str]]]]:
    """For each transfer id, the TransferPosted outbox rows carrying it: (event id, its batch)."""
    found: dict[str, list[tuple[str, list[str]]]] = {}
    for event_id, payload in query(dsn, schema, "SELECT event_id, payload FROM {s}.outbox_events"
                                                " WHERE event_type = 'citytap.wallet.v1.TransferPosted'"):
        ids = [t.transfer_id for t in events_pb2.WalletEvent.FromString(bytes(payload)).transfer_posted.transfers]
        for transfer_id in ids:
            found.setdefault(transfer_id, []).append((event_id, ids))
    return found


def test_a_linked_batch_killed_mid_call_is_applied_whole_once_or_not_at_all(
        rig: CrashRig, postgres_dsn: str, kafka_bootstrap: str) -> None:
    started = time.monotonic()
    tag = f"b{uuid.uuid4().hex[:8]}"
    rng = random.Random(f"{SEED}:batch")
    stats = Stats()
    retrier = Retrier(stats)
    start_offsets = end_offsets(kafka_bootstrap)
    rider, merchant = f"{tag}-rider", f"{tag}-merchant"
    chan = None
    try:
        rig.start_wallet()
        rig.relay.start()
        chan = channel(rig.address)
        stub = wallet_pb2_grpc.WalletServiceStub(chan)
        retrier.call(stub.CreateAccount, wallet_pb2.CreateAccountRequest(account_id=rider))
        retrier.call(stub.CreateAccount, wallet_pb2.CreateAccountRequest(
            account_id=merchant, kind=wallet_pb2.ACCOUNT_KIND_MERCHANT_PAYABLE, owner_id=f"{merchant}-owner"))
        top_up = retrier.call(stub.TopUp, wallet_pb2.TopUpRequest(top_up_id=f"{tag}-tu", account_id=rider,
                                                                  amount=twd(500_000)))[0].top_up
        deliver_webhook(rig.webhook_port, payment_succeeded(f"evt_{uuid.uuid4().hex[:24]}", top_up.payment_intent_id,
                                                            top_up.top_up_id, rider, 500_000),
                        rig.webhook_secret, stats)

        def batch(n: int) -> wallet_pb2.CreateTransfersRequest:
            """A payment, its split and fares: 8 linked transfers."""
            transfers = []
            for j in range(2):
                amount = rng.randint(1000, 4000)
                transfers += [
                    transfer(f"{tag}-{n}-pay{j}", rider, merchant, amount, wallet_pb2.TRANSFER_KIND_MERCHANT_PAYMENT),
                    transfer(f"{tag}-{n}-fee{j}", merchant, FEES, amount // 20, wallet_pb2.TRANSFER_KIND_FEE),
                    transfer(f"{tag}-{n}-fare{j}", rider, REVENUE, rng.randint(200, 800), wallet_pb2.TRANSFER_KIND_FARE),
                    transfer(f"{tag}-{n}-city{j}", rider, CITY, rng.randint(100, 300), wallet_pb2.TRANSFER_KIND_FARE),
                ]
            return wallet_pb2.CreateTransfersRequest(transfers=transfers)

        def in_ledger(ids: list[str]) -> int:
            return query(postgres_dsn, rig.schema, "SELECT count(*) FROM {s}.transfers WHERE id = ANY(%s)", (ids,))[0][0]

        def events_of(ids: list[str]) -> set[str]:
            rows = outbox_batches(postgres_dsn, rig.schema)
            carried = {event_id for tid in ids for event_id, batch_ids in rows.get(tid, []) if batch_ids == ids}
            stray = {event_id for tid in ids for event_id, batch_ids in rows.get(tid, []) if batch_ids != ids}
            assert not stray, f"an event carries part of the batch: {stray}"
            return carried

        def old_backends() -> int:
            return query(postgres_dsn, rig.schema, "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                         (f"citytap-{rig.schema}",))[0][0]

        # A few batches undisturbed: they take the path every batch takes, and their latency
        # sets how late a kill may come (0-20 ms, longer on a machine too slow to commit one
        # within 10 ms), so that kills land both before and after commits.
        spent = 0
        latencies = []
        for n in range(BATCH_WARMUPS):
            request = batch(BATCH_KILLS + n)
            sent = time.monotonic()
            retrier.call(stub.CreateTransfers, request)
            latencies.append(time.monotonic() - sent)
            spent += sum(t.amount.amount_minor for t in request.transfers if t.debit_account_id == rider)
        delay_max = max(0.020, 2 * sorted(latencies)[len(latencies) // 2])

        outcomes: Counter[str] = Counter()
        delays: list[float] = []
        for n in range(BATCH_KILLS):
            request = batch(n)
            ids = [t.transfer_id for t in request.transfers]
            call = stub.CreateTransfers.future(request, timeout=CALL_TIMEOUT_S)
            delay = rng.uniform(0.0, delay_max)
            delays.append(delay)
            time.sleep(delay)
            rig.wallet.kill()
            if n % 4 == 3:  # now and then the relay goes down with it
                rig.relay.kill()
                rig.relay.start()
            try:
                first = call.result()
                acknowledged = True
            except grpc.RpcError as exc:
                assert exc.code() in RETRYABLE, exc
                acknowledged = False
            # The killed process's database sessions end on their own (a transaction whose
            # COMMIT arrived still commits); look only once they are gone.
            wait_until("the killed wallet's sessions end", lambda: old_backends() == 0, timeout_s=15, interval_s=0.01)
            count, events = in_ledger(ids), events_of(ids)
            assert (count, len(events)) in ((0, 0), (len(ids), 1)), (n, count, events)
            if acknowledged:
                assert count == len(ids)
                assert [t.transfer_id for t in first.transfers] == ids
            outcomes["acknowledged before the kill" if acknowledged else
                     "committed, answer lost in the kill" if count else "not committed"] += 1

            rig.start_wallet()
            response, _ = retrier.call(stub.CreateTransfers, request)  # the retry, same ids
            assert [t.transfer_id for t in response.transfers] == ids
            if acknowledged:
                assert list(response.transfers) == list(first.transfers)
            assert in_ledger(ids) == len(ids) and len(events_of(ids)) == 1
            spent += sum(t.amount.amount_minor for t in request.transfers if t.debit_account_id == rider)

        drain_s = drain(rig, postgres_dsn)
        records = read_records(kafka_bootstrap, start_offsets, end_offsets(kafka_bootstrap))
        result = audit(postgres_dsn, rig.schema, records, tag)
        report(f"one linked batch of 8, killed {BATCH_KILLS} times (seed {SEED}, schema {rig.schema})", {
            "wallet kills": rig.wallet.kills,
            "relay kills": rig.relay.kills,
            "wallet restart to SERVING, mean / max s":
                f"{sum(rig.serving_waits_s) / len(rig.serving_waits_s):.2f} / {max(rig.serving_waits_s):.2f}",
            "batch latency undisturbed, ms (median)": f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f}",
            "kill delay after send, ms (min / max)": f"{min(delays) * 1000:.1f} / {max(delays) * 1000:.1f}",
            **{f"  {name}": n for name, n in sorted(outcomes.items())},
            "retries needed after the restart": stats["retried calls"],
            "outbox rows": result.outbox_rows,
            "events on the topic (records)": result.records,
            "distinct events": result.distinct_events,
            "duplicates": result.duplicates,
            "event types": dict(result.event_types),
            "drain s / whole test s": f"{drain_s:.1f} / {time.monotonic() - started:.1f}",
        })
        assert_audit(result)
        # The batches and the top-up's credit, each once.
        assert result.event_types["transfer_posted"] == BATCH_KILLS + BATCH_WARMUPS + 1
        assert outcomes["not committed"] > 0, "no kill landed before the commit"
        assert outcomes["acknowledged before the kill"] + outcomes["committed, answer lost in the kill"] > 0, \
            "no batch committed before its kill"
        [(balance, held)] = query(postgres_dsn, rig.schema,
                                  "SELECT balance_minor, pending_debits_minor FROM {s}.accounts WHERE id = %s", (rider,))
        assert (balance, held) == (500_000 - spent, 0)
        pool = create_pool(postgres_dsn, name="test-wallet-crash-invariants", max_size=1)
        try:
            assert invariant_violations(pool, rig.schema) == []
        finally:
            pool.close()
    except BaseException:
        print(f"\n[wallet-crash] failed with WALLET_CRASH_SEED={SEED}\n{rig.diagnostics()}")
        raise
    finally:
        if chan is not None:
            chan.close()
