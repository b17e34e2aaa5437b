"""How the apply agents meet failures: passing ones retried, lost connections reopened, an agent's
unexpected error stops the worker."""

from __future__ import annotations

import asyncio
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import psycopg
import pytest

from archsync.errors import ConfigError
from processors.apply_process import _forget_if_broken, passing_failure, retry_delay


def test_failures_that_pass_are_retried_and_others_are_not() -> None:
    assert passing_failure(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert passing_failure(psycopg.errors.DeadlockDetected("deadlock detected"))
    assert passing_failure(psycopg.errors.SerializationFailure("could not serialize access"))
    assert passing_failure(psycopg.InterfaceError("the connection is closed"))
    assert passing_failure(ConfigError("ARCHSYNC_ARCHIVE_DSN", "cannot connect"))
    assert passing_failure(BrokenProcessPool("the applier process died"))
    assert passing_failure(ConnectionResetError())
    assert not passing_failure(psycopg.errors.UndefinedColumn("column does not exist"))
    assert not passing_failure(ValueError("a bug"))
    assert [retry_delay(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert retry_delay(10_000) == 30


def test_an_applier_whose_connection_is_lost_is_forgotten() -> None:
    closed: list[str] = []

    class Conn:
        def __init__(self, broken: bool) -> None:
            self.closed, self.broken = False, broken

        def close(self) -> None:
            closed.append("conn")

    class Applier:
        def __init__(self, broken: bool) -> None:
            self.conn = Conn(broken)

        def close(self) -> None:
            closed.append("applier")
            raise psycopg.OperationalError("gone")  # releasing the origin fails on a lost connection

    assert not _forget_if_broken(Applier(broken=False)) and closed == []
    assert _forget_if_broken(Applier(broken=True)) and closed == ["applier", "conn"]


def test_an_agent_that_crashes_stops_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    from processors import record_producer
    from processors.record_producer import WorkerApp

    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(record_producer.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    app = WorkerApp("archsync-unit-crash", broker="kafka://127.0.0.1:1", web_enabled=False, autodiscover=False)

    @app.agent(app.channel(), name="crashing")
    async def crashing(stream: Any) -> None:
        async for _ in stream:
            pass

    assert crashing._on_error == app._on_agent_error  # every agent of the app gets the handler

    async def run() -> None:
        await app._on_agent_error(crashing, ValueError("a bug"))
        await app._on_agent_error(crashing, ValueError("again"))

    asyncio.run(run())
    assert isinstance(app.agent_crash, ValueError) and str(app.agent_crash) == "a bug"
    assert kills == [(os.getpid(), signal.SIGTERM)]  # once: a clean stop, exit code 70 after it
