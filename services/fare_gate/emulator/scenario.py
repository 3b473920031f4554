"""Scenario files: riders moving through stations, as a JSON document.

YAML is not among the project's packages, and JSON needs no parser of our own. A scenario
names its riders, then lists taps in the order they are sent:

    {
      "name": "morning",                      optional: printed in the header
      "description": "...",                   optional
      "time_zone": "Asia/Taipei",             IANA zone of the clock times below (required)
      "date": "2026-12-01",                   day of the clock times; "today" (the default) means
                                              today in time_zone
      "gates": {"HBR-G1": "HBR"},             optional: gate -> stop_id, so taps may omit "stop"
      "riders": [
        {"name": "alice",                     required, unique: taps refer to it
         "card": "04a1b2c3d4e5f6",            optional: the card UID in hex, 4, 7 or 10 bytes;
                                              omitted: a random 7-byte UID for each run
         "category": "student",               optional: rider_category for CreateAccount
         "fund_minor": 50000}                 optional: what --fund credits, in minor units
      ],
      "taps": [
        {"at": "08:00",                       HH:MM[:SS] on "date", or an ISO time with offset
         "rider": "alice",
         "gate": "HBR-G1",
         "stop": "HBR",                       optional when "gates" names the gate's stop
         "direction": "entry",                entry, exit or validate
         "route": "BUS1",                     optional: route_id, for validate taps on a bus
         "tap_id": "t1",                      optional label; two taps with the same label are sent
                                              with the same tap id (a retry)
         "expect": {"decision": "OPEN",       optional checks of the answer: decision, reason,
                    "reason": "OK",           fare_minor, held_minor, balance_minor
                    "fare_minor": 0}}
      ]
    }

`parse_scenario` checks everything before anything is sent and reports every problem at
once, each with its place (`taps[3].direction: ...`). Unknown keys are problems too, so a
typo such as "directon" cannot be silently ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

SCENARIO_BYTES_MAX = 4 * 1024 * 1024
RIDERS_MAX = 5000
TAPS_MAX = 10_000
NAME_CHARS_MAX = 64
CARD_UID_SIZES = (4, 7, 10)
DIRECTIONS = ("entry", "exit", "validate")
DECISIONS = ("OPEN", "DENY")
EXPECT_KEYS = {"decision", "reason", "fare_minor", "held_minor", "balance_minor"}
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_CLOCK = re.compile(r"^\d{1,2}:\d{2}(:\d{2})?$")


class ScenarioError(ValueError):
    """The scenario cannot be run; `problems` lists every one, each with its place."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(f"  {p}" for p in problems))


@dataclass(frozen=True)
class ScenarioRider:
    name: str
    card_uid: bytes | None  # None: a random UID for each run
    rider_category: str
    fund_minor: int


@dataclass(frozen=True)
class Expectation:
    decision: str | None = None
    reason: str | None = None
    fare_minor: int | None = None
    held_minor: int | None = None
    balance_minor: int | None = None

    def is_empty(self) -> bool:
        return all(value is None for value in vars(self).values())


@dataclass(frozen=True)
class ScenarioTap:
    index: int
    at: datetime  # timezone-aware
    rider: str
    gate_id: str
    stop_id: str
    direction: str
    route_id: str
    tap_label: str  # the tap id label: given, or "tap-<index>"
    expect: Expectation


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    time_zone: str
    riders: tuple[ScenarioRider, ...]
    taps: tuple[ScenarioTap, ...]

    def rider(self, name: str) -> ScenarioRider:
        return next(r for r in self.riders if r.name == name)

    @property
    def span(self) -> timedelta:
        """From the earliest tap to the latest."""
        moments = [tap.at for tap in self.taps]
        return max(moments) - min(moments)

    def ending_at(self, moment: datetime) -> Scenario:
        """The same scenario moved in time, every tap by the same amount, so that its latest
        tap happens at `moment` (the CLI's --shift-to-now)."""
        delta = moment - max(tap.at for tap in self.taps)
        return replace(self, taps=tuple(replace(tap, at=tap.at + delta) for tap in self.taps))


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def load_scenario(path: str | Path, *, today: date | None = None, on_date: date | None = None) -> Scenario:
    """Read and check a scenario file; raises ScenarioError naming every problem.

    `on_date` replaces the file's "date" (the CLI's --date)."""
    source = str(path)
    try:
        size = Path(path).stat().st_size
        if size > SCENARIO_BYTES_MAX:
            raise ScenarioError(source, [f"file is {size} bytes; at most {SCENARIO_BYTES_MAX}"])
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(source, [f"cannot read: {exc}"]) from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError(source, [f"line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}"]) from None
    return parse_scenario(document, source=source, today=today, on_date=on_date)


