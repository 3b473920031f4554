"""Playing scenarios against an in-process FAKE fare gate and FAKE wallet
(services/fare_gate/emulator/fakes.py): rider setup with a pluggable funder, expectation
checks, exit codes and the JSON record."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.fare_gate.emulator import cli
from services.fare_gate.emulator.fakes import FLAT_FARE_MINOR, MAX_FARE_MINOR, FakeBank, FakeFareGateServicer, serve_fakes
from services.fare_gate.emulator.gate import tap_id_for

GATES = {"HBR-G1": "HBR", "CEN-G1": "CEN", "UNI-G1": "UNI"}
# The bank of the running fake, for `--fund tests.grpc.test_emulator_scenario:fake_funder`.
CURRENT: dict[str, FakeBank] = {}


def fake_funder() -> Any:
    """A --fund factory: credits the fake wallet's accounts."""
    return CURRENT["bank"].credit


@pytest.fixture()
def fakes() -> Iterator[tuple[str, FakeFareGateServicer, FakeBank]]:
    bank = FakeBank()
    CURRENT["bank"] = bank
    server, gate, _ = serve_fakes(bank, gates=GATES)
    yield f"127.0.0.1:{server.port}", gate, bank
    server.stop(0)
    CURRENT.clear()


def scenario_file(tmp_path: Path, taps: list[dict[str, Any]], riders: list[dict[str, Any]] | None = None) -> Path:
    document = {"name": "test", "time_zone": "Asia/Taipei", "date": "2026-12-01", "gates": GATES,
                "riders": riders or [{"name": "alice", "fund_minor": 10_000}, {"name": "bob", "fund_minor": 5000}],
                "taps": taps}
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(document))
    return path


RIDE = [
    {"at": "08:00", "rider": "alice", "gate": "HBR-G1", "direction": "entry",
     "expect": {"decision": "OPEN", "reason": "OK", "held_minor": MAX_FARE_MINOR}},
    {"at": "08:01", "rider": "bob", "gate": "HBR-G1", "direction": "entry",
     "expect": {"decision": "DENY", "reason": "DENIED_INSUFFICIENT_BALANCE"}},
    {"at": "08:10", "rider": "alice", "gate": "CEN-G1", "direction": "exit", "tap_id": "exit-1",
     "expect": {"decision": "OPEN", "fare_minor": FLAT_FARE_MINOR, "balance_minor": 10_000 - FLAT_FARE_MINOR}},
    {"at": "08:10", "rider": "alice", "gate": "CEN-G1", "direction": "exit", "tap_id": "exit-1",
     "expect": {"decision": "OPEN", "fare_minor": FLAT_FARE_MINOR}},
    {"at": "08:20", "rider": "bob", "gate": "UNI-G1", "direction": "exit",
     "expect": {"decision": "DENY", "reason": "DENIED_NO_ENTRY"}},
]


def run(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), stdout=stdout, stderr=stderr)
    return code, stdout.getvalue(), stderr.getvalue()


def test_a_scenario_with_setup_and_funding_meets_its_expectations(fakes, tmp_path: Path) -> None:
    address, gate, bank = fakes
    record = tmp_path / "out" / "taps.json"
    code, out, err = run("scenario", str(scenario_file(tmp_path, RIDE)), "--address", address, "--setup",
                         "--wallet-address", address, "--fund", "tests.grpc.test_emulator_scenario:fake_funder",
                         "--run-id", "run1", "--json-out", str(record))
    assert code == 0, out + err
    assert "riders set up and funded" in out
    assert "taps 5: OPEN 3, DENY 2, errors 0; expectations checked 5, failed 0" in out
    assert "fares charged (each tap id once): alice TWD 20.00, bob TWD 0.00" in out  # the retry is not charged twice
    assert bank.balances == {"run1-alice": 10_000 - FLAT_FARE_MINOR, "run1-bob": 5000}
    assert gate.taps_seen == 5
    rows = json.loads(record.read_text())
    assert [r["label"] for r in rows] == ["tap-0", "tap-1", "exit-1", "exit-1", "tap-4"]
    assert [r["tap_id"] for r in rows] == [tap_id_for("run1", r["label"]) for r in rows]
    assert rows[2]["tap_id"] == rows[3]["tap_id"] != rows[4]["tap_id"]  # the retry reuses its tap id
    assert rows[1]["answer"]["reason"] == "DENIED_INSUFFICIENT_BALANCE" and rows[1]["mismatches"] == []
    assert rows[0]["at"] == "2026-12-01T08:00:00+08:00"


