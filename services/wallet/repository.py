"""The wallet's PostgreSQL adapter: every SQL statement the wallet runs, and nothing else.

Functions take an open connection inside the caller's transaction; the service layer
(`services.wallet.ledger`) decides what to lock and when to commit. Statements name tables
through the schema given to `Repository`, so tests can run the wallet in scratch schemas.
Balances are never written here: inserting transfers, holds and hold resolutions moves
them through the triggers of migrations/001_ledger.sql.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from datetime import datetime

import psycopg

from services.wallet.domain import (
    Account,
    AccountKind,
    AccountStatus,
    BlockReason,
    Card,
    HistoryEntry,
    Hold,
    HoldStatus,
    Party,
    SYSTEM_ID_PREFIX,
    SplitLine,
    Transfer,
    TransferKind,
    TransferRequest,
)

_SCHEMA = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

_ACCOUNT_COLUMNS = (
    "id, kind, currency, floor_minor, balance_minor, pending_debits_minor, pending_credits_minor, rider_category,"
    " category_expires_at, owner_id, status, block_reason, created_at, request_hash"
)
_TRANSFER_COLUMNS = (
    "id, debit_account_id, credit_account_id, amount_minor, currency, kind, coalesce(hold_id, ''),"
    " coalesce(corrects_transfer_id, ''), reference, posted_at, debit_balance_after_minor,"
    " credit_balance_after_minor, request_hash"
)
_HOLD_COLUMNS = (
    "h.id, h.debit_account_id, h.credit_account_id, h.amount_minor, h.currency, h.kind, h.reference, h.created_at,"
    " h.expires_at, h.request_hash, r.outcome, r.posted_amount_minor, r.transfer_id, r.resolved_at, r.request_hash"
)


def _account(row: tuple) -> Account:
    (account_id, kind, currency, floor_minor, balance, pending_debits, pending_credits, category, category_expires_at,
     owner_id, status, block_reason, created_at, request_hash) = row
    return Account(
        account_id=account_id, kind=AccountKind(kind), currency=currency, floor_minor=floor_minor,
        balance_minor=balance, pending_debits_minor=pending_debits, pending_credits_minor=pending_credits,
        rider_category=category, category_expires_at=category_expires_at, owner_id=owner_id,
        status=AccountStatus(status), block_reason=BlockReason(block_reason) if block_reason else None,
        created_at=created_at, request_hash=bytes(request_hash),
    )


def _hold(row: tuple) -> Hold:
    (hold_id, debit, credit, amount, currency, kind, reference, created_at, expires_at, request_hash, outcome,
     posted_amount, transfer_id, resolved_at, resolution_hash) = row
    return Hold(
        hold_id=hold_id, debit_account_id=debit, credit_account_id=credit, amount_minor=amount, currency=currency,
        kind=TransferKind(kind), reference=reference, created_at=created_at, expires_at=expires_at,
        request_hash=bytes(request_hash), status=HoldStatus(outcome) if outcome else HoldStatus.PENDING,
        posted_amount_minor=posted_amount or 0, transfer_id=transfer_id or "", resolved_at=resolved_at,
        resolution_hash=bytes(resolution_hash) if resolution_hash is not None else None,
    )


class Repository:
    """SQL for one schema (`wallet` in production, a scratch schema in tests)."""

    def __init__(self, schema: str) -> None:
        if not _SCHEMA.match(schema):
            raise ValueError(f"bad schema name {schema!r}")
        self.schema = schema
        self._s = f'"{schema}"'

    def _q(self, text: str) -> str:
        return text.replace("{s}", self._s)

    # --- accounts -------------------------------------------------------------------------

    def lock_accounts(self, conn: psycopg.Connection, account_ids: Collection[str]) -> dict[str, Account]:
        """Lock the named accounts in id order (the one order every transaction uses, so two
        transactions never wait on each other in a cycle) and return those that exist."""
        rows = conn.execute(self._q(
            f"SELECT {_ACCOUNT_COLUMNS} FROM {{s}}.accounts WHERE id = ANY(%s) ORDER BY id FOR NO KEY UPDATE"),
            (sorted(set(account_ids)),)).fetchall()
        return {row[0]: _account(row) for row in rows}

    def get_accounts(self, conn: psycopg.Connection, account_ids: Collection[str]) -> dict[str, Account]:
        rows = conn.execute(self._q(f"SELECT {_ACCOUNT_COLUMNS} FROM {{s}}.accounts WHERE id = ANY(%s)"),
                            (list(set(account_ids)),)).fetchall()
        return {row[0]: _account(row) for row in rows}

    def lock_accounts_but_system(self, conn: psycopg.Connection, account_ids: Collection[str]) -> dict[str, Account]:
        """Lock the named accounts in id order, except system accounts, which are read as last
        committed and left unlocked; return those that exist, in one round trip.

        System accounts have no floor and no stored-value limit, so no check the service makes
        depends on their balance; they are the hot accounts every fare or payment credits. The
        row lock on one is taken only by the balance UPDATE of the transfers trigger, the last
        statement before the commit, so concurrent fares queue on it for the shortest time.
        Every transaction takes its explicit locks (never a system account) before any
        trigger lock (always a system account), so the two kinds of lock never wait on each
        other in a cycle."""
        ids = set(account_ids)
        system = sorted(a for a in ids if a.startswith(SYSTEM_ID_PREFIX))
        others = sorted(ids.difference(system))
        if not system:
            return self.lock_accounts(conn, others)
        rows = conn.execute(self._q(
            f"WITH locked AS (SELECT {_ACCOUNT_COLUMNS} FROM {{s}}.accounts WHERE id = ANY(%s) ORDER BY id"
            " FOR NO KEY UPDATE)"
            f" SELECT * FROM locked UNION ALL SELECT {_ACCOUNT_COLUMNS} FROM {{s}}.accounts WHERE id = ANY(%s)"),
            (others, system)).fetchall()
        return {row[0]: _account(row) for row in rows}

    def get_account(self, conn: psycopg.Connection, account_id: str) -> Account | None:
        row = conn.execute(self._q(f"SELECT {_ACCOUNT_COLUMNS} FROM {{s}}.accounts WHERE id = %s"),
                           (account_id,)).fetchone()
        return _account(row) if row else None

    def insert_account(self, conn: psycopg.Connection, *, account_id: str, kind: AccountKind, currency: str,
                       floor_minor: int | None, rider_category: str, category_expires_at: datetime | None,
                       owner_id: str, request_hash: bytes, created_at: datetime) -> Account | None:
        """Insert an account; None when the id is taken already."""
        row = conn.execute(self._q(
            "INSERT INTO {s}.accounts (id, kind, currency, floor_minor, rider_category, category_expires_at, owner_id,"
            " request_hash, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            f" ON CONFLICT (id) DO NOTHING RETURNING {_ACCOUNT_COLUMNS}"),
            (account_id, kind.value, currency, floor_minor, rider_category, category_expires_at, owner_id,
             request_hash, created_at)).fetchone()
        return _account(row) if row else None

    def set_status(self, conn: psycopg.Connection, account_id: str, status: AccountStatus,
                   reason: BlockReason | None, note: str, at: datetime) -> Account:
        row = conn.execute(self._q(
            "UPDATE {s}.accounts SET status = %s, block_reason = %s, block_note = %s, status_changed_at = %s"
            f" WHERE id = %s RETURNING {_ACCOUNT_COLUMNS}"),
            (status.value, reason.value if reason else None, note, at, account_id)).fetchone()
        return _account(row)

    def blocked_deny_entries(self, conn: psycopg.Connection) -> tuple[list[str], list[bytes]]:
        """Blocked account ids and the hashes of the cards live-linked to them."""
        accounts = [r[0] for r in conn.execute(self._q("SELECT id FROM {s}.accounts WHERE status = 'BLOCKED'"))]
        cards = [bytes(r[0]) for r in conn.execute(self._q(
            "SELECT c.card_hash FROM {s}.cards c JOIN {s}.accounts a ON a.id = c.account_id"
            " WHERE a.status = 'BLOCKED' AND c.unlinked_at IS NULL"))]
        return accounts, cards

    # --- transfers ------------------------------------------------------------------------

    def find_transfers(self, conn: psycopg.Connection, transfer_ids: Collection[str]) -> dict[str, Transfer]:
        rows = conn.execute(self._q(f"SELECT {_TRANSFER_COLUMNS} FROM {{s}}.transfers WHERE id = ANY(%s)"),
                            (list(transfer_ids),)).fetchall()
        if not rows:
            return {}
        splits = self._splits(conn, [r[0] for r in rows])
        return {row[0]: self._transfer(row, splits.get(row[0], ())) for row in rows}

    @staticmethod
    def _transfer(row: tuple, splits: Sequence[SplitLine]) -> Transfer:
        (transfer_id, debit, credit, amount, currency, kind, hold_id, corrects, reference, posted_at,
         debit_after, credit_after, request_hash) = row
        return Transfer(
            transfer_id=transfer_id, debit_account_id=debit, credit_account_id=credit, amount_minor=amount,
            currency=currency, kind=TransferKind(kind), splits=tuple(splits), hold_id=hold_id,
            corrects_transfer_id=corrects, reference=reference, posted_at=posted_at,
            debit_balance_after_minor=debit_after, credit_balance_after_minor=credit_after,
            request_hash=bytes(request_hash),
        )

    def _splits(self, conn: psycopg.Connection, transfer_ids: Sequence[str]) -> dict[str, list[SplitLine]]:
        found: dict[str, list[SplitLine]] = {}
        for transfer_id, party, party_id, amount, currency, contract_id, version in conn.execute(self._q(
                "SELECT transfer_id, party, party_id, amount_minor, currency, contract_id, contract_version"
                " FROM {s}.transfer_splits WHERE transfer_id = ANY(%s) ORDER BY transfer_id, line_no"),
                (list(transfer_ids),)):
            found.setdefault(transfer_id, []).append(SplitLine(Party(party), party_id, amount, currency, contract_id,
                                                               version))
        return found

    def existing_transfer_ids(self, conn: psycopg.Connection, transfer_ids: Collection[str]) -> set[str]:
        return {r[0] for r in conn.execute(self._q("SELECT id FROM {s}.transfers WHERE id = ANY(%s)"),
                                           (list(transfer_ids),))}

    def existing_hold_ids(self, conn: psycopg.Connection, hold_ids: Collection[str]) -> set[str]:
        return {r[0] for r in conn.execute(self._q("SELECT id FROM {s}.holds WHERE id = ANY(%s)"), (list(hold_ids),))}

    def queue_transfers(self, conn: psycopg.Connection, requests: Sequence[TransferRequest],
                        hashes: Sequence[bytes], posted_at: datetime, *, hold_id: str | None = None,
                        hold_ids: Sequence[str | None] | None = None) -> Callable[[], list[Transfer]]:
        """Insert transfers in order (the trigger moves each one's balances) and their splits,
        without reading the results: the returned function reads them. In pipeline mode the
        inserts are only queued, and go out with whatever follows them (the ledger's balance
        check and COMMIT); the function then reads them after that sync.

        `hold_id` is the hold every transfer posts, or `hold_ids` one per transfer."""
        holds = list(hold_ids) if hold_ids is not None else [hold_id] * len(requests)
        transfers = conn.cursor()
        transfers.executemany(self._q(
            "INSERT INTO {s}.transfers (id, debit_account_id, credit_account_id, amount_minor, currency, kind, hold_id,"
            " corrects_transfer_id, reference, request_hash, posted_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " RETURNING debit_balance_after_minor, credit_balance_after_minor"),
            [(r.transfer_id, r.debit_account_id, r.credit_account_id, r.amount_minor, r.currency, r.kind.value, held,
              r.corrects_transfer_id or None, r.reference, h, posted_at)
             for r, h, held in zip(requests, hashes, holds, strict=True)],
            returning=True)
        split_rows = [
            (r.transfer_id, number, s.party.value, s.party_id, s.amount_minor, s.currency, s.contract_id,
             s.contract_version)
            for r in requests for number, s in enumerate(r.splits)
        ]
        if split_rows:
            conn.cursor().executemany(self._q(
                "INSERT INTO {s}.transfer_splits (transfer_id, line_no, party, party_id, amount_minor, currency,"
                " contract_id, contract_version) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"), split_rows)

        def read() -> list[Transfer]:
            afters = [result.fetchone() for result in transfers.results()]
            return [
                Transfer(
                    transfer_id=r.transfer_id, debit_account_id=r.debit_account_id,
                    credit_account_id=r.credit_account_id, amount_minor=r.amount_minor, currency=r.currency,
                    kind=r.kind, splits=r.splits, hold_id=held or "", corrects_transfer_id=r.corrects_transfer_id,
                    reference=r.reference, posted_at=posted_at, debit_balance_after_minor=after[0],
                    credit_balance_after_minor=after[1], request_hash=h,
                )
                for r, h, held, after in zip(requests, hashes, holds, afters, strict=True)
            ]

        return read

    def assert_transfer_balances(self, conn: psycopg.Connection, transfer_ids: Sequence[str],
                                 planned: Sequence[tuple[int | None, int | None]]) -> None:
        """Have the database compare the transfers' balances with those planned (None: not
        compared) and abort the transaction on any difference (migration 100). Queued, in
        pipeline mode, like any statement."""
        conn.execute(self._q("SELECT {s}.assert_transfer_balances(%s::text[], %s::bigint[], %s::bigint[])"),
                     (list(transfer_ids), [d for d, _ in planned], [c for _, c in planned]))

    # --- holds ----------------------------------------------------------------------------

    def get_holds(self, conn: psycopg.Connection, hold_ids: Collection[str]) -> dict[str, Hold]:
        rows = conn.execute(self._q(
            f"SELECT {_HOLD_COLUMNS} FROM {{s}}.holds h LEFT JOIN {{s}}.hold_resolutions r ON r.hold_id = h.id"
            " WHERE h.id = ANY(%s)"), (list(hold_ids),)).fetchall()
        return {row[0]: _hold(row) for row in rows}

    def get_hold(self, conn: psycopg.Connection, hold_id: str) -> Hold | None:
        return self.get_holds(conn, [hold_id]).get(hold_id)

    def insert_hold(self, conn: psycopg.Connection, *, hold_id: str, debit_account_id: str, credit_account_id: str,
                    amount_minor: int, currency: str, kind: TransferKind, reference: str, request_hash: bytes,
                    created_at: datetime, expires_at: datetime) -> Hold:
        conn.execute(self._q(
            "INSERT INTO {s}.holds (id, debit_account_id, credit_account_id, amount_minor, currency, kind, reference,"
            " request_hash, created_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"),
            (hold_id, debit_account_id, credit_account_id, amount_minor, currency, kind.value, reference, request_hash,
             created_at, expires_at))
        return Hold(hold_id=hold_id, debit_account_id=debit_account_id, credit_account_id=credit_account_id,
                    amount_minor=amount_minor, currency=currency, kind=kind, reference=reference,
                    created_at=created_at, expires_at=expires_at, request_hash=request_hash)

    def insert_resolution(self, conn: psycopg.Connection, hold_id: str, outcome: HoldStatus, at: datetime, *,
                          posted_amount_minor: int | None = None, transfer_id: str | None = None,
                          request_hash: bytes | None = None) -> None:
        """Resolve a pending hold once; the trigger releases its reservation."""
        conn.execute(self._q(
            "INSERT INTO {s}.hold_resolutions (hold_id, outcome, posted_amount_minor, transfer_id, request_hash,"
            " resolved_at) VALUES (%s, %s, %s, %s, %s, %s)"),
            (hold_id, outcome.value, posted_amount_minor, transfer_id, request_hash, at))

    def due_holds(self, conn: psycopg.Connection, now: datetime, *, debit_account_ids: Collection[str] | None = None,
                  limit: int) -> list[tuple[str, str, str]]:
        """(hold id, debit account, credit account) of pending holds whose expiry has come."""
        if debit_account_ids is None:
            rows = conn.execute(self._q(
                "SELECT hold_id, debit_account_id, credit_account_id FROM {s}.pending_holds"
                " WHERE expires_at <= %s ORDER BY expires_at, hold_id LIMIT %s"), (now, limit))
        else:
            rows = conn.execute(self._q(
                "SELECT hold_id, debit_account_id, credit_account_id FROM {s}.pending_holds"
                " WHERE debit_account_id = ANY(%s) AND expires_at <= %s ORDER BY expires_at, hold_id LIMIT %s"),
                (list(debit_account_ids), now, limit))
        return [tuple(r) for r in rows]

    def pending_holds_of(self, conn: psycopg.Connection, account_id: str, limit: int) -> list[Hold]:
        rows = conn.execute(self._q(
            f"SELECT {_HOLD_COLUMNS} FROM {{s}}.pending_holds p JOIN {{s}}.holds h ON h.id = p.hold_id"
            f" LEFT JOIN {{s}}.hold_resolutions r ON r.hold_id = h.id"
            " WHERE p.debit_account_id = %s ORDER BY h.created_at, h.id LIMIT %s"), (account_id, limit)).fetchall()
        return [_hold(row) for row in rows]

    # --- cards ----------------------------------------------------------------------------

    def live_card_by_hash(self, conn: psycopg.Connection, card_hash: bytes) -> Card | None:
        row = conn.execute(self._q(
            "SELECT id, account_id, card_hash, label, linked_at, unlinked_at FROM {s}.cards"
            " WHERE card_hash = %s AND unlinked_at IS NULL"), (card_hash,)).fetchone()
        return self._card(row) if row else None

    def get_card(self, conn: psycopg.Connection, card_id: str) -> Card | None:
        row = conn.execute(self._q(
            "SELECT id, account_id, card_hash, label, linked_at, unlinked_at FROM {s}.cards WHERE id = %s"),
            (card_id,)).fetchone()
        return self._card(row) if row else None

    def live_cards(self, conn: psycopg.Connection, account_id: str) -> list[Card]:
        rows = conn.execute(self._q(
            "SELECT id, account_id, card_hash, label, linked_at, unlinked_at FROM {s}.cards"
            " WHERE account_id = %s AND unlinked_at IS NULL ORDER BY linked_at, id"), (account_id,)).fetchall()
        return [self._card(r) for r in rows]

    @staticmethod
    def _card(row: tuple) -> Card:
        card_id, account_id, card_hash, label, linked_at, unlinked_at = row
        return Card(card_id, account_id, bytes(card_hash), label, linked_at, unlinked_at)

    def insert_card(self, conn: psycopg.Connection, card: Card) -> None:
        conn.execute(self._q(
            "INSERT INTO {s}.cards (id, account_id, card_hash, label, linked_at) VALUES (%s, %s, %s, %s, %s)"),
            (card.card_id, card.account_id, card.card_hash, card.label, card.linked_at))

    def unlink_card(self, conn: psycopg.Connection, card_id: str, at: datetime) -> None:
        conn.execute(self._q("UPDATE {s}.cards SET unlinked_at = %s WHERE id = %s AND unlinked_at IS NULL"),
                     (at, card_id))

    # --- history --------------------------------------------------------------------------

    def history(self, conn: psycopg.Connection, account_id: str, *, before_seq: int | None,
                start_at: datetime | None, end_at: datetime | None, limit: int) -> list[HistoryEntry]:
        """An account's transfers, newest first, as seen from the account. Each side is read
        through its own index and merged, so a page costs O(limit) whatever the history size."""
        conditions = ["seq < %(before)s"] if before_seq is not None else []
        if start_at is not None:
            conditions.append("posted_at >= %(start)s")
        if end_at is not None:
            conditions.append("posted_at < %(end)s")
        extra = "".join(f" AND {c}" for c in conditions)
        rows = conn.execute(self._q(
            "SELECT t.seq, t.id, t.kind, t.delta, t.balance_after, t.currency, o.kind, t.reference, t.posted_at FROM ("
            "  (SELECT seq, id, kind, -amount_minor AS delta, debit_balance_after_minor AS balance_after, currency,"
            "          credit_account_id AS other, reference, posted_at"
            f"     FROM {{s}}.transfers WHERE debit_account_id = %(account)s{extra} ORDER BY seq DESC LIMIT %(limit)s)"
            "  UNION ALL"
            "  (SELECT seq, id, kind, amount_minor, credit_balance_after_minor, currency, debit_account_id, reference,"
            "          posted_at"
            f"     FROM {{s}}.transfers WHERE credit_account_id = %(account)s{extra} ORDER BY seq DESC LIMIT %(limit)s)"
            ") t JOIN {s}.accounts o ON o.id = t.other ORDER BY t.seq DESC LIMIT %(limit)s"),
            {"account": account_id, "before": before_seq, "start": start_at, "end": end_at, "limit": limit}).fetchall()
        return [
            HistoryEntry(seq=seq, transfer_id=transfer_id, kind=TransferKind(kind), delta_minor=delta,
                         balance_after_minor=after, currency=currency, counterparty_kind=AccountKind(other_kind),
                         reference=reference, posted_at=posted_at)
            for seq, transfer_id, kind, delta, after, currency, other_kind, reference, posted_at in rows
        ]
