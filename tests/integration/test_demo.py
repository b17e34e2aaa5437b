"""The README's main command, `archsync demo`, end to end on the real services (a small office)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from archsync.settings import Settings
from connectors.catalog import drop_slot, forget_snapshots
from connectors.postgres import connect
from topology.model import load_topology

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("workers", [1, 2])
def test_demo_runs_and_both_databases_agree(settings: Settings, tmp_path: Path, workers: int) -> None:
    env = {**os.environ, "ARCHSYNC_DEMO_LOG": str(tmp_path / "worker.log")}
    try:
        done = subprocess.run(
            [str(REPO / ".venv" / "bin" / "archsync"), "demo", "--forms", "8", "--workers", str(workers)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        out = done.stdout
        assert "both databases agree       yes" in out
        assert ("2 workers ready (pids" in out) == (workers == 2)
        for line in ("forms approved", "archive items created", "codes written back to OA", "borrowing round trips"):
            assert line in out
    finally:
        # the demo's slots are left for the next demo; in the test suite nobody reads them afterwards
        topology = load_topology()
        for source in topology.sources.values():
            with connect(source.dsn(settings), source.dsn_env, autocommit=True) as conn:
                drop_slot(conn, source.slot, terminate=True)
                forget_snapshots(conn, source.slot)
