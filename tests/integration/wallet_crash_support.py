"""Processes, clients and the audit behind the wallet's crash tests (test_wallet_crash.py).

- `CrashRig` runs `python -m services.wallet` and `python -m libs.outbox_relay --schema S` as
  separate subprocesses on a schema and ports of their own (so the stack's wallet, which
  runs on schema `wallet`, is untouched), kills either with SIGKILL, restarts it, and
  always cleans both up (`close`, called from the test's `finally`).
- `Retrier` sends a gRPC call and, on UNAVAILABLE or DEADLINE_EXCEEDED (a crashed or
  restarting wallet), sends the very same request again, ids included, until it is
  acknowledged or a bounded time has passed: the retry contract of every wallet write.
- `audit` compares the wallet's tables, its outbox and what reached Kafka, and lists every
  way in which they disagree.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg
from kafka import KafkaConsumer, TopicPartition
from psycopg import sql

from citytap.wallet.v1 import events_pb2
from libs.grpc_health_probe import check

ROOT = Path(__file__).resolve().parents[2]
TOPIC = "citytap.wallet.v1.events"
# A crashed or restarting wallet answers these; anything else is a real answer.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CALL_TIMEOUT_S = 3.0
SERVING_WAIT_S = 30.0
# How long one operation may keep failing over crashes before the test gives up on it.
ACK_WAIT_S = 45.0
# A Redis database of its own: the wallet rebuilds (replaces) the deny-list key at start, and
# this instance's restarts must not wipe the deny list of the stack's own wallet.
ISOLATED_REDIS_DB = 13


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port below the ephemeral range. The wallet rebinds its ports after every kill,
    and an ephemeral port (port 0) can meanwhile be taken as the source port of one of the
    many connections the test opens, which would make the restart fail."""
    low = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20_000, max(20_001, low))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolated_redis_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{ISOLATED_REDIS_DB}", parts.query, parts.fragment))


