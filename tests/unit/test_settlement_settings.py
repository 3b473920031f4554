"""Settlement's settings: every variable parsed strictly, every problem named at once."""

from __future__ import annotations

from datetime import time

import pytest

from libs.settings import SettingsError, load
from services.settlement.settings import FinanceSettings, Settings, party_accounts

BASE = {"CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", "CITYTAP_POSTGRES_DSN": "postgresql://u@h/db",
        "CITYTAP_KAFKA_BOOTSTRAP": "127.0.0.1:9092", "CITYTAP_STRIPE_API_BASE": "http://127.0.0.1:12111",
        "CITYTAP_STRIPE_API_KEY": "sk_test_x", "CITYTAP_WALLET_ADDRESS": "127.0.0.1:50052"}


def test_defaults() -> None:
    settings = load(Settings, BASE)
    assert (settings.schema, settings.currency, settings.service_day_timezone) == ("settlement", "TWD", "Asia/Taipei")
    assert settings.service_day_start == time(4, 30)
    assert settings.close_grace_s == 3600 and settings.contract_lead_time_s == 3600
    assert settings.party_accounts == {}
    assert settings.consume_wait_ms == 200 and settings.outbox_idle_wait_ms == 200
    assert load(FinanceSettings, {}).settlement_address == "127.0.0.1:50055"


def test_party_accounts_are_parsed() -> None:
    assert party_accounts("CITY:city=acct_1City, TRANSIT_OPERATOR:metro=acct_1Metro") == {
        ("CITY", "city"): "acct_1City", ("TRANSIT_OPERATOR", "metro"): "acct_1Metro"}


@pytest.mark.parametrize("text", ["CITY:city", "CITY=acct_1", "BANK:b=acct_1", "CITY:c=ba_1", "CITY:c=acct_1,CITY:c=acct_2",
                                  "CITY:bad id=acct_1"])
def test_bad_party_accounts_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        party_accounts(text)


def test_every_bad_variable_is_named() -> None:
    env = {**BASE, "CITYTAP_SETTLEMENT_SERVICE_DAY_TIMEZONE": "Mars/Olympus", "CITYTAP_SETTLEMENT_SERVICE_DAY_START": "4:30",
           "CITYTAP_SETTLEMENT_CLOSE_GRACE_S": "-1", "CITYTAP_SETTLEMENT_CURRENCY": "twd",
           "CITYTAP_SETTLEMENT_SCHEMA": "Bad-Schema", "CITYTAP_SETTLEMENT_CONSUME_WAIT_MS": "5001",
           "CITYTAP_OUTBOX_IDLE_WAIT_MS": "0"}
    del env["CITYTAP_WALLET_ADDRESS"]
    with pytest.raises(SettingsError) as info:
        load(Settings, env)
    text = str(info.value)
    for name in ("TIMEZONE", "SERVICE_DAY_START", "CLOSE_GRACE_S", "SETTLEMENT_CURRENCY", "SETTLEMENT_SCHEMA",
                 "CITYTAP_WALLET_ADDRESS", "CONSUME_WAIT_MS", "OUTBOX_IDLE_WAIT_MS"):
        assert name in text


def test_waits_take_their_whole_range() -> None:
    settings = load(Settings, {**BASE, "CITYTAP_SETTLEMENT_CONSUME_WAIT_MS": "0", "CITYTAP_OUTBOX_IDLE_WAIT_MS": "1000"})
    assert (settings.consume_wait_ms, settings.outbox_idle_wait_ms) == (0, 1000)
    settings = load(Settings, {**BASE, "CITYTAP_SETTLEMENT_CONSUME_WAIT_MS": "5000", "CITYTAP_OUTBOX_IDLE_WAIT_MS": "1"})
    assert (settings.consume_wait_ms, settings.outbox_idle_wait_ms) == (5000, 1)
    with pytest.raises(SettingsError, match="CITYTAP_OUTBOX_IDLE_WAIT_MS"):
        load(Settings, {**BASE, "CITYTAP_OUTBOX_IDLE_WAIT_MS": "1001"})


def test_a_consumer_refuses_a_fetch_wait_out_of_range() -> None:
    from libs.events import ConsumerLoop

    with pytest.raises(ValueError, match="fetch_wait_ms"):
        ConsumerLoop(bootstrap="127.0.0.1:1", group_id="g", topics=["t"], envelope_type=object, handler=print,
                     inbox=None, fetch_wait_ms=5001)  # type: ignore[arg-type]
