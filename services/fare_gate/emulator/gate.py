"""The emulator's one I/O seam: gRPC clients of the fare gate and (for rider setup) the wallet.

Every call carries a deadline: single calls go through `libs.grpc_client.connect`, whose
channel gives each call the default deadline, and calls sent without waiting pass theirs
explicitly. A failed call becomes `CallFailed`, which names the address, the method, the
gRPC status and the ErrorInfo reason, and says plainly when the server could not be reached
at all.

Calls sent without waiting (the load mode) go through `grpc.aio` on an event loop of their
own thread (`_AioLoop`). The synchronous API's futures were measured first: each call
started a thread of its own to wait on the channel, and at 800 calls/s on the 2-core box
the sender fell hundreds of milliseconds behind (p50 80-200 ms against a fake server that
answers in 1 ms), while the event loop kept p50 at 2-4 ms with the same CPU.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from citytap.common.v1 import credential_pb2
from citytap.fare_gate.v1 import fare_gate_pb2, fare_gate_pb2_grpc
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs.grpc_client import connect, error_reason
from libs.protos import timestamp_pb

DIRECTIONS = {
    "entry": fare_gate_pb2.TAP_DIRECTION_ENTRY,
    "exit": fare_gate_pb2.TAP_DIRECTION_EXIT,
    "validate": fare_gate_pb2.TAP_DIRECTION_VALIDATE,
}
SETUP_ATTEMPTS_MAX = 3  # setup writes are retried with the same ids, so retries are idempotent
SETUP_RETRY_BACKOFF_S = 0.2
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
# Tap ids are UUIDs (the contract says so). The emulator derives them from a run id and a
# label in its own namespace, so a scenario's retry (same label) sends the same id again.
TAP_ID_NAMESPACE = uuid.UUID("3c0f5b1e-7d2a-5e8c-9b41-6a2d8e0f7c13")


def tap_id_for(run_id: str, label: str) -> str:
    """The tap id of tap `label` of run `run_id`: a UUID, the same for the same pair."""
    return str(uuid.uuid5(TAP_ID_NAMESPACE, f"{run_id}/{label}"))


def enum_label(enum: Any, value: int, prefix: str) -> str:
    """TAP_REASON_DENIED_PASSBACK -> DENIED_PASSBACK; an unknown number prints as the number."""
    try:
        return enum.Name(value).removeprefix(prefix)
    except ValueError:
        return str(value)


def tap_reason_names() -> set[str]:
    return {name.removeprefix("TAP_REASON_") for name in fare_gate_pb2.TapReason.keys()}


class CallFailed(Exception):
    """A call that did not get an answer: its status, reason and message, and where it went."""

    def __init__(self, *, service: str, address: str, method: str, code: str, reason: str, message: str) -> None:
        self.service = service
        self.address = address
        self.method = method
        self.code = code
        self.reason = reason
        self.message = message
        super().__init__(self.describe())

    @property
    def unreachable(self) -> bool:
        """No server answered: nothing listens there, or it did not answer before the deadline
        without ever connecting. A server's own UNAVAILABLE carries a reason."""
        return self.code == "UNAVAILABLE" and not self.reason

    def describe(self) -> str:
        if self.unreachable:
            return (f"cannot reach the {self.service} at {self.address} ({self.method}: UNAVAILABLE: {self.message}); "
                    f"is the stack up (`make up`), and is the address right?")
        reason = f" reason {self.reason}" if self.reason else ""
        return f"{self.service} {self.method} at {self.address} failed: {self.code}{reason}: {self.message}"


def call_failed(error: grpc.RpcError, *, service: str, address: str, method: str) -> CallFailed:
    code = error.code() if callable(getattr(error, "code", None)) else None
    try:
        reason = error_reason(error) or ""
    except Exception:  # noqa: BLE001 - status details we cannot decode leave the reason empty
        reason = ""
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return CallFailed(service=service, address=address, method=method, code=code.name if code else type(error).__name__,
                      reason=reason, message=details or "")


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    if moment.tzinfo is None:
        raise ValueError("times sent to the fare gate must be timezone-aware")
    return timestamp_pb(moment)


