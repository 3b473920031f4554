"""The fare engine: prices journeys from a validated feed. Pure: no I/O, no clock, no globals.

How a journey is priced (FARES.md has the long form with examples):

1. Legs are checked and resolved: stops exist, times are timezone-aware and in order, the
   network comes from the leg's network_id or its route.
2. Consecutive legs that match a fare_leg_join_rules.txt row become one *effective fare
   leg* (first leg's departure, last leg's arrival).
3. Each effective leg gets its fare from the leg rules (fare_leg_rules.txt and CityTap
   distance bands) that match its network, areas, timeframes and distance, and whose fare
   product has a row for the rider's category and fare media. Of those, only the ones with
   the highest rule_priority count; among them the cheapest product wins.
4. fare_transfer_rules.txt is applied between consecutive legs, honouring transfer_count
   and the duration limit measured from the first leg of the transfer sub-journey.
   Consecutive legs joined by transfers form a *chain*; a leg that no transfer rule
   reaches starts a new chain.
5. Caps: each chain counts toward the caps of the service day (and week) in which it
   began, given the rider's prior charges (`CapState`), and is charged at most what is
   left under the tightest cap.

An entry with no exit (`Leg.incomplete`) costs the network's maximum fare, forms a chain
of its own and, unless the feed's settings say otherwise, neither counts toward nor is
reduced by caps (a penalty is not travel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from services.fare_gate.fares import errors
from services.fare_gate.fares.distance import StopDistances
from services.fare_gate.fares.errors import FareError
from services.fare_gate.fares.loader import load_feed
from services.fare_gate.fares.model import (
    CapPeriod,
    DistanceFareRule,
    DurationLimitType,
    FareCap,
    FareLegRule,
    FareProduct,
    FareTransferRule,
    FareTransferType,
    Feed,
)
from services.fare_gate.fares.state import OPEN_LEGS_MAX, CapState, Leg, RiderFareState
from services.fare_gate.fares.timeutil import seconds_of_day, service_date, service_week_start

# A journey priced in one call has at most this many legs: a gate never needs more, and the
# bound keeps one request from costing more than a few milliseconds.
LEGS_PER_JOURNEY_MAX = 32



def _elapsed_s(kind: DurationLimitType | None, first_departure: datetime, first_arrival: datetime,
               last_departure: datetime, last_arrival: datetime) -> int:
    """Seconds between the validations a duration_limit_type names (0..3, see model.py)."""
    since = first_departure if kind in (DurationLimitType.DEPARTURE_TO_ARRIVAL, DurationLimitType.DEPARTURE_TO_DEPARTURE) else first_arrival
    until = last_departure if kind in (DurationLimitType.DEPARTURE_TO_DEPARTURE, DurationLimitType.ARRIVAL_TO_DEPARTURE) else last_arrival
    return int((until - since).total_seconds())


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LegRuleMatch:
    """The leg rule that set a leg's fare, and the product row that priced it."""

    rule: str  # where the rule is, such as "fare_leg_rules.txt:4"
    fare_product_id: str
    fare_product_row: str  # the fare_products.txt row used (category and media specific)
    leg_group_id: str | None
    rule_priority: int
    amount_minor: int
    other_matches: int  # other eligible rules at the same priority, all dearer or equal


@dataclass(frozen=True, slots=True)
class TransferApplied:
    """A fare_transfer_rules.txt row applied between the previous leg and this one."""

    rule: str
    from_leg_group_id: str | None
    to_leg_group_id: str | None
    fare_transfer_type: FareTransferType
    fare_product_id: str | None
    amount_minor: int  # the transfer's own fare product (0 when it has none; negative = discount)
    adjustment_minor: int  # what this leg costs compared with its own fare: negative = discount
    transfer_number: int  # 1 for the first transfer of the sub-journey, 2 for the second...
    elapsed_s: int | None  # the time measured against duration_limit, when there is one
    duration_limit_s: int | None
    duration_limit_type: DurationLimitType | None


