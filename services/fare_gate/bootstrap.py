"""Composition root of the fare_gate service: the one place its dependencies are wired.

Production (`__main__`) and tests both call `build(settings)`; tests may pass a clock.
The feed and the gates file are loaded and checked before any connection is opened, so a
bad feed stops the start with its whole problem list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from citytap.settlement.v1 import settlement_pb2
from libs import errors
from libs.contract_cache import ContractCache
from libs.grpc_client import connect
from libs.service import BaseApp, open_redis, open_standard, retry_until_ready
from services.fare_gate.credentials import CredentialConfig, CredentialResolver, IssuerKeys, PhoneState
from services.fare_gate.face_client import FaceClient
from services.fare_gate.fare_events import TOPIC
from services.fare_gate.fare_split import FareSplitter
from services.fare_gate.fares import FareEngine, FeedError
from services.fare_gate.gates import GatesError, load_gates
from services.fare_gate.hot_state import HotState
from services.fare_gate.repository import Repository
from services.fare_gate.servicer import FareGateServicer, registration
from services.fare_gate.settings import WALLET_HOLD_TTL_S_MAX, Settings
from services.fare_gate.taps import TapConfig, TapService, utc_now
from services.fare_gate.wallet_client import WalletClient

MIGRATIONS = Path(__file__).with_name("migrations")
log = logging.getLogger("citytap.fare_gate")

# The most journeys one pass of the incomplete-journey worker closes.
INCOMPLETE_BATCH_MAX = 100
CONTRACT_FETCH_TIMEOUT_S = 2.0  # one ListContracts page, off the tap path
CONTRACT_REFRESH_S_MIN = 1.0


class StartError(RuntimeError):
    """The service cannot start; the message lists every problem found."""


def load_fares(settings: Settings) -> tuple[FareEngine, dict]:
    """The engine and the gates, checked against each other; StartError lists all problems."""
    try:
        engine = FareEngine.from_path(settings.feed_path)
    except FeedError as exc:
        raise StartError(f"the fare feed {settings.feed_path} is invalid:\n"
                         + "\n".join(f"  - {p}" for p in exc.problems)) from exc
    media = settings.card_fare_media_id or None
    if media is not None and media not in engine.feed.fare_media:
        raise StartError(f"CITYTAP_FARE_GATE_CARD_FARE_MEDIA={media!r} is not a fare_media_id of the feed "
                         f"(it has {', '.join(sorted(engine.feed.fare_media)) or 'none'})")
    try:
        gates = load_gates(settings.gates_path, engine, fare_media_id=media)
    except GatesError as exc:
        raise StartError(f"the gates file {settings.gates_path} is invalid:\n"
                         + "\n".join(f"  - {p}" for p in exc.problems)) from exc
    return engine, gates


def tap_config(settings: Settings) -> TapConfig:
    return TapConfig(
        revenue_account_id=settings.revenue_account_id, fare_media_id=settings.card_fare_media_id or None,
        double_tap_window_s=settings.double_tap_window_s, passback_window_s=settings.passback_window_s,
        incomplete_after_s=settings.incomplete_after_s, hold_grace_s=settings.hold_grace_s,
        tap_age_s_max=settings.tap_age_s_max, clock_skew_s_max=settings.clock_skew_s_max,
        account_lock_timeout_ms=settings.account_lock_timeout_ms)


def credential_resolver(app: BaseApp, settings: Settings, *, key: bytes, hot_state: HotState,
                        wallet: WalletClient) -> CredentialResolver:
    """Cards, phones (issuer keys from the wallet, nonces and revocations in Redis) and faces."""
    phone = PhoneState(open_redis(app, settings.redis_url), cache_ttl_s=settings.credential_cache_ttl_s,
                       revocations_key=settings.device_revocations_key)
    issuers = IssuerKeys(lambda: wallet.issuer_keys(timeout_s=2.0), refresh_s=settings.issuer_keys_refresh_s)
    try:
        log.info("issuer keys read", extra={"fields": {"keys": len(issuers.trusted())}})  # not on the first tap
    except errors.Unavailable:
        log.warning("issuer keys not read yet; the first phone tap will ask the wallet again")
    face = None
    if settings.face_address is not None:
        channel = connect(settings.face_address, default_timeout_s=settings.face_timeout_ms / 1000)
        app.on_close(channel.close)
        face = FaceClient(channel, timeout_s=settings.face_timeout_ms / 1000)
    config = CredentialConfig(qr_validity_s=settings.qr_validity_s, qr_clock_skew_s=settings.qr_clock_skew_s,
                              face_limit_minor=settings.face_limit_minor,
                              issuer_keys_refresh_s=settings.issuer_keys_refresh_s)
    return CredentialResolver(key=key, hot_state=hot_state, wallet=wallet, phone=phone, issuers=issuers, face=face,
                              config=config)


def fare_splitter(app: BaseApp, settings: Settings, *, wallet: WalletClient, currency: str) -> FareSplitter | None:
    """Fare splits under the settlement service's transit-fare contracts (fare_split.py), with
    a worker keeping the contract list fresh off the tap path; None without a settlement
    address (fares are then posted unsplit)."""
    if settings.settlement_address is None:
        log.warning("CITYTAP_SETTLEMENT_ADDRESS is unset: fares are posted unsplit")
        return None
    for account_id in (settings.city_account_id, settings.platform_account_id):
        account = retry_until_ready(f"the wallet's account {account_id}", lambda a=account_id: wallet.account(a, timeout_s=2.0))
        if account.currency != currency:
            raise StartError(f"the account {account_id} holds {account.currency} but the feed prices in {currency}")
    channel = connect(settings.settlement_address, default_timeout_s=CONTRACT_FETCH_TIMEOUT_S)
    app.on_close(channel.close)
    cache = ContractCache(channel, revenue_kind=settlement_pb2.REVENUE_KIND_TRANSIT_FARE, currency=currency,
                          timeout_s=CONTRACT_FETCH_TIMEOUT_S, ttl_s=settings.contract_cache_ttl_s)
    interval_s = max(settings.contract_cache_ttl_s / 2, CONTRACT_REFRESH_S_MIN)

    def refresh_contracts(stop: threading.Event) -> None:
        while True:
            try:
                cache.versions(refresh=True)
            except errors.CityTapError as exc:
                log.warning("fare split contracts not refreshed", extra={"fields": {"reason": exc.reason}})
            if stop.wait(interval_s):
                return

    app.add_worker(refresh_contracts)
    return FareSplitter(cache.cached, operator_id=settings.operator_id, currency=currency,
                        revenue_account_id=settings.revenue_account_id,
                        party_accounts={"CITY": settings.city_account_id, "PLATFORM": settings.platform_account_id})


def build(settings: Settings, *, clock: Callable[[], datetime] = utc_now) -> BaseApp:
    """Connect to every dependency (waiting a bounded time for each), then return the app."""
    engine, gates = load_fares(settings)
    log.info("fare feed loaded", extra={"fields": {"feed": engine.feed.name, "version": engine.feed.version,
                                                   "gates": len(gates)}})
    servicer = FareGateServicer()
    app, pool, _publisher = open_standard(settings, settings.schema, MIGRATIONS, registrations=[registration(servicer)],
                                          topic=TOPIC, max_in_flight=settings.max_in_flight)
    hot_state = HotState(open_redis(app, settings.redis_url), cache_ttl_s=settings.credential_cache_ttl_s,
                         deny_list_key=settings.deny_list_key)
    channel = connect(settings.wallet_address, default_timeout_s=settings.wallet_timeout_ms / 1000)
    app.on_close(channel.close)
    wallet = WalletClient(channel, timeout_s=settings.wallet_timeout_ms / 1000)
    revenue = retry_until_ready("the wallet's revenue account",
                                lambda: wallet.account(settings.revenue_account_id, timeout_s=2.0))
    if revenue.currency != engine.feed.currency:
        raise StartError(f"the revenue account {revenue.account_id} holds {revenue.currency} but the feed prices "
                         f"in {engine.feed.currency}")
    repository = Repository(pool, schema=settings.schema)
    key = bytes(settings.credential_key) if settings.credential_key is not None else repository.credential_key()
    credentials = credential_resolver(app, settings, key=key, hot_state=hot_state, wallet=wallet)
    splitter = fare_splitter(app, settings, wallet=wallet, currency=engine.feed.currency)
    service = TapService(engine=engine, gates=gates, repository=repository, wallet=wallet, hot_state=hot_state,
                         credential_key=key, config=tap_config(settings), clock=clock, credentials=credentials,
                         splitter=splitter)
    for network in {g.network_id for g in gates.values()}:
        if service.incomplete_after_s(network) + settings.hold_grace_s > WALLET_HOLD_TTL_S_MAX:
            raise StartError(f"holds on {network} would outlive the wallet's longest hold: lower "
                             "CITYTAP_FARE_GATE_HOLD_GRACE_S or the feed's incomplete_after_s")
    servicer.attach(service, gate_settings={
        "tap_deadline_ms": settings.gate_tap_deadline_ms,
        "bundle_refresh_interval_s": settings.gate_bundle_refresh_interval_s,
        "offline_upload_batch_max": settings.gate_offline_upload_batch_max,
    })
    app.add_worker(incomplete_journey_worker(service, interval_s=settings.incomplete_sweep_interval_ms / 1000))
    app.fare_gate = service  # type: ignore[attr-defined]  # for tests and tools that drive the use cases directly
    return app


def incomplete_journey_worker(service: TapService, *, interval_s: float) -> Callable[[threading.Event], None]:
    """A worker that charges the maximum fare to journeys with no exit in time."""

    def close_incomplete_journeys(stop: threading.Event) -> None:
        backoff_s = interval_s
        while not stop.wait(backoff_s):
            try:
                while service.close_overdue_journeys(batch_max=INCOMPLETE_BATCH_MAX) == INCOMPLETE_BATCH_MAX \
                        and not stop.is_set():
                    pass  # a full batch: more may be due
                backoff_s = interval_s
            except Exception:  # noqa: BLE001 - keep sweeping after transient failures
                log.exception("closing incomplete journeys failed; retrying")
                backoff_s = min(max(backoff_s * 2, 1.0), 60.0)

    return close_incomplete_journeys
