"""The shared shape of a service process: settings, logging, composition, serve, stop.

`run(name, settings_cls, build)` is each service's `main`. It loads settings from the
environment (exiting with status 2 and a message naming every bad variable), configures
JSON logging, calls the service's composition root `build(settings)`, starts the gRPC server,
reports SERVING once `build` has connected to every dependency, and on SIGTERM reports
NOT_SERVING, drains in-flight calls and closes the service's resources.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from libs import logs, outbox
from libs.outbox import IDLE_WAIT_MS_DEFAULT, OutboxRelay, idle_wait_ms
from libs.events import Publisher, ensure_topics
from libs.postgres import create_pool, migrate_folder
from libs.redis_client import create_redis
from libs.grpc_server import Server, create_server, run_until_signalled
from libs.signals import stop_event_on_signals
from libs.settings import SettingsError, boolean, host_port, host_port_list, load, log_level, setting, url

log = logging.getLogger("citytap.service")

S = TypeVar("S")
T_co = TypeVar("T_co")

# How long a starting service keeps retrying an unreachable dependency before giving up.
DEPENDENCY_WAIT_S_MAX = 30.0


@dataclasses.dataclass(frozen=True)
class CommonSettings:
    """Settings every service reads; a service's own Settings class extends this one."""

    listen_address: str = setting("CITYTAP_LISTEN_ADDRESS", host_port, doc="host:port the gRPC server binds")
    postgres_dsn: str = setting("CITYTAP_POSTGRES_DSN", url("postgresql", "postgres"), doc="PostgreSQL connection URL")
    kafka_bootstrap: str = setting("CITYTAP_KAFKA_BOOTSTRAP", host_port_list, doc="Kafka bootstrap servers")
    log_level: str = setting("CITYTAP_LOG_LEVEL", log_level, default="INFO", doc="DEBUG, INFO, WARNING or ERROR")
    outbox_relay_in_process: bool = setting(
        "CITYTAP_OUTBOX_RELAY_IN_PROCESS", boolean, default=True,
        doc="run the outbox relay inside the service; false when `python -m libs.outbox_relay` runs it",
    )
    outbox_idle_wait_ms: int = setting(
        "CITYTAP_OUTBOX_IDLE_WAIT_MS", idle_wait_ms, default=IDLE_WAIT_MS_DEFAULT,
        doc="how long the outbox relay waits after a pass that found no backlog (1-1000 ms): what gathers "
            "meanwhile goes to Kafka as one batch, so a longer wait costs less CPU per event and delays events by "
            "up to that much",
    )


class App(Protocol):
    """What a composition root returns: a server plus the resources to close on stop."""

    server: Server

    def start(self) -> None:
        """Start background workers (consumers, relays); called after the server starts."""

    def close(self) -> None:
        """Stop background workers and close pools and clients."""


def retry_until_ready(what: str, attempt: Callable[[], T_co], *, wait_s_max: float = DEPENDENCY_WAIT_S_MAX) -> T_co:
    """Call `attempt` until it succeeds or `wait_s_max` passes; then re-raise its last error."""
    deadline = time.monotonic() + wait_s_max
    delay_s = 0.2
    while True:
        try:
            return attempt()
        except Exception as exc:  # noqa: BLE001 - any failure to reach a dependency
            if time.monotonic() + delay_s > deadline:
                raise RuntimeError(f"{what} not reachable after {wait_s_max:.0f}s: {exc}") from exc
            log.warning("waiting for dependency", extra={"fields": {"dependency": what, "error": str(exc)}})
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, 2.0)



def run(name: str, settings_cls: type[S], build: Callable[[S], App]) -> None:
    """Run service `name` until SIGTERM; exits 2 on bad settings, 1 on failed start."""
    try:
        settings = load(settings_cls, os.environ)
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        sys.exit(2)
    logs.configure(name, getattr(settings, "log_level", "INFO"))
    # From here a SIGTERM stops the service gracefully, even one that arrives while it starts.
    stop = stop_event_on_signals()
    try:
        app = build(settings)
    except Exception as exc:
        log.exception("start failed")
        print(f"{name}: start failed: {exc}", file=sys.stderr)
        sys.exit(1)
    # What start-up made (modules, the fare feed, settings, pools) lives as long as the
    # process: frozen out of the collector's reach, a full collection scans only what came
    # after, a few milliseconds instead of 45-95 ms with every thread stopped.
    gc.freeze()
    app.server.start()
    app.start()
    app.server.set_serving(True)
    log.info("serving", extra={"fields": {"port": app.server.port, "services": app.server.service_names}})
    run_until_signalled(app.server, stop, on_stop=app.close)


