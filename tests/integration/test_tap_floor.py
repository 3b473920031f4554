"""The tap bench's floor servers (loadtests/tap_floor.py) against the real PostgreSQL, Redis
and Kafka: they must do the work the bench says they do, or its floor figures mean nothing."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

from loadtests.tap_floor import GATE_SCHEMA, HOLD_MINOR, WALLET_SCHEMA, FloorStack
from loadtests.taps import STATIONS
from services.fare_gate.emulator.gate import tap_id_for, tap_request
from services.fare_gate.emulator.load import synthetic_riders
from services.fare_gate.emulator.riders import RiderPool, station_gates

pytestmark = pytest.mark.usefixtures("kafka_bootstrap", "redis_url")


def _schemas(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)",
                            ([GATE_SCHEMA, WALLET_SCHEMA],)).fetchall()
    return {row[0] for row in rows}


@pytest.mark.parametrize("one_hop", [False, True], ids=["two hops", "one hop"])
def test_every_floor_tap_records_one_tap_and_one_hold_and_a_retry_neither(postgres_dsn: str, one_hop: bool) -> None:
    riders = synthetic_riders(30, run_id="floor-test", seed=5)
    gates = station_gates(STATIONS, 1)
    servers = {"floor gate"} if one_hop else {"floor gate", "floor wallet"}
    with FloorStack(one_hop=one_hop) as floor:
        run = floor.run(RiderPool(riders, gates, seed=5), 40.0, 1.0, tap_id_prefix="floor-test", warmup_s=0.0)
        assert run.result.scheduled == 40
        assert run.result.answered == 40, run.result.errors
        assert run.result.error_count == 0
        assert dict(run.result.decisions) == {"OPEN": 40}
        assert floor.counts() == (40, 40, 40 * HOLD_MINOR)
        # CPU is read per process (a short run can round a component to 0 ticks, so only the
        # whole is asserted to be some).
        assert run.cost is not None
        assert set(run.cost.ms_per_call) == servers | {"postgres", "kafka", "redis", "load generator"}
        assert run.cost.total_ms > 0

        # The same tap id again: answered, and nothing more is written or held.
        request = tap_request(tap_id=tap_id_for("floor-test", "0"), gate_id=gates[0].gate_id, stop_id=gates[0].stop_id,
                              direction="entry", card_uid=riders[0].card_uid, tapped_at=datetime.now(timezone.utc))
        reply, _ = floor.client.tap(request)
        assert reply.decision == "OPEN"
        assert floor.counts() == (40, 40, 40 * HOLD_MINOR)

        # A new tap is one more of each.
        reply, _ = floor.client.tap(tap_request(
            tap_id=tap_id_for("floor-test", "new"), gate_id=gates[0].gate_id, stop_id=gates[0].stop_id,
            direction="entry", card_uid=riders[0].card_uid, tapped_at=datetime.now(timezone.utc)))
        assert reply.decision == "OPEN"
        assert floor.counts() == (41, 41, 41 * HOLD_MINOR)
        assert _schemas(postgres_dsn) == {GATE_SCHEMA, WALLET_SCHEMA}
    assert _schemas(postgres_dsn) == set()