class Supervised:
    """One restartable subprocess whose output is appended to a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self._argv = argv
        self._env = env
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self.starts = 0
        self.kills = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        with self._lock:
            if self.alive():
                raise AssertionError(f"{self.name} is already running")
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== start {self.starts + 1} of {self.name} at {time.time():.3f}\n".encode())
                log.flush()
                self._proc = subprocess.Popen(self._argv, cwd=ROOT, env=self._env, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL)
            self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no handler runs, no buffer is flushed, no transaction is finished."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                return
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)
            self.kills += 1

    def terminate(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM and wait for a graceful stop (SIGKILL if it takes too long); the exit code."""
        with self._lock:
            if self._proc is None:
                return None
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    self._proc.send_signal(signal.SIGKILL)
                    self._proc.wait(timeout=10)
            return self._proc.returncode

    def exit_code(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class CrashRig:
    """A wallet and its standalone outbox relay on `schema`, each killable on its own."""

    def __init__(self, schema: str, log_dir: Path, *, extra_env: dict[str, str] | None = None) -> None:
        missing = [name for name in ("CITYTAP_REDIS_URL", "CITYTAP_STRIPE_WEBHOOK_SECRET") if not os.environ.get(name)]
        if missing:
            raise AssertionError(f"{', '.join(missing)} not set: run the integration tier with a stack's environment "
                                 "(`make test`, or `source infra/env.sh`)")
        self.schema = schema
        self.grpc_port = free_port()
        self.webhook_port = free_port()  # fixed: the test posts Stripe webhooks to it across restarts
        self.address = f"127.0.0.1:{self.grpc_port}"
        self.env = {
            **os.environ,
            "CITYTAP_LISTEN_ADDRESS": self.address,
            "CITYTAP_WALLET_WEBHOOK_LISTEN": f"127.0.0.1:{self.webhook_port}",
            "CITYTAP_WALLET_SCHEMA": schema,
            "CITYTAP_OUTBOX_RELAY_IN_PROCESS": "false",
            "CITYTAP_REDIS_URL": isolated_redis_url(os.environ["CITYTAP_REDIS_URL"]),
            **(extra_env or {}),
        }
        self.webhook_secret = self.env["CITYTAP_STRIPE_WEBHOOK_SECRET"]
        self.wallet = Supervised("wallet", [sys.executable, "-m", "services.wallet"], self.env,
                                 log_dir / f"{schema}-wallet.log")
        self.relay = Supervised("relay", [sys.executable, "-m", "libs.outbox_relay", "--schema", schema], self.env,
                                log_dir / f"{schema}-relay.log")
        self.serving_waits_s: list[float] = []

    def start_wallet(self) -> float:
        """Start the wallet and wait (bounded) until its health service reports SERVING."""
        started = time.monotonic()
        self.wallet.start()
        deadline = started + SERVING_WAIT_S
        while True:
            if check(self.address, timeout_s=0.5) == "SERVING":
                break
            code = self.wallet.exit_code()
            if code is not None:
                raise AssertionError(f"the wallet exited with {code} while starting:\n{self.wallet.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the wallet was not SERVING after {SERVING_WAIT_S:.0f}s:\n{self.wallet.tail()}")
            time.sleep(0.02)
        waited = time.monotonic() - started
        self.serving_waits_s.append(waited)
        return waited

    def check_relay(self) -> None:
        code = self.relay.exit_code()
        if code is not None and code != -signal.SIGKILL:
            raise AssertionError(f"the outbox relay exited with {code}:\n{self.relay.tail()}")

    def close(self) -> None:
        """Kill whatever still runs; safe to call more than once, pass or fail."""
        for proc in (self.wallet, self.relay):
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - keep cleaning up the other one
                pass

    def diagnostics(self) -> str:
        return (f"--- wallet log ({self.wallet.log_path}) ---\n{self.wallet.tail()}\n"
                f"--- relay log ({self.relay.log_path}) ---\n{self.relay.tail()}")


# --- clients -----------------------------------------------------------------------------------


def channel(address: str) -> grpc.Channel:
    """A channel that reconnects within a quarter second of the wallet coming back (gRPC's
    default reconnect backoff grows to two minutes)."""
    return grpc.insecure_channel(address, options=[
        ("grpc.initial_reconnect_backoff_ms", 50),
        ("grpc.min_reconnect_backoff_ms", 50),
        ("grpc.max_reconnect_backoff_ms", 250),
    ])


class Stats:
    """Counters shared by client threads, and a gauge of calls in flight (to tell whether a
    kill interrupted any)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self._inflight = 0

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def track_inflight(self, delta: int) -> None:
        with self._lock:
            self._inflight += delta

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self.counts[name]


class Retrier:
    """Sends a request until it is acknowledged, reusing it unchanged on every retry."""

    def __init__(self, stats: Stats, *, ack_wait_s: float = ACK_WAIT_S) -> None:
        self._stats = stats
        self._ack_wait_s = ack_wait_s

    def call(self, method: Callable[..., Any], request: Any) -> tuple[Any, int]:
        """(response, attempts); a non-retryable error, or retrying for too long, raises."""
        deadline = time.monotonic() + self._ack_wait_s
        attempt = 0
        while True:
            attempt += 1
            self._stats.track_inflight(1)
            try:
                response = method(request, timeout=CALL_TIMEOUT_S)
                error = None
            except grpc.RpcError as exc:
                error = exc
            finally:
                self._stats.track_inflight(-1)
            if error is None:
                if attempt > 1:
                    self._stats.add("retried calls")
                return response, attempt
            if error.code() not in RETRYABLE or time.monotonic() > deadline:
                raise error
            self._stats.add(f"retry:{error.code().name}")
            time.sleep(min(0.01 * attempt, 0.2))


def sign_webhook(payload: bytes, secret: str) -> str:
    """A Stripe-Signature header as Stripe makes it: t=<unix time>,v1=<HMAC-SHA256 of "t.payload">."""
    timestamp = int(time.time())
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def payment_succeeded(event_id: str, payment_intent_id: str, top_up_id: str, account_id: str, amount_minor: int) -> bytes:
    """A payment_intent.succeeded event for a top-up, as Stripe would send it."""
    return json.dumps({
        "id": event_id, "object": "event", "api_version": "2026-10-28.endive", "created": int(time.time()),
        "livemode": False, "type": "payment_intent.succeeded",
        "data": {"object": {"id": payment_intent_id, "object": "payment_intent", "amount": amount_minor,
                            "currency": "twd", "status": "succeeded",
                            "metadata": {"top_up_id": top_up_id, "account_id": account_id}}},
    }).encode()


# A delivery is handled once the endpoint answers 200 with one of these; Stripe redelivers
# anything else, and so does the test.
HANDLED = frozenset({"CREDITED", "ALREADY_CREDITED", "DUPLICATE"})


def deliver_webhook(port: int, payload: bytes, secret: str, stats: Stats, *, ack_wait_s: float = ACK_WAIT_S) -> str:
    """POST a signed delivery until it is handled, as Stripe redelivers; returns the outcome."""
    deadline = time.monotonic() + ack_wait_s
    attempt = 0
    while True:
        attempt += 1
        stats.track_inflight(1)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CALL_TIMEOUT_S)
            try:
                conn.request("POST", "/stripe/webhook", body=payload,
                             headers={"Stripe-Signature": sign_webhook(payload, secret),
                                      "Content-Type": "application/json"})
                response = conn.getresponse()
                body = response.read()
            finally:
                conn.close()
                stats.track_inflight(-1)
            outcome = json.loads(body).get("outcome", "") if body else ""
            if response.status == 200:
                if outcome not in HANDLED:
                    raise AssertionError(f"webhook answered 200 {outcome!r}")
                if attempt > 1:
                    stats.add("retried webhooks")
                return outcome
            if response.status < 500:
                raise AssertionError(f"webhook answered {response.status} {outcome!r}")
            stats.add(f"webhook {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            stats.add(f"webhook {type(exc).__name__}")
        if time.monotonic() > deadline:
            raise AssertionError(f"webhook not handled after {ack_wait_s:.0f}s")
        time.sleep(min(0.01 * attempt, 0.2))


# --- PostgreSQL and Kafka ---------------------------------------------------------------------


def query(dsn: str, schema: str, text: str, params: Any = None) -> list[tuple]:
    with psycopg.connect(dsn, autocommit=True, application_name="test-wallet-crash") as conn:
        return conn.execute(sql.SQL(text).format(s=sql.Identifier(schema)), params).fetchall()


def wait_until(what: str, done: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.1) -> float:
    """Poll `done` until it holds (returns the seconds waited) or fail after `timeout_s`."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not done after {timeout_s:.0f}s")
        time.sleep(interval_s)
    return time.monotonic() - started


