"""The wallet's gRPC entrypoint: proto in, one service-layer call, proto out.

Errors are raised as `libs.errors` exceptions and mapped to status codes by the interceptor
of `libs.grpc_server`. TopUp and RefundTopUp come from the `TopUpRpcs` mixin (see
topups.py); the phone RPCs (RegisterDevice, RotateDevice, RevokeDevice, ListIssuerKeys,
ResolveDevice) from the `DeviceRpcs` mixin (see devices.py).
"""

from __future__ import annotations

import grpc

from citytap.common.v1 import money_pb2
from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from libs import errors
from libs.grpc_server import Registration
from services.wallet import convert
from services.wallet.domain import TransferRequest, check_independent_batch
from services.wallet.devices import DeviceRpcs
from services.wallet.exports import ExportRpcs
from services.wallet.ledger import Ledger
from services.wallet.topups import TopUpRpcs

SERVICE_NAME = "citytap.wallet.v1.WalletService"


class WalletServicer(TopUpRpcs, DeviceRpcs, ExportRpcs, wallet_pb2_grpc.WalletServiceServicer):
    """Thin adapter over `Ledger`; `attach` gives it the ledger once the pool is open."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self._ledger = ledger

    def attach(self, ledger: Ledger) -> None:
        self._ledger = ledger

    @property
    def ledger(self) -> Ledger:
        if self._ledger is None:
            raise errors.Unavailable("UNAVAILABLE", "the wallet is still starting")
        return self._ledger

    # --- accounts and credentials --------------------------------------------------------

    def CreateAccount(self, request: wallet_pb2.CreateAccountRequest, context: grpc.ServicerContext) -> wallet_pb2.CreateAccountResponse:
        account = self.ledger.create_account(convert.create_account_request(request))
        return wallet_pb2.CreateAccountResponse(account=convert.account_to_proto(account))

    def GetAccount(self, request: wallet_pb2.GetAccountRequest, context: grpc.ServicerContext) -> wallet_pb2.GetAccountResponse:
        account, cards = self.ledger.get_account(request.account_id)
        return wallet_pb2.GetAccountResponse(account=convert.account_to_proto(account),
                                             cards=[convert.card_to_proto(c) for c in cards])

    def LinkCard(self, request: wallet_pb2.LinkCardRequest, context: grpc.ServicerContext) -> wallet_pb2.LinkCardResponse:
        card = self.ledger.link_card(request.account_id, request.card_uid, request.label)
        return wallet_pb2.LinkCardResponse(card=convert.card_to_proto(card))

    def UnlinkCard(self, request: wallet_pb2.UnlinkCardRequest, context: grpc.ServicerContext) -> wallet_pb2.UnlinkCardResponse:
        unlinked_at = self.ledger.unlink_card(request.account_id, request.card_id)
        return wallet_pb2.UnlinkCardResponse(unlinked_at=convert.timestamp(unlinked_at))

    def BlockAccount(self, request: wallet_pb2.BlockAccountRequest, context: grpc.ServicerContext) -> wallet_pb2.BlockAccountResponse:
        account = self.ledger.block_account(request.account_id, convert.block_reason_from_proto(request.reason),
                                            request.note)
        return wallet_pb2.BlockAccountResponse(account=convert.account_to_proto(account))

    def UnblockAccount(self, request: wallet_pb2.UnblockAccountRequest, context: grpc.ServicerContext) -> wallet_pb2.UnblockAccountResponse:
        account = self.ledger.unblock_account(request.account_id, request.note)
        return wallet_pb2.UnblockAccountResponse(account=convert.account_to_proto(account))

    def ResolveCredential(self, request: wallet_pb2.ResolveCredentialRequest, context: grpc.ServicerContext) -> wallet_pb2.ResolveCredentialResponse:
        kind = request.credential.WhichOneof("kind")
        if kind is None:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "credential must carry one credential", field="credential")
        if kind in ("face_embedding", "face_frames"):
            raise errors.InvalidArgument("UNSUPPORTED_CREDENTIAL", "faces resolve through the face service",
                                         field=f"credential.{kind}")
        if kind in ("phone_qr", "nfc_token"):
            raise errors.InvalidArgument("UNSUPPORTED_CREDENTIAL",
                                         "phone QR and NFC credentials are not resolved yet: they arrive with "
                                         "RegisterDevice; only card UIDs resolve today", field=f"credential.{kind}")
        resolution = self.ledger.resolve_card(request.credential.card_uid)
        return wallet_pb2.ResolveCredentialResponse(account_id=resolution.account_id,
                                                    status=convert.status_to_proto(resolution.status),
                                                    rider_category=resolution.rider_category)

    # --- the ledger -----------------------------------------------------------------------

    def GetBalance(self, request: wallet_pb2.GetBalanceRequest, context: grpc.ServicerContext) -> wallet_pb2.GetBalanceResponse:
        balance = self.ledger.get_balance(request.account_id)
        account = balance.account
        return wallet_pb2.GetBalanceResponse(
            balance=convert.money(account.balance_minor, account.currency),
            held=convert.money(account.pending_debits_minor, account.currency),
            available=convert.money(account.available_minor, account.currency),
            holds=[convert.hold_to_proto(h) for h in balance.holds],
        )

    def CreateHold(self, request: wallet_pb2.CreateHoldRequest, context: grpc.ServicerContext) -> wallet_pb2.CreateHoldResponse:
        available: dict[str, int] = {}
        hold = self.ledger.create_hold(convert.hold_request(request), available=available)
        return wallet_pb2.CreateHoldResponse(hold=convert.hold_to_proto(hold),
                                             debit_available=_money_of(available, hold.debit_account_id, hold.currency))

    def PostHold(self, request: wallet_pb2.PostHoldRequest, context: grpc.ServicerContext) -> wallet_pb2.PostHoldResponse:
        available: dict[str, int] = {}
        hold, transfer, linked = self.ledger.post_hold_linked(convert.post_request(request), available=available)
        return wallet_pb2.PostHoldResponse(hold=convert.hold_to_proto(hold), transfer=convert.transfer_to_proto(transfer),
                                           linked_transfers=[convert.transfer_to_proto(t) for t in linked],
                                           debit_available=_money_of(available, hold.debit_account_id, hold.currency))

    def VoidHold(self, request: wallet_pb2.VoidHoldRequest, context: grpc.ServicerContext) -> wallet_pb2.VoidHoldResponse:
        available: dict[str, int] = {}
        hold = self.ledger.void_hold(request.hold_id, available=available)
        return wallet_pb2.VoidHoldResponse(hold=convert.hold_to_proto(hold),
                                           debit_available=_money_of(available, hold.debit_account_id, hold.currency))

    def CreateTransfers(self, request: wallet_pb2.CreateTransfersRequest, context: grpc.ServicerContext) -> wallet_pb2.CreateTransfersResponse:
        requests = [convert.transfer_request(t, index) for index, t in enumerate(request.transfers)]
        available: dict[str, int] = {}
        transfers = self.ledger.create_transfers(requests, available=available)
        currency = {a: t.currency for t in transfers for a in (t.debit_account_id, t.credit_account_id)}
        return wallet_pb2.CreateTransfersResponse(
            transfers=[convert.transfer_to_proto(t) for t in transfers],
            rider_available={a: convert.money(minor, currency[a]) for a, minor in available.items()})

    def PostTransferBatch(self, request: wallet_pb2.PostTransferBatchRequest,
                          context: grpc.ServicerContext) -> wallet_pb2.PostTransferBatchResponse:
        check_independent_batch([t.transfer_id for t in request.transfers])
        parsed: list[TransferRequest | errors.CityTapError] = []
        for index, message in enumerate(request.transfers):
            try:
                parsed.append(convert.transfer_request(message, index))
            except errors.CityTapError as exc:  # a malformed transfer fails alone, like any other
                parsed.append(exc)
        requests = [p for p in parsed if isinstance(p, TransferRequest)]
        results = iter(self.ledger.post_transfer_batch(requests) if requests else ())
        return wallet_pb2.PostTransferBatchResponse(outcomes=[
            convert.transfer_outcome(p if isinstance(p, errors.CityTapError) else next(results)) for p in parsed])

    def ListHistory(self, request: wallet_pb2.ListHistoryRequest, context: grpc.ServicerContext) -> wallet_pb2.ListHistoryResponse:
        entries, token = self.ledger.list_history(
            request.account_id, page_size_requested=request.page_size, page_token=request.page_token,
            start_at=convert.datetime_from_proto(request, "start_at"),
            end_at=convert.datetime_from_proto(request, "end_at"))
        return wallet_pb2.ListHistoryResponse(entries=[convert.history_entry_to_proto(e) for e in entries],
                                              next_page_token=token)


def _money_of(available: dict[str, int], account_id: str, currency: str) -> money_pb2.Money | None:
    """The reported available balance of `account_id`, or None (unset in the answer) when the
    account does not exist."""
    minor = available.get(account_id)
    return None if minor is None else convert.money(minor, currency)


def registration(servicer: WalletServicer) -> Registration:
    return Registration(wallet_pb2_grpc.add_WalletServiceServicer_to_server, servicer, SERVICE_NAME)
