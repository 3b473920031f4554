"""The demo city, end to end, against the running stack (`make demo`).

For now it proves the event backbone: a diagnostic event is written to a PostgreSQL outbox
in one transaction, the outbox relay publishes it to the real Kafka broker, and a consumer
with a PostgreSQL inbox receives and records it exactly once. Later steps add card, phone and
face riders, merchants and the settlement day.
"""

from __future__ import annotations

import os
import sys
import time
import uuid

from citytap.common.v1 import diagnostics_pb2
from libs import outbox
from libs.events import ConsumerLoop, Publisher, ensure_topics
from libs.grpc_health_probe import check
from libs.outbox import OutboxRelay
from libs.postgres import PostgresInbox, create_pool

SERVICES = ["fare_gate", "wallet", "face", "merchant", "settlement"]
TOPIC = "citytap.diagnostics.v1.events"
SCHEMA = "demo"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    env = os.environ
    step("services")
    unhealthy = 0
    for name in SERVICES:
        address = env[f"CITYTAP_{name.upper()}_ADDRESS"]
        status = check(address, timeout_s=2)
        unhealthy += status != "SERVING"
        print(f"  {name:<11} {address:<18} {status}")
    if unhealthy:
        print("demo: some services are not serving; see `make status` and .local/stack/logs", file=sys.stderr)
        return 1

    step("event round trip: PostgreSQL outbox -> Kafka -> consumer inbox")
    dsn, bootstrap = env["CITYTAP_POSTGRES_DSN"], env["CITYTAP_KAFKA_BOOTSTRAP"]
    ensure_topics(bootstrap, [TOPIC])
    pool = create_pool(dsn, name="citytap-demo", max_size=3)
    with pool.connection() as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
        outbox.ensure_table(conn, SCHEMA)
        conn.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.pings_received (event_id text PRIMARY KEY, message text,"
                     " received_at timestamptz NOT NULL DEFAULT now())")

    event = diagnostics_pb2.DiagnosticEvent(event_id=str(uuid.uuid4()), account_key="demo-city")
    event.occurred_at.GetCurrentTime()
    event.ping_sent.message = "hello from the demo city"
    started = time.perf_counter()
    with pool.connection() as conn, conn.transaction():
        outbox.enqueue(conn, SCHEMA, TOPIC, event)
    print(f"  written to the outbox     event_id={event.event_id}")

    publisher = Publisher(bootstrap, client_id="citytap-demo")
    relay = OutboxRelay(pool, schema=SCHEMA, publisher=publisher)
    group = f"citytap-demo-{uuid.uuid4().hex[:8]}"

    def record(received: diagnostics_pb2.DiagnosticEvent, tx: object) -> None:
        tx.execute(f"INSERT INTO {SCHEMA}.pings_received (event_id, message) VALUES (%s, %s)",  # type: ignore[attr-defined]
                   (received.event_id, received.ping_sent.message))

    consumer = ConsumerLoop(bootstrap=bootstrap, group_id=group, topics=[TOPIC],
                            envelope_type=diagnostics_pb2.DiagnosticEvent, handler=record,
                            inbox=PostgresInbox(pool, schema=SCHEMA, consumer=group))
    deadline = time.monotonic() + 30
    relayed = 0
    while time.monotonic() < deadline:
        relayed += relay.relay_once()
        consumer.run_once()
        with pool.connection() as conn:
            row = conn.execute(f"SELECT message FROM {SCHEMA}.pings_received WHERE event_id = %s",
                               (event.event_id,)).fetchone()
        if row:
            break
    elapsed_ms = (time.perf_counter() - started) * 1000
    consumer.close()
    publisher.close()
    pool.close()
    if not row:
        print("demo: the event did not come back through Kafka within 30 s", file=sys.stderr)
        return 1
    print(f"  relayed to Kafka topic    {TOPIC} ({relayed} outbox row(s) published)")
    print(f"  consumed and recorded     message={row[0]!r} in {elapsed_ms:.0f} ms (includes joining a new group)")
    print("\ndemo: every service is SERVING and the event made the round trip through the real broker.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
