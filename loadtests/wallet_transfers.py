"""Posted transfers per second through the wallet's gRPC API, next to pgbench's ceiling.

    make bench-transfers                       # the dev stack up, then this with infra/env.sh
    python -m loadtests.wallet_transfers --help

In order:

1. Setup, not timed: `--riders` rider wallets and `--merchants` merchant payables opened
   through CreateAccount with ids unique to this run; every rider funded in-process with
   `Ledger.credit_from_clearing` on the wallet's own schema (the seam the Stripe top-up flow
   credits through; the webhook in front of it is not what this measures).
2. The API: CreateTransfers with ONE transfer per call and a fresh client id, debiting a
   rider and crediting either a merchant payable (spread over the merchants) or the one
   operator revenue account (the hot account every fare credits). First one synchronous
   client, then bounded windows of in-flight calls (gRPC futures; `--client-processes`
   spreads a window over processes). Each scenario warms up, then counts for a fixed
   duration the calls acknowledged OK that completed inside that time; errors are counted
   apart, by status and reason.
3. The ceiling: pgbench on the same PostgreSQL server with the same client counts, the
   default TPC-B-like script and simple-update (-N).
4. A table, the CPU each process used per transfer (what limits the rate), a PASS/FAIL
   verdict for the best concurrent scenario against the target, and the results as JSON in
   `.local/bench/wallet_transfers.json`.

The exit status is 0 whatever the verdict: a benchmark reports, it is not a gate. It is 1
only when the benchmark could not run (stack down, setup refused, pgbench missing).

Phases use time.monotonic(), which is one system-wide clock on Linux, so client processes
share the same phase boundaries.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import psycopg
from psycopg import sql

from citytap.common.v1 import money_pb2
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs.grpc_client import connect, error_reason
from libs.grpc_health_probe import check
from libs.postgres import create_pool
from libs.settings import load
from loadtests.stack_cpu import Snapshot, StackCpu

TARGET_TRANSFERS_PER_S = 1000

# Every wait, window, batch and retry has a maximum (see the argument checks in `main`).
WARMUP_S_DEFAULT = 2.0
DURATION_S_DEFAULT = 10.0
DURATION_S_MAX = 120.0
WINDOWS_DEFAULT = (8, 16, 32)
BATCHES_DEFAULT = (16, 64)  # independent transfers per PostTransferBatch call
BATCH_WINDOW_DEFAULT = 4  # batch calls in flight in the concurrent batch scenarios
WINDOW_MAX = 256
CLIENT_PROCESSES_MAX = 8
RIDERS_DEFAULT = 256
RIDERS_MAX = 5000
MERCHANTS_DEFAULT = 16
MERCHANTS_MAX = 256
AMOUNT_MINOR_DEFAULT = 150  # NT$1.50: small enough that a funded wallet pays thousands of calls
CALL_TIMEOUT_S = 5.0  # the deadline of every measured call
DRAIN_TIMEOUT_S = CALL_TIMEOUT_S + 5.0  # how long in-flight calls may take to finish after a window
SETUP_CALL_TIMEOUT_S = 5.0
SETUP_ATTEMPTS_MAX = 3  # CreateAccount retried (same id, so idempotent) on UNAVAILABLE / DEADLINE_EXCEEDED
READY_WAIT_S_MAX = 30.0  # for the wallet to report SERVING
OUTBOX_DRAIN_WAIT_S_MAX = 60.0  # for the relay to publish the previous scenario's events
PROCESS_SPAWN_LEAD_S = 3.0  # client processes get this long to start before a scenario begins
PGBENCH_SCALE_DEFAULT = 4
PGBENCH_INIT_TIMEOUT_S = 300.0
PGBENCH_OVERRUN_S = 60.0  # beyond -T, for pgbench's connect, vacuum and exit
PGBENCH_DATABASE = "pgbench"

RETRYABLE_SETUP_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


# --- what one client (thread or process) drives ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Job:
    """One client's share of a scenario; picklable, so a client process can run it."""

    address: str
    id_prefix: str  # transfer ids are f"{id_prefix}-{n}": unique per run, scenario and client
    debit_account_ids: tuple[str, ...]
    credit_account_ids: tuple[str, ...]
    kind: int  # wallet_pb2.TransferKind value
    currency: str
    amount_minor: int
    window: int  # calls in flight at most; 0 = one synchronous client
    batch: int  # transfers per call: 1 = CreateTransfers with one transfer, more = PostTransferBatch
    start_at: float  # time.monotonic() when the warm-up starts
    warmup_s: float
    duration_s: float


