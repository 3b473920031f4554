"""The fare gate's settings: the only module of fare-gate that reads the environment.

Every variable is parsed and checked here, and the combinations that cannot work (a hold
that would expire before a retried tap could reach it, say) are refused together with the
malformed values, so the process exits with status 2 naming every problem before it opens a
single connection. README.md has the table of variables.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from libs.contract_cache import cache_ttl_s
from libs.service import CommonSettings
from libs.settings import (SecretKey, SettingsError, hex_key, host_port, int_between, non_negative_int, positive_int, repo_path,
                           schema_name, setting, url)

# The repository root: relative paths in settings are taken from here, never from the
# working directory, so the service finds its feed however it is started.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FEED = REPO_ROOT / "services" / "fare_gate" / "feeds" / "demo_city"
DEFAULT_GATES = REPO_ROOT / "services" / "fare_gate" / "gates" / "demo_city.csv"

# The wallet's hold_ttl_max_s default: a hold may not ask to live longer than this.
WALLET_HOLD_TTL_S_MAX = 7 * 24 * 3600
WALLET_TIMEOUT_MS_MAX = 10_000

_WALLET_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_FARE_MEDIA_ID = re.compile(r"^[A-Za-z0-9._:-]{0,64}$")


def wallet_account_id(text: str) -> str:
    """A wallet account id: 1 to 64 characters of A-Z a-z 0-9 . _ : -."""
    if not _WALLET_ID.match(text.strip()):
        raise ValueError("expected 1 to 64 characters of letters, digits, '.', '_', ':' or '-'")
    return text.strip()


def fare_media_id(text: str) -> str:
    """A GTFS-Fares fare_media_id, or `none` (empty) to price only products without a media."""
    if text.strip().lower() == "none":
        return ""
    if not _FARE_MEDIA_ID.match(text.strip()):
        raise ValueError("expected a fare_media_id of letters, digits, '.', '_', ':' or '-'")
    return text.strip()


def redis_key(text: str) -> str:
    """A Redis key name: printable, no spaces."""
    if not re.fullmatch(r"[A-Za-z0-9._:-]{1,200}", text.strip()):
        raise ValueError("expected 1 to 200 characters of letters, digits, '.', '_', ':' or '-'")
    return text.strip()


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything fare-gate needs to start; see README.md for each variable."""

    redis_url: str = setting("CITYTAP_REDIS_URL", url("redis"),
                             doc="Redis URL for hot state: the card cache and the wallet's deny list")
    wallet_address: str = setting("CITYTAP_WALLET_ADDRESS", host_port, doc="host:port of the wallet service")
    schema: str = setting("CITYTAP_FARE_GATE_SCHEMA", schema_name, default="fare_gate",
                          doc="PostgreSQL schema fare-gate owns (another only for isolated test instances)")
    feed_path: Path = setting("CITYTAP_FARE_GATE_FEED", repo_path(suffixes=(".zip",)), default=DEFAULT_FEED,
                              doc="GTFS-Fares v2 feed folder or zip; relative paths start at the repository root")
    gates_path: Path = setting("CITYTAP_FARE_GATE_GATES", repo_path(suffixes=(".csv",)), default=DEFAULT_GATES,
                               doc="CSV of the gates and validators: gate_id,stop_id,kind,network_id,route_id")
    revenue_account_id: str = setting("CITYTAP_FARE_GATE_REVENUE_ACCOUNT", wallet_account_id,
                                      default="system:operator-revenue:TWD",
                                      doc="wallet account every fare is paid to (and held for)")
    city_account_id: str = setting("CITYTAP_FARE_GATE_CITY_ACCOUNT", wallet_account_id,
                                   default="system:city-revenue:TWD",
                                   doc="wallet account the city's share of each fare is moved to")
    platform_account_id: str = setting("CITYTAP_FARE_GATE_PLATFORM_ACCOUNT", wallet_account_id,
                                       default="system:platform-fees:TWD",
                                       doc="wallet account the platform's share of each fare is moved to")
    operator_id: str = setting("CITYTAP_FARE_GATE_OPERATOR_ID", wallet_account_id, default="demo-city-transit",
                               doc="the transit operator's party id: the scope of its fare split contract")
    settlement_address: str | None = setting("CITYTAP_SETTLEMENT_ADDRESS", host_port, default=None,
                                             doc="host:port of the settlement service, which keeps the fare split "
                                                 "contracts; unset: fares are posted unsplit")
    contract_cache_ttl_s: int = setting("CITYTAP_FARE_GATE_CONTRACT_CACHE_TTL_S", cache_ttl_s, default=30,
                                        doc="how long fetched split contracts are reused, in seconds (0-300); a "
                                            "worker refreshes them at half that interval")
    card_fare_media_id: str = setting("CITYTAP_FARE_GATE_CARD_FARE_MEDIA", fare_media_id, default="card",
                                      doc="GTFS-Fares fare_media_id card taps are priced with; none: no media")
    wallet_timeout_ms: int = setting("CITYTAP_FARE_GATE_WALLET_TIMEOUT_MS", positive_int, default=200,
                                     doc="deadline of each wallet call on the tap path, in milliseconds")
    max_in_flight: int = setting(
        "CITYTAP_FARE_GATE_MAX_IN_FLIGHT", int_between(1, 1000), default=20,
        doc="calls the fare gate handles or queues at once (16 worker threads); one more is refused at once with "
            "RESOURCE_EXHAUSTED, so an overloaded gate hears quickly and decides offline")
    double_tap_window_s: int = setting("CITYTAP_FARE_GATE_DOUBLE_TAP_WINDOW_S", non_negative_int, default=10,
                                       doc="a repeat of an opened tap at the same gate within this many seconds "
                                           "opens again for nothing; 0 turns it off")
    passback_window_s: int = setting("CITYTAP_FARE_GATE_PASSBACK_WINDOW_S", non_negative_int, default=1200,
                                     doc="a second entry without an exit within this many seconds is refused")
    incomplete_after_s: int = setting("CITYTAP_FARE_GATE_INCOMPLETE_AFTER_S", positive_int, default=7200,
                                      doc="seconds without an exit after which a journey is charged the maximum "
                                          "fare, for networks whose feed row gives none")
    incomplete_sweep_interval_ms: int = setting("CITYTAP_FARE_GATE_INCOMPLETE_SWEEP_INTERVAL_MS", positive_int,
                                                default=10_000,
                                                doc="how often the worker looks for journeys with no exit in time")
    hold_grace_s: int = setting("CITYTAP_FARE_GATE_HOLD_GRACE_S", positive_int, default=6 * 3600,
                                doc="an entry hold expires this long after its journey becomes incomplete")
    tap_age_s_max: int = setting("CITYTAP_FARE_GATE_TAP_AGE_S_MAX", positive_int, default=3600,
                                 doc="oldest tapped_at accepted online, in seconds before now")
    clock_skew_s_max: int = setting("CITYTAP_FARE_GATE_CLOCK_SKEW_S_MAX", non_negative_int, default=300,
                                    doc="how far ahead of the server's clock a gate's tapped_at may be")
    credential_cache_ttl_s: int = setting("CITYTAP_FARE_GATE_CREDENTIAL_CACHE_TTL_S", non_negative_int, default=60,
                                          doc="how long a card's account stays cached in Redis; 0 turns the cache off")
    deny_list_key: str = setting("CITYTAP_FARE_GATE_DENY_LIST_KEY", redis_key, default="citytap:wallet:deny-list",
                                 doc="Redis set the wallet publishes blocked accounts in (a wallet on a scratch "
                                     "schema uses citytap:wallet:deny-list:<schema>)")
    credential_key: SecretKey | None = setting(
        "CITYTAP_FARE_GATE_CREDENTIAL_KEY", hex_key, default=None,
        doc="hex key (32+ bytes) of the HMAC that card UIDs are pseudonymized with; unset: a key generated once "
            "and kept in the schema")
    account_lock_timeout_ms: int = setting("CITYTAP_FARE_GATE_ACCOUNT_LOCK_TIMEOUT_MS", positive_int, default=1000,
                                           doc="longest wait for another tap of the same account to finish")
    gate_tap_deadline_ms: int = setting("CITYTAP_FARE_GATE_GATE_TAP_DEADLINE_MS", positive_int, default=250,
                                        doc="GateConfig: the deadline a gate sets on Tap before deciding offline")
    gate_bundle_refresh_interval_s: int = setting("CITYTAP_FARE_GATE_GATE_BUNDLE_REFRESH_INTERVAL_S", positive_int,
                                                  default=300, doc="GateConfig: how often a gate asks for a bundle")
    gate_offline_upload_batch_max: int = setting("CITYTAP_FARE_GATE_GATE_OFFLINE_UPLOAD_BATCH_MAX", positive_int,
                                                 default=500, doc="GateConfig: most taps per UploadOfflineTaps call")
    # Phone and face credentials (README.md "Phone and face taps").
    qr_validity_s: int = setting("CITYTAP_FARE_GATE_QR_VALIDITY_S", positive_int, default=30,
                                 doc="how old a phone QR code may be, in seconds (at most 30)")
    qr_clock_skew_s: int = setting("CITYTAP_FARE_GATE_QR_CLOCK_SKEW_S", non_negative_int, default=5,
                                   doc="clock difference allowed between a phone and the gate, in seconds")
    device_revocations_key: str = setting(
        "CITYTAP_FARE_GATE_DEVICE_REVOCATIONS_KEY", redis_key, default="citytap:wallet:device-revocations",
        doc="Redis set the wallet publishes revoked phone keys in (a wallet on a scratch schema uses "
            "citytap:wallet:device-revocations:<schema>)")
    issuer_keys_refresh_s: int = setting("CITYTAP_FARE_GATE_ISSUER_KEYS_REFRESH_S", positive_int, default=300,
                                         doc="how often the wallet's issuer public keys are read again")
    face_address: str | None = setting("CITYTAP_FACE_ADDRESS", host_port, default=None,
                                       doc="host:port of the face service; unset: face taps are refused")
    face_timeout_ms: int = setting("CITYTAP_FARE_GATE_FACE_TIMEOUT_MS", positive_int, default=1000,
                                   doc="deadline of one face Match call (liveness and matching of a frame burst)")
    face_limit_minor: int = setting("CITYTAP_FARE_GATE_FACE_LIMIT_MINOR", non_negative_int, default=10_000,
                                    doc="most a face match alone may hold or charge for one journey (NT$100)")

    def __post_init__(self) -> None:
        problems = []
        if self.wallet_timeout_ms > WALLET_TIMEOUT_MS_MAX:
            problems.append(f"CITYTAP_FARE_GATE_WALLET_TIMEOUT_MS={self.wallet_timeout_ms} is above "
                            f"{WALLET_TIMEOUT_MS_MAX}: a gate gives up long before that")
        if self.hold_grace_s <= self.tap_age_s_max:
            problems.append("CITYTAP_FARE_GATE_HOLD_GRACE_S must exceed CITYTAP_FARE_GATE_TAP_AGE_S_MAX, or the "
                            "hold of an accepted old entry could expire before its journey is charged")
        if self.incomplete_after_s + self.hold_grace_s > WALLET_HOLD_TTL_S_MAX:
            problems.append("CITYTAP_FARE_GATE_INCOMPLETE_AFTER_S + CITYTAP_FARE_GATE_HOLD_GRACE_S must be at most "
                            f"{WALLET_HOLD_TTL_S_MAX} s, the longest hold the wallet accepts")
        if self.double_tap_window_s > self.tap_age_s_max:
            problems.append("CITYTAP_FARE_GATE_DOUBLE_TAP_WINDOW_S must not exceed CITYTAP_FARE_GATE_TAP_AGE_S_MAX")
        if self.gate_tap_deadline_ms > 2**31 - 1 or self.gate_bundle_refresh_interval_s > 2**31 - 1 \
                or self.gate_offline_upload_batch_max > 2**31 - 1 or self.double_tap_window_s > 2**31 - 1 \
                or self.passback_window_s > 2**31 - 1:
            problems.append("the GateConfig settings must fit in a 32-bit integer")
        if self.qr_validity_s > 30:
            problems.append("CITYTAP_FARE_GATE_QR_VALIDITY_S must be at most 30: phone codes are short-lived")
        if problems:
            raise SettingsError(problems)
