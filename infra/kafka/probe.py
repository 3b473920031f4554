"""Readiness probe for the local Kafka broker, with no dependencies beyond the stdlib.

Usage: python3 infra/kafka/probe.py PORT [TIMEOUT_S]

Sends one ApiVersions request (api key 18, version 0: every broker answers it, whatever
its version) to 127.0.0.1:PORT and exits 0 when the broker replies with error code 0.
A KRaft broker only processes requests once it has caught up with the metadata log and
been unfenced, so a reply means clients can use it. Exit 1 otherwise.
"""

import socket
import struct
import sys

API_VERSIONS = 18
CORRELATION_ID = 0x0C17


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        buf.extend(chunk)
    return bytes(buf)


def probe(port: int, timeout_s: float) -> bool:
    client_id = b"citytap-infra-probe"
    # Request header v1: api_key int16, api_version int16, correlation_id int32,
    # client_id nullable string (int16 length + bytes). ApiVersions v0 has an empty body.
    request = struct.pack(">hhih", API_VERSIONS, 0, CORRELATION_ID, len(client_id)) + client_id
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(struct.pack(">i", len(request)) + request)
        (size,) = struct.unpack(">i", _read_exact(sock, 4))
        if size < 6 or size > 1 << 20:
            return False
        body = _read_exact(sock, size)
    correlation_id, error_code = struct.unpack(">ih", body[:6])
    return correlation_id == CORRELATION_ID and error_code == 0


def main() -> int:
    port = int(sys.argv[1])
    timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    try:
        return 0 if probe(port, timeout_s) else 1
    except (OSError, ValueError, struct.error):
        return 1


if __name__ == "__main__":
    sys.exit(main())
