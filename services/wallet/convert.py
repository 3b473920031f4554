"""Conversion between the wallet's protobuf contract and its domain records.

Requests become domain requests here (unset fields become None, unknown enum numbers are
refused); domain records become response and event messages. No rule of the ledger lives
here: validation proper is `services.wallet.domain`.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from citytap.common.v1 import split_pb2
from citytap.wallet.v1 import events_pb2, wallet_pb2
from libs import errors
from libs.protos import money_pb, timestamp_pb
from services.wallet.domain import (
    Account,
    AccountKind,
    AccountStatus,
    BlockReason,
    Card,
    CreateAccountRequest,
    HistoryEntry,
    Hold,
    HoldRequest,
    HoldStatus,
    Party,
    PostHoldRequest,
    SplitLine,
    Transfer,
    TransferKind,
    TransferRequest,
)

# --- enums --------------------------------------------------------------------------------


def _enum_from_proto(enum_cls: type, proto_enum: object, prefix: str, value: int, field_name: str, *,
                     index: int | None = None, required: bool = True) -> object | None:
    """The domain enum member for a proto enum number; None for the zero value when optional."""
    meta = {"field": field_name, **({"index": str(index)} if index is not None else {})}
    if value == 0:
        if required:
            raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} must be set", **meta)
        return None
    try:
        name = proto_enum.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} has an unknown value {value}", **meta) from None
    return enum_cls[name.removeprefix(prefix)]


def _enum_to_proto(proto_enum: object, prefix: str, member: object | None) -> int:
    if member is None:
        return 0
    return proto_enum.Value(prefix + member.name)  # type: ignore[attr-defined]


def account_kind_from_proto(value: int) -> AccountKind:
    if value == 0:
        return AccountKind.RIDER_WALLET  # ACCOUNT_KIND_UNSPECIFIED means a rider wallet
    return _enum_from_proto(AccountKind, wallet_pb2.AccountKind, "ACCOUNT_KIND_", value, "kind")  # type: ignore[return-value]


def transfer_kind_from_proto(value: int, *, index: int | None = None) -> TransferKind:
    return _enum_from_proto(TransferKind, wallet_pb2.TransferKind, "TRANSFER_KIND_", value, "kind",  # type: ignore[return-value]
                            index=index)


def block_reason_from_proto(value: int) -> BlockReason:
    return _enum_from_proto(BlockReason, wallet_pb2.BlockReason, "BLOCK_REASON_", value, "reason")  # type: ignore[return-value]


# --- scalars ------------------------------------------------------------------------------


def timestamp(moment: datetime | None) -> Timestamp | None:
    return None if moment is None else timestamp_pb(moment)


def datetime_from_proto(message: Message, field_name: str) -> datetime | None:
    """The UTC datetime in `message.<field_name>`, or None when unset."""
    if not message.HasField(field_name):
        return None
    try:
        return getattr(message, field_name).ToDatetime(tzinfo=timezone.utc)
    except (ValueError, OverflowError):
        raise errors.InvalidArgument("INVALID_ARGUMENT", f"{field_name} is not a valid time", field=field_name) from None


money = money_pb


def _money_fields(message: Message, field_name: str) -> tuple[int | None, str | None]:
    if not message.HasField(field_name):
        return None, None
    value = getattr(message, field_name)
    return value.amount_minor, value.currency


def splits_from_proto(lines: object, *, index: int | None = None) -> tuple[SplitLine, ...]:
    found = []
    for number, line in enumerate(lines):  # type: ignore[arg-type]
        party = _enum_from_proto(Party, split_pb2.Party, "PARTY_", line.party, f"splits[{number}].party", index=index)
        found.append(SplitLine(party=party, party_id=line.party_id, amount_minor=line.amount.amount_minor,  # type: ignore[arg-type]
                               currency=line.amount.currency, contract_id=line.contract_id,
                               contract_version=line.contract_version))
    return tuple(found)


def split_to_proto(line: SplitLine) -> split_pb2.SplitLine:
    return split_pb2.SplitLine(party=_enum_to_proto(split_pb2.Party, "PARTY_", line.party), party_id=line.party_id,
                               amount=money(line.amount_minor, line.currency), contract_id=line.contract_id,
                               contract_version=line.contract_version)


# --- requests -----------------------------------------------------------------------------


def transfer_request(message: wallet_pb2.Transfer, index: int) -> TransferRequest:
    amount, currency = _money_fields(message, "amount")
    return TransferRequest(
        transfer_id=message.transfer_id, debit_account_id=message.debit_account_id,
        credit_account_id=message.credit_account_id, amount_minor=amount, currency=currency,  # type: ignore[arg-type]
        kind=transfer_kind_from_proto(message.kind, index=index), splits=splits_from_proto(message.splits, index=index),
        corrects_transfer_id=message.corrects_transfer_id, reference=message.reference,
    )


def hold_request(message: wallet_pb2.CreateHoldRequest) -> HoldRequest:
    amount, currency = _money_fields(message, "amount")
    return HoldRequest(
        hold_id=message.hold_id, debit_account_id=message.debit_account_id,
        credit_account_id=message.credit_account_id, amount_minor=amount, currency=currency,  # type: ignore[arg-type]
        kind=transfer_kind_from_proto(message.kind), expires_at=datetime_from_proto(message, "expires_at"),
        reference=message.reference,
    )


def post_request(message: wallet_pb2.PostHoldRequest) -> PostHoldRequest:
    amount, currency = _money_fields(message, "amount")
    return PostHoldRequest(hold_id=message.hold_id, amount_minor=amount, currency=currency,
                           splits=splits_from_proto(message.splits),
                           linked=tuple(transfer_request(t, index) for index, t in enumerate(message.linked_transfers)))


def create_account_request(message: wallet_pb2.CreateAccountRequest) -> CreateAccountRequest:
    return CreateAccountRequest(
        account_id=message.account_id, kind=account_kind_from_proto(message.kind), currency=message.currency,
        rider_category=message.rider_category,
        category_expires_at=datetime_from_proto(message, "category_expires_at"), owner_id=message.owner_id,
    )


# --- records ------------------------------------------------------------------------------


def account_to_proto(account: Account) -> wallet_pb2.Account:
    message = wallet_pb2.Account(
        account_id=account.account_id,
        kind=_enum_to_proto(wallet_pb2.AccountKind, "ACCOUNT_KIND_", account.kind),
        status=_enum_to_proto(wallet_pb2.AccountStatus, "ACCOUNT_STATUS_", account.status),
        block_reason=_enum_to_proto(wallet_pb2.BlockReason, "BLOCK_REASON_", account.block_reason),
        currency=account.currency, rider_category=account.rider_category, owner_id=account.owner_id,
        created_at=timestamp(account.created_at),
    )
    if account.category_expires_at is not None:
        message.category_expires_at.CopyFrom(timestamp(account.category_expires_at))
    if account.floor_minor is not None:
        message.floor.CopyFrom(money(account.floor_minor, account.currency))
    return message


def card_to_proto(card: Card) -> wallet_pb2.LinkedCard:
    return wallet_pb2.LinkedCard(card_id=card.card_id, label=card.label, linked_at=timestamp(card.linked_at))


def hold_to_proto(hold: Hold) -> wallet_pb2.Hold:
    message = wallet_pb2.Hold(
        hold_id=hold.hold_id, debit_account_id=hold.debit_account_id, credit_account_id=hold.credit_account_id,
        amount=money(hold.amount_minor, hold.currency),
        kind=_enum_to_proto(wallet_pb2.TransferKind, "TRANSFER_KIND_", hold.kind),
        status=_enum_to_proto(wallet_pb2.HoldStatus, "HOLD_STATUS_", hold.status),
        transfer_id=hold.transfer_id, created_at=timestamp(hold.created_at), expires_at=timestamp(hold.expires_at),
    )
    if hold.status is HoldStatus.POSTED:
        message.posted_amount.CopyFrom(money(hold.posted_amount_minor, hold.currency))
    return message


def transfer_to_proto(transfer: Transfer) -> wallet_pb2.Transfer:
    return wallet_pb2.Transfer(
        transfer_id=transfer.transfer_id, debit_account_id=transfer.debit_account_id,
        credit_account_id=transfer.credit_account_id, amount=money(transfer.amount_minor, transfer.currency),
        kind=_enum_to_proto(wallet_pb2.TransferKind, "TRANSFER_KIND_", transfer.kind),
        splits=[split_to_proto(s) for s in transfer.splits], hold_id=transfer.hold_id,
        corrects_transfer_id=transfer.corrects_transfer_id, reference=transfer.reference,
        posted_at=timestamp(transfer.posted_at),
    )


def transfer_outcome(result: Transfer | errors.CityTapError) -> wallet_pb2.TransferOutcome:
    """One PostTransferBatch outcome: the posted transfer, or why it was refused."""
    if isinstance(result, errors.CityTapError):
        return wallet_pb2.TransferOutcome(failure=wallet_pb2.TransferFailure(
            reason=result.reason, message=result.message, metadata=result.metadata))
    return wallet_pb2.TransferOutcome(transfer=transfer_to_proto(result))


def history_entry_to_proto(entry: HistoryEntry) -> wallet_pb2.HistoryEntry:
    return wallet_pb2.HistoryEntry(
        transfer_id=entry.transfer_id, kind=_enum_to_proto(wallet_pb2.TransferKind, "TRANSFER_KIND_", entry.kind),
        delta=money(entry.delta_minor, entry.currency), balance_after=money(entry.balance_after_minor, entry.currency),
        counterparty_kind=_enum_to_proto(wallet_pb2.AccountKind, "ACCOUNT_KIND_", entry.counterparty_kind),
        reference=entry.reference, posted_at=timestamp(entry.posted_at),
    )


def status_to_proto(status: AccountStatus) -> int:
    return _enum_to_proto(wallet_pb2.AccountStatus, "ACCOUNT_STATUS_", status)


# --- events -------------------------------------------------------------------------------


def wallet_event(account_key: str, occurred_at: datetime, **payload: Message) -> events_pb2.WalletEvent:
    """A WalletEvent envelope with a fresh event id and exactly one payload field set."""
    if len(payload) != 1:
        raise ValueError("a wallet event carries exactly one payload")
    (field_name, message), = payload.items()
    event = events_pb2.WalletEvent(event_id=str(uuid.uuid4()), account_key=account_key,
                                   occurred_at=timestamp(occurred_at))
    getattr(event, field_name).CopyFrom(message)
    return event
