"""Scenario files: the shipped example parses, every problem of a bad file is reported at
once with its place, times resolve in the scenario's zone, and answers are checked against
expectations."""

from __future__ import annotations

import copy
import json
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from services.fare_gate.emulator.gate import TapReply
from services.fare_gate.emulator.play import check_expectation, check_reasons, rider_cards
from services.fare_gate.emulator.scenario import (
    Expectation,
    ScenarioError,
    load_scenario,
    parse_card_uid,
    parse_scenario,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "services" / "fare_gate" / "emulator" / "scenarios"
TAIPEI = ZoneInfo("Asia/Taipei")

MINIMAL: dict[str, Any] = {
    "time_zone": "Asia/Taipei",
    "date": "2026-12-01",
    "gates": {"HBR-G1": "HBR"},
    "riders": [{"name": "alice", "card": "04a1b2c3d4e5f6"}, {"name": "bob", "category": "student", "fund_minor": 900}],
    "taps": [
        {"at": "08:00", "rider": "alice", "gate": "HBR-G1", "direction": "entry"},
        {"at": "8:12:30", "rider": "alice", "gate": "CEN-G1", "stop": "CEN", "direction": "exit", "tap_id": "x1",
         "expect": {"decision": "OPEN", "reason": "OK", "fare_minor": 2000}},
        {"at": "2026-12-01T00:30:00Z", "rider": "bob", "gate": "BUS1-V1", "stop": "BUS_UNI", "route": "BUS1",
         "direction": "validate"},
    ],
}


def problems_of(document: Any, **kwargs: Any) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(document, source="s.json", **kwargs)
    return caught.value.problems


def test_every_shipped_example_parses_and_names_known_reasons() -> None:
    files = sorted(EXAMPLES.glob("*.json"))
    assert files, "the emulator ships at least one example scenario"
    for path in files:
        scenario = load_scenario(path, today=date(2026, 12, 1))
        check_reasons(scenario, str(path))
        assert scenario.riders and scenario.taps
        assert scenario.span <= timedelta(hours=1), "examples fit the fare gate's default tap-age window"


def test_a_minimal_scenario() -> None:
    scenario = parse_scenario(MINIMAL)
    alice, bob = scenario.riders
    assert alice.card_uid == bytes.fromhex("04a1b2c3d4e5f6") and alice.rider_category == "" and alice.fund_minor == 0
    assert bob.card_uid is None and bob.rider_category == "student" and bob.fund_minor == 900
    first, second, third = scenario.taps
    assert first.at == datetime(2026, 12, 1, 8, 0, tzinfo=TAIPEI)
    assert (first.stop_id, first.tap_label, first.expect.is_empty()) == ("HBR", "tap-0", True)
    assert second.at == datetime(2026, 12, 1, 8, 12, 30, tzinfo=TAIPEI)
    assert (second.stop_id, second.tap_label) == ("CEN", "x1")
    assert second.expect == Expectation("OPEN", "OK", 2000, None, None)
    assert third.at == datetime(2026, 12, 1, 0, 30, tzinfo=timezone.utc)
    assert (third.route_id, third.direction) == ("BUS1", "validate")
    assert scenario.span == timedelta(minutes=30)  # 00:30Z is 08:30 in Taipei


def test_today_and_a_date_given_on_the_command_line() -> None:
    document = dict(MINIMAL, date="today")
    assert parse_scenario(document, today=date(2027, 3, 4)).taps[0].at.date() == date(2027, 3, 4)
    assert parse_scenario(MINIMAL, on_date=date(2027, 1, 2)).taps[0].at == datetime(2027, 1, 2, 8, 0, tzinfo=TAIPEI)


def test_shifting_a_scenario_keeps_its_spacing() -> None:
    scenario = parse_scenario(MINIMAL)
    now = datetime(2030, 5, 6, 12, 0, tzinfo=timezone.utc)
    shifted = scenario.ending_at(now)
    assert max(t.at for t in shifted.taps) == now
    assert [b.at - a.at for a, b in zip(scenario.taps, scenario.taps[1:])] == \
           [b.at - a.at for a, b in zip(shifted.taps, shifted.taps[1:])]


def test_every_problem_is_reported_with_its_place() -> None:
    document = copy.deepcopy(MINIMAL)
    document["directon"] = "typo"
    document["riders"].append({"name": "alice", "card": "zz"})
    document["riders"].append({"name": "carol", "card": "04a1b2c3d4e5f6", "fund_minor": -5})
    document["taps"] += [
        {"at": "25:00", "rider": "dave", "gate": "X-G1", "direction": "in"},
        {"at": "2026-12-01T08:00", "rider": "alice", "gate": "HBR-G1", "direction": "entry",
         "expect": {"decision": "MAYBE", "fare_minor": 1.5, "colour": "red"}},
    ]
    problems = problems_of(document)
    expected = [
        "directon: unknown key",
        "riders[2].name: rider 'alice' is listed twice",
        "riders[2].card: 'zz' is not hex digits",
        "riders[3].card: another rider has the same card",
        "riders[3].fund_minor: must be at least 0",
        "taps[3].at: '25:00' is not a clock time",
        "taps[3].rider: no rider named 'dave'",
        "taps[3].stop: required: gate 'X-G1' is not in the scenario's gates",
        "taps[3].direction: expected one of entry, exit, validate, got 'in'",
        "taps[4].at: '2026-12-01T08:00' has no UTC offset",
        "taps[4].expect.colour: unknown key",
        "taps[4].expect.decision: expected OPEN or DENY",
        "taps[4].expect.fare_minor: expected a whole number of minor units",
    ]
    for start in expected:
        assert any(p.startswith(start) for p in problems), f"missing {start!r} in {problems}"
    assert len(problems) == len(expected)


def test_document_level_problems() -> None:
    assert problems_of([1, 2]) == ["the document must be a JSON object with riders and taps"]
    problems = problems_of({"time_zone": "Mars/Olympus", "date": "1 Dec", "riders": [], "taps": {}})
    assert problems == [
        "time_zone: unknown time zone 'Mars/Olympus'",
        "date: expected YYYY-MM-DD or \"today\", got '1 Dec'",
        "riders: required: a non-empty list of riders",
        "taps: required: a non-empty list of taps",
    ]
    assert problems_of(dict(MINIMAL, time_zone=None))[0].startswith("time_zone: required")


def test_files_that_cannot_be_read(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"riders": [}\n')
    with pytest.raises(ScenarioError) as caught:
        load_scenario(bad)
    assert caught.value.problems[0].startswith("line 1 column 13: not valid JSON")
    with pytest.raises(ScenarioError) as caught:
        load_scenario(tmp_path / "missing.json")
    assert caught.value.problems[0].startswith("cannot read")
    good = tmp_path / "good.json"
    good.write_text(json.dumps(MINIMAL))
    assert len(load_scenario(good).taps) == 3


def test_card_uids() -> None:
    assert parse_card_uid("04:A1:B2:C3") == bytes.fromhex("04a1b2c3")
    assert parse_card_uid("04a1 b2c3 d4e5 f6a7 b8c9") == bytes.fromhex("04a1b2c3d4e5f6a7b8c9")
    for text in ("04a1b2", "04a1b2c3d4", "xyz"):
        with pytest.raises(ValueError):
            parse_card_uid(text)


def test_riders_without_a_card_get_a_fresh_one_per_seed() -> None:
    scenario = parse_scenario(MINIMAL)
    cards = rider_cards(scenario, seed=1)
    assert cards["alice"] == bytes.fromhex("04a1b2c3d4e5f6")
    assert len(cards["bob"]) == 7 and cards["bob"][0] == 0x04
    assert rider_cards(scenario, seed=1)["bob"] == cards["bob"]
    assert rider_cards(scenario, seed=2)["bob"] != cards["bob"]


def test_an_unknown_expected_reason_is_refused_before_running() -> None:
    document = copy.deepcopy(MINIMAL)
    document["taps"][0]["expect"] = {"reason": "DENIED_BECAUSE"}
    with pytest.raises(ScenarioError) as caught:
        check_reasons(parse_scenario(document), "s.json")
    assert caught.value.problems[0].startswith("taps[0].expect.reason: 'DENIED_BECAUSE' is not a TapReason")


def test_expectations_against_answers() -> None:
    reply = TapReply("OPEN", "OK", 2000, 0, 48000, "TWD", "j1")
    assert check_expectation(Expectation(), reply) == []
    assert check_expectation(Expectation("OPEN", "OK", 2000, 0, 48000), reply) == []
    assert check_expectation(Expectation("DENY", "OK", 2500, balance_minor=1), reply) == [
        "decision: expected DENY, got OPEN", "fare_minor: expected 2500, got 2000", "balance_minor: expected 1, got 48000"]
