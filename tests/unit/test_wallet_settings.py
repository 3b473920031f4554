"""The wallet's settings: defaults, the card hash key that fails fast, and list parsing."""

from __future__ import annotations

import pytest

from libs.settings import SettingsError, load
from services.wallet.bootstrap import ledger_config
from services.wallet.settings import Settings

KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
BASE = {
    "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0",
    "CITYTAP_POSTGRES_DSN": "postgresql://citytap@127.0.0.1/citytap",
    "CITYTAP_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "CITYTAP_REDIS_URL": "redis://127.0.0.1:6379/0",
    "CITYTAP_STRIPE_API_BASE": "http://127.0.0.1:12111",
    "CITYTAP_STRIPE_API_KEY": "sk_test_x",
    "CITYTAP_WALLET_CARD_HASH_KEY": KEY,
    "CITYTAP_STRIPE_WEBHOOK_SECRET": "whsec_unit_test_secret_0123",
}


def test_defaults() -> None:
    settings = load(Settings, BASE)
    assert settings.currency == "TWD"
    assert settings.rider_categories == ("adult", "student", "senior", "disabled")
    assert settings.rider_floor_minor == 0
    assert settings.stored_value_max_minor == 1_000_000
    assert bytes(settings.card_hash_key) == bytes.fromhex(KEY)


def test_the_webhook_secret_is_required_and_never_prints() -> None:
    missing = {k: v for k, v in BASE.items() if k != "CITYTAP_STRIPE_WEBHOOK_SECRET"}
    with pytest.raises(SettingsError) as info:
        load(Settings, missing)
    assert "CITYTAP_STRIPE_WEBHOOK_SECRET" in str(info.value)
    settings = load(Settings, BASE)
    assert "whsec_unit_test_secret_0123" not in repr(settings)
    assert settings.schema == "wallet"


def test_the_card_hash_key_never_prints() -> None:
    settings = load(Settings, BASE)
    assert KEY not in repr(settings) and KEY not in str(settings.card_hash_key)
    assert KEY not in repr(ledger_config(settings))


@pytest.mark.parametrize("bad", ["not hex", KEY[:62], "abc", KEY + "0"])
def test_a_missing_or_malformed_card_hash_key_fails_fast(bad: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(Settings, {**BASE, "CITYTAP_WALLET_CARD_HASH_KEY": bad})
    assert "CITYTAP_WALLET_CARD_HASH_KEY" in str(info.value)
    missing = {k: v for k, v in BASE.items() if k != "CITYTAP_WALLET_CARD_HASH_KEY"}
    with pytest.raises(SettingsError, match="CITYTAP_WALLET_CARD_HASH_KEY"):
        load(Settings, missing)


def test_rider_categories_floor_and_currency_are_parsed_and_checked() -> None:
    settings = load(Settings, {**BASE, "CITYTAP_WALLET_RIDER_CATEGORIES": " adult, child ,student",
                               "CITYTAP_WALLET_RIDER_FLOOR_MINOR": "-5000", "CITYTAP_WALLET_CURRENCY": "EUR"})
    assert settings.rider_categories == ("adult", "child", "student")
    assert settings.rider_floor_minor == -5000
    assert settings.currency == "EUR"
    for variable, bad in [("CITYTAP_WALLET_RIDER_CATEGORIES", "adult,adult"),
                          ("CITYTAP_WALLET_RIDER_CATEGORIES", ",,"),
                          ("CITYTAP_WALLET_RIDER_CATEGORIES", "adult,sen ior"),
                          ("CITYTAP_WALLET_RIDER_FLOOR_MINOR", "5000"),
                          ("CITYTAP_WALLET_RIDER_FLOOR_MINOR", "-1.5"),
                          ("CITYTAP_WALLET_STORED_VALUE_MAX_MINOR", "0"),
                          ("CITYTAP_WALLET_CURRENCY", "twd")]:
        with pytest.raises(SettingsError, match=variable):
            load(Settings, {**BASE, variable: bad})


def test_inconsistent_hold_ttls_are_refused_before_any_io() -> None:
    settings = load(Settings, {**BASE, "CITYTAP_WALLET_HOLD_TTL_DEFAULT_S": "100",
                               "CITYTAP_WALLET_HOLD_TTL_MAX_S": "10"})
    with pytest.raises(ValueError):
        ledger_config(settings)
