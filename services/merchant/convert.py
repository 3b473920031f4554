"""Domain records to protobuf messages, and the event envelope: the one place they meet."""

from __future__ import annotations

import uuid
from datetime import datetime

from citytap.merchant.v1 import events_pb2, merchant_pb2
from libs.protos import money_pb, timestamp_pb
from services.merchant.domain import ApiKey, Charge, Limits, Merchant, Refund
from services.merchant.wallet_client import split_line_pb


def merchant_pb(merchant: Merchant, limits: Limits) -> merchant_pb2.Merchant:
    message = merchant_pb2.Merchant(
        merchant_id=merchant.merchant_id, name=merchant.name, category=merchant.category,
        status=merchant_pb2.MerchantStatus.Value(f"MERCHANT_STATUS_{merchant.status.value}"),
        stripe_account_id=merchant.stripe_account_id or "", payable_account_id=merchant.payable_account_id or "",
        per_purchase_limit=money_pb(limits.per_purchase_minor, limits.currency),
        per_day_limit=money_pb(limits.per_day_minor, limits.currency), created_at=timestamp_pb(merchant.created_at))
    if merchant.verified_at is not None:
        message.verified_at.CopyFrom(timestamp_pb(merchant.verified_at))
    return message


def api_key_pb(key: ApiKey) -> merchant_pb2.ApiKey:
    message = merchant_pb2.ApiKey(key_id=key.key_id, merchant_id=key.merchant_id, label=key.label,
                                  secret_prefix=key.secret_prefix, created_at=timestamp_pb(key.created_at),
                                  scopes=list(key.scopes))
    if key.revoked_at is not None:
        message.revoked_at.CopyFrom(timestamp_pb(key.revoked_at))
    return message


def charge_pb(charge: Charge) -> merchant_pb2.Charge:
    status = "SUCCEEDED" if charge.status.value == "PENDING" else charge.status.value
    return merchant_pb2.Charge(
        charge_id=charge.charge_id, merchant_id=charge.merchant_id, order_id=charge.order_id,
        amount=money_pb(charge.amount_minor, charge.currency), refunded_amount=money_pb(charge.refunded_minor, charge.currency),
        status=merchant_pb2.ChargeStatus.Value(f"CHARGE_STATUS_{status}"),
        credential_kind=f"CREDENTIAL_KIND_{charge.credential_kind.value}",  # type: ignore[arg-type]
        splits=[split_line_pb(s) for s in charge.splits], transfer_id=charge.transfer_id,
        description=charge.description, created_at=timestamp_pb(charge.created_at))


def refund_pb(refund: Refund) -> merchant_pb2.Refund:
    return merchant_pb2.Refund(
        refund_id=refund.refund_id, charge_id=refund.charge_id, amount=money_pb(refund.amount_minor, refund.currency),
        splits=[split_line_pb(s) for s in refund.splits], transfer_id=refund.transfer_id, note=refund.note,
        created_at=timestamp_pb(refund.created_at))


def envelope(merchant_id: str, occurred_at: datetime, **payload: object) -> events_pb2.MerchantEvent:
    """A MerchantEvent keyed by the merchant, with a fresh event id."""
    return events_pb2.MerchantEvent(event_id=str(uuid.uuid4()), occurred_at=timestamp_pb(occurred_at),
                                    account_key=merchant_id, **payload)  # type: ignore[arg-type]
