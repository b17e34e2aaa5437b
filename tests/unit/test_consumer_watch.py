"""The stall decision of the consumer watch (pure: positions and end offsets over time)."""

import contextlib

import pytest

from processors.consumer_watch import Progress, watch_step


def test_a_partition_behind_with_no_progress_stalls_after_the_period() -> None:
    progress: dict[str, Progress] = {}
    progress, stalled = watch_step(progress, {"a": 5}, {"a": 9}, now=0.0, stall_after=20)
    assert stalled == []
    progress, stalled = watch_step(progress, {"a": 5}, {"a": 9}, now=19.9, stall_after=20)
    assert stalled == []
    progress, stalled = watch_step(progress, {"a": 5}, {"a": 12}, now=20.0, stall_after=20)
    assert stalled == ["a"]
    assert progress["a"] == Progress(5, 12, 0.0)


def test_progress_or_catching_up_restarts_the_period() -> None:
    progress, _ = watch_step({}, {"a": 5, "b": 9}, {"a": 9, "b": 9}, now=0.0, stall_after=20)
    progress, stalled = watch_step(progress, {"a": 6, "b": 9}, {"a": 9, "b": 9}, now=15.0, stall_after=20)
    assert stalled == [] and progress["a"].since == 15.0
    # b was caught up (nothing waiting): new records start its period now, not at 0
    progress, stalled = watch_step(progress, {"a": 6, "b": 9}, {"a": 9, "b": 14}, now=30.0, stall_after=20)
    assert stalled == [] and progress["b"].since == 30.0
    progress, stalled = watch_step(progress, {"a": 6, "b": 9}, {"a": 9, "b": 14}, now=50.0, stall_after=20)
    assert sorted(stalled) == ["a", "b"]


def test_an_idle_partition_never_stalls_and_unknown_ends_are_skipped() -> None:
    progress, stalled = watch_step({}, {"a": 7, "b": 3}, {"a": 7}, now=0.0)
    progress, stalled = watch_step(progress, {"a": 7, "b": 3}, {"a": 7}, now=1000.0)
    assert stalled == [] and "b" not in progress


def test_undelivered_names_the_first_record_not_handed_on_per_partition() -> None:
    from types import SimpleNamespace

    from processors.worker_consumer import undelivered

    def recs(*offsets: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(offset=o) for o in offsets]

    records = {"a": recs(14, 15, 16), "b": recs(3, 4), "c": recs(9)}
    assert undelivered(records, {"a": 1, "b": 2}) == {"a": 15, "c": 9}
    assert undelivered(records, {"a": 3, "b": 2, "c": 1}) == {}
    assert undelivered({}, {}) == {}


def test_commits_are_contiguous_from_the_committed_offset() -> None:
    from processors.worker_consumer import committable_run

    assert committable_run([16, 17, 18], 14) == (None, 0)  # 14 and 15 vanished: nothing to commit
    assert committable_run([15, 16], 14) == (None, 0)  # Faust's check let this one through
    acked = [16, 14, 15, 18]
    assert committable_run(acked, 14) == (17, 3) and acked == [14, 15, 16, 18]
    # read again after a seek: offsets below the committed one are done, duplicates are harmless
    assert committable_run([12, 13, 14, 14, 15], 14) == (16, 5)
    assert committable_run([9, 10], 14) == (None, 2)
    assert committable_run([5, 6, 8], None) == (7, 2)  # nothing committed yet: the first run


def test_remedy_seeks_back_only_what_vanished() -> None:
    from processors.consumer_watch import remedy

    vanished = {"position": 27, "kafka_position": 30, "unacked": 0, "queued": 0}
    assert remedy(vanished, 0) == ("seek", 27)
    assert remedy({**vanished, "unacked": 2}, 0) == ("none", 0)  # in processing: wait
    assert remedy({**vanished, "queued": 1}, 0) == ("none", 0)
    assert remedy({**vanished, "held": 3}, 0) == ("none", 0)  # fetched, waiting for its stream's room
    assert remedy({**vanished, "kafka_position": 27}, 0) == ("none", 0)  # not fetched: nothing to redo
    assert remedy(vanished, 29) == ("retention", 29)  # 27, 28 deleted before they were read
    assert remedy({"position": None}, None) == ("none", 0)


