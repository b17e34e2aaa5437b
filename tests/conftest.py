"""Shared fixtures. Integration tests run against the real services started by `make services`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from archsync.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent

# The `archsync` processes the tests start run this tree's code, also from a git worktree that shares
# another tree's virtualenv (whose editable install points at that other tree).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


@pytest.fixture(scope="session")
def settings() -> Settings:
    return load_settings()


@pytest.fixture
def unique() -> str:
    """A short unique suffix for topic, slot and table names of one test."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture
def env_with(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """A copy of the environment for subprocesses, with the venv's bin first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{REPO / '.venv' / 'bin'}:{env.get('PATH', '')}"
    yield env
