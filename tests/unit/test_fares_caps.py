"""Caps over the service day and week, incomplete journeys, and the state a caller keeps.

Amounts are TWD minor units: a metro leg costs NT$20 (2000) and a bus leg NT$15 (1500).
The service day starts at 04:30 local time unless a test changes it. December 2026: the
1st is a Tuesday, the 6th a Sunday, the 7th a Monday; service weeks start on Monday.
"""

from __future__ import annotations

import json
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.fare_gate.fares import CapState, FareEngine, FareError, Leg, RiderFareState, load_feed
from services.fare_gate.fares.state import PERIODS_KEPT_PER_CAP
from services.fare_gate.fares.testing import write_feed

TZ = ZoneInfo("Asia/Taipei")


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, day, hour, minute, tzinfo=TZ)


BASE = {
    "networks.txt": "network_id\nmetro\nbus\nferry\n",
    "rider_categories.txt": """
        rider_category_id,rider_category_name,is_default_fare_category
        adult,Adult,1
        child,Child,0
        """,
    "fare_media.txt": "fare_media_id,fare_media_type\ncard,2\nphone,4\n",
    "fare_products.txt": """
        fare_product_id,amount,currency
        metro_fare,20,TWD
        bus_fare,15,TWD
        metro_max,65,TWD
        discount,-8,TWD
        """,
    "fare_leg_rules.txt": """
        leg_group_id,network_id,fare_product_id
        metro,metro,metro_fare
        bus,bus,bus_fare
        """,
    "fare_transfer_rules.txt": """
        from_leg_group_id,to_leg_group_id,duration_limit,duration_limit_type,fare_transfer_type,fare_product_id
        metro,bus,3600,2,1,discount
        """,
    "citytap_fare_caps.txt": """
        fare_cap_id,rider_category_id,fare_media_id,cap_period,amount,currency
        adult_day,adult,,0,50,TWD
        adult_week,adult,,1,120,TWD
        card_day,,card,0,30,TWD
        """,
    "citytap_max_fares.txt": "network_id,fare_product_id,incomplete_after_s\nmetro,metro_max,7200\n",
}


def engine_for(tmp_path: Path, **files: str | None) -> FareEngine:
    return FareEngine(load_feed(write_feed(tmp_path / "feed", {**BASE, **files})))


def metro(start: datetime, end: datetime | None = None) -> Leg:
    return Leg("A", start, "B", end, network_id="metro")


def bus(start: datetime) -> Leg:
    return Leg("B", start, "C", network_id="bus")


def spent(**counters: tuple[date, int]) -> CapState:
    state = CapState()
    for cap_id, (period, amount) in counters.items():
        state = state.add(cap_id, period, amount)
    return state


# --- daily and weekly caps ------------------------------------------------------------------


