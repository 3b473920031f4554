"""Helpers for settlement's integration tests: the service built by its own composition root
on a scratch schema of the real PostgreSQL, the real Kafka and stripe-mock, with a clock the
test moves, served in-process on port 0.

Test modules import the fixtures they use from here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest

from citytap.settlement.v1 import settlement_pb2_grpc
from libs.grpc_client import connect
from libs.settings import load
from services.settlement.bootstrap import build
from services.settlement.settings import Settings
from tests.integration.wallet_support import FakeClock as WalletFakeClock

# 2030-01-01 12:00 Asia/Taipei: the middle of service day 2030-01-01.
START = datetime(2030, 1, 1, 4, 0, tzinfo=timezone.utc)


class FakeClock(WalletFakeClock):
    """A clock tests set or move by hand, starting at this module's START."""

    def __init__(self, start: datetime = START) -> None:
        super().__init__(start)


def settlement_settings(schema: str, tmp_path: Path, **overrides: str) -> Settings:
    env = {
        "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0",
        "CITYTAP_POSTGRES_DSN": os.environ.get("CITYTAP_POSTGRES_DSN", ""),
        "CITYTAP_KAFKA_BOOTSTRAP": os.environ.get("CITYTAP_KAFKA_BOOTSTRAP", ""),
        "CITYTAP_STRIPE_API_BASE": os.environ.get("CITYTAP_STRIPE_API_BASE", ""),
        "CITYTAP_STRIPE_API_KEY": os.environ.get("CITYTAP_STRIPE_API_KEY", "sk_test_citytap"),
        "CITYTAP_WALLET_ADDRESS": "127.0.0.1:1",
        "CITYTAP_SETTLEMENT_SCHEMA": schema,
        "CITYTAP_SETTLEMENT_REPORT_DIR": str(tmp_path / "reports"),
        "CITYTAP_SETTLEMENT_EXPORT_DIR": str(tmp_path / "exports"),
        "CITYTAP_SETTLEMENT_PARTY_ACCOUNTS": "CITY:city=acct_1City,TRANSIT_OPERATOR:metro=acct_1Metro",
        "CITYTAP_OUTBOX_RELAY_IN_PROCESS": "false",
    }
    for name in ("CITYTAP_POSTGRES_DSN", "CITYTAP_KAFKA_BOOTSTRAP", "CITYTAP_STRIPE_API_BASE"):
        if not env[name]:
            pytest.fail(f"{name} is not set: run the integration tier through `make test`, which starts the stack")
    env.update(overrides)
    return load(Settings, env)


@dataclass
class Running:
    """A built, started settlement app with a client stub."""

    app: Any
    clock: FakeClock
    stub: settlement_pb2_grpc.SettlementServiceStub
    channel: grpc.Channel
    settings: Settings


def start_settlement(schema: str, tmp_path: Path, *, clock: FakeClock | None = None, ledger_reader: Any = None,
                     consume: bool = False, **overrides: str) -> Running:
    clock = clock or FakeClock()
    settings = settlement_settings(schema, tmp_path, **overrides)
    app = build(settings, clock=clock, ledger_reader=ledger_reader, consume=consume)
    app.server.start()
    app.start()
    app.server.set_serving(True)
    channel = connect(f"127.0.0.1:{app.server.port}", default_timeout_s=30)
    return Running(app, clock, settlement_pb2_grpc.SettlementServiceStub(channel), channel, settings)


def stop_settlement(running: Running) -> None:
    running.channel.close()
    running.app.server.stop(0)
    running.app.close()


@pytest.fixture()
def settlement(scratch_schema: str, tmp_path: Path) -> Iterator[Running]:
    running = start_settlement(scratch_schema, tmp_path)
    yield running
    stop_settlement(running)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
