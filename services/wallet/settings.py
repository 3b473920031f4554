"""The wallet's settings: the only module of the wallet that reads the environment."""

from __future__ import annotations

import dataclasses

from libs.service import CommonSettings
from libs.settings import setting, url


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything the wallet needs to start; see README.md for each variable."""

    redis_url: str = setting("CITYTAP_REDIS_URL", url("redis"), doc="Redis URL for hot state (deny list, caches)")
    stripe_api_base: str = setting("CITYTAP_STRIPE_API_BASE", url("http", "https"), doc="Stripe API base URL")
    stripe_api_key: str = setting("CITYTAP_STRIPE_API_KEY", doc="Stripe secret key (sk_test_... in tests)")
