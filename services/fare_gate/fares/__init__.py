"""CityTap's fare engine: GTFS-Fares v2 feeds plus documented CityTap extensions.

Pure domain: it reads a feed from a folder or zip once (`load_feed`) and otherwise does no
I/O; it imports no grpc, kafka, redis, psycopg or stripe. Money is integer minor units of
the feed's currency (TWD: 1 minor unit = NT$0.01, so NT$20 = 2000). See ../FARES.md.

    engine = FareEngine.from_path("services/fare_gate/feeds/demo_city")
    quote = engine.price_journey([Leg("HBR", start, "UNI", end, network_id="metro")],
                                 rider_category_id="adult", fare_media_id="card",
                                 cap_state=prior_caps)
    quote.total_minor, quote.cap_state_after, quote.legs[0].match.rule

    charge = engine.charge_leg(rider_state, leg, rider_category_id="adult")   # tap by tap
    engine.max_fare("metro", "adult", "card")                                 # entry hold
"""

from services.fare_gate.fares.engine import (
    CapApplied,
    FareEngine,
    JourneyQuote,
    LegCharge,
    LegRuleMatch,
    MaxFareQuote,
    PricedLeg,
    TransferApplied,
)
from services.fare_gate.fares.errors import FareError, FeedError, Problem
from services.fare_gate.fares.loader import check_feed, load_feed
from services.fare_gate.fares.model import Feed
from services.fare_gate.fares.state import CapCounter, CapState, Leg, RiderFareState

__all__ = [
    "CapApplied",
    "CapCounter",
    "CapState",
    "FareEngine",
    "FareError",
    "Feed",
    "FeedError",
    "JourneyQuote",
    "Leg",
    "LegCharge",
    "LegRuleMatch",
    "MaxFareQuote",
    "PricedLeg",
    "Problem",
    "RiderFareState",
    "TransferApplied",
    "check_feed",
    "load_feed",
]
