"""A FAKE fare gate and a FAKE wallet, in process, for testing the emulator (and a gate).

These stand in for the real services' APIs; they are not the fare gate. They keep just
enough state to answer like it: riders with a balance, cards linked to them, open journeys,
and answers that follow the contract (`TapResponse` with a decision and a reason, errors as
gRPC statuses with an ErrorInfo reason through `libs.grpc_server`). Fares are flat and
invented: `FLAT_FARE_MINOR` per exit, `MAX_FARE_MINOR` held per entry.

    bank = FakeBank()
    server, gate, wallet = serve_fakes(bank)        # bound on 127.0.0.1, port 0
    ... FareGateClient(f"127.0.0.1:{server.port}", deadline_s=1) ...
    server.stop(0)

Knobs for tests: `gate.fail_every` (every n-th tap fails with UNAVAILABLE and reason
UNAVAILABLE), `gate.delay_s` (every tap sleeps first, to provoke DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc

from citytap.common.v1 import money_pb2
from citytap.fare_gate.v1 import fare_gate_pb2, fare_gate_pb2_grpc
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs import errors
from libs.grpc_server import Registration, Server, create_server

CURRENCY = "TWD"
MAX_FARE_MINOR = 6500
FLAT_FARE_MINOR = 2000
BUS_FARE_MINOR = 1500


@dataclass
class FakeBank:
    """Balances and cards shared by the fake wallet and the fake fare gate."""

    balances: dict[str, int] = field(default_factory=dict)  # account id -> available minor units
    categories: dict[str, str] = field(default_factory=dict)
    cards: dict[bytes, str] = field(default_factory=dict)  # card UID -> account id
    funded: set[str] = field(default_factory=set)  # funding ids already applied
    lock: threading.Lock = field(default_factory=threading.Lock)

    def credit(self, account_id: str, amount_minor: int, funding_id: str) -> None:
        """A funder for `--fund`: credits an account (once per funding id)."""
        with self.lock:
            if account_id not in self.balances:
                raise KeyError(f"no account {account_id}")
            if funding_id in self.funded:
                return
            self.funded.add(funding_id)
            self.balances[account_id] += amount_minor

    def add_rider(self, account_id: str, card_uid: bytes, balance_minor: int) -> None:
        with self.lock:
            self.balances[account_id] = balance_minor
            self.cards[card_uid] = account_id


def _money(amount_minor: int) -> money_pb2.Money:
    return money_pb2.Money(amount_minor=amount_minor, currency=CURRENCY)


class FakeFareGateServicer(fare_gate_pb2_grpc.FareGateServiceServicer):
    """A FAKE FareGateService: flat fares, one journey per card, tap ids idempotent."""

    def __init__(self, bank: FakeBank, gates: dict[str, str] | None = None) -> None:
        self.bank = bank
        self.gates = dict(gates or {})
        self.fail_every = 0
        self.delay_s = 0.0
        self.taps_seen = 0
        self._answers: dict[str, tuple[bytes, fare_gate_pb2.TapResponse]] = {}
        self._inside: dict[str, str] = {}  # account id -> journey id
        self._journeys = itertools.count(1)
        self._lock = threading.Lock()

    def Tap(self, request: fare_gate_pb2.TapRequest, context: grpc.ServicerContext) -> fare_gate_pb2.TapResponse:
        with self._lock:
            self.taps_seen += 1
            seen = self.taps_seen
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_every and seen % self.fail_every == 0:
            raise errors.Unavailable("UNAVAILABLE", "the fake fare gate fails this tap on purpose")
        try:
            uuid.UUID(request.tap_id)
        except ValueError:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "tap_id must be a UUID", field="tap_id") from None
        if request.direction == fare_gate_pb2.TAP_DIRECTION_UNSPECIFIED:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "direction is required", field="direction")
        payload = request.SerializeToString(deterministic=True)
        with self._lock, self.bank.lock:
            earlier = self._answers.get(request.tap_id)
            if earlier is not None:
                if earlier[0] != payload:
                    raise errors.Conflict("IDEMPOTENCY_CONFLICT", f"tap {request.tap_id} was sent with another payload")
                return earlier[1]
            response = self._decide(request)
            self._answers[request.tap_id] = (payload, response)
            return response

    def _decide(self, request: fare_gate_pb2.TapRequest) -> fare_gate_pb2.TapResponse:
        deny = fare_gate_pb2.TAP_DECISION_DENY
        account_id = self.bank.cards.get(request.credential.card_uid)
        if account_id is None:
            return fare_gate_pb2.TapResponse(decision=deny, reason=fare_gate_pb2.TAP_REASON_DENIED_UNKNOWN_CREDENTIAL)
        balance = self.bank.balances[account_id]
        if request.direction == fare_gate_pb2.TAP_DIRECTION_ENTRY:
            if account_id in self._inside:
                return fare_gate_pb2.TapResponse(decision=deny, reason=fare_gate_pb2.TAP_REASON_DENIED_PASSBACK,
                                                 balance=_money(balance))
            if balance < MAX_FARE_MINOR:
                return fare_gate_pb2.TapResponse(decision=deny, reason=fare_gate_pb2.TAP_REASON_DENIED_INSUFFICIENT_BALANCE,
                                                 balance=_money(balance))
            journey_id = f"fake-journey-{next(self._journeys)}"
            self._inside[account_id] = journey_id
            self.bank.balances[account_id] = balance - MAX_FARE_MINOR
            return fare_gate_pb2.TapResponse(decision=fare_gate_pb2.TAP_DECISION_OPEN, reason=fare_gate_pb2.TAP_REASON_OK,
                                             fare_charged=_money(0), amount_held=_money(MAX_FARE_MINOR),
                                             balance=_money(balance - MAX_FARE_MINOR), journey_id=journey_id)
        if request.direction == fare_gate_pb2.TAP_DIRECTION_EXIT:
            journey_id = self._inside.pop(account_id, None)
            if journey_id is None:
                return fare_gate_pb2.TapResponse(decision=deny, reason=fare_gate_pb2.TAP_REASON_DENIED_NO_ENTRY,
                                                 balance=_money(balance))
            balance += MAX_FARE_MINOR - FLAT_FARE_MINOR
            self.bank.balances[account_id] = balance
            return fare_gate_pb2.TapResponse(decision=fare_gate_pb2.TAP_DECISION_OPEN, reason=fare_gate_pb2.TAP_REASON_OK,
                                             fare_charged=_money(FLAT_FARE_MINOR), amount_held=_money(0),
                                             balance=_money(balance), journey_id=journey_id)
        if balance < BUS_FARE_MINOR:
            return fare_gate_pb2.TapResponse(decision=deny, reason=fare_gate_pb2.TAP_REASON_DENIED_INSUFFICIENT_BALANCE,
                                             balance=_money(balance))
        self.bank.balances[account_id] = balance - BUS_FARE_MINOR
        return fare_gate_pb2.TapResponse(decision=fare_gate_pb2.TAP_DECISION_OPEN, reason=fare_gate_pb2.TAP_REASON_OK,
                                         fare_charged=_money(BUS_FARE_MINOR), amount_held=_money(0),
                                         balance=_money(balance - BUS_FARE_MINOR),
                                         journey_id=f"fake-journey-{next(self._journeys)}")

    def GetGateConfig(self, request: fare_gate_pb2.GetGateConfigRequest,
                      context: grpc.ServicerContext) -> fare_gate_pb2.GetGateConfigResponse:
        stop_id = self.gates.get(request.gate_id)
        if stop_id is None:
            raise errors.NotFound("NOT_FOUND", f"no gate {request.gate_id!r}", gate_id=request.gate_id)
        return fare_gate_pb2.GetGateConfigResponse(config=fare_gate_pb2.GateConfig(
            gate_id=request.gate_id, stop_id=stop_id, kind=fare_gate_pb2.GATE_KIND_STATION_GATE, tap_deadline_ms=300,
            bundle_refresh_interval_s=300, offline_upload_batch_max=500, time_zone="Asia/Taipei"))

    def QuoteFare(self, request: fare_gate_pb2.QuoteFareRequest,
                  context: grpc.ServicerContext) -> fare_gate_pb2.QuoteFareResponse:
        stops = set(self.gates.values())
        for name in ("from_stop_id", "to_stop_id"):
            if getattr(request, name) not in stops:
                raise errors.InvalidArgument("INVALID_ARGUMENT", f"unknown stop {getattr(request, name)!r}", field=name)
        return fare_gate_pb2.QuoteFareResponse(fare=_money(FLAT_FARE_MINOR), fare_product_id="fake_flat")


class FakeWalletServicer(wallet_pb2_grpc.WalletServiceServicer):
    """A FAKE WalletService with only what rider setup calls: CreateAccount and LinkCard."""

    def __init__(self, bank: FakeBank) -> None:
        self.bank = bank

    def CreateAccount(self, request: wallet_pb2.CreateAccountRequest,
                      context: grpc.ServicerContext) -> wallet_pb2.CreateAccountResponse:
        with self.bank.lock:
            self.bank.balances.setdefault(request.account_id, 0)
            self.bank.categories[request.account_id] = request.rider_category
        return wallet_pb2.CreateAccountResponse(account=wallet_pb2.Account(
            account_id=request.account_id, kind=wallet_pb2.ACCOUNT_KIND_RIDER_WALLET,
            status=wallet_pb2.ACCOUNT_STATUS_ACTIVE, currency=CURRENCY, rider_category=request.rider_category))

    def LinkCard(self, request: wallet_pb2.LinkCardRequest, context: grpc.ServicerContext) -> wallet_pb2.LinkCardResponse:
        with self.bank.lock:
            if request.account_id not in self.bank.balances:
                raise errors.NotFound("UNKNOWN_ACCOUNT", f"no account {request.account_id}")
            owner = self.bank.cards.get(request.card_uid)
            if owner is not None and owner != request.account_id:
                raise errors.Conflict("CREDENTIAL_IN_USE", "the card is linked to another account")
            self.bank.cards[request.card_uid] = request.account_id
        return wallet_pb2.LinkCardResponse(card=wallet_pb2.LinkedCard(card_id=f"card-{request.card_uid.hex()}",
                                                                      label=request.label))


def serve_fakes(bank: FakeBank, *, gates: dict[str, str] | None = None,
                address: str = "127.0.0.1:0") -> tuple[Server, FakeFareGateServicer, FakeWalletServicer]:
    """Start a server with the fake fare gate and the fake wallet; the caller stops it."""
    gate = FakeFareGateServicer(bank, gates)
    wallet = FakeWalletServicer(bank)
    server = create_server(address, [
        Registration(fare_gate_pb2_grpc.add_FareGateServiceServicer_to_server, gate,
                     fare_gate_pb2.DESCRIPTOR.services_by_name["FareGateService"].full_name),
        Registration(wallet_pb2_grpc.add_WalletServiceServicer_to_server, wallet,
                     wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name),
    ], domain="fake.citytap", max_workers=32)
    server.start()
    server.set_serving(True)
    return server, gate, wallet
