"""Composition root of the merchant service: the one place its dependencies are wired.

Production (`__main__`) and tests both call `build(settings)`; tests may pass a clock and a
contract source.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from libs.grpc_client import connect
from libs.service import BaseApp, open_redis, open_standard
from libs.stripe_webhooks import WebhookServer
from services.merchant.contracts import ContractCache
from services.merchant.credentials import CredentialConfig, CredentialResolver
from services.merchant.domain import Limits, ServiceDay
from services.merchant.face_client import FaceClient
from services.merchant.merchants import SETTLE_MARGIN_S_DEFAULT, TOPIC, ContractSource, Merchants, utc_now
from services.merchant.servicer import MerchantServicer, registration
from services.merchant.settings import Settings
from services.merchant.stripe_gateway import StripeGateway
from services.merchant.wallet_client import WalletClient

MIGRATIONS = Path(__file__).with_name("migrations")
log = logging.getLogger("citytap.merchant")


def limits(settings: Settings) -> Limits:
    if settings.per_purchase_limit_minor > settings.per_day_limit_minor:
        raise ValueError("CITYTAP_MERCHANT_PER_PURCHASE_LIMIT_MINOR is above CITYTAP_MERCHANT_PER_DAY_LIMIT_MINOR")
    return Limits(settings.per_purchase_limit_minor, settings.per_day_limit_minor, settings.currency,
                  face_minor=settings.face_limit_minor)


def stripe_gateway(settings: Settings) -> StripeGateway:
    return StripeGateway(api_key=settings.stripe_api_key, api_base=settings.stripe_api_base,
                         webhook_secret=bytes(settings.webhook_secret).decode(),
                         timeout_s=settings.stripe_timeout_ms / 1000,
                         max_network_retries=settings.stripe_max_network_retries)


def settle_in_doubt_until(stop: threading.Event, merchants: Merchants, interval_s: float) -> None:
    """Settle charges and refunds left in doubt every `interval_s` until `stop` is set."""
    while not stop.wait(interval_s):
        try:
            merchants.settle_in_doubt()
        except Exception:  # noqa: BLE001 - the next round tries again
            log.exception("settling charges left in doubt failed; trying again next round")


def build(settings: Settings, *, clock: Callable[[], datetime] = utc_now,
          contracts: ContractSource | None = None) -> BaseApp:
    """Connect to every dependency (waiting a bounded time for each), then return the app."""
    day_limits = limits(settings)  # fails fast on inconsistent settings, before any I/O
    gateway = stripe_gateway(settings)
    servicer = MerchantServicer()
    app, pool, _publisher = open_standard(settings, settings.schema, MIGRATIONS, registrations=[registration(servicer)],
                                          topic=TOPIC)
    wallet_channel = connect(settings.wallet_address, default_timeout_s=settings.wallet_timeout_ms / 1000)
    app.on_close(wallet_channel.close)
    if contracts is None:
        settlement_channel = connect(settings.settlement_address,
                                     default_timeout_s=settings.settlement_timeout_ms / 1000)
        app.on_close(settlement_channel.close)
        contracts = ContractCache(settlement_channel, currency=settings.currency,
                                  timeout_s=settings.settlement_timeout_ms / 1000, ttl_s=settings.contract_cache_ttl_s)
    wallet = WalletClient(wallet_channel, timeout_s=settings.wallet_timeout_ms / 1000)
    nonces = open_redis(app, settings.redis_url)
    face = None
    if settings.face_address:
        face_channel = connect(settings.face_address, default_timeout_s=settings.face_timeout_ms / 1000)
        app.on_close(face_channel.close)
        face = FaceClient(face_channel, timeout_s=settings.face_timeout_ms / 1000)
    credentials = CredentialResolver(wallet, face, CredentialConfig(
        qr_validity_s=settings.qr_validity_s, qr_clock_skew_s=settings.qr_clock_skew_s,
        issuer_keys_refresh_s=settings.issuer_keys_refresh_s))
    merchants = Merchants(pool, schema=settings.schema, wallet=wallet, credentials=credentials, contracts=contracts,
                          stripe=gateway, limits=day_limits,
                          service_day=ServiceDay(settings.service_day_timezone, settings.service_day_start), nonces=nonces,
                          clock=clock, in_doubt_after_s=settings.in_doubt_after_s,
                          # No post of a charge can still be in flight once the wallet's deadline has passed.
                          settle_margin_s=settings.wallet_timeout_ms / 1000 + SETTLE_MARGIN_S_DEFAULT)
    servicer.attach(merchants)
    webhooks = WebhookServer(settings.webhook_listen, merchants.handle_webhook, thread_name="merchant-stripe-webhook")
    app.add_worker(webhooks.run)
    app.on_close(webhooks.close)
    app.add_worker(lambda stop: settle_in_doubt_until(stop, merchants, settings.settle_interval_s))
    app.merchants = merchants  # type: ignore[attr-defined]  # for tests and tools that drive the use cases directly
    app.webhooks = webhooks  # type: ignore[attr-defined]
    return app
