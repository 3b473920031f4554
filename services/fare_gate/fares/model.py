"""The loaded feed: immutable records of the GTFS-Fares v2 files and CityTap's extensions.

Every record remembers where it came from (`source`, such as "fare_leg_rules.txt:4") so a
priced fare can name the exact rows that produced it. Amounts are integer minor units of
the feed's single currency (see currency.py); times of day are seconds after midnight;
distances are whole metres.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import date


class FareMediaType(enum.IntEnum):
    """fare_media.fare_media_type."""

    NONE = 0
    PAPER_TICKET = 1
    TRANSIT_CARD = 2
    CEMV = 3
    MOBILE_APP = 4


class DurationLimitType(enum.IntEnum):
    """fare_transfer_rules.duration_limit_type: which fare validations bound the window.

    The window runs from an event of the first leg of the transfer sub-journey to an event
    of the leg being transferred to; departure = boarding validation, arrival = exit.
    """

    DEPARTURE_TO_ARRIVAL = 0
    DEPARTURE_TO_DEPARTURE = 1
    ARRIVAL_TO_DEPARTURE = 2
    ARRIVAL_TO_ARRIVAL = 3


class FareTransferType(enum.IntEnum):
    """fare_transfer_rules.fare_transfer_type: how a transfer's cost combines with the legs.

    A = from-leg fare, B = to-leg fare, AB = the transfer rule's fare product.
    """

    A_PLUS_AB = 0
    A_PLUS_AB_PLUS_B = 1
    AB = 2


class CapPeriod(enum.IntEnum):
    """citytap_fare_caps.cap_period."""

    SERVICE_DAY = 0
    SERVICE_WEEK = 1


@dataclass(frozen=True, slots=True)
class Stop:
    stop_id: str
    stop_name: str
    lat: float | None
    lon: float | None
    parent_station: str | None
    source: str


@dataclass(frozen=True, slots=True)
class Route:
    route_id: str
    route_name: str
    network_id: str | None
    source: str


@dataclass(frozen=True, slots=True)
class Network:
    network_id: str
    network_name: str
    source: str


@dataclass(frozen=True, slots=True)
class Area:
    area_id: str
    area_name: str
    source: str


@dataclass(frozen=True, slots=True)
class FareMedia:
    fare_media_id: str
    fare_media_name: str
    fare_media_type: FareMediaType
    source: str


@dataclass(frozen=True, slots=True)
class RiderCategory:
    rider_category_id: str
    rider_category_name: str
    is_default_fare_category: bool
    eligibility_url: str
    source: str


@dataclass(frozen=True, slots=True)
class FareProduct:
    """One row of fare_products.txt: a product's price for a rider category and fare media.

    An empty rider_category_id means any category may use it; an empty fare_media_id means
    the media is not specified, and the row serves any media.
    """

    fare_product_id: str
    fare_product_name: str
    rider_category_id: str | None
    fare_media_id: str | None
    amount_minor: int
    currency: str
    source: str


@dataclass(frozen=True, slots=True)
class Service:
    """A calendar.txt row and its calendar_dates.txt exceptions, or exceptions alone."""

    service_id: str
    weekdays: tuple[bool, bool, bool, bool, bool, bool, bool]  # Monday first
    start_date: date | None
    end_date: date | None
    added: frozenset[date] = frozenset()
    removed: frozenset[date] = frozenset()

    def is_active(self, day: date) -> bool:
        if day in self.removed:
            return False
        if day in self.added:
            return True
        if self.start_date is None or self.end_date is None:
            return False
        return self.start_date <= day <= self.end_date and self.weekdays[day.weekday()]


@dataclass(frozen=True, slots=True)
class Timeframe:
    """timeframes.txt: [start_s, end_s) seconds after local midnight on the service's days."""

    timeframe_group_id: str
    start_s: int
    end_s: int
    service_id: str
    source: str


@dataclass(frozen=True, slots=True)
class FareLegRule:
    leg_group_id: str | None
    network_id: str | None
    from_area_id: str | None
    to_area_id: str | None
    from_timeframe_group_id: str | None
    to_timeframe_group_id: str | None
    fare_product_id: str
    rule_priority: int
    source: str


