"""Closing a service day: fix each party's total once, pay it through Stripe, publish.

`close_day` runs in three steps, each safe to repeat, so a crash or a Stripe outage in the
middle is finished by calling CloseDay again:

1. **Totals** (one transaction, OPEN -> CLOSING): refuse while the day's events may still
   arrive (before its end plus the grace period), or while an earlier day is still open.
   Lock the day's row (ingestion holds a share lock on it while filing lines, so every line
   already being filed is counted and every later one goes to the next open day), total the
   lines per party, add what each party carried over from its last closed day, and record
   one PENDING payout per party that has money to receive and a Stripe account.
2. **Payouts**: send each PENDING payout as a Stripe Transfer with the payout id (the
   settlement batch id) as idempotency key; mark it SENT and publish `PayoutCreated` in one
   transaction.
3. **Close** (CLOSING -> CLOSED): store the CloseDayResponse and publish `DayClosed`. From
   then on CloseDay returns that stored response unchanged.

What a party does not receive today (a negative net after refunds, cents Stripe cannot pay
out, or a missing connected account) is carried to its next closed day, never dropped:
for every party and day, lines + carried in = paid + carried out.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from datetime import date, datetime, timedelta

import psycopg
from psycopg_pool import ConnectionPool

from citytap.settlement.v1 import events_pb2, settlement_pb2
from libs import errors, outbox
from libs.protos import money_pb, timestamp_pb
from services.settlement import convert
from services.settlement.domain import ServiceDayClock, parse_day, payout_id
from services.settlement.stripe_payouts import PayoutFailed, payable_minor

log = logging.getLogger("citytap.settlement.closing")

TOPIC = "citytap.settlement.v1.events"


class Closing:
    """The CloseDay use case."""

    def __init__(self, pool: ConnectionPool, *, schema: str, days: ServiceDayClock, grace_s: int, currency: str,
                 party_accounts: dict[tuple[str, str], str], platform_party_id: str, payouts: object,
                 clock: Callable[[], datetime]) -> None:
        self._pool = pool
        self._schema = schema
        self._days = days
        self._grace = timedelta(seconds=grace_s)
        self._currency = currency
        self._party_accounts = dict(party_accounts)
        self._platform_party_id = platform_party_id
        self._payouts = payouts
        self._clock = clock

    # --- the use case -------------------------------------------------------------------------

    def close_day_pb(self, day_text: str) -> settlement_pb2.CloseDayResponse:
        return self.close_day(parse_day(day_text))

    def close_day(self, day: date) -> settlement_pb2.CloseDayResponse:
        s = self._schema
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT status, result FROM {s}.service_days WHERE service_day = %s", (day,)).fetchone()
        if row is not None and row[0] == "CLOSED":
            return settlement_pb2.CloseDayResponse.FromString(bytes(row[1]))
        self._check_ended(day)
        # One close of a day at a time: a concurrent CloseDay waits here, then finds the day
        # closed, so two callers never send the same payout to Stripe at the same moment.
        with self._pool.connection() as lock_conn, lock_conn.transaction():
            lock_conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"citytap.{s}.close.{day.isoformat()}",))
            with self._pool.connection() as conn:
                row = conn.execute(f"SELECT status, result FROM {s}.service_days WHERE service_day = %s",
                                   (day,)).fetchone()
            if row is not None and row[0] == "CLOSED":
                return settlement_pb2.CloseDayResponse.FromString(bytes(row[1]))
            if row is None or row[0] == "OPEN":
                self._fix_totals(day)
            self._send_payouts(day)
            return self._finish(day)

    def _check_ended(self, day: date) -> None:
        _, end = self._days.bounds(day)
        closable_at = end + self._grace
        now = self._clock()
        if now < closable_at:
            raise errors.FailedPrecondition(
                "SERVICE_DAY_OPEN",
                f"service day {day.isoformat()} can be closed from {closable_at.isoformat()}: it ends at "
                f"{end.isoformat()} and late events may arrive for {int(self._grace.total_seconds())} s after that",
                closable_at=closable_at.isoformat(), service_day=day.isoformat())

    def _account_of(self, conn: psycopg.Connection, party: str, party_id: str) -> str:
        account = self._party_accounts.get((party, party_id))
        if account:
            return account
        row = conn.execute(f"SELECT stripe_account_id FROM {self._schema}.party_accounts WHERE party = %s AND "
                           "party_id = %s", (party, party_id)).fetchone()
        return row[0] if row else ""

    def _fix_totals(self, day: date) -> None:
        s = self._schema
        now = self._clock()
        with self._pool.connection() as conn, conn.transaction():
            conn.execute(f"INSERT INTO {s}.service_days (service_day) VALUES (%s) ON CONFLICT DO NOTHING", (day,))
            status = conn.execute(f"SELECT status FROM {s}.service_days WHERE service_day = %s FOR UPDATE",
                                  (day,)).fetchone()[0]
            if status != "OPEN":
                return  # another CloseDay fixed the totals first
            earlier = conn.execute(f"SELECT min(service_day) FROM {s}.service_days WHERE service_day < %s AND "
                                   "status <> 'CLOSED'", (day,)).fetchone()[0]
            if earlier is not None:
                raise errors.FailedPrecondition(
                    "INVALID_STATE", f"service day {earlier.isoformat()} is still open: days close in order, "
                                     "so what one day carries over reaches the next", service_day=earlier.isoformat())
            totals: dict[tuple[str, str], list[int]] = {}
            for party, party_id, amount, count, gross in conn.execute(
                    f"SELECT party, party_id, sum(amount_minor)::bigint, count(*), sum(gross_minor)::bigint "
                    f"FROM {s}.settlement_lines WHERE settle_day = %s GROUP BY party, party_id", (day,)):
                totals[(party, party_id)] = [amount, count, gross, 0]
            for party, party_id, carry in conn.execute(
                    f"SELECT DISTINCT ON (party, party_id) party, party_id, carry_out_minor FROM {s}.day_totals "
                    "WHERE service_day < %s ORDER BY party, party_id, service_day DESC", (day,)):
                if carry:
                    totals.setdefault((party, party_id), [0, 0, 0, 0])[3] = carry
            line_count = 0
            for (party, party_id), (amount, count, gross, carry_in) in sorted(totals.items()):
                line_count += count
                net = amount + carry_in
                paid = 0
                if party == "PLATFORM" and party_id == self._platform_party_id:
                    paid = max(net, 0)  # the platform's share stays in its own Stripe balance
                else:
                    account = self._account_of(conn, party, party_id)
                    payable = payable_minor(net, self._currency)
                    if account and payable > 0:
                        paid = payable
                        conn.execute(
                            f"INSERT INTO {s}.payouts (payout_id, service_day, party, party_id, amount_minor, currency,"
                            " stripe_account_id, status, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, 'PENDING', %s)",
                            (payout_id(day, party, party_id), day, party, party_id, paid, self._currency, account, now))
                    elif net > 0 and not account:
                        log.warning("party has no Stripe account; its share is carried over",
                                    extra={"fields": {"party": party, "party_id": party_id, "day": day.isoformat()}})
                conn.execute(
                    f"INSERT INTO {s}.day_totals (service_day, party, party_id, currency, lines_minor, line_count,"
                    " gross_minor, carry_in_minor, paid_minor, carry_out_minor) VALUES (%s, %s, %s, %s, %s, %s, %s,"
                    " %s, %s, %s)",
                    (day, party, party_id, self._currency, amount, count, gross, carry_in, paid, net - paid))
            conn.execute(f"UPDATE {s}.service_days SET status = 'CLOSING', closing_at = %s, line_count = %s "
                         "WHERE service_day = %s", (now, line_count, day))

    def _send_payouts(self, day: date) -> None:
        s = self._schema
        with self._pool.connection() as conn:
            pending = conn.execute(f"SELECT payout_id, party, party_id, amount_minor, currency, stripe_account_id "
                                   f"FROM {s}.payouts WHERE service_day = %s AND status = 'PENDING' ORDER BY payout_id",
                                   (day,)).fetchall()
        for pid, party, party_id, amount, currency, account in pending:
            try:
                sent = self._payouts.send(payout_id=pid, destination=account, amount_minor=amount,  # type: ignore[attr-defined]
                                          currency=currency, service_day=day.isoformat(), party=party,
                                          party_id=party_id)
            except PayoutFailed as exc:
                if exc.retryable:
                    raise errors.Unavailable("UNAVAILABLE", f"Stripe did not confirm payout {pid}; close the day "
                                                            "again to resume (the payout id keeps it from paying twice)",
                                             payout_id=pid) from exc
                raise errors.FailedPrecondition("PAYMENT_FAILED", f"Stripe refused payout {pid} to {party} "
                                                                  f"{party_id}: {exc}", payout_id=pid) from exc
            now = self._clock()
            with self._pool.connection() as conn, conn.transaction():
                updated = conn.execute(f"UPDATE {s}.payouts SET status = 'SENT', stripe_id = %s, sent_at = %s "
                                       "WHERE payout_id = %s AND status = 'PENDING'", (sent.stripe_id, now, pid)).rowcount
                if updated:
                    payout = settlement_pb2.Payout(
                        payout_id=pid, service_day=day.isoformat(), party=convert.party_value(party), party_id=party_id,
                        amount=money_pb(amount, currency), stripe_id=sent.stripe_id, created_at=timestamp_pb(now))
                    outbox.enqueue(conn, s, TOPIC, events_pb2.SettlementEvent(
                        event_id=str(uuid.uuid4()), occurred_at=timestamp_pb(now), account_key=party_id,
                        payout_created=events_pb2.PayoutCreated(payout=payout)))

    def _finish(self, day: date) -> settlement_pb2.CloseDayResponse:
        s = self._schema
        now = self._clock()
        with self._pool.connection() as conn, conn.transaction():
            status, result, line_count = conn.execute(
                f"SELECT status, result, line_count FROM {s}.service_days WHERE service_day = %s FOR UPDATE",
                (day,)).fetchone()
            if status == "CLOSED":
                return settlement_pb2.CloseDayResponse.FromString(bytes(result))
            unsent = conn.execute(f"SELECT count(*) FROM {s}.payouts WHERE service_day = %s AND status <> 'SENT'",
                                  (day,)).fetchone()[0]
            if unsent:
                raise errors.Unavailable("UNAVAILABLE", f"{unsent} payouts of {day.isoformat()} are not sent yet; "
                                                        "close the day again to resume")
            totals = self.party_totals(conn, day)
            response = settlement_pb2.CloseDayResponse(
                service_day=day.isoformat(), status=settlement_pb2.SERVICE_DAY_STATUS_CLOSED,
                closed_at=timestamp_pb(now), totals=totals, payouts=self.payouts_of(conn, day))
            conn.execute(f"UPDATE {s}.service_days SET status = 'CLOSED', closed_at = %s, result = %s "
                         "WHERE service_day = %s", (now, response.SerializeToString(), day))
            outbox.enqueue(conn, s, TOPIC, events_pb2.SettlementEvent(
                event_id=str(uuid.uuid4()), occurred_at=timestamp_pb(now), account_key=day.isoformat(),
                day_closed=events_pb2.DayClosed(service_day=day.isoformat(), closed_at=timestamp_pb(now),
                                                totals=totals, line_count=line_count or 0)))
        log.info("service day closed", extra={"fields": {"day": day.isoformat(), "parties": len(totals),
                                                         "lines": line_count}})
        return response

    # --- reads shared with reports --------------------------------------------------------------

    def get_service_day_pb(self, day_text: str) -> settlement_pb2.GetServiceDayResponse:
        day = parse_day(day_text)
        s = self._schema
        with self._pool.connection() as conn:
            row = conn.execute(f"SELECT status, closed_at FROM {s}.service_days WHERE service_day = %s",
                               (day,)).fetchone()
            status, closed_at = row if row is not None else ("OPEN", None)
            lines = conn.execute(f"SELECT count(*) FROM {s}.settlement_lines WHERE settle_day = %s", (day,)).fetchone()[0]
            response = settlement_pb2.GetServiceDayResponse(
                service_day=day.isoformat(), status=settlement_pb2.ServiceDayStatus.Value("SERVICE_DAY_STATUS_" + status),
                totals=self.party_totals(conn, day), payouts=self.payouts_of(conn, day), line_count=lines)
        if closed_at is not None:
            response.closed_at.CopyFrom(timestamp_pb(closed_at))
        return response

    def party_totals(self, conn: psycopg.Connection, day: date) -> list[settlement_pb2.PartyTotal]:
        rows = conn.execute(f"SELECT party, party_id, currency, lines_minor, line_count FROM {self._schema}.day_totals "
                            "WHERE service_day = %s ORDER BY party, party_id", (day,)).fetchall()
        return [settlement_pb2.PartyTotal(party=convert.party_value(p), party_id=pid, amount=money_pb(amount, cur),
                                          line_count=count) for p, pid, cur, amount, count in rows]

    def payouts_of(self, conn: psycopg.Connection, day: date, party: tuple[str, str] | None = None
                   ) -> list[settlement_pb2.Payout]:
        query = (f"SELECT payout_id, party, party_id, amount_minor, currency, stripe_id, created_at "
                 f"FROM {self._schema}.payouts WHERE service_day = %s")
        params: tuple = (day,)
        if party is not None:
            query += " AND party = %s AND party_id = %s"
            params = (day, *party)
        rows = conn.execute(query + " ORDER BY party, party_id", params).fetchall()
        return [settlement_pb2.Payout(payout_id=pid, service_day=day.isoformat(), party=convert.party_value(p),
                                      party_id=party_id, amount=money_pb(amount, cur), stripe_id=stripe_id,
                                      created_at=timestamp_pb(created)) for pid, p, party_id, amount, cur, stripe_id,
                created in rows]