@dataclasses.dataclass
class Tally:
    """What one client saw. Only calls that completed inside [measure_start, measure_end)
    count towards the rate and the latencies; errors are counted wherever they happen."""

    ok_measured: int = 0
    errors_measured: int = 0
    ok_total: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)  # "CODE/REASON" -> count
    latencies_ms: list[float] = dataclasses.field(default_factory=list)
    client_cpu_s: float = 0.0
    issued: int = 0
    undrained: int = 0

    def record(self, started: float, finished: float, error: grpc.RpcError | None, window: tuple[float, float],
               response: Any = None) -> None:
        """Count one call: its posted transfers as OK, and any transfer a batch refused as an error."""
        measured = window[0] <= finished < window[1]
        if error is None:
            posted = 1
            if isinstance(response, wallet_pb2.PostTransferBatchResponse):
                posted = 0
                for outcome in response.outcomes:
                    if outcome.WhichOneof("result") == "transfer":
                        posted += 1
                    else:
                        self.errors[f"OK/{outcome.failure.reason}"] += 1
                        self.errors_measured += measured
            self.ok_total += posted
            if measured:
                self.ok_measured += posted
                self.latencies_ms.append((finished - started) * 1000.0)
            return
        code = error.code() if callable(getattr(error, "code", None)) else None
        try:
            reason = error_reason(error) or ""
        except Exception:  # noqa: BLE001 - a reason we cannot read is still an error to count
            reason = ""
        self.errors[f"{code.name if code else type(error).__name__}/{reason}"] += 1
        if measured:
            self.errors_measured += 1

    def merge(self, other: Tally) -> None:
        self.ok_measured += other.ok_measured
        self.errors_measured += other.errors_measured
        self.ok_total += other.ok_total
        self.errors.update(other.errors)
        self.latencies_ms.extend(other.latencies_ms)
        self.client_cpu_s += other.client_cpu_s
        self.issued += other.issued
        self.undrained += other.undrained


def _transfer(job: Job, n: int) -> wallet_pb2.Transfer:
    return wallet_pb2.Transfer(
        transfer_id=f"{job.id_prefix}-{n}",
        debit_account_id=job.debit_account_ids[n % len(job.debit_account_ids)],
        credit_account_id=job.credit_account_ids[n % len(job.credit_account_ids)],
        amount=money_pb2.Money(amount_minor=job.amount_minor, currency=job.currency),
        kind=job.kind,  # type: ignore[arg-type]
        reference="loadtest",
    )


def _call(job: Job, stub: wallet_pb2_grpc.WalletServiceStub, n: int) -> tuple[Any, Any]:
    """The method and request of call number `n`: one transfer through CreateTransfers, or
    `job.batch` independent transfers through PostTransferBatch."""
    if job.batch == 1:
        return stub.CreateTransfers, wallet_pb2.CreateTransfersRequest(transfers=[_transfer(job, n)])
    return stub.PostTransferBatch, wallet_pb2.PostTransferBatchRequest(
        transfers=[_transfer(job, n * job.batch + i) for i in range(job.batch)])


def drive(job: Job) -> Tally:
    """Run one client's share of a scenario and return what it saw (also a process entry)."""
    channel = connect(job.address, default_timeout_s=CALL_TIMEOUT_S)
    try:
        stub = wallet_pb2_grpc.WalletServiceStub(channel)
        delay_s = job.start_at - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
        measure_start = job.start_at + job.warmup_s
        window = (measure_start, measure_start + job.duration_s)
        if job.window == 0:
            return _drive_sync(job, stub, window)
        return _drive_window(job, stub, window)
    finally:
        channel.close()


class _CpuClock:
    """This process's CPU time across the measured window, read where the issuing loop
    crosses its boundaries."""

    def __init__(self, window: tuple[float, float]) -> None:
        self._window = window
        self._start: float | None = None
        self.used_s = 0.0

    def tick(self, now: float) -> None:
        if self._start is None and now >= self._window[0]:
            self._start = time.process_time()

    def stop(self) -> None:
        if self._start is not None:
            self.used_s = time.process_time() - self._start


