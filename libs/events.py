"""Kafka publishing and consuming of protobuf event envelopes.

Every event is a service's envelope message (`WalletEvent`, `FareGateEvent`, ...) with an
`event_id`, `occurred_at`, an `account_key` and a `payload` oneof. On the wire:

- key: the envelope's `account_key`, so one account's events land on one partition, in order;
- value: the serialized envelope;
- headers: `event-type` (full protobuf name of the payload message), `event-id`, and
  `content-type: application/x-protobuf`.

`Publisher` uses acks=all and the idempotent producer, so a broker retry never duplicates
or reorders within a partition. kafka-python does not implement Kafka 4's transaction
protocol, so producers that must not lose or invent events publish from a transactional
outbox, and consumers are idempotent: `ConsumerLoop` dedupes on event id through an `Inbox`,
runs the handler inside the inbox's transaction, and commits a partition's offsets only
after every record the batch brought from that partition has been handled.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

log = logging.getLogger("citytap.events")

E = TypeVar("E", bound=Message)

CONTENT_TYPE = b"application/x-protobuf"
BATCH_RECORDS_MAX = 500
# With a fetch wait: what the broker gathers before it answers early (a few hundred events).
FETCH_GATHER_BYTES = 64 * 1024
FETCH_WAIT_MS_MAX = 5_000
RETRY_BACKOFF_S_MAX = 5.0


def event_type(envelope: Message) -> str:
    """The full protobuf name of the payload set in `envelope`'s `payload` oneof."""
    field = envelope.WhichOneof("payload")
    if field is None:
        raise ValueError(f"{envelope.DESCRIPTOR.full_name} has no payload set")
    return getattr(envelope, field).DESCRIPTOR.full_name


def ensure_topics(bootstrap: str, topics: Iterable[str], *, partitions: int = 3, replication_factor: int = 1,
                  timeout_ms: int = 15_000) -> None:
    """Create `topics` if they do not exist yet (existing ones are left as they are)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="citytap-admin", request_timeout_ms=timeout_ms)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            try:
                admin.create_topics(
                    {t: {"num_partitions": partitions, "replication_factor": replication_factor} for t in missing},
                    timeout_ms=timeout_ms,
                )
            except TopicAlreadyExistsError:
                pass  # another process created it first; that is the state we wanted
    finally:
        admin.close()


class Publisher:
    """Publishes envelopes with acks=all and the idempotent producer."""

    def __init__(self, bootstrap: str, *, client_id: str, linger_ms: int = 2, delivery_timeout_ms: int = 30_000) -> None:
        self._producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            acks="all",
            enable_idempotence=True,
            linger_ms=linger_ms,
            delivery_timeout_ms=delivery_timeout_ms,
            request_timeout_ms=min(delivery_timeout_ms, 15_000),
            max_block_ms=10_000,
        )

    def publish(self, topic: str, envelope: Message) -> Any:
        """Queue `envelope` for `topic`; returns a future whose `.get(timeout)` confirms it."""
        if not getattr(envelope, "event_id", ""):
            raise ValueError("an event envelope needs an event_id")
        headers = [
            ("event-type", event_type(envelope).encode()),
            ("event-id", envelope.event_id.encode()),
            ("content-type", CONTENT_TYPE),
        ]
        key = envelope.account_key.encode() if getattr(envelope, "account_key", "") else None
        return self._producer.send(topic, value=envelope.SerializeToString(), key=key, headers=headers)

    def publish_sync(self, topic: str, envelope: Message, *, timeout_s: float = 10.0) -> Any:
        """Publish and wait until the broker has acknowledged it on all in-sync replicas."""
        return self.publish(topic, envelope).get(timeout=timeout_s)

    def publish_raw(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]) -> Any:
        """Forward bytes unchanged (used for dead letters, whose value may not parse)."""
        return self._producer.send(topic, value=value, key=key, headers=headers)

    def flush(self, timeout_s: float = 10.0) -> None:
        self._producer.flush(timeout=timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self._producer.close(timeout=timeout_s)


class Inbox(Protocol):
    """Remembers handled event ids so each event's effect happens once.

    `process(event_id, fn)` runs `fn(tx)` and records `event_id` atomically, or does
    nothing and returns False when `event_id` was already recorded."""

    def process(self, event_id: str, fn: Callable[[Any], None]) -> bool: ...

    def process_many(self, items: Sequence[tuple[str, Callable[[Any], None]]]) -> list[bool]:
        """`process` for each (event id, fn) in order, all in one transaction: every effect
        and every id commit together or none does (the caller then retries one by one)."""
        ...


class MemoryInbox:
    """An in-process Inbox for unit tests of pure handlers; `fn` receives None."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def process(self, event_id: str, fn: Callable[[Any], None]) -> bool:
        if event_id in self.seen:
            return False
        fn(None)
        self.seen.add(event_id)
        return True

    def process_many(self, items: Sequence[tuple[str, Callable[[Any], None]]]) -> list[bool]:
        done: list[bool] = []
        added: list[str] = []
        try:
            for event_id, fn in items:
                fresh = event_id not in self.seen
                if fresh:
                    fn(None)
                    self.seen.add(event_id)
                    added.append(event_id)
                done.append(fresh)
        except Exception:
            self.seen.difference_update(added)  # all or nothing, like a transaction
            raise
        return done


