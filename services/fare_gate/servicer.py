"""The gRPC edge of fare-gate: proto in, use case, proto out. No decisions are made here.

Errors are `libs.errors` exceptions, mapped to status codes by the shared interceptor.
GetGateBundle and UploadOfflineTaps are not overridden, so the generated base class answers
UNIMPLEMENTED: offline mode is not part of issue 4.
"""

from __future__ import annotations

from datetime import datetime, timezone

import grpc

from citytap.fare_gate.v1 import fare_gate_pb2, fare_gate_pb2_grpc
from libs import errors
from libs.grpc_server import Registration
from libs.protos import money_pb
from services.fare_gate.domain import CredentialKind, FaceProbe, GateKind, TapInput, TapOutcome
from services.fare_gate.fares import FareError
from services.fare_gate.taps import TapService

SERVICE_NAME = fare_gate_pb2.DESCRIPTOR.services_by_name["FareGateService"].full_name
# A tap with less time than this left before its deadline is not started: one wallet round
# trip alone takes a few milliseconds.
TAP_WORK_S_MIN = 0.005

_CREDENTIAL_KINDS = {
    "card_uid": CredentialKind.CARD,
    "phone_qr": CredentialKind.PHONE_QR,
    "nfc_token": CredentialKind.NFC,
    "face_embedding": CredentialKind.FACE,
    "face_frames": CredentialKind.FACE,
}
_NOT_FOUND_FARE_REASONS = {"UNKNOWN_STOP": "stop", "UNKNOWN_ROUTE": "route", "UNKNOWN_NETWORK": "network"}
_FARE_REASON_FIELDS = {"UNKNOWN_RIDER_CATEGORY": "rider_category", "UNKNOWN_FARE_MEDIA": "fare_media_id"}


def _time(message: object, field: str) -> datetime | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    return getattr(message, field).ToDatetime(tzinfo=timezone.utc)


def tap_input(request: fare_gate_pb2.TapRequest) -> TapInput:
    kind = request.credential.WhichOneof("kind") if request.HasField("credential") else None
    credential = request.credential
    face = None
    if kind == "face_embedding":
        face = FaceProbe(embedding=tuple(credential.face_embedding.values))
    elif kind == "face_frames":
        face = FaceProbe(frames=tuple(credential.face_frames.frames))
    return TapInput(
        tap_id=request.tap_id, gate_id=request.gate_id, stop_id=request.stop_id, direction=int(request.direction),
        tapped_at=_time(request, "tapped_at"), credential_kind=_CREDENTIAL_KINDS.get(kind) if kind else None,
        card_uid=credential.card_uid if kind == "card_uid" else b"", route_id=request.route_id,
        phone_qr=credential.phone_qr if kind == "phone_qr" else b"",
        nfc_token=credential.nfc_token if kind == "nfc_token" else "", face=face)


def tap_response(outcome: TapOutcome) -> fare_gate_pb2.TapResponse:
    response = fare_gate_pb2.TapResponse(
        decision=int(outcome.decision), reason=int(outcome.reason),
        fare_charged=money_pb(outcome.fare_charged_minor, outcome.currency),
        amount_held=money_pb(outcome.amount_held_minor, outcome.currency), journey_id=outcome.journey_id)
    if outcome.balance_minor is not None:
        response.balance.CopyFrom(money_pb(outcome.balance_minor, outcome.currency))
    return response


def fare_error(exc: FareError, field: str = "") -> errors.CityTapError:
    """A fare engine refusal as a contract reason (the engine's own reason goes in metadata)."""
    if exc.reason in _NOT_FOUND_FARE_REASONS:
        return errors.NotFound("NOT_FOUND", exc.message, resource=_NOT_FOUND_FARE_REASONS[exc.reason],
                               fare_reason=exc.reason)
    return errors.InvalidArgument("INVALID_ARGUMENT", exc.message, field=_FARE_REASON_FIELDS.get(exc.reason, field),
                                  fare_reason=exc.reason)