def _drive_sync(job: Job, stub: wallet_pb2_grpc.WalletServiceStub, window: tuple[float, float]) -> Tally:
    tally = Tally()
    cpu = _CpuClock(window)
    n = 0
    while True:
        started = time.monotonic()
        cpu.tick(started)
        if started >= window[1]:
            break
        error: grpc.RpcError | None = None
        response = None
        method, request = _call(job, stub, n)
        try:
            response = method(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            error = exc
        n += 1
        tally.record(started, time.monotonic(), error, window, response)
    cpu.stop()
    tally.issued = n
    tally.client_cpu_s = cpu.used_s
    return tally


def _drive_window(job: Job, stub: wallet_pb2_grpc.WalletServiceStub, window: tuple[float, float]) -> Tally:
    """Keep up to `job.window` calls in flight: a slot frees when a call completes."""
    tally = Tally()
    cpu = _CpuClock(window)
    slots = threading.Semaphore(job.window)
    lock = threading.Lock()

    def done(started: float, future: grpc.Future) -> None:
        finished = time.monotonic()
        error = future.exception()
        with lock:
            tally.record(started, finished, error, window, None if error else future.result())  # type: ignore[arg-type]
        slots.release()

    n = 0
    while True:
        if not slots.acquire(timeout=DRAIN_TIMEOUT_S):
            raise RuntimeError(f"no call completed within {DRAIN_TIMEOUT_S:.0f} s; is the wallet stuck?")
        started = time.monotonic()
        cpu.tick(started)
        if started >= window[1]:
            slots.release()
            break
        method, request = _call(job, stub, n)
        future = method.future(request, timeout=CALL_TIMEOUT_S)
        n += 1
        future.add_done_callback(functools.partial(done, started))
    cpu.stop()
    # Let the calls still in flight finish (they count as acknowledged, not as measured).
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    drained = 0
    while drained < job.window and slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
        drained += 1
    with lock:
        tally.issued = n
        tally.undrained = job.window - drained
        tally.client_cpu_s = cpu.used_s
        return dataclasses.replace(tally, errors=Counter(tally.errors), latencies_ms=list(tally.latencies_ms))


# --- CPU accounting from /proc ---------------------------------------------------------------

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
STACK_COMPONENTS = ("wallet", "postgres", "kafka")


def cpu_snapshot(stack: StackCpu) -> tuple[Snapshot, dict[str, float]]:
    """The stack's processes (the wallet, PostgreSQL with its backends, Kafka: loadtests/
    stack_cpu.py), and CPU seconds so far of this process and of the whole machine."""
    own = os.times()
    line = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(v) for v in line[:8]]  # user nice system idle iowait irq softirq steal
    return stack.snapshot(), {
        "client": own.user + own.system,
        "machine_busy": (sum(ticks) - ticks[3] - ticks[4]) / CLOCK_TICKS_PER_S,
        "machine_total": sum(ticks) / CLOCK_TICKS_PER_S,
    }


def cpu_used(stack: StackCpu, before: tuple[Snapshot, dict[str, float]],
             after: tuple[Snapshot, dict[str, float]]) -> dict[str, float | None]:
    """CPU seconds between two snapshots; None for a component with no process."""
    used: dict[str, float | None] = {name: None for name in STACK_COMPONENTS}
    used.update(stack.used_s(before[0], after[0]))
    used.update({k: after[1][k] - before[1][k] for k in before[1]})
    return used


# --- the run ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    credit: str  # "merchants" or "operator"
    window: int  # 0 = synchronous
    batch: int = 1  # transfers per call


def scenarios(windows: Sequence[int], batches: Sequence[int] = (), batch_window: int = 0) -> list[Scenario]:
    """One transfer per call (sync, then each window); then, for each batch size, batches of
    independent transfers through PostTransferBatch, sync and with `batch_window` in flight."""
    found = [Scenario("merchant-sync", "rider -> merchant payables", "merchants", 0),
             Scenario("operator-sync", "rider -> operator revenue (hot)", "operator", 0)]
    for window in windows:
        found.append(Scenario(f"merchant-w{window}", "rider -> merchant payables", "merchants", window))
        found.append(Scenario(f"operator-w{window}", "rider -> operator revenue (hot)", "operator", window))
    for batch in batches:
        for window in sorted({0, batch_window}):
            mode = "sync" if window == 0 else f"w{window}"
            found.append(Scenario(f"merchant-b{batch}-{mode}", "rider -> merchant payables", "merchants", window, batch))
            found.append(Scenario(f"operator-b{batch}-{mode}", "rider -> operator revenue (hot)", "operator", window,
                                  batch))
    return found


def percentile(sorted_values: Sequence[float], fraction: float) -> float | None:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def _setup_call(what: str, call: Callable[[], Any]) -> Any:
    """A setup RPC, retried a bounded number of times on transient failures (same ids)."""
    for attempt in range(1, SETUP_ATTEMPTS_MAX + 1):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE_SETUP_CODES or attempt == SETUP_ATTEMPTS_MAX:
                raise RuntimeError(f"{what} failed: {exc.code().name} {error_reason(exc) or ''} {exc.details()}") from exc
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


class _UnusedDenyList:
    """Funding never blocks or unblocks an account, so the in-process ledger gets no Redis."""

    def _refuse(self, *_: Any) -> None:
        raise RuntimeError("the benchmark's ledger does not touch the deny list")

    add = remove = replace = _refuse


