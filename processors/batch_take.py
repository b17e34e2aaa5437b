"""Batches of a Faust stream's events taken from its channel at once (the apply agents' ``take``).

Faust's ``Stream.take(n, within)`` fills its buffer through the stream's iterator, which yields to
the event loop once per event (``await sleep(0)`` in every ``next``) and stops filling while the
previous batch is being applied. On the worker's one event loop, shared with the transform agent,
that let a batch gather ~1 command per loop turn: batches of 1–86 commands while thousands waited
(processors/app.py, measured with a 3,000-form burst), and the applier idle ~40% of the time.

:func:`take_batches` takes what the channel's queue holds in one go (up to ``max_items``), waits
up to ``within`` seconds for more only while the batch is not full, and acknowledges the events
after the batch was processed, as Faust's stream would: an event of an earlier consumer
generation (a rebalance happened since it was fetched) or one read while the flow is stopped is
dropped unacknowledged (Faust's compiled stream iterator does the same: its partition is read again
by whoever owns it now), and every message is tracked as unacknowledged until then (Faust's
rebalance waits for those). Sensors see the same calls as with Faust's iterator.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


async def take_batches(stream: Any, max_items: int, within: float) -> AsyncIterator[list[Any]]:
    """Yield lists of up to ``max_items`` events of ``stream`` (a Faust stream over a topic); a
    batch is handed out when full or ``within`` seconds after its first event. The events of a
    batch are acknowledged when the consumer of the generator asks for the next batch."""
    if max_items < 1:
        raise ValueError("max_items must be at least 1")
    channel = stream.channel.__aiter__()  # the agent's channel is already its iterator
    queue = channel.queue
    app = stream.app
    consumer = app.consumer
    acking_topics = app.topics.acking_topics
    loop = asyncio.get_running_loop()
    started_by_us = await stream.maybe_start()
    try:
        while not stream.should_stop:
            batch: list[Any] = []
            try:
                item = await queue.get()
            except StopAsyncIteration:  # Faust ends the channel's iteration (the stream stops)
                return
            deadline = loop.time() + within
            while True:
                _admit(stream, app, consumer, acking_topics, item, batch)
                if len(batch) >= max_items:
                    break
                if not queue.empty():
                    item = queue.get_nowait()
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except (TimeoutError, StopAsyncIteration):
                    break
            if not batch:
                continue
            try:
                yield batch
            finally:
                for event in batch:
                    await stream.ack(event)
    finally:
        if started_by_us:
            await stream.stop()


def _admit(stream: Any, app: Any, consumer: Any, acking_topics: Any, item: Any, batch: list[Any]) -> None:
    """One item of the channel: an event of this generation joins the batch (tracked as
    unacknowledged), an outdated one is dropped; anything else is not an event."""
    message = getattr(item, "message", None)
    if message is None:
        raise TypeError(f"take_batches expects a stream of events, got {type(item).__name__}")
    if not app.flow_control.is_active() or message.generation_id != app.consumer_generation_id:
        return
    tp, offset = message.tp, message.offset
    if message.topic in acking_topics and not message.tracked:
        message.tracked = True
        consumer.unacked.add(message)
        stream._on_message_in(tp, offset, message)
    stream._on_stream_event_in(tp, offset, stream, item)
    batch.append(item)
