"""Pricing single fare legs: networks, areas, rule_priority, timeframes, riders, distances, joins.

Every expected price is worked out in a comment. Amounts are TWD minor units (NT$1 = 100).
December 2026: the 1st is a Tuesday, the 5th a Saturday.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.fare_gate.fares import FareEngine, FareError, Leg, load_feed
from services.fare_gate.fares.testing import write_feed

TZ = ZoneInfo("Asia/Taipei")


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, second, tzinfo=TZ)


def engine_for(tmp_path: Path, files: dict[str, str | None]) -> FareEngine:
    return FareEngine(load_feed(write_feed(tmp_path / "feed", files)))


def fare(engine: FareEngine, origin: str, target: str | None, start: datetime, *, network: str = "metro",
         end: datetime | None = None, **rider: str) -> int:
    quote = engine.price_journey([Leg(origin, start, target, end, network_id=network)], **rider)
    return quote.total_minor


def test_a_flat_rule_prices_any_leg(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {})
    quote = engine.quote("A", "B", at(1, 8))
    # the base feed's only rule: product flat, 10.00 TWD
    assert quote.total_minor == 1000
    assert quote.legs[0].match is not None and quote.legs[0].match.rule == "fare_leg_rules.txt:2"
    assert quote.legs[0].match.fare_product_row == "fare_products.txt:2"


def test_a_leg_named_by_route_gets_the_route_network(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {
        "fare_products.txt": "fare_product_id,amount,currency\nm,20,TWD\nb,15,TWD\n",
        "fare_leg_rules.txt": "network_id,fare_product_id\nmetro,m\nbus,b\n",
    })
    assert engine.price_journey([Leg("A", at(1, 8), "B", route_id="M1")]).total_minor == 2000  # M1 is metro: NT$20
    assert engine.price_journey([Leg("A", at(1, 8), "B", route_id="B1")]).total_minor == 1500  # B1 is bus: NT$15


# --- areas and rule_priority --------------------------------------------------------------

ZONES = {
    "areas.txt": "area_id\nzone1\nzone2\n",
    "stop_areas.txt": """
        area_id,stop_id
        zone1,A
        zone1,B
        zone2,C
        zone2,D
        """,
    "fare_products.txt": """
        fare_product_id,amount,currency
        in_zone,20,TWD
        cross,35,TWD
        any,50,TWD
        cheap,5,TWD
        """,
}


def test_area_pair_rules(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**ZONES, "fare_leg_rules.txt": """
        network_id,from_area_id,to_area_id,fare_product_id,rule_priority
        metro,zone1,zone1,in_zone,1
        metro,zone2,zone2,in_zone,1
        metro,zone1,zone2,cross,1
        metro,zone2,zone1,cross,1
        metro,,,any,0
        """})
    assert fare(engine, "A", "B", at(1, 8)) == 2000  # zone1 -> zone1: in_zone NT$20
    assert fare(engine, "A", "C", at(1, 8)) == 3500  # zone1 -> zone2: cross NT$35
    assert fare(engine, "D", "B", at(1, 8)) == 3500  # zone2 -> zone1: cross NT$35
    with pytest.raises(FareError) as caught:
        fare(engine, "A", "B", at(1, 8), network="bus")  # every rule names metro
    assert caught.value.reason == "NO_FARE"


def test_only_the_highest_priority_matches_count_even_if_a_lower_one_is_cheaper(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**ZONES, "fare_leg_rules.txt": """
        network_id,from_area_id,to_area_id,fare_product_id,rule_priority
        metro,,,cheap,0
        metro,zone1,,cross,2
        metro,zone1,,in_zone,1
        """})
    quote = engine.quote("A", "C", at(1, 8), network_id="metro")
    # all three match A -> C; priority 2 wins: cross NT$35, although cheap (NT$5) also matches
    assert quote.total_minor == 3500
    assert quote.legs[0].match is not None and quote.legs[0].match.rule_priority == 2
    # from zone2 only the priority-0 rule matches: cheap NT$5
    assert fare(engine, "C", "A", at(1, 8)) == 500


def test_among_equal_priorities_the_cheapest_product_wins(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**ZONES, "fare_leg_rules.txt": """
        network_id,from_area_id,fare_product_id,rule_priority
        metro,zone1,cross,1
        metro,,in_zone,1
        """})
    quote = engine.quote("A", "C", at(1, 8), network_id="metro")
    # cross NT$35 and in_zone NT$20 both match at priority 1: the rider pays NT$20
    assert quote.total_minor == 2000
    assert quote.legs[0].match is not None and quote.legs[0].match.other_matches == 1


def test_without_rule_priority_an_empty_field_matches_only_values_no_rule_lists(tmp_path: Path) -> None:
    files = {**ZONES, "fare_leg_rules.txt": """
        network_id,from_area_id,fare_product_id
        metro,,any
        ,,in_zone
        ,zone2,cross
        """}
    engine = engine_for(tmp_path / "plain", files)
    # metro is listed, so the empty-network rules do not apply to metro: any NT$50
    assert fare(engine, "A", "B", at(1, 8)) == 5000
    # bus is listed nowhere: the empty-network rules apply; from zone1 (not listed) -> in_zone NT$20
    assert fare(engine, "A", "B", at(1, 8), network="bus") == 2000
    # from zone2, which a rule lists: only the zone2 rule applies -> cross NT$35
    assert fare(engine, "C", "B", at(1, 8), network="bus") == 3500
    # The same rules with a rule_priority column: empty means "any", so every rule matches
    # metro from zone1 at priority 0 and the cheapest wins: in_zone NT$20.
    engine = engine_for(tmp_path / "priority", {**files, "fare_leg_rules.txt": """
        network_id,from_area_id,fare_product_id,rule_priority
        metro,,any,
        ,,in_zone,
        ,zone2,cross,
        """})
    assert fare(engine, "A", "B", at(1, 8)) == 2000


# --- timeframes ---------------------------------------------------------------------------

CALENDAR = {
    "calendar.txt": """
        service_id,monday,tuesday,wednesday,thursday,friday,saturday,sunday,start_date,end_date
        weekdays,1,1,1,1,1,0,0,20260101,20271231
        weekend,0,0,0,0,0,1,1,20260101,20271231
        """,
    "calendar_dates.txt": """
        service_id,date,exception_type
        weekdays,20261225,2
        weekend,20261225,1
        """,
    "fare_products.txt": """
        fare_product_id,amount,currency
        peak,30,TWD
        shoulder,25,TWD
        base,20,TWD
        late,12,TWD
        """,
}


def test_peak_timeframes_follow_time_of_day_and_service_days(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**CALENDAR,
        "timeframes.txt": """
            timeframe_group_id,start_time,end_time,service_id
            peak,07:00:00,09:00:00,weekdays
            peak,17:00:00,19:00:00,weekdays
            """,
        "fare_leg_rules.txt": """
            network_id,from_timeframe_group_id,fare_product_id,rule_priority
            metro,peak,peak,1
            metro,,base,0
            """})
    assert fare(engine, "A", "B", at(1, 8)) == 3000  # Tuesday 08:00 is peak: NT$30
    assert fare(engine, "A", "B", at(1, 7)) == 3000  # the start is included
    assert fare(engine, "A", "B", at(1, 6, 59, 59)) == 2000  # before peak: base NT$20
    assert fare(engine, "A", "B", at(1, 9)) == 2000  # the end is excluded
    assert fare(engine, "A", "B", at(1, 17, 30)) == 3000  # the second peak row
    assert fare(engine, "A", "B", at(5, 8)) == 2000  # Saturday: no weekday service, base
    assert fare(engine, "A", "B", at(25, 8)) == 2000  # Friday 25th is removed by calendar_dates
    # Times are compared in the feed's local time: 00:00 UTC is 08:00 in Taipei.
    assert fare(engine, "A", "B", datetime(2026, 12, 1, 0, 0, tzinfo=timezone.utc)) == 3000


def test_overlapping_timeframe_groups_are_settled_by_rule_priority(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**CALENDAR,
        "timeframes.txt": """
            timeframe_group_id,start_time,end_time,service_id
            peak,07:00:00,09:00:00,weekdays
            shoulder,06:00:00,10:00:00,weekdays
            """,
        "fare_leg_rules.txt": """
            network_id,from_timeframe_group_id,fare_product_id,rule_priority
            metro,peak,peak,2
            metro,shoulder,shoulder,1
            metro,,base,0
            """})
    assert fare(engine, "A", "B", at(1, 8)) == 3000  # in both peak and shoulder: priority 2, NT$30
    assert fare(engine, "A", "B", at(1, 6, 30)) == 2500  # shoulder only: NT$25
    assert fare(engine, "A", "B", at(1, 9, 30)) == 2500
    assert fare(engine, "A", "B", at(1, 5)) == 2000  # neither: base NT$20


def test_to_timeframe_uses_the_end_of_the_leg(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**CALENDAR,
        "timeframes.txt": """
            timeframe_group_id,start_time,end_time,service_id
            late,22:00:00,24:00:00,weekdays
            late,22:00:00,24:00:00,weekend
            """,
        "fare_leg_rules.txt": """
            network_id,to_timeframe_group_id,fare_product_id,rule_priority
            metro,late,late,1
            metro,,base,0
            """})
    # starts 21:50, ends 22:10: the end is in "late" -> NT$12
    assert fare(engine, "A", "B", at(1, 21, 50), end=at(1, 22, 10)) == 1200
    # ends 21:59: base NT$20; and with no end time a to-timeframe rule cannot match
    assert fare(engine, "A", "B", at(1, 21, 40), end=at(1, 21, 59)) == 2000
    assert fare(engine, "A", "B", at(1, 22, 30)) == 2000


# --- rider categories and fare media --------------------------------------------------------

RIDERS = {
    "rider_categories.txt": """
        rider_category_id,rider_category_name,is_default_fare_category
        adult,Adult,1
        child,Child,0
        """,
    "fare_media.txt": "fare_media_id,fare_media_name,fare_media_type\ncard,Card,2\ncash,Cash,0\n",
    "fare_products.txt": """
        fare_product_id,rider_category_id,fare_media_id,amount,currency
        fare,adult,,20,TWD
        fare,child,,10,TWD
        fare,adult,card,18,TWD
        adult_peak,adult,,30,TWD
        """,
}


def test_the_product_row_follows_the_riders_category_and_media(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**RIDERS, "fare_leg_rules.txt": "fare_product_id\nfare\n"})
    assert fare(engine, "A", "B", at(1, 8), rider_category_id="adult", fare_media_id="card") == 1800  # card row NT$18
    assert fare(engine, "A", "B", at(1, 8), rider_category_id="adult", fare_media_id="cash") == 2000  # no cash row: NT$20
    assert fare(engine, "A", "B", at(1, 8), rider_category_id="child", fare_media_id="card") == 1000  # child NT$10
    assert fare(engine, "A", "B", at(1, 8)) == 2000  # no category given: the default, adult
    with pytest.raises(FareError) as caught:
        fare(engine, "A", "B", at(1, 8), rider_category_id="pensioner")
    assert caught.value.reason == "UNKNOWN_RIDER_CATEGORY"
    with pytest.raises(FareError) as caught:
        fare(engine, "A", "B", at(1, 8), fare_media_id="token")
    assert caught.value.reason == "UNKNOWN_FARE_MEDIA"


def test_a_rule_whose_product_the_rider_cannot_use_does_not_match(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**RIDERS, "fare_leg_rules.txt": """
        network_id,fare_product_id,rule_priority
        metro,adult_peak,1
        metro,fare,0
        """})
    assert fare(engine, "A", "B", at(1, 8), rider_category_id="adult") == 3000  # adult_peak NT$30
    # adult_peak has no child row, so for a child only the priority-0 rule applies: NT$10
    assert fare(engine, "A", "B", at(1, 8), rider_category_id="child") == 1000


def test_a_product_row_without_category_serves_every_category(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**RIDERS,
        "fare_products.txt": RIDERS["fare_products.txt"] + "flat,,,7,TWD\n",
        "fare_leg_rules.txt": "fare_product_id\nflat\n"})
    assert fare(engine, "A", "B", at(1, 8), rider_category_id="child") == 700
    assert fare(engine, "A", "B", at(1, 8), rider_category_id="adult") == 700


# --- distance bands -------------------------------------------------------------------------

DISTANCES = {
    "stops.txt": """
        stop_id,stop_name,stop_lat,stop_lon
        A,A,25.0000,121.5000
        B,B,25.0100,121.5000
        C,C,,
        D,D,,
        E,E,,
        F,F,25.1000,121.6000
        G,G,25.1100,121.6000
        H,H,,
        """,
    "citytap_stop_distances.txt": """
        from_stop_id,to_stop_id,distance_m
        A,B,5000
        B,E,1
        B,C,3000
        C,D,1
        A,C,9000
        """,
    "fare_products.txt": """
        fare_product_id,amount,currency
        band1,20,TWD
        band2,25,TWD
        band3,30,TWD
        special,12,TWD
        """,
    "fare_leg_rules.txt": "fare_product_id,rule_priority\n",
    "citytap_distance_fares.txt": """
        leg_group_id,network_id,min_distance_m,max_distance_m,fare_product_id
        metro,metro,0,5000,band1
        metro,metro,5000,8000,band2
        metro,metro,8000,,band3
        """,
}


@pytest.mark.parametrize(("origin", "target", "metres", "amount"), [
    ("A", "A", 0, 2000),  # the same station: 0 m is in the first band, NT$20
    ("A", "B", 5000, 2000),  # exactly 5 km: still the first band (its top is included)
    ("A", "E", 5001, 2500),  # 5000 + 1 m: second band NT$25
    ("A", "C", 8000, 2500),  # A-B-C 5000 + 3000 = 8000 beats the direct 9000; top of band 2
    ("A", "D", 8001, 3000),  # 8000 + 1: the open-ended third band NT$30
    ("E", "D", 3002, 2000),  # E-B 1 + B-C 3000 + C-D 1 = 3002 m
])
def test_distance_bands_at_their_edges(tmp_path: Path, origin: str, target: str, metres: int, amount: int) -> None:
    engine = engine_for(tmp_path, DISTANCES)
    quote = engine.quote(origin, target, at(1, 8), network_id="metro")
    assert quote.legs[0].distance_m == metres
    assert quote.total_minor == amount


def test_coordinates_serve_when_the_table_has_no_path(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, DISTANCES)
    quote = engine.quote("F", "G", at(1, 8), network_id="metro")
    # 0.01 degree of latitude = 6,371,008.8 m x pi/180 x 0.01 = 1,111.95 m -> 1112 m, band 1
    assert (quote.legs[0].distance_m, quote.legs[0].distance_source) == (1112, "coordinates")
    assert quote.total_minor == 2000
    # A and B also have coordinates 1112 m apart, but the listed 5000 m wins
    assert engine.quote("A", "B", at(1, 8), network_id="metro").legs[0].distance_m == 5000
    # H has neither coordinates nor a listed path: no distance, so no distance band applies
    with pytest.raises(FareError) as caught:
        engine.quote("A", "H", at(1, 8), network_id="metro")
    assert caught.value.reason == "NO_FARE"


def test_a_native_rule_with_higher_priority_beats_a_distance_band(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**DISTANCES,
        "areas.txt": "area_id\nairport\n",
        "stop_areas.txt": "area_id,stop_id\nairport,D\n",
        "fare_leg_rules.txt": "network_id,to_area_id,fare_product_id,rule_priority\nmetro,airport,special,1\n",
    })
    assert fare(engine, "A", "D", at(1, 8)) == 1200  # to the airport area: priority 1 special NT$12
    assert fare(engine, "A", "C", at(1, 8)) == 2500  # elsewhere the band: 8000 m -> NT$25


# --- joined legs ----------------------------------------------------------------------------


def test_consecutive_metro_legs_join_into_one_fare_leg_priced_end_to_end(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**DISTANCES,
        "fare_leg_join_rules.txt": "from_network_id,to_network_id\nmetro,metro\n"})
    legs = [Leg("A", at(1, 8), "B", at(1, 8, 10), network_id="metro"),
            Leg("B", at(1, 8, 15), "D", at(1, 8, 25), network_id="metro")]
    quote = engine.price_journey(legs)
    # one effective leg A -> D, 8001 m: NT$30 once (not NT$20 + NT$20)
    assert quote.total_minor == 3000
    assert len(quote.legs) == 1 and quote.legs[0].legs == (0, 1)
    assert quote.legs[0].joined_by == ("fare_leg_join_rules.txt:2",)
    # a second leg that starts at another station is not joined: two fares, 5000 m + 1 m
    legs[1] = Leg("C", at(1, 8, 15), "D", at(1, 8, 25), network_id="metro")
    assert engine.price_journey(legs).total_minor == 2000 + 2000


def test_a_join_rule_with_stops_joins_across_different_stations(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {**DISTANCES,
        "fare_leg_join_rules.txt": "from_network_id,to_network_id,from_stop_id,to_stop_id\nmetro,metro,B,C\n"})
    legs = [Leg("A", at(1, 8), "B", at(1, 8, 10), network_id="metro"),
            Leg("C", at(1, 8, 15), "D", at(1, 8, 25), network_id="metro")]
    assert engine.price_journey(legs).total_minor == 3000  # joined A -> D: 8001 m, NT$30


# --- bad legs -----------------------------------------------------------------------------


@pytest.mark.parametrize(("legs", "reason"), [
    ([], "INVALID_LEG"),
    ([Leg("A", datetime(2026, 12, 1, 8), "B", network_id="metro")], "INVALID_LEG"),  # naive time
    ([Leg("A", at(1, 8), "B", at(1, 7), network_id="metro")], "INVALID_LEG"),  # ends before it starts
    ([Leg("A", at(1, 9), "B", network_id="metro"), Leg("B", at(1, 8), "C", network_id="metro")], "INVALID_LEG"),
    ([Leg("A", at(1, 8), "Z", network_id="metro")], "UNKNOWN_STOP"),
    ([Leg("A", at(1, 8), "B", network_id="tram")], "UNKNOWN_NETWORK"),
    ([Leg("A", at(1, 8), "B", route_id="X")], "UNKNOWN_ROUTE"),
    ([Leg("A", at(1, 8), "B", network_id="bus", route_id="M1")], "INVALID_LEG"),  # M1 is metro
    ([Leg("A", at(1, 8), incomplete=True)], "NETWORK_REQUIRED"),
    ([Leg("A", at(1, 8) + timedelta(minutes=i), "B", network_id="metro") for i in range(33)], "INVALID_LEG"),
])
def test_bad_legs_are_refused_with_a_reason(tmp_path: Path, legs: list[Leg], reason: str) -> None:
    engine = engine_for(tmp_path, {})
    with pytest.raises(FareError) as caught:
        engine.price_journey(legs)
    assert caught.value.reason == reason