class ConsumerLoop(Generic[E]):
    """Consumes envelopes in bounded batches; each event is handled once via the inbox.

    Offsets move forward only after every record of a batch has been handled (or
    recognised as a duplicate). If a handler raises, the offsets of the records handled
    before it are committed, the partition is rewound to the failing record, and the error
    propagates from `run_once` (`run` logs it and retries after a bounded backoff). A record
    whose bytes do not parse is sent to `<topic>.dead-letter` when a dead-letter publisher
    is given, and otherwise stops the loop: nothing is skipped silently.
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        group_id: str,
        topics: list[str],
        envelope_type: type[E],
        handler: Callable[[E, Any], None],
        inbox: Inbox,
        batch_records_max: int = 100,
        poll_timeout_ms: int = 500,
        client_id: str | None = None,
        dead_letter: Publisher | None = None,
        handle_together: bool = True,
        session_timeout_ms: int | None = None,
        fetch_wait_ms: int = 0,
    ) -> None:
        """`fetch_wait_ms` > 0 lets the broker hold a fetch until about `FETCH_GATHER_BYTES`
        have gathered or that many milliseconds have passed, whichever is first: a consumer
        that may lag a little (settlement) then takes a busy topic in a few large batches
        instead of many small ones, and the broker and the consumer spend far less CPU per
        record. 0 (the default) answers a fetch as soon as one record is there."""
        if not 0 < batch_records_max <= BATCH_RECORDS_MAX:
            raise ValueError(f"batch_records_max must be in 1..{BATCH_RECORDS_MAX}")
        if not 0 <= fetch_wait_ms <= FETCH_WAIT_MS_MAX:
            raise ValueError(f"fetch_wait_ms must be in 0..{FETCH_WAIT_MS_MAX}")
        self._envelope_type = envelope_type
        self._handler = handler
        self._inbox = inbox
        self._batch_max = batch_records_max
        self._poll_timeout_ms = poll_timeout_ms
        self._dead_letter = dead_letter
        self._handle_together_enabled = handle_together  # False: one inbox transaction per record
        self._consumer = KafkaConsumer(
            *topics,
            bootstrap_servers=bootstrap,
            group_id=group_id,
            client_id=client_id or group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=batch_records_max,
            isolation_level="read_committed",
            **({"fetch_min_bytes": FETCH_GATHER_BYTES, "fetch_max_wait_ms": fetch_wait_ms} if fetch_wait_ms else {}),
            # How soon the group gives a dead member's partitions to another (the client's
            # default when None; tests that kill consumers shorten it).
            **({"session_timeout_ms": session_timeout_ms} if session_timeout_ms is not None else {}),
        )
        self.handled = 0
        self.duplicates = 0

    def run_once(self) -> int:
        """Poll one bounded batch, handle it, commit its offsets; return records consumed.

        Each partition's records are first handled together, in one inbox transaction (one
        commit for the lot, which is what lets a consumer keep up with a busy topic). If
        that fails, they are handled again one by one, so the records before a failing one
        still commit and the failing one is retried alone."""
        batches = self._consumer.poll(timeout_ms=self._poll_timeout_ms, max_records=self._batch_max)
        consumed = 0
        pending = list(batches.items())
        while pending:
            partition, records = pending.pop(0)
            if self._handle_together(records):
                self._commit({partition: records[-1].offset + 1})
                consumed += len(records)
                continue
            next_offset: int | None = None
            try:
                for record in records:
                    self._handle(record)
                    next_offset = record.offset + 1
                    consumed += 1
            except Exception:
                if next_offset is not None:
                    self._commit({partition: next_offset})
                # poll() already moved every returned partition's position past its
                # records; rewind the failing one and those not yet handled.
                self._consumer.seek(partition, next_offset if next_offset is not None else records[0].offset)
                for other, other_records in pending:
                    self._consumer.seek(other, other_records[0].offset)
                raise
            if next_offset is not None:
                self._commit({partition: next_offset})
        return consumed

    def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        self._consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in offsets.items()})

    def _handle_together(self, records: list[Any]) -> bool:
        """Handle `records` in one inbox transaction; False (nothing done) when the inbox
        cannot, a record does not parse, or the transaction fails: the caller then goes one
        by one."""
        process_many = getattr(self._inbox, "process_many", None)
        if not self._handle_together_enabled or process_many is None or len(records) < 2:
            return False
        envelopes = []
        for record in records:
            try:
                envelope = self._envelope_type.FromString(record.value)
            except DecodeError:
                return False
            if not envelope.event_id:
                return False
            envelopes.append(envelope)
        try:
            done = process_many([(e.event_id, functools.partial(self._handler, e)) for e in envelopes])
        except Exception:  # noqa: BLE001 - retried one by one, where the failing record is found and reported
            log.warning("batch handling failed; handling the records one by one",
                        extra={"fields": {"records": len(records)}}, exc_info=True)
            return False
        for envelope, record, fresh in zip(envelopes, records, done, strict=True):
            if fresh:
                self.handled += 1
            else:
                self.duplicates += 1
                log.info("duplicate event skipped", extra={"fields": {"event_id": envelope.event_id,
                                                                       "topic": record.topic}})
        return True

    def _handle(self, record: Any) -> None:
        try:
            envelope = self._envelope_type.FromString(record.value)
            if not envelope.event_id:
                raise DecodeError("envelope has no event_id")
        except DecodeError as exc:
            self._dead_letter_or_raise(record, exc)
            return
        if self._inbox.process(envelope.event_id, lambda tx: self._handler(envelope, tx)):
            self.handled += 1
        else:
            self.duplicates += 1
            log.info("duplicate event skipped", extra={"fields": {"event_id": envelope.event_id, "topic": record.topic}})

    def _dead_letter_or_raise(self, record: Any, exc: Exception) -> None:
        if self._dead_letter is None:
            raise ValueError(f"unparseable record at {record.topic}/{record.partition}@{record.offset}: {exc}") from exc
        headers = list(record.headers or []) + [("dead-letter-reason", str(exc).encode()[:500])]
        self._dead_letter.publish_raw(f"{record.topic}.dead-letter", record.key, record.value, headers).get(timeout=10)
        log.error("record sent to dead letter", extra={"fields": {"topic": record.topic, "offset": record.offset}})

    def run(self, stop: threading.Event) -> None:
        """Handle batches until `stop` is set; a failing batch is retried with backoff."""
        backoff_s = 0.1
        while not stop.is_set():
            try:
                self.run_once()
                backoff_s = 0.1
            except Exception:
                log.exception("consumer batch failed; retrying", extra={"fields": {"backoff_s": backoff_s}})
                stop.wait(backoff_s)
                backoff_s = min(backoff_s * 2, RETRY_BACKOFF_S_MAX)

    def close(self) -> None:
        self._consumer.close(autocommit=False)
