"""Helpers for the face service's integration tests: the real face model (cached for the
session, since a descriptor costs about 0.1 s), the test photos and bursts built from them,
and the face records on a scratch schema of the real PostgreSQL.

The photos come from scripts/fetch_test_data.sh (run by `make test`); a missing photo is an
error, not a skip.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property

import grpc
import pytest
from PIL import Image
from psycopg_pool import ConnectionPool

from citytap.face.v1 import face_pb2_grpc
from libs import outbox
from libs.grpc_client import connect
from libs.grpc_server import Server, create_server
from libs.postgres import create_pool, migrate_folder
from loadtests import face_bursts
from services.face.bootstrap import MIGRATIONS
from services.face.crypto import TemplateCipher
from services.face.domain import Channel, ConsentRequest, FaceObservation, LivenessConfig, MatchConfig, Purpose
from services.face.face_model import FaceModel
from services.face.index import TemplateIndex
from services.face.records import FaceRecords
from services.face.servicer import FaceServicer, registration

START = datetime(2030, 1, 1, 8, 0, tzinfo=timezone.utc)
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


class FakeClock:
    def __init__(self, start: datetime = START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, **delta: float) -> datetime:
        with self._lock:
            self._now += timedelta(**delta)
            return self._now


class CachingModel:
    """The real FaceModel, remembering each image's observation (and refusal) by content."""

    def __init__(self, model: FaceModel) -> None:
        self.model = model
        self._seen: dict[bytes, FaceObservation | Exception] = {}
        self.computed = 0

    def observe(self, data: bytes, *, field: str = "image", index: int | None = None) -> FaceObservation:
        key = hashlib.sha256(data).digest() + f"{field}:{index}".encode()
        if key not in self._seen:
            self.computed += 1
            try:
                self._seen[key] = self.model.observe(data, field=field, index=index)
            except Exception as exc:  # noqa: BLE001 - replayed below exactly as raised
                self._seen[key] = exc
        found = self._seen[key]
        if isinstance(found, Exception):
            raise found
        return found


class Photos:
    """The four test photos, their gate frames and bursts, computed once per session."""

    def __init__(self, model: CachingModel) -> None:
        self.model = model

    def raw(self, name: str) -> bytes:
        return face_bursts.photo_bytes(name)

    def encoding(self, name: str) -> list[float]:
        return [float(v) for v in self.model.observe(self.raw(name)).encoding]

    @cached_property
    def obama3_frame(self) -> tuple[Image.Image, object]:
        """obama3.jpg as a 640x480 gate frame, with the landmarks found on that frame."""
        photo = face_bursts.decode(self.raw("obama3"))
        scale = 640 / max(photo.size)  # FaceModel analyses at 640 pixels: map its landmarks back
        small_landmarks = self.model.observe(self.raw("obama3")).landmarks
        landmarks = {k: [(x / scale, y / scale) for x, y in v] for k, v in small_landmarks.items()}
        frame = face_bursts.gate_frame(photo, landmarks)
        return frame, self.model.observe(face_bursts.jpeg(frame)).landmarks

    def bursts(self) -> dict[str, list[bytes]]:
        frame, landmarks = self.obama3_frame
        return {
            "still": face_bursts.still_burst(frame),
            "blink": face_bursts.blink_burst(frame, landmarks),  # type: ignore[arg-type]
            "turn": face_bursts.turn_burst(frame, landmarks),  # type: ignore[arg-type]
            "moved": face_bursts.moved_photo_burst(frame),
        }


@pytest.fixture(scope="session")
def face_model() -> CachingModel:
    return CachingModel(FaceModel(image_bytes_max=4_000_000, image_pixels_max=25_000_000))


@pytest.fixture(scope="session")
def photos(face_model: CachingModel) -> Photos:
    for name in ("obama", "obama2", "obama3", "biden"):
        face_bursts.photo_path(name)  # fails with the command to run when the photos are missing
    return Photos(face_model)


@dataclass
class FaceDb:
    dsn: str
    schema: str
    pool: ConnectionPool
    clock: FakeClock
    model: CachingModel
    records: FaceRecords

    def another_records(self, cipher: TemplateCipher) -> FaceRecords:
        """A second service instance on the same schema (a restart, or a rotated key)."""
        return new_records(self.pool, self.schema, cipher, self.model, self.clock)

    def scalar(self, query: str, *params: object) -> object:
        with self.pool.connection() as conn:
            row = conn.execute(query.replace("{schema}", self.schema), params).fetchone()
        return None if row is None else row[0]

    def rows(self, query: str, *params: object) -> list[tuple]:
        with self.pool.connection() as conn:
            return conn.execute(query.replace("{schema}", self.schema), params).fetchall()


def new_records(pool: ConnectionPool, schema: str, cipher: TemplateCipher, model: CachingModel,
                clock: FakeClock) -> FaceRecords:
    records = FaceRecords(pool, schema=schema, cipher=cipher, model=model, index=TemplateIndex(), match=MatchConfig(),
                          liveness_config=LivenessConfig(), retention_days_max=1095, clock=clock)
    records.load_index()
    return records


@pytest.fixture()
def face_db(postgres_dsn: str, scratch_schema: str, face_model: CachingModel) -> Iterator[FaceDb]:
    migrate_folder(postgres_dsn, scratch_schema, MIGRATIONS)
    pool = create_pool(postgres_dsn, name="face-tests", max_size=4)
    with pool.connection() as conn:
        outbox.ensure_table(conn, scratch_schema)
    clock = FakeClock()
    records = new_records(pool, scratch_schema, TemplateCipher(KEY_A), face_model, clock)
    yield FaceDb(postgres_dsn, scratch_schema, pool, clock, face_model, records)
    pool.close()


def consent(account_id: str, *, consent_id: str | None = None, purpose: Purpose = Purpose.TRANSIT_FARES,
            retention_days: int = 1095, given_at: datetime = START) -> ConsentRequest:
    return ConsentRequest(consent_id=consent_id or f"c-{account_id}-{purpose.value.lower()}", account_id=account_id,
                          purpose=purpose, retention_days=retention_days, channel=Channel.WALLET_APP,
                          notice_version="face-2030-01", given_at=given_at)


@dataclass
class GrpcFace:
    db: FaceDb
    server: Server
    channel: grpc.Channel
    stub: face_pb2_grpc.FaceServiceStub


@pytest.fixture()
def grpc_face(face_db: FaceDb) -> Iterator[GrpcFace]:
    """The real servicer behind a real in-process server on port 0, over `face_db`."""
    server = create_server("127.0.0.1:0", [registration(FaceServicer(face_db.records))], domain="face.citytap")
    server.start()
    server.set_serving(True)
    channel = connect(f"127.0.0.1:{server.port}", default_timeout_s=20)
    yield GrpcFace(face_db, server, channel, face_pb2_grpc.FaceServiceStub(channel))
    channel.close()
    server.stop(0)
