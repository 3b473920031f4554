"""The face service against the real PostgreSQL, with the real face model in-process.

Photos: obama.jpg, obama2.jpg and obama3.jpg show one man, biden.jpg another
(scripts/fetch_test_data.sh). Bursts of gate frames are built from obama3.jpg by the
synthetic transforms of loadtests/face_bursts.py.
"""

from __future__ import annotations

import io
from datetime import timedelta

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from PIL import Image

from citytap.common.v1 import credential_pb2
from citytap.face.v1 import events_pb2, face_pb2
from libs import errors
from libs.grpc_client import error_reason
from loadtests import face_bursts
from services.face.crypto import Sealed, TemplateCipher, TemplateDecryptionError
from services.face.domain import DeletionReason, MatchOutcome, Purpose
from services.face.workers import RetentionWorker
from tests.integration.face_support import (  # noqa: F401 - fixtures
    KEY_A,
    KEY_B,
    START,
    FaceDb,
    GrpcFace,
    Photos,
    consent,
    face_db,
    face_model,
    grpc_face,
    photos,
)

TRANSIT = Purpose.TRANSIT_FARES


def enrol(db: FaceDb, photos: Photos, account_id: str, name: str) -> None:
    db.records.record_consent(consent(account_id))
    db.records.enroll(account_id, photos.raw(name))


def match(db: FaceDb, photos: Photos, name: str, reference_id: str = "tap-1", purpose: Purpose = TRANSIT):
    return db.records.match_embedding(np.asarray(photos.encoding(name), dtype=np.float32), purpose, reference_id)


def events(db: FaceDb) -> list[events_pb2.FaceEvent]:
    rows = db.rows("SELECT payload FROM {schema}.outbox_events ORDER BY seq")
    return [events_pb2.FaceEvent.FromString(bytes(row[0])) for row in rows]