def test_the_daily_cap_charges_only_what_is_left(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    prior = spent(adult_day=(date(2026, 12, 1), 4000))
    quote = engine.price_journey([metro(at(1, 8))], cap_state=prior)
    # NT$50 cap - NT$40 spent = NT$10 left; the NT$20 fare is charged NT$10
    assert quote.total_minor == 1000
    assert quote.cap_reduction_minor == 1000
    day_cap = next(cap for cap in quote.caps if cap.fare_cap_id == "adult_day")
    assert (day_cap.spent_before_minor, day_cap.spent_after_minor, day_cap.reduction_minor) == (4000, 5000, 1000)
    assert quote.cap_state_after.spent("adult_day", date(2026, 12, 1)) == 5000
    # the week counts what was charged, NT$10, not the NT$20 fare
    assert quote.cap_state_after.spent("adult_week", date(2026, 11, 30)) == 1000


def test_the_cap_is_reached_within_one_call(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    quote = engine.price_journey([metro(at(1, 8)), metro(at(1, 12)), metro(at(1, 17)), metro(at(1, 20))])
    # 20 + 20 + (50 - 40 = 10) + 0: the day cap NT$50 is reached on the third trip
    assert [leg.charged_minor for leg in quote.legs] == [2000, 2000, 1000, 0]
    assert quote.total_minor == 5000


def test_a_0429_tap_belongs_to_the_previous_service_day(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    capped = spent(adult_day=(date(2026, 12, 1), 5000))  # Tuesday's cap already reached
    early = engine.price_journey([metro(at(2, 4, 29))], cap_state=capped)
    assert early.legs[0].service_date == date(2026, 12, 1)  # 04:29 Wednesday is still Tuesday
    assert early.total_minor == 0
    on_time = engine.price_journey([metro(at(2, 4, 30))], cap_state=capped)
    assert on_time.legs[0].service_date == date(2026, 12, 2)  # 04:30: a new service day
    assert on_time.total_minor == 2000


def test_the_weekly_cap_and_its_boundary_on_monday_at_0430(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    week = date(2026, 11, 30)  # Monday of the week holding Tuesday 1 December
    prior = spent(adult_week=(week, 11000))
    quote = engine.price_journey([metro(at(2, 8))], cap_state=prior)
    # day: 50 - 0 = 50 left; week: 120 - 110 = 10 left; the week binds: NT$10
    assert quote.total_minor == 1000
    assert {cap.fare_cap_id: cap.reduction_minor for cap in quote.caps} == {"adult_day": 0, "adult_week": 1000}
    full_week = spent(adult_week=(week, 12000))
    sunday_night = engine.price_journey([metro(at(7, 4, 29))], cap_state=full_week)  # Monday 04:29 = Sunday
    assert sunday_night.total_minor == 0
    new_week = engine.price_journey([metro(at(7, 4, 30))], cap_state=full_week)
    assert new_week.total_minor == 2000
    assert new_week.cap_state_after.spent("adult_week", date(2026, 12, 7)) == 2000


def test_service_day_start_and_week_start_come_from_the_settings(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, **{"citytap_settings.txt": """
        feed_timezone,service_day_start,service_week_start
        Asia/Taipei,03:00:00,sunday
        """})
    quote = engine.price_journey([metro(at(2, 3, 30))])
    assert quote.legs[0].service_date == date(2026, 12, 2)  # after 03:00: already Wednesday
    week = next(cap for cap in quote.caps if cap.fare_cap_id == "adult_week")
    assert week.period_start == date(2026, 11, 29)  # the Sunday before


def test_caps_apply_by_rider_category_and_fare_media(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    # adult on card: adult_day (50) and card_day (30) both apply; card_day is tighter
    quote = engine.price_journey([metro(at(1, 8)), metro(at(1, 9))], fare_media_id="card")
    assert quote.total_minor == 3000  # 20 + (30 - 20 = 10)
    assert {cap.fare_cap_id for cap in quote.caps} == {"adult_day", "adult_week", "card_day"}
    # adult on phone: card_day does not apply: 20 + 20
    assert engine.price_journey([metro(at(1, 8)), metro(at(1, 9))], fare_media_id="phone").total_minor == 4000
    # child on phone: no cap applies at all
    quote = engine.price_journey([metro(at(1, 8))] * 3, rider_category_id="child", fare_media_id="phone")
    assert quote.total_minor == 6000 and quote.caps == ()


def test_a_transfer_chain_is_capped_as_a_whole(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    prior = spent(adult_day=(date(2026, 12, 1), 3500))
    quote = engine.price_journey([metro(at(1, 8), at(1, 8, 20)), bus(at(1, 8, 30))], cap_state=prior)
    # fares 20 + (15 - 8 transfer) = 27; NT$15 left under the cap: 15 charged, 12 capped away
    assert quote.fare_before_caps_minor == 2700
    assert quote.total_minor == 1500
    assert [(leg.charged_minor, leg.cap_reduction_minor) for leg in quote.legs] == [(1500, 500), (0, 700)]


def test_legs_on_different_service_days_count_toward_their_own_days(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    prior = spent(adult_day=(date(2026, 12, 1), 5000))
    quote = engine.price_journey([metro(at(1, 23)), metro(at(2, 8))], cap_state=prior)
    assert [leg.charged_minor for leg in quote.legs] == [0, 2000]  # Tuesday capped, Wednesday fresh
    after = quote.cap_state_after
    assert after.spent("adult_day", date(2026, 12, 1)) == 5000
    assert after.spent("adult_day", date(2026, 12, 2)) == 2000


# --- incomplete journeys and maximum fares ------------------------------------------------


def test_an_incomplete_journey_is_charged_the_maximum_fare_outside_the_caps(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    prior = spent(adult_day=(date(2026, 12, 1), 5000))
    quote = engine.price_journey([Leg("A", at(1, 8), network_id="metro", incomplete=True)], cap_state=prior)
    # metro_max NT$65, even though the day cap is reached: a penalty is not travel
    assert quote.total_minor == 6500
    assert quote.legs[0].max_fare_rule == "citytap_max_fares.txt:2"
    assert quote.cap_state_after == prior  # and it does not count toward the cap


def test_a_feed_may_count_incomplete_journeys_toward_caps(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, **{"citytap_settings.txt": "feed_timezone,cap_incomplete_journeys\nAsia/Taipei,1\n"})
    prior = spent(adult_day=(date(2026, 12, 1), 3000))
    quote = engine.price_journey([Leg("A", at(1, 8), network_id="metro", incomplete=True)], cap_state=prior)
    assert quote.total_minor == 2000  # 65 capped to the 50 - 30 = 20 left


def test_max_fare_comes_from_the_feed_or_from_the_dearest_rule(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    metro_max = engine.max_fare("metro", "adult", "card")
    assert (metro_max.amount_minor, metro_max.fare_product_id, metro_max.incomplete_after_s) == (6500, "metro_max", 7200)
    bus_max = engine.max_fare("bus")  # no citytap_max_fares row: the dearest bus rule, NT$15
    assert (bus_max.amount_minor, bus_max.rule) == (1500, "computed from 1 leg rule(s)")
    with pytest.raises(FareError) as caught:
        engine.max_fare("ferry")  # a network with no rule at all
    assert caught.value.reason == "NO_MAX_FARE"
    with pytest.raises(FareError) as caught:
        engine.max_fare("tram")
    assert caught.value.reason == "UNKNOWN_NETWORK"


# --- state kept between calls -------------------------------------------------------------


def test_cap_state_round_trips_through_json_and_stays_small() -> None:
    state = CapState()
    for day in range(1, 21):
        state = state.add("adult_day", date(2026, 12, day), 100 * day)
    assert len(state.counters) == PERIODS_KEPT_PER_CAP  # only the most recent periods are kept
    assert state.spent("adult_day", date(2026, 12, 20)) == 2000
    assert state.spent("adult_day", date(2026, 12, 1)) == 0  # dropped long ago
    assert CapState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_charging_leg_by_leg_matches_pricing_the_whole_day(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    legs = [metro(at(1, 8), at(1, 8, 20)), bus(at(1, 8, 30)), bus(at(1, 10)), metro(at(1, 18), at(1, 18, 30))]
    state = RiderFareState()
    charges, new_journeys = [], []
    for leg in legs:
        charge = engine.charge_leg(state, leg, rider_category_id="adult", fare_media_id="phone")
        charges.append(charge.charge_minor)
        new_journeys.append(charge.started_new_journey)
        # what the tap path would store in PostgreSQL and read back at the next tap
        state = RiderFareState.from_dict(json.loads(json.dumps(charge.state.to_dict())))
    # metro 20; bus 15 - 8 transfer = 7; bus 15 (no bus->bus rule); metro: 50 - 42 = 8 left of the day cap
    assert charges == [2000, 700, 1500, 800]
    assert new_journeys == [True, False, True, True]
    whole = engine.price_journey(legs, rider_category_id="adult", fare_media_id="phone")
    assert whole.total_minor == sum(charges)
    assert state.cap_state == whole.cap_state_after


def test_an_incomplete_leg_closes_the_open_journey(tmp_path: Path) -> None:
    engine = engine_for(tmp_path)
    first = engine.charge_leg(RiderFareState(), Leg("A", at(1, 8), network_id="metro", incomplete=True))
    assert first.charge_minor == 6500 and first.state.open_legs == ()
    second = engine.charge_leg(first.state, bus(at(1, 8, 30)))
    assert second.charge_minor == 1500 and second.started_new_journey  # no transfer discount after it


def test_quote_is_the_fare_before_caps(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, **{"citytap_fare_caps.txt": """
        fare_cap_id,rider_category_id,cap_period,amount,currency
        tiny_day,adult,0,10,TWD
        """})
    quote = engine.quote("A", "B", at(1, 8), network_id="metro")
    assert (quote.total_minor, quote.caps) == (2000, ())  # NT$20, although the day cap is NT$10
    assert engine.price_journey([metro(at(1, 8))]).total_minor == 1000
