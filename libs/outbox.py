"""Transactional outbox: events leave PostgreSQL only after the change they describe commits.

A service writes its state change and `enqueue(conn, topic, envelope)` in one database
transaction. `OutboxRelay` then publishes unpublished rows in commit order and marks them
published. A crash before the commit leaves neither the change nor the event; a crash after
publishing but before marking republishes the same envelope with the same event id, which
consumers drop through their inbox. So no event is lost and none is invented.

Only one relay per schema publishes at a time (a transaction-scoped advisory lock), which
keeps each account's events in order on its partition.

The library owns its table, `<schema>.outbox_events`, and creates it with `ensure_table`
when a service starts (idempotent), so every service gets the same outbox.
"""

from __future__ import annotations

import hashlib
import logging
import threading

import psycopg
from google.protobuf.message import Message
from psycopg import sql
from psycopg_pool import ConnectionPool

from libs.events import CONTENT_TYPE, Publisher, event_type
from libs.settings import int_between

log = logging.getLogger("citytap.outbox")

RELAY_BATCH_MAX = 500
# The relay's wait after a pass that found no backlog (CITYTAP_OUTBOX_IDLE_WAIT_MS): at 200 ms
# an idle relay makes five passes a second and a busy one publishes 0.2 s of events per
# batch; at 80 taps/s, going from 50 ms to 200 ms cut the stack's CPU per tap by a fifth.
IDLE_WAIT_MS_DEFAULT = 200
IDLE_WAIT_MS_MAX = 1000
idle_wait_ms = int_between(1, IDLE_WAIT_MS_MAX, "ms")  # the setting's parser


def ensure_table(conn: psycopg.Connection, schema: str) -> None:
    """Create `<schema>.outbox_events` and its index if they do not exist."""
    table = sql.Identifier(schema, "outbox_events")
    conn.execute(sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (seq bigserial PRIMARY KEY, event_id text NOT NULL UNIQUE,"
        " topic text NOT NULL, key bytea, event_type text NOT NULL, payload bytea NOT NULL,"
        " created_at timestamptz NOT NULL DEFAULT now(), published_at timestamptz)"
    ).format(table))
    conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (seq) WHERE published_at IS NULL").format(
        sql.Identifier(f"{schema}_outbox_unpublished"), table))


def enqueue(conn: psycopg.Connection, schema: str, topic: str, envelope: Message) -> None:
    """Record `envelope` for `topic` inside the caller's open transaction."""
    if not envelope.event_id:
        raise ValueError("an event envelope needs an event_id")
    key = envelope.account_key.encode() if envelope.account_key else None
    conn.execute(
        sql.SQL("INSERT INTO {} (event_id, topic, key, event_type, payload) VALUES (%s, %s, %s, %s, %s)").format(
            sql.Identifier(schema, "outbox_events")
        ),
        (envelope.event_id, topic, key, event_type(envelope), envelope.SerializeToString()),
    )


class OutboxRelay:
    """Publishes a schema's outbox rows in order; run it with `run(stop)` on a thread."""

    def __init__(self, pool: ConnectionPool, *, schema: str, publisher: Publisher, batch_max: int = 200,
                 idle_wait_s: float = IDLE_WAIT_MS_DEFAULT / 1000) -> None:
        if not 0 < batch_max <= RELAY_BATCH_MAX:
            raise ValueError(f"batch_max must be in 1..{RELAY_BATCH_MAX}")
        self._pool = pool
        self._table = sql.Identifier(schema, "outbox_events")
        self._publisher = publisher
        self._batch_max = batch_max
        self._idle_wait_s = idle_wait_s
        self._lock_key = int.from_bytes(hashlib.sha256(f"citytap.outbox.{schema}".encode()).digest()[:8], "big", signed=True)
        self.published = 0

    def relay_once(self) -> int:
        """Publish up to one batch of unpublished rows; return how many were published."""
        with self._pool.connection() as conn, conn.transaction():
            got_lock = conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (self._lock_key,)).fetchone()[0]
            if not got_lock:
                return 0  # another relay of this schema is publishing
            rows = conn.execute(
                sql.SQL("SELECT seq, event_id, topic, key, event_type, payload FROM {} "
                        "WHERE published_at IS NULL ORDER BY seq LIMIT %s").format(self._table),
                (self._batch_max,),
            ).fetchall()
            if not rows:
                return 0
            futures = [
                self._publisher.publish_raw(
                    topic, key, bytes(payload),
                    [("event-type", kind.encode()), ("event-id", event_id.encode()), ("content-type", CONTENT_TYPE)],
                )
                for _, event_id, topic, key, kind, payload in rows
            ]
            for future in futures:
                future.get(timeout=30)  # acknowledged by all in-sync replicas
            conn.execute(
                sql.SQL("UPDATE {} SET published_at = now() WHERE seq = ANY(%s)").format(self._table),
                ([row[0] for row in rows],),
            )
        self.published += len(rows)
        return len(rows)

    def run(self, stop: threading.Event) -> None:
        """Relay until `stop` is set; back off (bounded) while Kafka or PostgreSQL fail.

        After a batch shorter than `batch_max` (no backlog) the relay waits `idle_wait_s`
        before looking again, so under a steady load it publishes what gathered in that time
        as one batch instead of spinning on a few events at a time: the cost of a pass (a
        transaction, a query, one Kafka round trip and an update) is paid per batch, not per
        event. An event therefore reaches Kafka about `idle_wait_s` after its commit at most,
        plus the publish itself; nothing waits on that but consumers."""
        backoff_s = 0.1
        while not stop.is_set():
            try:
                if self.relay_once() < self._batch_max:
                    stop.wait(self._idle_wait_s)
                backoff_s = 0.1
            except Exception:  # noqa: BLE001 - keep relaying after transient failures
                log.exception("outbox relay failed; retrying", extra={"fields": {"backoff_s": backoff_s}})
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, 5.0)
