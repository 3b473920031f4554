"""The wallet's settings: the only module of the wallet that reads the environment."""

from __future__ import annotations

import dataclasses
import re

from datetime import time

from libs.money import check_currency
from libs.service import CommonSettings
from libs.settings import (SecretKey, clock_time, hex_key, host_port, non_negative_int, positive_int, schema_name, setting,
                           timezone_name, url)
from services.wallet.topups import WebhookSecret, webhook_secret

_CATEGORY = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RIDER_CATEGORIES_MAX = 32


def currency_code(text: str) -> str:
    """An upper-case ISO 4217 alphabetic code (libs.money's rule; MoneyError is a ValueError)."""
    return check_currency(text.strip())


def rider_categories(text: str) -> tuple[str, ...]:
    """A comma-separated list of distinct GTFS-Fares rider_category_ids."""
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    if not names:
        raise ValueError("expected one or more rider categories separated by commas")
    if len(names) > RIDER_CATEGORIES_MAX:
        raise ValueError(f"expected at most {RIDER_CATEGORIES_MAX} rider categories")
    for name in names:
        if not _CATEGORY.match(name):
            raise ValueError(f"{name!r} is not a rider category id (letters, digits, '_' or '-')")
    if len(set(names)) != len(names):
        raise ValueError("a rider category is listed twice")
    return names


def ed25519_seed(text: str) -> SecretKey:
    """A hex-encoded 32-byte Ed25519 seed (64 hex digits)."""
    try:
        seed = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("expected 64 hex digits, for example the output of `openssl rand -hex 32`") from None
    if len(seed) != 32:
        raise ValueError(f"expected exactly 32 bytes (64 hex digits), got {len(seed)}")
    return SecretKey(seed)


def floor_minor(text: str) -> int:
    """The rider floor: 0, or a negative allowance in minor units such as -5000."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number of minor units, zero or negative") from None
    if value > 0:
        raise ValueError("the floor is zero or negative (an allowance of NT$50 is -5000)")
    return value


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything the wallet needs to start; see README.md for each variable."""

    redis_url: str = setting("CITYTAP_REDIS_URL", url("redis"), doc="Redis URL for hot state (deny list, caches)")
    stripe_api_base: str = setting("CITYTAP_STRIPE_API_BASE", url("http", "https"), doc="Stripe API base URL")
    stripe_api_key: str = setting("CITYTAP_STRIPE_API_KEY", doc="Stripe secret key (sk_test_... in tests)")
    card_hash_key: SecretKey = setting(
        "CITYTAP_WALLET_CARD_HASH_KEY", hex_key,
        doc="hex key (at least 32 bytes) of the HMAC-SHA256 that card UIDs are stored and looked up by")
    currency: str = setting("CITYTAP_WALLET_CURRENCY", currency_code, default="TWD",
                            doc="ISO 4217 code of the currency every wallet account holds")
    rider_categories: tuple[str, ...] = setting(
        "CITYTAP_WALLET_RIDER_CATEGORIES", rider_categories, default=("adult", "student", "senior", "disabled"),
        doc="comma-separated rider categories an account may have (GTFS-Fares rider_category_id)")
    rider_floor_minor: int = setting("CITYTAP_WALLET_RIDER_FLOOR_MINOR", floor_minor, default=0,
                                     doc="lowest balance of a new rider wallet: 0, or a negative allowance")
    stored_value_max_minor: int = setting("CITYTAP_WALLET_STORED_VALUE_MAX_MINOR", positive_int, default=1_000_000,
                                          doc="most a rider wallet may hold, in minor units (NT$10,000)")
    hold_ttl_default_s: int = setting("CITYTAP_WALLET_HOLD_TTL_DEFAULT_S", positive_int, default=7200,
                                      doc="expiry of a hold placed without one, in seconds")
    hold_ttl_max_s: int = setting("CITYTAP_WALLET_HOLD_TTL_MAX_S", positive_int, default=7 * 24 * 3600,
                                  doc="longest expiry a hold may ask for, in seconds")
    hold_sweep_interval_ms: int = setting("CITYTAP_WALLET_HOLD_SWEEP_INTERVAL_MS", positive_int, default=1000,
                                          doc="how often the sweeper looks for expired holds")
    deny_list_rebuild_interval_s: int = setting("CITYTAP_WALLET_DENY_LIST_REBUILD_INTERVAL_S", non_negative_int,
                                                default=300,
                                                doc="how often the Redis deny list is rebuilt from PostgreSQL; 0: only at start")
    schema: str = setting("CITYTAP_WALLET_SCHEMA", schema_name, default="wallet",
                          doc="PostgreSQL schema the wallet owns (another only for isolated test instances)")
    # Top-ups through Stripe (see TOPUPS.md).
    stripe_webhook_secret: WebhookSecret = setting(
        "CITYTAP_STRIPE_WEBHOOK_SECRET", webhook_secret, doc="signing secret of the Stripe webhook endpoint (whsec_...)")
    webhook_listen: str = setting("CITYTAP_WALLET_WEBHOOK_LISTEN", host_port, default="127.0.0.1:0",
                                  doc="host:port the Stripe webhook endpoint (POST /stripe/webhook) binds")
    top_up_min_minor: int = setting("CITYTAP_WALLET_TOP_UP_MIN_MINOR", positive_int, default=10_000,
                                    doc="smallest top-up, in minor units (NT$100)")
    top_up_max_minor: int = setting("CITYTAP_WALLET_TOP_UP_MAX_MINOR", positive_int, default=500_000,
                                    doc="largest single top-up, in minor units (NT$5,000)")
    top_up_pending_ttl_s: int = setting("CITYTAP_WALLET_TOP_UP_PENDING_TTL_S", positive_int, default=3600,
                                        doc="how long an unpaid top-up counts against the stored-value limit")
    auto_reload_interval_s: int = setting("CITYTAP_WALLET_AUTO_RELOAD_INTERVAL_S", positive_int, default=60,
                                          doc="how often the auto-reload worker runs a pass, in seconds")
    service_day_timezone: str = setting("CITYTAP_WALLET_SERVICE_DAY_TIMEZONE", timezone_name, default="Asia/Taipei",
                                        doc="IANA time zone of the service day")
    service_day_start: time = setting("CITYTAP_WALLET_SERVICE_DAY_START", clock_time, default=time(4, 30),
                                      doc="local time a service day starts, HH:MM")
    stripe_timeout_ms: int = setting("CITYTAP_STRIPE_TIMEOUT_MS", positive_int, default=10_000,
                                     doc="read timeout of one Stripe request, in milliseconds")
    stripe_max_network_retries: int = setting("CITYTAP_STRIPE_MAX_NETWORK_RETRIES", non_negative_int, default=2,
                                              doc="retries of a retryable Stripe failure (0-5)")
    # Phones (see README.md "Phones"): unset seed means this wallet certifies no phones.
    device_issuer_seed: SecretKey | None = setting(
        "CITYTAP_WALLET_DEVICE_ISSUER_SEED", ed25519_seed, default=None,
        doc="hex 32-byte seed of the Ed25519 issuer key that certifies phone keys; unset: no phone payment")
    device_certificate_ttl_s: int = setting("CITYTAP_WALLET_DEVICE_CERTIFICATE_TTL_S", positive_int,
                                            default=90 * 24 * 3600,
                                            doc="how long a phone's device certificate is valid, in seconds")
    devices_per_account_max: int = setting("CITYTAP_WALLET_DEVICES_PER_ACCOUNT_MAX", positive_int, default=5,
                                           doc="most active phones one rider account may register")
