"""Faces at the gate against the real stack: the real face service (built through its own
composition root, with the real face model, over a scratch schema of the test stack), a fare
gate and a wallet built through theirs, talking gRPC. The photos are the face_recognition
1.3.0 test portraits that scripts/fetch_test_data.sh puts in .local/test-data/faces.

A face match alone never pays more than the configured limit: here NT$60, so a bus ride
(NT$15) is fine and a metro entry (whose hold is NT$65) is refused.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import face_recognition
import grpc
import psycopg
import pytest
from psycopg import sql

from citytap.common.v1 import credential_pb2
from citytap.face.v1 import face_pb2, face_pb2_grpc
from libs.grpc_client import connect
from libs.settings import load
from services.face.bootstrap import build as build_face
from services.face.settings import Settings as FaceSettings
from tests.integration.fare_gate_support import (
    DENY,
    ENTRY,
    OPEN,
    VALIDATE,
    FareGateStack,
    R,
    close_fare_gate_stack,
    open_fare_gate_stack,
)

FACE_LIMIT_MINOR = 6000
BUS_FARE = 1500
PHOTOS = Path(__file__).resolve().parents[2] / ".local" / "test-data" / "faces"


def photo(name: str) -> Path:
    path = PHOTOS / f"{name}.jpg"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `bash scripts/fetch_test_data.sh` (make test does)")
    return path


def embedding_of(name: str) -> list[float]:
    """The 128-d embedding a gate would compute on the device (face_recognition's model)."""
    [encoding] = face_recognition.face_encodings(face_recognition.load_image_file(str(photo(name))))
    return [float(v) for v in encoding]


@pytest.fixture(scope="module")
def face_address(postgres_dsn: str) -> Iterator[str]:
    schema = f"face_fg_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", "CITYTAP_FACE_SCHEMA": schema}
    env.setdefault("CITYTAP_FACE_TEMPLATE_KEY", bytes(range(32)).hex())
    app = build_face(load(FaceSettings, env))
    app.server.start()
    app.start()
    app.server.set_serving(True)
    yield f"127.0.0.1:{app.server.port}"
    app.server.stop(0)
    app.close()
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(scope="module")
def stack(face_address: str) -> Iterator[FareGateStack]:
    opened = open_fare_gate_stack(CITYTAP_FACE_ADDRESS=face_address,
                                  CITYTAP_FARE_GATE_FACE_LIMIT_MINOR=str(FACE_LIMIT_MINOR),
                                  CITYTAP_FARE_GATE_FACE_TIMEOUT_MS="20000")
    yield opened
    close_fare_gate_stack(opened)


@pytest.fixture(scope="module")
def enrolled(stack: FareGateStack, face_address: str):
    """A rider who consented to face payment for fares and enrolled obama.jpg."""
    rider = stack.rider(50_000)
    channel = connect(face_address, default_timeout_s=20)
    face = face_pb2_grpc.FaceServiceStub(channel)
    consent = face_pb2.RecordConsentRequest(
        consent_id=str(uuid.uuid4()), account_id=rider.account_id, purpose=face_pb2.CONSENT_PURPOSE_TRANSIT_FARES,
        retention_days=365, channel=face_pb2.CONSENT_CHANNEL_WALLET_APP, notice_version="face-test")
    consent.given_at.FromDatetime(datetime.now(timezone.utc))
    face.RecordConsent(consent)
    face.Enroll(face_pb2.EnrollRequest(account_id=rider.account_id, image=photo("obama").read_bytes()))
    yield rider
    channel.close()


def face_tap(stack: FareGateStack, gate: str, direction: int, embedding: list[float], **kw):
    request = stack.request(None, gate, direction, **kw)
    embedded = credential_pb2.FaceEmbedding(values=embedding)
    request.credential.CopyFrom(credential_pb2.Credential(face_embedding=embedded))
    return request


def test_an_enrolled_face_pays_a_bus_ride_within_the_face_limit(stack: FareGateStack, enrolled) -> None:
    answer = stack.stub.Tap(face_tap(stack, "BUS1-V1", VALIDATE, embedding_of("obama2"), stop_id="BUS_CEN"))
    assert (answer.decision, answer.reason, answer.fare_charged.amount_minor) == (OPEN, R.TAP_REASON_OK, BUS_FARE)
    assert stack.balance(enrolled) == (50_000 - BUS_FARE, 0)
    kinds = stack.query("SELECT credential_kind FROM {fg}.taps WHERE account_id = %s", (enrolled.account_id,))
    assert kinds == [(credential_pb2.CREDENTIAL_KIND_FACE,)]


def test_a_face_alone_may_not_start_a_metro_journey_above_the_limit(stack: FareGateStack, enrolled) -> None:
    before = stack.snapshot()
    code, reason, details = stack.refused(face_tap(stack, "CEN-G1", ENTRY, embedding_of("obama3")))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"), details
    assert stack.snapshot() == before


def test_a_face_nobody_enrolled_is_an_unknown_credential(stack: FareGateStack, enrolled) -> None:
    answer = stack.stub.Tap(face_tap(stack, "BUS1-V1", VALIDATE, embedding_of("biden"), stop_id="BUS_CEN"))
    assert (answer.decision, answer.reason) == (DENY, R.TAP_REASON_DENIED_UNKNOWN_CREDENTIAL)


def test_a_still_photo_held_up_to_the_camera_fails_liveness_and_pays_nothing(stack: FareGateStack,
                                                                             enrolled) -> None:
    still = photo("obama3").read_bytes()  # one photo of the enrolled rider, repeated as the burst
    request = stack.request(None, "BUS1-V1", VALIDATE, stop_id="BUS_CEN")
    request.credential.CopyFrom(credential_pb2.Credential(face_frames=credential_pb2.FaceFrames(frames=[still] * 4)))
    before = stack.snapshot()
    code, reason, details = stack.refused(request)
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LIVENESS_FAILED"), details
    assert stack.snapshot() == before