def test_obama_enrolled_matches_obama2_and_obama3_and_biden_matches_nobody(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")
    for name in ("obama2", "obama3"):
        result = match(face_db, photos, name)
        assert result.outcome is MatchOutcome.MATCHED, (name, result)
        assert result.account_id == "rider-obama"
        assert result.distance < face_db.records.match_config.distance_max
    biden = match(face_db, photos, "biden")
    assert biden.outcome is MatchOutcome.NO_MATCH and biden.account_id == ""
    assert biden.distance > 0.7  # another person entirely

    # With both enrolled, each photo still finds its own rider, by a wide margin.
    enrol(face_db, photos, "rider-biden", "biden")
    result = match(face_db, photos, "obama2")
    assert (result.outcome, result.account_id) == (MatchOutcome.MATCHED, "rider-obama")
    assert result.margin > 0.3
    assert match(face_db, photos, "biden").account_id == "rider-biden"


def test_unenrolled_face_is_refused(face_db: FaceDb, photos: Photos) -> None:
    assert match(face_db, photos, "obama2").outcome is MatchOutcome.NO_MATCH  # nobody enrolled at all
    enrol(face_db, photos, "rider-biden", "biden")
    result = match(face_db, photos, "obama")
    assert result.outcome is MatchOutcome.NO_MATCH and result.account_id == ""
    assert not [e for e in events(face_db) if e.HasField("face_matched")]


def test_consent_is_required_first_and_is_idempotent(face_db: FaceDb, photos: Photos) -> None:
    with pytest.raises(errors.FailedPrecondition) as refused:
        face_db.records.enroll("rider-obama", photos.raw("obama"))
    assert refused.value.reason == "CONSENT_REQUIRED"
    assert face_db.scalar("SELECT count(*) FROM {schema}.templates") == 0
    assert events(face_db) == []

    first = face_db.records.record_consent(consent("rider-obama"))
    again = face_db.records.record_consent(consent("rider-obama"))
    assert again == first
    with pytest.raises(errors.Conflict) as conflict:
        face_db.records.record_consent(consent("rider-obama", retention_days=30, consent_id=first.consent_id))
    assert conflict.value.reason == "IDEMPOTENCY_CONFLICT"
    enrolment = face_db.records.enroll("rider-obama", photos.raw("obama"))
    assert enrolment.retain_until - enrolment.enrolled_at == timedelta(days=1095)
    kinds = [e.WhichOneof("payload") for e in events(face_db)]
    assert kinds == ["consent_recorded", "face_enrolled"]


def test_match_needs_consent_to_the_purpose_and_never_names_the_next_best(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")  # transit fares only
    merchant = match(face_db, photos, "obama2", purpose=Purpose.MERCHANT_PAYMENTS)
    assert merchant.outcome is MatchOutcome.NO_MATCH and merchant.account_id == ""
    face_db.records.record_consent(consent("rider-obama", purpose=Purpose.MERCHANT_PAYMENTS))
    assert match(face_db, photos, "obama2", purpose=Purpose.MERCHANT_PAYMENTS).account_id == "rider-obama"


def test_deleted_face_no_longer_matches(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")
    assert match(face_db, photos, "obama2").outcome is MatchOutcome.MATCHED
    first = face_db.records.delete("rider-obama", DeletionReason.RIDER_REQUEST)
    second = face_db.records.delete("rider-obama", DeletionReason.RIDER_REQUEST)
    assert (first.deleted, second.deleted) == (True, False)
    assert match(face_db, photos, "obama2").outcome is MatchOutcome.NO_MATCH
    assert len(face_db.records.index) == 0
    assert face_db.scalar("SELECT count(*) FROM {schema}.templates") == 0
    # Deleting withdraws the consent: enrolling again needs a new one.
    with pytest.raises(errors.FailedPrecondition):
        face_db.records.enroll("rider-obama", photos.raw("obama"))
    # A restarted service does not bring the face back either.
    restarted = face_db.another_records(TemplateCipher(KEY_A))
    assert restarted.match_embedding(np.asarray(photos.encoding("obama2"), dtype=np.float32), TRANSIT,
                                     "tap-2").outcome is MatchOutcome.NO_MATCH
    deleted = [e.face_deleted for e in events(face_db) if e.HasField("face_deleted")]
    assert [d.reason for d in deleted] == [face_pb2.DELETION_REASON_RIDER_REQUEST]


def test_enrolling_again_replaces_the_template(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-x", "biden")
    label = face_db.scalar("SELECT label FROM {schema}.templates")
    face_db.records.enroll("rider-x", photos.raw("obama"))
    assert face_db.scalar("SELECT count(*) FROM {schema}.templates") == 1
    assert face_db.scalar("SELECT label FROM {schema}.templates") == label
    assert match(face_db, photos, "obama2").account_id == "rider-x"
    assert match(face_db, photos, "biden").outcome is MatchOutcome.NO_MATCH
    assert len(face_db.records.index) == 1


def test_index_is_rebuilt_from_the_encrypted_store(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")
    enrol(face_db, photos, "rider-biden", "biden")
    restarted = face_db.another_records(TemplateCipher(KEY_A))
    assert len(restarted.index) == 2
    probe = np.asarray(photos.encoding("obama3"), dtype=np.float32)
    assert restarted.match_embedding(probe, TRANSIT, "tap-9").account_id == "rider-obama"


def test_another_replica_catches_up_on_enrolments_and_deletions(face_db: FaceDb, photos: Photos) -> None:
    other = face_db.another_records(TemplateCipher(KEY_A))  # a second replica, started before the writes
    enrol(face_db, photos, "rider-obama", "obama")
    probe = np.asarray(photos.encoding("obama2"), dtype=np.float32)
    assert other.match_embedding(probe, TRANSIT, "tap-1").outcome is MatchOutcome.NO_MATCH
    assert other.refresh_index() == (1, 0)
    assert other.match_embedding(probe, TRANSIT, "tap-2").account_id == "rider-obama"
    face_db.records.delete("rider-obama", DeletionReason.RIDER_REQUEST)
    # Before its refresh the other replica still has the template, but the store says no.
    assert other.match_embedding(probe, TRANSIT, "tap-3").outcome is MatchOutcome.NO_MATCH
    assert other.refresh_index() == (0, 1)
    assert len(other.index) == 0
    # Re-enrolment elsewhere replaces the template the other replica matches on.
    enrol(face_db, photos, "rider-x", "biden")
    face_db.clock.advance(minutes=1)
    face_db.records.enroll("rider-x", photos.raw("obama"))
    other.refresh_index()
    assert other.match_embedding(probe, TRANSIT, "tap-4").account_id == "rider-x"
    assert len(other.index) == 1


def test_ciphertext_in_the_database_is_not_the_template(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")
    key_id, nonce, ciphertext = face_db.rows("SELECT key_id, nonce, ciphertext FROM {schema}.templates")[0]
    template = np.asarray(photos.encoding("obama"), dtype="<f4")
    plain = template.tobytes()
    ciphertext = bytes(ciphertext)
    assert len(ciphertext) == len(plain) + 16  # the GCM tag
    assert plain not in ciphertext and plain[:16] not in ciphertext
    cipher = TemplateCipher(KEY_A)
    sealed = Sealed(key_id, bytes(nonce), ciphertext)
    assert np.array_equal(cipher.open("rider-obama", sealed), template)
    with pytest.raises(TemplateDecryptionError):
        cipher.open("rider-someone-else", sealed)  # bound to its account
    with pytest.raises(TemplateDecryptionError):
        TemplateCipher(KEY_B).open("rider-obama", sealed)
    # No event carries the template, or anything derived from the image.
    for event in events(face_db):
        assert plain[:16] not in event.SerializeToString()


def test_key_rotation_reencrypts_every_template(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")
    enrol(face_db, photos, "rider-biden", "biden")
    old_key_id = TemplateCipher(KEY_A).current_key_id
    assert {r[0] for r in face_db.rows("SELECT key_id FROM {schema}.templates")} == {old_key_id}
    rotated = face_db.another_records(TemplateCipher(KEY_B, [KEY_A]))  # starts while rows are under the old key
    assert rotated.reencrypt(batch_max=1) == 1
    assert rotated.reencrypt() == 1
    assert rotated.reencrypt() == 0
    new_key_id = TemplateCipher(KEY_B).current_key_id
    assert {r[0] for r in face_db.rows("SELECT key_id FROM {schema}.templates")} == {new_key_id}
    # The old key can be dropped now; the new key alone rebuilds the same index.
    only_new = face_db.another_records(TemplateCipher(KEY_B))
    probe = np.asarray(photos.encoding("obama2"), dtype=np.float32)
    assert only_new.match_embedding(probe, TRANSIT, "tap-3").account_id == "rider-obama"
    with pytest.raises(TemplateDecryptionError):
        face_db.another_records(TemplateCipher(KEY_A))


def test_retention_expiry_deletes_automatically_and_use_extends_it(face_db: FaceDb, photos: Photos) -> None:
    face_db.records.record_consent(consent("rider-obama", retention_days=30))
    face_db.records.enroll("rider-obama", photos.raw("obama"))
    face_db.records.record_consent(consent("rider-biden", retention_days=30))
    face_db.records.enroll("rider-biden", photos.raw("biden"))
    worker = RetentionWorker(face_db.records, interval_s=1)
    face_db.clock.advance(days=20)
    assert match(face_db, photos, "obama2").outcome is MatchOutcome.MATCHED  # a use: 30 more days from now
    face_db.clock.advance(days=15)
    assert worker.run_once() == (1, 0)  # biden's 30 days ran out; obama was used 15 days ago
    assert match(face_db, photos, "biden").outcome is MatchOutcome.NO_MATCH
    assert match(face_db, photos, "obama3").outcome is MatchOutcome.MATCHED
    face_db.clock.advance(days=31)
    assert worker.run_once() == (1, 0)
    assert len(face_db.records.index) == 0
    reasons = [e.face_deleted.reason for e in events(face_db) if e.HasField("face_deleted")]
    assert reasons == [face_pb2.DELETION_REASON_RETENTION_EXPIRED] * 2


def test_match_events_are_audited_once_per_reference(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")
    match(face_db, photos, "obama2", reference_id="tap-7")
    match(face_db, photos, "obama2", reference_id="tap-7")  # the gate retried
    match(face_db, photos, "obama3", reference_id="tap-8")
    matched = [e for e in events(face_db) if e.HasField("face_matched")]
    assert [(e.account_key, e.face_matched.reference_id) for e in matched] == [("rider-obama", "tap-7"),
                                                                                ("rider-obama", "tap-8")]


# --- liveness ---------------------------------------------------------------------------------


def test_still_image_replay_fails_liveness_and_a_moved_photo_too(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")
    bursts = photos.bursts()
    for kind in ("still", "moved"):
        verdict, _ = face_db.records.check_liveness(bursts[kind])
        assert not verdict.live and verdict.score < 0.5, kind
        result = face_db.records.match_frames(bursts[kind], TRANSIT, f"tap-{kind}")
        assert result.outcome is MatchOutcome.LIVENESS_FAILED and result.account_id == ""
    assert not [e for e in events(face_db) if e.HasField("face_matched")]


def test_a_blink_or_a_head_turn_passes_liveness_and_matches(face_db: FaceDb, photos: Photos) -> None:
    enrol(face_db, photos, "rider-obama", "obama")
    bursts = photos.bursts()
    for kind in ("blink", "turn"):
        verdict, _ = face_db.records.check_liveness(bursts[kind])
        assert verdict.live and verdict.score >= 0.5, (kind, verdict)
        result = face_db.records.match_frames(bursts[kind], TRANSIT, f"tap-{kind}")
        assert (result.outcome, result.account_id) == (MatchOutcome.MATCHED, "rider-obama"), kind


def test_frames_of_two_people_fail_liveness(face_db: FaceDb, photos: Photos) -> None:
    frame, _ = photos.obama3_frame
    biden = face_bursts.decode(photos.raw("biden")).resize((480, 1090))
    swapped = [face_bursts.jpeg(frame), face_bursts.jpeg(biden), face_bursts.jpeg(frame)]
    verdict, _ = face_db.records.check_liveness(swapped)
    assert not verdict.live and not verdict.same_face


# --- bad input --------------------------------------------------------------------------------


def _png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("L", (width, height), 90).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("image, reason", [
    ("faceless", "FACE_NOT_FOUND"),
    ("two_faces", "MULTIPLE_FACES"),
    ("corrupt", "INVALID_IMAGE"),
    ("truncated", "INVALID_IMAGE"),
    ("gif", "INVALID_IMAGE"),
    ("huge_pixels", "IMAGE_TOO_LARGE"),
    ("huge_bytes", "IMAGE_TOO_LARGE"),
])
def test_bad_images_are_refused_with_their_reason_and_change_nothing(face_db: FaceDb, photos: Photos, image: str,
                                                                     reason: str) -> None:
    face_db.records.record_consent(consent("rider-obama"))
    obama = photos.raw("obama")
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, "GIF")
    data = {
        "faceless": face_bursts.jpeg(face_bursts.faceless()),
        "two_faces": face_bursts.jpeg(face_bursts.side_by_side(face_bursts.decode(obama),
                                                               face_bursts.decode(photos.raw("biden")))),
        "corrupt": b"\xff\xd8\xff\xe0 this is not really a JPEG",
        "truncated": obama[: len(obama) // 3],
        "gif": gif.getvalue(),
        "huge_pixels": _png(6000, 5000),
        "huge_bytes": b"\xff\xd8" + bytes(4_000_001),
    }[image]
    before = events(face_db)
    with pytest.raises(errors.InvalidArgument) as refused:
        face_db.records.enroll("rider-obama", data)
    assert refused.value.reason == reason
    assert face_db.scalar("SELECT count(*) FROM {schema}.templates") == 0
    assert events(face_db) == before


def test_bad_bursts_are_refused(face_db: FaceDb, photos: Photos) -> None:
    frame, _ = photos.obama3_frame
    good = face_bursts.jpeg(frame)
    for frames, reason, index in [([], "INVALID_FRAME_BURST", None),
                                  ([good] * 2, "INVALID_FRAME_BURST", None),
                                  ([good] * 9, "INVALID_FRAME_BURST", None),
                                  ([good, b"garbage", good], "INVALID_IMAGE", "1"),
                                  ([good, good, face_bursts.jpeg(face_bursts.faceless())], "FACE_NOT_FOUND", "2")]:
        with pytest.raises(errors.InvalidArgument) as refused:
            face_db.records.match_frames(frames, TRANSIT, "tap-bad")
        assert refused.value.reason == reason
        assert refused.value.metadata.get("index") == index


# --- the gRPC contract ------------------------------------------------------------------------


def _reason(call, request) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as info:
        call(request)
    return info.value.code(), error_reason(info.value)


def test_grpc_consent_enrol_match_delete(grpc_face: GrpcFace, photos: Photos) -> None:
    stub = grpc_face.stub
    given = Timestamp()
    given.FromDatetime(START)
    consent_request = face_pb2.RecordConsentRequest(
        consent_id="c-1", account_id="rider-obama", purpose=face_pb2.CONSENT_PURPOSE_TRANSIT_FARES,
        retention_days=365, channel=face_pb2.CONSENT_CHANNEL_KIOSK, notice_version="face-2030-01", given_at=given)
    assert _reason(stub.Enroll, face_pb2.EnrollRequest(account_id="rider-obama", image=photos.raw("obama"))) == (
        grpc.StatusCode.FAILED_PRECONDITION, "CONSENT_REQUIRED")
    recorded = stub.RecordConsent(consent_request).consent
    assert (recorded.consent_id, recorded.retention_days) == ("c-1", 365)
    changed = face_pb2.RecordConsentRequest()
    changed.CopyFrom(consent_request)
    changed.retention_days = 30
    assert _reason(stub.RecordConsent, changed) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_CONFLICT")
    enrolled = stub.Enroll(face_pb2.EnrollRequest(account_id="rider-obama", image=photos.raw("obama")))
    assert enrolled.retain_until.ToDatetime() > enrolled.enrolled_at.ToDatetime()

    probe = credential_pb2.FaceEmbedding(values=photos.encoding("obama2"))
    matched = stub.Match(face_pb2.MatchRequest(embedding=probe, purpose=face_pb2.CONSENT_PURPOSE_TRANSIT_FARES,
                                               reference_id="tap-1"))
    assert (matched.outcome, matched.account_id) == (face_pb2.MATCH_OUTCOME_MATCHED, "rider-obama")
    assert 0 < matched.distance < 0.5 and matched.margin > 0.1
    bursts = photos.bursts()
    replay = stub.Match(face_pb2.MatchRequest(frames=credential_pb2.FaceFrames(frames=bursts["still"]),
                                              purpose=face_pb2.CONSENT_PURPOSE_TRANSIT_FARES, reference_id="tap-2"))
    assert (replay.outcome, replay.account_id) == (face_pb2.MATCH_OUTCOME_LIVENESS_FAILED, "")
    live = stub.Match(face_pb2.MatchRequest(frames=credential_pb2.FaceFrames(frames=bursts["blink"]),
                                            purpose=face_pb2.CONSENT_PURPOSE_TRANSIT_FARES, reference_id="tap-3"))
    assert (live.outcome, live.account_id) == (face_pb2.MATCH_OUTCOME_MATCHED, "rider-obama")
    checked = stub.CheckLiveness(face_pb2.CheckLivenessRequest(frames=credential_pb2.FaceFrames(frames=bursts["turn"])))
    assert checked.live and 0.5 <= checked.score <= 1

    deleted = stub.Delete(face_pb2.DeleteRequest(account_id="rider-obama",
                                                 reason=face_pb2.DELETION_REASON_RIDER_REQUEST))
    assert deleted.deleted
    assert not stub.Delete(face_pb2.DeleteRequest(account_id="rider-obama",
                                                  reason=face_pb2.DELETION_REASON_RIDER_REQUEST)).deleted
    after = stub.Match(face_pb2.MatchRequest(embedding=probe, purpose=face_pb2.CONSENT_PURPOSE_TRANSIT_FARES,
                                             reference_id="tap-4"))
    assert (after.outcome, after.account_id) == (face_pb2.MATCH_OUTCOME_NO_MATCH, "")


def test_grpc_bad_requests_carry_reasons(grpc_face: GrpcFace) -> None:
    stub = grpc_face.stub
    transit = face_pb2.CONSENT_PURPOSE_TRANSIT_FARES
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(stub.Match, face_pb2.MatchRequest(
        embedding=credential_pb2.FaceEmbedding(values=[0.1] * 127), purpose=transit, reference_id="t")) == (
        bad, "INVALID_EMBEDDING")
    assert _reason(stub.Match, face_pb2.MatchRequest(
        embedding=credential_pb2.FaceEmbedding(values=[float("nan")] * 128), purpose=transit, reference_id="t")) == (
        bad, "INVALID_EMBEDDING")
    assert _reason(stub.Match, face_pb2.MatchRequest(purpose=transit, reference_id="t")) == (bad, "INVALID_ARGUMENT")
    assert _reason(stub.Match, face_pb2.MatchRequest(
        embedding=credential_pb2.FaceEmbedding(values=[0.0] * 128), reference_id="t")) == (bad, "INVALID_ARGUMENT")
    assert _reason(stub.CheckLiveness, face_pb2.CheckLivenessRequest()) == (bad, "INVALID_FRAME_BURST")
    assert _reason(stub.Enroll, face_pb2.EnrollRequest(account_id="rider 1", image=b"x")) == (bad, "INVALID_ARGUMENT")
    assert _reason(stub.Delete, face_pb2.DeleteRequest(account_id="rider-1")) == (bad, "INVALID_ARGUMENT")
    assert _reason(stub.RecordConsent, face_pb2.RecordConsentRequest(
        consent_id="c", account_id="a", purpose=transit, retention_days=5000, channel=1, notice_version="v",
        given_at=Timestamp(seconds=1))) == (bad, "INVALID_ARGUMENT")
