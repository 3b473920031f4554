"""The emulator's open-loop load mode against an in-process FAKE fare gate and wallet
(services/fare_gate/emulator/fakes.py) at a low rate for about two seconds: what it counts,
how it counts errors and denials apart, and the PNG and JSON it writes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.fare_gate.emulator import cli
from services.fare_gate.emulator.fakes import FakeBank, FakeFareGateServicer, serve_fakes
from services.fare_gate.emulator.gate import FareGateClient
from services.fare_gate.emulator.load import LoadShape, run_baseline, run_taps, synthetic_riders
from services.fare_gate.emulator.riders import RiderPool, station_gates

STATIONS = ("HBR", "OLD", "CEN", "UNI", "HSP", "NHL")
CURRENT: dict[str, FakeBank] = {}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_funder() -> Any:
    return CURRENT["bank"].credit


@pytest.fixture()
def fakes() -> Iterator[tuple[str, FakeFareGateServicer, FakeBank]]:
    bank = FakeBank()
    CURRENT["bank"] = bank
    gates = {g.gate_id: g.stop_id for g in station_gates(cli.DEMO_CITY_STATIONS, 2)}
    server, gate, _ = serve_fakes(bank, gates=gates)
    yield f"127.0.0.1:{server.port}", gate, bank
    server.stop(0)
    CURRENT.clear()


def run(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def test_load_counts_every_tap_and_writes_the_picture_and_json(fakes, tmp_path: Path) -> None:
    address, gate, bank = fakes
    png, record = tmp_path / "bench" / "taps.png", tmp_path / "bench" / "taps.json"
    code, out, err = run("load", "--address", address, "--rate", "50", "--duration", "2", "--warmup", "0.4",
                         "--deadline-ms", "5000",
                         "--riders", "20", "--setup", "--wallet-address", address,
                         "--fund", "tests.grpc.test_emulator_load:fake_funder", "--baseline", "config",
                         "--png", str(png), "--json-out", str(record), "--seed", "7")
    assert code == 0, out + err
    assert "riders set up and funded" in out and "offered 50 taps/s for 2 s" in out
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000
    document = json.loads(record.read_text())
    taps = document["taps"]
    assert taps["scheduled"] == 100 and taps["answered"] == 100 and taps["errors"] == 0
    assert taps["decisions"] == {"OPEN": 100}
    # Riders alternate: as many entries as exits, give or take the taps still in a journey.
    assert abs(taps["mix"]["entry OPEN"] - taps["mix"]["exit OPEN charged"]) <= 20
    # At most the offered rate; less only by how late the last answers come on a busy box.
    assert 30 <= taps["achieved_rate_per_s"] <= 50.5
    assert taps["latency_from_scheduled_ms"]["count"] == 100
    assert taps["latency_from_scheduled_ms"]["p99_ms"] >= taps["latency_from_scheduled_ms"]["p50_ms"] > 0
    assert document["baseline"]["decisions"] == {"OK": 100}
    assert gate.taps_seen == 120  # 20 warm-up taps are sent but not counted
    assert len(bank.balances) == 20


def test_errors_are_counted_apart_from_denials(fakes, tmp_path: Path) -> None:
    address, gate, _ = fakes
    gate.fail_every = 5
    record = tmp_path / "r.json"
    code, out, _ = run("load", "--address", address, "--rate", "50", "--duration", "2", "--warmup", "0",
                       "--riders", "200", "--png", "", "--json-out", str(record))
    assert code == 1  # errors were counted
    assert "riders NOT set up" in out
    taps = json.loads(record.read_text())["taps"]
    # Unknown cards: every answered tap is a denial, and denials are not errors.
    assert taps["errors_by_status"] == {"UNAVAILABLE/UNAVAILABLE": 20}
    assert taps["decisions"] == {"DENY": 80}
    assert taps["deny_reasons"] == {"DENIED_UNKNOWN_CREDENTIAL": 80}
    assert "errors    20: UNAVAILABLE/UNAVAILABLE 20" in out


def test_deadline_exceeded_counts_as_an_error_with_its_latency_from_the_schedule(fakes) -> None:
    address, gate, _ = fakes
    gate.delay_s = 0.2
    riders = synthetic_riders(20, run_id="slow", seed=1)
    pool = RiderPool(riders, station_gates(STATIONS, 1), seed=1)
    with FareGateClient(address, deadline_s=0.05) as client:
        result = run_taps(client, pool, LoadShape(20, 1.0, 0.0, 0.05), tap_id_prefix="slow")
    assert result.errors == {"DEADLINE_EXCEEDED/": 20}
    assert result.answered == 0
    assert all(c.latency_ms >= 50 for c in result.completions)
    assert pool.failed_taps == 20 and pool.idle_count == 20  # the riders carry on


def test_the_generator_keeps_its_schedule_when_the_server_is_slow(fakes) -> None:
    """Open loop: a server that takes 150 ms per tap does not slow the sender down."""
    address, gate, bank = fakes
    gate.delay_s = 0.15
    riders = synthetic_riders(60, run_id="busy", seed=2)
    for rider in riders:
        bank.add_rider(rider.account_id, rider.card_uid, 1_000_000)
    pool = RiderPool(riders, station_gates(STATIONS, 1), seed=2)
    with FareGateClient(address, deadline_s=1.0) as client:
        result = run_taps(client, pool, LoadShape(100, 1.0, 0.0, 1.0), tap_id_prefix="busy")
    assert result.answered == 100 and result.error_count == 0
    # Sent on time although 15 taps were always in flight. A closed-loop sender would have
    # fallen ~14 s behind (100 taps x 150 ms); the margin only allows for a busy test box.
    assert result.send_lag_ms_max < 500
    assert result.latency_summary().p50_ms >= 150
    assert result.sent_rate_per_s == pytest.approx(100, rel=0.15)


def test_a_health_baseline(fakes) -> None:
    address, _, _ = fakes
    with FareGateClient(address, deadline_s=1.0) as client:
        result = run_baseline(client, LoadShape(50, 1.0), method="health", gate_id="unused")
    assert result.decisions == {"OK": 50} and result.error_count == 0


def test_load_refuses_to_start_against_nothing(tmp_path: Path) -> None:
    code, _, err = run("load", "--address", "127.0.0.1:9", "--rate", "10", "--duration", "1", "--png", "")
    assert code == 2 and "cannot reach the fare gate at 127.0.0.1:9" in err
    code, _, err = run("load", "--address", "127.0.0.1:9", "--rate", "0", "--duration", "1")
    assert code == 2 and "--rate must be in" in err
    code, _, err = run("load", "--address", "127.0.0.1:9", "--rate", "10", "--duration", "1", "--gates", "A=X", "B=X")
    assert code == 2 and "two stations" in err
