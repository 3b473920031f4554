"""A consumer process for the crash test: `python -m tests.integration.kafka_worker`.

It consumes DiagnosticEvents from TOPIC in group GROUP with a PostgreSQL inbox, and for
each new event inserts a row (event id, worker pid) into SCHEMA.handled in the inbox's
transaction, sleeping HANDLE_SLEEP_S per record so a batch takes long enough to be killed
in the middle. It exits after EXPECTED distinct events are recorded and prints its counts
as JSON. ONE_BY_ONE=1 handles each record in its own inbox transaction instead of each
partition's batch in one.
"""

from __future__ import annotations

import json
import os
import sys
import time

from citytap.common.v1 import diagnostics_pb2
from libs.events import ConsumerLoop
from libs.postgres import PostgresInbox, create_pool


def main() -> int:
    bootstrap, topic, group, schema = (os.environ[k] for k in ("KAFKA", "TOPIC", "GROUP", "SCHEMA"))
    expected = int(os.environ["EXPECTED"])
    sleep_s = float(os.environ.get("HANDLE_SLEEP_S", "0"))
    pool = create_pool(os.environ["DSN"], name="kafka-worker", max_size=2)
    inbox = PostgresInbox(pool, schema=schema, consumer=group)

    def handle(event: diagnostics_pb2.DiagnosticEvent, tx: object) -> None:
        time.sleep(sleep_s)
        tx.execute(f"INSERT INTO {schema}.handled (event_id, pid) VALUES (%s, %s)", (event.event_id, os.getpid()))  # type: ignore[attr-defined]

    loop = ConsumerLoop(
        bootstrap=bootstrap, group_id=group, topics=[topic], envelope_type=diagnostics_pb2.DiagnosticEvent,
        handler=handle, inbox=inbox, batch_records_max=int(os.environ.get("BATCH", "50")),
        handle_together=os.environ.get("ONE_BY_ONE", "") != "1",
        session_timeout_ms=6000,  # the broker's minimum: a killed worker's partitions move on quickly
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        loop.run_once()
        with pool.connection() as conn:
            done = conn.execute(f"SELECT count(*) FROM {schema}.handled").fetchone()[0]
        if done >= expected:
            break
    loop.close()
    pool.close()
    print(json.dumps({"handled": loop.handled, "duplicates": loop.duplicates}))
    return 0 if done >= expected else 1


if __name__ == "__main__":
    sys.exit(main())
