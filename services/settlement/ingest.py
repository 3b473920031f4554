"""Settlement lines from the wallet's and the merchant service's events.

Two `libs.events.ConsumerLoop`s (one per topic) call `Ingest.on_wallet_event` and
`Ingest.on_merchant_event` inside the transaction of settlement's `PostgresInbox`, so each
event's lines and its event id commit together: an event delivered twice changes nothing.

Which events matter:

- wallet `TransferPosted` and `HoldPosted`: every transfer that carries split lines, of any
  kind (fares, merchant payments and refunds, corrections), becomes one settlement line per
  split line. Refunds and corrections count negative.
- merchant `ChargeSucceeded` and `ChargeRefunded`: the same movements as seen by the merchant
  service, with the same split lines. Lines are keyed by (transfer id, line number), so
  whichever of the two events arrives first files them and the other changes nothing.
- merchant `MerchantVerified`: the merchant's Stripe connected account, where it is paid.
- wallet `TOP_UP` and `TOP_UP_REFUND` transfers, and the `TopUpSucceeded` and `TopUpRefunded`
  events that name their Stripe PaymentIntent and refund: money that moved through Stripe,
  kept for the provider side of reconciliation.

A line belongs to the service day its movement happened in. If that day is already closed
(or closing) when the event arrives, the line is paid with the first open day after it;
`service_day` keeps the day it happened in, for reconciliation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

import psycopg

from citytap.merchant.v1 import events_pb2 as merchant_events
from citytap.wallet.v1 import events_pb2 as wallet_events
from citytap.wallet.v1 import wallet_pb2
from services.settlement import convert
from services.settlement.domain import REVENUE_KIND_OF_TRANSFER, ServiceDayClock, signed

log = logging.getLogger("citytap.settlement.ingest")

DAYS_AHEAD_MAX = 366


@dataclass(frozen=True)
class SplitShare:
    party: str
    party_id: str
    amount_minor: int
    currency: str
    contract_id: str
    contract_version: int


def _when(stamp: Any) -> datetime:
    return stamp.ToDatetime(tzinfo=timezone.utc)


def _shares(splits: Any) -> list[SplitShare]:
    return [SplitShare(convert.party_name(s.party), s.party_id, s.amount.amount_minor, s.amount.currency,
                       s.contract_id, s.contract_version) for s in splits]


class Ingest:
    """Files settlement lines and provider movements; every method runs in the caller's transaction."""

    def __init__(self, *, schema: str, days: ServiceDayClock) -> None:
        self._schema = schema
        self._days = days
        self._kinds: dict[str, str] = {}  # contract id -> revenue kind (versions never change kind)
        self.lines_filed = 0

    # --- handlers -----------------------------------------------------------------------------

    def on_wallet_event(self, envelope: wallet_events.WalletEvent, conn: psycopg.Connection) -> None:
        payload = envelope.WhichOneof("payload")
        if payload == "transfer_posted":
            for transfer in envelope.transfer_posted.transfers:
                self._transfer(conn, transfer, envelope.event_id)
        elif payload == "hold_posted":
            self._transfer(conn, envelope.hold_posted.transfer, envelope.event_id)
        elif payload == "top_up_succeeded":
            top_up = envelope.top_up_succeeded.top_up
            if top_up.transfer_id:
                self.file_provider_movement(conn, transfer_id=top_up.transfer_id, kind="TOP_UP",
                                            stripe_id=top_up.payment_intent_id, reference_id=top_up.top_up_id,
                                            amount_minor=top_up.amount.amount_minor, currency=top_up.amount.currency,
                                            occurred_at=_when(envelope.occurred_at), event_id=envelope.event_id)
        elif payload == "top_up_refunded":
            refund = envelope.top_up_refunded.refund
            if refund.transfer_id:
                self.file_provider_movement(conn, transfer_id=refund.transfer_id, kind="TOP_UP_REFUND",
                                            stripe_id=refund.stripe_refund_id, reference_id=refund.refund_id,
                                            amount_minor=-refund.amount.amount_minor, currency=refund.amount.currency,
                                            occurred_at=_when(envelope.occurred_at), event_id=envelope.event_id)

    def on_merchant_event(self, envelope: merchant_events.MerchantEvent, conn: psycopg.Connection) -> None:
        payload = envelope.WhichOneof("payload")
        if payload == "charge_succeeded":
            charge = envelope.charge_succeeded.charge
            self.file_movement(conn, transfer_id=charge.transfer_id, transfer_kind="MERCHANT_PAYMENT",
                               amount_minor=charge.amount.amount_minor, currency=charge.amount.currency,
                               occurred_at=_when(charge.created_at), shares=_shares(charge.splits),
                               event_id=envelope.event_id)
        elif payload == "charge_refunded":
            refund = envelope.charge_refunded.refund
            self.file_movement(conn, transfer_id=refund.transfer_id, transfer_kind="MERCHANT_REFUND",
                               amount_minor=refund.amount.amount_minor, currency=refund.amount.currency,
                               occurred_at=_when(refund.created_at), shares=_shares(refund.splits),
                               event_id=envelope.event_id)
        elif payload == "merchant_verified":
            verified = envelope.merchant_verified
            if verified.stripe_account_id:
                conn.execute(
                    f"INSERT INTO {self._schema}.party_accounts (party, party_id, stripe_account_id, updated_at)"
                    " VALUES ('MERCHANT', %s, %s, %s) ON CONFLICT (party, party_id) DO UPDATE"
                    " SET stripe_account_id = EXCLUDED.stripe_account_id, updated_at = EXCLUDED.updated_at",
                    (verified.merchant_id, verified.stripe_account_id, _when(envelope.occurred_at)))

    def _transfer(self, conn: psycopg.Connection, transfer: wallet_pb2.Transfer, event_id: str) -> None:
        kind = wallet_pb2.TransferKind.Name(transfer.kind).removeprefix("TRANSFER_KIND_")
        if kind in ("TOP_UP", "TOP_UP_REFUND"):
            # Money through Stripe as the ledger posted it; TopUpSucceeded / TopUpRefunded add the Stripe ids.
            self.file_provider_movement(conn, transfer_id=transfer.transfer_id, kind=kind, stripe_id="",
                                        reference_id=transfer.transfer_id,
                                        amount_minor=signed(transfer.amount.amount_minor, kind),
                                        currency=transfer.amount.currency, occurred_at=_when(transfer.posted_at),
                                        event_id=event_id, enrich=False)
        if not transfer.splits:
            return  # nothing to share: top-ups, payouts, movements between system accounts
        self.file_movement(conn, transfer_id=transfer.transfer_id, transfer_kind=kind,
                           amount_minor=transfer.amount.amount_minor, currency=transfer.amount.currency,
                           occurred_at=_when(transfer.posted_at), shares=_shares(transfer.splits), event_id=event_id)

    # --- filing -------------------------------------------------------------------------------

    def settle_day_for(self, conn: psycopg.Connection, day: date) -> date:
        """`day` if it is still open, else the first open day after it. Takes a share lock
        on that day's row, so a CloseDay running now waits for this transaction (and the
        lines it files) before it totals the day."""
        lock = f"SELECT status FROM {self._schema}.service_days WHERE service_day = %s FOR SHARE"
        for _ in range(DAYS_AHEAD_MAX):
            row = conn.execute(lock, (day,)).fetchone()
            if row is None:
                conn.execute(f"INSERT INTO {self._schema}.service_days (service_day) VALUES (%s) "
                             "ON CONFLICT DO NOTHING", (day,))
                row = conn.execute(lock, (day,)).fetchone()
            if row[0] == "OPEN":
                return day
            day += timedelta(days=1)
        raise RuntimeError("no open service day within a year: closing has run far ahead of time")

    def _revenue_kind(self, conn: psycopg.Connection, contract_id: str, transfer_kind: str) -> str:
        kind = self._kinds.get(contract_id)
        if kind is None:
            row = conn.execute(f"SELECT revenue_kind FROM {self._schema}.contracts WHERE contract_id = %s LIMIT 1",
                               (contract_id,)).fetchone()
            if row is not None:
                kind = self._kinds[contract_id] = row[0]
        return kind or REVENUE_KIND_OF_TRANSFER.get(transfer_kind, "UNSPECIFIED")

    def file_movement(self, conn: psycopg.Connection, *, transfer_id: str, transfer_kind: str, amount_minor: int,
                      currency: str, occurred_at: datetime, shares: list[SplitShare], event_id: str) -> int:
        """File one line per share of a movement; returns how many were new (0 for a movement
        already filed from the other topic)."""
        if not shares or not transfer_id:
            return 0
        if sum(s.amount_minor for s in shares) != amount_minor:
            # The wallet refuses such splits; if one ever arrives, file it as it is and let
            # reconciliation show the difference rather than invent a correction here.
            log.error("split lines do not sum to the transfer amount",
                      extra={"fields": {"transfer_id": transfer_id, "event_id": event_id}})
        exists = conn.execute(f"SELECT 1 FROM {self._schema}.settlement_lines WHERE transfer_id = %s LIMIT 1",
                              (transfer_id,)).fetchone()
        if exists is not None:
            return 0
        day = self._days.day_of(occurred_at)
        settle_day = self.settle_day_for(conn, day)
        gross = signed(amount_minor, transfer_kind)
        rows = [(transfer_id, index, day, settle_day, event_id,
                 self._revenue_kind(conn, share.contract_id, transfer_kind), transfer_kind, occurred_at, gross,
                 share.party, share.party_id, signed(share.amount_minor, transfer_kind), share.currency,
                 share.contract_id, share.contract_version) for index, share in enumerate(shares)]
        with conn.cursor() as cursor:
            cursor.executemany(
                f"INSERT INTO {self._schema}.settlement_lines (transfer_id, line_no, service_day, settle_day,"
                " source_event_id, revenue_kind, transfer_kind, occurred_at, gross_minor, party, party_id,"
                " amount_minor, currency, contract_id, contract_version)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING", rows)
        self.lines_filed += len(rows)
        return len(rows)

    def file_provider_movement(self, conn: psycopg.Connection, *, transfer_id: str, kind: str, stripe_id: str,
                               reference_id: str, amount_minor: int, currency: str, occurred_at: datetime,
                               event_id: str, enrich: bool = True) -> None:
        """Record a movement through Stripe. From the ledger's transfer (`enrich=False`) it is
        recorded if new; from the top-up event (`enrich=True`) it also gains the Stripe id and
        CityTap's top-up or refund id, whichever of the two events came first. The amount,
        time and day stay the ledger's when the transfer came first."""
        conflict = ("DO UPDATE SET stripe_id = EXCLUDED.stripe_id, reference_id = EXCLUDED.reference_id"
                    if enrich else "DO NOTHING")
        conn.execute(
            f"INSERT INTO {self._schema}.provider_movements (transfer_id, kind, stripe_id, reference_id, amount_minor,"
            " currency, occurred_at, service_day, source_event_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (transfer_id) {conflict}",
            (transfer_id, kind, stripe_id, reference_id, amount_minor, currency, occurred_at,
             self._days.day_of(occurred_at), event_id))
