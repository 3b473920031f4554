"""`python -m services.fare_gate.fares`: quote, validate and max-fare outputs and exit codes.

Exit status: 0 priced / feed OK, 1 invalid feed or unpriceable journey, 2 bad command line.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.fare_gate.fares import load_feed
from services.fare_gate.fares.cli import UsageError, main, parse_leg
from services.fare_gate.fares.testing import write_feed, zip_feed

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "services/fare_gate/feeds/demo_city")
TZ = ZoneInfo("Asia/Taipei")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = main(list(argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


# --- validate -------------------------------------------------------------------------------


def test_validate_a_good_feed_prints_feed_ok_and_exits_0() -> None:
    status, out, err = run("validate", "--feed", DEMO)
    assert status == 0 and err == ""
    assert out.startswith("feed OK: demo_city version ")
    assert ("1 fare leg rules, 10 distance fare rules, 2 transfer rules, 1 join rules, 36 fare product rows, "
            "6 caps, 2 maximum fares, 14 stops; timezone Asia/Taipei, currency TWD") in out


def test_validate_a_bad_feed_prints_every_problem_and_exits_1(tmp_path: Path) -> None:
    folder = write_feed(tmp_path / "bad", {
        "stop_areas.txt": "area_id,stop_id\nnorth,A\n",
        "fare_products.txt": "fare_product_id,amount,currency\nflat,10.001,TWD\n",
        "routes.txt": None,
    })
    status, out, err = run("validate", "--feed", str(folder))
    assert status == 1 and out == ""
    assert err.splitlines() == [
        "routes.txt: required file is missing",
        "route_networks.txt:2:route_id: unknown route_id (not in routes.txt) 'M1'",
        "route_networks.txt:3:route_id: unknown route_id (not in routes.txt) 'B1'",
        "stop_areas.txt:2:area_id: unknown area_id (not in areas.txt) 'north'",
        "fare_products.txt:2:amount: 10.001 TWD is not a whole number of minor units (TWD has 2 decimal places)",
        "fare_leg_rules.txt:2:fare_product_id: unknown fare_product_id (not in fare_products.txt) 'flat'",
        "feed INVALID: 6 problem(s)",
    ]


def test_validate_a_missing_path_is_a_usage_error(tmp_path: Path) -> None:
    status, _out, err = run("validate", "--feed", str(tmp_path / "nowhere"))
    assert status == 2
    assert err.startswith("usage error: no such feed folder or zip")


def test_the_module_runs_as_a_program() -> None:
    result = subprocess.run([sys.executable, "-m", "services.fare_gate.fares", "validate", "--feed", DEMO],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("feed OK:")


# --- quote ----------------------------------------------------------------------------------


def test_quote_prints_the_breakdown(tmp_path: Path) -> None:
    status, out, err = run("quote", "--feed", DEMO, "--category", "adult", "--media", "card",
                           "--leg", "metro:HBR-CEN@2026-12-01T08:00/08:12", "--leg", "bus:BUS_CEN@2026-12-01T08:30")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[1] == "leg 1  metro  HBR Harbour -> CEN Central  2026-12-01 08:00 -> 08:12  5.000 km (table)"
    assert any("transfer -NT$8.00  fare_transfer_rules.txt:2 metro -> bus, type 1" in line for line in lines)
    assert lines[-1] == "total   NT$27.00  (fares NT$35.00, transfers -NT$8.00, caps NT$0.00)"


def test_quote_runs_against_a_zip(tmp_path: Path) -> None:
    archive = zip_feed(Path(DEMO), tmp_path / "demo_city.zip")
    status, out, _err = run("quote", "--feed", str(archive), "--leg", "metro:APT-NHL@2026-12-01T08:00/08:50")
    assert status == 0
    assert out.splitlines()[-1].startswith("total   NT$65.00")


def test_quote_json_and_prior_cap_state(tmp_path: Path) -> None:
    state = tmp_path / "caps.json"
    state.write_text(json.dumps({"counters": [{"fare_cap_id": "adult_day", "period_start": "2026-12-01", "spent_minor": 14000}]}))
    status, out, _err = run("quote", "--feed", DEMO, "--json", "--cap-state", str(state), "--leg", "metro:HBR-UNI@2026-12-01T08:00/08:20")
    assert status == 0
    quote = json.loads(out)
    # NT$25 fare, NT$150 cap - NT$140 spent = NT$10 charged
    assert (quote["fare_before_caps_minor"], quote["total_minor"], quote["cap_reduction_minor"]) == (2500, 1000, 1500)
    assert {"fare_cap_id": "adult_day", "period_start": "2026-12-01", "spent_minor": 15000} in quote["cap_state_after"]["counters"]


@pytest.mark.parametrize(("leg", "message"), [
    ("metro-HBR-UNI", "expected WHERE:FROM-TO@START[/END]"),
    ("tram:HBR-UNI@2026-12-01T08:00", "'tram' is neither a network nor a route of the feed"),
    ("metro:HBR-XYZ@2026-12-01T08:00", "unknown stop(s) XYZ"),
    ("metro:HBR-UNI@tomorrow", "'tomorrow' is not a date and time"),
    ("metro:HBR-UNI@2026-12-01T08:00/8h", "end '8h' is not HH:MM"),
    ("metro:HBR-?@2026-12-01T08:00/08:30", "an incomplete leg (FROM-?) has no end time"),
])
def test_a_malformed_leg_is_a_usage_error(leg: str, message: str) -> None:
    status, _out, err = run("quote", "--feed", DEMO, "--leg", leg)
    assert status == 2
    assert message in err


def test_a_journey_the_feed_cannot_price_exits_1() -> None:
    status, _out, err = run("quote", "--feed", DEMO, "--category", "tourist", "--leg", "metro:HBR-UNI@2026-12-01T08:00")
    assert status == 1 and err.startswith("cannot price: UNKNOWN_RIDER_CATEGORY")
    # a metro leg with no exit stop has no distance, so no band matches
    status, _out, err = run("quote", "--feed", DEMO, "--leg", "metro:HBR@2026-12-01T08:00")
    assert status == 1 and err.startswith("cannot price: NO_FARE")


def test_an_invalid_feed_is_not_quoted(tmp_path: Path) -> None:
    folder = write_feed(tmp_path / "bad", {"fare_leg_rules.txt": "fare_product_id\nnone\n"})
    status, out, err = run("quote", "--feed", str(folder), "--leg", "metro:A-B@2026-12-01T08:00")
    assert status == 1 and out == ""
    assert "fare_leg_rules.txt:2:fare_product_id" in err


def test_missing_arguments_exit_2() -> None:
    with pytest.raises(SystemExit) as caught:
        run("quote", "--feed", DEMO)
    assert caught.value.code == 2


def test_max_fare_prints_the_entry_hold() -> None:
    assert run("max-fare", "--feed", DEMO, "--network", "metro") == (
        0, "maximum fare on metro: NT$65.00 (citytap_max_fares.txt:2); incomplete after 7200 s\n", "")
    status, _out, err = run("max-fare", "--feed", DEMO, "--network", "tram")
    assert status == 1 and "UNKNOWN_NETWORK" in err


# --- leg syntax -----------------------------------------------------------------------------


def test_leg_times_offsets_and_next_day_ends(tmp_path: Path) -> None:
    feed = load_feed(DEMO)
    leg = parse_leg("metro:HBR-UNI@2026-12-01T23:50/00:10", feed)
    assert leg.start_at == datetime(2026, 12, 1, 23, 50, tzinfo=TZ)
    assert leg.end_at == datetime(2026, 12, 2, 0, 10, tzinfo=TZ)  # earlier than the start: next day
    utc = parse_leg("RED:HBR-UNI@2026-12-01T00:00+00:00", feed)
    assert utc.start_at.astimezone(TZ).hour == 8 and utc.route_id == "RED" and utc.network_id is None
    bus = parse_leg("bus:BUS_CEN@2026-12-01T08:00", feed)
    assert (bus.to_stop_id, bus.incomplete) == (None, False)
    entry = parse_leg("metro:APT-?@2026-12-01T08:00", feed)
    assert (entry.to_stop_id, entry.incomplete) == (None, True)


def test_stop_ids_with_dashes_split_where_both_sides_are_stops(tmp_path: Path) -> None:
    feed = load_feed(write_feed(tmp_path / "feed", {"stops.txt": "stop_id\nR-01\nR-02\nA\nA-B\nB-C\nC\n"}))
    leg = parse_leg("metro:R-01-R-02@2026-12-01T08:00", feed)
    assert (leg.from_stop_id, leg.to_stop_id) == ("R-01", "R-02")
    with pytest.raises(UsageError, match="more than one way"):
        parse_leg("metro:A-B-C@2026-12-01T08:00", feed)  # A / B-C and A-B / C are both stop pairs
