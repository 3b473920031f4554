"""The merchant service's settings: the only module of it that reads the environment."""

from __future__ import annotations

import dataclasses

from libs.service import CommonSettings
from libs.settings import host_port, setting, url


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything the merchant service needs to start; see README.md for each variable."""

    wallet_address: str = setting("CITYTAP_WALLET_ADDRESS", host_port, doc="host:port of the wallet service")
    stripe_api_base: str = setting("CITYTAP_STRIPE_API_BASE", url("http", "https"), doc="Stripe API base URL")
    stripe_api_key: str = setting("CITYTAP_STRIPE_API_KEY", doc="Stripe secret key (sk_test_... in tests)")
