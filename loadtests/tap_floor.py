"""The floor of a tap on this stack: the least CPU a tap path built from our parts can use.

    make bench-tap-floor            # the dev stack up, then this (FLOOR_ARGS=--one-hop: one hop)
    python -m loadtests.tap_floor --help

The tap bench (loadtests/taps.py) says what a tap costs in CPU through the real fare gate and
wallet. This one says what it would cost with every rule taken out but the work our
architecture makes every tap do, so the two figures together say how much of a tap is our
code and how much is the stack: two Python gRPC services (grpcio, protobuf), each with its
own PostgreSQL transaction (psycopg), a Redis read and a Kafka record (kafka-python).

It starts two throwaway servers on free ports, each its own process, built like ours (a
synchronous grpcio server, a thread pool, a psycopg pool) and speaking our protos:

- a floor gate serving `FareGateService.Tap`: the card's cache entry read from Redis; one
  transaction holding the card's advisory lock that reads the tap id, calls the floor
  wallet's `CreateHold`, inserts the tap and commits; one Kafka record, sent without waiting;
- a floor wallet serving `WalletService.CreateHold`: one transaction that debits the
  account's row (a pending hold, as a real hold does) and inserts the hold, in one pipeline.

No fare rules, no split, no outbox, no interceptors, no logs: a floor, not a design.
`--one-hop` leaves the floor wallet out and writes the hold in the gate's own transaction:
the floor of a design with one service and one commit per tap, which ours is not. The
load is the emulator's open loop (services/fare_gate/emulator/load.py), the same riders and
the same Tap requests as `make bench-taps`, at each `--rates` step; each step prints the
latency and the CPU per tap by process (loadtests/stack_cpu.py) and what two cores carry at
that cost. The scratch tables live in schemas `tap_floor_gate` and `tap_floor_wallet`, made
afresh on every run and dropped at its end.

The exit status is 0 whatever the figures; 1 only when it could not run.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from concurrent import futures
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import psycopg
from kafka import KafkaProducer
from psycopg_pool import ConnectionPool

from citytap.common.v1 import money_pb2
from citytap.fare_gate.v1 import fare_gate_pb2, fare_gate_pb2_grpc
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs.postgres import create_pool
from libs.redis_client import create_redis
from libs.signals import stop_event_on_signals
from loadtests.stack_cpu import LOAD_GENERATOR, CallCost, StackCpu, call_cost
from services.fare_gate.emulator.gate import FareGateClient
from services.fare_gate.emulator.load import LoadShape, run_taps, synthetic_riders
from services.fare_gate.emulator.openloop import RunResult
from services.fare_gate.emulator.report import format_run, run_to_dict
from services.fare_gate.emulator.riders import RiderPool, station_gates

GATE_SCHEMA = "tap_floor_gate"
WALLET_SCHEMA = "tap_floor_wallet"
TOPIC = "tap-floor"
# Records wait up to this long to go in one batch, as our outbox relays wait between passes
# (CITYTAP_OUTBOX_IDLE_WAIT_MS): a floor should not pay a Kafka request per tap.
KAFKA_LINGER_MS = 200
HOLD_MINOR = 65
OPENING_BALANCE_MINOR = 10**12
WORKERS = 16  # as libs.grpc_server's default
GATE_IN_FLIGHT_MAX = 20  # CITYTAP_FARE_GATE_MAX_IN_FLIGHT's default
POOL_SIZE = 16
RATES_DEFAULT = (100.0, 200.0, 300.0, 400.0, 500.0)
STEP_S_DEFAULT = 20.0
WARMUP_S = 3.0
DEADLINE_S = 1.0
STEP_P99_MS_MAX = 100.0
READY_TIMEOUT_S = 20.0
SETTLE_S = 2.0
CARD_KEY = b"tap-floor"  # a card's pseudonym key for this throwaway run only


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        sys.exit(f"tap_floor: {name} is not set; run it through `make bench-tap-floor` (infra/env.sh)")
    return value


# --- the two servers ----------------------------------------------------------------------


def _queue_hold(conn: psycopg.Connection[Any], hold_id: str, account_id: str, amount_minor: int) -> psycopg.Cursor[Any]:
    """Queue a hold's writes in the open pipeline: the account's pending sum (the row made on
    first use) and the hold. The cursor answers the account's available balance."""
    balance = conn.execute(
        f"INSERT INTO {WALLET_SCHEMA}.accounts (id, balance_minor, pending_minor) VALUES (%s, %s, %s) "
        "ON CONFLICT (id) DO UPDATE SET pending_minor = accounts.pending_minor + EXCLUDED.pending_minor "
        "RETURNING balance_minor - pending_minor",
        (account_id, OPENING_BALANCE_MINOR, amount_minor))
    conn.execute(f"INSERT INTO {WALLET_SCHEMA}.holds (id, account_id, amount_minor, expires_at) "
                 "VALUES (%s, %s, %s, now() + interval '3 hours')", (hold_id, account_id, amount_minor))
    return balance