class Bench:
    """One benchmark run against the stack described by the CITYTAP_* environment."""

    def __init__(self, args: argparse.Namespace) -> None:
        # Imported here: the wallet's modules are only needed by the parent process, not by
        # the client processes that import this module to run `drive`.
        from services.wallet.bootstrap import ledger_config
        from services.wallet.domain import AccountKind
        from services.wallet.ledger import Ledger
        from services.wallet.settings import Settings

        self.args = args
        env = dict(os.environ)
        self.address = env["CITYTAP_WALLET_ADDRESS"]
        # The wallet's Settings need a listen address; the wallet's own is the honest value.
        env.setdefault("CITYTAP_LISTEN_ADDRESS", self.address)
        self.settings = load(Settings, env)
        self.config = ledger_config(self.settings)
        self.schema = self.settings.schema
        self.root = Path(env.get("CITYTAP_ROOT", Path(__file__).resolve().parent.parent))
        # A wallet started by hand (a profiling run, say) is named by --wallet-pid.
        self.stack_cpu = StackCpu(Path(env["CITYTAP_STATE_DIR"]), components=STACK_COMPONENTS,
                                  pids={"wallet": args.wallet_pid} if args.wallet_pid is not None else None)
        self.pg_bin = Path(env.get("CITYTAP_PG_BIN", "/usr/lib/postgresql/15/bin"))
        self.run_id = f"bench-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        self.pool = create_pool(self.settings.postgres_dsn, name="citytap-bench", max_size=2)
        self.ledger = Ledger(self.pool, schema=self.schema, config=self.config, deny_list=_UnusedDenyList())
        self.operator_account_id = self.ledger.system_account(AccountKind.OPERATOR_REVENUE)
        self.riders: list[str] = []
        self.merchants: list[str] = []
        self.fund_minor = 0

    def close(self) -> None:
        self.pool.close()

    # --- setup ---

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_WAIT_S_MAX
        while (status := check(self.address, timeout_s=1.0)) != "SERVING":
            if time.monotonic() > deadline:
                raise RuntimeError(f"the wallet at {self.address} is {status} after {READY_WAIT_S_MAX:.0f} s "
                                   "(is the dev stack up? `make up`)")
            time.sleep(0.5)

    def setup(self) -> None:
        from services.wallet.domain import TransferKind

        args = self.args
        channel = connect(self.address, default_timeout_s=SETUP_CALL_TIMEOUT_S)
        try:
            stub = wallet_pb2_grpc.WalletServiceStub(channel)
            for i in range(args.riders):
                account_id = f"{self.run_id}-rider-{i}"
                request = wallet_pb2.CreateAccountRequest(account_id=account_id)  # the default category
                _setup_call(f"CreateAccount {account_id}", functools.partial(stub.CreateAccount, request))
                self.riders.append(account_id)
            for j in range(args.merchants):
                account_id = f"{self.run_id}-merchant-{j}"
                request = wallet_pb2.CreateAccountRequest(
                    account_id=account_id, kind=wallet_pb2.ACCOUNT_KIND_MERCHANT_PAYABLE, owner_id=f"{self.run_id}-m{j}")
                _setup_call(f"CreateAccount {account_id}", functools.partial(stub.CreateAccount, request))
                self.merchants.append(account_id)
        finally:
            channel.close()
        # Fund every rider to the most a wallet may hold, as a top-up would (kind TOP_UP,
        # idempotent under its id).
        self.fund_minor = self.config.stored_value_max_minor
        for i, rider in enumerate(self.riders):
            self.ledger.credit_from_clearing(f"{self.run_id}-fund-{i}", rider, self.fund_minor,
                                             kind=TransferKind.TOP_UP, reference="loadtest funding")

    # --- measuring ---

    def outbox_backlog(self) -> int:
        with self.pool.connection() as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE published_at IS NULL").format(
                sql.Identifier(self.schema, "outbox_events"))).fetchone()
        return int(row[0]) if row else 0

    def wait_outbox_drained(self) -> tuple[int, float]:
        """Wait (bounded) for the relay to publish earlier events, so each scenario starts
        from an idle relay; return the backlog left and the seconds waited."""
        started = time.monotonic()
        while (backlog := self.outbox_backlog()) > 0 and time.monotonic() - started < OUTBOX_DRAIN_WAIT_S_MAX:
            time.sleep(0.2)
        return backlog, time.monotonic() - started

    def jobs(self, index: int, scenario: Scenario, start_at: float) -> list[Job]:
        args = self.args
        credits = tuple(self.merchants) if scenario.credit == "merchants" else (self.operator_account_id,)
        kind = wallet_pb2.TRANSFER_KIND_MERCHANT_PAYMENT if scenario.credit == "merchants" else wallet_pb2.TRANSFER_KIND_FARE
        processes = 1 if scenario.window == 0 else min(args.client_processes, scenario.window)
        jobs = []
        for p in range(processes):
            window = 0 if scenario.window == 0 else scenario.window // processes + (p < scenario.window % processes)
            jobs.append(Job(
                address=self.address, id_prefix=f"{self.run_id}-s{index}-c{p}",
                debit_account_ids=tuple(self.riders[p::processes]), credit_account_ids=credits, kind=kind,
                currency=self.config.currency, amount_minor=args.amount_minor, window=window, batch=scenario.batch,
                start_at=start_at,
                warmup_s=args.warmup_s, duration_s=args.duration_s))
        return jobs

    def run_scenario(self, index: int, scenario: Scenario, workers: Any) -> dict[str, Any]:
        args = self.args
        backlog_before, waited_s = self.wait_outbox_drained()
        lead_s = PROCESS_SPAWN_LEAD_S if workers is not None and scenario.window else 0.2
        start_at = time.monotonic() + lead_s
        jobs = self.jobs(index, scenario, start_at)
        measure_start = start_at + args.warmup_s
        measure_end = measure_start + args.duration_s
        samples: dict[str, Any] = {}

        def sample() -> None:
            time.sleep(max(0.0, measure_start - time.monotonic()))
            samples["before"] = cpu_snapshot(self.stack_cpu)
            time.sleep(max(0.0, measure_end - time.monotonic()))
            samples["after"] = cpu_snapshot(self.stack_cpu)
            samples["backlog_at_end"] = self.outbox_backlog()

        sampler = threading.Thread(target=sample, name="cpu-sampler", daemon=True)
        sampler.start()
        timeout_s = lead_s + args.warmup_s + args.duration_s + DRAIN_TIMEOUT_S + 30.0
        if len(jobs) > 1:
            tallies = workers.map_async(drive, jobs, chunksize=1).get(timeout=timeout_s)
        else:
            tallies = [drive(jobs[0])]
        sampler.join(timeout=timeout_s)
        tally = Tally()
        for t in tallies:
            tally.merge(t)
        latencies = sorted(tally.latencies_ms)
        used = cpu_used(self.stack_cpu, samples["before"], samples["after"]) if "after" in samples else {}
        if len(jobs) > 1:
            used["client"] = tally.client_cpu_s  # the client processes' own CPU, not this one's
        per_s = tally.ok_measured / args.duration_s
        ok = tally.ok_measured
        cpu = {
            name: None if used.get(name) is None else {
                "percent_of_one_core": round(100.0 * used[name] / args.duration_s, 1),
                "us_per_transfer": round(1e6 * used[name] / ok, 1) if ok else None,
            } for name in ("wallet", "postgres", "kafka", "client")
        }
        machine_total = used.get("machine_total")
        machine_busy_percent = (round(100.0 * used["machine_busy"] / machine_total, 1)
                                if machine_total else None)
        # CPU the rest of the machine used meanwhile (other engineers' tests, say): the
        # machine's busy time less this stack's processes and this benchmark's clients.
        ours = [used.get(name) for name in ("wallet", "postgres", "kafka", "client")]
        others_percent = (round(100.0 * (used["machine_busy"] - sum(v for v in ours if v)) / args.duration_s, 1)
                          if used.get("machine_busy") is not None else None)
        return {
            "key": scenario.key, "label": scenario.label, "credit": scenario.credit,
            "mode": "sync" if scenario.window == 0 else "window", "clients": 1 if scenario.window == 0 else scenario.window,
            "batch": scenario.batch,
            "client_processes": len(jobs),
            "transfers_per_s": round(per_s, 1),
            "ok_measured": tally.ok_measured,
            "p50_ms": _round(percentile(latencies, 0.50)), "p99_ms": _round(percentile(latencies, 0.99)),
            "max_ms": _round(latencies[-1] if latencies else None),
            "errors_measured": tally.errors_measured,
            "errors_total": sum(tally.errors.values()),
            "errors_by_reason": dict(tally.errors),
            "acknowledged_total": tally.ok_total, "issued": tally.issued, "undrained": tally.undrained,
            "cpu": cpu, "machine_busy_percent": machine_busy_percent, "others_percent_of_one_core": others_percent,
            "outbox_backlog_before": backlog_before, "outbox_wait_s": round(waited_s, 1),
            "outbox_backlog_at_end": samples.get("backlog_at_end"),
        }

    def posted_in_database(self) -> int:
        """Transfers of this run's scenarios in the ledger (a prefix scan of the primary key)."""
        with self.pool.connection() as conn:
            row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE id LIKE %s").format(
                sql.Identifier(self.schema, "transfers")), (f"{self.run_id}-s%",)).fetchone()
        return int(row[0]) if row else 0

    # --- the ceiling ---

    def pgbench(self, client_counts: Sequence[int]) -> list[dict[str, Any]]:
        args = self.args
        binary = self.pg_bin / "pgbench"
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing (Debian package postgresql-15; `make provision`)")
        info = psycopg.conninfo.conninfo_to_dict(self.settings.postgres_dsn)
        host, port, user = str(info.get("host", "127.0.0.1")), str(info.get("port", "5432")), str(info.get("user", "citytap"))
        self._ensure_pgbench_database(binary, info, host, port, user)
        results = []
        for clients in client_counts:
            for script, flags in (("tpcb-like", []), ("simple-update", ["-N"])):
                command = [str(binary), "-h", host, "-p", port, "-U", user, "-c", str(clients),
                           "-j", str(min(clients, os.cpu_count() or 1)), "-T", str(int(args.pgbench_duration_s)),
                           *flags, PGBENCH_DATABASE]
                print(f"  pgbench {script:<13} -c {clients:<3} -T {int(args.pgbench_duration_s)}", flush=True)
                results.append({"script": script, "clients": clients, **_run_pgbench(
                    command, timeout_s=args.pgbench_duration_s + PGBENCH_OVERRUN_S)})
        return results

    def _ensure_pgbench_database(self, binary: Path, info: dict[str, Any], host: str, port: str, user: str) -> None:
        target = psycopg.conninfo.make_conninfo(**{**info, "dbname": PGBENCH_DATABASE, "connect_timeout": 5})
        initialized = False
        try:
            with psycopg.connect(target, autocommit=True) as conn:
                row = conn.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'pgbench_branches'").fetchone()
                if row and row[0]:
                    branches = conn.execute("SELECT count(*) FROM pgbench_branches").fetchone()
                    initialized = bool(branches) and branches[0] == self.args.pgbench_scale
        except psycopg.OperationalError as exc:
            if "does not exist" not in str(exc):
                raise
            with psycopg.connect(self.settings.postgres_dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(PGBENCH_DATABASE)))
        if not initialized:
            print(f"  pgbench -i -s {self.args.pgbench_scale} (first run on this stack)", flush=True)
            subprocess.run([str(binary), "-h", host, "-p", port, "-U", user, "-i", "-q",
                            "-s", str(self.args.pgbench_scale), PGBENCH_DATABASE],
                           check=True, capture_output=True, timeout=PGBENCH_INIT_TIMEOUT_S)