def test_held_records_of_a_partition_come_before_its_new_ones() -> None:
    from processors.worker_consumer import merge_held

    class R:
        def __init__(self, offset: int) -> None:
            self.offset = offset

    held = {"a": [R(5), R(6)], "b": [R(1)]}
    records = {"a": [R(7)], "c": [R(3), R(4)]}
    merged = merge_held(held, records)
    assert {tp: [r.offset for r in batch] for tp, batch in merged.items()} == {"a": [5, 6, 7], "b": [1], "c": [3, 4]}
    assert [r.offset for r in held["a"]] == [5, 6]  # the held lists are not changed


def test_changelog_records_dropped_in_a_rebalance_are_sought_back_only_backwards() -> None:
    from processors.worker_consumer import seek_back_changelog

    # a fetch that came back after a recovery's seek, dropped while the flow was stopped: read again
    for reason in ("flow not active", "flow stopped", "generation changed"):
        assert seek_back_changelog(reason, first_dropped=0, position=26)
    # Faust sought the partition since (its position is not past the dropped records): it stays
    assert not seek_back_changelog("flow not active", first_dropped=10, position=10)
    assert not seek_back_changelog("flow not active", first_dropped=10, position=3)
    assert not seek_back_changelog("flow not active", first_dropped=10, position=None)
    # a partition Faust does not read (standby, recovered): its records are dropped on purpose
    assert not seek_back_changelog("partition not active", first_dropped=0, position=26)


def test_a_hand_over_without_a_wait_runs_inline() -> None:

    from processors.worker_consumer import run_until_suspended

    done: list[int] = []

    async def hand_over(n: int) -> None:
        done.append(n)

    assert run_until_suspended(hand_over(1)) is None and done == [1]

    async def fails() -> None:
        raise ValueError("bad record")

    try:
        run_until_suspended(fails())
    except ValueError as exc:
        assert str(exc) == "bad record"
    else:
        raise AssertionError("the exception was not raised")


def test_a_hand_over_that_waits_finishes_in_a_task_or_is_cancelled() -> None:
    import asyncio

    from processors.worker_consumer import run_until_suspended

    async def main() -> None:
        room = asyncio.Event()
        steps: list[str] = []

        async def hand_over() -> str:
            steps.append("start")
            await room.wait()  # a full buffer
            await asyncio.sleep(0)
            steps.append("end")
            return "handed"

        rest = run_until_suspended(hand_over())
        assert rest is not None and steps == ["start"]
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0.01)
        assert not task.done()
        room.set()
        assert await task == "handed" and steps == ["start", "end"]

        cancelled: list[bool] = []

        async def never() -> None:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        rest = run_until_suspended(never())
        assert rest is not None
        task = asyncio.ensure_future(rest)
        await asyncio.sleep(0.01)
        task.cancel()  # the flow stopped for a rebalance: wait_first cancels the hand-over
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert cancelled == [True] and task.cancelled()

    asyncio.run(main())


def test_fetch_tuning_waits_for_bytes_only_while_keeping_up(monkeypatch: pytest.MonkeyPatch) -> None:
    from archsync.errors import ConfigError
    from processors.worker_consumer import (
        FETCH_MAX_WAIT_BUSY_MS,
        FETCH_MAX_WAIT_IDLE_MS,
        FETCH_MAX_WAIT_MS,
        FETCH_MIN_BYTES,
        fetch_tuning,
    )

    for name in ("ARCHSYNC_FETCH_MAX_WAIT_MS", "ARCHSYNC_FETCH_MIN_BYTES", "ARCHSYNC_FETCH_MAX_WAIT_BUSY_MS"):
        monkeypatch.delenv(name, raising=False)
    tuning = fetch_tuning()
    assert tuning.for_state(busy=False) == (FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES)
    # behind: the first record returns a fetch (a large minimum would hold a nearly drained partition)
    assert tuning.for_state(busy=True) == (FETCH_MAX_WAIT_BUSY_MS, 1)
    assert tuning.for_state(busy=True, idle=True) == (FETCH_MAX_WAIT_BUSY_MS, 1)
    # idle: the first record returns a fetch (no 40 empty fetches a second)
    assert tuning.for_state(busy=False, idle=True) == (FETCH_MAX_WAIT_IDLE_MS, 1)
    monkeypatch.setenv("ARCHSYNC_FETCH_MIN_BYTES", "1")
    monkeypatch.setenv("ARCHSYNC_FETCH_MAX_WAIT_MS", "100")
    assert fetch_tuning().for_state(busy=False) == (100, 1)
    monkeypatch.setenv("ARCHSYNC_FETCH_MIN_BYTES", "lots")
    with pytest.raises(ConfigError, match="ARCHSYNC_FETCH_MIN_BYTES"):
        fetch_tuning()
