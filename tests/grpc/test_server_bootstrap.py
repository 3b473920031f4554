"""The shared server bootstrap against a real in-process server on port 0: health,
reflection, the deadline rule, error mapping with machine-readable reasons, and the
client channel's default deadline."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from libs import errors
from libs.grpc_client import connect, error_info, error_reason
from libs.grpc_server import Registration, Server, create_server

SERVICE = "citytap.test.v1.EchoService"


class Echo:
    """A tiny servicer: echoes bytes, or raises what the request names."""

    def __init__(self) -> None:
        self.seen_deadlines: list[float] = []

    def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.seen_deadlines.append(context.time_remaining())
        if request == b"not-found":
            raise errors.NotFound("UNKNOWN_ACCOUNT", "no account acct-1", account_id="acct-1")
        if request == b"crash":
            raise RuntimeError("secret internal detail")
        if request == b"abort":
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler aborted")
        return request


def _add(servicer: Echo, server: grpc.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(servicer.echo)}
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture()
def running() -> Iterator[tuple[Server, Echo]]:
    echo = Echo()
    server = create_server("127.0.0.1:0", [Registration(_add, echo, SERVICE)], domain="test.citytap")
    server.start()
    server.set_serving(True)
    yield server, echo
    server.stop(0)


def _call(channel: grpc.Channel, payload: bytes, **kwargs: float) -> bytes:
    return channel.unary_unary(f"/{SERVICE}/Echo")(payload, **kwargs)


def test_binds_port_zero_and_reports_serving_for_server_and_service(running: tuple[Server, Echo]) -> None:
    server, _ = running
    assert server.port > 0
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE):
            status = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_health_starts_not_serving_until_dependencies_are_ready() -> None:
    server = create_server("127.0.0.1:0", [], domain="test.citytap")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop(0)


def test_reflection_lists_the_services(running: tuple[Server, Echo]) -> None:
    server, _ = running
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_call_without_deadline_is_refused_with_reason(running: tuple[Server, Echo]) -> None:
    server, echo = running
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            _call(channel, b"hello")
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(info.value) == "DEADLINE_REQUIRED"
    assert echo.seen_deadlines == []  # the handler never ran


def test_client_channel_always_sets_a_deadline(running: tuple[Server, Echo]) -> None:
    server, echo = running
    channel = connect(f"127.0.0.1:{server.port}", default_timeout_s=3)
    assert _call(channel, b"hello") == b"hello"
    assert _call(channel, b"again", timeout=0.5) == b"again"
    # Deadlines travel as absolute times, so allow a little clock slack on loopback.
    assert 1 < echo.seen_deadlines[0] <= 3.05
    assert 0 < echo.seen_deadlines[1] <= 0.55


def test_domain_error_maps_to_status_with_reason_and_metadata(running: tuple[Server, Echo]) -> None:
    server, _ = running
    channel = connect(f"127.0.0.1:{server.port}")
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, b"not-found")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    detail = error_info(info.value)
    assert detail is not None
    assert (detail.reason, detail.domain, dict(detail.metadata)) == ("UNKNOWN_ACCOUNT", "test.citytap", {"account_id": "acct-1"})
    assert "no account acct-1" in info.value.details()


def test_unexpected_exception_is_internal_and_hides_details(running: tuple[Server, Echo]) -> None:
    server, _ = running
    channel = connect(f"127.0.0.1:{server.port}")
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, b"crash")
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert error_reason(info.value) == "INTERNAL"
    assert "secret" not in info.value.details()


def test_handler_abort_keeps_its_own_status(running: tuple[Server, Echo]) -> None:
    server, _ = running
    channel = connect(f"127.0.0.1:{server.port}")
    with pytest.raises(grpc.RpcError) as info:
        _call(channel, b"abort")
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_stop_drains_and_reports_not_serving(running: tuple[Server, Echo]) -> None:
    server, _ = running
    server.stop(1)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.RpcError) as info:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_a_bounded_server_refuses_the_call_beyond_its_bound_at_once() -> None:
    """max_in_flight: with every slot taken by a call still being handled, the next call is
    refused RESOURCE_EXHAUSTED straight away; once a slot frees, calls are served again."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    release = threading.Event()
    started = threading.Semaphore(0)

    class Slow(Echo):
        def echo(self, request: bytes, context: grpc.ServicerContext) -> bytes:
            if request == b"hold":
                started.release()
                release.wait(10)
            return request

    server = create_server("127.0.0.1:0", [Registration(_add, Slow(), SERVICE)], domain="test.citytap",
                           max_workers=4, max_in_flight=2)
    server.start()
    server.set_serving(True)
    pool = ThreadPoolExecutor(max_workers=2)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            held = [pool.submit(_call, channel, b"hold", timeout=10) for _ in range(2)]
            assert started.acquire(timeout=5) and started.acquire(timeout=5)  # both slots busy
            with pytest.raises(grpc.RpcError) as info:
                _call(channel, b"one more", timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            release.set()
            assert [f.result(timeout=10) for f in held] == [b"hold", b"hold"]
            assert _call(channel, b"served again", timeout=5) == b"served again"
    finally:
        release.set()
        pool.shutdown(wait=True)
        server.stop(0)
