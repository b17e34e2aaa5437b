"""A broken setting gives one clear line naming the setting, never a stack trace."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path


def run_archsync(args: list[str], env: dict[str, str], repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(repo / ".venv" / "bin" / "archsync"), *args], env=env, capture_output=True, text=True, timeout=60
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], setting: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("archsync: error:")]
    assert len(errors) == 1, result.stderr
    assert setting in errors[0]


def test_unreachable_broker(env_with: dict[str, str], repo: Path) -> None:
    env = {**env_with, "ARCHSYNC_KAFKA_BOOTSTRAP": "127.0.0.1:1"}
    result = run_archsync(["check"], env, repo)
    assert_one_line_error(result, "ARCHSYNC_KAFKA_BOOTSTRAP")
    assert "127.0.0.1:1" in result.stderr


def test_wrong_password(env_with: dict[str, str], repo: Path) -> None:
    env = {**env_with, "ARCHSYNC_OA_DSN": "postgresql://archsync:not-the-password@127.0.0.1:5433/oa"}
    result = run_archsync(["check"], env, repo)
    assert_one_line_error(result, "ARCHSYNC_OA_DSN")
    assert "password authentication failed" in result.stderr
    assert "not-the-password" not in result.stderr


def test_malformed_dsn(env_with: dict[str, str], repo: Path) -> None:
    env = {**env_with, "ARCHSYNC_ARCHIVE_DSN": "archive-db:5434"}
    assert_one_line_error(run_archsync(["db", "init"], env, repo), "ARCHSYNC_ARCHIVE_DSN")


def test_port_taken(env_with: dict[str, str], repo: Path, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {**env_with, "ARCHSYNC_KAFKA_PORT": str(port), "ARCHSYNC_STATE_DIR": str(tmp_path)}
        result = subprocess.run(
            [str(repo / "scripts" / "services.sh"), "up", "kafka"],
            env=env,
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode != 0
    assert f"port {port}" in result.stderr and "taken" in result.stderr
    assert "ARCHSYNC_KAFKA" in result.stderr


def test_malformed_worker_tuning(env_with: dict[str, str], repo: Path) -> None:
    env = {**env_with, "ARCHSYNC_FETCH_MAX_WAIT_MS": "fast"}
    assert_one_line_error(run_archsync(["worker"], env, repo), "ARCHSYNC_FETCH_MAX_WAIT_MS")
    env = {**env_with, "ARCHSYNC_RECOVERY_STALL_SECONDS": "0"}
    assert_one_line_error(run_archsync(["worker"], env, repo), "ARCHSYNC_RECOVERY_STALL_SECONDS")
    env = {**env_with, "ARCHSYNC_STATE_STORE": "redis"}
    assert_one_line_error(run_archsync(["worker"], env, repo), "ARCHSYNC_STATE_STORE")
    env = {**env_with, "ARCHSYNC_STATE_MEMORY_MB": "0"}
    assert_one_line_error(run_archsync(["worker"], env, repo), "ARCHSYNC_STATE_MEMORY_MB")
    env = {**env_with, "ARCHSYNC_WORKER_LINGER_MS": "-1"}
    assert_one_line_error(run_archsync(["worker"], env, repo), "ARCHSYNC_WORKER_LINGER_MS")