_TPS = re.compile(r"^tps = ([0-9.]+) \((?:without initial connection time|excluding connections establishing)\)", re.M)
_LATENCY = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def _run_pgbench(command: list[str], *, timeout_s: float) -> dict[str, Any]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"tps": None, "error": f"timed out after {timeout_s:.0f} s"}
    tps = _TPS.search(done.stdout)
    if done.returncode != 0 or tps is None:
        return {"tps": None, "error": (done.stderr.strip() or done.stdout.strip())[-400:]}
    latency = _LATENCY.search(done.stdout)
    failed = _FAILED.search(done.stdout)
    return {"tps": round(float(tps.group(1)), 1), "latency_avg_ms": float(latency.group(1)) if latency else None,
            "failed": int(failed.group(1)) if failed else 0}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# --- reporting -------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = "", missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def report(result: dict[str, Any]) -> str:
    pgbench = {(r["script"], r["clients"]): r.get("tps") for r in result["pgbench"]}
    lines = []
    header = (f"{'scenario':<34} {'clients':>13} {'transfers/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
              f" {'pgbench tps':>12} {'-N tps':>9} {'ratio':>6}")
    lines += [header, "-" * len(header)]
    for s in result["scenarios"]:
        clients = "sync 1" if s["mode"] == "sync" else f"window {s['clients']}"
        if s.get("batch", 1) > 1:
            clients += f" x{s['batch']}"
        tpcb = pgbench.get(("tpcb-like", s["clients"]))
        simple = pgbench.get(("simple-update", s["clients"]))
        ratio = s["transfers_per_s"] / tpcb if tpcb else None
        lines.append(f"{s['label']:<34} {clients:>13} {s['transfers_per_s']:>12.1f} {_fmt(s['p50_ms'], '.2f'):>8}"
                     f" {_fmt(s['p99_ms'], '.2f'):>8} {s['errors_total']:>7} {_fmt(tpcb, '.0f'):>12}"
                     f" {_fmt(simple, '.0f'):>9} {_fmt(ratio, '.2f'):>6}")
    lines += ["(clients: sync 1 = one synchronous client; window N = N calls in flight; xB = B independent transfers"
              " per PostTransferBatch call, otherwise one transfer per CreateTransfers call)"]
    lines += ["", "CPU in the measured window: % of one core (microseconds of CPU per posted transfer); others ="
              " the rest of the machine; machine busy = % of all cores"]
    header = (f"{'scenario':<20} {'wallet':>15} {'postgres':>15} {'kafka':>13} {'client':>13} {'others':>7}"
              f" {'machine busy':>13} {'outbox left':>12}")
    lines += [header, "-" * len(header)]
    for s in result["scenarios"]:
        cells = []
        for name, width in (("wallet", 15), ("postgres", 15), ("kafka", 13), ("client", 13)):
            c = s["cpu"].get(name)
            text = "n/a" if c is None else f"{c['percent_of_one_core']:.0f}% ({_fmt(c['us_per_transfer'], '.0f')})"
            cells.append(f"{text:>{width}}")
        lines.append(f"{s['key']:<20} {' '.join(cells)} {_fmt(s['others_percent_of_one_core'], '.0f'):>6}%"
                     f" {_fmt(s['machine_busy_percent'], '.0f'):>12}%"
                     f" {_fmt(s['outbox_backlog_at_end']):>12}")
    lines.append("")
    for title, best in (("best concurrent, one transfer per call", result.get("best_single")),
                        ("best concurrent, any call", result["best_concurrent"])):
        if not best:
            continue
        shape = f"window {best['clients']}" + (f", {best['batch']} transfers per call" if best["batch"] > 1 else "")
        lines.append(f"{title}: {best['label']}, {shape}: {best['transfers_per_s']:.1f} posted transfers/s"
                     f" (p99 {_fmt(best['p99_ms'], '.2f')} ms per call); pgbench TPC-B-like at {best['clients']} clients"
                     f" {_fmt(best['pgbench_tps'], '.1f')} tps; ratio API/pgbench {_fmt(best['ratio'], '.2f')}")
    errors: Counter = Counter()
    for s in result["scenarios"]:
        errors.update(s["errors_by_reason"])
    check_db = result["database_check"]
    lines.append(f"errors: {sum(errors.values())} in all scenarios" + ("" if not errors else " (must be 0: "
                 + ", ".join(f"{k} x{v}" for k, v in errors.most_common()) + ")"))
    lines.append(f"database: {check_db['posted']} transfers of this run posted, {check_db['acknowledged']} acknowledged OK"
                 f" ({'match' if check_db['match'] else 'MISMATCH'})")
    load_start, load_end = result["machine"]["loadavg_start"], result["machine"]["loadavg_end"]
    lines.append(f"machine: {result['machine']['cpus']} CPUs; load average {' '.join(f'{v:.2f}' for v in load_start)}"
                 f" at start, {' '.join(f'{v:.2f}' for v in load_end)} at end")
    lines.append(f"verdict: {result['verdict']} (target {TARGET_TRANSFERS_PER_S} posted transfers/s through the API,"
                 " best concurrent scenario of any call shape)")
    return "\n".join(lines)


