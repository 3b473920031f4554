"""The face service's settings: the only module of the face service that reads the environment."""

from __future__ import annotations

import dataclasses

from libs.service import CommonSettings


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything the face service needs to start; see README.md for each variable."""
