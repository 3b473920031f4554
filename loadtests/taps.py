"""Tap decision latency and the highest sustained tap rate, open loop, against the running stack.

    make bench-taps                 # the dev stack up, then this with infra/env.sh
    BENCH_QUICK=1 make bench-taps   # 10 s phases instead of 60 s, for a quick look
    python -m loadtests.taps --help

What it does, in order (see services/fare_gate/EMULATOR.md for the method):

1. Setup, not timed: synthetic riders (2,400 for the default rates) opened with the wallet's CreateAccount and
   LinkCard (ids unique to this run), each funded in-process with
   `Ledger.credit_from_clearing` on the wallet's schema, the seam the Stripe top-up flow
   credits through (`ledger_funder` below, also usable as the emulator's
   `--fund loadtests.taps:ledger_funder`).
2. Baseline: GetGateConfig at 200 calls/s for the phase duration, open loop. It does no fare
   work, so it shows what the machine, Python and gRPC cost at that rate on this run.
3. Phase A: Tap at 200 taps/s for the phase duration: p50/p99/p99.9 against the target p99 <=
   50 ms, and the ratio of Tap to the baseline.
4. The floor: the same riders' taps through loadtests/tap_floor.py's rule-free servers at 200 and
   500 taps/s, each for the phase duration: what the stack's parts cost with no rules at all,
   measured in the same run (`--no-floor` leaves it out).
5. Steps: Tap at 50, 100, 150, 200, 300, 400... taps/s, each for the step duration; a step passes with
   p99 <= 100 ms and no errors. The sweep stops at the first failed step; the highest passed
   rate is the one sustained (target >= 500 taps/s).
6. A table, `.local/bench/taps.json`, and `.local/bench/tap_latency.png`.

Each phase also prints the stack's CPU per answered call, by process (loadtests/stack_cpu.py
reads /proc for the processes under `$CITYTAP_STATE_DIR/run/`, PostgreSQL's backends
included, and this process as the load generator), and what the machine's CPUs could carry
at that cost. Latency on the shared box moves with the neighbours; CPU per tap moves less,
and it says which process a change helped. Compare changes in runs side by side: a busy
host still makes every tap dearer.

Riders alternate entry and exit across the demo city's metro stations (two gates each), so
every tap goes through the real entry (hold) and exit (price, post) paths. Taps are sent at
the current time. Before each phase the bench waits (bounded) for the outbox relays of
wallet and fare_gate to publish the previous phase's events, for the stack's processes to
use at most 0.2 of a core over 2 s (settlement has consumed the previous phase's events),
and for the fare gate to answer GetGateConfig within 20 ms three times in a row, so each
phase starts from a quiet stack and an empty request queue.

The exit status is 0 whatever the verdicts: a benchmark reports, it is not a gate. It is 1
only when the benchmark could not run (stack down, setup refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from psycopg import sql

from libs.grpc_health_probe import check
from libs.postgres import create_pool
from libs.settings import load
from loadtests.stack_cpu import LOAD_GENERATOR, CallCost, StackCpu, call_cost
from loadtests.tap_floor import FloorRun, FloorStack
from services.fare_gate.emulator.gate import CallFailed, FareGateClient, WalletClient
from services.fare_gate.emulator.load import LoadShape, rider_setups, run_baseline, run_taps, synthetic_riders
from services.fare_gate.emulator.openloop import RunResult
from services.fare_gate.emulator.plot import Series, StepPoint, write_latency_png
from services.fare_gate.emulator.provision import SetupError, set_up_riders
from services.fare_gate.emulator.report import format_run, ms, run_to_dict
from services.fare_gate.emulator.riders import RiderPool, station_gates

TARGET_P99_MS_AT_200 = 50.0
STEP_P99_MS_MAX = 100.0
TARGET_SUSTAINED_PER_S = 500.0
PHASE_RATE_PER_S = 200.0

PHASE_S_DEFAULT = 60.0
STEP_S_DEFAULT = 60.0
QUICK_S = 10.0
DURATION_S_MAX = 900.0
# From below what the stack sustains today, so the sweep reports a rate rather than 0.
RATES_DEFAULT = (50, 100, 150, 200, 300, 400, 500, 600, 700, 800, 900, 1000)
RATES_COUNT_MAX = 30
WARMUP_S = 3.0
DEADLINE_MS_DEFAULT = 1000
RIDERS_MAX = 20_000
RIDERS_MIN = 1000
# A rider comes back to a gate five taps later at the soonest (see riders.py); with this
# many riders that is at least SAME_GATE_GAP_S even at the highest rate, above the fare
# gate's 10 s double-tap window, so no tap of the run is answered as a double tap.
SAME_GATE_GAP_S = 12.0
TAPS_BEFORE_SAME_GATE = 5
FUND_MINOR = 500_000  # NT$5,000 each: every entry can hold the maximum fare however long the run
SETUP_WORKERS = 8
READY_WAIT_S_MAX = 30.0
OUTBOX_DRAIN_WAIT_S_MAX = 60.0
STATIONS = ("HBR", "OLD", "CEN", "UNI", "HSP", "NHL", "APT", "RIV", "MKT", "STD")  # demo city metro
GATES_PER_STATION = 2
OUTBOX_SCHEMAS = ("wallet", "fare_gate")
# Before a phase the fare gate must answer GetGateConfig this fast this many times in a
# row: a server still working through the previous phase's queue would otherwise charge
# its backlog to the next phase.
IDLE_CALL_MS_MAX = 20.0
IDLE_CALLS_IN_A_ROW = 3
IDLE_WAIT_S_MAX = 60.0
# Before a phase, the stack must have finished the last one's work (settlement consuming its
# events, journeys closing): at most this much CPU, in cores, over a QUIET_WINDOW_S window.
# The idle stack uses about 0.1.
QUIET_CORES_MAX = 0.2
QUIET_WINDOW_S = 2.0
QUIET_WAIT_S_MAX = 120.0


# --- funding ------------------------------------------------------------------------------


class _NoDenyList:
    """Funding never blocks an account, so the in-process ledger gets no Redis."""

    def _refuse(self, *_: Any) -> None:
        raise RuntimeError("the benchmark's ledger does not touch the deny list")

    add = remove = replace = _refuse


class LedgerFunder:
    """Credits rider wallets through the wallet's own ledger code on its PostgreSQL schema,
    as a succeeded Stripe top-up does, idempotently under the funding id."""

    def __init__(self, environ: dict[str, str] | None = None, *, pool_size: int = SETUP_WORKERS) -> None:
        from services.wallet.bootstrap import ledger_config
        from services.wallet.ledger import Ledger
        from services.wallet.settings import Settings

        env = dict(os.environ if environ is None else environ)
        # The wallet's Settings need a listen address; the wallet's own is the honest value.
        env.setdefault("CITYTAP_LISTEN_ADDRESS", env.get("CITYTAP_WALLET_ADDRESS", "127.0.0.1:0"))
        settings = load(Settings, env)
        self.schema = settings.schema
        self.pool = create_pool(settings.postgres_dsn, name="citytap-bench-taps", max_size=pool_size)
        self.ledger = Ledger(self.pool, schema=self.schema, config=ledger_config(settings), deny_list=_NoDenyList())

    def __call__(self, account_id: str, amount_minor: int, funding_id: str) -> None:
        from services.wallet.domain import TransferKind

        self.ledger.credit_from_clearing(funding_id, account_id, amount_minor, kind=TransferKind.TOP_UP,
                                         reference="loadtest funding")

    def close(self) -> None:
        self.pool.close()


def ledger_funder() -> LedgerFunder:
    """The emulator's `--fund loadtests.taps:ledger_funder` (needs `source infra/env.sh`)."""
    return LedgerFunder()


