"""Apply agents' plumbing: batches taken from a stream's queue, apply commands first, retries."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from concurrent.futures.process import BrokenProcessPool
from types import SimpleNamespace
from typing import Any, NamedTuple

import psycopg
import pytest

from archsync.errors import ConfigError
from processors.apply_process import _forget_if_broken, passing_failure, retry_delay
from processors.batch_take import take_batches
from processors.worker_consumer import bulk_first


class TP(NamedTuple):
    topic: str
    partition: int


def tp(topic: str, partition: int = 0) -> TP:
    return TP(topic, partition)


class Message:
    def __init__(self, offset: int, generation: int) -> None:
        self.topic, self.tp, self.offset = "apply", tp("apply"), offset
        self.generation_id, self.tracked = generation, False


def round_robin(batch: Mapping[Any, list[Any]]) -> Iterator[tuple[Any, Any]]:
    queues = {k: list(v) for k, v in batch.items()}
    while any(queues.values()):
        for k, v in queues.items():
            if v:
                yield k, v.pop(0)


def test_records_of_bulk_topics_go_first_in_partition_order() -> None:
    a, b, apply0, apply1 = tp("cap"), tp("changes"), tp("apply", 0), tp("apply", 1)
    batch = {a: [1, 2], apply0: [10, 11], b: [3], apply1: [20]}
    out = list(bulk_first(batch, frozenset({"apply"}), round_robin))
    assert out[:3] == [(apply0, 10), (apply0, 11), (apply1, 20)]
    assert out[3:] == [(a, 1), (b, 3), (a, 2)]
    # no bulk topic in the batch, or none configured: the round robin alone
    assert list(bulk_first({a: [1, 2], b: [3]}, frozenset({"apply"}), round_robin)) == [(a, 1), (b, 3), (a, 2)]
    assert list(bulk_first(batch, frozenset(), round_robin)) == list(round_robin(batch))


class FakeStream:
    """What take_batches uses of a Faust stream: its channel's queue, the app's flow and generation,
    the consumer's unacknowledged set, the sensor hooks, ack."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.channel = SimpleNamespace(__aiter__=lambda: SimpleNamespace(queue=self.queue))
        self.flow_active = True
        self.app = SimpleNamespace(
            flow_control=SimpleNamespace(is_active=lambda: self.flow_active),
            consumer_generation_id=1,
            consumer=SimpleNamespace(unacked=set()),
            topics=SimpleNamespace(acking_topics={"apply"}),
        )
        self.should_stop = False
        self.acked: list[Any] = []

    async def maybe_start(self) -> bool:
        return False

    async def ack(self, event: Any) -> None:
        self.acked.append(event)

    def _on_message_in(self, *args: Any) -> None:
        pass

    def _on_stream_event_in(self, *args: Any) -> None:
        pass


def event(offset: int, generation: int = 1) -> Any:
    return SimpleNamespace(message=Message(offset, generation), value=f"v{offset}".encode())


def test_a_batch_takes_what_waits_at_once_and_acks_after_it_was_processed() -> None:
    async def run() -> None:
        stream = FakeStream()
        for n in range(7):
            stream.queue.put_nowait(event(n))
        batches = take_batches(stream, 5, within=0.01)
        first = await batches.__anext__()
        assert [e.message.offset for e in first] == [0, 1, 2, 3, 4]  # full: handed out at once
        assert stream.acked == [] and len(stream.app.consumer.unacked) == 5  # tracked, not acked yet
        second = await batches.__anext__()  # the first batch was processed: acknowledged now
        assert [e.message.offset for e in stream.acked] == [0, 1, 2, 3, 4]
        assert [e.message.offset for e in second] == [5, 6]  # not full: handed out after `within`
        stream.queue.put_nowait(event(7, generation=0))  # fetched before a rebalance: dropped
        stream.queue.put_nowait(event(8))
        third = await batches.__anext__()
        assert [e.message.offset for e in third] == [8]
        assert 7 not in [e.message.offset for e in stream.acked]
        await batches.aclose()
        assert [e.message.offset for e in stream.acked][-1] == 8  # closing acks the batch handed out

    asyncio.run(run())


def test_a_batch_waits_for_more_until_within_and_the_end_of_the_channel_stops_it() -> None:
    async def run() -> None:
        stream = FakeStream()
        batches = take_batches(stream, 100, within=0.2)
        stream.queue.put_nowait(event(0))
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, stream.queue.put_nowait, event(1))
        started = loop.time()
        batch = await batches.__anext__()
        assert [e.message.offset for e in batch] == [0, 1] and loop.time() - started >= 0.19

        async def end() -> None:
            raise StopAsyncIteration

        stream.queue.get = end  # type: ignore[method-assign]  # Faust ends the channel's iteration
        with pytest.raises(StopAsyncIteration):
            await batches.__anext__()

    asyncio.run(run())
    with pytest.raises(ValueError):
        asyncio.run(take_batches(FakeStream(), 0, 0.1).__anext__())


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
