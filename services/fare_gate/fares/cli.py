"""`python -m services.fare_gate.fares`: price journeys and check feeds with no server running.

    quote     --feed PATH [--category ID] [--media ID] [--cap-state FILE] [--json] --leg LEG...
    validate  --feed PATH
    max-fare  --feed PATH --network ID [--category ID] [--media ID]

A LEG is  WHERE:FROM-TO@START[/END]
    WHERE   a network_id or a route_id (networks are tried first)
    FROM-TO stop_ids; `FROM-?` is an entry with no exit (an incomplete journey, charged the
            maximum fare); a lone `FROM` is a leg validated only on boarding (flat-fare bus).
            Stop ids may contain "-": the split that names two known stops is used.
    START   local date and time, 2026-12-01T08:00 (seconds and a UTC offset such as +08:00
            are optional; without an offset the feed's timezone is meant)
    END     the same, or just 08:25 for the same day (the next day if earlier than START)

Exit status: 0 priced / feed OK; 1 the feed is invalid or the journey cannot be priced;
2 the command line is wrong (unknown option, malformed leg, no such feed path).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta, time
from pathlib import Path
from zoneinfo import ZoneInfo

from services.fare_gate.fares.engine import FareEngine
from services.fare_gate.fares.errors import FareError, FeedError
from services.fare_gate.fares.explain import explain, explain_max_fare, quote_to_dict
from services.fare_gate.fares.loader import check_feed
from services.fare_gate.fares.model import Feed
from services.fare_gate.fares.state import CapState, Leg

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """The command line cannot be understood; the message says how to fix it."""


def parse_leg(text: str, feed: Feed) -> Leg:
    """Parse one --leg value against the feed's networks, routes and stops."""
    where, sep, rest = text.partition(":")
    stops_part, at, when = rest.partition("@")
    if not sep or not at or not where or not stops_part or not when:
        raise UsageError(f"leg {text!r}: expected WHERE:FROM-TO@START[/END], e.g. metro:R1-R4@2026-12-01T08:00")
    network_id = route_id = None
    known_networks = set(feed.networks) | {r.network_id for r in feed.routes.values() if r.network_id}
    if where in known_networks:
        network_id = where
    elif where in feed.routes:
        route_id = where
    else:
        raise UsageError(f"leg {text!r}: {where!r} is neither a network nor a route of the feed")
    from_stop, to_stop, incomplete = _split_stops(stops_part, feed, text)
    zone = ZoneInfo(feed.settings.timezone)
    start_text, _, end_text = when.partition("/")
    start_at = _parse_moment(start_text, zone, text)
    end_at = None
    if end_text:
        if "T" in end_text:
            end_at = _parse_moment(end_text, zone, text)
        else:
            try:
                clock = time.fromisoformat(end_text)
            except ValueError:
                raise UsageError(f"leg {text!r}: end {end_text!r} is not HH:MM or a date and time") from None
            local_start = start_at.astimezone(zone)
            end_at = datetime.combine(local_start.date(), clock, tzinfo=zone)
            if end_at < local_start:
                end_at += timedelta(days=1)
    if incomplete and end_at is not None:
        raise UsageError(f"leg {text!r}: an incomplete leg (FROM-?) has no end time")
    return Leg(from_stop, start_at, to_stop, end_at, network_id, route_id, incomplete)


def _split_stops(text: str, feed: Feed, leg_text: str) -> tuple[str, str | None, bool]:
    if text in feed.stops:
        return text, None, False
    if text.endswith("-?") and text[:-2] in feed.stops:
        return text[:-2], None, True
    splits = [(text[:i], text[i + 1:]) for i, char in enumerate(text) if char == "-"]
    known = [(a, b) for a, b in splits if a in feed.stops and b in feed.stops]
    if len(known) == 1:
        return known[0][0], known[0][1], False
    if len(known) > 1:
        raise UsageError(f"leg {leg_text!r}: {text!r} splits into stops more than one way")
    unknown = sorted({part for pair in splits for part in pair if part not in feed.stops} or {text})
    raise UsageError(f"leg {leg_text!r}: unknown stop(s) {', '.join(unknown)}")


def _parse_moment(text: str, zone: ZoneInfo, leg_text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"leg {leg_text!r}: {text!r} is not a date and time such as 2026-12-01T08:00") from None
    return moment.replace(tzinfo=zone) if moment.tzinfo is None else moment


