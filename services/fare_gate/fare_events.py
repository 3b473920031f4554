"""The facts fare-gate publishes, as `FareGateEvent` envelopes for the outbox.

Topic `citytap.fare_gate.v1.events`, keyed by the rider account (empty for a tap that
matched no account). Event ids are derived from the tap or journey they describe, so a fact
can only ever be written once. The card itself never travels: only its kind.
"""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from citytap.fare_gate.v1 import events_pb2
from libs.protos import money_pb
from services.fare_gate.domain import Journey, JourneyEnd, Tap, TapOutcome, event_id_for

TOPIC = "citytap.fare_gate.v1.events"


def _ts(moment: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _envelope(subject: str, kind: str, account_id: str | None, occurred_at: datetime, **payload: object
              ) -> events_pb2.FareGateEvent:
    return events_pb2.FareGateEvent(event_id=event_id_for(subject, kind), occurred_at=_ts(occurred_at),
                                    account_key=account_id or "", **payload)


def tap_recorded(tap: Tap, outcome: TapOutcome, account_id: str | None, occurred_at: datetime
                 ) -> events_pb2.FareGateEvent:
    return _envelope(tap.tap_id, "TapRecorded", account_id, occurred_at, tap_recorded=events_pb2.TapRecorded(
        tap_id=tap.tap_id, gate_id=tap.gate_id, stop_id=tap.stop_id, direction=int(tap.direction),
        tapped_at=_ts(tap.tapped_at), credential_kind=int(tap.credential_kind),
        decision=int(outcome.decision), reason=int(outcome.reason),
        fare_charged=money_pb(outcome.fare_charged_minor, outcome.currency), journey_id=outcome.journey_id,
        offline=False, route_id=tap.route_id or ""))


def journey_started(journey: Journey, occurred_at: datetime) -> events_pb2.FareGateEvent:
    return _envelope(journey.journey_id, "JourneyStarted", journey.account_id, occurred_at,
                     journey_started=events_pb2.JourneyStarted(
                         journey_id=journey.journey_id, entry_tap_id=journey.entry_tap_id,
                         entry_stop_id=journey.entry_stop_id, started_at=_ts(journey.started_at),
                         hold_id=journey.hold_id or "",
                         amount_held=money_pb(journey.amount_held_minor, journey.currency),
                         network_id=journey.network_id, entry_gate_id=journey.entry_gate_id))


def journey_completed(journey: Journey, end: JourneyEnd) -> events_pb2.FareGateEvent:
    return _envelope(journey.journey_id, "JourneyCompleted", journey.account_id, end.closed_at,
                     journey_completed=events_pb2.JourneyCompleted(
                         journey_id=journey.journey_id, entry_tap_id=journey.entry_tap_id,
                         exit_tap_id=end.exit_tap_id or "", entry_stop_id=journey.entry_stop_id,
                         exit_stop_id=end.exit_stop_id or "", started_at=_ts(journey.started_at),
                         ended_at=_ts(end.ended_at or journey.started_at),
                         fare=money_pb(end.fare_minor, journey.currency), fare_product_id=end.fare_product_id or "",
                         transfer_id=end.transfer_id, network_id=journey.network_id,
                         rider_category=journey.rider_category or ""))


def journey_incomplete(journey: Journey, end: JourneyEnd) -> events_pb2.FareGateEvent:
    return _envelope(journey.journey_id, "JourneyIncomplete", journey.account_id, end.closed_at,
                     journey_incomplete=events_pb2.JourneyIncomplete(
                         journey_id=journey.journey_id, entry_tap_id=journey.entry_tap_id,
                         entry_stop_id=journey.entry_stop_id, started_at=_ts(journey.started_at),
                         closed_at=_ts(end.closed_at), fare=money_pb(end.fare_minor, journey.currency),
                         transfer_id=end.transfer_id, network_id=journey.network_id))

