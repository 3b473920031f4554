"""Settings load typed values and name every missing or malformed variable at once."""

from __future__ import annotations

import dataclasses

import pytest

from libs.settings import SettingsError, host_port, host_port_list, load, positive_int, setting, url
from services.wallet.settings import Settings as WalletSettings


@dataclasses.dataclass(frozen=True)
class Example:
    address: str = setting("EX_ADDRESS", host_port)
    brokers: str = setting("EX_BROKERS", host_port_list)
    workers: int = setting("EX_WORKERS", positive_int, default=4)
    db: str = setting("EX_DB", url("postgresql"))


GOOD = {"EX_ADDRESS": "127.0.0.1:50052", "EX_BROKERS": "a:1, b:2", "EX_DB": "postgresql://x@h/db"}


def test_loads_typed_values_and_defaults() -> None:
    loaded = load(Example, GOOD)
    assert loaded == Example(address="127.0.0.1:50052", brokers="a:1,b:2", workers=4, db="postgresql://x@h/db")
    assert load(Example, {**GOOD, "EX_WORKERS": "9"}).workers == 9


def test_every_problem_is_named_together() -> None:
    with pytest.raises(SettingsError) as info:
        load(Example, {"EX_ADDRESS": "nonsense", "EX_WORKERS": "0", "EX_DB": "mysql://x"})
    text = str(info.value)
    for name in ("EX_ADDRESS", "EX_BROKERS", "EX_WORKERS", "EX_DB"):
        assert name in text
    assert len(info.value.problems) == 4


@pytest.mark.parametrize("bad", ["", "host", "host:", ":80", "host:99999", "a b:1"])
def test_host_port_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        host_port(bad)


def test_a_real_service_settings_class_reports_missing_variables() -> None:
    with pytest.raises(SettingsError) as info:
        load(WalletSettings, {})
    for name in ("CITYTAP_LISTEN_ADDRESS", "CITYTAP_POSTGRES_DSN", "CITYTAP_KAFKA_BOOTSTRAP", "CITYTAP_REDIS_URL",
                 "CITYTAP_STRIPE_API_BASE", "CITYTAP_STRIPE_API_KEY"):
        assert name in str(info.value)
    assert "CITYTAP_LOG_LEVEL" not in str(info.value)  # it has a default


def test_int_between_takes_both_edges_and_names_the_range() -> None:
    from libs.settings import int_between

    parse = int_between(1, 1000, "ms")
    assert (parse("1"), parse("1000")) == (1, 1000)
    for bad, message in (("0", "1 or greater"), ("1001", "at most 1000 ms"), ("2.5", "whole number")):
        with pytest.raises(ValueError, match=message):
            parse(bad)