@dataclass(frozen=True, slots=True)
class DistanceFareRule:
    """citytap_distance_fares.txt: a fare product for legs whose distance falls in a band.

    The band holds distances greater than min_distance_m and at most max_distance_m (no
    upper bound when max_distance_m is None); a band starting at 0 also holds a
    zero-distance leg (entry and exit at the same station).
    """

    leg_group_id: str | None
    network_id: str | None
    min_distance_m: int
    max_distance_m: int | None
    fare_product_id: str
    rule_priority: int
    source: str

    def covers(self, distance_m: int) -> bool:
        if distance_m == 0 and self.min_distance_m == 0:
            return True
        if distance_m <= self.min_distance_m:
            return False
        return self.max_distance_m is None or distance_m <= self.max_distance_m


@dataclass(frozen=True, slots=True)
class FareLegJoinRule:
    """fare_leg_join_rules.txt. The optional duration limit follows the open GTFS proposal
    (google/transit#639): without it, two legs join however far apart in time they are."""

    from_network_id: str
    to_network_id: str
    from_stop_id: str | None
    to_stop_id: str | None
    duration_limit_s: int | None
    duration_limit_type: DurationLimitType | None
    source: str


@dataclass(frozen=True, slots=True)
class FareTransferRule:
    from_leg_group_id: str | None
    to_leg_group_id: str | None
    transfer_count: int | None  # -1 = no limit; None when the groups differ
    duration_limit_s: int | None
    duration_limit_type: DurationLimitType | None
    fare_transfer_type: FareTransferType
    fare_product_id: str | None  # None: the transfer itself costs nothing
    source: str


@dataclass(frozen=True, slots=True)
class FareCap:
    """citytap_fare_caps.txt: the most a rider pays in a service day or week."""

    fare_cap_id: str
    rider_category_id: str | None  # None: every category
    fare_media_id: str | None  # None: every media
    cap_period: CapPeriod
    amount_minor: int
    currency: str
    source: str


@dataclass(frozen=True, slots=True)
class MaxFare:
    """citytap_max_fares.txt: what an entry holds and an incomplete journey costs."""

    network_id: str
    fare_product_id: str
    incomplete_after_s: int | None
    source: str


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """citytap_settings.txt (one row), with agency.txt's timezone as a fallback."""

    timezone: str
    service_day_start_s: int = 4 * 3600 + 30 * 60  # 04:30:00, like TfL's cap day
    service_week_start: int = 0  # weekday the service week starts on, Monday = 0
    cap_incomplete_journeys: bool = False
    source: str = ""


@dataclass(frozen=True, slots=True)
class Feed:
    """A whole, validated feed. Build one with `load_feed`; never mutate it."""

    name: str
    version: str  # sha256 of the files, so a gate can tell which feed priced a fare
    currency: str
    settings: FeedSettings
    stops: dict[str, Stop]
    routes: dict[str, Route]
    networks: dict[str, Network]
    areas: dict[str, Area]
    stop_areas: dict[str, frozenset[str]]  # as written in stop_areas.txt
    fare_media: dict[str, FareMedia]
    rider_categories: dict[str, RiderCategory]
    fare_products: dict[str, tuple[FareProduct, ...]]
    services: dict[str, Service]
    timeframes: dict[str, tuple[Timeframe, ...]]
    fare_leg_rules: tuple[FareLegRule, ...]
    leg_rules_have_priority: bool  # fare_leg_rules.txt has a rule_priority column
    fare_leg_join_rules: tuple[FareLegJoinRule, ...]
    fare_transfer_rules: tuple[FareTransferRule, ...]
    distance_fare_rules: tuple[DistanceFareRule, ...]
    stop_distances: tuple[tuple[str, str, int, str], ...]  # from, to, metres, source
    fare_caps: tuple[FareCap, ...]
    max_fares: dict[str, MaxFare]
    files: tuple[str, ...] = field(default=())

    @property
    def rule_count(self) -> int:
        return len(self.fare_leg_rules) + len(self.distance_fare_rules) + len(self.fare_transfer_rules)
