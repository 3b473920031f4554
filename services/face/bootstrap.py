"""Composition root of the face service: the one place its dependencies are wired.

Production (`__main__`) and tests both call `build(settings)`; tests may pass a clock and a
face model.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from libs.service import BaseApp, open_standard
from services.face.crypto import TemplateCipher
from services.face.domain import LivenessConfig, MatchConfig
from services.face.index import TemplateIndex
from services.face.records import TOPIC, Analyser, FaceRecords, utc_now
from services.face.servicer import FaceServicer, registration
from services.face.settings import Settings
from services.face.workers import RetentionWorker

MIGRATIONS = Path(__file__).with_name("migrations")


def match_config(settings: Settings) -> MatchConfig:
    return MatchConfig(distance_max=settings.match_distance_max, margin_min=settings.match_margin_min)


def liveness_config(settings: Settings) -> LivenessConfig:
    return LivenessConfig(frames_min=settings.liveness_frames_min, frames_max=settings.liveness_frames_max,
                          blink_ear_ratio_max=settings.liveness_blink_ear_ratio_max,
                          head_turn_min=settings.liveness_head_turn_min)


def build(settings: Settings, *, clock: Callable[[], datetime] = utc_now, model: Analyser | None = None) -> BaseApp:
    """Connect to every dependency (waiting a bounded time for each), load the index from the
    encrypted store, then return the app."""
    matching, live = match_config(settings), liveness_config(settings)  # fail fast, before any I/O
    cipher = TemplateCipher(bytes(settings.template_key), [bytes(k) for k in settings.template_previous_keys])
    if model is None:
        from services.face.face_model import FaceModel  # loads dlib's models: only when serving

        model = FaceModel(image_bytes_max=settings.image_bytes_max, image_pixels_max=settings.image_pixels_max)
    servicer = FaceServicer()
    app, pool, _publisher = open_standard(settings, settings.schema, MIGRATIONS,
                                          registrations=[registration(servicer)], topic=TOPIC)
    records = FaceRecords(pool, schema=settings.schema, cipher=cipher, model=model,
                          index=TemplateIndex(ef_search=settings.index_ef_search), match=matching,
                          liveness_config=live, retention_days_max=settings.retention_days_max, clock=clock)
    records.load_index()
    servicer.attach(records)
    app.add_worker(RetentionWorker(records, interval_s=settings.retention_sweep_interval_s).run)
    app.records = records  # type: ignore[attr-defined]  # for tests and tools that drive the records directly
    return app
