"""The face service, as the tap path sees it: one call, Match, for face taps.

The only fare-gate module that calls the face service. A face credential (an embedding the
gate computed, or a burst of camera frames the face service checks for liveness) is matched
for the TRANSIT_FARES purpose, so only riders who consented to face payment for fares are
candidates. Answers become plain values; failures become `libs.errors` exceptions:

    UNSUPPORTED_CREDENTIAL   the face service does not serve Match (UNIMPLEMENTED), or no
                             face service is configured
    LIVENESS_FAILED          the frames failed the liveness check (outcome or refusal)
    UNAVAILABLE              the face service did not answer in time; the gate may retry
    the face service's own reason, for any other refusal (a corrupt image, ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from citytap.common.v1 import credential_pb2
from citytap.face.v1 import face_pb2, face_pb2_grpc
from libs import errors
from libs.grpc_client import error_info
from services.fare_gate.domain import FaceProbe

MATCHED = "MATCHED"
NO_MATCH = "NO_MATCH"
AMBIGUOUS = "AMBIGUOUS"

_OUTCOMES = {
    face_pb2.MATCH_OUTCOME_MATCHED: MATCHED,
    face_pb2.MATCH_OUTCOME_NO_MATCH: NO_MATCH,
    face_pb2.MATCH_OUTCOME_AMBIGUOUS: AMBIGUOUS,
}
_RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
_STATUS_ERRORS: dict[grpc.StatusCode, type[errors.CityTapError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.LimitExceeded,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}


@dataclass(frozen=True, slots=True)
class FaceMatch:
    outcome: str  # MATCHED, NO_MATCH or AMBIGUOUS
    account_id: str  # empty unless matched


def unsupported(message: str) -> errors.InvalidArgument:
    return errors.InvalidArgument("UNSUPPORTED_CREDENTIAL", message, field="credential")


class FaceClient:
    """Match calls to the face service, each bounded by `timeout_s`."""

    def __init__(self, channel: grpc.Channel, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._stub = face_pb2_grpc.FaceServiceStub(channel)
        self._timeout_s = timeout_s

    def match(self, probe: FaceProbe, *, reference_id: str) -> FaceMatch:
        request = face_pb2.MatchRequest(purpose=face_pb2.CONSENT_PURPOSE_TRANSIT_FARES, reference_id=reference_id)
        if probe.embedding:
            request.embedding.CopyFrom(credential_pb2.FaceEmbedding(values=list(probe.embedding)))
        else:
            request.frames.CopyFrom(credential_pb2.FaceFrames(frames=list(probe.frames)))
        try:
            answer = self._stub.Match(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            raise _refusal(exc) from exc
        if answer.outcome == face_pb2.MATCH_OUTCOME_LIVENESS_FAILED:
            raise errors.FailedPrecondition("LIVENESS_FAILED", "the face frames failed the liveness check")
        outcome = _OUTCOMES.get(answer.outcome)
        if outcome is None:
            raise errors.Unavailable("UNAVAILABLE", "the face service answered Match without an outcome",
                                     dependency="face")
        return FaceMatch(outcome, answer.account_id if outcome == MATCHED else "")


def _refusal(exc: grpc.RpcError) -> errors.CityTapError:
    code = exc.code()  # type: ignore[attr-defined]
    message = exc.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return unsupported("the face service does not match faces yet, so face taps are not accepted")
    info = error_info(exc)
    reason = info.reason if info is not None else code.name
    if code in _RETRYABLE or reason == "UNAVAILABLE":
        return errors.Unavailable("UNAVAILABLE", f"the face service did not complete Match: {code.name} {message}",
                                  dependency="face")
    error_class = _STATUS_ERRORS.get(code)
    if error_class is None:
        return errors.Unavailable("UNAVAILABLE", f"the face service failed Match: {code.name} {message}",
                                  dependency="face")
    return error_class(reason, f"the face service refused the face: {message}",
                       **(dict(info.metadata) if info is not None else {}))