def _load(path: str, out: "TextOut") -> Feed | None:
    if not Path(path).exists():
        raise UsageError(f"no such feed folder or zip: {path}")
    feed, problems = check_feed(path)
    if problems:
        for problem in problems:
            out.err(str(problem))
        out.err(f"feed INVALID: {len(problems)} problem(s)")
        return None
    return feed


class TextOut:
    def __init__(self, stdout, stderr) -> None:  # type: ignore[no-untyped-def]
        self.stdout, self.stderr = stdout, stderr

    def out(self, line: str) -> None:
        print(line, file=self.stdout)

    def err(self, line: str) -> None:
        print(line, file=self.stderr)


def _validate(args: argparse.Namespace, out: TextOut) -> int:
    feed = _load(args.feed, out)
    if feed is None:
        return EXIT_FAILED
    out.out(f"feed OK: {feed.name} version {feed.version}, {len(feed.fare_leg_rules)} fare leg rules, "
            f"{len(feed.distance_fare_rules)} distance fare rules, {len(feed.fare_transfer_rules)} transfer rules, "
            f"{len(feed.fare_leg_join_rules)} join rules, {sum(len(rows) for rows in feed.fare_products.values())} fare product rows, "
            f"{len(feed.fare_caps)} caps, {len(feed.max_fares)} maximum fares, {len(feed.stops)} stops; "
            f"timezone {feed.settings.timezone}, currency {feed.currency}")
    return EXIT_OK


def _quote(args: argparse.Namespace, out: TextOut) -> int:
    feed = _load(args.feed, out)
    if feed is None:
        return EXIT_FAILED
    legs = [parse_leg(text, feed) for text in args.leg]
    cap_state = CapState()
    if args.cap_state:
        try:
            cap_state = CapState.from_dict(json.loads(Path(args.cap_state).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--cap-state {args.cap_state}: not a readable cap state JSON file ({exc})") from None
    engine = FareEngine(feed)
    try:
        quote = engine.price_journey(legs, rider_category_id=args.category, fare_media_id=args.media, cap_state=cap_state)
    except FareError as exc:
        out.err(f"cannot price: {exc.reason}: {exc.message}")
        return EXIT_FAILED
    if args.json:
        out.out(json.dumps(quote_to_dict(quote), indent=2))
    else:
        for line in explain(quote, feed):
            out.out(line)
    return EXIT_OK


def _max_fare(args: argparse.Namespace, out: TextOut) -> int:
    feed = _load(args.feed, out)
    if feed is None:
        return EXIT_FAILED
    try:
        quote = FareEngine(feed).max_fare(args.network, args.category, args.media)
    except FareError as exc:
        out.err(f"cannot price: {exc.reason}: {exc.message}")
        return EXIT_FAILED
    out.out(explain_max_fare(quote))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.fare_gate.fares", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    quote = commands.add_parser("quote", help="price a journey and show every step")
    quote.add_argument("--feed", required=True, help="feed folder or .zip")
    quote.add_argument("--category", help="rider_category_id (default: the feed's default category)")
    quote.add_argument("--media", help="fare_media_id, such as card")
    quote.add_argument("--leg", action="append", required=True, help="WHERE:FROM-TO@START[/END]; repeat for each leg")
    quote.add_argument("--cap-state", help="JSON file with the rider's prior charges (CapState.to_dict())")
    quote.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    validate = commands.add_parser("validate", help="check a feed and list every problem")
    validate.add_argument("--feed", required=True, help="feed folder or .zip")
    maximum = commands.add_parser("max-fare", help="the maximum fare an entry holds on a network")
    maximum.add_argument("--feed", required=True, help="feed folder or .zip")
    maximum.add_argument("--network", required=True, help="network_id")
    maximum.add_argument("--category", help="rider_category_id")
    maximum.add_argument("--media", help="fare_media_id")
    return parser


def main(argv: Sequence[str] | None = None, stdout=None, stderr=None) -> int:  # type: ignore[no-untyped-def]
    out = TextOut(stdout or sys.stdout, stderr or sys.stderr)
    args = build_parser().parse_args(argv)
    handlers = {"quote": _quote, "validate": _validate, "max-fare": _max_fare}
    try:
        return handlers[args.command](args, out)
    except UsageError as exc:
        out.err(f"usage error: {exc}")
        return EXIT_USAGE
    except FeedError as exc:  # pragma: no cover - _load reports problems itself
        for problem in exc.problems:
            out.err(str(problem))
        return EXIT_FAILED
