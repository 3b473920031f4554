"""Composition root of the face service: the one place its dependencies are wired.

Production (`__main__`) and tests both call `build(settings)`.
"""

from __future__ import annotations

from pathlib import Path

from libs.service import BaseApp, open_standard
from services.face.settings import Settings

MIGRATIONS = Path(__file__).with_name("migrations")


def build(settings: Settings) -> BaseApp:
    """Connect to every dependency (waiting a bounded time for each), then return the app."""
    app, _pool, _publisher = open_standard(settings, "face", MIGRATIONS, registrations=[])

    return app
