"""fare-gate's PostgreSQL: taps, journeys, rider fare states, the outbox. The only module of
fare-gate that imports psycopg.

Every tap of a known account runs in one `account_transaction`: a READ COMMITTED
transaction that first takes a transaction-scoped advisory lock on the account, so two
taps of one rider (two gates at once, or a gate's retry racing its original) run one after
the other, and the second sees what the first committed. Taps of different riders never
wait for each other. The lock wait is bounded (`lock_timeout`): a tap that cannot get the
lock in time fails UNAVAILABLE and the gate retries it with the same tap id.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from google.protobuf.message import Message
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from libs import errors, outbox
from services.fare_gate.domain import (
    Decision,
    Journey,
    JourneyEnd,
    JourneyStatus,
    Reason,
    RecordedTap,
    Tap,
    TapOutcome,
)
from services.fare_gate.fare_events import TOPIC
from services.fare_gate.fares import RiderFareState

# The advisory lock class of fare-gate's per-account locks (two-int form: its key space is
# separate from the one-bigint locks the outbox relay and migrations take).
ACCOUNT_LOCK_CLASS = 0x46470001
CREDENTIAL_KEY_NAME = "credential_key"
DUE_BATCH_MAX = 500

_TAP_COLUMNS = ("tap_id, request_hash, decision, reason, fare_charged_minor, amount_held_minor, balance_minor, "
                "journey_id, currency")
_JOURNEY_COLUMNS = ("journey_id, account_id, status, network_id, rider_category, currency, entry_tap_id, "
                    "entry_gate_id, entry_stop_id, route_id, started_at, hold_id, amount_held_minor, incomplete_due_at")


@functools.lru_cache(maxsize=256)
def _render(schema: str, text: str) -> str:
    """A query with `{s}` replaced by the quoted schema, composed once: the tap path runs
    a dozen statements per tap and composing each every time costs more than running it."""
    return sql.SQL(text).format(s=sql.Identifier(schema)).as_string(None)


def _recorded(row: tuple) -> RecordedTap:
    tap_id, request_hash, decision, reason, fare, held, balance, journey_id, currency = row
    outcome = TapOutcome(Decision(decision), Reason(reason), fare, held, balance,
                         str(journey_id) if journey_id else "", currency)
    return RecordedTap(str(tap_id), bytes(request_hash), outcome)


def _journey(row: tuple) -> Journey:
    (journey_id, account_id, status, network_id, category, currency, entry_tap_id, entry_gate_id, entry_stop_id,
     route_id, started_at, hold_id, held, due) = row
    return Journey(str(journey_id), account_id, JourneyStatus(status), network_id, category, currency,
                   str(entry_tap_id), entry_gate_id, entry_stop_id, route_id, started_at, hold_id, held, due)


class Repository:
    def __init__(self, pool: ConnectionPool, *, schema: str) -> None:
        self._pool = pool
        self._schema = schema

    def _q(self, text: str) -> str:
        return _render(self._schema, text)

    # --- outside any account ----------------------------------------------------------------

    def credential_key(self) -> bytes:
        """The key generated at first start (kept in the schema, shared by every replica)."""
        with self._pool.connection() as conn:
            conn.execute(self._q("INSERT INTO {s}.secrets (name, value) VALUES (%s, %s) ON CONFLICT DO NOTHING"),
                         (CREDENTIAL_KEY_NAME, os.urandom(32)))
            return bytes(conn.execute(self._q("SELECT value FROM {s}.secrets WHERE name = %s"),
                                      (CREDENTIAL_KEY_NAME,)).fetchone()[0])

    def record_unmatched_tap(self, tap: Tap, card_hash: bytes, fingerprint: bytes, outcome: TapOutcome,
                             event: Message) -> RecordedTap | None:
        """Record a tap that matched no account; if the tap id is taken meanwhile, return
        what is recorded under it instead (the caller replays or refuses it)."""
        with self._pool.connection() as conn, conn.transaction():
            tx = AccountTx(conn, self._schema)
            if not tx.insert_tap(tap, card_hash, fingerprint, None, outcome, on_conflict_do_nothing=True):
                return tx.find_tap(tap.tap_id)
            tx.enqueue(event)
            tx.flush()
        return None

    def due_journeys(self, now: datetime, *, limit: int) -> list[tuple[str, str]]:
        """(journey id, account id) of open journeys whose exit is overdue, oldest first."""
        with self._pool.connection() as conn:
            rows = conn.execute(self._q(
                "SELECT journey_id, account_id FROM {s}.journeys WHERE status = 'OPEN' AND incomplete_due_at <= %s"
                " ORDER BY incomplete_due_at LIMIT %s"), (now, min(limit, DUE_BATCH_MAX))).fetchall()
        return [(str(j), a) for j, a in rows]

    @contextmanager
    def account_transaction(self, account_id: str, *, lock_timeout_ms: int) -> Iterator[AccountTx]:
        """A transaction holding the account's lock. Its writes are queued and sent in one
        pipeline when the block ends normally, then it commits; on an exception nothing is
        written."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                tx = AccountTx(conn, self._schema, account_id=account_id, lock_timeout_ms=lock_timeout_ms)
                yield tx
                tx.flush()
        except pg_errors.LockNotAvailable as exc:
            raise errors.Unavailable("UNAVAILABLE", "another tap of this account is still being decided; retry "
                                     "with the same tap id") from exc
        except pg_errors.UniqueViolation as exc:
            if exc.diag.constraint_name != "taps_pkey":
                raise
            # The same tap id, at the same moment, from a card of another account.
            raise errors.Conflict("IDEMPOTENCY_CONFLICT", "this tap id was just recorded for another tap") from exc
        except psycopg.OperationalError as exc:  # includes the pool's timeout
            raise errors.Unavailable("UNAVAILABLE", f"PostgreSQL is unreachable: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a tap needs to know about its account, read in one round trip under the lock."""

    recorded: RecordedTap | None  # the tap id, if a racing twin already recorded it
    last_opening: tuple[datetime, TapOutcome] | None  # for double taps
    open_journey: Journey | None
    fare_state: RiderFareState
    last_transfer_id: str | None  # the last wallet transfer that charged the rider a fare


class AccountTx:
    """One account's transaction: the lock is taken by the first read (`snapshot` or
    `open_journey`), reads go out pipelined, writes are queued until `flush`."""

    def __init__(self, conn: psycopg.Connection, schema: str, *, account_id: str | None = None,
                 lock_timeout_ms: int = 1000) -> None:
        self.conn = conn
        self._schema = schema
        self._account_id = account_id
        self._lock_timeout_ms = lock_timeout_ms
        self._locked = account_id is None
        self._writes: list[tuple[str, Callable[[], Any], int | None]] = []

    def _q(self, text: str) -> str:
        return _render(self._schema, text)

    def _lock(self) -> None:
        """Queue the lock statement (in a pipeline it goes out with the first read). The
        select list is evaluated left to right, so the wait is bounded before it begins."""
        if not self._locked:
            self.conn.execute("SELECT set_config('lock_timeout', %s, true), pg_advisory_xact_lock(%s, hashtext(%s))",
                              (f"{self._lock_timeout_ms}ms", ACCOUNT_LOCK_CLASS, self._account_id))
            self._locked = True

    # --- reads ----------------------------------------------------------------------------

    def snapshot(self, *, tap_id: str, card_hash: bytes, gate_id: str, direction: int, around: datetime,
                 double_tap_window_s: int) -> Snapshot:
        """Lock the account, then read everything a tap decides on, in one round trip."""
        assert self._account_id is not None
        window = timedelta(seconds=max(double_tap_window_s, 0))
        with self.conn.pipeline():
            self._lock()
            recorded = self.conn.execute(self._q(f"SELECT {_TAP_COLUMNS} FROM {{s}}.taps WHERE tap_id = %s"), (tap_id,))
            opening = self.conn.execute(self._q(
                f"SELECT tapped_at, {_TAP_COLUMNS} FROM {{s}}.taps WHERE credential_hash = %s AND gate_id = %s"
                " AND direction = %s AND decision = 1 AND tapped_at BETWEEN %s AND %s AND %s"
                " ORDER BY tapped_at DESC LIMIT 1"),
                (card_hash, gate_id, direction, around - window, around + window, double_tap_window_s > 0))
            journey = self.conn.execute(self._q(
                f"SELECT {_JOURNEY_COLUMNS} FROM {{s}}.journeys WHERE account_id = %s AND status = 'OPEN'"),
                (self._account_id,))
            state = self.conn.execute(self._q(
                "SELECT state, last_transfer_id FROM {s}.rider_fare_states WHERE account_id = %s"), (self._account_id,))
        recorded_row, opening_row = recorded.fetchone(), opening.fetchone()
        journey_row, state_row = journey.fetchone(), state.fetchone()
        return Snapshot(
            recorded=_recorded(recorded_row) if recorded_row else None,
            last_opening=(opening_row[0], _recorded(opening_row[1:]).outcome) if opening_row else None,
            open_journey=_journey(journey_row) if journey_row else None,
            fare_state=RiderFareState.from_dict(state_row[0]) if state_row else RiderFareState(),
            last_transfer_id=state_row[1] if state_row else None)

    def find_tap(self, tap_id: str) -> RecordedTap | None:
        row = self.conn.execute(self._q(f"SELECT {_TAP_COLUMNS} FROM {{s}}.taps WHERE tap_id = %s"), (tap_id,)).fetchone()
        return _recorded(row) if row else None

    def open_journey(self, account_id: str) -> tuple[Journey | None, RiderFareState, str | None]:
        """Lock the account; its open journey, fare state and last fare transfer."""
        with self.conn.pipeline():
            self._lock()
            journey = self.conn.execute(self._q(
                f"SELECT {_JOURNEY_COLUMNS} FROM {{s}}.journeys WHERE account_id = %s AND status = 'OPEN'"),
                (account_id,))
            state = self.conn.execute(self._q(
                "SELECT state, last_transfer_id FROM {s}.rider_fare_states WHERE account_id = %s"), (account_id,))
        journey_row, state_row = journey.fetchone(), state.fetchone()
        return (_journey(journey_row) if journey_row else None,
                RiderFareState.from_dict(state_row[0]) if state_row else RiderFareState(),
                state_row[1] if state_row else None)

    # --- writes (queued; `flush` sends them in one pipeline) ------------------------------

    def _write(self, what: str, query: str, params: tuple, expect_rows: int) -> None:
        self._writes.append((what, lambda: self.conn.execute(query, params), expect_rows))

    def flush(self) -> None:
        """Send every queued write in one round trip and check each touched what it must."""
        if not self._writes:
            return
        writes, self._writes = self._writes, []
        with self.conn.pipeline():
            cursors = [run() for _, run, _ in writes]
        for (what, _, expect_rows), cursor in zip(writes, cursors):
            if cursor is not None and expect_rows is not None and cursor.rowcount != expect_rows:
                raise RuntimeError(f"{what} touched {cursor.rowcount} rows, not {expect_rows}; the account lock "
                                   "should have prevented this")

    def insert_tap(self, tap: Tap, card_hash: bytes, fingerprint: bytes, account_id: str | None,
                   outcome: TapOutcome, *, on_conflict_do_nothing: bool = False) -> bool:
        """Insert now (not queued) when `on_conflict_do_nothing`: returns False if the id was taken."""
        conflict = " ON CONFLICT (tap_id) DO NOTHING RETURNING 1" if on_conflict_do_nothing else ""
        query = self._q(
            "INSERT INTO {s}.taps (tap_id, request_hash, gate_id, stop_id, direction, route_id, tapped_at,"
            " credential_kind, credential_hash, account_id, decision, reason, journey_id, fare_charged_minor,"
            " amount_held_minor, balance_minor, currency)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)" + conflict)
        params = (tap.tap_id, fingerprint, tap.gate_id, tap.stop_id, int(tap.direction), tap.route_id, tap.tapped_at,
                  int(tap.credential_kind), card_hash, account_id, int(outcome.decision), int(outcome.reason),
                  outcome.journey_id or None, outcome.fare_charged_minor, outcome.amount_held_minor,
                  outcome.balance_minor, outcome.currency)
        if on_conflict_do_nothing:
            return self.conn.execute(query, params).fetchone() is not None
        self._write(f"recording tap {tap.tap_id}", query, params, 1)
        return True

    def insert_journey(self, journey: Journey, end: JourneyEnd | None = None) -> None:
        self._write(f"inserting journey {journey.journey_id}", self._q(
            "INSERT INTO {s}.journeys (journey_id, account_id, status, network_id, rider_category, currency,"
            " entry_tap_id, entry_gate_id, entry_stop_id, route_id, started_at, hold_id, amount_held_minor,"
            " incomplete_due_at, ended_at, fare_minor, fare_product_id, transfer_id, note, closed_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"),
            (journey.journey_id, journey.account_id, (end.status if end else journey.status).value,
             journey.network_id, journey.rider_category, journey.currency, journey.entry_tap_id,
             journey.entry_gate_id, journey.entry_stop_id, journey.route_id, journey.started_at, journey.hold_id,
             journey.amount_held_minor, journey.incomplete_due_at,
             end.ended_at if end else None, end.fare_minor if end else None, end.fare_product_id if end else None,
             (end.transfer_id or None) if end else None, end.note if end else None, end.closed_at if end else None),
            1)

    def close_journey(self, journey_id: str, end: JourneyEnd) -> None:
        self._write(f"closing journey {journey_id}", self._q(
            "UPDATE {s}.journeys SET status = %s, exit_tap_id = %s, exit_gate_id = %s, exit_stop_id = %s,"
            " ended_at = %s, fare_minor = %s, fare_product_id = %s, transfer_id = %s, note = %s, closed_at = %s"
            " WHERE journey_id = %s AND status = 'OPEN'"),
            (end.status.value, end.exit_tap_id, end.exit_gate_id, end.exit_stop_id, end.ended_at, end.fare_minor,
             end.fare_product_id, end.transfer_id or None, end.note, end.closed_at, journey_id), 1)

    def save_fare_state(self, account_id: str, state: RiderFareState, *, feed_version: str,
                        last_transfer_id: str | None) -> None:
        self._write(f"saving the fare state of {account_id}", self._q(
            "INSERT INTO {s}.rider_fare_states (account_id, state, feed_version, last_transfer_id, updated_at)"
            " VALUES (%s, %s, %s, %s, now()) ON CONFLICT (account_id) DO UPDATE SET state = excluded.state,"
            " feed_version = excluded.feed_version, last_transfer_id = excluded.last_transfer_id, updated_at = now()"),
            (account_id, Jsonb(state.to_dict()), feed_version, last_transfer_id), 1)

    def enqueue(self, envelope: Message) -> None:
        """Queue an outbox event to commit with the tap (libs.outbox writes the row)."""
        self._writes.append(("enqueueing an event", lambda: outbox.enqueue(self.conn, self._schema, TOPIC, envelope),
                             None))
