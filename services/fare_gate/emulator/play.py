"""Playing a scenario: its taps one after another, each answer checked against its `expect`.

A scenario is a functional script, not a load: each tap waits for its answer before the
next is sent (plus an optional pause), so the answers follow the scenario's story.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.fare_gate.emulator.gate import CallFailed, FareGateClient, TapReply, tap_id_for, tap_reason_names, tap_request
from services.fare_gate.emulator.provision import RiderSetup
from services.fare_gate.emulator.riders import synthetic_card_uid
from services.fare_gate.emulator.scenario import Expectation, Scenario, ScenarioError, ScenarioTap

PACE_S_MAX = 60.0


@dataclass
class PlayedTap:
    tap: ScenarioTap
    tap_id: str
    reply: TapReply | None
    failure: CallFailed | None
    latency_ms: float
    mismatches: list[str] = field(default_factory=list)


def check_reasons(scenario: Scenario, source: str) -> None:
    """Refuse expectations naming a TapReason the contract does not have (a typo would
    otherwise fail only at the end of a long run)."""
    known = tap_reason_names()
    problems = [f"taps[{t.index}].expect.reason: {t.expect.reason!r} is not a TapReason "
                f"(known: {', '.join(sorted(known))})"
                for t in scenario.taps if t.expect.reason is not None and t.expect.reason not in known]
    if problems:
        raise ScenarioError(source, problems)


def check_expectation(expect: Expectation, reply: TapReply) -> list[str]:
    """What differs between the expected and the actual answer, one line per field."""
    mismatches = []
    for name, wanted, got in (("decision", expect.decision, reply.decision), ("reason", expect.reason, reply.reason),
                              ("fare_minor", expect.fare_minor, reply.fare_minor),
                              ("held_minor", expect.held_minor, reply.held_minor),
                              ("balance_minor", expect.balance_minor, reply.balance_minor)):
        if wanted is not None and wanted != got:
            mismatches.append(f"{name}: expected {wanted}, got {got}")
    return mismatches


def rider_cards(scenario: Scenario, *, seed: int) -> dict[str, bytes]:
    """Each rider's card: the scenario's, or a fresh random UID for this run."""
    rng = random.Random(seed)
    return {r.name: (r.card_uid if r.card_uid is not None else synthetic_card_uid(rng)) for r in scenario.riders}


def rider_setups(scenario: Scenario, cards: dict[str, bytes], *, run_id: str) -> list[RiderSetup]:
    return [RiderSetup(account_id(run_id, r.name), cards[r.name], r.rider_category, r.name, r.fund_minor)
            for r in scenario.riders]


def account_id(run_id: str, rider: str) -> str:
    return f"{run_id}-{rider}"


def play(client: FareGateClient, scenario: Scenario, *, run_id: str, cards: dict[str, bytes],
         on_tap: Callable[[PlayedTap], None] = lambda _: None, pace_s: float = 0.0,
         sleep: Callable[[float], None] = time.sleep) -> list[PlayedTap]:
    """Send every tap in order; stop early (raising CallFailed) only if the server is
    unreachable, since every later tap would fail the same way."""
    if not 0 <= pace_s <= PACE_S_MAX:
        raise ValueError(f"pace must be in [0, {PACE_S_MAX:.0f}] s")
    played: list[PlayedTap] = []
    for i, tap in enumerate(scenario.taps):
        if i and pace_s:
            sleep(pace_s)
        tap_id = tap_id_for(run_id, tap.tap_label)
        request = tap_request(tap_id=tap_id, gate_id=tap.gate_id, stop_id=tap.stop_id, direction=tap.direction,
                              card_uid=cards[tap.rider], tapped_at=tap.at, route_id=tap.route_id)
        started = time.perf_counter()
        try:
            reply, latency_ms = client.tap(request)
        except CallFailed as exc:
            if exc.unreachable:
                raise
            result = PlayedTap(tap, tap_id, None, exc, (time.perf_counter() - started) * 1000.0)
        else:
            result = PlayedTap(tap, tap_id, reply, None, latency_ms, check_expectation(tap.expect, reply))
        played.append(result)
        on_tap(result)
    return played