def parse_scenario(document: Any, *, source: str = "<scenario>", today: date | None = None,
                   on_date: date | None = None) -> Scenario:
    """Check a decoded JSON document; `today` stands in for the date "today" (tests), and
    `on_date` replaces the document's "date"."""
    problems = _Problems()
    if not isinstance(document, dict):
        raise ScenarioError(source, ["the document must be a JSON object with riders and taps"])
    _unknown_keys(document, {"name", "description", "time_zone", "date", "gates", "riders", "taps"}, "", problems)
    name = _text(document, "name", "", problems, default="scenario")
    description = _text(document, "description", "", problems, default="")

    zone: ZoneInfo | None = None
    zone_name = document.get("time_zone")
    if not isinstance(zone_name, str) or not zone_name:
        problems.add("time_zone", "required: an IANA time zone such as Asia/Taipei")
    else:
        try:
            zone = ZoneInfo(zone_name)
        except (ZoneInfoNotFoundError, ValueError):
            problems.add("time_zone", f"unknown time zone {zone_name!r}")

    day: date | None = None
    date_text = document.get("date", "today")
    if on_date is not None:
        day = on_date
    elif date_text == "today":
        if zone is not None:
            day = today or datetime.now(zone).date()
    elif isinstance(date_text, str):
        try:
            day = date.fromisoformat(date_text)
        except ValueError:
            problems.add("date", f"expected YYYY-MM-DD or \"today\", got {date_text!r}")
    else:
        problems.add("date", "expected a string YYYY-MM-DD or \"today\"")

    gates: dict[str, str] = {}
    raw_gates = document.get("gates", {})
    if not isinstance(raw_gates, dict):
        problems.add("gates", "expected an object mapping gate ids to stop_ids")
    else:
        for gate_id, stop_id in raw_gates.items():
            if not _ID.match(gate_id) or not isinstance(stop_id, str) or not _ID.match(stop_id):
                problems.add(f"gates.{gate_id}", "gate and stop ids are 1-64 letters, digits or _ . : -")
            else:
                gates[gate_id] = stop_id

    riders = _riders(document.get("riders"), problems)
    names = {rider.name for rider in riders}
    taps = _taps(document.get("taps"), names, gates, zone, day, problems)
    if problems.items:
        raise ScenarioError(source, problems.items)
    assert zone_name is not None
    return Scenario(name, description, zone_name, tuple(riders), tuple(taps))


