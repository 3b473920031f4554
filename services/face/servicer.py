"""The face service's gRPC entrypoint: proto in, one use-case call, proto out.

Errors are raised as `libs.errors` exceptions and mapped to status codes by the interceptor
of `libs.grpc_server`. A failed liveness check is an answer, not an error: `Match` returns
MATCH_OUTCOME_LIVENESS_FAILED and `CheckLiveness` returns live=false.
"""

from __future__ import annotations

import math
from datetime import timezone

import grpc

from citytap.face.v1 import face_pb2, face_pb2_grpc
from libs import errors
from libs.grpc_server import Registration
from libs.protos import timestamp_pb
from services.face.domain import Channel, ConsentRequest, DeletionReason, MatchOutcome, Purpose, check_embedding
from services.face.records import FaceRecords, consent_to_proto

SERVICE_NAME = "citytap.face.v1.FaceService"
# With nobody enrolled the distance, and with one template the margin, is infinite; the wire
# carries this finite stand-in, larger than any distance between two real descriptors.
UNBOUNDED = 2.0


def _enum(proto_enum: object, prefix: str, domain_enum: type, value: int, field: str) -> object:
    if value == 0:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field} must be set", field=field)
    try:
        name = proto_enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field} has an unknown value {value}", field=field) from None
    return domain_enum[name.removeprefix(prefix)]


def purpose_from_proto(value: int) -> Purpose:
    return _enum(face_pb2.ConsentPurpose, "CONSENT_PURPOSE_", Purpose, value, "purpose")  # type: ignore[return-value]


def _finite(value: float) -> float:
    return value if math.isfinite(value) else UNBOUNDED


class FaceServicer(face_pb2_grpc.FaceServiceServicer):
    """Thin adapter over `FaceRecords`; `attach` gives it the records once they are loaded."""

    def __init__(self, records: FaceRecords | None = None) -> None:
        self._records = records

    def attach(self, records: FaceRecords) -> None:
        self._records = records

    @property
    def records(self) -> FaceRecords:
        if self._records is None:
            raise errors.Unavailable("UNAVAILABLE", "the face service is still starting")
        return self._records

    def RecordConsent(self, request: face_pb2.RecordConsentRequest, context: grpc.ServicerContext) -> face_pb2.RecordConsentResponse:
        if not request.HasField("given_at"):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "given_at must be set", field="given_at")
        consent = self.records.record_consent(ConsentRequest(
            consent_id=request.consent_id, account_id=request.account_id,
            purpose=purpose_from_proto(request.purpose), retention_days=request.retention_days,
            channel=_enum(face_pb2.ConsentChannel, "CONSENT_CHANNEL_", Channel, request.channel, "channel"),  # type: ignore[arg-type]
            notice_version=request.notice_version, given_at=request.given_at.ToDatetime(tzinfo=timezone.utc)))
        return face_pb2.RecordConsentResponse(consent=consent_to_proto(consent))

    def Enroll(self, request: face_pb2.EnrollRequest, context: grpc.ServicerContext) -> face_pb2.EnrollResponse:
        enrolment = self.records.enroll(request.account_id, request.image)
        return face_pb2.EnrollResponse(enrolled_at=timestamp_pb(enrolment.enrolled_at),
                                       retain_until=timestamp_pb(enrolment.retain_until))

    def Match(self, request: face_pb2.MatchRequest, context: grpc.ServicerContext) -> face_pb2.MatchResponse:
        purpose = purpose_from_proto(request.purpose)
        probe = request.WhichOneof("probe")
        if probe == "embedding":
            result = self.records.match_embedding(check_embedding(request.embedding.values), purpose,
                                                  request.reference_id)
        elif probe == "frames":
            result = self.records.match_frames(list(request.frames.frames), purpose, request.reference_id)
        else:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "set embedding or frames", field="probe")
        return face_pb2.MatchResponse(
            outcome=face_pb2.MatchOutcome.Value("MATCH_OUTCOME_" + result.outcome.value),
            account_id=result.account_id if result.outcome is MatchOutcome.MATCHED else "",
            distance=_finite(result.distance), margin=_finite(result.margin))

    def Delete(self, request: face_pb2.DeleteRequest, context: grpc.ServicerContext) -> face_pb2.DeleteResponse:
        reason = _enum(face_pb2.DeletionReason, "DELETION_REASON_", DeletionReason, request.reason, "reason")
        deletion = self.records.delete(request.account_id, reason)  # type: ignore[arg-type]
        return face_pb2.DeleteResponse(deleted=deletion.deleted, deleted_at=timestamp_pb(deletion.deleted_at))

    def CheckLiveness(self, request: face_pb2.CheckLivenessRequest, context: grpc.ServicerContext) -> face_pb2.CheckLivenessResponse:
        verdict, _ = self.records.check_liveness(list(request.frames.frames))
        return face_pb2.CheckLivenessResponse(live=verdict.live, score=verdict.score)


def registration(servicer: FaceServicer) -> Registration:
    return Registration(face_pb2_grpc.add_FaceServiceServicer_to_server, servicer, SERVICE_NAME)
