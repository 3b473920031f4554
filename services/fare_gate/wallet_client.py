"""The wallet, as the tap path sees it: the only module of fare-gate that calls the wallet.

Each method makes one gRPC call with the configured deadline and turns the answer into
plain values. The wallet's refusals that the tap path decides on arrive as `WalletRefusal`
with the wallet's machine-readable reason (INSUFFICIENT_FUNDS, ACCOUNT_BLOCKED,
HOLD_EXPIRED, ...). A wallet that does not answer in time, or answers UNAVAILABLE, raises
`libs.errors.Unavailable`: the gate may retry the same tap id, and every write here uses
an id derived from that tap id, so the retry repeats the same wallet operation instead of
adding a second one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import grpc

from citytap.common.v1 import credential_pb2, money_pb2, split_pb2
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs import errors
from libs.grpc_client import error_info
from libs.protos import timestamp_pb
from services.fare_gate.fare_split import FarePlan

_RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


class WalletRefusal(Exception):
    """The wallet refused a call; `reason` is its ErrorInfo reason (or the status code's name)."""

    def __init__(self, reason: str, code: grpc.StatusCode, message: str, metadata: dict[str, str]) -> None:
        self.reason = reason
        self.code = code
        self.metadata = metadata
        super().__init__(f"{reason}: {message}")


@dataclass(frozen=True, slots=True)
class Resolution:
    account_id: str
    blocked: bool
    rider_category: str  # empty: the feed's default category


@dataclass(frozen=True, slots=True)
class HoldState:
    hold_id: str
    status: int  # wallet_pb2.HoldStatus
    amount_minor: int
    posted_amount_minor: int
    debit_available_minor: int | None = None  # the rider's available balance as the call returned

    @property
    def pending(self) -> bool:
        return self.status == wallet_pb2.HOLD_STATUS_PENDING


@dataclass(frozen=True, slots=True)
class PostedTransfer:
    transfer_id: str
    rider_available_minor: dict[str, int]  # each rider wallet the transfer touched, as the call returned


@dataclass(frozen=True, slots=True)
class AccountInfo:
    account_id: str
    kind: int  # wallet_pb2.AccountKind
    currency: str


class WalletClient:
    """Calls to the wallet, each bounded by `timeout_s`."""

    def __init__(self, channel: grpc.Channel, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._stub = wallet_pb2_grpc.WalletServiceStub(channel)
        self._timeout_s = timeout_s

    def _call(self, method: str, request: object, *, timeout_s: float | None = None) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=timeout_s or self._timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            info = error_info(exc)
            reason = info.reason if info is not None else code.name
            message = exc.details() or ""  # type: ignore[attr-defined]
            if code in _RETRYABLE or reason == "UNAVAILABLE":
                raise errors.Unavailable("UNAVAILABLE", f"the wallet did not complete {method}: {code.name} {message}",
                                         dependency="wallet") from exc
            raise WalletRefusal(reason, code, message, dict(info.metadata) if info is not None else {}) from exc

    # --- reads ----------------------------------------------------------------------------

    def resolve_card(self, card_uid: bytes) -> Resolution | None:
        """The account a card is linked to, or None when it is linked to none."""
        request = wallet_pb2.ResolveCredentialRequest(credential=credential_pb2.Credential(card_uid=card_uid))
        try:
            answer = self._call("ResolveCredential", request)
        except WalletRefusal as refusal:
            if refusal.reason == "UNKNOWN_CREDENTIAL":
                return None
            raise
        assert isinstance(answer, wallet_pb2.ResolveCredentialResponse)
        return Resolution(answer.account_id, answer.status == wallet_pb2.ACCOUNT_STATUS_BLOCKED, answer.rider_category)

    def available_minor(self, account_id: str) -> int:
        """What the account can still spend: balance less holds."""
        answer = self._call("GetBalance", wallet_pb2.GetBalanceRequest(account_id=account_id))
        assert isinstance(answer, wallet_pb2.GetBalanceResponse)
        return answer.available.amount_minor

    def account(self, account_id: str, *, timeout_s: float | None = None) -> AccountInfo:
        answer = self._call("GetAccount", wallet_pb2.GetAccountRequest(account_id=account_id), timeout_s=timeout_s)
        assert isinstance(answer, wallet_pb2.GetAccountResponse)
        return AccountInfo(answer.account.account_id, answer.account.kind, answer.account.currency)

    # --- writes (ids derived from tap ids, so retries repeat rather than add) --------------

    def create_hold(self, *, hold_id: str, debit_account_id: str, credit_account_id: str, amount_minor: int,
                    currency: str, expires_at: datetime, reference: str) -> HoldState:
        request = wallet_pb2.CreateHoldRequest(
            hold_id=hold_id, debit_account_id=debit_account_id, credit_account_id=credit_account_id,
            amount=money_pb2.Money(amount_minor=amount_minor, currency=currency), kind=wallet_pb2.TRANSFER_KIND_FARE,
            expires_at=timestamp_pb(expires_at), reference=reference)
        answer = self._call("CreateHold", request)
        assert isinstance(answer, wallet_pb2.CreateHoldResponse)
        return _hold(answer.hold, answer)

    def post_hold(self, *, hold_id: str, amount_minor: int, currency: str, plan: FarePlan | None = None) -> HoldState:
        """Post the hold for the fare; with a plan, its split lines go on the fare's transfer
        and its share moves are posted in the same wallet transaction."""
        request = wallet_pb2.PostHoldRequest(hold_id=hold_id,
                                             amount=money_pb2.Money(amount_minor=amount_minor, currency=currency))
        if plan is not None:
            request.splits.extend(_lines(plan, currency))
            request.linked_transfers.extend(_moves(plan, currency, reference=hold_id))
        answer = self._call("PostHold", request)
        assert isinstance(answer, wallet_pb2.PostHoldResponse)
        return _hold(answer.hold, answer)

    def void_hold(self, *, hold_id: str) -> HoldState:
        answer = self._call("VoidHold", wallet_pb2.VoidHoldRequest(hold_id=hold_id))
        assert isinstance(answer, wallet_pb2.VoidHoldResponse)
        return _hold(answer.hold, answer)

    def transfer(self, *, transfer_id: str, debit_account_id: str, credit_account_id: str, amount_minor: int,
                 currency: str, reference: str, corrects_transfer_id: str = "",
                 plan: FarePlan | None = None) -> PostedTransfer:
        """Post one transfer: a fare (rider to revenue) or, when it corrects one, a refund;
        with a plan, carrying its split lines, with its share moves linked to it."""
        kind = wallet_pb2.TRANSFER_KIND_CORRECTION if corrects_transfer_id else wallet_pb2.TRANSFER_KIND_FARE
        transfer = wallet_pb2.Transfer(
            transfer_id=transfer_id, debit_account_id=debit_account_id, credit_account_id=credit_account_id,
            amount=money_pb2.Money(amount_minor=amount_minor, currency=currency), kind=kind,
            corrects_transfer_id=corrects_transfer_id, reference=reference)
        if plan is not None:
            transfer.splits.extend(_lines(plan, currency))
        request = wallet_pb2.CreateTransfersRequest(
            transfers=[transfer, *(_moves(plan, currency, reference=reference) if plan is not None else [])])
        answer = self._call("CreateTransfers", request)
        assert isinstance(answer, wallet_pb2.CreateTransfersResponse)
        return PostedTransfer(answer.transfers[0].transfer_id,
                              {account_id: m.amount_minor for account_id, m in answer.rider_available.items()})

    # --- phones (credentials.py) ------------------------------------------------------------

    def resolve_device(self, *, device_id: str = "", public_key: bytes = b"", nfc_token: str = ""
                       ) -> DeviceResolution | None:
        """The account behind an NFC token, or behind the device key of a verified QR code;
        None when the wallet knows no such phone. A revoked or rotated-away credential raises
        WalletRefusal CREDENTIAL_REVOKED."""
        request = wallet_pb2.ResolveDeviceRequest(device_id=device_id, public_key=public_key, nfc_token=nfc_token)
        try:
            answer = self._call("ResolveDevice", request)
        except WalletRefusal as refusal:
            if refusal.reason == "UNKNOWN_CREDENTIAL":
                return None
            raise
        assert isinstance(answer, wallet_pb2.ResolveDeviceResponse)
        return DeviceResolution(answer.account_id, answer.status == wallet_pb2.ACCOUNT_STATUS_BLOCKED,
                                answer.rider_category, answer.device_id, bytes(answer.key_fingerprint))

    def issuer_keys(self, *, timeout_s: float | None = None) -> list[credential_pb2.IssuerKey]:
        """The issuer public keys phone certificates are verified with."""
        answer = self._call("ListIssuerKeys", wallet_pb2.ListIssuerKeysRequest(), timeout_s=timeout_s)
        assert isinstance(answer, wallet_pb2.ListIssuerKeysResponse)
        return list(answer.keys)

    def account_category(self, account_id: str) -> tuple[str, bool]:
        """(rider category in force now, blocked) of an account found some other way than by
        a card or phone, such as a face match."""
        answer = self._call("GetAccount", wallet_pb2.GetAccountRequest(account_id=account_id))
        assert isinstance(answer, wallet_pb2.GetAccountResponse)
        account = answer.account
        category = account.rider_category
        if account.HasField("category_expires_at") and account.category_expires_at.ToDatetime(
                tzinfo=timezone.utc) <= datetime.now(timezone.utc):
            category = ""
        return category, account.status == wallet_pb2.ACCOUNT_STATUS_BLOCKED


@dataclass(frozen=True, slots=True)
class DeviceResolution:
    """What the wallet says about a phone credential."""

    account_id: str
    blocked: bool
    rider_category: str
    device_id: str
    key_fingerprint: bytes  # SHA-256 of the device key in force


def _lines(plan: FarePlan, currency: str) -> list[split_pb2.SplitLine]:
    return [split_pb2.SplitLine(party=split_pb2.Party.Value(f"PARTY_{line.party}"), party_id=line.party_id,
                                amount=money_pb2.Money(amount_minor=line.amount_minor, currency=currency),
                                contract_id=line.contract_id, contract_version=line.contract_version)
            for line in plan.lines]


def _moves(plan: FarePlan, currency: str, *, reference: str) -> list[wallet_pb2.Transfer]:
    return [wallet_pb2.Transfer(transfer_id=m.transfer_id, debit_account_id=m.debit_account_id,
                                credit_account_id=m.credit_account_id,
                                amount=money_pb2.Money(amount_minor=m.amount_minor, currency=currency),
                                kind=wallet_pb2.TRANSFER_KIND_REVENUE_SHARE, reference=reference)
            for m in plan.moves]


def _hold(hold: wallet_pb2.Hold, answer: wallet_pb2.CreateHoldResponse | wallet_pb2.PostHoldResponse
          | wallet_pb2.VoidHoldResponse) -> HoldState:
    available = answer.debit_available.amount_minor if answer.HasField("debit_available") else None
    return HoldState(hold.hold_id, hold.status, hold.amount.amount_minor, hold.posted_amount.amount_minor, available)