def best_concurrent(result: dict[str, Any], *, single_only: bool = False) -> dict[str, Any] | None:
    concurrent = [s for s in result["scenarios"] if s["mode"] == "window" and (s["batch"] == 1 or not single_only)]
    if not concurrent:
        return None
    best = max(concurrent, key=lambda s: s["transfers_per_s"])
    tps = next((r.get("tps") for r in result["pgbench"] if r["script"] == "tpcb-like" and r["clients"] == best["clients"]),
               None)
    return {"key": best["key"], "label": best["label"], "clients": best["clients"], "batch": best["batch"],
            "transfers_per_s": best["transfers_per_s"], "p99_ms": best["p99_ms"], "pgbench_tps": tps,
            "ratio": round(best["transfers_per_s"] / tps, 3) if tps else None}


# --- entry point -----------------------------------------------------------------------------


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers, such as 8,16,32") from None
    if not values or any(not 1 <= v <= WINDOW_MAX for v in values):
        raise argparse.ArgumentTypeError(f"expected windows between 1 and {WINDOW_MAX}")
    return values


def _batch_list(text: str) -> tuple[int, ...]:
    from services.wallet.domain import INDEPENDENT_TRANSFERS_MAX

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected comma-separated whole numbers, such as 16,64") from None
    if values == (0,):
        return ()
    if not values or any(not 2 <= v <= INDEPENDENT_TRANSFERS_MAX for v in values):
        raise argparse.ArgumentTypeError(f"expected batch sizes from 2 to {INDEPENDENT_TRANSFERS_MAX}, or 0 for none")
    return values


