"""A consumer process for the crash test: `python -m tests.integration.kafka_worker`.

It consumes DiagnosticEvents from TOPIC in group GROUP with a PostgreSQL inbox, and for
each new event inserts a row (event id, worker pid) into SCHEMA.handled in the inbox's
transaction, sleeping HANDLE_SLEEP_S per record so a batch takes long enough to be killed
in the middle. It exits after EXPECTED distinct events are recorded and prints its counts
as JSON. ONE_BY_ONE=1 handles each record in its own inbox transaction instead of each
partition's batch in one.

STALL_FILE makes the crash tests deterministic: once the worker is where the test means to
kill it, it writes its counts to that file as JSON and sleeps until killed.
It stalls before handling a record once at least one batch's offsets are committed, at
least STALL_AFTER records are recorded, and at least one record has been handled since the
last offset commit ("uncommitted"):
- one by one, those records are recorded, so a kill makes them come back as duplicates;
- batches together, they sit in the batch's open transaction, so a kill rolls them back.
"""

from __future__ import annotations

import json
import os
import sys
import time

from kafka.structs import TopicPartition

from citytap.common.v1 import diagnostics_pb2
from libs.events import ConsumerLoop
from libs.postgres import PostgresInbox, create_pool


def main() -> int:
    bootstrap, topic, group, schema = (os.environ[k] for k in ("KAFKA", "TOPIC", "GROUP", "SCHEMA"))
    expected = int(os.environ["EXPECTED"])
    sleep_s = float(os.environ.get("HANDLE_SLEEP_S", "0"))
    pool = create_pool(os.environ["DSN"], name="kafka-worker", max_size=2)
    inbox = PostgresInbox(pool, schema=schema, consumer=group)

    one_by_one = os.environ.get("ONE_BY_ONE", "") == "1"
    stall_file = os.environ.get("STALL_FILE", "")
    stall_after = int(os.environ.get("STALL_AFTER", "1"))
    # uncommitted: records handled since the last offset commit. One by one, each is already
    # recorded (its own transaction committed as its handler returned); together, they sit in
    # the batch's open transaction.
    counts = {"recorded": 0, "uncommitted": 0, "committed": 0}

    def handle(event: diagnostics_pb2.DiagnosticEvent, tx: object) -> None:
        if stall_file and counts["uncommitted"] >= 1 and counts["committed"] >= 1 and counts["recorded"] >= stall_after:
            stall(stall_file, counts)
        time.sleep(sleep_s)
        tx.execute(f"INSERT INTO {schema}.handled (event_id, pid) VALUES (%s, %s)", (event.event_id, os.getpid()))  # type: ignore[attr-defined]
        counts["uncommitted"] += 1
        if one_by_one:
            counts["recorded"] += 1

    positions: dict[TopicPartition, int] = {}

    class CountingLoop(ConsumerLoop):
        """Counts the records whose offsets it commits (the stalling worker starts a fresh
        topic, whose partitions begin at offset 0)."""

        def _commit(self, offsets: dict[TopicPartition, int]) -> None:
            super()._commit(offsets)
            for tp, offset in offsets.items():
                counts["committed"] += offset - positions.get(tp, 0)
                positions[tp] = offset
            if not one_by_one:
                counts["recorded"] += counts["uncommitted"]
            counts["uncommitted"] = 0

    loop = CountingLoop(
        bootstrap=bootstrap, group_id=group, topics=[topic], envelope_type=diagnostics_pb2.DiagnosticEvent,
        handler=handle, inbox=inbox, batch_records_max=int(os.environ.get("BATCH", "50")),
        handle_together=not one_by_one,
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


def stall(path: str, counts: dict[str, int]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(counts, f)
    os.replace(tmp, path)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
