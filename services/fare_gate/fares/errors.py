"""The fare engine's errors.

    libs.errors.InvalidArgument
    ├── FeedError    a feed has problems; `problems` lists every one (file, line, field)
    └── FareError    a journey cannot be priced; `reason` says why (machine-readable)

Both carry the project's machine-readable `reason`, so a gRPC handler that lets one escape
answers INVALID_ARGUMENT with that reason. A feed with any problem raises FeedError from
`load_feed` and is never handed to an engine: nothing prices from half a feed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from libs.errors import InvalidArgument

# FareError reasons, each a stable string a caller can switch on.
UNKNOWN_STOP = "UNKNOWN_STOP"
UNKNOWN_NETWORK = "UNKNOWN_NETWORK"
UNKNOWN_ROUTE = "UNKNOWN_ROUTE"
UNKNOWN_RIDER_CATEGORY = "UNKNOWN_RIDER_CATEGORY"
UNKNOWN_FARE_MEDIA = "UNKNOWN_FARE_MEDIA"
NO_DEFAULT_RIDER_CATEGORY = "NO_DEFAULT_RIDER_CATEGORY"
NETWORK_REQUIRED = "NETWORK_REQUIRED"
INVALID_LEG = "INVALID_LEG"
NO_FARE = "NO_FARE"
NO_MAX_FARE = "NO_MAX_FARE"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a feed: where it is and what is wrong.

    `line` counts from 1 like an editor does (the header is line 1, the first record line 2);
    it is None when the problem is about a whole file. `field` is None when no single field
    is at fault (a missing file, a row with the wrong number of cells).
    """

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f":{self.field}"
        return f"{where}: {self.message}"


class FeedError(InvalidArgument):
    """The feed cannot be served; `problems` holds every problem found, in file order."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        first = str(self.problems[0]) if self.problems else "no details"
        super().__init__("INVALID_FEED", f"{len(self.problems)} problem(s) in the fare feed, first: {first}")


class FareError(InvalidArgument):
    """A journey, leg, rider category or fare media that this feed cannot price."""
