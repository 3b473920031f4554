"""The face service's PostgreSQL adapter: every SQL statement it runs, and nothing else.

Functions take an open connection inside the caller's transaction; `records.FaceRecords`
decides what to lock and when to commit. Tables are named through the schema given to
`Repository`, so tests run the service in scratch schemas. Templates cross this module only
as ciphertext (`crypto.Sealed`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg import sql

from services.face.crypto import Sealed
from services.face.domain import Channel, Consent, Purpose

_SCHEMA = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_CONSENT_COLUMNS = "consent_id, account_id, purpose, retention_days, channel, notice_version, given_at, withdrawn_at"


@dataclass(frozen=True)
class StoredTemplate:
    account_id: str
    label: int
    sealed: Sealed
    enrolled_at: datetime
    retain_until: datetime


def _consent(row: tuple) -> Consent:
    consent_id, account_id, purpose, retention_days, channel, notice_version, given_at, withdrawn_at = row
    return Consent(consent_id=consent_id, account_id=account_id, purpose=Purpose(purpose),
                   retention_days=retention_days, channel=Channel(channel), notice_version=notice_version,
                   given_at=given_at, withdrawn_at=withdrawn_at)


def _template(row: tuple) -> StoredTemplate:
    account_id, label, key_id, nonce, ciphertext, enrolled_at, retain_until = row
    return StoredTemplate(account_id, int(label), Sealed(key_id, bytes(nonce), bytes(ciphertext)), enrolled_at,
                          retain_until)


class Repository:
    def __init__(self, schema: str) -> None:
        if not _SCHEMA.match(schema):
            raise ValueError(f"bad schema name {schema!r}")
        self.schema = schema
        self._consents = sql.Identifier(schema, "consents")
        self._templates = sql.Identifier(schema, "templates")
        self._outbox = sql.Identifier(schema, "outbox_events")

    # --- consents ---------------------------------------------------------------------------

    def consent_by_id(self, conn: psycopg.Connection, consent_id: str) -> tuple[Consent, bytes] | None:
        row = conn.execute(sql.SQL("SELECT " + _CONSENT_COLUMNS + ", request_hash FROM {} WHERE consent_id = %s")
                           .format(self._consents), (consent_id,)).fetchone()
        return None if row is None else (_consent(row[:8]), bytes(row[8]))

    def insert_consent(self, conn: psycopg.Connection, consent: Consent, request_hash: bytes,
                       recorded_at: datetime) -> None:
        conn.execute(sql.SQL(
            "INSERT INTO {} (consent_id, account_id, purpose, retention_days, channel, notice_version, given_at,"
            " recorded_at, request_hash) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)").format(self._consents),
            (consent.consent_id, consent.account_id, consent.purpose.value, consent.retention_days,
             consent.channel.value, consent.notice_version, consent.given_at, recorded_at, request_hash))

    def lock_active_consents(self, conn: psycopg.Connection, account_id: str) -> list[Consent]:
        """The account's consents in force, locked until the transaction ends, so a
        concurrent deletion cannot withdraw them halfway through an enrolment."""
        rows = conn.execute(sql.SQL("SELECT " + _CONSENT_COLUMNS + " FROM {} WHERE account_id = %s"
                                    " AND withdrawn_at IS NULL ORDER BY consent_id FOR UPDATE")
                            .format(self._consents), (account_id,)).fetchall()
        return [_consent(row) for row in rows]

    def active_consents(self, conn: psycopg.Connection, account_id: str) -> list[Consent]:
        rows = conn.execute(sql.SQL("SELECT " + _CONSENT_COLUMNS + " FROM {} WHERE account_id = %s"
                                    " AND withdrawn_at IS NULL").format(self._consents), (account_id,)).fetchall()
        return [_consent(row) for row in rows]

    def withdraw_consents(self, conn: psycopg.Connection, account_id: str, at: datetime) -> int:
        return conn.execute(sql.SQL("UPDATE {} SET withdrawn_at = %s WHERE account_id = %s AND withdrawn_at IS NULL")
                            .format(self._consents), (at, account_id)).rowcount

    # --- templates --------------------------------------------------------------------------

    def upsert_template(self, conn: psycopg.Connection, account_id: str, sealed: Sealed, enrolled_at: datetime,
                        retain_until: datetime) -> int:
        """Store the account's template, replacing any earlier one (which keeps its label)."""
        row = conn.execute(sql.SQL(
            "INSERT INTO {} (account_id, key_id, nonce, ciphertext, enrolled_at, last_used_at, retain_until)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (account_id) DO UPDATE SET key_id = EXCLUDED.key_id,"
            " nonce = EXCLUDED.nonce, ciphertext = EXCLUDED.ciphertext, enrolled_at = EXCLUDED.enrolled_at,"
            " last_used_at = EXCLUDED.last_used_at, retain_until = EXCLUDED.retain_until RETURNING label")
            .format(self._templates),
            (account_id, sealed.key_id, sealed.nonce, sealed.ciphertext, enrolled_at, enrolled_at, retain_until),
        ).fetchone()
        return int(row[0])

    def template_label(self, conn: psycopg.Connection, account_id: str, *, lock: bool = False) -> int | None:
        row = conn.execute(sql.SQL("SELECT label FROM {} WHERE account_id = %s" + (" FOR UPDATE" if lock else ""))
                           .format(self._templates), (account_id,)).fetchone()
        return None if row is None else int(row[0])

    def touch_template(self, conn: psycopg.Connection, account_id: str, used_at: datetime,
                       retain_until: datetime) -> None:
        conn.execute(sql.SQL("UPDATE {} SET last_used_at = %s, retain_until = greatest(retain_until, %s)"
                             " WHERE account_id = %s").format(self._templates), (used_at, retain_until, account_id))

    def extend_retention(self, conn: psycopg.Connection, account_id: str, retention_days: int) -> None:
        conn.execute(sql.SQL("UPDATE {} SET retain_until = greatest(retain_until,"
                             " last_used_at + make_interval(days => %s)) WHERE account_id = %s")
                     .format(self._templates), (retention_days, account_id))

    def delete_template(self, conn: psycopg.Connection, account_id: str, *,
                        due_at: datetime | None = None) -> int | None:
        """Delete the account's template (only if its retention ended by `due_at`, when given)."""
        if due_at is None:
            row = conn.execute(sql.SQL("DELETE FROM {} WHERE account_id = %s RETURNING label").format(self._templates),
                               (account_id,)).fetchone()
        else:
            row = conn.execute(sql.SQL("DELETE FROM {} WHERE account_id = %s AND retain_until <= %s RETURNING label")
                               .format(self._templates), (account_id, due_at)).fetchone()
        return None if row is None else int(row[0])

    def due_for_expiry(self, conn: psycopg.Connection, now: datetime, limit: int) -> list[str]:
        rows = conn.execute(sql.SQL("SELECT account_id FROM {} WHERE retain_until <= %s ORDER BY retain_until"
                                    " LIMIT %s FOR UPDATE SKIP LOCKED").format(self._templates),
                            (now, limit)).fetchall()
        return [row[0] for row in rows]

    def under_other_keys(self, conn: psycopg.Connection, current_key_id: str, limit: int) -> list[StoredTemplate]:
        rows = conn.execute(sql.SQL(
            "SELECT account_id, label, key_id, nonce, ciphertext, enrolled_at, retain_until FROM {}"
            " WHERE key_id <> %s ORDER BY label LIMIT %s FOR UPDATE SKIP LOCKED").format(self._templates),
            (current_key_id, limit)).fetchall()
        return [_template(row) for row in rows]

    def reseal(self, conn: psycopg.Connection, account_id: str, sealed: Sealed) -> None:
        conn.execute(sql.SQL("UPDATE {} SET key_id = %s, nonce = %s, ciphertext = %s WHERE account_id = %s")
                     .format(self._templates), (sealed.key_id, sealed.nonce, sealed.ciphertext, account_id))

    def all_templates(self, conn: psycopg.Connection, batch: int = 10_000) -> Iterator[StoredTemplate]:
        """Every template, streamed in batches through a server-side cursor."""
        with conn.cursor(name="face_templates_scan") as cursor:
            cursor.itersize = batch
            cursor.execute(sql.SQL("SELECT account_id, label, key_id, nonce, ciphertext, enrolled_at, retain_until"
                                   " FROM {} ORDER BY label").format(self._templates))
            for row in cursor:
                yield _template(row)

    def templates_enrolled_since(self, conn: psycopg.Connection, since: datetime) -> list[StoredTemplate]:
        rows = conn.execute(sql.SQL("SELECT account_id, label, key_id, nonce, ciphertext, enrolled_at, retain_until"
                                    " FROM {} WHERE enrolled_at >= %s ORDER BY label").format(self._templates),
                            (since,)).fetchall()
        return [_template(row) for row in rows]

    def all_labels(self, conn: psycopg.Connection) -> set[int]:
        return {int(row[0]) for row in conn.execute(sql.SQL("SELECT label FROM {}").format(self._templates))}

    def event_recorded(self, conn: psycopg.Connection, event_id: str) -> bool:
        return conn.execute(sql.SQL("SELECT 1 FROM {} WHERE event_id = %s").format(self._outbox),
                            (event_id,)).fetchone() is not None
