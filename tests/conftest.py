"""Test tiers come from folders: tests/unit, tests/grpc, tests/integration, tests/e2e.

Each test gets the marker of its folder, so `pytest -m unit` runs only pure-logic tests.
A session that collects no tests fails instead of passing silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TIERS = ("unit", "grpc", "integration", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


def pytest_collection_finish(session: pytest.Session) -> None:
    if not session.items and not session.config.option.collectonly:
        raise pytest.UsageError("no tests were collected; a run that tests nothing must not pass")
