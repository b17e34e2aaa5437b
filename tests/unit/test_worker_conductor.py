"""The worker's lean record handler for raw topics: the same events as Faust's own decoding, on
every channel, with Faust's path kept for a full buffer or a suspended flow (no Kafka needed:
decoding and queueing happen in memory)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import faust
from faust.types import TP, Message
from mode.utils.queues import FlowControlEvent, FlowControlQueue

from processors.worker_conductor import is_raw, raw_handler

TPX = TP("x", 0)


def _message(key: bytes | None, value: bytes | None) -> Message:
    return Message("x", 0, 7, 0.0, 0, None, key, value, None)


class _Channel:
    def __init__(self, flow: FlowControlEvent, maxsize: int = 10) -> None:
        self.queue: FlowControlQueue[Any] = FlowControlQueue(maxsize=maxsize, flow_control=flow)


def _setup(app: faust.App, flow: FlowControlEvent, channels: set[Any]) -> tuple[Any, list[Message]]:
    fallen_back: list[Message] = []

    async def faust_handler(message: Message) -> None:
        fallen_back.append(message)

    fake = SimpleNamespace(
        flow_control=flow,
        producer=SimpleNamespace(buffer=SimpleNamespace(pending=asyncio.Queue(), max_messages=100)),
        create_event=app.create_event,
        sensors=SimpleNamespace(on_topic_buffer_full=lambda tp: None),
        consumer=SimpleNamespace(on_buffer_full=lambda tp: None, on_buffer_drop=lambda tp: None),
    )
    return raw_handler(fake, TPX, channels, faust_handler), fallen_back


def test_raw_topics_are_told_apart_from_decoded_ones() -> None:
    app = faust.App("conductor-test", broker="kafka://localhost:1")
    assert is_raw(app.topic("a", key_serializer="raw", value_serializer="raw"))
    assert not is_raw(app.topic("b", key_serializer="raw", value_serializer="json"))
    assert not is_raw(app.topic("c", key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"))


def test_each_channel_gets_the_event_faust_would_decode() -> None:
    async def run() -> None:
        app = faust.App("conductor-test", broker="kafka://localhost:1")
        topic = app.topic("x", key_serializer="raw", value_serializer="raw")
        flow = FlowControlEvent()
        flow.resume()
        a, b = _Channel(flow), _Channel(flow)
        handler, fallen_back = _setup(app, flow, {a, b})
        for key, value in ((b"k", b'{"v": 1}'), (None, b"x"), (b"k", None)):
            message = _message(key, value)
            await handler(message)
            expected = await topic.decode(_message(key, value), propagate=True)
            for chan in (a, b):
                event = chan.queue.get_nowait()
                assert (event.key, event.value) == (expected.key, expected.value)
                assert event.message is message
            assert message.refcount == 2  # one per channel, acknowledged once each has it
        assert fallen_back == []

    asyncio.run(run())


def test_a_full_buffer_or_a_suspended_flow_takes_faust_s_path() -> None:
    async def run() -> None:
        app = faust.App("conductor-test", broker="kafka://localhost:1")
        flow = FlowControlEvent()
        flow.resume()
        full = _Channel(flow, maxsize=1)
        handler, fallen_back = _setup(app, flow, {full})
        await handler(_message(b"k", b"1"))
        assert full.queue.qsize() == 1 and fallen_back == []
        await handler(_message(b"k", b"2"))  # no room: Faust's handler waits for it
        assert full.queue.qsize() == 1 and len(fallen_back) == 1
        full.queue.get_nowait()
        flow.suspend()  # a rebalance
        await handler(_message(b"k", b"3"))
        assert full.queue.qsize() == 0 and len(fallen_back) == 2

    asyncio.run(run())


def test_the_delivery_loop_commits_beside_itself_one_commit_at_a_time() -> None:
    from processors.worker_consumer import WorkerConsumer

    async def run() -> None:
        consumer = object.__new__(WorkerConsumer)  # no Kafka: only the commit scheduling is used
        consumer._beside_commit = None
        release = asyncio.Event()
        calls: list[int] = []
        crashed: list[BaseException] = []

        async def commit() -> bool:
            calls.append(1)
            await release.wait()
            if len(calls) == 2:
                raise RuntimeError("a record was refused")
            return True

        async def crash(exc: BaseException) -> None:
            crashed.append(exc)

        consumer.commit = commit  # type: ignore[method-assign]
        consumer.crash = crash  # type: ignore[method-assign]
        consumer._commit_beside()
        consumer._commit_beside()  # one is running: no second one
        await asyncio.sleep(0)
        assert calls == [1]
        release.set()
        assert consumer._beside_commit is not None
        await consumer._beside_commit
        consumer._commit_beside()  # the next one may start; it fails: the consumer crashes
        await consumer._beside_commit
        assert len(calls) == 2 and [str(e) for e in crashed] == ["a record was refused"]

    asyncio.run(run())
