"""The gate emulator's single calls (tap, config, quote) against an in-process FAKE fare
gate (services/fare_gate/emulator/fakes.py) bound on port 0: what it prints, its exit
codes, and its messages when the server fails or cannot be reached.

The fake stands in for the fare gate's API only; tests of the real tap path are
integration tests."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.fare_gate.emulator import cli
from services.fare_gate.emulator.fakes import FakeBank, FakeFareGateServicer, serve_fakes

ROOT = Path(__file__).resolve().parents[2]
CARD = "04a1b2c3d4e5f6"
TAP_ID = "0b6a3c1e-8f0d-4c1e-9a7b-2f4e5d6c7b8a"
GATES = {"HBR-G1": "HBR", "CEN-G1": "CEN"}


@pytest.fixture()
def fake_gate() -> Iterator[tuple[str, FakeFareGateServicer, FakeBank]]:
    bank = FakeBank()
    bank.add_rider("acct-1", bytes.fromhex(CARD), 10_000)
    server, gate, _ = serve_fakes(bank, gates=GATES)
    yield f"127.0.0.1:{server.port}", gate, bank
    server.stop(0)


def run(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def tap(address: str, *extra: str, card: str = CARD, direction: str = "entry", gate: str = "HBR-G1") -> tuple[int, str, str]:
    return run("tap", "--address", address, "--gate", gate, "--stop", GATES.get(gate, "HBR"),
               "--direction", direction, "--card", card, *extra)


def fields(text: str) -> dict[str, str]:
    return {line[:9].strip(): line[10:] for line in text.splitlines()}


def test_an_entry_that_opens_prints_the_decision_and_exits_0(fake_gate) -> None:
    address, _, _ = fake_gate
    code, out, err = tap(address)
    assert (code, err) == (0, "")
    shown = fields(out)
    assert shown["decision"] == "OPEN" and shown["reason"] == "OK"
    assert shown["fare"] == "TWD 0.00" and shown["held"] == "TWD 65.00" and shown["balance"] == "TWD 35.00"
    assert shown["journey"] == "fake-journey-1"
    assert shown["latency"].endswith(" ms") and float(shown["latency"][:-3]) > 0
    assert str(uuid.UUID(shown["tap id"])) == shown["tap id"]  # a fresh UUID, as the contract asks


def test_an_exit_charges_the_fare(fake_gate) -> None:
    address, _, _ = fake_gate
    assert tap(address)[0] == 0
    code, out, _ = tap(address, "--at", "2026-12-01T08:20:00+08:00", direction="exit", gate="CEN-G1")
    assert code == 0
    assert fields(out)["fare"] == "TWD 20.00" and fields(out)["balance"] == "TWD 80.00"


def test_a_denial_exits_1(fake_gate) -> None:
    address, _, _ = fake_gate
    code, out, _ = tap(address, card="04ffffffffffff")
    assert code == 1
    assert fields(out)["decision"] == "DENY" and fields(out)["reason"] == "DENIED_UNKNOWN_CREDENTIAL"
    assert fields(out)["balance"] == "-"


def test_json_output_and_a_retry_with_the_same_tap_id(fake_gate) -> None:
    address, gate, _ = fake_gate
    first = tap(address, "--json", "--tap-id", TAP_ID, "--at", "2026-12-01T08:00:00+08:00")
    again = tap(address, "--json", "--tap-id", TAP_ID, "--at", "2026-12-01T08:00:00+08:00")
    assert first[0] == again[0] == 0
    one, two = json.loads(first[1]), json.loads(again[1])
    assert one["tap_id"] == TAP_ID and one["decision"] == "OPEN" and one["held_minor"] == 6500
    assert {k: v for k, v in one.items() if k != "latency_ms"} == {k: v for k, v in two.items() if k != "latency_ms"}
    assert gate.taps_seen == 2
    # The same id with another payload is refused by the server: exit 2 with its status and reason.
    code, _, err = tap(address, "--tap-id", TAP_ID, "--at", "2026-12-01T08:00:01+08:00")
    assert code == 2
    assert "status ALREADY_EXISTS, reason IDEMPOTENCY_CONFLICT" in err


def test_a_server_error_exits_2_with_status_and_reason(fake_gate) -> None:
    address, gate, _ = fake_gate
    gate.fail_every = 1
    code, out, err = tap(address)
    assert (code, out) == (2, "")
    assert f"fare gate Tap at {address} failed: UNAVAILABLE reason UNAVAILABLE" in err
    assert "status UNAVAILABLE, reason UNAVAILABLE" in err


def test_a_slow_server_exits_2_with_deadline_exceeded(fake_gate) -> None:
    address, gate, _ = fake_gate
    gate.delay_s = 0.3
    code, _, err = tap(address, "--deadline-ms", "50")
    assert code == 2
    assert "status DEADLINE_EXCEEDED, reason (none)" in err


def test_an_unreachable_server_is_named(unused_port: int) -> None:
    address = f"127.0.0.1:{unused_port}"
    code, out, err = tap(address)
    assert (code, out) == (2, "")
    assert f"cannot reach the fare gate at {address}" in err and "is the stack up" in err


def test_bad_command_lines_exit_2(fake_gate) -> None:
    address, _, _ = fake_gate
    assert tap(address, card="12")[0] == 2
    code, _, err = tap(address, "--tap-id", "not-a-uuid")
    assert code == 2 and "status INVALID_ARGUMENT, reason INVALID_ARGUMENT" in err
    code, _, err = tap(address, "--at", "2026-12-01T08:00")
    assert code == 2 and "give a UTC offset" in err
    code, _, err = run("config", "--address", "", "--gate", "HBR-G1")
    assert code == 2 and "CITYTAP_FARE_GATE_ADDRESS" in err
    with pytest.raises(SystemExit) as exited:
        run("tap", "--address", address, "--gate", "G", "--stop", "S", "--direction", "sideways", "--card", CARD)
    assert exited.value.code == 2


def test_config_prints_every_field(fake_gate) -> None:
    address, _, _ = fake_gate
    code, out, _ = run("config", "--address", address, "--gate", "CEN-G1")
    assert code == 0
    shown = dict(line.split(None, 1) for line in out.splitlines())
    assert shown["gate_id"] == "CEN-G1" and shown["stop_id"] == "CEN" and shown["kind"] == "GATE_KIND_STATION_GATE"
    assert shown["tap_deadline_ms"] == "300" and shown["time_zone"] == "Asia/Taipei"
    code, out, _ = run("config", "--address", address, "--gate", "CEN-G1", "--json")
    assert json.loads(out)["kind"] == "GATE_KIND_STATION_GATE"
    code, _, err = run("config", "--address", address, "--gate", "NOPE")
    assert code == 2 and "status NOT_FOUND, reason NOT_FOUND" in err


def test_quote_prints_the_fare(fake_gate) -> None:
    address, _, _ = fake_gate
    code, out, _ = run("quote", "--address", address, "--from", "HBR", "--to", "CEN", "--at", "2026-12-01T08:00:00+08:00")
    assert code == 0
    shown = dict(line.split(None, 1) for line in out.splitlines())
    assert shown["fare"] == "TWD 20.00" and shown["fare_product_id"] == "fake_flat"
    code, out, _ = run("quote", "--address", address, "--from", "HBR", "--to", "CEN", "--json", "--category", "student")
    assert json.loads(out)["fare"] == {"amount_minor": 2000, "currency": "TWD"}
    code, _, err = run("quote", "--address", address, "--from", "HBR", "--to", "ZZZ")
    assert code == 2 and "status INVALID_ARGUMENT, reason INVALID_ARGUMENT" in err


def test_help_needs_no_server_and_no_environment(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["scenario", "--help"]):
        with pytest.raises(SystemExit) as exited:
            cli.main(argv)
        assert exited.value.code == 0
        assert "usage: python -m services.fare_gate.emulator" in capsys.readouterr().out
    # And as a program, in an environment without any CITYTAP_ variable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITYTAP_")}
    done = subprocess.run([sys.executable, "-m", "services.fare_gate.emulator", "load", "--help"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m services.fare_gate.emulator load" in done.stdout


@pytest.fixture()
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
