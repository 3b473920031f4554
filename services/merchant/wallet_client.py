"""The wallet, as the merchant service sees it: the only module of the service that calls it.

Each method makes one gRPC call (`ResolveCredential`, `ResolveDevice`, `ListIssuerKeys`,
`CreateAccount`, `CreateTransfers`) with the configured deadline. The wallet's refusals come back
as `libs.errors` exceptions carrying the wallet's own reason (INSUFFICIENT_FUNDS,
ACCOUNT_BLOCKED, UNKNOWN_CREDENTIAL ...) under the same status code, so a till sees exactly
why the wallet said no. A wallet that does not answer in time, or answers UNAVAILABLE, raises
`errors.Unavailable`: the outcome is unknown, and every write here uses ids derived from the
charge or refund, so a retry repeats the same ledger operation rather than adding one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from citytap.common.v1 import credential_pb2, split_pb2
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs import errors
from libs.grpc_client import error_info
from libs.protos import money_pb
from services.merchant.domain import PlannedTransfer

_RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
GET_TRANSFERS_MAX = 100  # the wallet's limit per GetTransfers call
_ERROR_FOR_CODE: dict[grpc.StatusCode, type[errors.CityTapError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.Conflict,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.LimitExceeded,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
}


class WalletRefused(Exception):
    """The wallet answered and refused; `error` is the refusal as our own error, ready to raise."""

    def __init__(self, error: errors.CityTapError) -> None:
        self.error = error
        super().__init__(str(error))


@dataclass(frozen=True)
class Resolution:
    account_id: str
    blocked: bool


class WalletClient:
    """Calls to the wallet, each bounded by `timeout_s`."""

    def __init__(self, channel: grpc.Channel, *, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._stub = wallet_pb2_grpc.WalletServiceStub(channel)
        self._timeout_s = timeout_s

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout_s)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            info = error_info(exc)
            reason = info.reason if info is not None else ""
            message = exc.details() or ""  # type: ignore[attr-defined]
            if code in _RETRYABLE or reason == "UNAVAILABLE" or code not in _ERROR_FOR_CODE or not reason:
                raise errors.Unavailable("UNAVAILABLE", f"the wallet did not complete {method}: {code.name}",
                                         dependency="wallet") from exc
            metadata = {k: v for k, v in (info.metadata.items() if info is not None else ())}
            raise WalletRefused(_ERROR_FOR_CODE[code](reason, f"the wallet refused: {message}", **metadata)) from exc

    def resolve(self, credential: credential_pb2.Credential) -> Resolution:
        """The rider account a card, NFC token or phone QR code belongs to."""
        answer = self._call("ResolveCredential", wallet_pb2.ResolveCredentialRequest(credential=credential))
        assert isinstance(answer, wallet_pb2.ResolveCredentialResponse)
        return Resolution(answer.account_id, answer.status == wallet_pb2.ACCOUNT_STATUS_BLOCKED)

    def resolve_device(self, *, device_id: str = "", public_key: bytes = b"", nfc_token: str = "") -> Resolution:
        """The rider account behind a verified phone key or an NFC token (revoked: CREDENTIAL_REVOKED)."""
        answer = self._call("ResolveDevice", wallet_pb2.ResolveDeviceRequest(
            device_id=device_id, public_key=public_key, nfc_token=nfc_token))
        assert isinstance(answer, wallet_pb2.ResolveDeviceResponse)
        return Resolution(answer.account_id, answer.status == wallet_pb2.ACCOUNT_STATUS_BLOCKED)

    def issuer_keys(self) -> list[credential_pb2.IssuerKey]:
        """The public keys the wallet certifies phones with."""
        answer = self._call("ListIssuerKeys", wallet_pb2.ListIssuerKeysRequest())
        assert isinstance(answer, wallet_pb2.ListIssuerKeysResponse)
        return list(answer.keys)

    def open_payable(self, *, account_id: str, merchant_id: str, currency: str) -> str:
        """Open (or find again: the call is idempotent) the merchant's payable account."""
        answer = self._call("CreateAccount", wallet_pb2.CreateAccountRequest(
            account_id=account_id, kind=wallet_pb2.ACCOUNT_KIND_MERCHANT_PAYABLE, currency=currency,
            owner_id=merchant_id))
        assert isinstance(answer, wallet_pb2.CreateAccountResponse)
        return answer.account.account_id

    def posted(self, transfer_ids: Sequence[str]) -> set[str]:
        """Which of `transfer_ids` the ledger has posted (GetTransfers, 100 ids a call)."""
        found: set[str] = set()
        for start in range(0, len(transfer_ids), GET_TRANSFERS_MAX):
            answer = self._call("GetTransfers", wallet_pb2.GetTransfersRequest(
                transfer_ids=list(transfer_ids[start:start + GET_TRANSFERS_MAX])))
            assert isinstance(answer, wallet_pb2.GetTransfersResponse)
            found.update(t.transfer_id for t in answer.transfers)
        return found

    def post_batch(self, plan: Sequence[PlannedTransfer], currency: str) -> list[str]:
        """Post the planned transfers as one linked batch (all or none); their ids as posted."""
        transfers = [wallet_pb2.Transfer(
            transfer_id=p.transfer_id, debit_account_id=p.debit_account_id, credit_account_id=p.credit_account_id,
            amount=money_pb(p.amount_minor, currency), kind=wallet_pb2.TransferKind.Value(f"TRANSFER_KIND_{p.kind}"),
            splits=[split_line_pb(s) for s in p.splits], corrects_transfer_id=p.corrects_transfer_id,
            reference=p.reference) for p in plan]
        answer = self._call("CreateTransfers", wallet_pb2.CreateTransfersRequest(transfers=transfers))
        assert isinstance(answer, wallet_pb2.CreateTransfersResponse)
        return [t.transfer_id for t in answer.transfers]


def split_line_pb(line: object) -> split_pb2.SplitLine:
    """A libs.splits.SplitLine as citytap.common.v1.SplitLine."""
    return split_pb2.SplitLine(
        party=split_pb2.Party.Value(f"PARTY_{line.party}"), party_id=line.party_id,  # type: ignore[attr-defined]
        amount=money_pb(line.amount_minor, line.currency),  # type: ignore[attr-defined]
        contract_id=line.contract_id, contract_version=line.contract_version)  # type: ignore[attr-defined]
