"""A standalone outbox relay process: `python -m libs.outbox_relay --schema wallet`.

Services run their relay in-process by default. Setting CITYTAP_OUTBOX_RELAY_IN_PROCESS=false
on a service and running this process instead lets an operator scale, restart or kill the
relay on its own; crash tests use it to kill the relay separately from the service. Only one
relay per schema publishes at a time, so running several is safe.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from libs import logs
from libs.events import Publisher
from libs.outbox import IDLE_WAIT_MS_DEFAULT, OutboxRelay, ensure_table, idle_wait_ms
from libs.postgres import create_pool
from libs.settings import SettingsError, host_port_list, load, log_level, setting, url
from libs.signals import stop_event_on_signals


@dataclasses.dataclass(frozen=True)
class RelaySettings:
    """What the relay reads from the environment."""

    postgres_dsn: str = setting("CITYTAP_POSTGRES_DSN", url("postgresql", "postgres"), doc="PostgreSQL connection URL")
    kafka_bootstrap: str = setting("CITYTAP_KAFKA_BOOTSTRAP", host_port_list, doc="Kafka bootstrap servers")
    log_level: str = setting("CITYTAP_LOG_LEVEL", log_level, default="INFO", doc="DEBUG, INFO, WARNING or ERROR")
    idle_wait_ms: int = setting("CITYTAP_OUTBOX_IDLE_WAIT_MS", idle_wait_ms, default=IDLE_WAIT_MS_DEFAULT,
                                doc="how long to wait after a pass that found no backlog (1-1000 ms)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Publish a service schema's outbox to Kafka.")
    parser.add_argument("--schema", required=True, help="the service schema whose outbox to relay, e.g. wallet")
    args = parser.parse_args(argv)
    try:
        settings = load(RelaySettings, os.environ)
    except SettingsError as exc:
        print(f"outbox-relay: {exc}", file=sys.stderr)
        return 2
    logs.configure(f"outbox-relay-{args.schema}", settings.log_level)
    pool = create_pool(settings.postgres_dsn, name=f"citytap-relay-{args.schema}", max_size=2)
    with pool.connection() as conn:
        ensure_table(conn, args.schema)
    publisher = Publisher(settings.kafka_bootstrap, client_id=f"citytap-relay-{args.schema}")
    stop = stop_event_on_signals()
    OutboxRelay(pool, schema=args.schema, publisher=publisher, idle_wait_s=settings.idle_wait_ms / 1000).run(stop)
    publisher.close()
    pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
