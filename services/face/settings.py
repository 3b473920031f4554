"""The face service's settings: the only module of the face service that reads the environment."""

from __future__ import annotations

import dataclasses

from libs.service import CommonSettings
from libs.settings import SecretKey, positive_int, schema_name, setting


def template_key(text: str) -> SecretKey:
    """An AES-256 key: exactly 32 bytes as 64 hex digits."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("expected 64 hex digits, for example the output of `openssl rand -hex 32`") from None
    if len(key) != 32:
        raise ValueError(f"expected exactly 32 bytes (64 hex digits), got {len(key)}")
    return SecretKey(key)


def template_keys(text: str) -> tuple[SecretKey, ...]:
    """Comma-separated AES-256 keys (64 hex digits each)."""
    keys = tuple(template_key(part) for part in text.split(",") if part.strip())
    if len(keys) > 8:
        raise ValueError("expected at most 8 previous keys")
    return keys


def distance(text: str) -> float:
    """A descriptor distance between 0 and 2."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number such as 0.5") from None
    if not 0 <= value < 2:
        raise ValueError("expected a number from 0 up to 2")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number such as 0.75") from None
    if not 0 < value < 1:
        raise ValueError("expected a number between 0 and 1")
    return value


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything the face service needs to start; see README.md for each variable."""

    template_key: SecretKey = setting(
        "CITYTAP_FACE_TEMPLATE_KEY", template_key,
        doc="hex AES-256 key (64 hex digits) that encrypts new templates at rest")
    template_previous_keys: tuple[SecretKey, ...] = setting(
        "CITYTAP_FACE_TEMPLATE_PREVIOUS_KEYS", template_keys, default=(),
        doc="comma-separated hex keys still accepted for decryption while templates are re-encrypted")
    match_distance_max: float = setting("CITYTAP_FACE_MATCH_DISTANCE_MAX", distance, default=0.5,
                                        doc="largest descriptor distance a match may have")
    match_margin_min: float = setting("CITYTAP_FACE_MATCH_MARGIN_MIN", distance, default=0.1,
                                      doc="how much closer the best candidate must be than the second best")
    retention_days_max: int = setting("CITYTAP_FACE_RETENTION_DAYS_MAX", positive_int, default=1095,
                                      doc="longest retention a consent may ask for, in days after last use")
    liveness_frames_min: int = setting("CITYTAP_FACE_LIVENESS_FRAMES_MIN", positive_int, default=3,
                                       doc="fewest frames a burst may have")
    liveness_frames_max: int = setting("CITYTAP_FACE_LIVENESS_FRAMES_MAX", positive_int, default=8,
                                       doc="most frames a burst may have")
    liveness_blink_ear_ratio_max: float = setting(
        "CITYTAP_FACE_LIVENESS_BLINK_EAR_RATIO_MAX", fraction, default=0.75,
        doc="a blink: lowest over highest eye aspect ratio of the burst at most this")
    liveness_head_turn_min: float = setting(
        "CITYTAP_FACE_LIVENESS_HEAD_TURN_MIN", fraction, default=0.06,
        doc="a head turn: the nose's position across the face spans at least this")
    image_bytes_max: int = setting("CITYTAP_FACE_IMAGE_BYTES_MAX", positive_int, default=4_000_000,
                                   doc="largest image or frame accepted, in bytes")
    image_pixels_max: int = setting("CITYTAP_FACE_IMAGE_PIXELS_MAX", positive_int, default=25_000_000,
                                    doc="largest image or frame accepted, in pixels (width x height)")
    index_ef_search: int = setting("CITYTAP_FACE_INDEX_EF_SEARCH", positive_int, default=768,
                                   doc="HNSW search breadth: higher finds more true neighbours, slower")
    retention_sweep_interval_s: int = setting("CITYTAP_FACE_RETENTION_SWEEP_INTERVAL_S", positive_int, default=60,
                                              doc="how often expired templates are deleted and old-key ones re-encrypted")
    schema: str = setting("CITYTAP_FACE_SCHEMA", schema_name, default="face",
                          doc="PostgreSQL schema the face service owns (another only for isolated test instances)")