class FareGateServicer(fare_gate_pb2_grpc.FareGateServiceServicer):
    """Tap, QuoteFare and GetGateConfig over the tap service; attached once it is built."""

    def __init__(self, service: TapService | None = None, *, gate_settings: dict[str, int] | None = None) -> None:
        self._service = service
        self._gate_settings = gate_settings or {}

    def attach(self, service: TapService, *, gate_settings: dict[str, int]) -> None:
        self._service = service
        self._gate_settings = gate_settings

    @property
    def service(self) -> TapService:
        if self._service is None:
            raise errors.Unavailable("UNAVAILABLE", "fare-gate is still starting")
        return self._service

    def Tap(self, request: fare_gate_pb2.TapRequest, context: grpc.ServicerContext) -> fare_gate_pb2.TapResponse:
        remaining_s = context.time_remaining()
        if remaining_s is not None and remaining_s < TAP_WORK_S_MIN:
            # The tap waited in the queue until its gate gave up on it: deciding it now would
            # spend the wallet's and the database's time on an answer nobody reads, and under
            # overload that is what turns a backlog into a collapse. The gate decides offline
            # or retries with the same tap id.
            raise errors.Unavailable("UNAVAILABLE", "the tap's deadline passed before it could be decided")
        return tap_response(self.service.tap(tap_input(request)))

    def QuoteFare(self, request: fare_gate_pb2.QuoteFareRequest,
                  context: grpc.ServicerContext) -> fare_gate_pb2.QuoteFareResponse:
        service = self.service
        engine = service.engine
        if not request.from_stop_id:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "from_stop_id is required", field="from_stop_id")
        network_id = request.network_id or None
        route_id = request.route_id or None
        if network_id is None and route_id is None:
            networks = {g.network_id for g in service.gates.values() if g.stop_id == request.from_stop_id}
            if len(networks) != 1:
                raise errors.InvalidArgument(
                    "INVALID_ARGUMENT", f"name network_id or route_id: stop {request.from_stop_id} has gates of "
                    f"{len(networks)} networks", field="network_id")
            network_id = networks.pop()
        start_at = _time(request, "start_at") or datetime.now(timezone.utc)
        try:
            quote = engine.quote(request.from_stop_id, request.to_stop_id or None, start_at,
                                 end_at=_time(request, "end_at"), network_id=network_id, route_id=route_id,
                                 rider_category_id=request.rider_category or None,
                                 fare_media_id=request.fare_media_id or service.config.fare_media_id)
        except FareError as exc:
            raise fare_error(exc) from exc
        leg = quote.legs[0]
        return fare_gate_pb2.QuoteFareResponse(
            fare=money_pb(quote.total_minor, quote.currency),
            fare_product_id=leg.match.fare_product_id if leg.match else "", feed_version=quote.feed_version,
            network_id=leg.network_id or "")

    def GetGateConfig(self, request: fare_gate_pb2.GetGateConfigRequest,
                      context: grpc.ServicerContext) -> fare_gate_pb2.GetGateConfigResponse:
        service = self.service
        if not request.gate_id:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "gate_id is required", field="gate_id")
        gate = service.gates.get(request.gate_id)
        if gate is None:
            raise errors.NotFound("NOT_FOUND", f"no gate {request.gate_id!r}", resource="gate", field="gate_id")
        settings = self._gate_settings
        return fare_gate_pb2.GetGateConfigResponse(config=fare_gate_pb2.GateConfig(
            gate_id=gate.gate_id, stop_id=gate.stop_id or "",
            kind=fare_gate_pb2.GATE_KIND_STATION_GATE if gate.kind is GateKind.STATION_GATE
            else fare_gate_pb2.GATE_KIND_VEHICLE_VALIDATOR,
            tap_deadline_ms=settings.get("tap_deadline_ms", 0),
            bundle_refresh_interval_s=settings.get("bundle_refresh_interval_s", 0),
            offline_upload_batch_max=settings.get("offline_upload_batch_max", 0),
            time_zone=service.engine.feed.settings.timezone, feed_version=service.engine.feed.version,
            network_id=gate.network_id, route_id=gate.route_id or "",
            double_tap_window_s=service.config.double_tap_window_s,
            passback_window_s=service.config.passback_window_s))


def registration(servicer: FareGateServicer) -> Registration:
    return Registration(fare_gate_pb2_grpc.add_FareGateServiceServicer_to_server, servicer, SERVICE_NAME)
