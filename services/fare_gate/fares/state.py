"""What a caller hands the engine and keeps between calls: legs, cap counters, open journeys.

All of it is immutable and turns into plain JSON-ready dicts (`to_dict` / `from_dict`), so
the tap path can keep it in PostgreSQL: a rider's `CapState` as rows of
(account_id, fare_cap_id, period_start, spent_minor), or the whole `RiderFareState` as one
jsonb value per account, updated in the same transaction that posts the fare.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any

# A rider's counters stay small: a few periods for each cap the feed defines.
PERIODS_KEPT_PER_CAP = 8
CAP_COUNTERS_MAX = 256
# An open journey with more legs than this is closed and a new one begun.
OPEN_LEGS_MAX = 16


@dataclass(frozen=True, slots=True)
class Leg:
    """One ride: board at `from_stop_id` at `start_at`, alight at `to_stop_id` at `end_at`.

    Times must be timezone-aware. The network comes from `network_id`, or from `route_id`
    through routes.txt / route_networks.txt. `to_stop_id` and `end_at` may be None for a
    leg validated only on boarding (a flat-fare bus); such a leg matches only rules that do
    not depend on where it ends. `incomplete` marks an entry that never got an exit: it is
    charged the network's maximum fare and takes part in no transfer.
    """

    from_stop_id: str
    start_at: datetime
    to_stop_id: str | None = None
    end_at: datetime | None = None
    network_id: str | None = None
    route_id: str | None = None
    incomplete: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "from_stop_id": self.from_stop_id,
            "start_at": self.start_at.isoformat(),
            "to_stop_id": self.to_stop_id,
            "end_at": self.end_at.isoformat() if self.end_at else None,
            "network_id": self.network_id,
            "route_id": self.route_id,
            "incomplete": self.incomplete,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Leg:
        return cls(
            from_stop_id=data["from_stop_id"],
            start_at=datetime.fromisoformat(data["start_at"]),
            to_stop_id=data.get("to_stop_id"),
            end_at=datetime.fromisoformat(data["end_at"]) if data.get("end_at") else None,
            network_id=data.get("network_id"),
            route_id=data.get("route_id"),
            incomplete=bool(data.get("incomplete", False)),
        )


@dataclass(frozen=True, slots=True)
class CapCounter:
    """How much counted toward one cap in one period (service day or service week)."""

    fare_cap_id: str
    period_start: date  # the service day, or the first service day of the service week
    spent_minor: int


@dataclass(frozen=True, slots=True)
class CapState:
    """A rider's charges toward each cap, for the current period of each cap.

    Each cap keeps counters for its PERIODS_KEPT_PER_CAP most recent periods (so a late,
    offline tap for yesterday still finds yesterday's counter) and drops older ones, so the
    state stays small.
    """

    counters: tuple[CapCounter, ...] = ()

    def spent(self, fare_cap_id: str, period_start: date) -> int:
        for counter in self.counters:
            if counter.fare_cap_id == fare_cap_id and counter.period_start == period_start:
                return counter.spent_minor
        return 0

    def add(self, fare_cap_id: str, period_start: date, amount_minor: int) -> CapState:
        """A new state with `amount_minor` more counted toward the cap in that period."""
        spent = self.spent(fare_cap_id, period_start) + amount_minor
        others = [c for c in self.counters if not (c.fare_cap_id == fare_cap_id and c.period_start == period_start)]
        same_cap = sorted((c for c in others if c.fare_cap_id == fare_cap_id), key=lambda c: c.period_start)
        same_cap.append(CapCounter(fare_cap_id, period_start, spent))
        same_cap.sort(key=lambda c: c.period_start)
        kept = [c for c in others if c.fare_cap_id != fare_cap_id] + same_cap[-PERIODS_KEPT_PER_CAP:]
        kept.sort(key=lambda c: (c.fare_cap_id, c.period_start))
        return CapState(tuple(kept[-CAP_COUNTERS_MAX:]))

    def to_dict(self) -> dict[str, Any]:
        return {"counters": [
            {"fare_cap_id": c.fare_cap_id, "period_start": c.period_start.isoformat(), "spent_minor": c.spent_minor}
            for c in self.counters
        ]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CapState:
        counters = tuple(
            CapCounter(item["fare_cap_id"], date.fromisoformat(item["period_start"]), int(item["spent_minor"]))
            for item in data.get("counters", [])
        )
        return cls(counters[:CAP_COUNTERS_MAX])


@dataclass(frozen=True, slots=True)
class RiderFareState:
    """Everything the engine needs to charge a rider's next leg, between taps.

    `cap_state` counts every charge so far, including the open journey's. The open journey
    is the chain of legs that a next leg may still transfer from or join; its charges so
    far are `open_charged_minor`, and `open_cap_state` is the cap state from before it
    began, so that pricing the journey again with one more leg is exact.
    """

    cap_state: CapState = field(default_factory=CapState)
    open_legs: tuple[Leg, ...] = ()
    open_cap_state: CapState = field(default_factory=CapState)
    open_charged_minor: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "cap_state": self.cap_state.to_dict(),
            "open_legs": [leg.to_dict() for leg in self.open_legs],
            "open_cap_state": self.open_cap_state.to_dict(),
            "open_charged_minor": self.open_charged_minor,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RiderFareState:
        return cls(
            cap_state=CapState.from_dict(data.get("cap_state", {})),
            open_legs=tuple(Leg.from_dict(item) for item in data.get("open_legs", [])),
            open_cap_state=CapState.from_dict(data.get("open_cap_state", {})),
            open_charged_minor=int(data.get("open_charged_minor", 0)),
        )

    def closed(self) -> RiderFareState:
        """The same state with no open journey (nothing more can transfer from it)."""
        return replace(self, open_legs=(), open_cap_state=self.cap_state, open_charged_minor=0)
