"""Feed loading and validation: every problem is reported with file, line and field.

Line numbers count the header as line 1, so the first record is line 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.fare_gate.fares import FeedError, Problem, check_feed, load_feed
from services.fare_gate.fares.currency import AmountError, format_minor, to_minor
from services.fare_gate.fares.testing import write_feed, zip_feed


def problems_of(tmp_path: Path, files: dict[str, str | None], *, base: bool = True) -> list[tuple]:
    feed, problems = check_feed(write_feed(tmp_path / "feed", files, base=base))
    assert feed is None, "a feed with problems must not be returned"
    return [(p.file, p.line, p.field) for p in problems]


def messages_of(tmp_path: Path, files: dict[str, str | None]) -> list[str]:
    _feed, problems = check_feed(write_feed(tmp_path / "feed", files))
    return [str(p) for p in problems]


# --- loading ----------------------------------------------------------------------------


def test_minimal_feed_loads_from_a_folder(tmp_path: Path) -> None:
    feed = load_feed(write_feed(tmp_path / "feed"))
    assert feed.settings.timezone == "Asia/Taipei"
    assert feed.currency == "TWD"
    # "10.00" TWD = 10 x 100 minor units
    assert feed.fare_products["flat"][0].amount_minor == 1000
    assert feed.routes["M1"].network_id == "metro"


def test_the_same_feed_loads_from_a_zip_top_level_or_one_folder_with_the_same_version(tmp_path: Path) -> None:
    folder = write_feed(tmp_path / "feed")
    from_folder = load_feed(folder)
    from_zip = load_feed(zip_feed(folder, tmp_path / "feed.zip"))
    nested = load_feed(zip_feed(folder, tmp_path / "nested.zip", inside="demo"))
    assert from_folder.version == from_zip.version == nested.version
    assert from_zip.name == "feed"


def test_a_path_that_does_not_exist_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(FeedError) as caught:
        load_feed(tmp_path / "nowhere")
    assert caught.value.problems[0].message == "no such folder or zip archive"
    assert caught.value.reason == "INVALID_FEED"


def test_feed_error_carries_every_problem_and_formats_file_line_field(tmp_path: Path) -> None:
    folder = write_feed(tmp_path / "feed", {
        "stops.txt": """
            stop_id,stop_name
            A,Stop A
            A,Again
            """,
        "fare_products.txt": """
            fare_product_id,amount,currency
            flat,ten,TWD
            """,
    })
    with pytest.raises(FeedError) as caught:
        load_feed(folder)
    rendered = [str(p) for p in caught.value.problems]
    assert "stops.txt:3:stop_id: duplicate stop_id: already defined on line 2" in rendered
    assert "fare_products.txt:2:amount: 'ten' is not a decimal amount such as 20 or 20.00" in rendered
    # fare_leg_rules.txt still names "flat", which no longer loads: reported too, not hidden.
    assert "fare_leg_rules.txt:2:fare_product_id: unknown fare_product_id (not in fare_products.txt) 'flat'" in rendered
    assert len(rendered) == 3


# --- missing files and columns -----------------------------------------------------------


def test_every_missing_required_file_is_reported(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {"citytap_settings.txt": "feed_timezone\nAsia/Taipei\n"}, base=False)
    for name in ("stops.txt", "routes.txt", "fare_products.txt", "fare_leg_rules.txt"):
        assert (name, None, None) in found


def test_a_missing_required_column_is_reported_on_the_header_line(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {"fare_products.txt": """
        fare_product_id,amount
        flat,10
        """})
    assert ("fare_products.txt", 1, "currency") in found


def test_a_row_with_the_wrong_number_of_values_is_reported(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {"routes.txt": """
        route_id,route_short_name
        M1,Metro 1,extra
        B1,Bus 1
        """})
    assert ("routes.txt", 2, None) in found


def test_an_empty_file_and_non_utf8_text_are_reported(tmp_path: Path) -> None:
    folder = write_feed(tmp_path / "feed", {"areas.txt": ""})
    (folder / "networks.txt").write_bytes(b"network_id\n\xff\xfe\n")
    _feed, problems = check_feed(folder)
    found = {(p.file, p.line, p.field) for p in problems}
    assert ("areas.txt", None, None) in found
    assert ("networks.txt", None, None) in found


def test_timezone_is_required_and_must_be_a_real_zone(tmp_path: Path) -> None:
    assert ("citytap_settings.txt", None, "feed_timezone") in problems_of(tmp_path / "1", {"citytap_settings.txt": None})
    assert ("citytap_settings.txt", 2, "feed_timezone") in problems_of(tmp_path / "2", {
        "citytap_settings.txt": "feed_timezone\nAsia/Atlantis\n"})


def test_agency_timezone_serves_when_settings_are_absent_and_must_agree_with_them(tmp_path: Path) -> None:
    feed = load_feed(write_feed(tmp_path / "ok", {
        "citytap_settings.txt": None,
        "agency.txt": "agency_id,agency_name,agency_url,agency_timezone\na,A,https://a.example,Europe/London\n",
    }))
    assert feed.settings.timezone == "Europe/London"
    assert ("citytap_settings.txt", 2, "feed_timezone") in problems_of(tmp_path / "bad", {
        "agency.txt": "agency_id,agency_name,agency_url,agency_timezone\na,A,https://a.example,Europe/London\n"})


# --- unknown references -----------------------------------------------------------------


def test_unknown_references_are_reported_with_file_line_and_field(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {
        "areas.txt": "area_id\nnorth\n",
        "stop_areas.txt": """
            area_id,stop_id
            north,A
            north,Z
            south,B
            """,
        "route_networks.txt": """
            network_id,route_id
            metro,M1
            tram,B1
            bus,X9
            """,
        "fare_leg_rules.txt": """
            leg_group_id,network_id,from_area_id,to_area_id,from_timeframe_group_id,fare_product_id
            g,ferry,north,east,peak,nothing
            """,
        "fare_transfer_rules.txt": """
            from_leg_group_id,to_leg_group_id,fare_transfer_type
            g,h,0
            """,
        "fare_leg_join_rules.txt": """
            from_network_id,to_network_id,from_stop_id,to_stop_id
            metro,metro,A,Q
            """,
        "citytap_max_fares.txt": "network_id,fare_product_id\nferry,flat\n",
    })
    expected = [
        ("stop_areas.txt", 3, "stop_id"),  # Z is no stop
        ("stop_areas.txt", 4, "area_id"),  # south is no area
        ("route_networks.txt", 3, "network_id"),  # tram is not in networks.txt
        ("route_networks.txt", 4, "route_id"),  # X9 is not in routes.txt
        ("fare_leg_rules.txt", 2, "network_id"),
        ("fare_leg_rules.txt", 2, "to_area_id"),
        ("fare_leg_rules.txt", 2, "from_timeframe_group_id"),
        ("fare_leg_rules.txt", 2, "fare_product_id"),
        ("fare_transfer_rules.txt", 2, "to_leg_group_id"),  # h names no leg rule; g did, on a broken rule
        ("fare_leg_join_rules.txt", 2, "to_stop_id"),
        ("citytap_max_fares.txt", 2, "network_id"),
    ]
    for item in expected:
        assert item in found, item


def test_products_may_only_name_known_rider_categories_and_fare_media(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {
        "rider_categories.txt": "rider_category_id,rider_category_name,is_default_fare_category\nadult,Adult,1\n",
        "fare_media.txt": "fare_media_id,fare_media_type\ncard,2\n",
        "fare_products.txt": """
            fare_product_id,rider_category_id,fare_media_id,amount,currency
            flat,adult,card,10,TWD
            flat,child,card,5,TWD
            flat,adult,token,10,TWD
            """,
    })
    assert ("fare_products.txt", 3, "rider_category_id") in found
    assert ("fare_products.txt", 4, "fare_media_id") in found


def test_networks_file_is_forbidden_when_routes_carry_network_id(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {"routes.txt": "route_id,network_id\nM1,metro\nB1,bus\n"})
    assert ("networks.txt", None, None) in found
    assert ("route_networks.txt", None, None) in found


def test_routes_network_id_column_alone_defines_networks(tmp_path: Path) -> None:
    feed = load_feed(write_feed(tmp_path / "feed", {
        "routes.txt": "route_id,network_id\nM1,metro\n", "networks.txt": None, "route_networks.txt": None,
        "fare_leg_rules.txt": "network_id,fare_product_id\nmetro,flat\n",
    }))
    assert feed.routes["M1"].network_id == "metro"


# --- times ------------------------------------------------------------------------------

CALENDAR = """
    service_id,monday,tuesday,wednesday,thursday,friday,saturday,sunday,start_date,end_date
    weekdays,1,1,1,1,1,0,0,20260101,20271231
    """


@pytest.mark.parametrize(("start", "end", "field", "message"), [
    ("8:00", "09:00:00", "start_time", "'8:00' is not a time in H:MM:SS or HH:MM:SS form"),
    ("07:61:00", "09:00:00", "start_time", "'07:61:00' is not a time in H:MM:SS or HH:MM:SS form"),
    # The GTFS reference forbids timeframe times past 24:00:00 (unlike stop_times).
    ("23:00:00", "25:00:00", "end_time", "25:00:00 is after 24:00:00, which this field forbids"),
    ("09:00:00", "07:00:00", "end_time", "end_time must be after start_time (a timeframe cannot wrap past midnight)"),
    ("07:00:00", "", "end_time", "start_time and end_time must be given together or both left empty"),
])
def test_bad_timeframe_times_are_reported(tmp_path: Path, start: str, end: str, field: str, message: str) -> None:
    rendered = messages_of(tmp_path, {
        "calendar.txt": CALENDAR,
        "timeframes.txt": f"timeframe_group_id,start_time,end_time,service_id\npeak,{start},{end},weekdays\n",
    })
    assert f"timeframes.txt:2:{field}: {message}" in rendered


def test_24_00_00_is_a_valid_end_and_empty_times_mean_the_whole_day(tmp_path: Path) -> None:
    feed = load_feed(write_feed(tmp_path / "feed", {
        "calendar.txt": CALENDAR,
        "timeframes.txt": """
            timeframe_group_id,start_time,end_time,service_id
            evening,19:00:00,24:00:00,weekdays
            allday,,,weekdays
            """,
    }))
    assert [(f.start_s, f.end_s) for f in feed.timeframes["evening"]] == [(19 * 3600, 24 * 3600)]
    assert [(f.start_s, f.end_s) for f in feed.timeframes["allday"]] == [(0, 24 * 3600)]


def test_overlapping_timeframes_of_one_group_and_service_are_reported(tmp_path: Path) -> None:
    rendered = messages_of(tmp_path, {
        "calendar.txt": CALENDAR,
        "timeframes.txt": """
            timeframe_group_id,start_time,end_time,service_id
            peak,07:00:00,09:00:00,weekdays
            peak,08:30:00,10:00:00,weekdays
            peak,09:00:00,10:00:00,weekdays
            offpeak,08:00:00,12:00:00,weekdays
            """,
    })
    # Line 3 overlaps line 2; line 4 starts exactly where line 2 ends (end is exclusive);
    # another group may overlap freely.
    assert rendered == ["timeframes.txt:3:start_time: overlaps timeframes.txt:2 in timeframe group 'peak' for service 'weekdays'"]


def test_timeframes_need_a_known_service_and_calendar_dates_must_be_real(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {
        "calendar.txt": CALENDAR.replace("20271231", "20261340"),
        "calendar_dates.txt": "service_id,date,exception_type\nweekdays,20261225,3\n",
        "timeframes.txt": "timeframe_group_id,start_time,end_time,service_id\npeak,07:00:00,09:00:00,holidays\n",
    })
    assert ("calendar.txt", 2, "end_date") in found
    assert ("calendar_dates.txt", 2, "exception_type") in found
    assert ("timeframes.txt", 2, "service_id") in found


def test_settings_times_and_weekdays_are_checked(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {"citytap_settings.txt": """
        feed_timezone,service_day_start,service_week_start,cap_incomplete_journeys
        Asia/Taipei,24:30:00,funday,2
        """})
    assert found == [("citytap_settings.txt", 2, "service_day_start"), ("citytap_settings.txt", 2, "service_week_start"),
                     ("citytap_settings.txt", 2, "cap_incomplete_journeys")]


# --- duplicate keys ---------------------------------------------------------------------


def test_duplicate_primary_keys_are_reported_on_the_second_line(tmp_path: Path) -> None:
    rendered = messages_of(tmp_path, {
        "fare_products.txt": """
            fare_product_id,amount,currency
            flat,10,TWD
            flat,12,TWD
            """,
        "fare_leg_rules.txt": """
            leg_group_id,network_id,fare_product_id
            g1,metro,flat
            g2,metro,flat
            """,
        "areas.txt": "area_id\nx\nx\n",
        "fare_transfer_rules.txt": """
            from_leg_group_id,to_leg_group_id,transfer_count,fare_transfer_type
            g1,g1,1,0
            g1,g1,1,1
            """,
    })
    assert "fare_products.txt:3:fare_product_id: duplicate fare_product_id, rider_category_id and fare_media_id: already defined on line 2" in rendered
    assert ("fare_leg_rules.txt:3:fare_product_id: duplicate rule (network, areas, timeframes and fare product; leg_group_id does not count): "
            "already defined on line 2") in rendered
    assert "areas.txt:3:area_id: duplicate area_id: already defined on line 2" in rendered
    # fare_transfer_type is not part of the key, so two rows for the same transfer clash.
    assert any(line.startswith("fare_transfer_rules.txt:3:from_leg_group_id: duplicate transfer rule") for line in rendered)


def test_stop_distances_are_unordered_pairs(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {"citytap_stop_distances.txt": """
        from_stop_id,to_stop_id,distance_m
        A,B,1000
        B,A,1000
        C,C,5
        C,D,0
        """})
    assert found == [("citytap_stop_distances.txt", 3, "to_stop_id"), ("citytap_stop_distances.txt", 4, "to_stop_id"),
                     ("citytap_stop_distances.txt", 5, "distance_m")]


# --- amounts and currencies -------------------------------------------------------------


@pytest.mark.parametrize(("amount", "currency", "field", "message"), [
    ("20.005", "TWD", "amount", "20.005 TWD is not a whole number of minor units (TWD has 2 decimal places)"),
    ("10.5", "JPY", "amount", "10.5 JPY is not a whole number of minor units (JPY has 0 decimal places)"),
    ("1e3", "TWD", "amount", "'1e3' is not a decimal amount such as 20 or 20.00"),
    ("20", "NTD", "currency", "'NTD' is not an ISO 4217 currency code this engine knows (such as TWD)"),
    ("20", "twd", "currency", "'twd' is not an ISO 4217 currency code this engine knows (such as TWD)"),
    ("", "TWD", "amount", "required value is empty"),
])
def test_bad_amounts_are_refused_not_rounded(tmp_path: Path, amount: str, currency: str, field: str, message: str) -> None:
    rendered = messages_of(tmp_path, {"fare_products.txt": f"fare_product_id,amount,currency\nflat,{amount},{currency}\n"})
    assert rendered[0] == f"fare_products.txt:2:{field}: {message}"


def test_a_feed_prices_in_one_currency(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {
        "fare_products.txt": "fare_product_id,amount,currency\nflat,10,TWD\nother,3,USD\n",
        "citytap_fare_caps.txt": "fare_cap_id,cap_period,amount,currency\nday,0,150,JPY\nweek,1,0,TWD\n",
    })
    assert ("fare_products.txt", 3, "currency") in found
    assert ("citytap_fare_caps.txt", 2, "currency") in found
    assert ("citytap_fare_caps.txt", 3, "amount") in found  # a cap of zero caps nothing


@pytest.mark.parametrize(("amount", "currency", "minor"), [
    ("20", "TWD", 2000),  # NT$20 = 20 x 100
    ("20.00", "TWD", 2000),
    ("12.5", "TWD", 1250),
    ("-8.00", "TWD", -800),  # negative: a transfer discount
    ("0", "TWD", 0),
    ("150", "JPY", 150),  # yen have no minor unit
    ("1.234", "KWD", 1234),  # three decimal places
])
def test_amounts_become_exact_minor_units(amount: str, currency: str, minor: int) -> None:
    assert to_minor(amount, currency) == minor


def test_amounts_past_int64_are_refused_and_minor_units_format_for_people() -> None:
    with pytest.raises(AmountError):
        to_minor("92233720368547758.08", "TWD")
    assert format_minor(2000, "TWD") == "NT$20.00"
    assert format_minor(-640, "TWD") == "-NT$6.40"
    assert format_minor(1_000_000, "TWD") == "NT$10,000.00"
    assert format_minor(150, "JPY") == "150 JPY"


# --- enums and conditional fields ---------------------------------------------------------


def test_bad_enum_values_are_reported(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {
        "fare_media.txt": "fare_media_id,fare_media_type\ncard,7\n",
        "rider_categories.txt": "rider_category_id,rider_category_name,is_default_fare_category\nadult,Adult,2\n",
        "fare_leg_rules.txt": "leg_group_id,fare_product_id,rule_priority\ng,flat,-1\n",
        "fare_transfer_rules.txt": """
            from_leg_group_id,to_leg_group_id,duration_limit,duration_limit_type,fare_transfer_type
            g,h,60,4,3
            """,
        "citytap_fare_caps.txt": "fare_cap_id,cap_period,amount,currency\nday,2,150,TWD\n",
    })
    for item in [("fare_media.txt", 2, "fare_media_type"), ("rider_categories.txt", 2, "is_default_fare_category"),
                 ("fare_leg_rules.txt", 2, "rule_priority"), ("fare_transfer_rules.txt", 2, "duration_limit_type"),
                 ("fare_transfer_rules.txt", 2, "fare_transfer_type"), ("citytap_fare_caps.txt", 2, "cap_period")]:
        assert item in found, item


def test_transfer_count_rules_follow_the_reference(tmp_path: Path) -> None:
    rendered = messages_of(tmp_path, {
        "fare_leg_rules.txt": "leg_group_id,network_id,fare_product_id\nm,metro,flat\nb,bus,flat\n",
        "fare_transfer_rules.txt": """
            from_leg_group_id,to_leg_group_id,transfer_count,duration_limit,duration_limit_type,fare_transfer_type
            b,b,0,,,0
            b,b,,,,0
            m,b,1,,,0
            m,b,,600,,0
            b,m,,,1,0
            b,b,-2,,,0
            """,
    })
    assert rendered == [
        "fare_transfer_rules.txt:2:transfer_count: 0 is not allowed: use -1 for no limit or 1 or more",
        "fare_transfer_rules.txt:3:transfer_count: required when from_leg_group_id equals to_leg_group_id",
        "fare_transfer_rules.txt:4:transfer_count: forbidden when from_leg_group_id differs from to_leg_group_id",
        "fare_transfer_rules.txt:5:duration_limit_type: required when duration_limit is given",
        "fare_transfer_rules.txt:6:duration_limit_type: forbidden when duration_limit is empty",
        "fare_transfer_rules.txt:7:transfer_count: -2 is below the minimum -1",
    ]


def test_a_product_shared_by_categories_needs_exactly_one_default(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {
        "rider_categories.txt": """
            rider_category_id,rider_category_name,is_default_fare_category
            adult,Adult,0
            child,Child,0
            """,
        "fare_products.txt": "fare_product_id,rider_category_id,amount,currency\nflat,adult,10,TWD\nflat,child,5,TWD\n",
    })
    assert found == [("fare_products.txt", 2, "rider_category_id")]


def test_conditional_fields_of_stops_and_join_rules(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {
        "stops.txt": """
            stop_id,stop_name,stop_lat,stop_lon,parent_station
            A,Stop A,25.0,,
            B,Stop B,95.0,121.5,
            C,Stop C,25.0,121.5,NOPE
            """,
        "fare_leg_join_rules.txt": "from_network_id,to_network_id,from_stop_id,to_stop_id\nmetro,metro,A,\n",
    })
    assert ("stops.txt", 2, "stop_lon") in found
    assert ("stops.txt", 3, "stop_lat") in found
    assert ("stops.txt", 4, "parent_station") in found
    assert ("fare_leg_join_rules.txt", 2, "to_stop_id") in found


# --- extension files --------------------------------------------------------------------


def test_distance_bands_must_not_overlap_and_must_grow(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {"citytap_distance_fares.txt": """
        network_id,min_distance_m,max_distance_m,fare_product_id
        metro,0,5000,flat
        metro,4000,8000,flat
        metro,9000,9000,flat
        bus,0,,flat
        bus,100,200,flat
        """})
    assert found == [("citytap_distance_fares.txt", 4, "max_distance_m"),  # 9000 is not above 9000
                     ("citytap_distance_fares.txt", 3, "min_distance_m"),  # 4000 < 5000: overlaps line 2
                     ("citytap_distance_fares.txt", 6, "min_distance_m")]  # the open-ended band swallows it


def test_caps_and_max_fares_are_checked(tmp_path: Path) -> None:
    found = problems_of(tmp_path, {
        "citytap_fare_caps.txt": """
            fare_cap_id,rider_category_id,cap_period,amount,currency
            day,,0,150,TWD
            day,,1,600,TWD
            day2,,0,140,TWD
            kid,child,0,50,TWD
            """,
        "citytap_max_fares.txt": "network_id,fare_product_id,incomplete_after_s\nmetro,flat,0\nmetro,nothing,60\n",
    })
    assert found == [
        ("citytap_fare_caps.txt", 3, "fare_cap_id"),  # the id is taken
        ("citytap_fare_caps.txt", 4, "cap_period"),  # a second day cap for the same riders
        ("citytap_fare_caps.txt", 5, "rider_category_id"),
        ("citytap_max_fares.txt", 2, "incomplete_after_s"),
        ("citytap_max_fares.txt", 3, "fare_product_id"),
    ]


def test_problem_str_without_line_or_field() -> None:
    assert str(Problem("stops.txt", None, None, "required file is missing")) == "stops.txt: required file is missing"
    assert str(Problem("a.txt", 3, None, "m")) == "a.txt:3: m"


def test_the_fare_engine_imports_no_vendor_sdk() -> None:
    import subprocess
    import sys

    code = ("import sys, services.fare_gate.fares, services.fare_gate.fares.cli; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in {'grpc', 'kafka', 'redis', 'psycopg', 'stripe', 'google'}))")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
