from __future__ import annotations

import pytest

from archsync.errors import ConfigError
from archsync.settings import DEFAULT_OA_DSN, load_settings


def test_defaults() -> None:
    s = load_settings({})
    assert s.oa_dsn == DEFAULT_OA_DSN
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.dsn_for("archive").endswith("/archive")


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"ARCHSYNC_OA_DSN": "mysql://x@y/z"}, "ARCHSYNC_OA_DSN"),
        ({"ARCHSYNC_ARCHIVE_DSN": "postgresql://host-without-db"}, "ARCHSYNC_ARCHIVE_DSN"),
        ({"ARCHSYNC_KAFKA_BOOTSTRAP": "localhost"}, "ARCHSYNC_KAFKA_BOOTSTRAP"),
        ({"ARCHSYNC_METRICS_PORT": "http"}, "ARCHSYNC_METRICS_PORT"),
    ],
)
def test_bad_settings_name_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert info.value.setting == setting
    assert str(info.value).startswith(setting)


def test_unknown_system() -> None:
    with pytest.raises(ConfigError, match="unknown source system"):
        load_settings({}).dsn_for("erp")


def test_env_int_reads_checks_and_defaults() -> None:
    import pytest

    from archsync.errors import ConfigError
    from archsync.settings import env_int

    assert env_int("ARCHSYNC_X", 100, env={}) == 100
    assert env_int("ARCHSYNC_X", 100, env={"ARCHSYNC_X": " 250 "}) == 250
    with pytest.raises(ConfigError, match="ARCHSYNC_X: not an integer: 'fast'"):
        env_int("ARCHSYNC_X", 100, env={"ARCHSYNC_X": "fast"})
    with pytest.raises(ConfigError, match="must be at least 1, got 0"):
        env_int("ARCHSYNC_X", 100, minimum=1, env={"ARCHSYNC_X": "0"})
