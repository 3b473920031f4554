"""Helpers for the merchant service's integration tests: a whole merchant stack in-process.

`MerchantStack` runs, against the real PostgreSQL, Kafka and stripe-mock of the test stack:

- a real wallet (ledger on a scratch schema) behind a real gRPC server;
- the settlement service's real contract book (`services.settlement.contracts.Contracts` on
  a scratch schema) behind the real settlement servicer, so the merchant fetches split
  contracts through `SettlementService.ListContracts` exactly as in production;
- the merchant service built by its own composition root (`build(settings)`), with its gRPC
  server, its outbox relay and its Stripe webhook endpoint on port 0.

All three share one settable clock, so tests can cross a service-day boundary. Test modules
import the `merchant_stack` fixture from here.
"""

from __future__ import annotations

import http.client
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from psycopg import sql

from citytap.common.v1 import credential_pb2, split_pb2
from citytap.merchant.v1 import events_pb2, merchant_pb2, merchant_pb2_grpc
from libs.grpc_client import connect
from libs.grpc_server import create_server
from libs.postgres import create_pool, migrate_folder
from libs.protos import money_pb
from libs.settings import load
from libs.stripe_webhooks import sign_payload
from services.merchant.bootstrap import build
from services.wallet.exports import LedgerExports
from services.merchant.settings import Settings
from services.settlement.contracts import Contracts
from services.settlement.domain import NewContractVersion
from services.settlement.servicer import SettlementServicer
from services.settlement.servicer import registration as settlement_registration
from services.wallet.servicer import WalletServicer
from services.wallet.servicer import registration as wallet_registration
from libs import device_credentials as dc
from libs.splits import Term
from services.wallet.deny_list import MemoryDenyList
from services.wallet.devices import DeviceConfig, Devices
from tests.integration.wallet_support import FakeClock, WalletDb, open_wallet_db

ROOT = Path(__file__).resolve().parents[2]
SETTLEMENT_MIGRATIONS = ROOT / "services" / "settlement" / "migrations"
WEBHOOK_SECRET = "whsec_citytap_merchant_test_secret_0123"
CURRENCY = "TWD"
# 2030-01-01 08:00 UTC is 16:00 in Taipei: the middle of the service day named 2030-01-01.
START = datetime(2030, 1, 1, 8, 0, tzinfo=timezone.utc)
TAIPEI = timezone(timedelta(hours=8))
CATEGORY = "5814"
# The default merchant-payment contract: the city takes 2.5 %, the platform 1.5 % plus NT$1.
CITY_BP, PLATFORM_BP, PLATFORM_FEE_MINOR = 250, 150, 100


class Clock(FakeClock):
    """A clock tests set or move; shared by the wallet, settlement and merchant."""


def card_credential(uid: bytes) -> credential_pb2.Credential:
    return credential_pb2.Credential(card_uid=uid)