def _bounded(kind: Callable[[str], Any], low: float, high: float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected a value from {low:g} to {high:g}")
        return value
    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.wallet_transfers",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration-s", type=_bounded(float, 1, DURATION_S_MAX), default=DURATION_S_DEFAULT,
                        help="measured seconds per scenario (default %(default)s)")
    parser.add_argument("--warmup-s", type=_bounded(float, 0, 30), default=WARMUP_S_DEFAULT,
                        help="unmeasured seconds before each scenario (default %(default)s)")
    parser.add_argument("--windows", type=_int_list, default=WINDOWS_DEFAULT,
                        help="in-flight windows of the concurrent scenarios (default 8,16,32)")
    parser.add_argument("--batches", type=_batch_list, default=BATCHES_DEFAULT,
                        help="transfers per PostTransferBatch call in the batch scenarios; 0 skips them (default 16,64)")
    parser.add_argument("--batch-window", type=_bounded(int, 1, WINDOW_MAX), default=BATCH_WINDOW_DEFAULT,
                        help="batch calls in flight in the concurrent batch scenarios (default %(default)s)")
    parser.add_argument("--client-processes", type=_bounded(int, 1, CLIENT_PROCESSES_MAX), default=1,
                        help="processes a window is spread over (default %(default)s)")
    parser.add_argument("--riders", type=_bounded(int, 1, RIDERS_MAX), default=RIDERS_DEFAULT,
                        help="rider wallets opened and funded (default %(default)s)")
    parser.add_argument("--merchants", type=_bounded(int, 1, MERCHANTS_MAX), default=MERCHANTS_DEFAULT,
                        help="merchant payables the spread scenarios credit (default %(default)s)")
    parser.add_argument("--amount-minor", type=_bounded(int, 1, 100_000), default=AMOUNT_MINOR_DEFAULT,
                        help="amount of every transfer, in minor units (default %(default)s)")
    parser.add_argument("--pgbench-duration-s", type=_bounded(float, 1, DURATION_S_MAX), default=DURATION_S_DEFAULT,
                        help="pgbench -T per run (default %(default)s)")
    parser.add_argument("--pgbench-scale", type=_bounded(int, 1, 100), default=PGBENCH_SCALE_DEFAULT,
                        help="pgbench -i -s of the pgbench database (default %(default)s)")
    parser.add_argument("--no-pgbench", action="store_true", help="skip the ceiling (quick API-only runs)")
    parser.add_argument("--wallet-pid", type=int, default=None,
                        help="pid of the wallet process whose CPU to report (default: the stack's pid file)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON results (default $CITYTAP_ROOT/.local/bench/wallet_transfers.json)")
    args = parser.parse_args(argv)
    if args.riders < 2 * max(args.windows):
        parser.error(f"--riders must be at least twice the largest window ({2 * max(args.windows)}), so calls in "
                     "flight seldom share a rider")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("CITYTAP_WALLET_ADDRESS", "CITYTAP_POSTGRES_DSN", "CITYTAP_STATE_DIR"):
        if not os.environ.get(name):
            print(f"wallet_transfers: {name} is not set; run through `make bench-transfers` or "
                  "`source infra/env.sh` first", file=sys.stderr)
            return 1
    started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    loadavg_start = os.getloadavg()
    try:
        bench = Bench(args)
    except Exception as exc:  # noqa: BLE001 - report why the benchmark cannot run
        print(f"wallet_transfers: cannot start: {exc}", file=sys.stderr)
        return 1
    workers = None
    try:
        bench.wait_ready()
        print(f"== setup (run {bench.run_id}): {args.riders} riders, {args.merchants} merchant payables", flush=True)
        t0 = time.monotonic()
        bench.setup()
        print(f"  opened and funded in {time.monotonic() - t0:.1f} s; each rider holds {bench.fund_minor} minor units,"
              f" {bench.fund_minor // args.amount_minor} transfers of {args.amount_minor}", flush=True)
        if args.client_processes > 1:
            workers = multiprocessing.get_context("spawn").Pool(args.client_processes)
        print(f"== API: CreateTransfers with one transfer per call, then PostTransferBatch with"
              f" {'/'.join(map(str, args.batches)) or 'no'} independent transfers per call; {args.warmup_s:g} s warm-up"
              f" + {args.duration_s:g} s measured per scenario", flush=True)
        results = []
        for index, scenario in enumerate(scenarios(args.windows, args.batches, args.batch_window)):
            outcome = bench.run_scenario(index, scenario, workers)
            results.append(outcome)
            print(f"  {scenario.key:<20} {outcome['transfers_per_s']:>9.1f}/s  p50 {_fmt(outcome['p50_ms'], '.2f')} ms"
                  f"  p99 {_fmt(outcome['p99_ms'], '.2f')} ms  errors {outcome['errors_total']}", flush=True)
        posted = bench.posted_in_database()
        acknowledged = sum(s["acknowledged_total"] for s in results)
        pgbench_results: list[dict[str, Any]] = []
        if not args.no_pgbench:
            bench.wait_outbox_drained()
            print("== ceiling: pgbench on the same PostgreSQL", flush=True)
            pgbench_results = bench.pgbench(sorted({1, *args.windows, *([args.batch_window] if args.batches else [])}))
    except Exception as exc:  # noqa: BLE001 - report why the benchmark could not finish
        print(f"wallet_transfers: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if workers is not None:
            workers.terminate()
            workers.join()
        bench.close()

    result: dict[str, Any] = {
        "run_id": bench.run_id, "started_at": started_at, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "target_transfers_per_s": TARGET_TRANSFERS_PER_S,
        "parameters": {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                       for k, v in vars(args).items()},
        "wallet_address": bench.address,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": list(loadavg_start), "loadavg_end": list(os.getloadavg())},
        "scenarios": results, "pgbench": pgbench_results,
        "database_check": {"posted": posted, "acknowledged": acknowledged, "match": posted == acknowledged},
    }
    result["best_concurrent"] = best_concurrent(result)
    result["best_single"] = best_concurrent(result, single_only=True)
    best_rate = (result["best_concurrent"] or {}).get("transfers_per_s", 0.0)
    result["verdict"] = "PASS" if best_rate >= TARGET_TRANSFERS_PER_S else "FAIL"
    print()
    print(report(result))
    output = args.output or bench.root / ".local" / "bench" / "wallet_transfers.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
