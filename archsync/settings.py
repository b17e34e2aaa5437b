"""Process settings read from the environment, with the local-services defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from archsync.errors import ConfigError

DEFAULT_OA_DSN = "postgresql://archsync:archsync@127.0.0.1:5433/oa"
DEFAULT_ARCHIVE_DSN = "postgresql://archsync:archsync@127.0.0.1:5434/archive"
DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"

ENV_OA_DSN = "ARCHSYNC_OA_DSN"
ENV_ARCHIVE_DSN = "ARCHSYNC_ARCHIVE_DSN"
ENV_KAFKA_BOOTSTRAP = "ARCHSYNC_KAFKA_BOOTSTRAP"
ENV_TOPIC_PREFIX = "ARCHSYNC_TOPIC_PREFIX"
ENV_METRICS_PORT = "ARCHSYNC_METRICS_PORT"


@dataclass(frozen=True)
class Settings:
    """Where archsync finds its databases and its broker."""

    oa_dsn: str = DEFAULT_OA_DSN
    archive_dsn: str = DEFAULT_ARCHIVE_DSN
    kafka_bootstrap: str = DEFAULT_KAFKA_BOOTSTRAP
    topic_prefix: str = "archsync"
    metrics_port: int = 0

    def dsn_for(self, system: str) -> str:
        """The DSN of a source system by its topology name (``oa`` or ``archive``)."""
        if system == "oa":
            return self.oa_dsn
        if system == "archive":
            return self.archive_dsn
        raise ConfigError("source", f"unknown source system {system!r} (expected 'oa' or 'archive')")

    def dsn_setting(self, system: str) -> str:
        """The environment variable that sets the DSN of ``system``."""
        return ENV_OA_DSN if system == "oa" else ENV_ARCHIVE_DSN


def _check_dsn(setting: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path.strip("/"):
        raise ConfigError(setting, f"not a PostgreSQL URL like postgresql://user:pw@host:port/db: {value!r}")
    return value


def _check_bootstrap(value: str) -> str:
    for server in value.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigError(ENV_KAFKA_BOOTSTRAP, f"expected host:port[,host:port…], got {value!r}")
    return value


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Read the settings from ``env`` (the process environment by default), validating each."""
    source = os.environ if env is None else env
    port_text = source.get(ENV_METRICS_PORT, "0")
    if not port_text.isdigit():
        raise ConfigError(ENV_METRICS_PORT, f"expected a port number, got {port_text!r}")
    return Settings(
        oa_dsn=_check_dsn(ENV_OA_DSN, source.get(ENV_OA_DSN, DEFAULT_OA_DSN)),
        archive_dsn=_check_dsn(ENV_ARCHIVE_DSN, source.get(ENV_ARCHIVE_DSN, DEFAULT_ARCHIVE_DSN)),
        kafka_bootstrap=_check_bootstrap(source.get(ENV_KAFKA_BOOTSTRAP, DEFAULT_KAFKA_BOOTSTRAP)),
        topic_prefix=source.get(ENV_TOPIC_PREFIX, "archsync"),
        metrics_port=int(port_text),
    )


def env_int(name: str, default: int, *, minimum: int = 0, env: dict[str, str] | None = None) -> int:
    """An integer tuning setting from the environment (``default`` when unset), checked."""
    raw = (env if env is not None else os.environ).get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"not an integer: {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be at least {minimum}, got {value}")
    return value


def state_dir(env: dict[str, str] | None = None) -> Path:
    """Where archsync keeps local state (``ARCHSYNC_STATE_DIR``; as scripts/services.sh does)."""
    raw = (env if env is not None else os.environ).get("ARCHSYNC_STATE_DIR", "").strip()
    return Path(raw) if raw else Path.home() / ".local" / "state" / "archsync"