def bearer(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


@dataclass
class Onboarded:
    merchant_id: str
    stripe_account_id: str
    payable_account_id: str


class MerchantStack:
    def __init__(self, dsn: str, kafka: str, stripe_api_base: str, redis_url: str, *, face_address: str = "") -> None:
        suffix = uuid.uuid4().hex[:10]
        self.dsn = dsn
        self.schemas = {"wallet": f"tw_{suffix}", "settlement": f"ts_{suffix}", "merchant": f"tm_{suffix}"}
        self.clock = Clock()
        self.wallet: WalletDb = open_wallet_db(dsn, self.schemas["wallet"], clock=self.clock)  # type: ignore[arg-type]
        # Phones: the wallet certifies device keys with this issuer and resolves their codes.
        self.issuer = dc.Issuer(dc.key_from_seed(bytes(range(32))))
        self.devices = Devices(self.wallet.pool, schema=self.schemas["wallet"],
                               config=DeviceConfig(issuer=self.issuer, token_key=bytes(range(32, 64))),
                               revocations=MemoryDenyList(), clock=self.clock)
        wallet_servicer = WalletServicer(self.wallet.ledger)
        wallet_servicer.attach_devices(self.devices)
        wallet_servicer.attach_exports(LedgerExports(self.wallet.pool, schema=self.schemas["wallet"]))
        self.wallet_server = create_server("127.0.0.1:0", [wallet_registration(wallet_servicer)],
                                           domain="wallet.citytap")
        self.wallet_server.start()
        self.wallet_server.set_serving(True)
        migrate_folder(dsn, self.schemas["settlement"], SETTLEMENT_MIGRATIONS)
        self.settlement_pool = create_pool(dsn, name="test-settlement", max_size=2)
        self.contract_book = Contracts(self.settlement_pool, schema=self.schemas["settlement"], lead_time_s=60,
                                       currency=CURRENCY, clock=self.clock)
        servicer = SettlementServicer()
        servicer.attach(contracts=self.contract_book)
        self.settlement_server = create_server("127.0.0.1:0", [settlement_registration(servicer)],
                                               domain="settlement.citytap")
        self.settlement_server.start()
        self.settlement_server.set_serving(True)
        env = {
            "CITYTAP_LISTEN_ADDRESS": "127.0.0.1:0", "CITYTAP_POSTGRES_DSN": dsn, "CITYTAP_KAFKA_BOOTSTRAP": kafka,
            "CITYTAP_WALLET_ADDRESS": f"127.0.0.1:{self.wallet_server.port}",
            "CITYTAP_SETTLEMENT_ADDRESS": f"127.0.0.1:{self.settlement_server.port}",
            "CITYTAP_STRIPE_API_BASE": stripe_api_base, "CITYTAP_STRIPE_API_KEY": "sk_test_citytap",
            "CITYTAP_MERCHANT_WEBHOOK_SECRET": WEBHOOK_SECRET, "CITYTAP_MERCHANT_SCHEMA": self.schemas["merchant"],
            "CITYTAP_MERCHANT_WALLET_TIMEOUT_MS": "5000", "CITYTAP_MERCHANT_SETTLEMENT_TIMEOUT_MS": "5000",
            # Tests make contract versions and move the clock past them at once.
            "CITYTAP_MERCHANT_CONTRACT_CACHE_TTL_S": "0",
            "CITYTAP_FACE_ADDRESS": face_address, "CITYTAP_REDIS_URL": redis_url,
            # Tests settle charges left in doubt themselves, at moments of their clock.
            "CITYTAP_MERCHANT_SETTLE_INTERVAL_S": "3600",
        }
        self.settings = load(Settings, env)
        self.app = build(self.settings, clock=self.clock)
        self.app.server.start()
        self.app.start()
        self.app.server.set_serving(True)
        self.channel = connect(f"127.0.0.1:{self.app.server.port}", default_timeout_s=10)
        self.stub = merchant_pb2_grpc.MerchantServiceStub(self.channel)
        self.pool = create_pool(dsn, name="test-merchant", max_size=2)
        # The default contract for merchant payments, in force from an hour before START.
        self.clock.set(START - timedelta(hours=2))
        self.default_contract_id = f"merchant-default-{suffix}"
        self.add_contract(self.default_contract_id, 1, "", START - timedelta(hours=1), [
            Term("CITY", "taipei-city", CITY_BP), Term("PLATFORM", "citytap", PLATFORM_BP, PLATFORM_FEE_MINOR),
            Term("MERCHANT", "", 0, 0, remainder=True)])
        self.clock.set(START)

    # --- contracts --------------------------------------------------------------------------

    def add_contract(self, contract_id: str, version: int, scope: str, effective_from: datetime,
                     terms: list[Term]) -> None:
        self.contract_book.create_version(NewContractVersion(
            contract_id=contract_id, version=version, revenue_kind="MERCHANT_PAYMENT", scope=scope,
            effective_from=effective_from, terms=tuple(terms), currency=CURRENCY, note="test"))

    # --- merchants, keys and riders ---------------------------------------------------------

    def onboard(self, merchant_id: str | None = None, **overrides: str) -> tuple[Onboarded, merchant_pb2.OnboardResponse]:
        fields = dict(merchant_id=merchant_id or str(uuid.uuid4()), name="Lin's Tea House", category=CATEGORY,
                      country="TW", email="owner@lins-tea.example", return_url="https://merchants.citytap.example/done",
                      refresh_url="https://merchants.citytap.example/again")
        fields.update(overrides)
        answer = self.stub.Onboard(merchant_pb2.OnboardRequest(**fields))
        m = answer.merchant
        return Onboarded(m.merchant_id, m.stripe_account_id, m.payable_account_id), answer

    def account_event(self, stripe_account_id: str, *, charges_enabled: bool = True, event_id: str | None = None,
                      event_type: str = "account.updated", livemode: bool = False) -> bytes:
        return json.dumps({
            "id": event_id or f"evt_{uuid.uuid4().hex[:24]}", "object": "event", "api_version": "2026-10-28.endive",
            "created": int(time.time()), "livemode": livemode, "type": event_type, "account": stripe_account_id,
            "data": {"object": {"id": stripe_account_id, "object": "account", "charges_enabled": charges_enabled,
                                "details_submitted": charges_enabled, "payouts_enabled": charges_enabled}},
        }).encode()

    def post_webhook(self, payload: bytes, signature: str | None = "sign", *, path: str = "/stripe/webhook",
                     method: str = "POST") -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.app.webhooks.port, timeout=10)  # type: ignore[attr-defined]
        headers = {"Content-Type": "application/json"}
        if signature == "sign":
            signature = sign_payload(payload, WEBHOOK_SECRET)
        if signature is not None:
            headers["Stripe-Signature"] = signature
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        return response.status, (json.loads(body)["outcome"] if body else "")

    def verified_merchant(self, **overrides: str) -> Onboarded:
        merchant, _ = self.onboard(**overrides)
        assert self.post_webhook(self.account_event(merchant.stripe_account_id)) == (200, "VERIFIED")
        return merchant

    def key(self, merchant_id: str, *scopes: str, label: str = "till 1") -> str:
        return self.stub.CreateApiKey(merchant_pb2.CreateApiKeyRequest(merchant_id=merchant_id, label=label,
                                                                       scopes=list(scopes))).secret

    def rider(self, funded_minor: int = 500_000) -> tuple[str, bytes]:
        account_id = self.wallet.rider(funded_minor=funded_minor)
        uid = uuid.uuid4().bytes[:7]
        self.wallet.ledger.link_card(account_id, uid)
        return account_id, uid

    def phone(self, account_id: str) -> tuple[str, Any, Any, str]:
        """A phone registered to the rider: (device id, device key, certificate, NFC token)."""
        device_id = f"phone-{uuid.uuid4().hex[:10]}"
        key = dc.generate_key()
        certified = self.devices.register(device_id=device_id, account_id=account_id, public_key=dc.public_bytes(key))
        return device_id, key, certified.certificate, certified.nfc_token

    def charge_with(self, secret: str, merchant_id: str, credential: credential_pb2.Credential, amount_minor: int, *,
                    order_id: str | None = None) -> merchant_pb2.Charge:
        return self.stub.Charge(merchant_pb2.ChargeRequest(
            merchant_id=merchant_id, order_id=order_id or f"order-{uuid.uuid4().hex[:12]}", credential=credential,
            amount=money_pb(amount_minor, CURRENCY), description="oolong tea"), metadata=bearer(secret)).charge

    def charge(self, secret: str, merchant_id: str, uid: bytes, amount_minor: int, *, order_id: str | None = None,
               currency: str = CURRENCY, description: str = "oolong tea") -> merchant_pb2.Charge:
        return self.stub.Charge(merchant_pb2.ChargeRequest(
            merchant_id=merchant_id, order_id=order_id or f"order-{uuid.uuid4().hex[:12]}",
            credential=card_credential(uid), amount=money_pb(amount_minor, currency), description=description),
            metadata=bearer(secret)).charge

    def refund(self, secret: str, merchant_id: str, charge_id: str, amount_minor: int, *,
               refund_id: str | None = None) -> merchant_pb2.RefundResponse:
        return self.stub.Refund(merchant_pb2.RefundRequest(
            refund_id=refund_id or f"refund-{uuid.uuid4().hex[:12]}", merchant_id=merchant_id, charge_id=charge_id,
            amount=money_pb(amount_minor, CURRENCY), note="returned"), metadata=bearer(secret))

    # --- looking inside -----------------------------------------------------------------------

    def query(self, text: str, params: Any = None) -> list[tuple]:
        with self.pool.connection() as conn:
            return conn.execute(text.replace("{m}", f'"{self.schemas["merchant"]}"'), params).fetchall()

    def snapshot(self) -> dict[str, Any]:
        """Everything a refused call must leave untouched, in the merchant service and the wallet."""
        merchant = {t: self.query(f"SELECT count(*) FROM {{m}}.{t}")[0][0]
                    for t in ("merchants", "api_keys", "charges", "refunds", "outbox_events")}
        merchant["statuses"] = self.query("SELECT id, status, refunded_minor FROM {m}.charges ORDER BY id")
        return {"merchant": merchant, "wallet": self.wallet.snapshot()}

    def events(self, merchant_id: str | None = None) -> list[events_pb2.MerchantEvent]:
        rows = self.query("SELECT payload FROM {m}.outbox_events ORDER BY seq")
        found = [events_pb2.MerchantEvent.FromString(bytes(r[0])) for r in rows]
        return [e for e in found if merchant_id is None or e.account_key == merchant_id]

    def transfers(self, prefix: str) -> list[tuple]:
        """(id, debit, credit, amount, kind, corrects) of the wallet transfers whose id starts with `prefix`."""
        return self.wallet.query("SELECT id, debit_account_id, credit_account_id, amount_minor, kind,"
                                 " corrects_transfer_id FROM {s}.transfers WHERE id LIKE %s ORDER BY seq",
                                 (prefix + "%",))

    def balance(self, account_id: str) -> int:
        return self.wallet.balance(account_id)[0]

    def close(self) -> None:
        self.channel.close()
        self.app.server.stop(0)
        self.app.close()
        self.settlement_server.stop(0)
        self.wallet_server.stop(0)
        self.pool.close()
        self.settlement_pool.close()
        self.wallet.pool.close()
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for schema in self.schemas.values():
                conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def party_totals(lines: Any) -> dict[tuple[int, str], int]:
    totals: dict[tuple[int, str], int] = {}
    for line in lines:
        key = (line.party, line.party_id)
        totals[key] = totals.get(key, 0) + line.amount.amount_minor
    return totals


PARTY_CITY = split_pb2.PARTY_CITY
PARTY_PLATFORM = split_pb2.PARTY_PLATFORM
PARTY_MERCHANT = split_pb2.PARTY_MERCHANT


@pytest.fixture(scope="module")
def merchant_stack(postgres_dsn: str, kafka_bootstrap: str, stripe_api_base: str,
                   redis_url: str) -> Iterator[MerchantStack]:
    stack = MerchantStack(postgres_dsn, kafka_bootstrap, stripe_api_base, redis_url)
    yield stack
    stack.close()


def expect_error(call: Any, request: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str | None, dict[str, str]]:
    """Call and expect a failure; return its status code, ErrorInfo reason and metadata."""
    from libs.grpc_client import error_info
    with pytest.raises(grpc.RpcError) as info:
        call(request, **kwargs)
    detail = error_info(info.value)
    return info.value.code(), (detail.reason if detail else None), (dict(detail.metadata) if detail else {})
