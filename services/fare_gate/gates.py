"""The gates file: which gates and validators exist, where they stand, and what they price.

A CSV with a header, one gate per row:

    gate_id,stop_id,kind,network_id,route_id
    CEN-G1,CEN,station,metro,
    BUS1-V1,,vehicle,bus,BUS1

- `kind` is `station` (a barrier gate: entry and exit taps at `stop_id`) or `vehicle` (a
  validator on board: validate taps, each naming its stop; `stop_id` stays empty);
- `network_id` is the GTFS-Fares network the gate charges on;
- `route_id` is a vehicle validator's default route, used when a tap names none.

The file is checked against the fare feed when the service starts. Every problem is
reported with its line and field, and the service refuses to start with any, just as it
does for a bad feed.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

from libs.errors import InvalidArgument
from services.fare_gate.domain import Gate, GateKind
from services.fare_gate.fares import FareEngine, FareError, Problem

GATES_MAX = 100_000
COLUMNS = ("gate_id", "stop_id", "kind", "network_id", "route_id")
_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_KINDS = {"station": GateKind.STATION_GATE, "vehicle": GateKind.VEHICLE_VALIDATOR}


class GatesError(InvalidArgument):
    """The gates file cannot be used; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        first = str(self.problems[0]) if self.problems else "no details"
        super().__init__("INVALID_ARGUMENT", f"{len(self.problems)} problem(s) in the gates file, first: {first}")


def load_gates(path: Path, engine: FareEngine, *, fare_media_id: str | None = None) -> dict[str, Gate]:
    """Read and check the gates file against `engine`'s feed; GatesError lists every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GatesError([Problem(path.name, None, None, f"cannot be read: {exc}")]) from exc
    return parse_gates(text, engine, name=path.name, fare_media_id=fare_media_id)


def parse_gates(text: str, engine: FareEngine, *, name: str = "gates.csv",
                fare_media_id: str | None = None) -> dict[str, Gate]:
    feed = engine.feed
    problems: list[Problem] = []
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    header = next(reader, None)
    if header is None:
        raise GatesError([Problem(name, None, None, "is empty; it needs a header and at least one gate")])
    header = [h.strip() for h in header]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise GatesError([Problem(name, 1, None, f"missing column(s) {', '.join(missing)}")])
    index = {c: header.index(c) for c in COLUMNS}
    gates: dict[str, Gate] = {}
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            problems.append(Problem(name, line, None, f"has {len(row)} cells, the header has {len(header)}"))
            continue
        if len(gates) >= GATES_MAX:
            problems.append(Problem(name, line, None, f"more than {GATES_MAX} gates"))
            break
        cell = {c: row[index[c]].strip() for c in COLUMNS}
        before = len(problems)

        def bad(field: str, message: str) -> None:
            problems.append(Problem(name, line, field, message))

        gate_id = cell["gate_id"]
        if not _ID.match(gate_id):
            bad("gate_id", "must be 1 to 64 characters of letters, digits, '.', '_', ':' or '-'")
        elif gate_id in gates:
            bad("gate_id", f"{gate_id!r} is defined twice (first at {gates[gate_id].source})")
        kind = _KINDS.get(cell["kind"])
        if kind is None:
            bad("kind", f"must be station or vehicle, got {cell['kind']!r}")
        network = cell["network_id"]
        if network not in feed.networks and network not in {r.network_id for r in feed.routes.values()}:
            bad("network_id", f"unknown network {network!r}")
        stop = cell["stop_id"] or None
        route = cell["route_id"] or None
        if kind is GateKind.STATION_GATE:
            if stop is None:
                bad("stop_id", "a station gate needs its stop")
            elif stop not in feed.stops:
                bad("stop_id", f"unknown stop {stop!r}")
            if route is not None:
                bad("route_id", "a station gate has no route")
        elif kind is GateKind.VEHICLE_VALIDATOR:
            if stop is not None:
                bad("stop_id", "a vehicle validator has no fixed stop; each tap names it")
        if route is not None and kind is GateKind.VEHICLE_VALIDATOR:
            found = feed.routes.get(route)
            if found is None:
                bad("route_id", f"unknown route {route!r}")
            elif found.network_id != network:
                bad("route_id", f"route {route!r} is in network {found.network_id!r}, not {network!r}")
        if len(problems) == before and kind is not None:
            try:
                for category in feed.rider_categories or {None: None}:
                    engine.max_fare(network, category, fare_media_id)
            except FareError as exc:
                bad("network_id", f"entries on {network!r} cannot be held: {exc.message}")
        if len(problems) == before and kind is not None:
            gates[gate_id] = Gate(gate_id, kind, network, stop, route, f"{name}:{line}")
    if not gates and not problems:
        problems.append(Problem(name, None, None, "defines no gate"))
    if problems:
        raise GatesError(problems)
    return gates