def _available(cursor: psycopg.Cursor[Any]) -> int:
    row = cursor.fetchone()
    assert row is not None
    return int(row[0])


class FloorWallet(wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    def CreateHold(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
        with self._pool.connection() as conn, conn.pipeline():
            balance = _queue_hold(conn, request.hold_id, request.debit_account_id, request.amount.amount_minor)
            conn.commit()
            available = _available(balance)
        return wallet_pb2.CreateHoldResponse(
            hold=wallet_pb2.Hold(hold_id=request.hold_id, debit_account_id=request.debit_account_id),
            debit_available=money_pb2.Money(amount_minor=available, currency="TWD"))


class FloorGate(fare_gate_pb2_grpc.FareGateServiceServicer):
    """With no wallet address, one hop: the hold's writes go in the gate's own transaction."""

    def __init__(self, pool: ConnectionPool, wallet_address: str, redis_url: str, kafka_bootstrap: str) -> None:
        self._pool = pool
        self._wallet = wallet_pb2_grpc.WalletServiceStub(grpc.insecure_channel(wallet_address)) if wallet_address else None
        self._redis = create_redis(redis_url)
        self._kafka = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=KAFKA_LINGER_MS)

    def Tap(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
        card = hmac.new(CARD_KEY, request.credential.card_uid, hashlib.sha256).hexdigest()
        self._redis.get(f"tap-floor:card:{card}")
        with self._pool.connection() as conn:
            with conn.pipeline():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (card,))
                seen = conn.execute(f"SELECT 1 FROM {GATE_SCHEMA}.taps WHERE tap_id = %s", (request.tap_id,))
            balance = 0
            if seen.fetchone() is None:
                hold_id = f"fare:{request.tap_id}"
                if self._wallet is not None:
                    hold = self._wallet.CreateHold(wallet_pb2.CreateHoldRequest(
                        hold_id=hold_id, debit_account_id=card, credit_account_id="revenue",
                        amount=money_pb2.Money(amount_minor=HOLD_MINOR, currency="TWD")), timeout=DEADLINE_S)
                    balance = hold.debit_available.amount_minor
                with conn.pipeline():
                    held = _queue_hold(conn, hold_id, card, HOLD_MINOR) if self._wallet is None else None
                    conn.execute(f"INSERT INTO {GATE_SCHEMA}.taps (tap_id, card, gate_id) VALUES (%s, %s, %s)",
                                 (request.tap_id, card, request.gate_id))
                    conn.commit()
                    if held is not None:
                        balance = _available(held)
                self._kafka.send(TOPIC, key=card.encode(), value=request.tap_id.encode())
            else:
                conn.rollback()  # a retry: recorded once already
        return fare_gate_pb2.TapResponse(
            decision=fare_gate_pb2.TAP_DECISION_OPEN, reason=fare_gate_pb2.TAP_REASON_OK,
            fare_charged=money_pb2.Money(amount_minor=0, currency="TWD"),
            amount_held=money_pb2.Money(amount_minor=HOLD_MINOR, currency="TWD"),
            balance=money_pb2.Money(amount_minor=balance, currency="TWD"), journey_id=request.tap_id)


def serve(role: str, port: int, wallet_address: str) -> None:
    dsn = _env("CITYTAP_POSTGRES_DSN")
    # The gate takes at most as many calls at once as the fare gate does by default
    # (CITYTAP_FARE_GATE_MAX_IN_FLIGHT) and refuses the rest at once, as the fare gate does.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix=f"floor-{role}"),
                         maximum_concurrent_rpcs=GATE_IN_FLIGHT_MAX if role == "gate" else None)
    if role == "wallet":
        pool = create_pool(dsn, name="tap-floor-wallet", min_size=POOL_SIZE, max_size=POOL_SIZE)
        wallet_pb2_grpc.add_WalletServiceServicer_to_server(FloorWallet(pool), server)
    else:
        pool = create_pool(dsn, name="tap-floor-gate", min_size=POOL_SIZE, max_size=POOL_SIZE)
        gate = FloorGate(pool, wallet_address, _env("CITYTAP_REDIS_URL"),
                         _env("CITYTAP_KAFKA_BOOTSTRAP"))
        fare_gate_pb2_grpc.add_FareGateServiceServicer_to_server(gate, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    stop = stop_event_on_signals()
    print(f"floor {role} serving on {port}", flush=True)
    stop.wait()
    server.stop(1).wait()


# --- the bench ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _make_schemas(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for schema in (GATE_SCHEMA, WALLET_SCHEMA):
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
            conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {GATE_SCHEMA}.taps (tap_id text PRIMARY KEY, card text NOT NULL, "
                     "gate_id text NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(f"CREATE TABLE {WALLET_SCHEMA}.accounts (id text PRIMARY KEY, balance_minor bigint NOT NULL, "
                     "pending_minor bigint NOT NULL)")
        conn.execute(f"CREATE TABLE {WALLET_SCHEMA}.holds (id text PRIMARY KEY, account_id text NOT NULL "
                     f"REFERENCES {WALLET_SCHEMA}.accounts (id), amount_minor bigint NOT NULL, "
                     "expires_at timestamptz NOT NULL, created_at timestamptz NOT NULL DEFAULT now())")


def _drop_schemas(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for schema in (GATE_SCHEMA, WALLET_SCHEMA):
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _start(role: str, port: int, wallet_address: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "loadtests.tap_floor", "serve", role, "--port", str(port),
                             "--wallet-address", wallet_address], stdout=subprocess.DEVNULL)


def _wait_ready(address: str, proc: subprocess.Popen[bytes]) -> None:
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
    except grpc.FutureTimeoutError:
        raise SystemExit(f"tap_floor: the floor server on {address} did not start (exit {proc.poll()})") from None
    finally:
        channel.close()


@dataclass(frozen=True)
class FloorRun:
    """One rate through the floor: the open loop's result and the CPU per tap by process."""

    result: RunResult
    cost: CallCost | None

    @property
    def passed(self) -> bool:
        p99 = self.result.latency_summary().p99_ms
        return self.result.error_count == 0 and p99 is not None and p99 <= STEP_P99_MS_MAX

    def to_dict(self) -> dict[str, Any]:
        return {**run_to_dict(self.result), "pass": self.passed, "stack_cpu": self.cost.to_dict() if self.cost else None}


class FloorStack:
    """The two floor servers and their scratch schemas, on the stack `infra/env.sh` describes;
    a context manager (the servers stop and the schemas go on exit)."""

    def __init__(self, *, deadline_s: float = DEADLINE_S, one_hop: bool = False) -> None:
        """`one_hop`: no floor wallet; the gate writes the hold in its own transaction (what a
        design with one service and one commit per tap would cost)."""
        self.one_hop = one_hop
        self.dsn = _env("CITYTAP_POSTGRES_DSN")
        self.state_dir = Path(_env("CITYTAP_STATE_DIR"))
        self.deadline_s = deadline_s
        self.gate_address = ""
        self._procs: list[subprocess.Popen[bytes]] = []
        self._client: FareGateClient | None = None
        self._stack_cpu: StackCpu | None = None

    def __enter__(self) -> FloorStack:
        _make_schemas(self.dsn)
        try:
            pids = {}
            wallet_address = ""
            if not self.one_hop:
                wallet_port = _free_port()
                wallet_address = f"127.0.0.1:{wallet_port}"
                wallet = _start("wallet", wallet_port, "")
                self._procs.append(wallet)
                _wait_ready(wallet_address, wallet)
                pids["floor wallet"] = wallet.pid
            gate_port = _free_port()
            self.gate_address = f"127.0.0.1:{gate_port}"
            gate = _start("gate", gate_port, wallet_address)
            self._procs.append(gate)
            _wait_ready(self.gate_address, gate)
            pids["floor gate"] = gate.pid
        except BaseException:
            self.__exit__()
            raise
        self._stack_cpu = StackCpu(self.state_dir, components=(*pids, "postgres", "kafka", "redis"), pids=pids)
        self._client = FareGateClient(self.gate_address, deadline_s=self.deadline_s)
        return self

    def __exit__(self, *_: object) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        for proc in self._procs:
            proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs.clear()
        _drop_schemas(self.dsn)

    @property
    def client(self) -> FareGateClient:
        assert self._client is not None, "use FloorStack as a context manager"
        return self._client

    def run(self, pool: RiderPool, rate_per_s: float, duration_s: float, *, tap_id_prefix: str,
            warmup_s: float = WARMUP_S) -> FloorRun:
        """Tap the floor gate open loop at `rate_per_s` and read the CPU it cost."""
        assert self._stack_cpu is not None, "use FloorStack as a context manager"
        time.sleep(SETTLE_S)  # the previous run's Kafka batches and PostgreSQL writes
        before = self._stack_cpu.snapshot()
        cpu0 = time.process_time()
        result = run_taps(self.client, pool, LoadShape(rate_per_s, duration_s, warmup_s, self.deadline_s),
                          tap_id_prefix=tap_id_prefix)
        used = self._stack_cpu.used_s(before, self._stack_cpu.snapshot())
        used[LOAD_GENERATOR] = time.process_time() - cpu0
        return FloorRun(result, call_cost(used, result.answered_with_warmup))

    def counts(self) -> tuple[int, int, int]:
        """Taps recorded, holds written and the sum the holds reserve (for tests)."""
        with psycopg.connect(self.dsn) as conn:
            taps = conn.execute(f"SELECT count(*) FROM {GATE_SCHEMA}.taps").fetchone()
            holds = conn.execute(f"SELECT count(*) FROM {WALLET_SCHEMA}.holds").fetchone()
            pending = conn.execute(f"SELECT coalesce(sum(pending_minor), 0) FROM {WALLET_SCHEMA}.accounts").fetchone()
        assert taps is not None and holds is not None and pending is not None
        return int(taps[0]), int(holds[0]), int(pending[0])


def bench(args: argparse.Namespace) -> dict[str, Any]:
    from loadtests.taps import STATIONS  # the tap bench imports this module

    run_id = f"floor-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
    riders = synthetic_riders(args.riders, run_id=run_id, seed=args.seed)
    gates = station_gates(STATIONS, args.gates_per_station)
    steps: list[dict[str, Any]] = []
    with FloorStack(one_hop=args.one_hop) as floor:
        print(f"tap floor {run_id}: {'one hop (no floor wallet)' if args.one_hop else 'two hops'}, "
              f"floor gate {floor.gate_address}; steps {args.step_s:g} s, "
              f"rates {', '.join(f'{r:g}' for r in args.rates)}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for number, rate in enumerate(args.rates, start=1):
            run = floor.run(RiderPool(riders, gates, seed=args.seed + number), rate, args.step_s,
                            tap_id_prefix=f"{run_id}-s{number}")
            print(f"\n== floor at {rate:g} taps/s for {args.step_s:g} s: {'pass' if run.passed else 'FAIL'} "
                  f"(p99 <= {STEP_P99_MS_MAX:g} ms and no errors)")
            for line in format_run(run.result):
                print(line)
            if run.cost is not None:
                print("  " + run.cost.describe("tap"))
            steps.append(run.to_dict())
    sustained = 0.0
    for step in steps:
        if not step["pass"]:
            break
        sustained = step["offered_rate_per_s"]
    print(f"\nfloor: highest rate with every step up to it at p99 <= {STEP_P99_MS_MAX:g} ms and no errors: "
          f"{sustained:g} taps/s")
    return {"run_id": run_id, "one_hop": args.one_hop, "load_average_end": os.getloadavg(), "steps": steps, "sustained_per_s": sustained,
            "at": datetime.now(timezone.utc).isoformat()}


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"rates must be numbers separated by commas, not {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError("rates must be positive")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.tap_floor", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the floor bench (the default)")
    for target in (parser, run):
        target.add_argument("--rates", type=_rates, default=RATES_DEFAULT,
                            help=f"taps/s of each step (default {','.join(f'{r:g}' for r in RATES_DEFAULT)})")
        target.add_argument("--step-s", type=float, default=STEP_S_DEFAULT,
                            help=f"measured seconds of each step (default {STEP_S_DEFAULT:g})")
        target.add_argument("--riders", type=int, default=2000, help="synthetic riders (default 2000)")
        target.add_argument("--gates-per-station", type=int, default=2, help="gates at each station (default 2)")
        target.add_argument("--seed", type=int, default=1, help="seed of card UIDs and stations (default 1)")
        target.add_argument("--json-out", default="", help="also write the figures as JSON")
        target.add_argument("--one-hop", action="store_true",
                            help="no floor wallet: the gate writes the hold in its own transaction, one service and "
                                 "one commit per tap (a design question, not our architecture)")
    server = sub.add_parser("serve", help="run one of the floor servers (the bench starts them)")
    server.add_argument("role", choices=("gate", "wallet"))
    server.add_argument("--port", type=int, required=True)
    server.add_argument("--wallet-address", default="")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args.role, args.port, args.wallet_address)
        return 0
    figures = bench(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
