"""The Kafka publisher and consumer loop against the real broker and PostgreSQL inbox."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaConsumer

from citytap.common.v1 import diagnostics_pb2
from libs.events import ConsumerLoop, Publisher, ensure_topics
from libs.postgres import PostgresInbox, create_pool

ROOT = Path(__file__).resolve().parents[2]


def ping(event_id: str, key: str = "acct-1", message: str = "hello") -> diagnostics_pb2.DiagnosticEvent:
    event = diagnostics_pb2.DiagnosticEvent(event_id=event_id, account_key=key)
    event.occurred_at.GetCurrentTime()
    event.ping_sent.message = message
    return event


def fresh_topic(bootstrap: str) -> str:
    topic = f"citytap.test.{uuid.uuid4().hex[:10]}"
    ensure_topics(bootstrap, [topic], partitions=3)
    return topic


def wait_for_stall(worker: subprocess.Popen[bytes], stall_file: Path, timeout_s: float = 60) -> dict[str, int]:
    """The counts a crash-test worker writes when it reaches its kill point (see kafka_worker)."""
    deadline = time.monotonic() + timeout_s
    while not stall_file.exists():
        assert worker.poll() is None, worker.stderr.read().decode()[-2000:] if worker.stderr else ""
        assert time.monotonic() < deadline, "the worker never reached its kill point"
        time.sleep(0.01)
    return json.loads(stall_file.read_text())


def make_handled_table(dsn: str, schema: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
        conn.execute(f"CREATE TABLE {schema}.handled (event_id text NOT NULL, pid int NOT NULL)")


def handled_ids(dsn: str, schema: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(f"SELECT event_id FROM {schema}.handled ORDER BY event_id")]


def test_published_envelope_carries_key_headers_and_payload(kafka_bootstrap: str) -> None:
    topic = fresh_topic(kafka_bootstrap)
    publisher = Publisher(kafka_bootstrap, client_id="test-publisher")
    event = ping(str(uuid.uuid4()), key="rider-42")
    metadata = publisher.publish_sync(topic, event)
    publisher.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, consumer_timeout_ms=10_000)
    record = next(iter(consumer))
    consumer.close()
    assert (record.partition, record.offset) == (metadata.partition, metadata.offset)
    assert record.key == b"rider-42"
    headers = dict(record.headers)
    assert headers["event-type"] == b"citytap.common.v1.PingSent"
    assert headers["event-id"] == event.event_id.encode()
    assert diagnostics_pb2.DiagnosticEvent.FromString(record.value) == event


def test_an_event_delivered_twice_is_handled_once(kafka_bootstrap: str, postgres_dsn: str, scratch_schema: str) -> None:
    topic = fresh_topic(kafka_bootstrap)
    make_handled_table(postgres_dsn, scratch_schema)
    publisher = Publisher(kafka_bootstrap, client_id="test-publisher")
    ids = [str(uuid.uuid4()) for _ in range(20)]
    for event_id in ids:
        publisher.publish(topic, ping(event_id, key=f"acct-{event_id[:2]}"))
    for event_id in ids[:5]:  # the same five events again, as a redelivery would bring them
        publisher.publish(topic, ping(event_id, key=f"acct-{event_id[:2]}"))
    publisher.flush()
    publisher.close()

    pool = create_pool(postgres_dsn, name="test-inbox", max_size=2)
    inbox = PostgresInbox(pool, schema=scratch_schema, consumer="dedupe-test")

    def handle(event: diagnostics_pb2.DiagnosticEvent, tx: psycopg.Connection) -> None:
        tx.execute(f"INSERT INTO {scratch_schema}.handled (event_id, pid) VALUES (%s, 0)", (event.event_id,))

    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=f"g-{uuid.uuid4().hex[:8]}", topics=[topic],
                        envelope_type=diagnostics_pb2.DiagnosticEvent, handler=handle, inbox=inbox)
    consumed = 0
    deadline = time.monotonic() + 30
    while consumed < 25 and time.monotonic() < deadline:
        consumed += loop.run_once()
    loop.close()
    pool.close()
    assert consumed == 25
    assert (loop.handled, loop.duplicates) == (20, 5)
    assert handled_ids(postgres_dsn, scratch_schema) == sorted(ids)


def test_failed_handler_commits_nothing_past_it_and_is_retried(kafka_bootstrap: str, postgres_dsn: str,
                                                               scratch_schema: str) -> None:
    topic = fresh_topic(kafka_bootstrap)
    make_handled_table(postgres_dsn, scratch_schema)
    publisher = Publisher(kafka_bootstrap, client_id="test-publisher")
    ids = [f"evt-{i:02d}" for i in range(10)]
    for event_id in ids:
        publisher.publish(topic, ping(event_id, key="one-account"))  # one key: one partition, in order
    publisher.flush()
    publisher.close()

    pool = create_pool(postgres_dsn, name="test-inbox", max_size=2)
    inbox = PostgresInbox(pool, schema=scratch_schema, consumer="retry-test")
    # Twice: the batch's one transaction fails first, then the record fails again when the
    # records are retried one by one, and that error reaches the caller.
    failures = {"evt-04": 2}

    def handle(event: diagnostics_pb2.DiagnosticEvent, tx: psycopg.Connection) -> None:
        tx.execute(f"INSERT INTO {scratch_schema}.handled (event_id, pid) VALUES (%s, 0)", (event.event_id,))
        if failures.get(event.event_id):
            failures[event.event_id] -= 1
            raise RuntimeError("handler failed once")

    group = f"g-{uuid.uuid4().hex[:8]}"
    loop = ConsumerLoop(bootstrap=kafka_bootstrap, group_id=group, topics=[topic],
                        envelope_type=diagnostics_pb2.DiagnosticEvent, handler=handle, inbox=inbox)
    with pytest.raises(RuntimeError):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            loop.run_once()
    # The failing event's insert rolled back with its inbox row; the four before it are kept.
    assert handled_ids(postgres_dsn, scratch_schema) == ids[:4]
    deadline = time.monotonic() + 30
    while len(handled_ids(postgres_dsn, scratch_schema)) < 10 and time.monotonic() < deadline:
        loop.run_once()
    loop.close()
    pool.close()
    assert handled_ids(postgres_dsn, scratch_schema) == ids


def test_killing_a_consumer_mid_batch_skips_nothing(kafka_bootstrap: str, postgres_dsn: str, scratch_schema: str,
                                                    tmp_path: Path) -> None:
    """Records handled one by one, each in its own inbox transaction: the kill lands with
    some of a batch's records committed and its offsets not, and those come back as duplicates."""
    topic = fresh_topic(kafka_bootstrap)
    make_handled_table(postgres_dsn, scratch_schema)
    total = 200
    ids = [str(uuid.uuid4()) for _ in range(total)]
    publisher = Publisher(kafka_bootstrap, client_id="test-publisher")
    for event_id in ids:
        publisher.publish(topic, ping(event_id, key=event_id[:4]))
    publisher.flush()
    publisher.close()

    stall_file = tmp_path / "stalled.json"
    env = {**os.environ, "KAFKA": kafka_bootstrap, "TOPIC": topic, "GROUP": f"g-{uuid.uuid4().hex[:8]}",
           "SCHEMA": scratch_schema, "DSN": postgres_dsn, "EXPECTED": str(total), "BATCH": "50",
           "HANDLE_SLEEP_S": "0.002", "ONE_BY_ONE": "1", "STALL_FILE": str(stall_file), "STALL_AFTER": "75"}
    first = subprocess.Popen([sys.executable, "-m", "tests.integration.kafka_worker"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The worker stops where the kill must land: 75 or more records recorded, and at least
    # one of them in a batch whose offsets are not committed yet. SIGKILL it there.
    stalled = wait_for_stall(first, stall_file)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    before_restart = len(handled_ids(postgres_dsn, scratch_schema))
    assert before_restart == stalled["recorded"] and 75 <= before_restart < total
    assert stalled["uncommitted"] >= 1 and stalled["committed"] + stalled["uncommitted"] == before_restart

    env.pop("STALL_FILE")  # the second worker runs to the end
    second = subprocess.run([sys.executable, "-m", "tests.integration.kafka_worker"], cwd=ROOT, env=env,
                            capture_output=True, timeout=120)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    stats = json.loads(second.stdout.decode().strip().splitlines()[-1])
    assert handled_ids(postgres_dsn, scratch_schema) == sorted(ids)  # nothing skipped, nothing twice
    assert stats["handled"] == total - before_restart
    # The killed batch's uncommitted records came back, each recognised as handled.
    assert stats["duplicates"] == stalled["uncommitted"]


def test_killing_a_consumer_inside_a_batch_transaction_skips_nothing(kafka_bootstrap: str, postgres_dsn: str,
                                                                      scratch_schema: str, tmp_path: Path) -> None:
    """Each partition's batch handled in ONE inbox transaction: killed while a batch's
    transaction is open, that batch is neither committed nor skipped; the next worker handles
    exactly what was not committed, and nothing twice."""
    topic = fresh_topic(kafka_bootstrap)
    make_handled_table(postgres_dsn, scratch_schema)
    total = 200
    ids = [str(uuid.uuid4()) for _ in range(total)]
    publisher = Publisher(kafka_bootstrap, client_id="test-publisher")
    for event_id in ids:
        publisher.publish(topic, ping(event_id, key="one-account"))  # one partition: batches of 50 in order
    publisher.flush()
    publisher.close()

    stall_file = tmp_path / "stalled.json"
    env = {**os.environ, "KAFKA": kafka_bootstrap, "TOPIC": topic, "GROUP": f"g-{uuid.uuid4().hex[:8]}",
           "SCHEMA": scratch_schema, "DSN": postgres_dsn, "EXPECTED": str(total), "BATCH": "50",
           "HANDLE_SLEEP_S": "0.002", "STALL_FILE": str(stall_file)}
    first = subprocess.Popen([sys.executable, "-m", "tests.integration.kafka_worker"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The worker stops inside a batch's open transaction, after at least one batch has
    # committed, with rows of the open batch inserted but not committed. SIGKILL it there.
    stalled = wait_for_stall(first, stall_file)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    before_restart = len(handled_ids(postgres_dsn, scratch_schema))
    assert before_restart == stalled["recorded"] == stalled["committed"] and 1 <= before_restart < total
    assert stalled["uncommitted"] >= 1  # rows inserted in the open transaction died with it

    env.pop("STALL_FILE")  # the second worker runs to the end
    second = subprocess.run([sys.executable, "-m", "tests.integration.kafka_worker"], cwd=ROOT, env=env,
                            capture_output=True, timeout=120)
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    stats = json.loads(second.stdout.decode().strip().splitlines()[-1])
    assert handled_ids(postgres_dsn, scratch_schema) == sorted(ids)  # nothing skipped, nothing twice
    assert stats["handled"] == total - before_restart
