"""Fixtures for tests against the real Kafka, PostgreSQL, Redis and stripe-mock.

The stack is started by `make test` (infra/components.sh with CITYTAP_STACK=test) and its
addresses arrive in the CITYTAP_* environment variables. A missing variable is an error,
not a skip: an integration run that silently tests nothing would look green.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql


def required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(f"{name} is not set: run the integration tier through `make test`, which starts the stack")
    return value


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return required_env("CITYTAP_KAFKA_BOOTSTRAP")


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    return required_env("CITYTAP_POSTGRES_DSN")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return required_env("CITYTAP_REDIS_URL")


@pytest.fixture(scope="session")
def stripe_api_base() -> str:
    return required_env("CITYTAP_STRIPE_API_BASE")


@pytest.fixture()
def scratch_schema(postgres_dsn: str) -> Iterator[str]:
    """A fresh, empty schema name for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