@dataclass(frozen=True, slots=True)
class PricedLeg:
    """One effective fare leg of a journey, with every step of its price."""

    legs: tuple[int, ...]  # positions of the caller's legs (several when joined)
    network_id: str | None
    from_stop_id: str
    to_stop_id: str | None
    start_at: datetime
    end_at: datetime | None
    incomplete: bool
    distance_m: int | None
    distance_source: str | None  # "table", "coordinates" or "same stop"
    joined_by: tuple[str, ...]  # fare_leg_join_rules.txt rows that joined the legs
    match: LegRuleMatch | None  # None for an incomplete leg
    max_fare_rule: str | None  # for an incomplete leg: where its maximum fare comes from
    fare_minor: int  # the leg's own fare
    transfer: TransferApplied | None
    subtotal_minor: int  # fare_minor plus the transfer adjustment: what the leg adds before caps
    floor_adjustment_minor: int  # raises a chain whose discounts exceed its fares back to zero
    cap_reduction_minor: int
    charged_minor: int  # subtotal + floor adjustment - cap reduction
    chain: int  # legs with the same chain number are joined by transfers
    service_date: date  # the service day whose caps this leg counts toward


@dataclass(frozen=True, slots=True)
class CapApplied:
    """A cap that applied to the journey, and what it did."""

    fare_cap_id: str
    rule: str
    cap_period: CapPeriod
    period_start: date
    amount_minor: int
    spent_before_minor: int
    spent_after_minor: int
    reduction_minor: int  # how much this cap took off (0 when another cap was tighter)


@dataclass(frozen=True, slots=True)
class JourneyQuote:
    """The price of a journey with its whole breakdown, and the rider's caps after it."""

    feed_version: str
    currency: str
    rider_category_id: str | None
    fare_media_id: str | None
    legs: tuple[PricedLeg, ...]
    caps: tuple[CapApplied, ...]
    fare_before_caps_minor: int
    cap_reduction_minor: int
    total_minor: int
    cap_state_before: CapState
    cap_state_after: CapState

    @property
    def transfer_adjustment_minor(self) -> int:
        return sum(leg.transfer.adjustment_minor for leg in self.legs if leg.transfer)


@dataclass(frozen=True, slots=True)
class MaxFareQuote:
    """What an entry on a network holds, and what an incomplete journey there costs."""

    network_id: str
    amount_minor: int
    currency: str
    fare_product_id: str | None
    rule: str  # the citytap_max_fares.txt row, or "computed from N leg rules"
    incomplete_after_s: int | None  # from the feed, if it says; the tap path's setting otherwise


@dataclass(frozen=True, slots=True)
class LegCharge:
    """What charging one more leg means: the amount to charge now and the rider's new state.

    `charge_minor` is the open journey's new total less what it was already charged; it can
    be negative (a refund) when a transfer rule of type 2 replaces an earlier fare.
    """

    charge_minor: int
    quote: JourneyQuote  # the open journey as priced now, this leg last
    state: RiderFareState
    started_new_journey: bool


# --- internals --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Resolved:
    index: int
    leg: Leg
    network_id: str | None


@dataclass(frozen=True, slots=True)
class _Effective:
    legs: tuple[_Resolved, ...]
    network_id: str | None
    from_stop_id: str
    to_stop_id: str | None
    start_at: datetime
    end_at: datetime | None
    incomplete: bool
    joined_by: tuple[str, ...]

    @property
    def arrival_at(self) -> datetime:
        # A leg validated only on boarding has no arrival validation; its boarding stands in.
        return self.end_at or self.start_at


@dataclass(slots=True)
class _Step:
    effective: _Effective
    distance: tuple[int, str] | None = None
    match: LegRuleMatch | None = None
    max_fare_rule: str | None = None
    fare_minor: int = 0
    transfer: TransferApplied | None = None
    subtotal_minor: int = 0
    chain: int = 0
    group: str | None = None


