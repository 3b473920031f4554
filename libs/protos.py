"""Conversions at the protobuf boundary that every service needs the same way."""

from __future__ import annotations

from datetime import datetime, timezone

from google.protobuf.timestamp_pb2 import Timestamp

from citytap.common.v1 import money_pb2


def money_pb(amount_minor: int, currency: str) -> money_pb2.Money:
    """A `citytap.common.v1.Money` of integer minor units."""
    return money_pb2.Money(amount_minor=amount_minor, currency=currency)


def timestamp_pb(moment: datetime) -> Timestamp:
    """A protobuf Timestamp of an aware datetime (naive datetimes are refused: their zone is a guess)."""
    if moment.tzinfo is None:
        raise ValueError("a timestamp needs a timezone-aware datetime")
    stamp = Timestamp()
    stamp.FromDatetime(moment.astimezone(timezone.utc))
    return stamp
