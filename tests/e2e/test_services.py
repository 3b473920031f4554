"""The five service processes started by `make up` (the test stack in `make test`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["fare_gate", "wallet", "face", "merchant", "settlement"]


def address_of(service: str) -> str:
    name = f"CITYTAP_{service.upper()}_ADDRESS"
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the e2e tier through `make test`, which starts the services")
    return value


@pytest.mark.parametrize("service", SERVICES)
def test_service_reports_serving_and_answers_reflection(service: str) -> None:
    with grpc.insecure_channel(address_of(service)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=3)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert "grpc.health.v1.Health" in names


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CITYTAP_KAFKA_BOOTSTRAP", "not-an-address"), ("CITYTAP_POSTGRES_DSN", "mysql://nope"),
     ("CITYTAP_LISTEN_ADDRESS", "")],
)
def test_service_with_a_bad_setting_exits_naming_it(variable: str, value: str) -> None:
    env = {**os.environ, "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", variable: value}
    result = subprocess.run([sys.executable, "-m", "services.wallet"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert variable in result.stderr
    assert "wallet" in result.stderr


def test_service_stops_gracefully_on_sigterm() -> None:
    import signal
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # PYTHONFAULTHANDLER: if it hangs, SIGABRT makes it print every thread's stack.
    env = {**os.environ, "CITYTAP_LISTEN_ADDRESS": f"127.0.0.1:{port}", "PYTHONFAULTHANDLER": "1"}
    process = subprocess.Popen([sys.executable, "-m", "services.face"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline and process.poll() is None:
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                try:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError:
                    status = None
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
            time.sleep(0.2)
        assert status == health_pb2.HealthCheckResponse.SERVING, process.stderr.read() if process.poll() is not None else ""
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            _, stuck = process.communicate(timeout=10)
            pytest.fail(f"the service did not stop within 20 s of SIGTERM; its stderr and stacks:\n{stuck}")
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert '"msg": "stopped"' in stderr
