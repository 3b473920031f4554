"""The face service's pure logic: the match rule, the liveness rule, consents, the cipher,
the index and the settings, on synthetic landmarks and vectors (no model, no database)."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from libs import errors
from libs.settings import SettingsError, load
from services.face.crypto import Sealed, TemplateCipher, TemplateDecryptionError, key_id
from services.face.domain import (
    Channel,
    ConsentRequest,
    FaceObservation,
    LivenessConfig,
    MatchConfig,
    MatchOutcome,
    Purpose,
    check_burst_size,
    check_embedding,
    consent_hash,
    decide,
    eye_aspect_ratio,
    liveness,
    nose_position,
    validate_consent,
)
from services.face.index import TemplateIndex
from services.face.settings import Settings

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)

# --- the match rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("ranked, outcome, account", [
    ([], MatchOutcome.NO_MATCH, ""),
    ([("a", 0.35)], MatchOutcome.MATCHED, "a"),
    ([("a", 0.35), ("b", 0.80)], MatchOutcome.MATCHED, "a"),
    ([("a", 0.50), ("b", 0.625)], MatchOutcome.MATCHED, "a"),  # the distance limit is inclusive
    ([("a", 0.51), ("b", 0.90)], MatchOutcome.NO_MATCH, ""),
    ([("a", 0.35), ("b", 0.44)], MatchOutcome.AMBIGUOUS, ""),
])
def test_decide(ranked: list[tuple[str, float]], outcome: MatchOutcome, account: str) -> None:
    decision = decide(ranked, MatchConfig(distance_max=0.5, margin_min=0.1))
    assert (decision.outcome, decision.account_id) == (outcome, account)
    if len(ranked) >= 2:
        assert decision.margin == pytest.approx(ranked[1][1] - ranked[0][1])
    elif ranked:
        assert math.isinf(decision.margin)


def test_match_config_refuses_nonsense() -> None:
    for bad in (dict(distance_max=0), dict(distance_max=2.5), dict(margin_min=-0.1), dict(candidates=1)):
        with pytest.raises(ValueError):
            MatchConfig(**bad)


@pytest.mark.parametrize("values", [[0.0] * 127, [0.0] * 129, [float("nan")] + [0.0] * 127,
                                    [float("inf")] + [0.0] * 127])
def test_bad_embeddings_are_refused(values: list[float]) -> None:
    with pytest.raises(errors.InvalidArgument) as refused:
        check_embedding(values)
    assert refused.value.reason == "INVALID_EMBEDDING"


def test_good_embedding_is_float32() -> None:
    vector = check_embedding([0.25] * 128)
    assert vector.dtype == np.float32 and vector.shape == (128,)


# --- consents ----------------------------------------------------------------------------------


def consent(**overrides: object) -> ConsentRequest:
    values: dict = dict(consent_id="c-1", account_id="rider-1", purpose=Purpose.TRANSIT_FARES, retention_days=365,
                        channel=Channel.KIOSK, notice_version="face-2030-01", given_at=NOW)
    values.update(overrides)
    return ConsentRequest(**values)


@pytest.mark.parametrize("overrides, field", [
    (dict(consent_id=""), "consent_id"),
    (dict(consent_id="has space"), "consent_id"),
    (dict(account_id="x" * 65), "account_id"),
    (dict(retention_days=0), "retention_days"),
    (dict(retention_days=1096), "retention_days"),
    (dict(notice_version=""), "notice_version"),
    (dict(notice_version="v\n1"), "notice_version"),
    (dict(given_at=NOW + timedelta(minutes=1)), "given_at"),
])
def test_bad_consents_are_refused(overrides: dict, field: str) -> None:
    with pytest.raises(errors.InvalidArgument) as refused:
        validate_consent(consent(**overrides), retention_days_max=1095, now=NOW)
    assert refused.value.metadata["field"] == field


def test_consent_fingerprint_covers_the_payload() -> None:
    assert consent_hash(consent()) == consent_hash(consent())
    assert consent_hash(consent()) != consent_hash(consent(retention_days=30))
    assert consent_hash(consent()) != consent_hash(consent(purpose=Purpose.MERCHANT_PAYMENTS))


# --- liveness ----------------------------------------------------------------------------------


def face(*, eye_open: float = 1.0, nose_x: float = 50.0, shift: tuple[float, float] = (0, 0), scale: float = 1.0,
         encoding: np.ndarray | None = None) -> FaceObservation:
    """Synthetic 68-point landmarks: jaw from x=10 to x=90, eyes at y=40, nose tip at `nose_x`."""
    def eye(cx: float) -> list[tuple[float, float]]:
        h = 3.0 * eye_open
        return [(cx - 10, 40), (cx - 4, 40 - h), (cx + 4, 40 - h), (cx + 10, 40), (cx + 4, 40 + h), (cx - 4, 40 + h)]
    groups = {
        "chin": [(10 + 5 * i, 40 + 3 * i) for i in range(17)],
        "left_eye": eye(30), "right_eye": eye(70),
        "nose_tip": [(nose_x - 6, 65), (nose_x - 3, 66), (nose_x, 67), (nose_x + 3, 66), (nose_x + 6, 65)],
    }
    moved = {k: [((x * scale) + shift[0], (y * scale) + shift[1]) for x, y in v] for k, v in groups.items()}
    return FaceObservation(landmarks=moved, encoding=np.zeros(128, np.float32) if encoding is None else encoding)


def test_eye_aspect_ratio_falls_when_the_eye_closes() -> None:
    open_ear = eye_aspect_ratio(face().landmarks["left_eye"])
    closed_ear = eye_aspect_ratio(face(eye_open=0.3).landmarks["left_eye"])
    assert open_ear == pytest.approx(0.3)
    assert closed_ear == pytest.approx(0.09)


def test_nose_position_ignores_moving_and_scaling_a_flat_face() -> None:
    centred = nose_position(face().landmarks)
    assert nose_position(face(shift=(40, -12), scale=1.3).landmarks) == pytest.approx(centred)
    assert nose_position(face(nose_x=58).landmarks) > centred + 0.05


def test_a_still_replay_is_not_live() -> None:
    verdict = liveness([face()] * 4, LivenessConfig())
    assert not verdict.live and verdict.score == 0.0 and verdict.blink_ear_ratio == 1.0 and verdict.head_turn == 0.0


def test_a_photo_moved_in_front_of_the_camera_is_not_live() -> None:
    frames = [face(), face(shift=(20, 5)), face(scale=1.2), face(shift=(-10, 3), scale=0.9)]
    assert not liveness(frames, LivenessConfig()).live


def test_a_blink_is_live() -> None:
    verdict = liveness([face(), face(eye_open=0.5), face(eye_open=0.2), face()], LivenessConfig())
    assert verdict.live and verdict.score == pytest.approx(1.0)
    assert verdict.blink_ear_ratio == pytest.approx(0.2)


def test_a_head_turn_is_live_and_a_twitch_is_not() -> None:
    assert liveness([face(), face(nose_x=53), face(nose_x=56)], LivenessConfig()).live
    assert not liveness([face(), face(nose_x=51), face(nose_x=52)], LivenessConfig()).live


def test_frames_of_two_people_are_not_live() -> None:
    other = np.full(128, 0.1, np.float32)  # 1.13 away from the zero vector
    verdict = liveness([face(), face(eye_open=0.2, encoding=other), face()], LivenessConfig())
    assert not verdict.live and not verdict.same_face and verdict.score == 0.0


def test_burst_sizes() -> None:
    config = LivenessConfig(frames_min=3, frames_max=8)
    for count in (0, 2, 9):
        with pytest.raises(errors.InvalidArgument) as refused:
            check_burst_size(count, config)
        assert refused.value.reason == "INVALID_FRAME_BURST"
    check_burst_size(3, config)
    check_burst_size(8, config)


# --- the cipher --------------------------------------------------------------------------------


def test_cipher_round_trip_binding_and_rotation() -> None:
    old, new = bytes(range(32)), bytes(range(1, 33))
    template = np.linspace(-0.3, 0.3, 128).astype(np.float32)
    sealed = TemplateCipher(old).seal("rider-1", template)
    assert sealed.key_id == key_id(old) and len(sealed.nonce) == 12
    assert template.tobytes() not in sealed.ciphertext
    assert np.array_equal(TemplateCipher(old).open("rider-1", sealed), template)
    rotated = TemplateCipher(new, [old])
    assert np.array_equal(rotated.open("rider-1", sealed), template)
    assert rotated.seal("rider-1", template).key_id == key_id(new)
    with pytest.raises(TemplateDecryptionError):
        TemplateCipher(new).open("rider-1", sealed)  # the old key is gone
    with pytest.raises(TemplateDecryptionError):
        TemplateCipher(old).open("rider-2", sealed)  # another account's row
    with pytest.raises(TemplateDecryptionError):
        flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
        TemplateCipher(old).open("rider-1", Sealed(sealed.key_id, sealed.nonce, flipped))
    assert TemplateCipher(old).seal("rider-1", template).nonce != sealed.nonce
    with pytest.raises(ValueError):
        TemplateCipher(b"short")
    assert "000102" not in repr(TemplateCipher(old))


# --- the index ---------------------------------------------------------------------------------


def test_index_finds_upserts_and_forgets() -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(0, 0.05, (300, 128)).astype(np.float32)
    index = TemplateIndex(capacity=16)  # grows as needed
    index.build(list(range(1, 201)), vectors[:200])
    for label in range(201, 301):
        index.upsert(label, vectors[label - 1])
    assert len(index) == 300
    for label in (1, 150, 250, 300):
        found = index.search(vectors[label - 1], 5)
        assert found[0] == (label, pytest.approx(0.0, abs=1e-6))
        assert [d for _, d in found] == sorted(d for _, d in found)
    assert index.remove(150) and not index.remove(150)
    assert all(label != 150 for label, _ in index.search(vectors[149], 10))
    index.upsert(7, vectors[149])  # re-enrolment: label 7 now holds another face
    assert index.search(vectors[149], 1)[0][0] == 7
    assert index.search(vectors[0], 300)[0][0] != 7
    empty = TemplateIndex()
    assert empty.search(vectors[0], 5) == []


# --- settings ----------------------------------------------------------------------------------

BASE = {"CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", "CITYTAP_POSTGRES_DSN": "postgresql://x@h/db",
        "CITYTAP_KAFKA_BOOTSTRAP": "127.0.0.1:9092", "CITYTAP_FACE_TEMPLATE_KEY": "ab" * 32}


def test_settings_defaults_and_key_rules() -> None:
    settings = load(Settings, BASE)
    assert settings.match_distance_max == 0.5 and settings.match_margin_min == 0.1
    assert settings.retention_days_max == 1095 and settings.template_previous_keys == ()
    assert "abab" not in repr(settings)
    rotated = load(Settings, {**BASE, "CITYTAP_FACE_TEMPLATE_PREVIOUS_KEYS": "cd" * 32 + "," + "ef" * 32})
    assert len(rotated.template_previous_keys) == 2
    for bad in ({"CITYTAP_FACE_TEMPLATE_KEY": "ab" * 31}, {"CITYTAP_FACE_TEMPLATE_KEY": "zz" * 32},
                {"CITYTAP_FACE_MATCH_DISTANCE_MAX": "3"}, {"CITYTAP_FACE_LIVENESS_BLINK_EAR_RATIO_MAX": "1.5"},
                {"CITYTAP_FACE_TEMPLATE_PREVIOUS_KEYS": "ab"}):
        with pytest.raises(SettingsError):
            load(Settings, {**BASE, **bad})
    missing = dict(BASE)
    del missing["CITYTAP_FACE_TEMPLATE_KEY"]
    with pytest.raises(SettingsError, match="CITYTAP_FACE_TEMPLATE_KEY"):
        load(Settings, missing)
