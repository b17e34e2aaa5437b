"""The recovery watch's decisions (pure): which changelog partitions stalled, and what to do."""

from __future__ import annotations

import pytest

from archsync.errors import ConfigError
from processors.recovery_watch import recovery_remedy, recovery_stall_seconds, stalled_recovery


def test_stalled_recovery_needs_records_left_and_silence() -> None:
    remaining = {"a": 5, "b": 0, "c": 3, "d": 2}
    received = {"c": 95.0, "d": 60.0}
    # a: nothing received since the start 40 s ago; b: done; c: received 5 s ago; d: silent for 40 s
    assert stalled_recovery(remaining, received, started_at=60.0, now=100.0, stall_after=30.0) == ["a", "d"]
    assert stalled_recovery(remaining, received, started_at=80.0, now=100.0, stall_after=30.0) == []
    assert stalled_recovery(remaining, received, started_at=None, now=100.0, stall_after=30.0) == []
    # an event received before this recovery started does not count as recent
    assert stalled_recovery({"d": 1}, {"d": 10.0}, started_at=60.0, now=100.0, stall_after=30.0) == ["d"]


def test_recovery_remedy_seeks_back_only_to_records_that_vanished() -> None:
    # aiokafka's position is past the first offset not restored, nothing on its way: read it again
    assert recovery_remedy(restored=-1, fetch_position=7, queued=0, fetched=False) == ("seek", 0)
    assert recovery_remedy(restored=4, fetch_position=9, queued=0, fetched=False) == ("seek", 5)
    # records on their way (queued for the recovery, or fetched into aiokafka's buffer): wait
    assert recovery_remedy(restored=4, fetch_position=9, queued=2, fetched=False) == ("none", 0)
    assert recovery_remedy(restored=4, fetch_position=9, queued=0, fetched=True) == ("none", 0)
    # the position is where reading goes on (the broker is slow): nothing to seek
    assert recovery_remedy(restored=4, fetch_position=5, queued=0, fetched=False) == ("none", 0)
    assert recovery_remedy(restored=None, fetch_position=5, queued=0, fetched=False) == ("none", 0)
    assert recovery_remedy(restored=4, fetch_position=None, queued=0, fetched=False) == ("none", 0)


def test_stall_seconds_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ARCHSYNC_RECOVERY_STALL_SECONDS", raising=False)
    assert recovery_stall_seconds() == 30
    monkeypatch.setenv("ARCHSYNC_RECOVERY_STALL_SECONDS", "5")
    assert recovery_stall_seconds() == 5
    monkeypatch.setenv("ARCHSYNC_RECOVERY_STALL_SECONDS", "soon")
    with pytest.raises(ConfigError, match="ARCHSYNC_RECOVERY_STALL_SECONDS"):
        recovery_stall_seconds()