def tap_request(*, tap_id: str, gate_id: str, stop_id: str, direction: str, card_uid: bytes, tapped_at: datetime,
                route_id: str = "") -> fare_gate_pb2.TapRequest:
    return fare_gate_pb2.TapRequest(
        tap_id=tap_id, gate_id=gate_id, stop_id=stop_id, direction=DIRECTIONS[direction],
        tapped_at=timestamp(tapped_at), credential=credential_pb2.Credential(card_uid=card_uid), route_id=route_id)


@dataclass(frozen=True)
class TapReply:
    """A tap's answer in plain values."""

    decision: str  # OPEN, DENY, or UNSPECIFIED (which a gate treats as a denial)
    reason: str  # OK, DENIED_PASSBACK...
    fare_minor: int
    held_minor: int
    balance_minor: int | None  # None when no account was found
    currency: str
    journey_id: str

    @classmethod
    def from_proto(cls, response: fare_gate_pb2.TapResponse) -> TapReply:
        currency = (response.fare_charged.currency or response.amount_held.currency or response.balance.currency)
        return cls(
            decision=enum_label(fare_gate_pb2.TapDecision, response.decision, "TAP_DECISION_"),
            reason=enum_label(fare_gate_pb2.TapReason, response.reason, "TAP_REASON_"),
            fare_minor=response.fare_charged.amount_minor,
            held_minor=response.amount_held.amount_minor,
            balance_minor=response.balance.amount_minor if response.HasField("balance") else None,
            currency=currency,
            journey_id=response.journey_id,
        )

    @property
    def opens(self) -> bool:
        return self.decision == "OPEN"


# on_done(reply, failure): exactly one of the two is set.
TapCallback = Callable[[TapReply | None, CallFailed | None], None]
AnyCallback = Callable[[Any, CallFailed | None], None]
AIO_START_TIMEOUT_S = 5.0
AIO_STOP_TIMEOUT_S = 5.0


class _AioLoop:
    """An asyncio event loop on its own thread with a `grpc.aio` channel, for calls that
    are sent without waiting. `submit` may be called from any thread."""

    def __init__(self, address: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulator-aio", daemon=True)
        self._thread.start()
        self._tasks: set[asyncio.Task[None]] = set()  # strong references: the loop keeps only weak ones
        self.channel, self.fare_gate, self.health = asyncio.run_coroutine_threadsafe(
            self._open(address), self._loop).result(timeout=AIO_START_TIMEOUT_S)

    @staticmethod
    async def _open(address: str) -> tuple[Any, Any, Any]:
        channel = grpc.aio.insecure_channel(address)
        return channel, fare_gate_pb2_grpc.FareGateServiceStub(channel), health_pb2_grpc.HealthStub(channel)

    def submit(self, make: Callable[[], Awaitable[None]]) -> None:
        def start() -> None:
            task = self._loop.create_task(make())  # type: ignore[arg-type]
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        self._loop.call_soon_threadsafe(start)

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.channel.close(grace=None), self._loop).result(timeout=AIO_STOP_TIMEOUT_S)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=AIO_STOP_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()


