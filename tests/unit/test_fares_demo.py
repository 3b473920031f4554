"""The shipped demo city feed: it validates, and FARES.md tells the truth about it.

FARES.md's fare table, station matrix and worked examples are checked against the engine,
so the documentation cannot drift from the feed.
"""

from __future__ import annotations

import io
import re
import shlex
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.fare_gate.fares import FareEngine, Leg, RiderFareState, load_feed
from services.fare_gate.fares.cli import main
from services.fare_gate.fares.testing import zip_feed

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "services/fare_gate/feeds/demo_city"
FARES_MD = ROOT / "services/fare_gate/FARES.md"
TZ = ZoneInfo("Asia/Taipei")
CATEGORIES = ("adult", "student", "senior")


@pytest.fixture(scope="module")
def engine() -> FareEngine:
    return FareEngine.from_path(DEMO)


def nt(text: str) -> int:
    """'NT$12.50' or '−NT$8' -> minor units (1250, -800)."""
    negative = text.startswith(("−", "-"))
    return (-1 if negative else 1) * int(Decimal(text.lstrip("−-").removeprefix("NT$")) * 100)


def test_the_demo_feed_validates_from_its_folder_and_as_a_zip(tmp_path: Path) -> None:
    feed = load_feed(DEMO)
    assert (feed.settings.timezone, feed.currency, feed.settings.service_day_start_s) == ("Asia/Taipei", "TWD", 4 * 3600 + 1800)
    assert len(feed.distance_fare_rules) == 10 and len(feed.fare_transfer_rules) == 2
    metro_stations = {s for pair in feed.stop_distances for s in pair[:2]}
    assert len(metro_stations) == 10
    assert load_feed(zip_feed(DEMO, tmp_path / "demo_city.zip")).version == feed.version


def test_the_documented_fare_table_matches_the_feed(engine: FareEngine) -> None:
    text = FARES_MD.read_text()
    table = text.split("### Fare table", 1)[1].split("\n\n", 2)[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    products = engine.feed.fare_products
    checked = 0
    for what, rule, *amounts in rows:
        expected = dict(zip(CATEGORIES, (nt(a) for a in amounts)))
        rule = rule.strip("`")
        for category, amount in expected.items():
            if rule in products:
                row = engine.fare_product_row(rule, category, "card")
                assert row is not None and row.amount_minor == amount, (what, category)
            elif rule == "*_day" or rule == "*_week":
                cap = next(c for c in engine.feed.fare_caps if c.fare_cap_id == rule.replace("*", category))
                assert cap.amount_minor == amount, (what, category)
            else:
                network = "metro" if "metro" in what else "bus"
                assert engine.max_fare(network, category, "card").amount_minor == amount, (what, category)
            checked += 1
    assert checked == 16 * 3


@pytest.mark.parametrize(("metres", "band"), [(0, 20), (5000, 20), (5001, 25), (8000, 25), (8001, 30), (28999, 60),
                                              (29000, 60), (29001, 65), (10**6, 65)])
def test_metro_bands_step_nt5_every_3_km_after_5_km_up_to_nt65(engine: FareEngine, metres: int, band: int) -> None:
    rule = next(r for r in engine.feed.distance_fare_rules if r.covers(metres))
    # Taipei-style: NT$20 up to 5 km, + NT$5 per started 3 km, at most NT$65
    expected = min(65, 20 + 5 * max(0, -(-(metres - 5000) // 3000)))
    assert band == expected
    assert rule.fare_product_id == f"metro_{band}"


def test_the_station_matrix_in_fares_md_matches_the_engine(engine: FareEngine) -> None:
    lines = [line for line in FARES_MD.read_text().splitlines() if line.startswith("| **")]
    stations = ["HBR", "OLD", "CEN", "UNI", "HSP", "NHL", "APT", "RIV", "MKT", "STD"]
    assert len(lines) == len(stations)
    start = datetime(2026, 12, 1, 8, tzinfo=TZ)
    for line in lines:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        origin = cells[0].strip("*")
        for target, cell in zip(stations, cells[1:]):
            km, fare = cell.split(" / ")
            quote = engine.quote(origin, target, start, network_id="metro")
            assert f"{quote.legs[0].distance_m / 1000:.1f}" == km, (origin, target)
            assert quote.total_minor == int(fare) * 100, (origin, target)


def documented_examples() -> list[tuple[str, str]]:
    blocks = re.findall(r"```console\n\$ python -m services\.fare_gate\.fares (.*?)\n(.*?)```", FARES_MD.read_text(), re.S)
    assert len(blocks) >= 10
    return blocks


@pytest.mark.parametrize(("command", "expected"), documented_examples())
def test_each_worked_example_prints_what_fares_md_shows(command: str, expected: str) -> None:
    out = io.StringIO()
    status = main(shlex.split(command), stdout=out, stderr=out)
    assert status == 0
    assert re.sub(r"demo_city [0-9a-f]{16}", "demo_city <version>", out.getvalue()) == expected


def test_the_worked_examples_total_what_their_text_says(engine: FareEngine) -> None:
    at = lambda day, h, m=0: datetime(2026, 12, day, h, m, tzinfo=TZ)  # noqa: E731
    # metro 20 + bus 15 - 8 = 27 (adult); 16 + 12 - 6.40 = 21.60 (student)
    journey = [Leg("HBR", at(1, 8), "CEN", at(1, 8, 12), network_id="metro"), Leg("BUS_CEN", at(1, 8, 30), network_id="bus")]
    assert engine.price_journey(journey, rider_category_id="adult").total_minor == 2700
    assert engine.price_journey(journey, rider_category_id="student").total_minor == 2160
    # senior on the longest ride: 65 x 50% = 32.50
    assert engine.quote("APT", "NHL", at(1, 10), network_id="metro", rider_category_id="senior").total_minor == 3250


def test_a_morning_of_taps_reaches_the_daily_cap(engine: FareEngine) -> None:
    at = lambda h, m=0: datetime(2026, 12, 1, h, m, tzinfo=TZ)  # noqa: E731
    taps = [
        Leg("APT", at(7), "NHL", at(7, 50), network_id="metro"),  # 29.7 km: 65
        Leg("BUS_UNI", at(8, 20), network_id="bus"),  # bus 15 - 8 transfer (1800 s after the exit): 7
        # 3.0 + 15.2 = 18.2 km: 45, boarded 2400 s after the bus (bus -> metro window 3600 s): 45 - 8 = 37
        Leg("UNI", at(9), "APT", at(9, 40), network_id="metro"),
        # 20.2 km: 50, not joined to the 09:40 exit (4800 s > 900 s); only 150 - 109 = 41 left under the cap
        Leg("APT", at(11), "HBR", at(11, 40), network_id="metro"),
        Leg("BUS_CEN", at(12), network_id="bus"),  # 15 - 8 = 7, but the cap is reached: 0
    ]
    state = RiderFareState()
    charges = []
    for leg in taps:
        charge = engine.charge_leg(state, leg, rider_category_id="adult", fare_media_id="card")
        charges.append(charge.charge_minor)
        state = charge.state
    assert charges == [6500, 700, 3700, 4100, 0]
    assert sum(charges) == 15000  # the NT$150 daily cap
