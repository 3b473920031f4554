"""fare_transfer_rules.txt: transfer types, the four duration limit types, transfer_count.

Amounts are TWD minor units. Unless a test says otherwise a metro leg costs NT$20 (2000)
and a bus leg NT$15 (1500); A = from-leg fare, B = to-leg fare, AB = transfer product.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.fare_gate.fares import FareEngine, Leg, load_feed
from services.fare_gate.fares.testing import write_feed

TZ = ZoneInfo("Asia/Taipei")


def at(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 12, 1, hour, minute, tzinfo=TZ)


BASE = {
    "networks.txt": "network_id\nmetro\nbus\nferry\n",
    "rider_categories.txt": """
        rider_category_id,rider_category_name,is_default_fare_category
        adult,Adult,1
        child,Child,0
        """,
    "fare_products.txt": """
        fare_product_id,rider_category_id,amount,currency
        metro_fare,,20,TWD
        bus_fare,,15,TWD
        ferry_fare,,30,TWD
        discount,,-8,TWD
        plus5,,5,TWD
        combined,,25,TWD
        free,,0,TWD
        adult_only,adult,-8,TWD
        big_discount,,-30,TWD
        """,
    "fare_leg_rules.txt": """
        leg_group_id,network_id,fare_product_id
        metro,metro,metro_fare
        bus,bus,bus_fare
        ferry,ferry,ferry_fare
        """,
}


def engine_with(tmp_path: Path, transfer_rules: str, **extra: str) -> FareEngine:
    header = "from_leg_group_id,to_leg_group_id,transfer_count,duration_limit,duration_limit_type,fare_transfer_type,fare_product_id\n"
    files = {**BASE, "fare_transfer_rules.txt": header + transfer_rules.strip() + "\n", **extra}
    return FareEngine(load_feed(write_feed(tmp_path / "feed", files)))


def metro(start: datetime, end: datetime | None = None) -> Leg:
    return Leg("A", start, "B", end, network_id="metro")


def bus(start: datetime, end: datetime | None = None) -> Leg:
    return Leg("B", start, "C", end, network_id="bus")


# --- fare_transfer_type -------------------------------------------------------------------


@pytest.mark.parametrize(("rule", "total", "adjustment"), [
    ("metro,bus,,,,0,plus5", 2000 + 500, 500 - 1500),  # type 0: A + AB = 20 + 5; the bus fare is not paid
    ("metro,bus,,,,1,discount", 2000 - 800 + 1500, -800),  # type 1: A + AB + B = 20 - 8 + 15 = 27
    ("metro,bus,,,,2,combined", 2500, 2500 - 2000 - 1500),  # type 2: AB = 25 replaces both fares
    ("metro,bus,,,,1,", 2000 + 0 + 1500, 0),  # no product: the transfer costs nothing extra, 20 + 15
])
def test_each_fare_transfer_type_combines_costs_as_the_reference_says(tmp_path: Path, rule: str, total: int,
                                                                      adjustment: int) -> None:
    engine = engine_with(tmp_path, rule)
    quote = engine.price_journey([metro(at(8), at(8, 20)), bus(at(8, 30))])
    assert quote.total_minor == total
    transfer = quote.legs[1].transfer
    assert transfer is not None and transfer.rule == "fare_transfer_rules.txt:2"
    assert transfer.adjustment_minor == adjustment
    assert quote.legs[0].chain == quote.legs[1].chain


@pytest.mark.parametrize(("rules", "total"), [
    # type 0 twice: A + AB, then S + BC = 20 + 5 + 5
    ("metro,bus,,,,0,plus5\nbus,metro,,,,0,plus5", 2000 + 500 + 500),
    # type 1 twice: A + AB + B, then S + BC + C = 20 - 8 + 15 - 8 + 20
    ("metro,bus,,,,1,discount\nbus,metro,,,,1,discount", 2000 - 800 + 1500 - 800 + 2000),
    # type 2 twice: AB, then S + BC (the second does not replace S) = 25 + 25
    ("metro,bus,,,,2,combined\nbus,metro,,,,2,combined", 2500 + 2500),
    # no metro->bus rule: A and B are paid separately, then B > C type 2 replaces B: 20 + 25
    ("bus,metro,,,,2,combined", 2000 + 2500),
])
def test_three_legs_follow_the_reference_cost_table(tmp_path: Path, rules: str, total: int) -> None:
    engine = engine_with(tmp_path, rules)
    quote = engine.price_journey([metro(at(8), at(8, 20)), bus(at(8, 30), at(8, 45)), metro(at(8, 50), at(9, 10))])
    assert quote.total_minor == total


def test_a_discount_larger_than_the_journey_floors_it_at_zero(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "metro,bus,,,,0,big_discount")
    quote = engine.price_journey([metro(at(8), at(8, 20)), bus(at(8, 30))])
    # A + AB = 20 - 30 = -10: the journey is raised to 0, so the bus leg refunds the NT$20
    assert quote.total_minor == 0
    assert [leg.charged_minor for leg in quote.legs] == [2000, -2000]
    assert quote.legs[1].floor_adjustment_minor == 1000


# --- duration_limit_type ------------------------------------------------------------------
# metro 08:00 -> 08:30, then bus 08:50 -> 09:20:
#   type 0 departure -> arrival:   08:00 -> 09:20 = 4800 s
#   type 1 departure -> departure: 08:00 -> 08:50 = 3000 s
#   type 2 arrival -> departure:   08:30 -> 08:50 = 1200 s
#   type 3 arrival -> arrival:     08:30 -> 09:20 = 3000 s


@pytest.mark.parametrize(("limit_type", "elapsed_s"), [(0, 4800), (1, 3000), (2, 1200), (3, 3000)])
def test_each_duration_limit_type_measures_its_own_interval_inclusive(tmp_path: Path, limit_type: int, elapsed_s: int) -> None:
    journey = [metro(at(8), at(8, 30)), bus(at(8, 50), at(9, 20))]
    within = engine_with(tmp_path / "within", f"metro,bus,,{elapsed_s},{limit_type},1,discount")
    quote = within.price_journey(journey)
    assert quote.total_minor == 2000 - 800 + 1500  # 27: the discount applies at exactly the limit
    assert quote.legs[1].transfer is not None and quote.legs[1].transfer.elapsed_s == elapsed_s
    beyond = engine_with(tmp_path / "beyond", f"metro,bus,,{elapsed_s - 1},{limit_type},1,discount")
    quote = beyond.price_journey(journey)
    assert quote.total_minor == 2000 + 1500  # 35: one second short, no transfer
    assert quote.legs[1].transfer is None and quote.legs[1].chain == 1


def test_a_leg_validated_only_on_boarding_uses_its_boarding_as_its_arrival(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "bus,metro,,1200,3,1,discount")
    # bus boards 08:00 (no exit tap), metro 08:10 -> 08:20: arrival -> arrival = 08:00 -> 08:20 = 1200 s
    quote = engine.price_journey([bus(at(8)), metro(at(8, 10), at(8, 20))])
    assert quote.total_minor == 1500 - 800 + 2000


# --- transfer_count -----------------------------------------------------------------------


def buses(*starts: datetime) -> list[Leg]:
    return [bus(start) for start in starts]


def test_transfer_count_1_allows_one_transfer_then_starts_a_new_sub_journey(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "bus,bus,1,,,0,free")
    quote = engine.price_journey(buses(at(8), at(8, 10), at(8, 20), at(8, 30)))
    # 15, then transfer 1 free; the 2nd transfer exceeds the count: pay 15 and start anew,
    # so the next transfer is again the 1st of its sub-journey: free. 15 + 0 + 15 + 0
    assert quote.total_minor == 3000
    assert [leg.transfer.transfer_number if leg.transfer else None for leg in quote.legs] == [None, 1, None, 1]
    assert [leg.chain for leg in quote.legs] == [0, 0, 1, 1]


def test_transfer_count_2_and_minus_1(tmp_path: Path) -> None:
    two = engine_with(tmp_path / "two", "bus,bus,2,,,0,free")
    assert two.price_journey(buses(at(8), at(8, 10), at(8, 20), at(8, 30))).total_minor == 1500 + 0 + 0 + 1500
    unlimited = engine_with(tmp_path / "unlimited", "bus,bus,-1,,,0,free")
    quote = unlimited.price_journey(buses(at(8), at(8, 10), at(8, 20), at(8, 30), at(8, 40)))
    assert quote.total_minor == 1500  # -1: every transfer is free
    assert quote.legs[-1].transfer is not None and quote.legs[-1].transfer.transfer_number == 4


def test_transfer_count_0_is_not_a_valid_feed(tmp_path: Path) -> None:
    from services.fare_gate.fares import FeedError

    with pytest.raises(FeedError) as caught:
        engine_with(tmp_path, "bus,bus,0,,,0,free")
    assert [(p.file, p.line, p.field) for p in caught.value.problems] == [("fare_transfer_rules.txt", 2, "transfer_count")]


def test_the_smallest_transfer_count_that_covers_the_transfer_is_chosen(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "bus,bus,1,,,0,free\nbus,bus,-1,,,0,plus5")
    quote = engine.price_journey(buses(at(8), at(8, 10), at(8, 20), at(8, 30)))
    # transfer 1: both rules cover it; count 1 < unlimited -> free. Transfers 2 and 3: only
    # the unlimited rule -> NT$5 each. 15 + 0 + 5 + 5
    assert quote.total_minor == 2500
    assert [leg.transfer.rule if leg.transfer else None for leg in quote.legs] == [
        None, "fare_transfer_rules.txt:2", "fare_transfer_rules.txt:3", "fare_transfer_rules.txt:3"]


def test_a_repeated_rule_measures_its_duration_from_the_first_leg(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "bus,bus,-1,3600,1,0,free")
    quote = engine.price_journey(buses(at(8), at(8, 40), at(9, 10), at(9, 20)))
    # 08:40 is 2400 s after 08:00: free. 09:10 is 4200 s after 08:00 (not 1800 s after 08:40):
    # pay 15 and start anew; 09:20 is 600 s after 09:10: free. 15 + 0 + 15 + 0
    assert quote.total_minor == 3000
    assert [leg.transfer.elapsed_s if leg.transfer else None for leg in quote.legs] == [None, 2400, None, 600]


# --- which rules match --------------------------------------------------------------------


def test_an_empty_leg_group_matches_the_groups_no_rule_lists(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, ",bus,,,,0,free\nmetro,bus,,,,1,discount")
    # metro is listed as a from-group, so only its own rule applies: 20 - 8 + 15 = 27
    assert engine.price_journey([metro(at(8), at(8, 20)), bus(at(8, 30))]).total_minor == 2700
    # ferry is listed nowhere: the empty from-group rule applies: 30 + 0 = 30
    ferry = Leg("A", at(8), "B", at(8, 20), network_id="ferry")
    assert engine.price_journey([ferry, bus(at(8, 30))]).total_minor == 3000


def test_no_transfer_into_or_out_of_an_incomplete_leg(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "metro,bus,,,,1,discount\nbus,metro,,,,1,discount")
    # max fare for metro with no citytap_max_fares row: the dearest metro rule, NT$20
    quote = engine.price_journey([Leg("A", at(8), network_id="metro", incomplete=True), bus(at(8, 30))])
    assert quote.total_minor == 2000 + 1500
    assert all(leg.transfer is None for leg in quote.legs)


def test_a_transfer_whose_product_the_rider_cannot_use_does_not_apply(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, "metro,bus,,,,1,adult_only")
    journey = [metro(at(8), at(8, 20)), bus(at(8, 30))]
    assert engine.price_journey(journey, rider_category_id="adult").total_minor == 2000 - 800 + 1500
    assert engine.price_journey(journey, rider_category_id="child").total_minor == 2000 + 1500