class FareGateClient:
    """Calls of a gate (or a gate emulator) to the fare gate service."""

    service = "fare gate"

    def __init__(self, address: str, *, deadline_s: float) -> None:
        self.address = address
        self.deadline_s = deadline_s
        self._channel = connect(address, default_timeout_s=deadline_s)
        self._stub = fare_gate_pb2_grpc.FareGateServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._aio: _AioLoop | None = None  # opened by the first call sent without waiting
        self._aio_lock = threading.Lock()

    def close(self) -> None:
        self._channel.close()
        if self._aio is not None:
            self._aio.close()
            self._aio = None

    def _aio_loop(self) -> _AioLoop:
        with self._aio_lock:
            if self._aio is None:
                self._aio = _AioLoop(self.address)
            return self._aio

    def __enter__(self) -> FareGateClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except grpc.RpcError as exc:
            raise call_failed(exc, service=self.service, address=self.address, method=method) from None

    def tap(self, request: fare_gate_pb2.TapRequest) -> tuple[TapReply, float]:
        """One tap; returns the answer and the round trip in milliseconds."""
        started = time.perf_counter()
        response = self._call("Tap", lambda: self._stub.Tap(request))
        return TapReply.from_proto(response), (time.perf_counter() - started) * 1000.0

    def tap_async(self, request: fare_gate_pb2.TapRequest, on_done: TapCallback) -> None:
        """Send a tap without waiting; `on_done` runs on the event loop's thread when it ends."""
        aio = self._aio_loop()
        self._async(aio, "Tap", aio.fare_gate.Tap, request, TapReply.from_proto, on_done)

    def gate_config_async(self, gate_id: str, on_done: AnyCallback) -> None:
        aio = self._aio_loop()
        self._async(aio, "GetGateConfig", aio.fare_gate.GetGateConfig,
                    fare_gate_pb2.GetGateConfigRequest(gate_id=gate_id), lambda response: response, on_done)

    def health_async(self, on_done: AnyCallback) -> None:
        aio = self._aio_loop()
        self._async(aio, "Health/Check", aio.health.Check, health_pb2.HealthCheckRequest(), lambda response: response,
                    on_done)

    def _async(self, aio: _AioLoop, method: str, multicallable: Any, request: Any, convert: Callable[[Any], Any],
               on_done: AnyCallback) -> None:
        deadline_s = self.deadline_s

        async def call() -> None:
            try:
                response = await multicallable(request, timeout=deadline_s)
            except grpc.aio.AioRpcError as exc:
                on_done(None, call_failed(exc, service=self.service, address=self.address, method=method))
                return
            except asyncio.CancelledError:
                on_done(None, CallFailed(service=self.service, address=self.address, method=method, code="CANCELLED",
                                         reason="", message="cancelled by the client"))
                raise
            on_done(convert(response), None)

        aio.submit(call)

    def gate_config(self, gate_id: str) -> fare_gate_pb2.GateConfig:
        response = self._call("GetGateConfig", lambda: self._stub.GetGateConfig(
            fare_gate_pb2.GetGateConfigRequest(gate_id=gate_id)))
        return response.config

    def quote(self, request: fare_gate_pb2.QuoteFareRequest) -> fare_gate_pb2.QuoteFareResponse:
        return self._call("QuoteFare", lambda: self._stub.QuoteFare(request))

    def health(self) -> str:
        """SERVING, NOT_SERVING... of the whole server; raises CallFailed when unreachable."""
        response = self._call("Health/Check", lambda: self._health.Check(health_pb2.HealthCheckRequest()))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class WalletClient:
    """The wallet calls that set riders up: open an account, link a card."""

    service = "wallet"

    def __init__(self, address: str, *, deadline_s: float) -> None:
        self.address = address
        self._channel = connect(address, default_timeout_s=deadline_s)
        self._stub = wallet_pb2_grpc.WalletServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _write(self, method: str, call: Callable[[], Any]) -> Any:
        for attempt in range(1, SETUP_ATTEMPTS_MAX + 1):
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE or attempt == SETUP_ATTEMPTS_MAX:
                    raise call_failed(exc, service=self.service, address=self.address, method=method) from None
                time.sleep(SETUP_RETRY_BACKOFF_S * attempt)
        raise AssertionError("unreachable")

    def create_rider(self, account_id: str, rider_category: str) -> None:
        request = wallet_pb2.CreateAccountRequest(account_id=account_id, kind=wallet_pb2.ACCOUNT_KIND_RIDER_WALLET,
                                                  rider_category=rider_category)
        self._write("CreateAccount", lambda: self._stub.CreateAccount(request))

    def link_card(self, account_id: str, card_uid: bytes, label: str) -> None:
        request = wallet_pb2.LinkCardRequest(account_id=account_id, card_uid=card_uid, label=label)
        self._write("LinkCard", lambda: self._stub.LinkCard(request))

    def available_minor(self, account_id: str) -> int:
        response = self._write("GetBalance", lambda: self._stub.GetBalance(
            wallet_pb2.GetBalanceRequest(account_id=account_id)))
        return response.available.amount_minor
