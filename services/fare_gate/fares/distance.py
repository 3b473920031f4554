"""Distances between stops, in whole metres, for distance-band fares.

Where the feed lists distances between stops (citytap_stop_distances.txt, typically the
track length between adjacent stations), the distance between two stops is the shortest
path over those listed pairs, in either direction: listing each line's adjacent stations
is enough, and an interchange station joins the lines. Only when two stops are not
connected by listed pairs and both have coordinates does the engine fall back to the
great-circle distance between them, rounded to the nearest metre. A listed path always
wins over coordinates, because fares follow track length, not a straight line.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Iterable

from services.fare_gate.fares.model import Stop

EARTH_RADIUS_M = 6_371_008.8  # mean Earth radius (IUGG)


def great_circle_m(a: Stop, b: Stop) -> int | None:
    """Haversine distance between two stops with coordinates, rounded to whole metres."""
    if a.lat is None or a.lon is None or b.lat is None or b.lon is None:
        return None
    lat1, lat2 = math.radians(a.lat), math.radians(b.lat)
    dlat = lat2 - lat1
    dlon = math.radians(b.lon - a.lon)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return round(2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h))))


class StopDistances:
    """Shortest listed-path distances between stops, with a coordinate fallback."""

    def __init__(self, pairs: Iterable[tuple[str, str, int, str]], stops: dict[str, Stop]) -> None:
        self._stops = stops
        self._edges: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for origin, target, metres, _source in pairs:
            self._edges[origin].append((target, metres))
            self._edges[target].append((origin, metres))
        # Shortest paths from each source, filled on first use. Writing a finished dict into
        # this cache is idempotent, so concurrent readers at worst compute it twice.
        self._from: dict[str, dict[str, int]] = {}

    def between(self, origin: str, target: str) -> tuple[int, str] | None:
        """(metres, how) from `origin` to `target`; how is "table" or "coordinates"; None if unknown."""
        if origin == target:
            return 0, "same stop"
        for a, b in ((origin, target), (self._station(origin), self._station(target))):
            if a in self._edges and b in self._edges:
                reach = self._shortest_from(a)
                if b in reach:
                    return reach[b], "table"
        metres = great_circle_m(self._stops[origin], self._stops[target]) if origin in self._stops and target in self._stops else None
        return (metres, "coordinates") if metres is not None else None

    def _station(self, stop_id: str) -> str:
        stop = self._stops.get(stop_id)
        return stop.parent_station if stop is not None and stop.parent_station else stop_id

    def _shortest_from(self, source: str) -> dict[str, int]:
        cached = self._from.get(source)
        if cached is not None:
            return cached
        best = {source: 0}
        queue = [(0, source)]
        while queue:
            metres, stop_id = heapq.heappop(queue)
            if metres > best.get(stop_id, math.inf):
                continue
            for neighbour, step in self._edges[stop_id]:
                candidate = metres + step
                if candidate < best.get(neighbour, math.inf):
                    best[neighbour] = candidate
                    heapq.heappush(queue, (candidate, neighbour))
        self._from[source] = best
        return best
