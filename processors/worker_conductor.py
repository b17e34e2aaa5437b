"""The worker's conductor: hands each fetched record of a raw topic to its streams, lean.

Faust's conductor (faust-streaming 0.15.3 ``ConductorCompiler.build``) runs, for every record,
the producer-buffer check (a settings lookup through ``app.conf`` each time), the channel's
schema decoder (the key and value through the serializer registry, even for ``raw`` topics whose
codec returns the bytes as they are) and a set of delivered channels. py-spy on a 3,000-form burst:
the handler was 8% of the worker's main thread, about half of it that decoding.

Every topic the worker's agents read is raw (bytes in, bytes out; the agents decode themselves),
so the handler here makes the event from the message's key and value as they are, and puts it on
each channel's queue with Faust's flow-control callbacks. The rare cases keep Faust's own path: a
topic that is not raw, a channel whose buffer is full (Faust waits for room), a producer buffer
over its limit, the flow suspended for a rebalance.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableSet
from typing import Any

from faust.transport.conductor import Conductor
from faust.types import TP, Message

RAW = "raw"


def is_raw(channel: Any) -> bool:
    """A topic whose key and value are bytes as they are (no model, the ``raw`` codec)."""
    return (
        getattr(channel, "key_type", None) is None
        and getattr(channel, "value_type", None) is None
        and getattr(channel, "key_serializer", None) == RAW
        and getattr(channel, "value_serializer", None) == RAW
    )


class WorkerConductor(Conductor):
    """Faust's conductor with :func:`raw_handler` for partitions whose topics are all raw."""

    def _build_handler(self, tp: TP, channels: MutableSet[Any]) -> Callable[[Message], Awaitable[None]]:
        faust_handler = super()._build_handler(tp, channels)
        if not channels or not all(is_raw(chan) for chan in channels) or self.app.conf.producer_threaded:
            return faust_handler
        return raw_handler(self.app, tp, channels, faust_handler)


def raw_handler(
    app: Any, tp: TP, channels: MutableSet[Any], faust_handler: Callable[[Message], Awaitable[None]]
) -> Callable[[Message], Awaitable[None]]:
    """The record handler of a partition read by raw topics only (see the module's doc)."""
    flow_suspended = app.flow_control._suspend.is_set
    buffer = app.producer.buffer
    pending_messages = buffer.pending._queue  # the deque Faust's ``ProducerBuffer.size`` measures
    max_messages = buffer.max_messages
    create_event = app.create_event
    on_topic_buffer_full = app.sensors.on_topic_buffer_full
    consumer_on_buffer_full = app.consumer.on_buffer_full
    consumer_on_buffer_drop = app.consumer.on_buffer_drop

    # the same two callables for every record: a queue keeps the pressure-drop one in a set
    def on_pressure_high() -> None:
        on_topic_buffer_full(tp)
        consumer_on_buffer_full(tp)

    def on_pressure_drop() -> None:
        consumer_on_buffer_drop(tp)

    async def on_message(message: Message) -> None:
        if flow_suspended() or len(pending_messages) > max_messages:
            return await faust_handler(message)  # waits for the flow, or for the producer buffer
        for chan in channels:
            if chan.queue.full():
                return await faust_handler(message)  # waits for room
        n = len(channels)
        if not n:
            return None
        message.incref(n)
        event = create_event(message.key, message.value, message.headers, message)
        for chan in channels:
            chan.queue.put_nowait_enhanced(event, on_pressure_high=on_pressure_high, on_pressure_drop=on_pressure_drop)
        return None

    return on_message
