"""Composition root of the wallet service: the one place its dependencies are wired.

Production (`__main__`) and tests both call `build(settings)`; tests may pass a clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from libs.service import BaseApp, open_redis, open_standard
from services.wallet.exports import LedgerExports
from services.wallet.deny_list import RedisDenyList, deny_list_key
from services.wallet.devices import wire_devices
from services.wallet.ledger import Ledger, LedgerConfig, utc_now
from services.wallet.servicer import WalletServicer, registration
from services.wallet.settings import Settings
from services.wallet.topups import top_up_config, wire_top_ups
from services.wallet.workers import Sweeper

MIGRATIONS = Path(__file__).with_name("migrations")
TOPIC = "citytap.wallet.v1.events"


def ledger_config(settings: Settings) -> LedgerConfig:
    return LedgerConfig(
        currency=settings.currency,
        rider_categories=settings.rider_categories,
        rider_floor_minor=settings.rider_floor_minor,
        stored_value_max_minor=settings.stored_value_max_minor,
        card_hash_key=bytes(settings.card_hash_key),
        hold_ttl_default_s=settings.hold_ttl_default_s,
        hold_ttl_max_s=settings.hold_ttl_max_s,
    )


def build(settings: Settings, *, clock: Callable[[], datetime] = utc_now) -> BaseApp:
    """Connect to every dependency (waiting a bounded time for each), then return the app."""
    config = ledger_config(settings)  # fails fast on inconsistent settings, before any I/O
    top_up_config(settings)
    schema = settings.schema
    servicer = WalletServicer()
    app, pool, _publisher = open_standard(settings, schema, MIGRATIONS, registrations=[registration(servicer)],
                                          topic=TOPIC)
    redis = open_redis(app, settings.redis_url)
    deny_list = RedisDenyList(redis, key=deny_list_key(schema))
    ledger = Ledger(pool, schema=schema, config=config, deny_list=deny_list, clock=clock)
    ledger.ensure_system_accounts()
    ledger.rebuild_deny_list()
    servicer.attach(ledger)
    servicer.attach_exports(LedgerExports(pool, schema=schema))
    top_ups = wire_top_ups(app, ledger, settings, clock=clock)
    servicer.attach_top_ups(top_ups)
    app.top_ups = top_ups  # type: ignore[attr-defined]
    devices = wire_devices(app, pool, redis, settings, clock=clock)
    servicer.attach_devices(devices)
    app.devices = devices  # type: ignore[attr-defined]
    sweeper = Sweeper(ledger, interval_s=settings.hold_sweep_interval_ms / 1000,
                      deny_list_rebuild_interval_s=settings.deny_list_rebuild_interval_s)
    app.add_worker(sweeper.run)
    app.ledger = ledger  # type: ignore[attr-defined]  # for tests and tools that drive the ledger directly
    return app
