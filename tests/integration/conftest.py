"""Integration tests need the real services: they fail loudly, never skip, when those are down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from archsync.settings import Settings
from connectors.kafka_admin import check_broker
from connectors.migrations import apply_migrations
from connectors.postgres import connect

from .pipeline_kit import Pipeline


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def services_up(settings: Settings) -> None:
    """Fail the session early, with the one-line reason, when a service is missing."""
    check_broker(settings.kafka_bootstrap)
    for system in ("oa", "archive"):
        with connect(settings.dsn_for(system), settings.dsn_setting(system), autocommit=True) as conn:
            apply_migrations(conn, system)


@pytest.fixture
def pipeline(settings: Settings, unique: str, tmp_path: Path) -> Iterator[Pipeline]:
    """Both captures and a worker on the test's own topics, slots and publications; cleaned up."""
    p = Pipeline(settings, unique, tmp_path)
    try:
        yield p.start()
    finally:
        p.cleanup()
