"""Client channels that always carry a deadline, and error-reason extraction.

`connect(address, default_timeout_s=...)` returns a channel whose every call gets
`default_timeout_s` as its deadline unless the caller passes a shorter or longer `timeout=`.
No call made through it can wait forever.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


class _DeadlineInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, default_timeout_s: float) -> None:
        self._default = default_timeout_s

    def _with_deadline(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if details.timeout is not None:
            return details
        return _CallDetails(details.method, self._default, details.metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_deadline(details), request)

    def intercept_unary_stream(self, continuation: Any, details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_deadline(details), request)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):  # noqa: ANN001
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def connect(address: str, *, default_timeout_s: float = 2.0) -> grpc.Channel:
    """An insecure channel to `address` (loopback and in-cluster use) with a default deadline."""
    if default_timeout_s <= 0:
        raise ValueError("default_timeout_s must be positive")
    channel = grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _DeadlineInterceptor(default_timeout_s))


def error_reason(error: grpc.RpcError) -> str | None:
    """The machine-readable reason in a failed call's google.rpc.ErrorInfo, if any."""
    info = error_info(error)
    return info.reason if info is not None else None


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo detail of a failed call, if the server attached one."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None
