"""The face service's pure domain: consents, match decisions and the liveness rule.

No I/O and no vendor SDK: the face model (`face_model.py`), the index (`index.py`), the
cipher (`crypto.py`) and PostgreSQL (`repository.py`) are adapters around it. Everything
here works on plain numbers, so it is unit-tested with synthetic landmarks and vectors.

Distances are Euclidean distances between 128-d face_recognition descriptors; smaller is
closer. Two photos of one person are typically 0.3 to 0.45 apart and two people 0.8 to 0.9
(measured on the test photos; see README.md, "Thresholds").
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from libs import errors

EMBEDDING_DIMENSIONS = 128
ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
NOTICE_VERSION_CHARS_MAX = 64

Point = tuple[float, float]
Landmarks = Mapping[str, Sequence[Point]]


class Purpose(enum.Enum):
    """What a rider allows their face to be used for (ConsentPurpose without its prefix)."""

    TRANSIT_FARES = "TRANSIT_FARES"
    MERCHANT_PAYMENTS = "MERCHANT_PAYMENTS"


class Channel(enum.Enum):
    """Where the rider gave consent (ConsentChannel without its prefix)."""

    WALLET_APP = "WALLET_APP"
    KIOSK = "KIOSK"
    STAFF_DESK = "STAFF_DESK"


class DeletionReason(enum.Enum):
    """Why a template was deleted (DeletionReason without its prefix)."""

    RIDER_REQUEST = "RIDER_REQUEST"
    RETENTION_EXPIRED = "RETENTION_EXPIRED"
    ACCOUNT_CLOSED = "ACCOUNT_CLOSED"


class MatchOutcome(enum.Enum):
    """What a match found (MatchOutcome without its prefix)."""

    MATCHED = "MATCHED"
    NO_MATCH = "NO_MATCH"
    AMBIGUOUS = "AMBIGUOUS"
    LIVENESS_FAILED = "LIVENESS_FAILED"


# --- consents -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsentRequest:
    consent_id: str
    account_id: str
    purpose: Purpose
    retention_days: int
    channel: Channel
    notice_version: str
    given_at: datetime


@dataclass(frozen=True)
class Consent:
    consent_id: str
    account_id: str
    purpose: Purpose
    retention_days: int
    channel: Channel
    notice_version: str
    given_at: datetime
    withdrawn_at: datetime | None = None


def check_id(value: str, field: str) -> str:
    """An id CityTap accepts: 1 to 64 letters, digits, '.', '_', ':' or '-'."""
    if not ID_PATTERN.match(value or ""):
        raise errors.InvalidArgument("INVALID_ARGUMENT",
                                     f"{field} must be 1 to 64 letters, digits, '.', '_', ':' or '-'", field=field)
    return value


def validate_consent(request: ConsentRequest, *, retention_days_max: int, now: datetime) -> None:
    """Refuse a consent that is malformed, before anything is written."""
    check_id(request.consent_id, "consent_id")
    check_id(request.account_id, "account_id")
    if not 1 <= request.retention_days <= retention_days_max:
        raise errors.InvalidArgument("INVALID_ARGUMENT",
                                     f"retention_days must be from 1 to {retention_days_max}", field="retention_days")
    if not request.notice_version or len(request.notice_version) > NOTICE_VERSION_CHARS_MAX \
            or not request.notice_version.isprintable():
        raise errors.InvalidArgument("INVALID_ARGUMENT",
                                     f"notice_version must be 1 to {NOTICE_VERSION_CHARS_MAX} printable characters",
                                     field="notice_version")
    if request.given_at > now:
        raise errors.InvalidArgument("INVALID_ARGUMENT", "given_at is in the future", field="given_at")


def consent_hash(request: ConsentRequest) -> bytes:
    """Fingerprint of a RecordConsent request: the same id must come with the same payload."""
    text = "|".join([request.consent_id, request.account_id, request.purpose.value, str(request.retention_days),
                     request.channel.value, request.notice_version, request.given_at.isoformat()])
    return hashlib.sha256(text.encode()).digest()


# --- embeddings and matching ----------------------------------------------------------------


def check_embedding(values: Sequence[float]) -> np.ndarray:
    """A probe embedding as float32, refused unless it has 128 finite components."""
    if len(values) != EMBEDDING_DIMENSIONS:
        raise errors.InvalidArgument("INVALID_EMBEDDING",
                                     f"an embedding has {EMBEDDING_DIMENSIONS} components, got {len(values)}",
                                     field="embedding.values")
    vector = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(vector)):
        raise errors.InvalidArgument("INVALID_EMBEDDING", "an embedding component is not a finite number",
                                     field="embedding.values")
    return vector


@dataclass(frozen=True)
class MatchConfig:
    """The match rule: the best candidate must be within `distance_max` and at least
    `margin_min` closer than the second best."""

    distance_max: float = 0.5
    margin_min: float = 0.1
    candidates: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.distance_max < 2:
            raise ValueError("distance_max must be between 0 and 2")
        if not 0 <= self.margin_min < 2:
            raise ValueError("margin_min must be between 0 and 2")
        if not 2 <= self.candidates <= 256:
            raise ValueError("candidates must be from 2 to 256")


@dataclass(frozen=True)
class Decision:
    outcome: MatchOutcome
    account_id: str
    distance: float
    margin: float


def decide(ranked: Sequence[tuple[str, float]], config: MatchConfig) -> Decision:
    """The match decision over candidates sorted by exact distance, closest first.

    NO_MATCH when nobody is within the threshold; AMBIGUOUS when the best is within it but
    the second best is less than the margin behind; MATCHED otherwise. With a single
    candidate the margin is infinite.
    """
    if not ranked:
        return Decision(MatchOutcome.NO_MATCH, "", math.inf, math.inf)
    best_account, best = ranked[0]
    margin = ranked[1][1] - best if len(ranked) > 1 else math.inf
    if best > config.distance_max:
        return Decision(MatchOutcome.NO_MATCH, "", best, margin)
    if margin < config.margin_min:
        return Decision(MatchOutcome.AMBIGUOUS, "", best, margin)
    return Decision(MatchOutcome.MATCHED, best_account, best, margin)


# --- liveness --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceObservation:
    """What the face model saw in one frame: the 68-point landmarks (face_recognition's
    named groups) and the 128-d descriptor."""

    landmarks: Landmarks
    encoding: np.ndarray


@dataclass(frozen=True)
class LivenessConfig:
    """The liveness rule (see README.md, "Liveness")."""

    frames_min: int = 3
    frames_max: int = 8
    # A blink: the lowest eye aspect ratio of the burst is at most this fraction of the highest.
    blink_ear_ratio_max: float = 0.75
    # A head turn: the nose tip's position across the face (0 = left jaw, 1 = right jaw) spans
    # at least this much over the burst.
    head_turn_min: float = 0.06
    # Every frame's descriptor is within this distance of the first frame's: one person.
    same_face_distance_max: float = 0.5

    def __post_init__(self) -> None:
        if not 2 <= self.frames_min <= self.frames_max <= 32:
            raise ValueError("liveness frames must satisfy 2 <= frames_min <= frames_max <= 32")
        if not 0 < self.blink_ear_ratio_max < 1:
            raise ValueError("blink_ear_ratio_max must be between 0 and 1")
        if not 0 < self.head_turn_min < 1:
            raise ValueError("head_turn_min must be between 0 and 1")
        if not 0 < self.same_face_distance_max < 2:
            raise ValueError("same_face_distance_max must be between 0 and 2")


@dataclass(frozen=True)
class LivenessVerdict:
    live: bool
    score: float
    blink_ear_ratio: float
    head_turn: float
    same_face: bool


def check_burst_size(count: int, config: LivenessConfig) -> None:
    if count == 0:
        raise errors.InvalidArgument("INVALID_FRAME_BURST", "the burst has no frames", field="frames")
    if not config.frames_min <= count <= config.frames_max:
        raise errors.InvalidArgument(
            "INVALID_FRAME_BURST",
            f"a burst has from {config.frames_min} to {config.frames_max} frames, got {count}", field="frames")


def eye_aspect_ratio(eye: Sequence[Point]) -> float:
    """Soukupova and Cech's eye aspect ratio of the six eye landmarks: the two lid-to-lid
    heights over twice the corner-to-corner width; about 0.3 open, near 0.1 closed."""
    p = np.asarray(eye, dtype=float)
    if p.shape != (6, 2):
        raise ValueError("an eye has six landmarks")
    width = np.linalg.norm(p[0] - p[3])
    if width == 0:
        return 0.0
    return float((np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])) / (2 * width))


def nose_position(landmarks: Landmarks) -> float:
    """Where the nose tip sits between the two sides of the jaw, projected on the line from
    the left jaw point to the right one: 0.5 when facing the camera, moving as the head turns.
    A flat photo moved, scaled, rotated or slightly tilted keeps it nearly constant."""
    chin = np.asarray(landmarks["chin"], dtype=float)
    nose = np.asarray(landmarks["nose_tip"], dtype=float)
    left, right = chin[1], chin[15]
    axis = right - left
    length_sq = float(np.dot(axis, axis))
    if length_sq == 0:
        return 0.5
    return float(np.dot(nose[len(nose) // 2] - left, axis) / length_sq)


def liveness(observations: Sequence[FaceObservation], config: LivenessConfig) -> LivenessVerdict:
    """Decide whether a burst shows one consistent live face.

    Live when every frame shows the same person (descriptor distance to the first frame
    within `same_face_distance_max`) and the burst shows a blink or a head turn. The score is
    0.5 at the threshold of the stronger of the two signals, rising to 1 at twice it.
    """
    if not observations:
        raise ValueError("liveness needs at least one observation")
    first = observations[0].encoding
    same_face = all(float(np.linalg.norm(o.encoding - first)) <= config.same_face_distance_max for o in observations)
    ears = [(eye_aspect_ratio(o.landmarks["left_eye"]) + eye_aspect_ratio(o.landmarks["right_eye"])) / 2
            for o in observations]
    ear_max = max(ears)
    ratio = min(ears) / ear_max if ear_max > 0 else 1.0
    positions = [nose_position(o.landmarks) for o in observations]
    turn = max(positions) - min(positions)
    blink_signal = (1 - ratio) / (1 - config.blink_ear_ratio_max)
    turn_signal = turn / config.head_turn_min
    score = min(1.0, 0.5 * max(blink_signal, turn_signal)) if same_face else 0.0
    return LivenessVerdict(live=same_face and score >= 0.5, score=score, blink_ear_ratio=ratio, head_turn=turn,
                           same_face=same_face)


def mean_encoding(observations: Sequence[FaceObservation]) -> np.ndarray:
    """The probe for a live burst: the mean of its frames' descriptors, which evens out
    per-frame noise."""
    return np.mean([o.encoding for o in observations], axis=0).astype(np.float32)
