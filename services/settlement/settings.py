"""The settlement service's settings: the only module of it that reads the environment."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from datetime import time

from libs.events import FETCH_WAIT_MS_MAX
from libs.money import check_currency
from libs.service import CommonSettings
from libs.settings import (clock_time as local_time, host_port, int_between, non_negative_int, positive_int, repo_path,
                           schema_name, setting, timezone_name, url)

_PARTY_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_STRIPE_ACCOUNT = re.compile(r"^acct_[A-Za-z0-9]{1,64}$")
PARTY_ACCOUNTS_MAX = 256


def party_id(text: str) -> str:
    """A party id: letters, digits and . _ : - (at most 64)."""
    if not _PARTY_ID.match(text.strip()):
        raise ValueError("expected 1-64 letters, digits, '.', '_', ':' or '-'")
    return text.strip()


def party_accounts(text: str) -> dict[tuple[str, str], str]:
    """Stripe connected accounts of non-merchant parties: `PARTY:party_id=acct_...` pairs,
    comma-separated, such as `CITY:taipei-city=acct_1City,TRANSIT_OPERATOR:metro=acct_1Metro`."""
    result: dict[tuple[str, str], str] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key, sep, account = part.partition("=")
        party, colon, pid = key.partition(":")
        if not sep or not colon:
            raise ValueError(f"{part!r}: expected PARTY:party_id=acct_...")
        if party not in ("TRANSIT_OPERATOR", "CITY", "PLATFORM", "MERCHANT"):
            raise ValueError(f"{part!r}: the party is TRANSIT_OPERATOR, CITY, PLATFORM or MERCHANT")
        party_id(pid)
        if not _STRIPE_ACCOUNT.match(account):
            raise ValueError(f"{part!r}: a Stripe connected account id looks like acct_1AbC")
        if (party, pid) in result:
            raise ValueError(f"{party}:{pid} is listed twice")
        result[(party, pid)] = account
    if len(result) > PARTY_ACCOUNTS_MAX:
        raise ValueError(f"at most {PARTY_ACCOUNTS_MAX} party accounts")
    return result


fetch_wait_ms = int_between(0, FETCH_WAIT_MS_MAX, "ms")


def currency_code(text: str) -> str:
    """An upper-case ISO 4217 alphabetic code."""
    return check_currency(text.strip())


@dataclasses.dataclass(frozen=True)
class Settings(CommonSettings):
    """Everything settlement needs to start; see README.md for each variable."""

    stripe_api_base: str = setting("CITYTAP_STRIPE_API_BASE", url("http", "https"), doc="Stripe API base URL")
    stripe_api_key: str = setting("CITYTAP_STRIPE_API_KEY", doc="Stripe secret key (sk_test_... in tests)")
    wallet_address: str = setting("CITYTAP_WALLET_ADDRESS", host_port,
                                  doc="host:port of the wallet, read for the ledger side of reconciliation and exports")
    schema: str = setting("CITYTAP_SETTLEMENT_SCHEMA", schema_name, default="settlement",
                          doc="PostgreSQL schema settlement owns (another only for isolated test instances)")
    currency: str = setting("CITYTAP_SETTLEMENT_CURRENCY", currency_code, default="TWD",
                            doc="ISO 4217 code of the currency settled and paid out")
    service_day_timezone: str = setting("CITYTAP_SETTLEMENT_SERVICE_DAY_TIMEZONE", timezone_name,
                                        default="Asia/Taipei", doc="IANA time zone of the service day")
    service_day_start: time = setting("CITYTAP_SETTLEMENT_SERVICE_DAY_START", local_time, default=time(4, 30),
                                      doc="local time a service day starts, HH:MM")
    close_grace_s: int = setting("CITYTAP_SETTLEMENT_CLOSE_GRACE_S", non_negative_int, default=3600,
                                 doc="seconds after a service day ends before it may be closed (late events)")
    contract_lead_time_s: int = setting("CITYTAP_SETTLEMENT_CONTRACT_LEAD_TIME_S", non_negative_int, default=3600,
                                        doc="least time between creating a contract version and its effective time")
    initial_contracts: Path | None = setting(
        "CITYTAP_SETTLEMENT_INITIAL_CONTRACTS", repo_path(suffixes=(".json",)), default=None,
        doc="JSON file of the partnership's initial contract versions, recorded at start into an empty contract "
            "book only (then they may take effect in the past); unset: none")
    report_dir: str = setting("CITYTAP_SETTLEMENT_REPORT_DIR", default=".local/settlement/reports",
                              doc="directory the per-party CSV and PDF reports are written to")
    export_dir: str = setting("CITYTAP_SETTLEMENT_EXPORT_DIR", default=".local/settlement/exports",
                              doc="directory exports are written to, one folder per export id")
    city_party_id: str = setting("CITYTAP_SETTLEMENT_CITY_PARTY_ID", party_id, default="city",
                                 doc="party id of the city")
    platform_party_id: str = setting("CITYTAP_SETTLEMENT_PLATFORM_PARTY_ID", party_id, default="platform",
                                     doc="party id of the platform operator, whose share stays in the platform balance")
    party_accounts: dict = setting("CITYTAP_SETTLEMENT_PARTY_ACCOUNTS", party_accounts, default={},
                                   doc="PARTY:party_id=acct_... Stripe connected accounts of non-merchant parties")
    wallet_topic: str = setting("CITYTAP_SETTLEMENT_WALLET_TOPIC", default="citytap.wallet.v1.events",
                                doc="topic of the wallet's events (another only for isolated test instances)")
    merchant_topic: str = setting("CITYTAP_SETTLEMENT_MERCHANT_TOPIC", default="citytap.merchant.v1.events",
                                  doc="topic of the merchant service's events (another only for isolated tests)")
    consume_wait_ms: int = setting(
        "CITYTAP_SETTLEMENT_CONSUME_WAIT_MS", fetch_wait_ms, default=200,
        doc="how long the broker may hold a fetch of the wallet's and merchants' events to gather a batch "
            "(0-5000 ms; 0: answer at once). Settlement lags the ledger by at most about this much, and takes "
            "a busy topic in fewer, larger batches")
    stripe_timeout_ms: int = setting("CITYTAP_STRIPE_TIMEOUT_MS", positive_int, default=10_000,
                                     doc="read timeout of one Stripe request, in milliseconds")
    stripe_max_network_retries: int = setting("CITYTAP_STRIPE_MAX_NETWORK_RETRIES", non_negative_int, default=2,
                                              doc="retries of a retryable Stripe failure (0-5)")


@dataclasses.dataclass(frozen=True)
class FinanceSettings:
    """What the finance CLI (`python -m services.settlement.finance`) reads from the environment."""

    settlement_address: str = setting("CITYTAP_SETTLEMENT_ADDRESS", host_port, default="127.0.0.1:50055",
                                      doc="host:port of the settlement service")
    report_dir: str = setting("CITYTAP_SETTLEMENT_REPORT_DIR", default=".local/settlement/reports",
                              doc="the settlement service's report directory, to print where reports are")
    export_dir: str = setting("CITYTAP_SETTLEMENT_EXPORT_DIR", default=".local/settlement/exports",
                              doc="the settlement service's export directory, to print where exports are")
