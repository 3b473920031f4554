"""Loading and validating a feed: every problem is found and reported, then nothing is served.

`load_feed(path)` reads the files (folder or zip), parses each one, checks every value and
every reference between files, and either returns a `Feed` or raises `FeedError` listing
every problem as (file, line, field, message). `check_feed(path)` returns the problems
instead of raising, for the `validate` command.

What is checked, beyond the column types of each file:
- required files (stops, routes, fare_products, fare_leg_rules) and required columns;
- duplicate primary keys, as the GTFS reference defines them per file;
- every foreign id (stops, routes, networks, areas, timeframes, services, rider categories,
  fare media, fare products, leg groups) refers to something that exists;
- amounts are whole minor units of a known ISO 4217 currency, one currency per feed;
- timeframes: start and end given together, at most 24:00:00, start before end, no overlap
  within a timeframe group and service;
- transfer rules: transfer_count required exactly when the two leg groups are equal, never
  0; duration_limit_type required exactly when duration_limit is given;
- rider categories: exactly one default among the categories sharing a fare product;
- the CityTap extension files (see FARES.md): settings, distance bands that do not overlap,
  stop distances, caps and maximum fares.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.fare_gate.fares import currency as money
from services.fare_gate.fares.errors import FeedError, Problem
from services.fare_gate.fares.model import (
    Area,
    CapPeriod,
    DistanceFareRule,
    DurationLimitType,
    FareCap,
    FareLegJoinRule,
    FareLegRule,
    FareMedia,
    FareMediaType,
    FareProduct,
    FareTransferRule,
    FareTransferType,
    Feed,
    FeedSettings,
    MaxFare,
    Network,
    RiderCategory,
    Route,
    Service,
    Stop,
    Timeframe,
)
from services.fare_gate.fares.source import read_feed_files
from services.fare_gate.fares.timeutil import WEEKDAYS, parse_date, parse_time

REQUIRED_FILES = ("stops.txt", "routes.txt", "fare_products.txt", "fare_leg_rules.txt")
DAY_S = 24 * 3600
# The most rows one file may hold; a feed beyond it is refused rather than slowly loaded.
ROWS_PER_FILE_MAX = 200_000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Row:
    file: str
    line: int
    values: dict[str, str]

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    header: tuple[str, ...]
    rows: tuple[Row, ...]


def load_feed(path: str | Path) -> Feed:
    """Load and validate the feed at `path` (a folder or a .zip); FeedError if anything is wrong."""
    feed, problems = check_feed(path)
    if problems or feed is None:
        raise FeedError(problems)
    return feed


def check_feed(path: str | Path) -> tuple[Feed | None, list[Problem]]:
    """Load the feed at `path` and return it with every problem found (the feed is None if any)."""
    files, problems = read_feed_files(path)
    name = Path(path).stem if Path(path).suffix == ".zip" else Path(path).name
    if problems:
        return None, problems
    loader = _Loader(name, files)
    feed = loader.load()
    if loader.problems:
        return None, loader.problems
    return feed, []


class _Loader:
    """Parses one feed, collecting problems instead of stopping at the first."""

    def __init__(self, name: str, files: dict[str, bytes]) -> None:
        self.name = name
        self.files = files
        self.problems: list[Problem] = []

    # --- reporting and reading -----------------------------------------------------------

    def problem(self, file: str, line: int | None, field: str | None, message: str) -> None:
        self.problems.append(Problem(file, line, field, message))

    def row_problem(self, row: Row, field: str | None, message: str) -> None:
        self.problem(row.file, row.line, field, message)

    def table(self, name: str, required_columns: Iterable[str] = ()) -> Table | None:
        """Parse `name` if present (None if absent); report a missing required column once."""
        data = self.files.get(name)
        if data is None:
            if name in REQUIRED_FILES:
                self.problem(name, None, None, "required file is missing")
            return None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            self.problem(name, None, None, f"is not UTF-8 text ({exc.reason} at byte {exc.start})")
            return None
        reader = csv.reader(io.StringIO(text, newline=""))
        header: tuple[str, ...] | None = None
        rows: list[Row] = []
        try:
            for cells in reader:
                line = reader.line_num
                if header is None:
                    header = tuple(cell.strip() for cell in cells)
                    seen: set[str] = set()
                    for column in header:
                        if column in seen:
                            self.problem(name, line, column, "column appears twice in the header")
                        seen.add(column)
                    continue
                if not any(cell.strip() for cell in cells):
                    continue  # blank lines are allowed and ignored
                if len(cells) != len(header):
                    self.problem(name, line, None, f"has {len(cells)} values but the header has {len(header)} columns")
                    continue
                if len(rows) >= ROWS_PER_FILE_MAX:
                    self.problem(name, line, None, f"more than {ROWS_PER_FILE_MAX} rows")
                    break
                rows.append(Row(name, line, {column: cell.strip() for column, cell in zip(header, cells)}))
        except csv.Error as exc:
            self.problem(name, reader.line_num, None, f"is not valid CSV: {exc}")
            return None
        if header is None or not any(header):
            self.problem(name, None, None, "is empty: the first line must name the columns")
            return None
        missing = [column for column in required_columns if column not in header]
        for column in missing:
            self.problem(name, 1, column, "required column is missing from the header")
        if missing:
            return Table(name, header, ())
        return Table(name, header, tuple(rows))

    # --- field parsers: each reports its own problem and returns None on failure ----------

    def required(self, row: Row, field: str) -> str | None:
        value = row.values.get(field, "")
        if not value:
            self.row_problem(row, field, "required value is empty")
            return None
        return value

    @staticmethod
    def optional(row: Row, field: str) -> str | None:
        return row.values.get(field, "") or None

    def integer(self, row: Row, field: str, *, minimum: int | None = None, required: bool = False,
                allowed: Iterable[int] | None = None) -> int | None:
        text = self.required(row, field) if required else self.optional(row, field)
        if text is None:
            return None
        try:
            value = int(text)
        except ValueError:
            self.row_problem(row, field, f"{text!r} is not an integer")
            return None
        if allowed is not None and value not in set(allowed):
            self.row_problem(row, field, f"{value} is not one of {', '.join(str(a) for a in sorted(set(allowed)))}")
            return None
        if minimum is not None and value < minimum:
            self.row_problem(row, field, f"{value} is below the minimum {minimum}")
            return None
        return value

    def enum(self, row: Row, field: str, kind: Callable[[int], T], allowed: Iterable[int], *,
             required: bool = True) -> T | None:
        value = self.integer(row, field, required=required, allowed=allowed)
        return None if value is None else kind(value)

    def time_of_day(self, row: Row, field: str, *, maximum_s: int = DAY_S) -> int | None:
        text = self.optional(row, field)
        if text is None:
            return None
        try:
            seconds = parse_time(text)
        except ValueError as exc:
            self.row_problem(row, field, str(exc))
            return None
        if seconds > maximum_s:
            self.row_problem(row, field, f"{text} is after 24:00:00, which this field forbids")
            return None
        return seconds

    def day(self, row: Row, field: str) -> date | None:
        text = self.required(row, field)
        if text is None:
            return None
        try:
            return parse_date(text)
        except ValueError as exc:
            self.row_problem(row, field, str(exc))
            return None

    def coordinate(self, row: Row, field: str, limit: float) -> float | None:
        text = self.optional(row, field)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            self.row_problem(row, field, f"{text!r} is not a number")
            return None
        if not -limit <= value <= limit:
            self.row_problem(row, field, f"{value} is outside -{limit:g}..{limit:g}")
            return None
        return value

    def reference(self, row: Row, field: str, value: str | None, known: Iterable[str] | dict, what: str) -> bool:
        if value is not None and value not in known:
            self.row_problem(row, field, f"unknown {what} {value!r}")
            return False
        return True

    def unique(self, seen: dict, key: object, row: Row, field: str | None, what: str) -> bool:
        first = seen.get(key)
        if first is not None:
            self.row_problem(row, field, f"duplicate {what}: already defined on line {first}")
            return False
        seen[key] = row.line
        return True

    def amount(self, row: Row, amount_field: str, currency_field: str) -> tuple[int, str] | None:
        amount_text = self.required(row, amount_field)
        code = self.required(row, currency_field)
        if code is not None:
            try:
                money.exponent(code)
            except money.AmountError as exc:
                self.row_problem(row, currency_field, str(exc))
                code = None
        if amount_text is None or code is None:
            return None
        try:
            return money.to_minor(amount_text, code), code
        except money.AmountError as exc:
            self.row_problem(row, amount_field, str(exc))
            return None

    def duration_limit(self, row: Row) -> tuple[int | None, DurationLimitType | None, bool]:
        """duration_limit and duration_limit_type, which come together or not at all."""
        limit = self.integer(row, "duration_limit", minimum=1)
        limit_type = self.enum(row, "duration_limit_type", DurationLimitType, range(4), required=False)
        limit_text = self.optional(row, "duration_limit")
        type_text = self.optional(row, "duration_limit_type")
        if (limit_text is not None and limit is None) or (type_text is not None and limit_type is None):
            return None, None, False
        if limit_text is not None and type_text is None:
            self.row_problem(row, "duration_limit_type", "required when duration_limit is given")
            return None, None, False
        if limit_text is None and type_text is not None:
            self.row_problem(row, "duration_limit_type", "forbidden when duration_limit is empty")
            return None, None, False
        return limit, limit_type, True

    # --- the feed ------------------------------------------------------------------------

    def load(self) -> Feed | None:
        settings = self.load_settings()
        stops = self.load_stops()
        routes, route_network_column = self.load_routes()
        networks = self.load_networks(route_network_column)
        routes = self.load_route_networks(routes, networks, route_network_column)
        known_networks = set(networks) | {route.network_id for route in routes.values() if route.network_id}
        areas = self.load_areas()
        stop_areas = self.load_stop_areas(areas, stops)
        services = self.load_services()
        timeframes = self.load_timeframes(services)
        categories = self.load_rider_categories()
        media = self.load_fare_media()
        products, currency = self.load_fare_products(categories, media)
        leg_rules, has_priority = self.load_fare_leg_rules(known_networks, areas, timeframes, products)
        distance_rules = self.load_distance_fares(known_networks, products)
        stop_distances = self.load_stop_distances(stops)
        join_rules = self.load_fare_leg_join_rules(known_networks, stops)
        leg_groups = {rule.leg_group_id for rule in leg_rules if rule.leg_group_id}
        leg_groups |= {rule.leg_group_id for rule in distance_rules if rule.leg_group_id}
        transfer_rules = self.load_fare_transfer_rules(leg_groups, products)
        caps = self.load_fare_caps(categories, media, currency)
        max_fares = self.load_max_fares(known_networks, products)
        if self.problems or settings is None:
            return None
        digest = hashlib.sha256()
        for file_name in sorted(self.files):
            digest.update(file_name.encode() + b"\0" + self.files[file_name] + b"\0")
        return Feed(
            name=self.name,
            version=digest.hexdigest()[:16],
            currency=currency or "TWD",
            settings=settings,
            stops=stops,
            routes=routes,
            networks=networks,
            areas=areas,
            stop_areas=stop_areas,
            fare_media=media,
            rider_categories=categories,
            fare_products=products,
            services=services,
            timeframes=timeframes,
            fare_leg_rules=leg_rules,
            leg_rules_have_priority=has_priority,
            fare_leg_join_rules=join_rules,
            fare_transfer_rules=transfer_rules,
            distance_fare_rules=distance_rules,
            stop_distances=stop_distances,
            fare_caps=caps,
            max_fares=max_fares,
            files=tuple(sorted(self.files)),
        )

    def load_settings(self) -> FeedSettings | None:
        agency_zone: str | None = None
        agency = self.table("agency.txt", ("agency_timezone",))
        if agency is not None:
            for row in agency.rows:
                zone = self.required(row, "agency_timezone")
                if zone and agency_zone and zone != agency_zone:
                    self.row_problem(row, "agency_timezone", f"{zone} differs from {agency_zone}: all agencies must share one timezone")
                agency_zone = agency_zone or zone
        table = self.table("citytap_settings.txt")
        values: dict[str, object] = {}
        zone_source: tuple[str, int | None, str] = ("agency.txt", None, "agency_timezone")
        if table is not None:
            if len(table.rows) > 1:
                self.problem(table.name, table.rows[1].line, None, "must hold exactly one row of settings")
            if table.rows:
                row = table.rows[0]
                values["source"] = row.source
                zone = self.optional(row, "feed_timezone")
                if zone:
                    if agency_zone and zone != agency_zone:
                        self.row_problem(row, "feed_timezone", f"{zone} differs from agency.txt's {agency_zone}")
                    agency_zone = zone
                    zone_source = (row.file, row.line, "feed_timezone")
                start = self.time_of_day(row, "service_day_start", maximum_s=DAY_S - 1)
                if start is not None:
                    values["service_day_start_s"] = start
                week = self.optional(row, "service_week_start")
                if week is not None:
                    if week.lower() in WEEKDAYS:
                        values["service_week_start"] = WEEKDAYS.index(week.lower())
                    else:
                        self.row_problem(row, "service_week_start", f"{week!r} is not a weekday name such as monday")
                capped = self.integer(row, "cap_incomplete_journeys", allowed=(0, 1))
                if capped is not None:
                    values["cap_incomplete_journeys"] = bool(capped)
        if agency_zone is None:
            self.problem("citytap_settings.txt", None, "feed_timezone",
                         "the feed has no timezone: give agency.txt agency_timezone or citytap_settings.txt feed_timezone")
            return None
        try:
            ZoneInfo(agency_zone)
        except (ZoneInfoNotFoundError, ValueError):
            self.problem(*zone_source, f"{agency_zone!r} is not an IANA timezone such as Asia/Taipei")
            return None
        return FeedSettings(timezone=agency_zone, **values)  # type: ignore[arg-type]

    def load_stops(self) -> dict[str, Stop]:
        stops: dict[str, Stop] = {}
        table = self.table("stops.txt", ("stop_id",))
        if table is None:
            return stops
        seen: dict = {}
        parents: list[tuple[Row, str]] = []
        for row in table.rows:
            stop_id = self.required(row, "stop_id")
            lat = self.coordinate(row, "stop_lat", 90.0)
            lon = self.coordinate(row, "stop_lon", 180.0)
            lat_given = self.optional(row, "stop_lat") is not None
            if lat_given != (self.optional(row, "stop_lon") is not None):
                self.row_problem(row, "stop_lon" if lat_given else "stop_lat", "stop_lat and stop_lon must be given together")
            if lat is None or lon is None:
                lat = lon = None
            parent = self.optional(row, "parent_station")
            if stop_id is None or not self.unique(seen, stop_id, row, "stop_id", "stop_id"):
                continue
            if parent:
                parents.append((row, parent))
            stops[stop_id] = Stop(stop_id, self.optional(row, "stop_name") or stop_id, lat, lon, parent, row.source)
        for row, parent in parents:
            self.reference(row, "parent_station", parent, stops, "stop")
        return stops

    def load_routes(self) -> tuple[dict[str, Route], bool]:
        routes: dict[str, Route] = {}
        table = self.table("routes.txt", ("route_id",))
        if table is None:
            return routes, False
        seen: dict = {}
        for row in table.rows:
            route_id = self.required(row, "route_id")
            if route_id is None or not self.unique(seen, route_id, row, "route_id", "route_id"):
                continue
            name = self.optional(row, "route_short_name") or self.optional(row, "route_long_name") or route_id
            routes[route_id] = Route(route_id, name, self.optional(row, "network_id"), row.source)
        return routes, "network_id" in table.header

    def load_networks(self, route_network_column: bool) -> dict[str, Network]:
        networks: dict[str, Network] = {}
        table = self.table("networks.txt", ("network_id",))
        if table is None:
            return networks
        if route_network_column:
            self.problem(table.name, None, None, "must not exist when routes.txt has a network_id column")
        seen: dict = {}
        for row in table.rows:
            network_id = self.required(row, "network_id")
            if network_id is None or not self.unique(seen, network_id, row, "network_id", "network_id"):
                continue
            networks[network_id] = Network(network_id, self.optional(row, "network_name") or network_id, row.source)
        return networks

    def load_route_networks(self, routes: dict[str, Route], networks: dict[str, Network],
                            route_network_column: bool) -> dict[str, Route]:
        table = self.table("route_networks.txt", ("network_id", "route_id"))
        if table is None:
            return routes
        if route_network_column:
            self.problem(table.name, None, None, "must not exist when routes.txt has a network_id column")
        seen: dict = {}
        updated = dict(routes)
        for row in table.rows:
            network_id = self.required(row, "network_id")
            route_id = self.required(row, "route_id")
            ok = self.reference(row, "network_id", network_id, networks, "network_id (not in networks.txt)")
            ok = self.reference(row, "route_id", route_id, routes, "route_id (not in routes.txt)") and ok
            if network_id is None or route_id is None or not ok:
                continue
            if not self.unique(seen, route_id, row, "route_id", "route_id (a route belongs to one network)"):
                continue
            route = routes[route_id]
            updated[route_id] = Route(route.route_id, route.route_name, network_id, route.source)
        return updated

    def load_areas(self) -> dict[str, Area]:
        areas: dict[str, Area] = {}
        table = self.table("areas.txt", ("area_id",))
        if table is None:
            return areas
        seen: dict = {}
        for row in table.rows:
            area_id = self.required(row, "area_id")
            if area_id is None or not self.unique(seen, area_id, row, "area_id", "area_id"):
                continue
            areas[area_id] = Area(area_id, self.optional(row, "area_name") or area_id, row.source)
        return areas

    def load_stop_areas(self, areas: dict[str, Area], stops: dict[str, Stop]) -> dict[str, frozenset[str]]:
        table = self.table("stop_areas.txt", ("area_id", "stop_id"))
        assigned: dict[str, set[str]] = defaultdict(set)
        if table is None:
            return {}
        seen: dict = {}
        for row in table.rows:
            area_id = self.required(row, "area_id")
            stop_id = self.required(row, "stop_id")
            ok = self.reference(row, "area_id", area_id, areas, "area_id (not in areas.txt)")
            ok = self.reference(row, "stop_id", stop_id, stops, "stop_id (not in stops.txt)") and ok
            if area_id is None or stop_id is None or not ok:
                continue
            if self.unique(seen, (area_id, stop_id), row, "stop_id", "stop_areas row"):
                assigned[stop_id].add(area_id)
        return {stop_id: frozenset(ids) for stop_id, ids in assigned.items()}

    def load_services(self) -> dict[str, Service]:
        services: dict[str, Service] = {}
        calendar = self.table("calendar.txt", ("service_id", *WEEKDAYS, "start_date", "end_date"))
        if calendar is not None:
            seen: dict = {}
            for row in calendar.rows:
                service_id = self.required(row, "service_id")
                flags = [self.integer(row, day, required=True, allowed=(0, 1)) for day in WEEKDAYS]
                start = self.day(row, "start_date")
                end = self.day(row, "end_date")
                if start and end and end < start:
                    self.row_problem(row, "end_date", "end_date is before start_date")
                if service_id is None or None in flags or start is None or end is None:
                    continue
                if self.unique(seen, service_id, row, "service_id", "service_id"):
                    services[service_id] = Service(service_id, tuple(bool(f) for f in flags), start, end)  # type: ignore[arg-type]
        dates = self.table("calendar_dates.txt", ("service_id", "date", "exception_type"))
        if dates is not None:
            added: dict[str, set[date]] = defaultdict(set)
            removed: dict[str, set[date]] = defaultdict(set)
            seen = {}
            for row in dates.rows:
                service_id = self.required(row, "service_id")
                day = self.day(row, "date")
                kind = self.integer(row, "exception_type", required=True, allowed=(1, 2))
                if service_id is None or day is None or kind is None:
                    continue
                if self.unique(seen, (service_id, day), row, "date", "service_id and date"):
                    (added if kind == 1 else removed)[service_id].add(day)
            for service_id in set(added) | set(removed):
                base = services.get(service_id, Service(service_id, (False,) * 7, None, None))  # type: ignore[arg-type]
                services[service_id] = Service(base.service_id, base.weekdays, base.start_date, base.end_date,
                                               frozenset(added[service_id]), frozenset(removed[service_id]))
        return services

    def load_timeframes(self, services: dict[str, Service]) -> dict[str, tuple[Timeframe, ...]]:
        table = self.table("timeframes.txt", ("timeframe_group_id", "service_id"))
        groups: dict[str, list[Timeframe]] = defaultdict(list)
        if table is None:
            return {}
        seen: dict = {}
        for row in table.rows:
            group = self.required(row, "timeframe_group_id")
            service_id = self.required(row, "service_id")
            has_start = self.optional(row, "start_time") is not None
            has_end = self.optional(row, "end_time") is not None
            start = self.time_of_day(row, "start_time")
            end = self.time_of_day(row, "end_time")
            bad = False
            if has_start != has_end:
                self.row_problem(row, "end_time" if has_start else "start_time",
                                 "start_time and end_time must be given together or both left empty")
                bad = True
            if (has_start and start is None) or (has_end and end is None):
                bad = True
            start_s = 0 if start is None else start
            end_s = DAY_S if end is None else end
            if not bad and start_s >= end_s:
                self.row_problem(row, "end_time", "end_time must be after start_time (a timeframe cannot wrap past midnight)")
                bad = True
            ok = self.reference(row, "service_id", service_id, services, "service_id (not in calendar.txt or calendar_dates.txt)")
            if group is None or service_id is None or bad or not ok:
                continue
            if not self.unique(seen, (group, start_s, end_s, service_id), row, "timeframe_group_id", "timeframes row"):
                continue
            for other in groups[group]:
                if other.service_id == service_id and start_s < other.end_s and other.start_s < end_s:
                    self.row_problem(row, "start_time", f"overlaps {other.source} in timeframe group {group!r} for service {service_id!r}")
                    bad = True
                    break
            if not bad:
                groups[group].append(Timeframe(group, start_s, end_s, service_id, row.source))
        return {group: tuple(frames) for group, frames in groups.items()}

    def load_rider_categories(self) -> dict[str, RiderCategory]:
        categories: dict[str, RiderCategory] = {}
        table = self.table("rider_categories.txt", ("rider_category_id", "rider_category_name"))
        if table is None:
            return categories
        seen: dict = {}
        for row in table.rows:
            category_id = self.required(row, "rider_category_id")
            name = self.required(row, "rider_category_name")
            default = self.integer(row, "is_default_fare_category", allowed=(0, 1))
            if category_id is None or name is None:
                continue
            if self.unique(seen, category_id, row, "rider_category_id", "rider_category_id"):
                categories[category_id] = RiderCategory(category_id, name, default == 1,
                                                        self.optional(row, "eligibility_url") or "", row.source)
        return categories

    def load_fare_media(self) -> dict[str, FareMedia]:
        media: dict[str, FareMedia] = {}
        table = self.table("fare_media.txt", ("fare_media_id", "fare_media_type"))
        if table is None:
            return media
        seen: dict = {}
        for row in table.rows:
            media_id = self.required(row, "fare_media_id")
            kind = self.enum(row, "fare_media_type", FareMediaType, range(5))
            if media_id is None or kind is None:
                continue
            if self.unique(seen, media_id, row, "fare_media_id", "fare_media_id"):
                media[media_id] = FareMedia(media_id, self.optional(row, "fare_media_name") or media_id, kind, row.source)
        return media

    def load_fare_products(self, categories: dict[str, RiderCategory],
                           media: dict[str, FareMedia]) -> tuple[dict[str, tuple[FareProduct, ...]], str | None]:
        products: dict[str, list[FareProduct]] = defaultdict(list)
        table = self.table("fare_products.txt", ("fare_product_id", "amount", "currency"))
        feed_currency: tuple[str, str] | None = None
        if table is None:
            return {}, None
        seen: dict = {}
        for row in table.rows:
            product_id = self.required(row, "fare_product_id")
            category = self.optional(row, "rider_category_id")
            media_id = self.optional(row, "fare_media_id")
            ok = self.reference(row, "rider_category_id", category, categories, "rider_category_id (not in rider_categories.txt)")
            ok = self.reference(row, "fare_media_id", media_id, media, "fare_media_id (not in fare_media.txt)") and ok
            priced = self.amount(row, "amount", "currency")
            if priced is not None:
                if feed_currency is None:
                    feed_currency = (priced[1], row.source)
                elif priced[1] != feed_currency[0]:
                    self.row_problem(row, "currency", f"{priced[1]} differs from {feed_currency[0]} ({feed_currency[1]}): a feed prices in one currency")
                    ok = False
            if product_id is None or priced is None or not ok:
                continue
            if self.unique(seen, (product_id, category, media_id), row, "fare_product_id",
                           "fare_product_id, rider_category_id and fare_media_id"):
                products[product_id].append(FareProduct(product_id, self.optional(row, "fare_product_name") or product_id,
                                                        category, media_id, priced[0], priced[1], row.source))
        for product_id, rows in products.items():
            eligible = {row.rider_category_id for row in rows if row.rider_category_id}
            if len(eligible) > 1:
                defaults = sorted(c for c in eligible if categories[c].is_default_fare_category)
                if len(defaults) != 1:
                    self.problem(table.name, int(rows[0].source.rsplit(":", 1)[1]), "rider_category_id",
                                 f"fare product {product_id!r} is for categories {', '.join(sorted(eligible))}; exactly one of "
                                 f"them must have is_default_fare_category=1, found {len(defaults)}")
        return {product_id: tuple(rows) for product_id, rows in products.items()}, feed_currency[0] if feed_currency else None

    def load_fare_leg_rules(self, networks: set[str], areas: dict[str, Area], timeframes: dict[str, tuple[Timeframe, ...]],
                            products: dict[str, tuple[FareProduct, ...]]) -> tuple[tuple[FareLegRule, ...], bool]:
        table = self.table("fare_leg_rules.txt", ("fare_product_id",))
        if table is None:
            return (), False
        rules: list[FareLegRule] = []
        seen: dict = {}
        for row in table.rows:
            network = self.optional(row, "network_id")
            from_area = self.optional(row, "from_area_id")
            to_area = self.optional(row, "to_area_id")
            from_tf = self.optional(row, "from_timeframe_group_id")
            to_tf = self.optional(row, "to_timeframe_group_id")
            product = self.required(row, "fare_product_id")
            priority = self.integer(row, "rule_priority", minimum=0)
            ok = self.reference(row, "network_id", network, networks, "network_id (not in networks.txt or routes.txt)")
            ok = self.reference(row, "from_area_id", from_area, areas, "from_area_id (not in areas.txt)") and ok
            ok = self.reference(row, "to_area_id", to_area, areas, "to_area_id (not in areas.txt)") and ok
            ok = self.reference(row, "from_timeframe_group_id", from_tf, timeframes, "timeframe_group_id (not in timeframes.txt)") and ok
            ok = self.reference(row, "to_timeframe_group_id", to_tf, timeframes, "timeframe_group_id (not in timeframes.txt)") and ok
            ok = self.reference(row, "fare_product_id", product, products, "fare_product_id (not in fare_products.txt)") and ok
            if self.optional(row, "rule_priority") is not None and priority is None:
                ok = False
            if product is None or not ok:
                continue
            key = (network, from_area, to_area, from_tf, to_tf, product)
            if self.unique(seen, key, row, "fare_product_id",
                           "rule (network, areas, timeframes and fare product; leg_group_id does not count)"):
                rules.append(FareLegRule(self.optional(row, "leg_group_id"), network, from_area, to_area, from_tf, to_tf,
                                         product, priority or 0, row.source))
        return tuple(rules), "rule_priority" in table.header

    def load_distance_fares(self, networks: set[str], products: dict[str, tuple[FareProduct, ...]]) -> tuple[DistanceFareRule, ...]:
        table = self.table("citytap_distance_fares.txt", ("min_distance_m", "fare_product_id"))
        if table is None:
            return ()
        rules: list[DistanceFareRule] = []
        for row in table.rows:
            network = self.optional(row, "network_id")
            low = self.integer(row, "min_distance_m", minimum=0, required=True)
            high = self.integer(row, "max_distance_m", minimum=1)
            product = self.required(row, "fare_product_id")
            priority = self.integer(row, "rule_priority", minimum=0)
            ok = self.reference(row, "network_id", network, networks, "network_id (not in networks.txt or routes.txt)")
            ok = self.reference(row, "fare_product_id", product, products, "fare_product_id (not in fare_products.txt)") and ok
            if low is not None and high is not None and high <= low:
                self.row_problem(row, "max_distance_m", f"{high} must be greater than min_distance_m {low}")
                ok = False
            if (self.optional(row, "max_distance_m") and high is None) or (self.optional(row, "rule_priority") and priority is None):
                ok = False
            if low is None or product is None or not ok:
                continue
            rules.append(DistanceFareRule(self.optional(row, "leg_group_id"), network, low, high, product, priority or 0, row.source))
        by_scope: dict[tuple, list[DistanceFareRule]] = defaultdict(list)
        for rule in rules:
            by_scope[(rule.network_id, rule.rule_priority)].append(rule)
        for scope_rules in by_scope.values():
            ordered = sorted(scope_rules, key=lambda r: r.min_distance_m)
            for before, after in zip(ordered, ordered[1:]):
                if before.max_distance_m is None or after.min_distance_m < before.max_distance_m:
                    line = int(after.source.rsplit(":", 1)[1])
                    self.problem(table.name, line, "min_distance_m",
                                 f"band overlaps {before.source} for the same network_id and rule_priority")
        return tuple(rules)

    def load_stop_distances(self, stops: dict[str, Stop]) -> tuple[tuple[str, str, int, str], ...]:
        table = self.table("citytap_stop_distances.txt", ("from_stop_id", "to_stop_id", "distance_m"))
        if table is None:
            return ()
        pairs: list[tuple[str, str, int, str]] = []
        seen: dict = {}
        for row in table.rows:
            origin = self.required(row, "from_stop_id")
            target = self.required(row, "to_stop_id")
            metres = self.integer(row, "distance_m", minimum=1, required=True)
            ok = self.reference(row, "from_stop_id", origin, stops, "stop_id (not in stops.txt)")
            ok = self.reference(row, "to_stop_id", target, stops, "stop_id (not in stops.txt)") and ok
            if origin is not None and origin == target:
                self.row_problem(row, "to_stop_id", "a stop's distance to itself is always 0; list only different stops")
                ok = False
            if origin is None or target is None or metres is None or not ok:
                continue
            if self.unique(seen, frozenset((origin, target)), row, "to_stop_id", "stop pair (distances go both ways)"):
                pairs.append((origin, target, metres, row.source))
        return tuple(pairs)

    def load_fare_leg_join_rules(self, networks: set[str], stops: dict[str, Stop]) -> tuple[FareLegJoinRule, ...]:
        table = self.table("fare_leg_join_rules.txt", ("from_network_id", "to_network_id"))
        if table is None:
            return ()
        rules: list[FareLegJoinRule] = []
        seen: dict = {}
        for row in table.rows:
            from_network = self.required(row, "from_network_id")
            to_network = self.required(row, "to_network_id")
            from_stop = self.optional(row, "from_stop_id")
            to_stop = self.optional(row, "to_stop_id")
            ok = self.reference(row, "from_network_id", from_network, networks, "network_id (not in networks.txt or routes.txt)")
            ok = self.reference(row, "to_network_id", to_network, networks, "network_id (not in networks.txt or routes.txt)") and ok
            ok = self.reference(row, "from_stop_id", from_stop, stops, "stop_id (not in stops.txt)") and ok
            ok = self.reference(row, "to_stop_id", to_stop, stops, "stop_id (not in stops.txt)") and ok
            if (from_stop is None) != (to_stop is None):
                self.row_problem(row, "to_stop_id" if from_stop else "from_stop_id", "from_stop_id and to_stop_id must be given together")
                ok = False
            limit, limit_type, limit_ok = self.duration_limit(row)
            if from_network is None or to_network is None or not ok or not limit_ok:
                continue
            if self.unique(seen, (from_network, to_network, from_stop, to_stop), row, "from_network_id", "join rule"):
                rules.append(FareLegJoinRule(from_network, to_network, from_stop, to_stop, limit, limit_type, row.source))
        return tuple(rules)

    def load_fare_transfer_rules(self, leg_groups: set[str], products: dict[str, tuple[FareProduct, ...]]) -> tuple[FareTransferRule, ...]:
        table = self.table("fare_transfer_rules.txt", ("fare_transfer_type",))
        if table is None:
            return ()
        rules: list[FareTransferRule] = []
        seen: dict = {}
        for row in table.rows:
            from_group = self.optional(row, "from_leg_group_id")
            to_group = self.optional(row, "to_leg_group_id")
            count_text = self.optional(row, "transfer_count")
            count = self.integer(row, "transfer_count", minimum=-1)
            limit, limit_type, limit_ok = self.duration_limit(row)
            ok = limit_ok
            transfer_type = self.enum(row, "fare_transfer_type", FareTransferType, range(3))
            product = self.optional(row, "fare_product_id")
            ok = self.reference(row, "from_leg_group_id", from_group, leg_groups, "leg_group_id (in no fare leg rule)") and ok
            ok = self.reference(row, "to_leg_group_id", to_group, leg_groups, "leg_group_id (in no fare leg rule)") and ok
            ok = self.reference(row, "fare_product_id", product, products, "fare_product_id (not in fare_products.txt)") and ok
            if count_text is not None and count is None:
                ok = False
            elif count == 0:
                self.row_problem(row, "transfer_count", "0 is not allowed: use -1 for no limit or 1 or more")
                ok = False
            same_groups = from_group == to_group
            if same_groups and count_text is None:
                self.row_problem(row, "transfer_count", "required when from_leg_group_id equals to_leg_group_id")
                ok = False
            if not same_groups and count_text is not None:
                self.row_problem(row, "transfer_count", "forbidden when from_leg_group_id differs from to_leg_group_id")
                ok = False
            if transfer_type is None or not ok:
                continue
            key = (from_group, to_group, product, count, limit)
            if self.unique(seen, key, row, "from_leg_group_id",
                           "transfer rule (leg groups, fare product, transfer_count and duration_limit)"):
                rules.append(FareTransferRule(from_group, to_group, count, limit, limit_type, transfer_type, product, row.source))
        return tuple(rules)

    def load_fare_caps(self, categories: dict[str, RiderCategory], media: dict[str, FareMedia],
                       currency: str | None) -> tuple[FareCap, ...]:
        table = self.table("citytap_fare_caps.txt", ("fare_cap_id", "cap_period", "amount", "currency"))
        if table is None:
            return ()
        caps: list[FareCap] = []
        seen_ids: dict = {}
        seen_scope: dict = {}
        for row in table.rows:
            cap_id = self.required(row, "fare_cap_id")
            category = self.optional(row, "rider_category_id")
            media_id = self.optional(row, "fare_media_id")
            period = self.enum(row, "cap_period", CapPeriod, range(2))
            ok = self.reference(row, "rider_category_id", category, categories, "rider_category_id (not in rider_categories.txt)")
            ok = self.reference(row, "fare_media_id", media_id, media, "fare_media_id (not in fare_media.txt)") and ok
            priced = self.amount(row, "amount", "currency")
            if priced is not None:
                if priced[0] <= 0:
                    self.row_problem(row, "amount", "a cap must be a positive amount")
                    ok = False
                if currency is not None and priced[1] != currency:
                    self.row_problem(row, "currency", f"{priced[1]} differs from the fare products' {currency}")
                    ok = False
            if cap_id is None or period is None or priced is None or not ok:
                continue
            if not self.unique(seen_ids, cap_id, row, "fare_cap_id", "fare_cap_id"):
                continue
            if self.unique(seen_scope, (category, media_id, period), row, "cap_period", "cap for this rider category, fare media and period"):
                caps.append(FareCap(cap_id, category, media_id, period, priced[0], priced[1], row.source))
        return tuple(caps)

    def load_max_fares(self, networks: set[str], products: dict[str, tuple[FareProduct, ...]]) -> dict[str, MaxFare]:
        table = self.table("citytap_max_fares.txt", ("network_id", "fare_product_id"))
        if table is None:
            return {}
        max_fares: dict[str, MaxFare] = {}
        seen: dict = {}
        for row in table.rows:
            network = self.required(row, "network_id")
            product = self.required(row, "fare_product_id")
            after = self.integer(row, "incomplete_after_s", minimum=1)
            ok = self.reference(row, "network_id", network, networks, "network_id (not in networks.txt or routes.txt)")
            ok = self.reference(row, "fare_product_id", product, products, "fare_product_id (not in fare_products.txt)") and ok
            if self.optional(row, "incomplete_after_s") is not None and after is None:
                ok = False
            if network is None or product is None or not ok:
                continue
            if self.unique(seen, network, row, "network_id", "network_id (one maximum fare per network)"):
                max_fares[network] = MaxFare(network, product, after, row.source)
        return max_fares
