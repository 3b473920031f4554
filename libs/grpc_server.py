"""gRPC server bootstrap shared by every service.

`create_server` builds a server with the standard health service and server reflection,
plus one interceptor that for every call of the service's own API:

- refuses calls without a deadline (FAILED_PRECONDITION, reason DEADLINE_REQUIRED): a gate
  or client that waits forever turns one slow dependency into an outage;
- maps `libs.errors` exceptions to gRPC status codes through the one table below, with a
  google.rpc.ErrorInfo detail carrying the machine-readable reason;
- turns any other exception into INTERNAL (reason INTERNAL) and logs it;
- writes one structured log line per call: method, status, reason, duration_ms, peer.

Health and reflection calls are exempt from the deadline rule so standard tools
(grpcurl, grpc_health_probe, load balancers) work unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from libs import errors

log = logging.getLogger("citytap.grpc")

# Anything above this many seconds means the client set no deadline at all.
_NO_DEADLINE_S = 10**9

_EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

STATUS_FOR_ERROR: dict[type[errors.CityTapError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Conflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code_for(error: errors.CityTapError) -> grpc.StatusCode:
    """The gRPC status code for a domain error (its nearest mapped base class)."""
    for cls in type(error).__mro__:
        if cls in STATUS_FOR_ERROR:
            return STATUS_FOR_ERROR[cls]
    return grpc.StatusCode.INTERNAL


def _rich_status(code: grpc.StatusCode, reason: str, message: str, domain: str, metadata: dict[str, str]) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=domain, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=[detail])
    return rpc_status.to_status(status)


class _CallInterceptor(grpc.ServerInterceptor):
    def __init__(self, domain: str) -> None:
        self._domain = domain

    def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_EXEMPT_PREFIXES):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._wrap(method, handler.unary_unary, streaming=False))
        if handler.unary_stream is not None:
            return handler._replace(unary_stream=self._wrap(method, handler.unary_stream, streaming=True))
        return handler

    def _wrap(self, method: str, behavior: Callable, *, streaming: bool) -> Callable:
        domain = self._domain

        def call(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            code, reason = grpc.StatusCode.OK, ""
            try:
                remaining = context.time_remaining()
                if remaining is None or remaining > _NO_DEADLINE_S:
                    raise errors.FailedPrecondition("DEADLINE_REQUIRED", "every call must carry a deadline")
                result = behavior(request, context)
                if streaming:
                    result = list(result)
                return iter(result) if streaming else result
            except errors.CityTapError as exc:
                code, reason = status_code_for(exc), exc.reason
                context.abort_with_status(_rich_status(code, exc.reason, exc.message, domain, exc.metadata))
            except Exception:  # noqa: BLE001 - the boundary: nothing unexpected leaks out
                if context.code() not in (None, grpc.StatusCode.OK):
                    # The servicer aborted the call itself; its status stands.
                    code, reason = context.code(), "ABORTED_BY_HANDLER"
                    raise
                code, reason = grpc.StatusCode.INTERNAL, "INTERNAL"
                log.exception("unhandled error in %s", method)
                context.abort_with_status(_rich_status(code, "INTERNAL", "internal error; it has been logged", domain, {}))
            finally:
                log.info(
                    "rpc",
                    extra={"fields": {
                        "method": method,
                        "code": code.name,
                        "reason": reason,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                        "peer": context.peer(),
                    }},
                )

        return call


@dataclass
class Registration:
    """A servicer to add: the generated `add_XServicer_to_server` function, the servicer,
    and the full service name (for health and reflection)."""

    add_to_server: Callable[[Any, grpc.Server], None]
    servicer: Any
    service_name: str


@dataclass
class Server:
    """A started-or-startable gRPC server with its bound port and health servicer."""

    grpc_server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.grpc_server.start()

    def set_serving(self, serving: bool) -> None:
        """Report SERVING (or NOT_SERVING) for the whole server and each service."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace_s: float = 5.0) -> None:
        """Report NOT_SERVING, finish in-flight calls for up to `grace_s`, then stop."""
        self.set_serving(False)
        self.grpc_server.stop(grace_s).wait()


def create_server(
    address: str,
    registrations: Iterable[Registration] = (),
    *,
    domain: str,
    max_workers: int = 16,
    max_in_flight: int | None = None,
) -> Server:
    """Build a server bound to `address` (port 0 picks a free port) with health, reflection
    and the call interceptor. The server is not started; health starts as NOT_SERVING until
    the caller has checked its dependencies and calls `set_serving(True)`.

    `max_in_flight` bounds the calls being handled or waiting for a worker thread: one more
    is refused at once with RESOURCE_EXHAUSTED (by gRPC itself, before any of our code), so
    an overloaded server answers quickly instead of letting a queue grow until every caller's
    deadline has passed. None: unbounded."""
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=domain),
        interceptors=[_CallInterceptor(domain)],
        options=[("grpc.so_reuseport", 0)],
        maximum_concurrent_rpcs=max_in_flight,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    names = []
    for registration in registrations:
        registration.add_to_server(registration.servicer, grpc_server)
        names.append(registration.service_name)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], grpc_server
    )
    port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind gRPC server to {address}")
    server = Server(grpc_server, port, health_servicer, names)
    server.set_serving(False)
    return server


def run_until_signalled(server: Server, stop: threading.Event, *, grace_s: float = 5.0,
                        on_stop: Callable[[], None] | None = None) -> None:
    """Block until `stop` is set (by SIGTERM or SIGINT: `libs.signals.stop_event_on_signals`,
    installed before start-up), then stop gracefully and run `on_stop` for cleanup."""
    stop.wait()
    log.info("stopping", extra={"fields": {"grace_s": grace_s}})
    server.stop(grace_s)
    if on_stop is not None:
        on_stop()
    log.info("stopped")