class BaseApp:
    """An App built from a server, background workers and resources to close in reverse
    order. Composition roots create one and register what they opened."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._workers: list[Callable[[threading.Event], None]] = []
        self._closers: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def add_worker(self, worker: Callable[[threading.Event], None]) -> None:
        """Run `worker(stop_event)` on its own thread from `start()` until `close()`."""
        self._workers.append(worker)

    def start(self) -> None:
        for worker in self._workers:
            thread = threading.Thread(target=worker, args=(self._stop,), daemon=True, name=getattr(worker, "__name__", "worker"))
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception:  # noqa: BLE001 - keep closing the rest
                log.exception("close failed")


def open_postgres(app: BaseApp, dsn: str, *, schema: str, migrations: Path, max_size: int = 10) -> Any:
    """Apply `schema`'s migrations, then open a pool registered for closing with `app`."""
    retry_until_ready("PostgreSQL", lambda: migrate_folder(dsn, schema, migrations))
    pool = create_pool(dsn, name=f"citytap-{schema}", max_size=max_size)
    app.on_close(pool.close)
    return pool


def open_publisher(app: BaseApp, bootstrap: str, *, client_id: str, topics: list[str]) -> Publisher:
    """Create `topics` if missing, then an idempotent publisher registered for closing."""
    retry_until_ready("Kafka", lambda: ensure_topics(bootstrap, topics))
    publisher = Publisher(bootstrap, client_id=client_id)
    app.on_close(publisher.close)
    return publisher


def open_outbox(app: BaseApp, pool: Any, *, schema: str, publisher: Publisher,
                idle_wait_ms: int = IDLE_WAIT_MS_DEFAULT) -> OutboxRelay:
    """Ensure the schema's outbox table and run its relay as a worker of `app`."""
    with pool.connection() as conn:
        outbox.ensure_table(conn, schema)
    relay = OutboxRelay(pool, schema=schema, publisher=publisher, idle_wait_s=idle_wait_ms / 1000)
    app.add_worker(relay.run)
    return relay


def open_redis(app: BaseApp, redis_url: str) -> Any:
    """A Redis client, checked with PING, registered for closing."""
    client = create_redis(redis_url)
    retry_until_ready("Redis", client.ping)
    app.on_close(client.close)
    return client


def topic_for(service_name: str) -> str:
    """The one topic a service produces to: `citytap.<service>.v1.events`."""
    return f"citytap.{service_name}.v1.events"


def open_standard(settings: CommonSettings, name: str, migrations: Path, registrations: list[Any], *,
                  topic: str | None = None, max_in_flight: int | None = None) -> tuple[BaseApp, Any, Publisher]:
    """The part every service's composition root shares: a gRPC server on the listen
    address, its schema (`name`) migrated and pooled, its topic created, and its outbox
    relay. `topic` defaults to the service's `citytap.<name>.v1.events`; `max_in_flight` as in
    `libs.grpc_server.create_server`."""
    domain = (topic or topic_for(name)).split(".")[1]
    server = create_server(settings.listen_address, registrations, domain=f"{domain}.citytap",
                           max_in_flight=max_in_flight)
    app = BaseApp(server)
    pool = open_postgres(app, settings.postgres_dsn, schema=name, migrations=migrations)
    publisher = open_publisher(app, settings.kafka_bootstrap, client_id=f"citytap-{name}",
                               topics=[topic or topic_for(name)])
    if settings.outbox_relay_in_process:
        open_outbox(app, pool, schema=name, publisher=publisher, idle_wait_ms=settings.outbox_idle_wait_ms)
    else:
        with pool.connection() as conn:
            outbox.ensure_table(conn, name)
    return app, pool, publisher