def _unknown_keys(obj: dict[str, Any], allowed: set[str], where: str, problems: _Problems) -> None:
    for key in obj:
        if key not in allowed:
            place = f"{where}.{key}" if where else key
            problems.add(place, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _text(obj: dict[str, Any], key: str, where: str, problems: _Problems, *, default: str | None = None) -> str:
    place = f"{where}.{key}" if where else key
    value = obj.get(key, default)
    if value is None:
        problems.add(place, "required")
        return ""
    if not isinstance(value, str):
        problems.add(place, f"expected a string, got {type(value).__name__}")
        return ""
    return value


def _int(obj: dict[str, Any], key: str, where: str, problems: _Problems, *, minimum: int | None = 0) -> int | None:
    if key not in obj:
        return None
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(f"{where}.{key}", f"expected a whole number of minor units, got {value!r}")
        return None
    if minimum is not None and value < minimum:
        problems.add(f"{where}.{key}", f"must be at least {minimum}, got {value}")
        return None
    return value


def parse_card_uid(text: str) -> bytes:
    """A card UID from hex (spaces and colons allowed): 4, 7 or 10 bytes."""
    cleaned = re.sub(r"[\s:]", "", text)
    try:
        uid = bytes.fromhex(cleaned)
    except ValueError:
        raise ValueError(f"{text!r} is not hex digits") from None
    if len(uid) not in CARD_UID_SIZES:
        raise ValueError(f"a card UID has 4, 7 or 10 bytes, {text!r} has {len(uid)}")
    return uid


def _riders(raw: Any, problems: _Problems) -> list[ScenarioRider]:
    if not isinstance(raw, list) or not raw:
        problems.add("riders", "required: a non-empty list of riders")
        return []
    if len(raw) > RIDERS_MAX:
        problems.add("riders", f"at most {RIDERS_MAX} riders, got {len(raw)}")
        return []
    riders: list[ScenarioRider] = []
    seen_names: set[str] = set()
    seen_cards: set[bytes] = set()
    for i, item in enumerate(raw):
        where = f"riders[{i}]"
        if not isinstance(item, dict):
            problems.add(where, "expected an object")
            continue
        _unknown_keys(item, {"name", "card", "category", "fund_minor"}, where, problems)
        name = _text(item, "name", where, problems)
        if name and not _ID.match(name):
            problems.add(f"{where}.name", "1-64 letters, digits or _ . : -")
        elif name in seen_names:
            problems.add(f"{where}.name", f"rider {name!r} is listed twice")
        seen_names.add(name)
        card: bytes | None = None
        if "card" in item:
            card_text = _text(item, "card", where, problems)
            if card_text:
                try:
                    card = parse_card_uid(card_text)
                except ValueError as exc:
                    problems.add(f"{where}.card", str(exc))
                else:
                    if card in seen_cards:
                        problems.add(f"{where}.card", "another rider has the same card")
                    seen_cards.add(card)
        category = _text(item, "category", where, problems, default="")
        fund = _int(item, "fund_minor", where, problems)
        riders.append(ScenarioRider(name, card, category, fund or 0))
    return riders


def _moment(text: Any, zone: ZoneInfo | None, day: date | None, where: str, problems: _Problems) -> datetime | None:
    if not isinstance(text, str):
        problems.add(where, "required: HH:MM[:SS] or an ISO 8601 time with a UTC offset")
        return None
    if _CLOCK.match(text):
        try:
            clock = time.fromisoformat(text if len(text.split(":")[0]) == 2 else "0" + text)
        except ValueError:
            problems.add(where, f"{text!r} is not a clock time")
            return None
        if zone is None or day is None:
            return None  # the time_zone or date problem is already reported
        return datetime.combine(day, clock, tzinfo=zone)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        problems.add(where, f"{text!r} is neither HH:MM[:SS] nor an ISO 8601 time")
        return None
    if moment.tzinfo is None:
        problems.add(where, f"{text!r} has no UTC offset; write it as 2026-12-01T08:00:00+08:00 or as HH:MM")
        return None
    return moment


def _taps(raw: Any, riders: set[str], gates: dict[str, str], zone: ZoneInfo | None, day: date | None,
          problems: _Problems) -> list[ScenarioTap]:
    if not isinstance(raw, list) or not raw:
        problems.add("taps", "required: a non-empty list of taps")
        return []
    if len(raw) > TAPS_MAX:
        problems.add("taps", f"at most {TAPS_MAX} taps, got {len(raw)}")
        return []
    taps: list[ScenarioTap] = []
    for i, item in enumerate(raw):
        where = f"taps[{i}]"
        if not isinstance(item, dict):
            problems.add(where, "expected an object")
            continue
        _unknown_keys(item, {"at", "rider", "gate", "stop", "direction", "route", "tap_id", "expect"}, where, problems)
        at = _moment(item.get("at"), zone, day, f"{where}.at", problems)
        rider = _text(item, "rider", where, problems)
        if rider and rider not in riders:
            problems.add(f"{where}.rider", f"no rider named {rider!r} in riders")
        gate_id = _text(item, "gate", where, problems)
        if gate_id and not _ID.match(gate_id):
            problems.add(f"{where}.gate", "1-64 letters, digits or _ . : -")
        stop_id = _text(item, "stop", where, problems, default=gates.get(gate_id, ""))
        if not stop_id and gate_id:
            problems.add(f"{where}.stop", f"required: gate {gate_id!r} is not in the scenario's gates")
        elif stop_id and not _ID.match(stop_id):
            problems.add(f"{where}.stop", "1-64 letters, digits or _ . : -")
        direction = _text(item, "direction", where, problems)
        if direction and direction not in DIRECTIONS:
            problems.add(f"{where}.direction", f"expected one of {', '.join(DIRECTIONS)}, got {direction!r}")
        route = _text(item, "route", where, problems, default="")
        label = _text(item, "tap_id", where, problems, default=f"tap-{i}")
        if label and not _ID.match(label):
            problems.add(f"{where}.tap_id", "1-64 letters, digits or _ . : -")
        expect = _expectation(item.get("expect"), f"{where}.expect", problems)
        if at is not None:
            taps.append(ScenarioTap(i, at, rider, gate_id, stop_id, direction, route, label, expect))
    return taps


def _expectation(raw: Any, where: str, problems: _Problems) -> Expectation:
    if raw is None:
        return Expectation()
    if not isinstance(raw, dict):
        problems.add(where, "expected an object")
        return Expectation()
    _unknown_keys(raw, EXPECT_KEYS, where, problems)
    decision = raw.get("decision")
    if decision is not None and decision not in DECISIONS:
        problems.add(f"{where}.decision", f"expected OPEN or DENY, got {decision!r}")
        decision = None
    reason = raw.get("reason")
    if reason is not None and (not isinstance(reason, str) or not re.fullmatch(r"[A-Z_]+", reason)):
        problems.add(f"{where}.reason", f"expected a TapReason name without its prefix, such as OK or DENIED_PASSBACK, got {reason!r}")
        reason = None
    return Expectation(decision, reason, _int(raw, "fare_minor", where, problems),
                       _int(raw, "held_minor", where, problems),
                       _int(raw, "balance_minor", where, problems, minimum=None))