class FareEngine:
    """Prices journeys from one validated `Feed`. Immutable and safe to share between threads."""

    def __init__(self, feed: Feed) -> None:
        self.feed = feed
        self.zone = ZoneInfo(feed.settings.timezone)
        self._distances = StopDistances(feed.stop_distances, feed.stops)
        leg_rules = feed.fare_leg_rules
        self._listed_networks = frozenset(r.network_id for r in leg_rules if r.network_id)
        self._listed_from_areas = frozenset(r.from_area_id for r in leg_rules if r.from_area_id)
        self._listed_to_areas = frozenset(r.to_area_id for r in leg_rules if r.to_area_id)
        transfers = feed.fare_transfer_rules
        self._listed_from_groups = frozenset(r.from_leg_group_id for r in transfers if r.from_leg_group_id)
        self._listed_to_groups = frozenset(r.to_leg_group_id for r in transfers if r.to_leg_group_id)
        self._known_networks = frozenset(feed.networks) | {r.network_id for r in feed.routes.values() if r.network_id}
        defaults = [c.rider_category_id for c in feed.rider_categories.values() if c.is_default_fare_category]
        self.default_rider_category_id = defaults[0] if len(defaults) == 1 else None

    @classmethod
    def from_path(cls, path: str | Path) -> FareEngine:
        """Load, validate and serve the feed at `path` (folder or zip); FeedError if invalid."""
        return cls(load_feed(path))

    # --- public API ---------------------------------------------------------------------

    def price_journey(self, legs: Sequence[Leg], *, rider_category_id: str | None = None,
                      fare_media_id: str | None = None, cap_state: CapState | None = None,
                      apply_caps: bool = True) -> JourneyQuote:
        """Price `legs` (in time order) for a rider, given the rider's prior charges.

        `rider_category_id` None means the feed's default category. The returned quote's
        `cap_state_after` is what to keep for the rider's next journey. `apply_caps=False`
        prices without caps and leaves the cap state as it was.
        """
        category, media = self._rider(rider_category_id, fare_media_id)
        caps_before = cap_state or CapState()
        if not legs:
            raise FareError(errors.INVALID_LEG, "a journey needs at least one leg")
        if len(legs) > LEGS_PER_JOURNEY_MAX:
            raise FareError(errors.INVALID_LEG, f"a journey may have at most {LEGS_PER_JOURNEY_MAX} legs, got {len(legs)}")
        resolved = self._resolve(legs)
        steps = [_Step(effective) for effective in self._join(resolved)]
        for step in steps:
            self._price_leg(step, category, media)
        self._apply_transfers(steps, category, media)
        priced, caps, caps_after = self._apply_caps(steps, category, media, caps_before, apply_caps)
        before = sum(leg.subtotal_minor + leg.floor_adjustment_minor for leg in priced)
        total = sum(leg.charged_minor for leg in priced)
        return JourneyQuote(
            feed_version=self.feed.version,
            currency=self.feed.currency,
            rider_category_id=category,
            fare_media_id=media,
            legs=tuple(priced),
            caps=tuple(caps),
            fare_before_caps_minor=before,
            cap_reduction_minor=before - total,
            total_minor=total,
            cap_state_before=caps_before,
            cap_state_after=caps_after,
        )

    def quote(self, from_stop_id: str, to_stop_id: str | None, start_at: datetime, *, end_at: datetime | None = None,
              network_id: str | None = None, route_id: str | None = None, rider_category_id: str | None = None,
              fare_media_id: str | None = None) -> JourneyQuote:
        """Price a single leg: the fare before any cap or transfer (what QuoteFare answers)."""
        leg = Leg(from_stop_id, start_at, to_stop_id, end_at, network_id, route_id)
        return self.price_journey([leg], rider_category_id=rider_category_id, fare_media_id=fare_media_id, apply_caps=False)

    def max_fare(self, network_id: str, rider_category_id: str | None = None,
                 fare_media_id: str | None = None) -> MaxFareQuote:
        """The maximum fare on `network_id`: what an entry holds and an incomplete journey costs.

        It is the citytap_max_fares.txt product for the network when the feed names one;
        otherwise the dearest single-leg fare any rule of that network can charge the rider.
        """
        category, media = self._rider(rider_category_id, fare_media_id)
        if network_id not in self._known_networks:
            raise FareError(errors.UNKNOWN_NETWORK, f"unknown network {network_id!r}")
        configured = self.feed.max_fares.get(network_id)
        if configured is not None:
            row = self.fare_product_row(configured.fare_product_id, category, media)
            if row is None:
                raise FareError(errors.NO_MAX_FARE, f"maximum fare product {configured.fare_product_id!r} ({configured.source}) "
                                f"has no price for rider category {category!r} and fare media {media!r}")
            return MaxFareQuote(network_id, row.amount_minor, row.currency, row.fare_product_id, configured.source,
                                configured.incomplete_after_s)
        best: FareProduct | None = None
        count = 0
        rules: list[FareLegRule | DistanceFareRule] = [*self.feed.fare_leg_rules, *self.feed.distance_fare_rules]
        for rule in rules:
            if rule.network_id not in (None, network_id):
                continue
            row = self.fare_product_row(rule.fare_product_id, category, media)
            if row is None:
                continue
            count += 1
            if best is None or row.amount_minor > best.amount_minor:
                best = row
        if best is None:
            raise FareError(errors.NO_MAX_FARE, f"no fare rule of network {network_id!r} prices rider category {category!r}")
        return MaxFareQuote(network_id, best.amount_minor, best.currency, best.fare_product_id,
                            f"computed from {count} leg rule(s)", None)

    def charge_leg(self, state: RiderFareState, leg: Leg, *, rider_category_id: str | None = None,
                   fare_media_id: str | None = None) -> LegCharge:
        """Charge one more leg for a rider whose earlier charges are in `state`.

        If the leg transfers from (or joins) the open journey, the open journey is priced
        again with the leg added, from the caps it started with, and the difference is what
        to charge now. Otherwise the open journey is closed and the leg starts a new one.
        Keep the returned state for the rider's next leg.
        """
        if state.open_legs and len(state.open_legs) < OPEN_LEGS_MAX and not leg.incomplete:
            quote = self.price_journey([*state.open_legs, leg], rider_category_id=rider_category_id,
                                       fare_media_id=fare_media_id, cap_state=state.open_cap_state)
            last, previous = quote.legs[-1], quote.legs[-2] if len(quote.legs) > 1 else None
            joined = len(last.legs) > 1
            if joined or (previous is not None and previous.chain == last.chain):
                charge = quote.total_minor - state.open_charged_minor
                new_state = RiderFareState(quote.cap_state_after, (*state.open_legs, leg), state.open_cap_state,
                                           quote.total_minor)
                return LegCharge(charge, quote, new_state, started_new_journey=False)
        base = state.cap_state
        quote = self.price_journey([leg], rider_category_id=rider_category_id, fare_media_id=fare_media_id, cap_state=base)
        new_state = RiderFareState(quote.cap_state_after, (leg,), base, quote.total_minor)
        if leg.incomplete:
            new_state = new_state.closed()
        return LegCharge(quote.total_minor, quote, new_state, started_new_journey=True)

    def service_date(self, moment: datetime) -> date:
        """The service day (starting at the feed's service_day_start, local time) of `moment`."""
        return service_date(moment, self.zone, self.feed.settings.service_day_start_s)

    # --- rider, legs and joins ----------------------------------------------------------

    def _rider(self, category: str | None, media: str | None) -> tuple[str | None, str | None]:
        if category is None:
            if self.feed.rider_categories and self.default_rider_category_id is None:
                raise FareError(errors.NO_DEFAULT_RIDER_CATEGORY, "name a rider category: the feed has no single default one")
            category = self.default_rider_category_id
        elif category not in self.feed.rider_categories:
            raise FareError(errors.UNKNOWN_RIDER_CATEGORY, f"unknown rider category {category!r}",
                            known=",".join(sorted(self.feed.rider_categories)))
        if media is not None and media not in self.feed.fare_media:
            raise FareError(errors.UNKNOWN_FARE_MEDIA, f"unknown fare media {media!r}", known=",".join(sorted(self.feed.fare_media)))
        return category, media

    def _resolve(self, legs: Sequence[Leg]) -> list[_Resolved]:
        resolved: list[_Resolved] = []
        previous_start: datetime | None = None
        for index, leg in enumerate(legs):
            where = f"leg {index + 1}"
            for moment, name in ((leg.start_at, "start_at"), (leg.end_at, "end_at")):
                if moment is not None and (moment.tzinfo is None or moment.utcoffset() is None):
                    raise FareError(errors.INVALID_LEG, f"{where}: {name} must be timezone-aware")
            if leg.end_at is not None and leg.end_at < leg.start_at:
                raise FareError(errors.INVALID_LEG, f"{where}: ends before it starts")
            if previous_start is not None and leg.start_at < previous_start:
                raise FareError(errors.INVALID_LEG, f"{where}: starts before the leg before it; give legs in time order")
            previous_start = leg.start_at
            for stop_id in (leg.from_stop_id, leg.to_stop_id):
                if stop_id is not None and stop_id not in self.feed.stops:
                    raise FareError(errors.UNKNOWN_STOP, f"{where}: unknown stop {stop_id!r}")
            network = leg.network_id
            if leg.route_id is not None:
                route = self.feed.routes.get(leg.route_id)
                if route is None:
                    raise FareError(errors.UNKNOWN_ROUTE, f"{where}: unknown route {leg.route_id!r}")
                if network is not None and route.network_id != network:
                    raise FareError(errors.INVALID_LEG, f"{where}: route {leg.route_id!r} is not in network {network!r}")
                network = route.network_id
            elif network is not None and network not in self._known_networks:
                raise FareError(errors.UNKNOWN_NETWORK, f"{where}: unknown network {network!r}")
            if leg.incomplete and network is None:
                raise FareError(errors.NETWORK_REQUIRED, f"{where}: an incomplete leg needs a network for its maximum fare")
            resolved.append(_Resolved(index, leg, network))
        return resolved

    def _same_station(self, a: str, b: str) -> bool:
        stops = self.feed.stops
        return a == b or (stops[a].parent_station or a) == (stops[b].parent_station or b)

    def _join(self, resolved: list[_Resolved]) -> list[_Effective]:
        groups: list[tuple[list[_Resolved], list[str]]] = []
        for item in resolved:
            if groups:
                last_group, joins = groups[-1]
                rule = self._join_rule(last_group[-1], item)
                if rule is not None:
                    last_group.append(item)
                    joins.append(rule)
                    continue
            groups.append(([item], []))
        effective: list[_Effective] = []
        for items, joins in groups:
            networks = {item.network_id for item in items}
            first, last = items[0].leg, items[-1].leg
            effective.append(_Effective(
                legs=tuple(items),
                network_id=networks.pop() if len(networks) == 1 else None,
                from_stop_id=first.from_stop_id,
                to_stop_id=last.to_stop_id,
                start_at=first.start_at,
                end_at=last.end_at,
                incomplete=first.incomplete,
                joined_by=tuple(joins),
            ))
        return effective

    def _join_rule(self, before: _Resolved, after: _Resolved) -> str | None:
        if before.leg.incomplete or after.leg.incomplete or before.leg.to_stop_id is None:
            return None
        for rule in self.feed.fare_leg_join_rules:
            if rule.from_network_id != before.network_id or rule.to_network_id != after.network_id:
                continue
            if rule.from_stop_id is not None:
                if not (self._same_station(before.leg.to_stop_id, rule.from_stop_id)
                        and self._same_station(after.leg.from_stop_id, rule.to_stop_id or "")):
                    continue
            elif not self._same_station(before.leg.to_stop_id, after.leg.from_stop_id):
                continue
            if rule.duration_limit_s is not None:
                elapsed = _elapsed_s(rule.duration_limit_type, before.leg.start_at, before.leg.end_at or before.leg.start_at,
                                     after.leg.start_at, after.leg.end_at or after.leg.start_at)
                if elapsed < 0 or elapsed > rule.duration_limit_s:
                    continue
            return rule.source
        return None

    # --- one leg's fare -----------------------------------------------------------------

    def _areas(self, stop_id: str | None) -> frozenset[str]:
        if stop_id is None:
            return frozenset()
        own = self.feed.stop_areas.get(stop_id)
        if own:
            return own
        parent = self.feed.stops[stop_id].parent_station
        return self.feed.stop_areas.get(parent, frozenset()) if parent else frozenset()

    def _in_timeframe(self, group: str, moment: datetime | None) -> bool:
        if moment is None:
            return False
        wall = moment.astimezone(self.zone)
        day, second = wall.date(), seconds_of_day(wall)
        for frame in self.feed.timeframes.get(group, ()):
            if frame.start_s <= second < frame.end_s and self.feed.services[frame.service_id].is_active(day):
                return True
        return False

    def _native_matches(self, rule: FareLegRule, leg: _Effective, from_areas: frozenset[str], to_areas: frozenset[str]) -> bool:
        if self.feed.leg_rules_have_priority:
            # With rule_priority, an empty field means the field does not matter.
            if rule.network_id is not None and rule.network_id != leg.network_id:
                return False
            if rule.from_area_id is not None and rule.from_area_id not in from_areas:
                return False
            if rule.to_area_id is not None and rule.to_area_id not in to_areas:
                return False
        else:
            # Without it, an empty field matches every value no rule lists explicitly.
            if rule.network_id is not None:
                if rule.network_id != leg.network_id:
                    return False
            elif leg.network_id in self._listed_networks:
                return False
            if rule.from_area_id is not None:
                if rule.from_area_id not in from_areas:
                    return False
            elif from_areas & self._listed_from_areas:
                return False
            if rule.to_area_id is not None:
                if rule.to_area_id not in to_areas:
                    return False
            elif to_areas & self._listed_to_areas:
                return False
        if rule.from_timeframe_group_id is not None and not self._in_timeframe(rule.from_timeframe_group_id, leg.start_at):
            return False
        if rule.to_timeframe_group_id is not None and not self._in_timeframe(rule.to_timeframe_group_id, leg.end_at):
            return False
        return True

    def fare_product_row(self, product_id: str, category: str | None, media: str | None) -> FareProduct | None:
        """The fare_products.txt row that prices `product_id` for this rider, or None if the
        rider may not use it. A row for the exact category or media beats an empty one."""
        best: FareProduct | None = None
        best_rank = (2, 2)
        for row in self.feed.fare_products.get(product_id, ()):
            if row.rider_category_id is not None and row.rider_category_id != category:
                continue
            if row.fare_media_id is not None and row.fare_media_id != media:
                continue
            rank = (0 if row.rider_category_id is not None else 1, 0 if row.fare_media_id is not None else 1)
            if rank < best_rank:
                best, best_rank = row, rank
        return best

    def _price_leg(self, step: _Step, category: str | None, media: str | None) -> None:
        leg = step.effective
        if leg.incomplete:
            assert leg.network_id is not None
            maximum = self.max_fare(leg.network_id, category, media)
            step.fare_minor = maximum.amount_minor
            step.max_fare_rule = maximum.rule
            return
        if leg.to_stop_id is not None:
            step.distance = self._distances.between(leg.from_stop_id, leg.to_stop_id)
        from_areas, to_areas = self._areas(leg.from_stop_id), self._areas(leg.to_stop_id)
        candidates: list[tuple[int, int, int, FareLegRule | DistanceFareRule, FareProduct]] = []
        order = 0
        for rule in self.feed.fare_leg_rules:
            order += 1
            if self._native_matches(rule, leg, from_areas, to_areas):
                row = self.fare_product_row(rule.fare_product_id, category, media)
                if row is not None:
                    candidates.append((rule.rule_priority, row.amount_minor, order, rule, row))
        if step.distance is not None:
            for distance_rule in self.feed.distance_fare_rules:
                order += 1
                if distance_rule.network_id not in (None, leg.network_id) or not distance_rule.covers(step.distance[0]):
                    continue
                row = self.fare_product_row(distance_rule.fare_product_id, category, media)
                if row is not None:
                    candidates.append((distance_rule.rule_priority, row.amount_minor, order, distance_rule, row))
        if not candidates:
            where = f"{leg.network_id or 'no network'} {leg.from_stop_id} -> {leg.to_stop_id or '?'}"
            raise FareError(errors.NO_FARE, f"no fare rule prices leg {where} at {leg.start_at.isoformat()} "
                            f"for rider category {category!r} and fare media {media!r}")
        top = max(c[0] for c in candidates)
        best = sorted((c for c in candidates if c[0] == top), key=lambda c: (c[1], c[2]))
        priority, amount, _order, chosen, row = best[0]
        step.match = LegRuleMatch(chosen.source, chosen.fare_product_id, row.source, chosen.leg_group_id, priority, amount,
                                  len(best) - 1)
        step.fare_minor = amount
        step.group = chosen.leg_group_id

    # --- transfers ----------------------------------------------------------------------

    @staticmethod
    def _group_matches(rule_value: str | None, group: str, listed: frozenset[str]) -> bool:
        return rule_value == group if rule_value is not None else group not in listed

    def _apply_transfers(self, steps: list[_Step], category: str | None, media: str | None) -> None:
        chain = 0
        previous_rule: FareTransferRule | None = None  # applied into the previous leg
        sub_start = 0
        sub_count = 0
        for index, step in enumerate(steps):
            step.subtotal_minor = step.fare_minor
            if index == 0:
                step.chain = chain
                continue
            before = steps[index - 1]
            applied = None
            if not step.effective.incomplete and not before.effective.incomplete and before.group and step.group:
                applied = self._best_transfer(steps, index, previous_rule, sub_start, sub_count, category, media)
            if applied is None:
                chain += 1
                previous_rule, sub_start, sub_count = None, index, 0
                step.chain = chain
                continue
            rule, transfer, start, count = applied
            step.transfer = transfer
            step.subtotal_minor = step.fare_minor + transfer.adjustment_minor
            step.chain = chain
            previous_rule, sub_start, sub_count = rule, start, count

    def _best_transfer(self, steps: list[_Step], index: int, previous_rule: FareTransferRule | None, sub_start: int,
                       sub_count: int, category: str | None, media: str | None
                       ) -> tuple[FareTransferRule, TransferApplied, int, int] | None:
        before, step = steps[index - 1], steps[index]
        assert before.group is not None and step.group is not None
        options: list[tuple[int, int, int, FareTransferRule, TransferApplied, int, int]] = []
        for order, rule in enumerate(self.feed.fare_transfer_rules):
            if not (self._group_matches(rule.from_leg_group_id, before.group, self._listed_from_groups)
                    and self._group_matches(rule.to_leg_group_id, step.group, self._listed_to_groups)):
                continue
            product_amount = 0
            if rule.fare_product_id is not None:
                row = self.fare_product_row(rule.fare_product_id, category, media)
                if row is None:
                    continue  # the rider cannot use this transfer's product
                product_amount = row.amount_minor
            same_kind = previous_rule is not None and (previous_rule.from_leg_group_id, previous_rule.to_leg_group_id) == (
                rule.from_leg_group_id, rule.to_leg_group_id)
            start, count = (sub_start, sub_count + 1) if same_kind else (index - 1, 1)
            if rule.transfer_count is not None and rule.transfer_count != -1 and count > rule.transfer_count:
                continue
            elapsed = None
            if rule.duration_limit_s is not None:
                first = steps[start].effective
                elapsed = _elapsed_s(rule.duration_limit_type, first.start_at, first.arrival_at,
                                     step.effective.start_at, step.effective.arrival_at)
                if elapsed < 0 or elapsed > rule.duration_limit_s:
                    continue
            if rule.fare_transfer_type == FareTransferType.A_PLUS_AB:
                subtotal = product_amount
            elif rule.fare_transfer_type == FareTransferType.A_PLUS_AB_PLUS_B:
                subtotal = step.fare_minor + product_amount
            elif before.transfer is None:
                subtotal = product_amount - before.fare_minor  # AB replaces the first leg's own fare
            else:
                subtotal = product_amount
            adjustment = subtotal - step.fare_minor
            transfer = TransferApplied(rule.source, rule.from_leg_group_id, rule.to_leg_group_id, rule.fare_transfer_type,
                                       rule.fare_product_id, product_amount, adjustment, count, elapsed,
                                       rule.duration_limit_s, rule.duration_limit_type)
            limit = rule.transfer_count if rule.transfer_count not in (None, -1) else 1 << 30
            options.append((limit, subtotal, order, rule, transfer, start, count))
        if not options:
            return None
        # The smallest transfer_count that still covers this transfer, then the cheapest.
        _limit, _subtotal, _order, rule, transfer, start, count = min(options, key=lambda o: (o[0], o[1], o[2]))
        return rule, transfer, start, count

    # --- caps ---------------------------------------------------------------------------

    def _caps_for(self, category: str | None, media: str | None) -> list[FareCap]:
        return [cap for cap in self.feed.fare_caps
                if cap.rider_category_id in (None, category) and cap.fare_media_id in (None, media)]

    def _period_start(self, cap: FareCap, day: date) -> date:
        if cap.cap_period == CapPeriod.SERVICE_WEEK:
            return service_week_start(day, self.feed.settings.service_week_start)
        return day

    def _apply_caps(self, steps: list[_Step], category: str | None, media: str | None,
                    state: CapState, apply_caps: bool) -> tuple[list[PricedLeg], list[CapApplied], CapState]:
        caps = self._caps_for(category, media) if apply_caps else []
        applied: dict[tuple[str, date], CapApplied] = {}
        priced: list[PricedLeg] = []
        chains: dict[int, list[_Step]] = {}
        for step in steps:
            chains.setdefault(step.chain, []).append(step)
        for chain_steps in chains.values():
            day = self.service_date(chain_steps[0].effective.start_at)
            counted = not chain_steps[0].effective.incomplete or self.feed.settings.cap_incomplete_journeys
            chain_caps = caps if counted else []
            remaining: int | None = None
            binding: FareCap | None = None
            for cap in chain_caps:
                left = max(0, cap.amount_minor - state.spent(cap.fare_cap_id, self._period_start(cap, day)))
                if remaining is None or left < remaining:
                    remaining, binding = left, cap
            running = floored_before = charged_before = 0
            reduction_total = 0
            for step in chain_steps:
                running += step.subtotal_minor
                floored = max(0, running)
                charged_total = floored if remaining is None else min(floored, remaining)
                floor_adjustment = (floored - floored_before) - step.subtotal_minor
                charged = charged_total - charged_before
                reduction = (floored - floored_before) - charged
                reduction_total += reduction
                floored_before, charged_before = floored, charged_total
                priced.append(self._priced(step, floor_adjustment, reduction, charged, day))
            for cap in chain_caps:
                period = self._period_start(cap, day)
                spent_before = state.spent(cap.fare_cap_id, period)
                state = state.add(cap.fare_cap_id, period, charged_before)
                key = (cap.fare_cap_id, period)
                earlier = applied.get(key)
                applied[key] = CapApplied(
                    cap.fare_cap_id, cap.source, cap.cap_period, period, cap.amount_minor,
                    earlier.spent_before_minor if earlier else spent_before,
                    state.spent(cap.fare_cap_id, period),
                    (earlier.reduction_minor if earlier else 0) + (reduction_total if cap is binding else 0),
                )
        return priced, list(applied.values()), state

    def _priced(self, step: _Step, floor_adjustment: int, reduction: int, charged: int, day: date) -> PricedLeg:
        leg = step.effective
        return PricedLeg(
            legs=tuple(item.index for item in leg.legs),
            network_id=leg.network_id,
            from_stop_id=leg.from_stop_id,
            to_stop_id=leg.to_stop_id,
            start_at=leg.start_at,
            end_at=leg.end_at,
            incomplete=leg.incomplete,
            distance_m=step.distance[0] if step.distance else None,
            distance_source=step.distance[1] if step.distance else None,
            joined_by=leg.joined_by,
            match=step.match,
            max_fare_rule=step.max_fare_rule,
            fare_minor=step.fare_minor,
            transfer=step.transfer,
            subtotal_minor=step.subtotal_minor,
            floor_adjustment_minor=floor_adjustment,
            cap_reduction_minor=reduction,
            charged_minor=charged,
            chain=step.chain,
            service_date=day,
        )
