"""The merchant service's settings: the only module of it that reads the environment."""

from __future__ import annotations

import dataclasses
from datetime import time

from libs.contract_cache import cache_ttl_s
from libs.money import check_currency
from libs.service import CommonSettings
from libs.settings import (clock_time, host_port, non_negative_int, positive_int, schema_name, SecretKey, setting,
                           timezone_name, url)

# Stripe signing secrets are "whsec_" and a few dozen characters; anything much shorter is a typo.
WEBHOOK_SECRET_CHARS_MIN = 16


def currency_code(text: str) -> str:
    """An upper-case ISO 4217 alphabetic code (libs.money's rule; MoneyError is a ValueError)."""
    return check_currency(text.strip())


def webhook_secret(text: str) -> SecretKey:
    """A Stripe webhook signing secret (whsec_...), kept out of logs."""
    value = text.strip()
    if len(value) < WEBHOOK_SECRET_CHARS_MIN:
        raise ValueError(f"expected a signing secret of at least {WEBHOOK_SECRET_CHARS_MIN} characters (whsec_...)")
    return SecretKey(value.encode())


def qr_validity_s(text: str) -> int:
    """Seconds a phone QR code stays valid: 1 to 30 (what phones promise)."""
    value = positive_int(text)
    if value > 30:
        raise ValueError("expected at most 30 seconds")
    return value


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything the merchant service needs to start; see README.md for each variable."""

    wallet_address: str = setting("CITYTAP_WALLET_ADDRESS", host_port, doc="host:port of the wallet service")
    settlement_address: str = setting("CITYTAP_SETTLEMENT_ADDRESS", host_port,
                                      doc="host:port of the settlement service (split contracts)")
    stripe_api_base: str = setting("CITYTAP_STRIPE_API_BASE", url("http", "https"), doc="Stripe API base URL")
    stripe_api_key: str = setting("CITYTAP_STRIPE_API_KEY", doc="Stripe secret key (sk_test_... in tests)")
    webhook_secret: SecretKey = setting(
        "CITYTAP_MERCHANT_WEBHOOK_SECRET", webhook_secret,
        doc="signing secret of the Stripe Connect webhook endpoint (whsec_...)")
    webhook_listen: str = setting("CITYTAP_MERCHANT_WEBHOOK_LISTEN", host_port, default="127.0.0.1:0",
                                  doc="host:port the Stripe webhook endpoint (POST /stripe/webhook) binds")
    currency: str = setting("CITYTAP_MERCHANT_CURRENCY", currency_code, default="TWD",
                            doc="ISO 4217 code of the currency merchants charge in")
    per_purchase_limit_minor: int = setting(
        "CITYTAP_MERCHANT_PER_PURCHASE_LIMIT_MINOR", positive_int, default=100_000,
        doc="most one charge may take from a rider, in minor units (NT$1,000)")
    per_day_limit_minor: int = setting(
        "CITYTAP_MERCHANT_PER_DAY_LIMIT_MINOR", positive_int, default=300_000,
        doc="most a rider may pay at tills in one service day, in minor units (NT$3,000)")
    service_day_timezone: str = setting("CITYTAP_MERCHANT_SERVICE_DAY_TIMEZONE", timezone_name, default="Asia/Taipei",
                                        doc="IANA time zone of the service day")
    service_day_start: time = setting("CITYTAP_MERCHANT_SERVICE_DAY_START", clock_time, default=time(4, 30),
                                      doc="local time a service day starts, HH:MM")
    wallet_timeout_ms: int = setting("CITYTAP_MERCHANT_WALLET_TIMEOUT_MS", positive_int, default=1000,
                                     doc="deadline of each call to the wallet, in milliseconds")
    settlement_timeout_ms: int = setting("CITYTAP_MERCHANT_SETTLEMENT_TIMEOUT_MS", positive_int, default=1000,
                                         doc="deadline of each ListContracts call, in milliseconds")
    contract_cache_ttl_s: int = setting("CITYTAP_MERCHANT_CONTRACT_CACHE_TTL_S", cache_ttl_s, default=30,
                                        doc="how long fetched split contracts are reused, in seconds (0-300)")
    stripe_timeout_ms: int = setting("CITYTAP_STRIPE_TIMEOUT_MS", positive_int, default=10_000,
                                     doc="read timeout of one Stripe request, in milliseconds")
    stripe_max_network_retries: int = setting("CITYTAP_STRIPE_MAX_NETWORK_RETRIES", non_negative_int, default=2,
                                              doc="retries of a retryable Stripe failure (0-5)")
    redis_url: str = setting("CITYTAP_REDIS_URL", url("redis"),
                             doc="Redis URL of the network's phone QR claims (shared with fare-gate): a code pays once")
    face_address: str = setting("CITYTAP_FACE_ADDRESS", host_port, default="",
                                doc="host:port of the face service; empty: faces are refused at the till")
    face_timeout_ms: int = setting("CITYTAP_MERCHANT_FACE_TIMEOUT_MS", positive_int, default=1000,
                                   doc="deadline of each face Match call, in milliseconds")
    face_limit_minor: int = setting("CITYTAP_MERCHANT_FACE_LIMIT_MINOR", non_negative_int, default=50_000,
                                    doc="most a face match alone may pay at a till, in minor units (NT$500); 0: faces cannot pay")
    qr_validity_s: int = setting("CITYTAP_MERCHANT_QR_VALIDITY_S", qr_validity_s, default=30,
                                 doc="how old a phone QR code may be, in seconds (1-30)")
    qr_clock_skew_s: int = setting("CITYTAP_MERCHANT_QR_CLOCK_SKEW_S", non_negative_int, default=5,
                                   doc="clock difference allowed between phone and till, in seconds")
    issuer_keys_refresh_s: int = setting("CITYTAP_MERCHANT_ISSUER_KEYS_REFRESH_S", positive_int, default=300,
                                         doc="how often the wallet's issuer keys are fetched again, in seconds")
    in_doubt_after_s: int = setting(
        "CITYTAP_MERCHANT_IN_DOUBT_AFTER_S", positive_int, default=60,
        doc="seconds after which a charge or refund still PENDING (the wallet's answer lost, the till never retried) "
            "is settled from the ledger instead of by a retry")
    settle_interval_s: int = setting("CITYTAP_MERCHANT_SETTLE_INTERVAL_S", positive_int, default=30,
                                     doc="how often charges and refunds left in doubt are looked for, in seconds")
    schema: str = setting("CITYTAP_MERCHANT_SCHEMA", schema_name, default="merchant",
                          doc="PostgreSQL schema the service owns (another only for isolated test instances)")
