"""Command-line health probe: exit 0 when a gRPC server reports SERVING.

    python -m libs.grpc_health_probe --address 127.0.0.1:50052 [--service NAME] [--timeout-s 1]

Prints the status it saw. Exit codes: 0 SERVING, 1 any other status, 2 unreachable.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 1.0) -> str:
    """Return the health status name of `service` at `address`, or 'UNREACHABLE'."""
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return "UNREACHABLE" if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name; empty means the whole server")
    parser.add_argument("--timeout-s", type=float, default=1.0, help="deadline of the check, in seconds")
    args = parser.parse_args(argv)
    status = check(args.address, args.service, args.timeout_s)
    print(status)
    if status == "SERVING":
        return 0
    return 2 if status == "UNREACHABLE" else 1


if __name__ == "__main__":
    sys.exit(main())
