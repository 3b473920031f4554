"""Times of day, dates, service days and service weeks.

GTFS times are "H:MM:SS" or "HH:MM:SS" counted from the start of a day; GTFS dates are
YYYYMMDD. CityTap's caps run over a *service day* that starts at a configurable local time
(04:30 by default), so a tap at 04:29 on Tuesday belongs to Monday's service day, and over
a *service week* of seven service days starting on a configurable weekday.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

_TIME = re.compile(r"^([0-9]{1,3}):([0-5][0-9]):([0-5][0-9])$")
_DATE = re.compile(r"^[0-9]{8}$")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def parse_time(text: str) -> int:
    """Seconds after the start of the day for "H:MM:SS"; ValueError when malformed."""
    match = _TIME.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a time in H:MM:SS or HH:MM:SS form")
    hours, minutes, seconds = (int(part) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_date(text: str) -> date:
    """A date from "YYYYMMDD"; ValueError when malformed or not a real date."""
    if not _DATE.match(text):
        raise ValueError(f"{text!r} is not a date in YYYYMMDD form")
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        raise ValueError(f"{text!r} is not a real calendar date") from None


def format_time(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


def local(moment: datetime, zone: ZoneInfo) -> datetime:
    """`moment` (timezone-aware) as wall-clock time in the feed's zone."""
    return moment.astimezone(zone)


def seconds_of_day(moment: datetime) -> int:
    return moment.hour * 3600 + moment.minute * 60 + moment.second


def service_date(moment: datetime, zone: ZoneInfo, day_start_s: int) -> date:
    """The service day `moment` belongs to: the local date, less one day before day_start."""
    wall = local(moment, zone).replace(tzinfo=None)
    return (wall - timedelta(seconds=day_start_s)).date()


def service_week_start(day: date, week_start: int) -> date:
    """The first service day of the service week that contains service day `day`."""
    return day - timedelta(days=(day.weekday() - week_start) % 7)
