"""The HTTP endpoint Stripe delivers webhooks to: a small server on its own thread.

Shared by every CityTap service that receives Stripe webhooks (the wallet's top-ups, the
merchant service's Connect onboarding). It knows HTTP and nothing else. Each delivery's raw
body and Stripe-Signature header go to one handler, which verifies the signature before
anything is parsed (with the service's Stripe adapter), dedupes on the event id and answers
with a status:

    200  handled, a duplicate, or deliberately ignored (unknown event type, unknown object)
    400  bad or missing signature, stale timestamp, or a signed body that is not an event
    404  another path;  405  another method;  411  no Content-Length;  413  body too large
    503  too many deliveries at once, or a dependency is down: Stripe redelivers later
    500  an unexpected error (logged): Stripe redelivers later

Everything is bounded: the body size, the time a client may take to send it, the number of
connections served at once (extra ones are closed at once) and the number of deliveries
processed at once (extra ones get 503). Stripe retries non-2xx answers for up to three days
with backoff, so shedding load is safe; processing is a few short database transactions,
so a delivery is answered in milliseconds.

`sign_payload` builds a Stripe-Signature header exactly as Stripe does (HMAC-SHA256 of
"<timestamp>.<body>" under the endpoint's secret, scheme v1). Services never sign; tests and
the demo use it to play Stripe against a real endpoint.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar
from urllib.parse import urlsplit

log = logging.getLogger("citytap.stripe_webhooks")
T = TypeVar("T")

WEBHOOK_PATH = "/stripe/webhook"
# Connections served at once, as a multiple of the deliveries processed at once: the rest
# are waiting to send their body or to receive their answer.
CONNECTIONS_PER_SLOT = 4


@dataclass(frozen=True)
class WebhookResponse:
    """What the endpoint answers: an HTTP status and a short machine-readable outcome."""

    status: int
    outcome: str
    event_id: str = ""
    event_type: str = ""


Handler = Callable[[bytes, "str | None"], WebhookResponse]


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {listen!r}")
    return host.strip("[]"), int(port)


# The local stacks' ports lie inside Linux's ephemeral range, so an outgoing connection of
# some other process can hold one for a moment (seen once: a service starting just as a test
# run's clients closed). Binding is retried for this long before the error stands.
BIND_RETRY_S = 5.0


def _bind(make: Callable[[], T]) -> T:
    """`make()`, retried while its address is in use, for up to BIND_RETRY_S."""
    deadline = time.monotonic() + BIND_RETRY_S
    while True:
        try:
            return make()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler_class: type, connections_max: int) -> None:
        self._connections = threading.BoundedSemaphore(connections_max)
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler_class)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._connections.acquire(blocking=False):
            log.warning("webhook connection refused: too many open", extra={"fields": {"peer": str(client_address)}})
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()


class WebhookServer:
    """Binds at construction (so a bad address fails the service's start, and `port` is
    known), serves from `run(stop)` (an `app.add_worker` worker), stops on `close()`."""

    def __init__(self, listen: str, handle: Handler, *, concurrency_max: int = 4, body_bytes_max: int = 256 * 1024,
                 read_timeout_s: float = 10.0, path: str = WEBHOOK_PATH, thread_name: str = "stripe-webhook") -> None:
        if concurrency_max < 1 or body_bytes_max < 1 or read_timeout_s <= 0:
            raise ValueError("webhook limits must be positive")
        slots = threading.BoundedSemaphore(concurrency_max)

        class RequestHandler(BaseHTTPRequestHandler):
            server_version = "CityTapWebhook/1"
            sys_version = ""
            timeout = read_timeout_s  # every read of the request is bounded

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                started = time.perf_counter()
                result = self._process()
                self._answer(result, started)

            def _process(self) -> WebhookResponse | None:
                if urlsplit(self.path).path != path:
                    return WebhookResponse(404, "NOT_FOUND")
                length = self.headers.get("Content-Length", "")
                if not length.isdigit():
                    return WebhookResponse(411, "LENGTH_REQUIRED")
                if int(length) > body_bytes_max:
                    return WebhookResponse(413, "TOO_LARGE")
                if not slots.acquire(blocking=False):
                    return WebhookResponse(503, "BUSY")
                try:
                    try:
                        body = self.rfile.read(int(length))
                    except (TimeoutError, OSError):
                        return None  # the client stalled or went away: nothing to answer
                    if len(body) != int(length):
                        return WebhookResponse(400, "TRUNCATED")
                    return handle(body, self.headers.get("Stripe-Signature"))
                except Exception:  # noqa: BLE001 - never let a bug kill the server thread
                    log.exception("webhook handler failed")
                    return WebhookResponse(500, "ERROR")
                finally:
                    slots.release()

            def _answer(self, result: WebhookResponse | None, started: float) -> None:
                if result is None:
                    self.close_connection = True
                    return
                body = json.dumps({"outcome": result.outcome}).encode()
                try:
                    self.send_response(result.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client went away; Stripe treats it as a failure and redelivers
                log.info("webhook", extra={"fields": {
                    "status": result.status, "outcome": result.outcome, "event_id": result.event_id,
                    "event_type": result.event_type, "duration_ms": round((time.perf_counter() - started) * 1000, 3)}})

            def _refuse_method(self) -> None:
                self._answer(WebhookResponse(405, "METHOD_NOT_ALLOWED"), time.perf_counter())

            do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _refuse_method  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - we log one line ourselves
                return

        self._httpd = _bind(lambda: _HTTPServer(_split_listen(listen), RequestHandler,
                                                concurrency_max * CONNECTIONS_PER_SLOT))
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None
        self._thread_name = thread_name
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Serve on a background thread (tests and tools; services use `run`)."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                            daemon=True, name=self._thread_name)
            self._thread.start()

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set, then stop serving."""
        self.start()
        stop.wait()
        self.close()

    def close(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is not None:
            self._httpd.shutdown()
            thread.join(timeout=5)
        self._httpd.server_close()


def sign_payload(payload: bytes, secret: str, *, timestamp: int | None = None) -> str:
    """A Stripe-Signature header for `payload`, made as Stripe makes it (tests and demos only)."""
    signed_at = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{signed_at}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={signed_at},v1={mac}"