def test_a_failed_expectation_exits_1_and_says_what_differs(fakes, tmp_path: Path) -> None:
    address, _, _ = fakes
    taps = [dict(RIDE[0], expect={"decision": "OPEN", "held_minor": 1})]
    code, out, _ = run("scenario", str(scenario_file(tmp_path, taps)), "--address", address, "--setup",
                       "--wallet-address", address, "--fund", "tests.grpc.test_emulator_scenario:fake_funder")
    assert code == 1
    assert "FAILED: held_minor: expected 1, got 6500" in out
    assert "expectations checked 1, failed 1" in out


def test_without_setup_the_cards_are_unknown(fakes, tmp_path: Path) -> None:
    address, _, _ = fakes
    taps = [{"at": "08:00", "rider": "alice", "gate": "HBR-G1", "direction": "entry",
             "expect": {"decision": "DENY", "reason": "DENIED_UNKNOWN_CREDENTIAL"}}]
    code, out, _ = run("scenario", str(scenario_file(tmp_path, taps)), "--address", address, "--shift-to-now")
    assert code == 0, out


def test_server_errors_are_shown_and_exit_2(fakes, tmp_path: Path) -> None:
    address, gate, _ = fakes
    gate.fail_every = 2
    taps = [dict(RIDE[0], expect=None), dict(RIDE[1], expect=None)]
    code, out, _ = run("scenario", str(scenario_file(tmp_path, taps)), "--address", address)
    assert code == 2
    assert "ERROR    UNAVAILABLE/UNAVAILABLE: the fake fare gate fails this tap on purpose" in out
    assert "errors 1" in out


def test_an_invalid_scenario_is_refused_before_anything_is_sent(fakes, tmp_path: Path) -> None:
    address, gate, _ = fakes
    taps = [{"at": "08:00", "rider": "zed", "gate": "HBR-G1", "direction": "entry", "expect": {"reason": "NOPE"}}]
    code, _, err = run("scenario", str(scenario_file(tmp_path, taps)), "--address", address)
    assert code == 2
    assert "taps[0].rider: no rider named 'zed' in riders" in err and "scenario INVALID: 1 problem(s)" in err
    taps = [dict(RIDE[0], expect={"reason": "NOPE"})]
    code, _, err = run("scenario", str(scenario_file(tmp_path, taps)), "--address", address)
    assert code == 2 and "'NOPE' is not a TapReason" in err
    assert gate.taps_seen == 0


def test_setup_failures_and_bad_options_exit_2(fakes, tmp_path: Path) -> None:
    address, _, _ = fakes
    path = str(scenario_file(tmp_path, RIDE[:1]))
    code, _, err = run("scenario", path, "--address", address, "--setup", "--wallet-address", address,
                       "--fund", "no.such.module:factory")
    assert code == 2 and "--fund 'no.such.module:factory': cannot load it" in err
    code, _, err = run("scenario", path, "--address", address, "--fund", "tests.grpc.test_emulator_scenario:fake_funder")
    assert code == 2 and "--fund works together with --setup" in err
    # Two riders with the same card: the (fake) wallet refuses the second link.
    riders = [{"name": "alice", "card": "04a1b2c3d4e5f6"}, {"name": "bob", "card": "04a1b2c3d4e5f7"}]
    first = run("scenario", str(scenario_file(tmp_path, RIDE[:1], riders)), "--address", address, "--setup",
                "--wallet-address", address)
    assert first[0] == 1  # set up, but unfunded: the entry expectation (OPEN) fails
    again = run("scenario", str(scenario_file(tmp_path, RIDE[:1], riders)), "--address", address, "--setup",
                "--wallet-address", address)
    assert again[0] == 2 and "CREDENTIAL_IN_USE" in again[2]
