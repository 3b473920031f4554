"""Human-readable breakdowns of a priced journey, for the CLI, gate screens and logs."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from services.fare_gate.fares.currency import CURRENCY_EXPONENTS, format_minor
from services.fare_gate.fares.engine import JourneyQuote, MaxFareQuote, PricedLeg
from services.fare_gate.fares.model import CapPeriod, DurationLimitType, Feed, FareTransferType

_TRANSFER_TYPES = {
    FareTransferType.A_PLUS_AB: "type 0: A + AB",
    FareTransferType.A_PLUS_AB_PLUS_B: "type 1: A + AB + B",
    FareTransferType.AB: "type 2: AB",
}
_LIMIT_TYPES = {
    DurationLimitType.DEPARTURE_TO_ARRIVAL: "departure -> arrival",
    DurationLimitType.DEPARTURE_TO_DEPARTURE: "departure -> departure",
    DurationLimitType.ARRIVAL_TO_DEPARTURE: "arrival -> departure",
    DurationLimitType.ARRIVAL_TO_ARRIVAL: "arrival -> arrival",
}


def minor_unit_note(currency: str) -> str:
    places = CURRENCY_EXPONENTS.get(currency, 2)
    return f"amounts in {currency}; 1 minor unit = {format_minor(1, currency)}" if places else f"amounts in whole {currency}"


def explain(quote: JourneyQuote, feed: Feed) -> list[str]:
    """Lines that show every step of the price: each leg, transfer and cap, then the total."""
    zone = ZoneInfo(feed.settings.timezone)
    money = lambda amount: format_minor(amount, quote.currency)  # noqa: E731
    lines = [
        f"rider category {quote.rider_category_id or '-'}, fare media {quote.fare_media_id or '-'}; "
        f"feed {feed.name} {quote.feed_version}; {minor_unit_note(quote.currency)}",
    ]
    for number, leg in enumerate(quote.legs, start=1):
        lines.append(f"leg {number}  {_leg_title(leg, feed, zone)}")
        if leg.joined_by:
            lines.append(f"        joined into one fare leg by {', '.join(leg.joined_by)}")
        if leg.incomplete:
            lines.append(f"        fare {money(leg.fare_minor)}  maximum fare for an incomplete journey ({leg.max_fare_rule})")
        elif leg.match is not None:
            match = leg.match
            more = f"; {match.other_matches} other rule(s) matched at that priority, cheapest taken" if match.other_matches else ""
            lines.append(f"        fare {money(leg.fare_minor)}  product {match.fare_product_id} from {match.rule} "
                         f"(leg group {match.leg_group_id or '-'}, priority {match.rule_priority}; price {match.fare_product_row}){more}")
        if leg.transfer is not None:
            transfer = leg.transfer
            window = ""
            if transfer.duration_limit_s is not None:
                window = (f"; {transfer.elapsed_s} s of {transfer.duration_limit_s} s allowed "
                          f"({_LIMIT_TYPES[transfer.duration_limit_type]})")  # type: ignore[index]
            product = f"product {transfer.fare_product_id} {money(transfer.amount_minor)}" if transfer.fare_product_id else "no product"
            lines.append(f"        transfer {money(transfer.adjustment_minor)}  {transfer.rule} "
                         f"{transfer.from_leg_group_id or '*'} -> {transfer.to_leg_group_id or '*'}, "
                         f"{_TRANSFER_TYPES[transfer.fare_transfer_type]}, {product}; transfer {transfer.transfer_number}{window}")
        if leg.floor_adjustment_minor:
            lines.append(f"        raised by {money(leg.floor_adjustment_minor)} so the journey does not go below zero")
        if leg.cap_reduction_minor:
            lines.append(f"        capped {money(-leg.cap_reduction_minor)}")
        lines.append(f"        charged {money(leg.charged_minor)}  (service day {leg.service_date.isoformat()})")
    for cap in quote.caps:
        period = "day" if cap.cap_period == CapPeriod.SERVICE_DAY else "week"
        lines.append(f"cap     {cap.fare_cap_id} ({cap.rule}) {money(cap.amount_minor)} per service {period} from "
                     f"{cap.period_start.isoformat()}: {money(cap.spent_before_minor)} before, {money(cap.spent_after_minor)} after"
                     + (f", took off {money(cap.reduction_minor)}" if cap.reduction_minor else ""))
    fares = sum(leg.fare_minor for leg in quote.legs)
    lines.append(f"total   {money(quote.total_minor)}  (fares {money(fares)}, transfers {money(quote.transfer_adjustment_minor)}, "
                 f"caps {money(-quote.cap_reduction_minor)})")
    return lines


def explain_max_fare(quote: MaxFareQuote) -> str:
    after = f"; incomplete after {quote.incomplete_after_s} s" if quote.incomplete_after_s else ""
    return f"maximum fare on {quote.network_id}: {format_minor(quote.amount_minor, quote.currency)} ({quote.rule}){after}"


def _leg_title(leg: PricedLeg, feed: Feed, zone: ZoneInfo) -> str:
    def stop(stop_id: str | None) -> str:
        if stop_id is None:
            return "?"
        return f"{stop_id} {feed.stops[stop_id].stop_name}" if feed.stops[stop_id].stop_name != stop_id else stop_id

    def when(moment: datetime | None) -> str:
        return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M") if moment else "?"

    to = "no exit (incomplete)" if leg.incomplete else stop(leg.to_stop_id)
    text = f"{leg.network_id or '-'}  {stop(leg.from_stop_id)} -> {to}  {when(leg.start_at)}"
    if leg.end_at is not None:
        same_day = leg.end_at.astimezone(zone).date() == leg.start_at.astimezone(zone).date()
        text += f" -> {leg.end_at.astimezone(zone).strftime('%H:%M')}" if same_day else f" -> {when(leg.end_at)}"
    if leg.distance_m is not None:
        text += f"  {leg.distance_m / 1000:.3f} km ({leg.distance_source})"
    return text


def quote_to_dict(quote: JourneyQuote) -> dict[str, Any]:
    """A JSON-ready form of the quote (amounts stay integer minor units)."""
    def leg_dict(leg: PricedLeg) -> dict[str, Any]:
        return {
            "legs": list(leg.legs),
            "network_id": leg.network_id,
            "from_stop_id": leg.from_stop_id,
            "to_stop_id": leg.to_stop_id,
            "start_at": leg.start_at.isoformat(),
            "end_at": leg.end_at.isoformat() if leg.end_at else None,
            "incomplete": leg.incomplete,
            "distance_m": leg.distance_m,
            "joined_by": list(leg.joined_by),
            "rule": leg.match.rule if leg.match else leg.max_fare_rule,
            "fare_product_id": leg.match.fare_product_id if leg.match else None,
            "leg_group_id": leg.match.leg_group_id if leg.match else None,
            "fare_minor": leg.fare_minor,
            "transfer": None if leg.transfer is None else {
                "rule": leg.transfer.rule,
                "fare_transfer_type": int(leg.transfer.fare_transfer_type),
                "fare_product_id": leg.transfer.fare_product_id,
                "amount_minor": leg.transfer.amount_minor,
                "adjustment_minor": leg.transfer.adjustment_minor,
                "transfer_number": leg.transfer.transfer_number,
                "elapsed_s": leg.transfer.elapsed_s,
            },
            "subtotal_minor": leg.subtotal_minor,
            "floor_adjustment_minor": leg.floor_adjustment_minor,
            "cap_reduction_minor": leg.cap_reduction_minor,
            "charged_minor": leg.charged_minor,
            "chain": leg.chain,
            "service_date": leg.service_date.isoformat(),
        }

    return {
        "feed_version": quote.feed_version,
        "currency": quote.currency,
        "rider_category_id": quote.rider_category_id,
        "fare_media_id": quote.fare_media_id,
        "legs": [leg_dict(leg) for leg in quote.legs],
        "caps": [{
            "fare_cap_id": cap.fare_cap_id, "rule": cap.rule, "cap_period": int(cap.cap_period),
            "period_start": cap.period_start.isoformat(), "amount_minor": cap.amount_minor,
            "spent_before_minor": cap.spent_before_minor, "spent_after_minor": cap.spent_after_minor,
            "reduction_minor": cap.reduction_minor,
        } for cap in quote.caps],
        "fare_before_caps_minor": quote.fare_before_caps_minor,
        "cap_reduction_minor": quote.cap_reduction_minor,
        "total_minor": quote.total_minor,
        "cap_state_after": quote.cap_state_after.to_dict(),
    }
