"""PostgreSQL: connection pools, per-service schema migrations, and the event inbox.

Each service owns one schema (its name) in the shared database and never reads another's.
Migrations are plain SQL files `NNN_description.sql` in the service's `migrations/` folder,
applied in order, each in its own transaction, under an advisory lock so two replicas
starting together do not race. Applied migrations are recorded with a checksum; an edited
migration that was already applied is refused rather than silently skipped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

_MIGRATION_NAME = re.compile(r"^(\d{3,})_[a-z0-9_]+\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


class MigrationError(Exception):
    """Migrations cannot be applied: a bad file name, a changed file, or a failing statement."""


def create_pool(dsn: str, *, name: str, min_size: int = 1, max_size: int = 10, timeout_s: float = 5.0) -> ConnectionPool:
    """An open connection pool; `getconn` waits at most `timeout_s` for a free connection."""
    pool = ConnectionPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        timeout=timeout_s,
        name=name,
        kwargs={"application_name": name, "connect_timeout": max(1, int(timeout_s))},
        open=False,
    )
    pool.open(wait=True, timeout=timeout_s)
    return pool


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Path) -> list[Migration]:
    """Read `NNN_name.sql` files from `folder`, refusing stray names and duplicate versions."""
    migrations: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path}: migration files are named NNN_description.sql")
        version = int(match.group(1))
        if version in migrations:
            raise MigrationError(f"{path}: version {version} is used twice")
        migrations[version] = Migration(version, path.name, path.read_text())
    return [migrations[v] for v in sorted(migrations)]


def migrate(conn: psycopg.Connection, schema: str, migrations: list[Migration]) -> list[str]:
    """Apply pending `migrations` to `schema`; return the names applied now (empty if none)."""
    if not _SCHEMA_NAME.match(schema):
        raise MigrationError(f"bad schema name {schema!r}")
    lock_key = int.from_bytes(hashlib.sha256(f"citytap.migrate.{schema}".encode()).digest()[:8], "big", signed=True)
    applied_now: list[str] = []
    conn.autocommit = True
    conn.execute("SELECT pg_advisory_lock(%s)", (lock_key,))
    try:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(sql.Identifier(schema)))
        rows = conn.execute(
            sql.SQL("SELECT version, name, checksum FROM {}.schema_migrations").format(sql.Identifier(schema))
        ).fetchall()
        done = {version: (name, checksum) for version, name, checksum in rows}
        for migration in migrations:
            if migration.version in done:
                if done[migration.version][1] != migration.checksum:
                    raise MigrationError(
                        f"{schema}: migration {migration.name} changed after it was applied; add a new migration instead"
                    )
                continue
            try:
                with conn.transaction():
                    conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(schema)))
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        sql.SQL("INSERT INTO {}.schema_migrations (version, name, checksum) VALUES (%s, %s, %s)").format(
                            sql.Identifier(schema)
                        ),
                        (migration.version, migration.name, migration.checksum),
                    )
            except psycopg.Error as exc:
                raise MigrationError(f"{schema}: {migration.name} failed: {exc}") from exc
            applied_now.append(migration.name)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key,))
    return applied_now


def migrate_folder(dsn: str, schema: str, folder: Path) -> list[str]:
    """Connect to `dsn`, apply the migrations in `folder` to `schema`, and disconnect."""
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return migrate(conn, schema, load_migrations(folder))


class PostgresInbox:
    """Inbox backed by a `<schema>.inbox_events` table: the handler's writes and the event id
    commit in one transaction, so a crash either keeps both or neither."""

    def __init__(self, pool: ConnectionPool, *, schema: str, consumer: str) -> None:
        if not _SCHEMA_NAME.match(schema):
            raise ValueError(f"bad schema name {schema!r}")
        self._pool = pool
        self._consumer = consumer
        self._table = sql.Identifier(schema, "inbox_events")
        with pool.connection() as conn:
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (consumer text NOT NULL, event_id text NOT NULL,"
                " handled_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer, event_id))"
            ).format(self._table))

    def process(self, event_id: str, fn: Callable[[Any], None]) -> bool:
        with self._pool.connection() as conn, conn.transaction():
            inserted = conn.execute(
                sql.SQL("INSERT INTO {} (consumer, event_id) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1").format(
                    self._table
                ),
                (self._consumer, event_id),
            ).fetchone()
            if inserted is None:
                return False
            fn(conn)
            return True

    def process_many(self, items: Sequence[tuple[str, Callable[[Any], None]]]) -> list[bool]:
        """`process` for each item in order, in ONE transaction: one commit for the lot."""
        insert = sql.SQL("INSERT INTO {} (consumer, event_id) VALUES (%s, %s) ON CONFLICT DO NOTHING RETURNING 1").format(
            self._table)
        done = []
        with self._pool.connection() as conn, conn.transaction():
            for event_id, fn in items:
                fresh = conn.execute(insert, (self._consumer, event_id)).fetchone() is not None
                if fresh:
                    fn(conn)
                done.append(fresh)
        return done