# --- the benchmark --------------------------------------------------------------------------


@dataclasses.dataclass
class Step:
    rate_per_s: float
    result: RunResult
    client_cpu_pct: float
    outbox_wait_s: float  # settling before the step: outbox relays and the server's queue
    cost: CallCost | None = None  # the stack's CPU per tap in this step

    @property
    def passed(self) -> bool:
        p99 = self.result.latency_summary().p99_ms
        return self.result.error_count == 0 and p99 is not None and p99 <= STEP_P99_MS_MAX and self.result.answered > 0


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"taps bench: {name} is not set; run it as `make bench-taps` or after `source infra/env.sh`")
    return value


class TapBench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.fare_gate_address = _env("CITYTAP_FARE_GATE_ADDRESS")
        self.wallet_address = _env("CITYTAP_WALLET_ADDRESS")
        self.root = Path(os.environ.get("CITYTAP_ROOT") or Path(__file__).resolve().parent.parent)
        self.out_dir = self.root / ".local" / "bench"
        self.run_id = f"taps-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        self.seed = args.seed if args.seed is not None else secrets.randbits(32)
        self.gates = station_gates(STATIONS, GATES_PER_STATION)
        self.deadline_s = args.deadline_ms / 1000.0
        self.client = FareGateClient(self.fare_gate_address, deadline_s=self.deadline_s)
        self.funder: LedgerFunder | None = None
        self.pool: RiderPool | None = None
        self.phase_counter = 0
        self.stack_cpu = StackCpu.from_environment()

    def close(self) -> None:
        self.client.close()
        if self.funder is not None:
            self.funder.close()

    def say(self, line: str = "") -> None:
        print(line, flush=True)

    # --- setup ---

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_WAIT_S_MAX
        for name, address in (("fare gate", self.fare_gate_address), ("wallet", self.wallet_address)):
            while (status := check(address, timeout_s=1.0)) != "SERVING":
                if time.monotonic() > deadline:
                    raise SystemExit(f"taps bench: the {name} at {address} is {status} after "
                                     f"{READY_WAIT_S_MAX:.0f} s (is the dev stack up? `make up`)")
                time.sleep(0.5)

    def setup(self) -> None:
        riders = synthetic_riders(self.args.riders, run_id=self.run_id, seed=self.seed)
        self.funder = LedgerFunder()
        wallet = WalletClient(self.wallet_address, deadline_s=5.0)
        started = time.monotonic()
        try:
            set_up_riders(wallet, rider_setups(riders, fund_minor=FUND_MINOR), funder=self.funder,
                          workers=SETUP_WORKERS)
        finally:
            wallet.close()
        self.pool = RiderPool(riders, self.gates, seed=self.seed)
        self.say(f"setup: {len(riders)} riders opened, linked and funded (TWD {FUND_MINOR // 100} each) "
                 f"in {time.monotonic() - started:.1f} s")

    def outbox_backlog(self) -> int:
        assert self.funder is not None
        total = 0
        with self.funder.pool.connection() as conn:
            for schema in OUTBOX_SCHEMAS:
                exists = conn.execute("SELECT to_regclass(%s)", (f"{schema}.outbox_events",)).fetchone()
                if exists and exists[0] is not None:
                    row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE published_at IS NULL").format(
                        sql.Identifier(schema, "outbox_events"))).fetchone()
                    total += int(row[0]) if row else 0
        return total

    def wait_outbox_drained(self) -> float:
        started = time.monotonic()
        while self.outbox_backlog() > 0 and time.monotonic() - started < OUTBOX_DRAIN_WAIT_S_MAX:
            time.sleep(0.2)
        return time.monotonic() - started

    # --- phases ---

    def wait_server_idle(self) -> float:
        started = time.monotonic()
        in_a_row = 0
        while in_a_row < IDLE_CALLS_IN_A_ROW and time.monotonic() - started < IDLE_WAIT_S_MAX:
            call_started = time.perf_counter()
            try:
                self.client.gate_config(self.gates[0].gate_id)
                fast = (time.perf_counter() - call_started) * 1000.0 <= IDLE_CALL_MS_MAX
            except CallFailed:
                fast = False
            in_a_row = in_a_row + 1 if fast else 0
            time.sleep(0.1)
        return time.monotonic() - started

    def wait_stack_quiet(self) -> float:
        """Wait (bounded) until the stack's processes use at most QUIET_CORES_MAX of CPU, so a
        phase neither pays for the last one's trailing work nor counts it as its own."""
        started = time.monotonic()
        if self.stack_cpu is None:
            return 0.0
        while time.monotonic() - started < QUIET_WAIT_S_MAX:
            before = self.stack_cpu.snapshot()
            time.sleep(QUIET_WINDOW_S)
            if sum(self.stack_cpu.used_s(before, self.stack_cpu.snapshot()).values()) <= QUIET_CORES_MAX * QUIET_WINDOW_S:
                break
        return time.monotonic() - started

    def _measure(self, run: Any) -> tuple[RunResult, float, float, CallCost | None]:
        waited_s = self.wait_outbox_drained() + self.wait_stack_quiet() + self.wait_server_idle()
        before = self.stack_cpu.snapshot() if self.stack_cpu else None
        cpu0, wall0 = time.process_time(), time.monotonic()
        result = run()
        client_cpu_s = time.process_time() - cpu0
        cpu_pct = 100.0 * client_cpu_s / max(1e-9, time.monotonic() - wall0)
        cost = None
        if self.stack_cpu is not None and before is not None:
            # The events of this phase's calls are published and consumed after the last
            # answer; waiting for the relays keeps most of that work in this phase's count.
            self.wait_outbox_drained()
            used = self.stack_cpu.used_s(before, self.stack_cpu.snapshot())
            used[LOAD_GENERATOR] = client_cpu_s
            # Per answered call: a call refused at once costs next to nothing, and dividing by
            # calls sent would flatter an overloaded phase.
            cost = call_cost(used, result.answered_with_warmup)
        return result, cpu_pct, waited_s, cost

    def taps(self, rate_per_s: float, duration_s: float) -> tuple[RunResult, float, float, CallCost | None]:
        assert self.pool is not None
        self.phase_counter += 1
        shape = LoadShape(rate_per_s, duration_s, WARMUP_S, self.deadline_s)
        prefix = f"{self.run_id}-p{self.phase_counter}"
        return self._measure(lambda: run_taps(self.client, self.pool, shape, tap_id_prefix=prefix))

    def baseline(self, rate_per_s: float, duration_s: float) -> tuple[RunResult, float, str, CallCost | None]:
        method = "config"
        try:
            self.client.gate_config(self.gates[0].gate_id)
        except CallFailed as exc:
            self.say(f"baseline: GetGateConfig failed ({exc.describe()}); using the health check instead")
            method = "health"
        shape = LoadShape(rate_per_s, duration_s, WARMUP_S, self.deadline_s)
        result, cpu_pct, _, cost = self._measure(
            lambda: run_baseline(self.client, shape, method=method, gate_id=self.gates[0].gate_id))
        return result, cpu_pct, method, cost

    def run(self) -> dict[str, Any]:
        args = self.args
        self.say(f"taps bench {self.run_id}: fare gate {self.fare_gate_address}, wallet {self.wallet_address}; "
                 f"phase {args.phase_s:g} s, steps {args.step_s:g} s, rates {', '.join(f'{r:g}' for r in args.rates)}; "
                 f"{args.riders} riders, {len(self.gates)} gates, deadline {args.deadline_ms} ms, seed {self.seed}")
        self.say(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        self.wait_ready()
        self.setup()

        self.say(f"\n== baseline at {PHASE_RATE_PER_S:g} calls/s for {args.phase_s:g} s")
        base, base_cpu, base_method, base_cost = self.baseline(PHASE_RATE_PER_S, args.phase_s)
        for line in format_run(base, what="calls"):
            self.say(line)
        if base_cost is not None:
            self.say("  " + base_cost.describe("call"))

        self.say(f"\n== phase A: Tap at {PHASE_RATE_PER_S:g} taps/s for {args.phase_s:g} s")
        phase, phase_cpu, phase_wait, phase_cost = self.taps(PHASE_RATE_PER_S, args.phase_s)
        for line in format_run(phase):
            self.say(line)
        if phase_cost is not None:
            self.say("  " + phase_cost.describe("tap"))

        floor_runs = self.floor() if not args.no_floor else []

        steps: list[Step] = []
        if not args.no_steps:
            self.say(f"\n== steps: {args.step_s:g} s each; pass = p99 <= {STEP_P99_MS_MAX:g} ms and no errors")
            for rate in args.rates:
                result, cpu_pct, waited_s, cost = self.taps(rate, args.step_s)
                step = Step(rate, result, cpu_pct, waited_s, cost)
                steps.append(step)
                summary = result.latency_summary()
                self.say(f"  {rate:>6g}/s  p50 {ms(summary.p50_ms):>7}  p99 {ms(summary.p99_ms):>7}  "
                         f"p99.9 {ms(summary.p999_ms):>7}  errors {result.error_count:>5}  "
                         f"answered {result.achieved_rate_per_s:7.1f}/s  {'pass' if step.passed else 'FAIL'}"
                         + (f"  CPU {cost.total_ms:.1f} ms/tap" if cost else ""))
                if not step.passed and not args.keep_going:
                    break
        return self.report(base, base_cpu, base_method, base_cost, phase, phase_cpu, phase_wait, phase_cost, steps,
                           floor_runs)

    def floor(self) -> list[FloorRun]:
        """The same riders' taps through the floor servers (loadtests/tap_floor.py) at the
        phase rate and the target rate: what the stack's parts cost with no rules at all."""
        assert self.pool is not None
        runs = []
        self.wait_outbox_drained()
        self.wait_stack_quiet()
        with FloorStack(deadline_s=self.deadline_s) as floor:
            for number, rate in enumerate((PHASE_RATE_PER_S, TARGET_SUSTAINED_PER_S), start=1):
                self.say(f"\n== floor: the same taps with no rules (loadtests/tap_floor.py) at {rate:g} taps/s "
                         f"for {self.args.phase_s:g} s")
                pool = RiderPool(self.pool.riders, self.gates, seed=self.seed + number)
                run = floor.run(pool, rate, self.args.phase_s, tap_id_prefix=f"{self.run_id}-floor{number}",
                                warmup_s=WARMUP_S)
                for line in format_run(run.result):
                    self.say(line)
                if run.cost is not None:
                    self.say("  " + run.cost.describe("tap"))
                runs.append(run)
        return runs

    # --- report ---

    def report(self, base: RunResult, base_cpu: float, base_method: str, base_cost: CallCost | None,
               phase: RunResult, phase_cpu: float, phase_wait: float, phase_cost: CallCost | None,
               steps: list[Step], floor_runs: list[FloorRun]) -> dict[str, Any]:
        args = self.args
        tap, ref = phase.latency_summary(), base.latency_summary()

        def ratio(a: float | None, b: float | None) -> float | None:
            return round(a / b, 2) if a is not None and b else None

        p99_ok = tap.p99_ms is not None and tap.p99_ms <= TARGET_P99_MS_AT_200 and phase.error_count == 0
        # "Sustained" means every step up to it passed: a pass after a failure does not count.
        sustained = 0.0
        for step in steps:
            if not step.passed:
                break
            sustained = step.rate_per_s
        sustained_ok = sustained >= TARGET_SUSTAINED_PER_S

        self.say("\n== results")
        self.say(f"{'what':<34} {'rate/s':>8} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>8} {'errors':>7} "
                 f"{'answered/s':>11} {'client CPU':>10}")
        rows = [(f"baseline {base_method}", base, base_cpu), ("Tap (phase A)", phase, phase_cpu)]
        rows += [(f"floor (no rules) {'pass' if f.passed else 'FAIL'}", f.result, math.nan) for f in floor_runs]
        rows += [(f"Tap step {'pass' if s.passed else 'FAIL'}", s.result, s.client_cpu_pct) for s in steps]
        for name, result, cpu in rows:
            s = result.latency_summary()
            self.say(f"{name:<34} {result.rate_per_s:>8g} {ms(s.p50_ms):>8} {ms(s.p99_ms):>8} {ms(s.p999_ms):>8} "
                     f"{ms(s.max_ms):>8} {result.error_count:>7} {result.achieved_rate_per_s:>11.1f} "
                     + (f"{cpu:>9.0f}%" if not math.isnan(cpu) else f"{'-':>10}"))
        self.say("(latencies in ms, from each call's scheduled send time; client CPU is this process, of one core)")
        self.say("")
        self.say(f"tap decision latency at {PHASE_RATE_PER_S:g} taps/s: p50 {ms(tap.p50_ms)} ms, p99 {ms(tap.p99_ms)} ms, "
                 f"p99.9 {ms(tap.p999_ms)} ms, errors {phase.error_count}; target p99 <= {TARGET_P99_MS_AT_200:g} ms: "
                 f"{'PASS' if p99_ok else 'FAIL'}")
        self.say(f"  against the baseline ({base_method} at the same rate, p50 {ms(ref.p50_ms)} / p99 {ms(ref.p99_ms)} ms): "
                 f"Tap is {ratio(tap.p50_ms, ref.p50_ms)}x at p50 and {ratio(tap.p99_ms, ref.p99_ms)}x at p99")
        if steps:
            self.say(f"highest rate sustained for {args.step_s:g} s with p99 <= {STEP_P99_MS_MAX:g} ms and no errors: "
                     f"{sustained:g} taps/s; target >= {TARGET_SUSTAINED_PER_S:g}: {'PASS' if sustained_ok else 'FAIL'}")
            if args.step_s < 60:
                self.say(f"  (steps of {args.step_s:g} s: a quick look, not the 60 s the target asks for)")
        if phase.mix:
            self.say(f"tap mix in phase A: {', '.join(f'{k} {v}' for k, v in phase.mix.most_common())}")
        if phase_cost is not None:
            self.say(f"{phase_cost.describe('tap')} (phase A; the load generator is this process)")
            if base_cost is not None and base_cost.total_ms > 0:
                self.say(f"  against the baseline's {base_cost.total_ms:.2f} ms per GetGateConfig call: "
                         f"{phase_cost.total_ms / base_cost.total_ms:.1f}x")

        for run in floor_runs:
            fs = run.result.latency_summary()
            line = (f"floor (the same taps, no rules) at {run.result.rate_per_s:g} taps/s: p50 {ms(fs.p50_ms)} ms, "
                    f"p99 {ms(fs.p99_ms)} ms, errors {run.result.error_count}, answered "
                    f"{run.result.achieved_rate_per_s:.1f}/s")
            if run.cost is not None:
                line += f", {run.cost.total_ms:.2f} ms of CPU per tap"
            self.say(line)
        floor_at_phase = next((r for r in floor_runs if r.result.rate_per_s == PHASE_RATE_PER_S), None)
        if phase_cost is not None and floor_at_phase is not None and floor_at_phase.cost is not None:
            self.say(f"  Tap (phase A) costs {phase_cost.total_ms / floor_at_phase.cost.total_ms:.1f}x the floor's "
                     f"CPU per tap at {PHASE_RATE_PER_S:g} taps/s")

        document: dict[str, Any] = {
            "run_id": self.run_id, "fare_gate_address": self.fare_gate_address, "seed": self.seed,
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_end": os.getloadavg()},
            "settings": {"phase_s": args.phase_s, "step_s": args.step_s, "rates": list(args.rates),
                         "riders": args.riders, "gates": len(self.gates), "deadline_ms": args.deadline_ms,
                         "warmup_s": WARMUP_S, "quick": args.quick},
            "baseline": {"method": base_method, **run_to_dict(base), "client_cpu_pct": round(base_cpu, 1),
                         "stack_cpu": base_cost.to_dict() if base_cost else None},
            "phase_a": {**run_to_dict(phase), "client_cpu_pct": round(phase_cpu, 1),
                        "settle_wait_s": round(phase_wait, 2),
                        "stack_cpu": phase_cost.to_dict() if phase_cost else None,
                        "ratio_to_baseline": {"p50": ratio(tap.p50_ms, ref.p50_ms), "p99": ratio(tap.p99_ms, ref.p99_ms)},
                        "target_p99_ms": TARGET_P99_MS_AT_200, "pass": p99_ok},
            "steps": [{**run_to_dict(s.result), "pass": s.passed, "client_cpu_pct": round(s.client_cpu_pct, 1),
                       "settle_wait_s": round(s.outbox_wait_s, 2),
                       "stack_cpu": s.cost.to_dict() if s.cost else None} for s in steps],
            "floor": [run.to_dict() for run in floor_runs],
            "sustained_rate_per_s": sustained if steps else None,
            "sustained_target_per_s": TARGET_SUSTAINED_PER_S,
            "sustained_pass": sustained_ok if steps else None,
            "taps_failed": self.pool.failed_taps if self.pool else 0,
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        json_path = self.out_dir / "taps.json"
        json_path.write_text(json.dumps(document, indent=2) + "\n")
        png_path = write_latency_png(
            self.out_dir / "tap_latency.png",
            [Series(f"Tap at {PHASE_RATE_PER_S:g}/s", phase.latencies_ms(), phase.error_count),
             Series(f"baseline {base_method} at {PHASE_RATE_PER_S:g}/s", base.latencies_ms(), base.error_count)],
            title=f"Tap decision latency, open loop, {PHASE_RATE_PER_S:g} taps/s for {args.phase_s:g} s",
            subtitle=f"{self.fare_gate_address}, run {self.run_id}, {os.cpu_count()} CPUs",
            budget_ms=TARGET_P99_MS_AT_200,
            steps=[_step_point(s) for s in steps],
            step_budget_ms=STEP_P99_MS_MAX)
        self.say(f"\nresults: {json_path}\npicture: {png_path}")
        return document


def _step_point(step: Step) -> StepPoint:
    summary = step.result.latency_summary()
    return StepPoint(step.rate_per_s, summary.p50_ms, summary.p99_ms, summary.p999_ms, step.passed)


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("expected rates separated by commas, such as 200,300,400") from None
    if not rates or len(rates) > RATES_COUNT_MAX or any(not 0 < r <= 20_000 for r in rates):
        raise argparse.ArgumentTypeError(f"1 to {RATES_COUNT_MAX} rates, each in (0, 20000]")
    return rates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtests.taps", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, help=f"seconds of the baseline and of phase A (default {PHASE_S_DEFAULT:g}; "
                                                      f"{QUICK_S:g} with BENCH_QUICK=1)")
    parser.add_argument("--step-s", type=float, help=f"seconds of each rate step (default {STEP_S_DEFAULT:g}; "
                                                     f"{QUICK_S:g} with BENCH_QUICK=1)")
    parser.add_argument("--rates", type=_rates, default=RATES_DEFAULT,
                        help=f"rate steps, taps/s (default {','.join(map(str, RATES_DEFAULT))})")
    parser.add_argument("--keep-going", action="store_true", help="run every step even after one fails")
    parser.add_argument("--no-steps", action="store_true", help="only the baseline, phase A and the floor")
    parser.add_argument("--no-floor", action="store_true",
                        help="leave out the floor runs (the same taps through loadtests/tap_floor.py's servers)")
    parser.add_argument("--riders", type=int, help=f"synthetic riders (default: enough that a rider is back at a "
                                                   f"gate only after {SAME_GATE_GAP_S:g} s at the highest rate, "
                                                   f"at least {RIDERS_MIN})")
    parser.add_argument("--deadline-ms", type=int, default=DEADLINE_MS_DEFAULT,
                        help=f"deadline of each call (default {DEADLINE_MS_DEFAULT}); a call past it is an error")
    parser.add_argument("--seed", type=int, help="seed of card UIDs and stations (default: random)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    default_s = QUICK_S if args.quick else None
    args.phase_s = args.phase_s or default_s or PHASE_S_DEFAULT
    args.step_s = args.step_s or default_s or STEP_S_DEFAULT
    if not 0 < args.phase_s <= DURATION_S_MAX or not 0 < args.step_s <= DURATION_S_MAX:
        print(f"taps bench: durations must be in (0, {DURATION_S_MAX:g}] s", file=sys.stderr)
        return 2
    if args.riders is None:
        args.riders = max(RIDERS_MIN, math.ceil(max(args.rates) * SAME_GATE_GAP_S / TAPS_BEFORE_SAME_GATE))
    if not 1 <= args.riders <= RIDERS_MAX or not 1 <= args.deadline_ms <= 60_000:
        print(f"taps bench: --riders in [1, {RIDERS_MAX}], --deadline-ms in [1, 60000]", file=sys.stderr)
        return 2
    bench = TapBench(args)
    try:
        bench.run()
    except SetupError as exc:
        print(f"taps bench: setup failed: {exc}", file=sys.stderr)
        return 1
    except CallFailed as exc:
        print(f"taps bench: {exc.describe()}", file=sys.stderr)
        return 1
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
