"""fare-gate's start: settings that fail fast, the gates file checked against the feed, a
bad feed refused with its problem list, and a README that lists every setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.settings import SettingsError, load
from services.fare_gate.bootstrap import StartError, load_fares
from services.fare_gate.domain import GateKind
from services.fare_gate.fares import FareEngine
from services.fare_gate.fares.testing import write_feed
from services.fare_gate.gates import GatesError, parse_gates
from services.fare_gate.settings import DEFAULT_FEED, DEFAULT_GATES, REPO_ROOT, Settings

BASE = {
    "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0",
    "CITYTAP_POSTGRES_DSN": "postgresql://citytap@127.0.0.1/citytap",
    "CITYTAP_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "CITYTAP_REDIS_URL": "redis://127.0.0.1:6379/0",
    "CITYTAP_WALLET_ADDRESS": "127.0.0.1:50052",
}
ENGINE = FareEngine.from_path(DEFAULT_FEED)
HEADER = "gate_id,stop_id,kind,network_id,route_id\n"


# --- settings -----------------------------------------------------------------------------------


def test_defaults_find_the_demo_feed_and_gates_from_any_working_directory(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = load(Settings, BASE)
    assert settings.feed_path == DEFAULT_FEED and DEFAULT_FEED.is_dir()
    assert settings.gates_path == DEFAULT_GATES and DEFAULT_GATES.is_file()
    assert settings.revenue_account_id == "system:operator-revenue:TWD"
    assert (settings.double_tap_window_s, settings.passback_window_s, settings.wallet_timeout_ms) == (10, 1200, 200)
    assert settings.schema == "fare_gate" and settings.credential_key is None
    relative = load(Settings, {**BASE, "CITYTAP_FARE_GATE_FEED": "services/fare_gate/feeds/demo_city"})
    assert relative.feed_path == REPO_ROOT / "services/fare_gate/feeds/demo_city"


def test_every_bad_value_is_named_at_once() -> None:
    bad = {**BASE, "CITYTAP_FARE_GATE_FEED": "no/such/feed", "CITYTAP_FARE_GATE_WALLET_TIMEOUT_MS": "0",
           "CITYTAP_FARE_GATE_PASSBACK_WINDOW_S": "-1", "CITYTAP_FARE_GATE_REVENUE_ACCOUNT": "has spaces",
           "CITYTAP_FARE_GATE_SCHEMA": "Bad-Schema", "CITYTAP_FARE_GATE_CREDENTIAL_KEY": "abcd",
           "CITYTAP_FARE_GATE_GATES": str(DEFAULT_FEED / "stops.txt")}
    with pytest.raises(SettingsError) as info:
        load(Settings, bad)
    text = str(info.value)
    for name in ("FEED", "WALLET_TIMEOUT_MS", "PASSBACK_WINDOW_S", "REVENUE_ACCOUNT", "SCHEMA", "CREDENTIAL_KEY",
                 "GATES"):
        assert f"CITYTAP_FARE_GATE_{name}" in text, name


@pytest.mark.parametrize("changes", [
    {"CITYTAP_FARE_GATE_WALLET_TIMEOUT_MS": "20000"},
    {"CITYTAP_FARE_GATE_TAP_AGE_S_MAX": "100000", "CITYTAP_FARE_GATE_HOLD_GRACE_S": "60"},
    {"CITYTAP_FARE_GATE_HOLD_GRACE_S": str(7 * 24 * 3600)},
    {"CITYTAP_FARE_GATE_DOUBLE_TAP_WINDOW_S": "7200"},
])
def test_combinations_that_cannot_work_are_refused(changes: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        load(Settings, {**BASE, **changes})


def test_the_credential_key_never_prints() -> None:
    key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
    settings = load(Settings, {**BASE, "CITYTAP_FARE_GATE_CREDENTIAL_KEY": key})
    assert bytes(settings.credential_key) == bytes.fromhex(key)
    assert key not in repr(settings)


# --- the feed and the gates file ----------------------------------------------------------------


def test_the_demo_gates_cover_every_station_and_both_bus_routes() -> None:
    settings = load(Settings, BASE)
    engine, gates = load_fares(settings)
    stations = {s for s, stop in engine.feed.stops.items() if not s.startswith("BUS_")}
    assert {g.stop_id for g in gates.values() if g.kind is GateKind.STATION_GATE} == stations
    assert {g.route_id for g in gates.values() if g.kind is GateKind.VEHICLE_VALIDATOR} == {"BUS1", "BUS2"}
    assert all(len([g for g in gates.values() if g.stop_id == s]) >= 2 for s in stations)


def test_a_bad_gates_file_lists_every_problem_with_its_line() -> None:
    text = HEADER + (
        "CEN-G1,CEN,station,metro,\n"
        "CEN-G1,CEN,station,metro,\n"  # 3: twice
        "X-G1,MOON,station,metro,\n"  # 4: unknown stop
        "X-G2,CEN,turnstile,metro,\n"  # 5: bad kind
        "X-G3,,station,metro,\n"  # 6: no stop
        "X-V1,,vehicle,bus,RED\n"  # 7: route of another network
        "X-V2,BUS_CEN,vehicle,bus,BUS1\n"  # 8: a validator with a stop
        "X-G4,CEN,station,metro,RED\n"  # 9: a station with a route
        "bad id!,CEN,station,metro,\n"  # 10
        "X-G5,CEN,station,tram,\n"  # 11: unknown network
        "X-G6,CEN,station\n"  # 12: short row
    )
    with pytest.raises(GatesError) as info:
        parse_gates(text, ENGINE, name="gates.csv")
    where = sorted({(p.line, p.field) for p in info.value.problems}, key=lambda x: x[0])
    assert where == [(3, "gate_id"), (4, "stop_id"), (5, "kind"), (6, "stop_id"), (7, "route_id"), (8, "stop_id"),
                     (9, "route_id"), (10, "gate_id"), (11, "network_id"), (12, None)]
    with pytest.raises(GatesError):
        parse_gates("gate_id,stop_id\nA,CEN\n", ENGINE)
    with pytest.raises(GatesError):
        parse_gates(HEADER, ENGINE)


def test_a_bad_feed_stops_the_start_with_its_problem_list(tmp_path: Path) -> None:
    feed = write_feed(tmp_path / "feed", {"fare_leg_rules.txt": """
        fare_product_id,network_id
        nope,metro
        """, "stops.txt": None})
    settings = load(Settings, {**BASE, "CITYTAP_FARE_GATE_FEED": str(feed)})
    with pytest.raises(StartError) as info:
        load_fares(settings)
    text = str(info.value)
    assert "stops.txt" in text and "fare_leg_rules.txt" in text and text.count("\n  - ") >= 2
    # A valid feed whose stops the gates file does not know.
    feed = write_feed(tmp_path / "tiny")
    with pytest.raises(StartError) as info:
        load_fares(load(Settings, {**BASE, "CITYTAP_FARE_GATE_FEED": str(feed), "CITYTAP_FARE_GATE_CARD_FARE_MEDIA": "none"}))
    assert "gates file" in str(info.value) and "unknown stop 'HBR'" in str(info.value)


def test_an_unknown_fare_media_stops_the_start() -> None:
    with pytest.raises(StartError) as info:
        load_fares(load(Settings, {**BASE, "CITYTAP_FARE_GATE_CARD_FARE_MEDIA": "paper"}))
    assert "CITYTAP_FARE_GATE_CARD_FARE_MEDIA" in str(info.value)


def test_the_readme_lists_every_setting() -> None:
    from libs.settings import describe

    readme = (REPO_ROOT / "services" / "fare_gate" / "README.md").read_text()
    missing = [env for env, _, _ in describe(Settings) if f"`{env}`" not in readme]
    assert not missing, f"add these settings to services/fare_gate/README.md: {missing}"
