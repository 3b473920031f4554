"""Schema migrations apply to an empty database, are idempotent, and refuse edited files."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from libs.postgres import MigrationError, load_migrations, migrate, migrate_folder

SERVICES = Path(__file__).resolve().parents[2] / "services"


def write(folder: Path, name: str, text: str) -> None:
    (folder / name).write_text(text)


def test_applies_in_order_then_is_idempotent(postgres_dsn: str, scratch_schema: str, tmp_path: Path) -> None:
    write(tmp_path, "001_accounts.sql", "CREATE TABLE accounts (id text PRIMARY KEY, balance bigint NOT NULL);")
    write(tmp_path, "002_seed.sql", "INSERT INTO accounts VALUES ('city', 0);")
    assert migrate_folder(postgres_dsn, scratch_schema, tmp_path) == ["001_accounts.sql", "002_seed.sql"]
    assert migrate_folder(postgres_dsn, scratch_schema, tmp_path) == []
    with psycopg.connect(postgres_dsn) as conn:
        rows = conn.execute(f"SELECT id, balance FROM {scratch_schema}.accounts").fetchall()
        versions = conn.execute(f"SELECT version FROM {scratch_schema}.schema_migrations ORDER BY 1").fetchall()
    assert rows == [("city", 0)]  # the seed ran once
    assert versions == [(1,), (2,)]
    write(tmp_path, "003_more.sql", "ALTER TABLE accounts ADD COLUMN kind text;")
    assert migrate_folder(postgres_dsn, scratch_schema, tmp_path) == ["003_more.sql"]


def test_a_failing_migration_leaves_nothing_half_applied(postgres_dsn: str, scratch_schema: str, tmp_path: Path) -> None:
    write(tmp_path, "001_ok.sql", "CREATE TABLE a (x int);")
    write(tmp_path, "002_bad.sql", "CREATE TABLE b (x int); SELECT no_such_function();")
    with pytest.raises(MigrationError, match="002_bad.sql"):
        migrate_folder(postgres_dsn, scratch_schema, tmp_path)
    with psycopg.connect(postgres_dsn) as conn:
        tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (scratch_schema,))}
    assert tables == {"a", "schema_migrations"}


def test_an_applied_migration_that_changed_is_refused(postgres_dsn: str, scratch_schema: str, tmp_path: Path) -> None:
    write(tmp_path, "001_a.sql", "CREATE TABLE a (x int);")
    migrate_folder(postgres_dsn, scratch_schema, tmp_path)
    write(tmp_path, "001_a.sql", "CREATE TABLE a (x bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        migrate_folder(postgres_dsn, scratch_schema, tmp_path)


def test_bad_file_names_are_refused(tmp_path: Path) -> None:
    write(tmp_path, "init.sql", "SELECT 1;")
    with pytest.raises(MigrationError, match="NNN_description"):
        load_migrations(tmp_path)


@pytest.mark.parametrize("service", ["fare_gate", "wallet", "face", "merchant", "settlement"])
def test_every_service_migrates_from_empty_and_again(postgres_dsn: str, service: str, scratch_schema: str) -> None:
    migrations = load_migrations(SERVICES / service / "migrations")
    with psycopg.connect(postgres_dsn) as conn:
        first = migrate(conn, scratch_schema, migrations)
        second = migrate(conn, scratch_schema, migrations)
    assert first == [m.name for m in migrations]
    assert second == []
