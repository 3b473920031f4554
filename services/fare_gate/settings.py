"""The fare gate's settings: the only module of fare-gate that reads the environment."""

from __future__ import annotations

import dataclasses

from libs.service import CommonSettings
from libs.settings import host_port, setting, url


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything fare-gate needs to start; see README.md for each variable."""

    redis_url: str = setting("CITYTAP_REDIS_URL", url("redis"), doc="Redis URL for hot state (deny list, double taps)")
    wallet_address: str = setting("CITYTAP_WALLET_ADDRESS", host_port, doc="host:port of the wallet service")
