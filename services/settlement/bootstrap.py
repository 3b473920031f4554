"""Composition root of the settlement service: the one place its dependencies are wired.

Production (`__main__`) and tests both call `build(settings)`; tests may pass a clock, a
ledger reader (what answers for the wallet's ListTransfers and ListAccounts), a payouts
adapter, and switch the event consumers off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from citytap.merchant.v1 import events_pb2 as merchant_events
from citytap.wallet.v1 import events_pb2 as wallet_events
from libs.events import ConsumerLoop, ensure_topics
from libs.postgres import PostgresInbox
from libs.service import BaseApp, open_standard, retry_until_ready
from services.settlement.closing import Closing
from services.settlement.contracts import Contracts, load_initial
from services.settlement.domain import ServiceDayClock
from services.settlement.exports import Exporter
from services.settlement.ingest import Ingest
from services.settlement.reconcile import Reconciler
from services.settlement.reports import Reports
from services.settlement.servicer import SettlementServicer, registration
from services.settlement.settings import Settings
from services.settlement.stripe_payouts import StripePayouts

MIGRATIONS = Path(__file__).with_name("migrations")
TOPIC = "citytap.settlement.v1.events"
log = logging.getLogger("citytap.settlement")


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def service_days(settings: Settings) -> ServiceDayClock:
    return ServiceDayClock(ZoneInfo(settings.service_day_timezone), settings.service_day_start)


def build(settings: Settings, *, clock: Callable[[], datetime] = utc_now, ledger_reader: Any = None,
          payouts: Any = None, consume: bool = True) -> BaseApp:
    """Connect to every dependency (waiting a bounded time for each), then return the app."""
    schema = settings.schema
    days = service_days(settings)
    servicer = SettlementServicer()
    app, pool, publisher = open_standard(settings, schema, MIGRATIONS, registrations=[registration(servicer)],
                                         topic=TOPIC)
    if ledger_reader is None:
        from services.settlement.wallet_reader import WalletLedgerReader

        ledger_reader = WalletLedgerReader(settings.wallet_address)
        app.on_close(ledger_reader.close)
    if payouts is None:
        payouts = StripePayouts(api_key=settings.stripe_api_key, api_base=settings.stripe_api_base,
                                timeout_s=settings.stripe_timeout_ms / 1000,
                                max_network_retries=settings.stripe_max_network_retries)
    contracts = Contracts(pool, schema=schema, lead_time_s=settings.contract_lead_time_s,
                          currency=settings.currency, clock=clock)
    if settings.initial_contracts is not None:
        seeded = contracts.seed_initial(load_initial(settings.initial_contracts, currency=settings.currency))
        log.info("initial contracts", extra={"fields": {"file": str(settings.initial_contracts), "recorded": seeded,
                                                         "note": "recorded" if seeded else "contract book not empty"}})
    closing = Closing(pool, schema=schema, days=days, grace_s=settings.close_grace_s, currency=settings.currency,
                      party_accounts=settings.party_accounts, platform_party_id=settings.platform_party_id,
                      payouts=payouts, clock=clock)
    reports = Reports(pool, schema=schema, report_dir=settings.report_dir, closing=closing)
    reconciler = Reconciler(pool, schema=schema, days=days, currency=settings.currency, ledger_reader=ledger_reader,
                            clock=clock)
    exporter = Exporter(pool, schema=schema, export_dir=settings.export_dir, days=days, ledger_reader=ledger_reader,
                        clock=clock)
    ingest = Ingest(schema=schema, days=days)
    servicer.attach(contracts=contracts, closing=closing, reports=reports, reconciler=reconciler, exporter=exporter)
    if consume:
        retry_until_ready("Kafka", lambda: ensure_topics(settings.kafka_bootstrap,
                                                         [settings.wallet_topic, settings.merchant_topic]))
        for name, topic, envelope, handler in (
                ("wallet", settings.wallet_topic, wallet_events.WalletEvent, ingest.on_wallet_event),
                ("merchant", settings.merchant_topic, merchant_events.MerchantEvent, ingest.on_merchant_event)):
            loop = ConsumerLoop(bootstrap=settings.kafka_bootstrap, group_id=f"citytap-{schema}-{name}",
                                topics=[topic], envelope_type=envelope, handler=handler,
                                inbox=PostgresInbox(pool, schema=schema, consumer=name), batch_records_max=500,
                                dead_letter=publisher, fetch_wait_ms=settings.consume_wait_ms)
            app.add_worker(loop.run)
            app.on_close(loop.close)
            setattr(app, f"{name}_consumer", loop)
    for name, part in dict(contracts=contracts, closing=closing, reports=reports, reconciler=reconciler,
                           exporter=exporter, ingest=ingest, pool=pool).items():
        setattr(app, name, part)  # for tests and tools that drive the use cases directly
    return app
