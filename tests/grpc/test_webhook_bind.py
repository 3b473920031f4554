"""The webhook server's bind retry (libs.stripe_webhooks.BIND_RETRY_S): a port held for a
moment by another socket's connection is waited for, not failed on; one held for longer
still fails with the address in use."""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest

from libs import stripe_webhooks
from libs.stripe_webhooks import WebhookResponse, WebhookServer


def _held_port() -> tuple[socket.socket, socket.socket, int]:
    """A local port bound by an established outgoing connection, as an ephemeral port is."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.bind(("127.0.0.1", 0))
    client.connect(listener.getsockname())
    return listener, client, client.getsockname()[1]


def _refuse(body: bytes, headers: object) -> WebhookResponse:
    return WebhookResponse(400, "NOPE")


def test_a_port_freed_within_the_retry_window_is_bound() -> None:
    listener, client, port = _held_port()
    def hang_up() -> None:  # the connection ends for good: the port is free again
        client.close()
        listener.close()

    threading.Timer(0.6, hang_up).start()
    started = time.monotonic()
    server = WebhookServer(f"127.0.0.1:{port}", _refuse)
    try:
        assert server.port == port
        assert 0.5 <= time.monotonic() - started < stripe_webhooks.BIND_RETRY_S
    finally:
        server.close()


def test_a_port_held_longer_fails_with_the_address_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stripe_webhooks, "BIND_RETRY_S", 0.5)
    listener, client, port = _held_port()
    try:
        with pytest.raises(OSError) as info:
            WebhookServer(f"127.0.0.1:{port}", _refuse)
        assert info.value.errno == errno.EADDRINUSE
    finally:
        client.close()
        listener.close()
