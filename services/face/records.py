"""The face service's use cases: consent, enrolment, matching, deletion, liveness, retention.

Every write is one short PostgreSQL transaction that also puts its event in the outbox
(libs.outbox), so an event exists exactly when its change committed. The index is changed
after the commit, under a per-account lock that the same account's writes share, so an
enrolment and a deletion of one account cannot leave the index out of step with the store.
Images and frames are analysed before any transaction opens and are never stored; no event
carries a template, an embedding or a score.

Who can be matched: identity is decided over every enrolled template first, and only then
is the purpose checked. A rider who is the best match but has not consented to the purpose
makes the answer NO_MATCH; the search never falls through to the next-best rider, who is
not the person in front of the camera.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Protocol

import numpy as np
import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from citytap.face.v1 import events_pb2, face_pb2
from libs import errors, outbox
from libs.protos import timestamp_pb
from services.face.crypto import TemplateCipher
from services.face.domain import (
    Consent,
    ConsentRequest,
    Decision,
    DeletionReason,
    FaceObservation,
    LivenessConfig,
    LivenessVerdict,
    MatchConfig,
    MatchOutcome,
    Purpose,
    check_burst_size,
    check_id,
    consent_hash,
    decide,
    liveness,
    mean_encoding,
    validate_consent,
)
from services.face.index import TemplateIndex
from services.face.repository import Repository

log = logging.getLogger("citytap.face")

TOPIC = "citytap.face.v1.events"
ACCOUNT_LOCK_STRIPES = 64
EXPIRY_BATCH_MAX = 100
REENCRYPT_BATCH_MAX = 500
_MATCH_EVENT_NAMESPACE = uuid.UUID("6f1c1f7e-3b9e-4a51-9a43-5c6b0f6d2a11")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Analyser(Protocol):
    """What the service needs from the face model (face_model.FaceModel in production)."""

    def observe(self, data: bytes, *, field: str = "image", index: int | None = None) -> FaceObservation: ...


@dataclass(frozen=True)
class Enrolment:
    enrolled_at: datetime
    retain_until: datetime


@dataclass(frozen=True)
class MatchResult:
    outcome: MatchOutcome
    account_id: str
    distance: float
    margin: float


@dataclass(frozen=True)
class Deletion:
    deleted: bool
    deleted_at: datetime


def _envelope(account_id: str, at: datetime, *, event_id: str | None = None, **payload: object) -> events_pb2.FaceEvent:
    return events_pb2.FaceEvent(event_id=event_id or str(uuid.uuid4()), occurred_at=timestamp_pb(at),
                                account_key=account_id, **payload)  # type: ignore[arg-type]


def consent_to_proto(consent: Consent) -> face_pb2.Consent:
    return face_pb2.Consent(
        consent_id=consent.consent_id, account_id=consent.account_id,
        purpose=face_pb2.ConsentPurpose.Value("CONSENT_PURPOSE_" + consent.purpose.value),
        retention_days=consent.retention_days,
        channel=face_pb2.ConsentChannel.Value("CONSENT_CHANNEL_" + consent.channel.value),
        notice_version=consent.notice_version, given_at=timestamp_pb(consent.given_at))


def _purpose_pb(purpose: Purpose) -> int:
    return face_pb2.ConsentPurpose.Value("CONSENT_PURPOSE_" + purpose.value)


class FaceRecords:
    """The face service's use cases over one schema, one cipher, one model and one index."""

    def __init__(self, pool: ConnectionPool, *, schema: str, cipher: TemplateCipher, model: Analyser,
                 index: TemplateIndex, match: MatchConfig, liveness_config: LivenessConfig,
                 retention_days_max: int, clock: Callable[[], datetime] = utc_now, topic: str = TOPIC) -> None:
        self._pool = pool
        self._repo = Repository(schema)
        self.schema = schema
        self._cipher = cipher
        self._model = model
        self.index = index
        self.match_config = match
        self.liveness_config = liveness_config
        self.retention_days_max = retention_days_max
        self._clock = clock
        self._topic = topic
        self._labels: dict[int, str] = {}
        self._labels_lock = threading.Lock()
        # Local index writes are numbered, so a refresh from the store never undoes a write
        # this process made after the refresh read the store.
        self._generation = 0
        self._label_generation: dict[int, int] = {}
        self._watermark: datetime | None = None
        self._account_locks = [threading.Lock() for _ in range(ACCOUNT_LOCK_STRIPES)]

    # --- plumbing -------------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the face service's clock must return aware datetimes")
        return now

    def _account_lock(self, account_id: str) -> threading.Lock:
        return self._account_locks[hash(account_id) % ACCOUNT_LOCK_STRIPES]

    def _transaction(self, work: Callable[[psycopg.Connection], object]) -> object:
        try:
            with self._pool.connection() as conn, conn.transaction():
                return work(conn)
        except PoolTimeout as exc:
            raise errors.Unavailable("UNAVAILABLE", "no database connection is free; retry") from exc
        except psycopg.OperationalError as exc:
            raise errors.Unavailable("UNAVAILABLE", "the database is unreachable; retry") from exc

    def _index_put(self, label: int, account_id: str, vector: np.ndarray, *, if_unchanged_since: int | None = None,
                   enrolled_at: datetime | None = None) -> None:
        with self._labels_lock:
            if if_unchanged_since is not None and self._label_generation.get(label, 0) > if_unchanged_since:
                return
            self._generation += 1
            self._label_generation[label] = self._generation
            self._labels[label] = account_id
            if enrolled_at is not None and (self._watermark is None or enrolled_at > self._watermark):
                self._watermark = enrolled_at
            self.index.upsert(label, vector)

    def _index_drop(self, label: int, *, if_unchanged_since: int | None = None) -> None:
        with self._labels_lock:
            if if_unchanged_since is not None and self._label_generation.get(label, 0) > if_unchanged_since:
                return
            self._generation += 1
            self._label_generation[label] = self._generation
            self._labels.pop(label, None)
            self.index.remove(label)

    # --- start-up ---------------------------------------------------------------------------

    def load_index(self) -> int:
        """Rebuild the index from the encrypted store; returns how many templates it holds."""
        started = time.monotonic()
        labels: list[int] = []
        vectors: list[np.ndarray] = []
        owners: dict[int, str] = {}
        enrolled: list[datetime] = []
        with self._pool.connection() as conn, conn.transaction():
            for stored in self._repo.all_templates(conn):
                labels.append(stored.label)
                enrolled.append(stored.enrolled_at)
                vectors.append(self._cipher.open(stored.account_id, stored.sealed))
                owners[stored.label] = stored.account_id
        matrix = np.vstack(vectors) if vectors else np.zeros((0, self.index.dim), dtype=np.float32)
        self.index.build(labels, matrix)
        with self._labels_lock:
            self._labels = owners
            self._watermark = max((t for t in enrolled), default=None)
        log.info("face index built", extra={"fields": {"templates": len(labels), "key_id": self._cipher.current_key_id,
                                                        "seconds": round(time.monotonic() - started, 3)}})
        return len(labels)

    def refresh_index(self, overlap: timedelta = timedelta(minutes=5)) -> tuple[int, int]:
        """Bring the index in step with writes other replicas made: templates enrolled since
        the newest one seen (less `overlap`, for transactions that committed late) are
        loaded, and labels no longer in the store are dropped. Returns (loaded, dropped)."""
        with self._labels_lock:
            since_generation = self._generation
            watermark = self._watermark
        with self._pool.connection() as conn, conn.transaction():
            recent = self._repo.templates_enrolled_since(conn, watermark - overlap) if watermark else \
                list(self._repo.all_templates(conn))
            stored_labels = self._repo.all_labels(conn)
        loaded = 0
        for stored in recent:
            self._index_put(stored.label, stored.account_id, self._cipher.open(stored.account_id, stored.sealed),
                            if_unchanged_since=since_generation, enrolled_at=stored.enrolled_at)
            loaded += 1
        with self._labels_lock:
            gone = [label for label in self._labels if label not in stored_labels]
        for label in gone:
            self._index_drop(label, if_unchanged_since=since_generation)
        with self._labels_lock:  # forget the generations of labels long gone, so the map stays bounded
            for label in [lb for lb, g in self._label_generation.items() if lb not in self._labels and g <= since_generation]:
                del self._label_generation[label]
        return loaded, len(gone)

    # --- consent ---------------------------------------------------------------------------

    def record_consent(self, request: ConsentRequest) -> Consent:
        now = self._now()
        validate_consent(request, retention_days_max=self.retention_days_max, now=now)
        fingerprint = consent_hash(request)

        def work(conn: psycopg.Connection) -> Consent:
            existing = self._repo.consent_by_id(conn, request.consent_id)
            if existing is not None:
                consent, stored_hash = existing
                if stored_hash != fingerprint:
                    raise errors.Conflict("IDEMPOTENCY_CONFLICT",
                                          "consent_id was already used for another consent", field="consent_id")
                return consent
            consent = Consent(consent_id=request.consent_id, account_id=request.account_id, purpose=request.purpose,
                              retention_days=request.retention_days, channel=request.channel,
                              notice_version=request.notice_version, given_at=request.given_at)
            self._repo.insert_consent(conn, consent, fingerprint, now)
            self._repo.extend_retention(conn, request.account_id, request.retention_days)
            outbox.enqueue(conn, self.schema, self._topic, _envelope(
                request.account_id, now, consent_recorded=events_pb2.ConsentRecorded(consent=consent_to_proto(consent))))
            return consent

        try:
            return self._transaction(work)  # type: ignore[return-value]
        except pg_errors.UniqueViolation:
            return self._transaction(work)  # type: ignore[return-value]  # a concurrent retry won: replay it

    # --- enrolment ----------------------------------------------------------------------------

    def enroll(self, account_id: str, image: bytes) -> Enrolment:
        check_id(account_id, "account_id")
        observation = self._model.observe(image, field="image")
        template = observation.encoding
        with self._account_lock(account_id):
            now = self._now()

            def work(conn: psycopg.Connection) -> tuple[int, datetime]:
                consents = self._repo.lock_active_consents(conn, account_id)
                if not consents:
                    raise errors.FailedPrecondition("CONSENT_REQUIRED",
                                                    "the rider has no recorded consent to face payment",
                                                    field="account_id")
                retain_until = now + timedelta(days=max(c.retention_days for c in consents))
                label = self._repo.upsert_template(conn, account_id, self._cipher.seal(account_id, template), now,
                                                   retain_until)
                outbox.enqueue(conn, self.schema, self._topic, _envelope(
                    account_id, now, face_enrolled=events_pb2.FaceEnrolled(
                        account_id=account_id, enrolled_at=timestamp_pb(now), retain_until=timestamp_pb(retain_until))))
                return label, retain_until

            label, retain_until = self._transaction(work)  # type: ignore[misc]
            self._index_put(label, account_id, template, enrolled_at=now)
        return Enrolment(enrolled_at=now, retain_until=retain_until)

    # --- matching -----------------------------------------------------------------------------

    def check_liveness(self, frames: Sequence[bytes]) -> tuple[LivenessVerdict, list[FaceObservation]]:
        check_burst_size(len(frames), self.liveness_config)
        observations = [self._model.observe(frame, field="frames", index=i) for i, frame in enumerate(frames)]
        return liveness(observations, self.liveness_config), observations

    def match_frames(self, frames: Sequence[bytes], purpose: Purpose, reference_id: str) -> MatchResult:
        check_id(reference_id, "reference_id")
        verdict, observations = self.check_liveness(frames)
        if not verdict.live:
            return MatchResult(MatchOutcome.LIVENESS_FAILED, "", 0.0, 0.0)
        return self.match_embedding(mean_encoding(observations), purpose, reference_id)

    def rank(self, probe: np.ndarray) -> list[tuple[str, float]]:
        """Candidates by exact distance, closest first (the ANN search plus re-ranking)."""
        ranked = self.index.search(probe, self.match_config.candidates)
        with self._labels_lock:
            return [(self._labels[label], distance) for label, distance in ranked if label in self._labels]

    def match_embedding(self, probe: np.ndarray, purpose: Purpose, reference_id: str) -> MatchResult:
        check_id(reference_id, "reference_id")
        decision: Decision = decide(self.rank(probe), self.match_config)
        if decision.outcome is not MatchOutcome.MATCHED:
            return MatchResult(decision.outcome, "", decision.distance, decision.margin)
        account_id = decision.account_id
        now = self._now()

        def work(conn: psycopg.Connection) -> bool:
            if self._repo.template_label(conn, account_id) is None:
                return False  # deleted by another replica since this index was built
            consents = [c for c in self._repo.active_consents(conn, account_id) if c.purpose is purpose]
            if not consents:
                return False
            retain_until = now + timedelta(days=max(c.retention_days for c in consents))
            self._repo.touch_template(conn, account_id, now, retain_until)
            event_id = str(uuid.uuid5(_MATCH_EVENT_NAMESPACE, f"{purpose.value}:{reference_id}:{account_id}"))
            if not self._repo.event_recorded(conn, event_id):  # a retried match is audited once
                outbox.enqueue(conn, self.schema, self._topic, _envelope(
                    account_id, now, event_id=event_id, face_matched=events_pb2.FaceMatched(
                        account_id=account_id, purpose=_purpose_pb(purpose), reference_id=reference_id)))
            return True

        if not self._transaction(work):
            return MatchResult(MatchOutcome.NO_MATCH, "", decision.distance, decision.margin)
        return MatchResult(MatchOutcome.MATCHED, account_id, decision.distance, decision.margin)

    # --- deletion and retention ----------------------------------------------------------------

    def delete(self, account_id: str, reason: DeletionReason, *, only_if_due: bool = False) -> Deletion:
        """Delete the account's template and withdraw its consents. With `only_if_due` (the
        retention worker), only a template whose retention has still ended is deleted."""
        check_id(account_id, "account_id")
        with self._account_lock(account_id):
            now = self._now()

            def work(conn: psycopg.Connection) -> int | None:
                label = self._repo.delete_template(conn, account_id, due_at=now if only_if_due else None)
                if label is not None or not only_if_due:
                    self._repo.withdraw_consents(conn, account_id, now)
                if label is not None:
                    outbox.enqueue(conn, self.schema, self._topic, _envelope(
                        account_id, now, face_deleted=events_pb2.FaceDeleted(
                            account_id=account_id,
                            reason=face_pb2.DeletionReason.Value("DELETION_REASON_" + reason.value),
                            deleted_at=timestamp_pb(now))))
                return label

            label = self._transaction(work)
            if label is not None:
                self._index_drop(label)  # type: ignore[arg-type]
        return Deletion(deleted=label is not None, deleted_at=now)

    def expire_due(self, batch_max: int = EXPIRY_BATCH_MAX) -> int:
        """Delete up to `batch_max` templates whose retention has ended; returns how many were."""
        now = self._now()
        with self._pool.connection() as conn, conn.transaction():
            due = self._repo.due_for_expiry(conn, now, batch_max)
        expired = 0
        for account_id in due:
            if self.delete(account_id, DeletionReason.RETENTION_EXPIRED, only_if_due=True).deleted:
                expired += 1
        return expired

    def reencrypt(self, batch_max: int = REENCRYPT_BATCH_MAX) -> int:
        """Re-encrypt up to `batch_max` templates still under a previous key with the current
        one; returns how many. Plaintext stays in memory for the call only."""

        def work(conn: psycopg.Connection) -> int:
            stale = self._repo.under_other_keys(conn, self._cipher.current_key_id, batch_max)
            for stored in stale:
                vector = self._cipher.open(stored.account_id, stored.sealed)
                self._repo.reseal(conn, stored.account_id, self._cipher.seal(stored.account_id, vector))
            return len(stale)

        return self._transaction(work)  # type: ignore[return-value]
