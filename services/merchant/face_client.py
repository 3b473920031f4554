"""The face service, as the till sees it: the only merchant module that calls it, with one
call, Match, for the MERCHANT_PAYMENTS purpose (only riders who consented to paying
merchants by face are candidates).

Answers become an account id; everything else a `libs.errors` exception:

    UNKNOWN_CREDENTIAL       no enrolled rider matched, or the match was ambiguous
    LIVENESS_FAILED          the frames failed the liveness check
    UNSUPPORTED_CREDENTIAL   the face service does not serve Match (UNIMPLEMENTED)
    UNAVAILABLE              the face service did not answer in time; retry the same order id
    the face service's own reason, for any other refusal (a corrupt image, ...)
"""

from __future__ import annotations

import grpc

from citytap.common.v1 import credential_pb2
from citytap.face.v1 import face_pb2, face_pb2_grpc
from libs import errors
from libs.grpc_client import error_info

_RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
_STATUS_ERRORS: dict[grpc.StatusCode, type[errors.CityTapError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.LimitExceeded,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
}


class FaceClient:
    """Match calls to the face service, each bounded by `timeout_s`."""

    def __init__(self, channel: grpc.Channel, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._stub = face_pb2_grpc.FaceServiceStub(channel)
        self._timeout_s = timeout_s

    def match(self, credential: credential_pb2.Credential, *, reference_id: str) -> str:
        """The account of the one consenting rider the face belongs to."""
        request = face_pb2.MatchRequest(purpose=face_pb2.CONSENT_PURPOSE_MERCHANT_PAYMENTS, reference_id=reference_id)
        if credential.HasField("face_embedding"):
            request.embedding.CopyFrom(credential.face_embedding)
        else:
            request.frames.CopyFrom(credential.face_frames)
        try:
            answer = self._stub.Match(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            raise _refusal(exc) from exc
        if answer.outcome == face_pb2.MATCH_OUTCOME_MATCHED and answer.account_id:
            return answer.account_id
        if answer.outcome == face_pb2.MATCH_OUTCOME_LIVENESS_FAILED:
            raise errors.FailedPrecondition("LIVENESS_FAILED", "the face frames failed the liveness check")
        if answer.outcome in (face_pb2.MATCH_OUTCOME_NO_MATCH, face_pb2.MATCH_OUTCOME_AMBIGUOUS):
            raise errors.NotFound("UNKNOWN_CREDENTIAL", "no consenting rider matches this face with certainty",
                                  field="credential")
        raise errors.Unavailable("UNAVAILABLE", "the face service answered Match without an outcome", dependency="face")


def _refusal(exc: grpc.RpcError) -> errors.CityTapError:
    code = exc.code()  # type: ignore[attr-defined]
    message = exc.details() or ""  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return errors.InvalidArgument("UNSUPPORTED_CREDENTIAL", "the face service does not match faces",
                                      field="credential")
    info = error_info(exc)
    reason = info.reason if info is not None else ""
    error_class = _STATUS_ERRORS.get(code)
    if code in _RETRYABLE or reason in ("", "UNAVAILABLE") or error_class is None:
        return errors.Unavailable("UNAVAILABLE", f"the face service did not complete Match: {code.name}",
                                  dependency="face")
    return error_class(reason, f"the face service refused the face: {message}", **dict(info.metadata))  # type: ignore[union-attr]