def end_offsets(bootstrap: str) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        partitions = [TopicPartition(TOPIC, p) for p in sorted(consumer.partitions_for_topic(TOPIC) or ())]
        if not partitions:
            raise AssertionError(f"topic {TOPIC} has no partitions")
        return consumer.end_offsets(partitions)
    finally:
        consumer.close()


def read_records(bootstrap: str, start: dict[TopicPartition, int], end: dict[TopicPartition, int], *,
                 timeout_s: float = 30.0) -> list[Any]:
    """Every record of the topic between `start` and `end` offsets, partition by partition."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    records: list[Any] = []
    try:
        consumer.assign(list(end))
        for partition in end:
            consumer.seek(partition, start.get(partition, 0))
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(p) < end[p] for p in end):
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {TOPIC} up to {end} within {timeout_s:.0f}s")
            for batch in consumer.poll(timeout_ms=500).values():
                records += [r for r in batch if r.offset < end[TopicPartition(r.topic, r.partition)]]
    finally:
        consumer.close()
    return records


# --- the audit -----------------------------------------------------------------------------------


@dataclass
class Audit:
    """What the tables, the outbox and the topic say, and each disagreement among them."""

    records: int = 0                 # records on the topic that belong to this schema
    distinct_events: int = 0
    duplicates: int = 0              # extra copies of an event id (the relay is at-least-once)
    outbox_rows: int = 0
    transfers: int = 0
    holds: int = 0
    resolutions: int = 0
    accounts: int = 0
    top_ups_credited: int = 0
    event_types: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 200:
            self.problems.append(text)


def _mentions(event: events_pb2.WalletEvent, tag: str) -> bool:
    return tag in event.account_key or tag in str(event)


def audit(dsn: str, schema: str, records: Iterable[Any], tag: str) -> Audit:
    """Check the schema's state against the topic's records.

    A record belongs to this schema when its event id is in the schema's outbox, or when
    it mentions `tag` (every id the test made contains it); one that mentions the tag but
    is not in the outbox is an invented event. Then, over the distinct events:

    - every outbox row is published and reached the topic (at least once), with the same
      bytes, type, key and id; copies of an id are counted as duplicates, not errors;
    - every transfer in the table travels in exactly one event (TransferPosted or
      HoldPosted) and every transfer an event carries is in the table, as carried;
    - likewise each hold and its HoldPlaced, each resolution and its HoldPosted /
      HoldVoided / HoldExpired, each account and its AccountCreated, each credited top-up
      and its TopUpSucceeded.
    """
    result = Audit()
    outbox = {row[0]: row[1:] for row in query(
        dsn, schema, "SELECT event_id, seq, event_type, key, payload, published_at FROM {s}.outbox_events")}
    result.outbox_rows = len(outbox)
    for event_id, (seq, _, _, _, published_at) in outbox.items():
        if published_at is None:
            result.problem(f"outbox row {seq} ({event_id}) is not published")

    events: dict[str, events_pb2.WalletEvent] = {}
    copies: Counter[str] = Counter()
    for record in records:
        event = events_pb2.WalletEvent.FromString(record.value)
        headers = {k: v for k, v in (record.headers or [])}
        if event.event_id not in outbox:
            if _mentions(event, tag):
                result.problem(f"event {event.event_id} ({event.WhichOneof('payload')}) is not in the outbox: invented")
            continue
        _, event_type, key, payload, _ = outbox[event.event_id]
        copies[event.event_id] += 1
        if bytes(payload) != record.value:
            result.problem(f"event {event.event_id} on the topic differs from its outbox row")
        if headers.get("event-id") != event.event_id.encode() or headers.get("event-type") != event_type.encode():
            result.problem(f"event {event.event_id} has headers {headers}")
        if record.key != (bytes(key) if key is not None else None) or record.key != event.account_key.encode():
            result.problem(f"event {event.event_id} has key {record.key!r}, account_key {event.account_key!r}")
        events[event.event_id] = event
    result.records = sum(copies.values())
    result.distinct_events = len(events)
    result.duplicates = result.records - result.distinct_events
    for event_id in outbox.keys() - events.keys():
        result.problem(f"outbox event {event_id} never reached the topic: lost")

    carried: Counter[str] = Counter()
    carried_as: dict[str, tuple] = {}
    placed: Counter[str] = Counter()
    resolved: Counter[tuple[str, str]] = Counter()
    created: Counter[str] = Counter()
    credited: Counter[str] = Counter()
    for event in events.values():
        kind = event.WhichOneof("payload")
        result.event_types[kind] += 1
        transfers = []
        if kind == "transfer_posted":
            transfers = list(event.transfer_posted.transfers)
        elif kind == "hold_posted":
            transfers = [event.hold_posted.transfer]
            resolved[(event.hold_posted.hold.hold_id, "POSTED")] += 1
        elif kind == "hold_placed":
            placed[event.hold_placed.hold.hold_id] += 1
        elif kind == "hold_voided":
            resolved[(event.hold_voided.hold.hold_id, "VOIDED")] += 1
        elif kind == "hold_expired":
            resolved[(event.hold_expired.hold.hold_id, "EXPIRED")] += 1
        elif kind == "account_created":
            created[event.account_created.account.account_id] += 1
        elif kind == "top_up_succeeded":
            credited[event.top_up_succeeded.top_up.top_up_id] += 1
        else:
            result.problem(f"event {event.event_id} is a {kind}, which this test never causes")
        for t in transfers:
            carried[t.transfer_id] += 1
            carried_as[t.transfer_id] = (t.debit_account_id, t.credit_account_id, t.amount.amount_minor,
                                         t.hold_id or None)

    transfers_db = {r[0]: r[1:] for r in query(
        dsn, schema, "SELECT id, debit_account_id, credit_account_id, amount_minor, hold_id FROM {s}.transfers")}
    holds_db = {r[0] for r in query(dsn, schema, "SELECT id FROM {s}.holds")}
    resolutions_db = {(r[0], r[1]) for r in query(dsn, schema, "SELECT hold_id, outcome FROM {s}.hold_resolutions")}
    accounts_db = {r[0] for r in query(dsn, schema, "SELECT id FROM {s}.accounts")}
    top_ups_db = {r[0] for r in query(dsn, schema, "SELECT id FROM {s}.top_ups WHERE transfer_id IS NOT NULL")}
    result.transfers, result.holds, result.resolutions = len(transfers_db), len(holds_db), len(resolutions_db)
    result.accounts, result.top_ups_credited = len(accounts_db), len(top_ups_db)

    def one_to_one(what: str, in_db: Iterable[Any], in_events: Counter[Any]) -> None:
        in_db = set(in_db)
        for item in in_db:
            if in_events[item] != 1:
                result.problem(f"{what} {item} is in {in_events[item]} distinct events, not exactly one")
        for item in in_events.keys() - in_db:
            result.problem(f"{what} {item} is in an event but not in the database")

    one_to_one("transfer", transfers_db, carried)
    for transfer_id, values in carried_as.items():
        if transfer_id in transfers_db and tuple(transfers_db[transfer_id]) != values:
            result.problem(f"transfer {transfer_id} is {transfers_db[transfer_id]} but its event says {values}")
    one_to_one("hold", holds_db, placed)
    one_to_one("hold resolution", resolutions_db, resolved)
    one_to_one("account", accounts_db, created)
    one_to_one("credited top-up", top_ups_db, credited)
    return result
