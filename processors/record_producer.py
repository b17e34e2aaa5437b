"""The worker's output records (changes, apply commands, audit facts and records, conflicts, dead
letters) produced with confluent-kafka, delivered before Faust commits the offsets they came from;
and the tables' changelog writes held back until then.

Why not Faust's own producer: aiokafka builds record batches and speaks the protocol in Python,
on the worker's one event loop; with several output records per row change that was the largest
share of the worker's CPU (py-spy). librdkafka batches, compresses and sends in its own threads;
a ``produce`` call costs a few microseconds. Faust's producer still writes the tables' changelogs.

At least once, and state never ahead of the output: Faust flushes its producer right before it
commits consumer offsets (``Consumer._commit_offsets``); the offsets to commit were chosen before.
:class:`WorkerApp` makes that flush

1. run the ``before_commit`` callbacks (buffers such as the audit facts are produced),
2. take the table changes made so far (:class:`DeferredChangelog`: a table write changes the table
   in memory at once, its changelog record waits; several writes of one key before a commit
   send one record),
3. wait until librdkafka has every record produced so far acknowledged (``acks=all``, idempotent,
   never timing out; records produced meanwhile are not waited for),
4. produce those changelog records (by librdkafka as well) and wait for them, then let Faust's
   producer flush what it has.

So a crash at any point leaves the changelogs (the state a restarted worker recovers) at most as
new as the output records, and the committed offsets no newer than either: the records after the
last commit are processed again against that state and their output re-sent (the commands are
idempotent, audit records identical). A record Kafka refuses for good (e.g. over the broker's size
limit) fails the flush: the commit does not happen and the worker stops.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import faust
from confluent_kafka import KafkaError, KafkaException, Producer
from faust.tables.wrappers import WindowWrapper

from archsync.settings import env_int
from connectors.kafka_sink import producer_config
from processors.worker_consumer import WorkerTransport

log = logging.getLogger(__name__)

Headers = list[tuple[str, str | bytes | None]] | None


class RecordDeliveryError(RuntimeError):
    """Kafka refused a record of the worker for good; offsets must not be committed past it."""


class _Epoch:
    """The records produced between two commits: how many are not acknowledged yet."""

    __slots__ = ("failed", "pending")

    def __init__(self) -> None:
        self.pending = 0
        self.failed: str | None = None

    def done(self, err: KafkaError | None, msg: Any) -> None:  # librdkafka's delivery callback
        self.pending -= 1
        if err is not None and self.failed is None:
            self.failed = f"{msg.topic()}: {err.str()}"
            log.error("record not delivered", extra={"topic": msg.topic(), "error": err.str()})


class RecordProducer:
    """Non-blocking produce of the worker's output records; :meth:`delivered` waits for the acks of
    the records produced until it is called."""

    POLL_EVERY = 256  # serve librdkafka's callbacks every so many records

    def __init__(self, bootstrap: str, **overrides: Any) -> None:
        config = producer_config(
            bootstrap,
            **{
                # the worker's records are small and many: linger batches them into fewer produce
                # requests (less CPU in librdkafka, the broker and the worker). 2026-11-28, 3,000-form
                # bursts in turns, 10 vs 2 ms: 614 / 635 / 718 vs 582 / 621 / 604 row changes/s, worker
                # CPU per row change -6 to -13%; p99 at 200/s 216 / 197 vs 240 / 222 ms (no cost).
                # 25 ms: no further gain (664 / 615 vs 639 / 628), p99 +35 ms.
                "linger.ms": env_int("ARCHSYNC_WORKER_LINGER_MS", 10, minimum=0),
                "compression.type": "none",
                # what may wait in librdkafka's queue when the broker is slow (the worker's memory)
                "queue.buffering.max.kbytes": 32_768,
                "error_cb": self._on_error,
                **overrides,
            },
        )
        self._producer = Producer(config)
        self._since_poll = 0
        self._epoch = _Epoch()
        self._waiting: list[_Epoch] = []  # epochs closed by delivered(), not fully acknowledged
        self.fatal: str | None = None
        self.produced = 0

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal() and self.fatal is None:
            self.fatal = err.str()
            log.error("fatal producer error", extra={"error": err.str()})

    def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None, headers: Headers = None
    ) -> None:
        """Queue one record (librdkafka sends it in the background)."""
        epoch = self._epoch
        try:
            self._producer.produce(
                topic,
                value,
                key,
                partition=-1 if partition is None else partition,  # -1: librdkafka's partitioner
                on_delivery=epoch.done,
                headers=headers,
            )
        except BufferError:  # local queue full: let librdkafka send, then retry
            self._produce_full(topic, key, value, partition, headers, epoch)
        except KafkaException as exc:
            raise RecordDeliveryError(f"{topic}: {exc}") from None
        epoch.pending += 1
        self.produced += 1
        self._since_poll += 1
        if self._since_poll >= self.POLL_EVERY:
            self._since_poll = 0
            self._producer.poll(0)

    def _produce_full(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None, headers: Headers, epoch: _Epoch
    ) -> None:
        while True:
            self._producer.poll(0.05)
            try:
                self._producer.produce(
                    topic,
                    value,
                    key,
                    partition=-1 if partition is None else partition,
                    on_delivery=epoch.done,
                    headers=headers,
                )
                return
            except BufferError:
                continue
            except KafkaException as exc:
                raise RecordDeliveryError(f"{topic}: {exc}") from None

    def pending(self) -> int:
        """Records queued or in flight (not yet acknowledged)."""
        return len(self._producer)

    async def delivered(self, timeout: float | None = None) -> None:
        """Wait (without blocking the event loop) until every record produced before this call is
        acknowledged; records produced meanwhile belong to the next call."""
        self._waiting.append(self._epoch)
        self._epoch = _Epoch()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = 0.0005
        while True:
            self._producer.poll(0)
            for epoch in self._waiting:
                if epoch.failed is not None:
                    raise RecordDeliveryError(epoch.failed)
            if self.fatal is not None:
                raise RecordDeliveryError(self.fatal)
            self._waiting = [e for e in self._waiting if e.pending > 0]
            if not self._waiting:
                return
            if deadline is not None and loop.time() > deadline:
                left = sum(e.pending for e in self._waiting)
                raise TimeoutError(f"{left} records not acknowledged after {timeout} s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    def close(self, timeout: float = 10.0) -> int:
        """Send what is queued (up to ``timeout``); return how many records are left."""
        return int(self._producer.flush(timeout))

    def topic(self, name: str) -> OutputTopic:
        return OutputTopic(self, name)


class OutputTopic:
    """A topic the worker writes to, with the ``send`` of a Faust topic (awaitable, raw bytes)."""

    def __init__(self, producer: RecordProducer, name: str) -> None:
        self.producer = producer
        self.name = name

    def get_topic_name(self) -> str:
        return self.name

    async def send(
        self,
        *,
        key: bytes | None = None,
        value: bytes | None = None,
        partition: int | None = None,
        headers: Headers = None,
    ) -> None:
        self.producer.send(self.name, key, value, partition, headers)


class DeferredChangelog:
    """Holds back the changelog records of tables until :meth:`take` (the last write of a key wins).

    A table's ``send_changelog`` is replaced by a hold (the table's in-memory data changes as
    usual); :meth:`take` hands out the held records, serialized as Faust would have, to be produced
    by the :class:`RecordProducer` (one librdkafka produce each, no Faust producer buffer).
    """

    def __init__(self) -> None:
        self._held: dict[tuple[int, int, Any], tuple[Any, Any, Any, Any, Any]] = {}
        self._stubs: dict[int, Any] = {}
        self.written = 0
        self.sent = 0

    def attach(self, table: Any) -> None:
        if isinstance(table, WindowWrapper):  # a windowed table wraps the table that writes
            table = table.table

        def hold(
            partition: int | None, key: Any, value: Any, key_serializer: Any = None, value_serializer: Any = None
        ) -> Any:
            if partition is None:
                raise RuntimeError(f"table {table.name}: a held changelog record needs the event's partition")
            self.written += 1
            self._held[(id(table), partition, key)] = (table, key, value, key_serializer, value_serializer)
            stub = self._stubs.get(partition)  # Faust reads ``.message.partition`` of what it returns
            if stub is None:
                stub = self._stubs[partition] = SimpleNamespace(message=SimpleNamespace(partition=partition))
            return stub

        table.send_changelog = hold

    def take(self) -> list[tuple[str, int, bytes | None, bytes | None]]:
        """The held records as (changelog topic, partition, key bytes, value bytes or None)."""
        held, self._held = self._held, {}
        self.sent += len(held)
        out: list[tuple[str, int, bytes | None, bytes | None]] = []
        names: dict[int, str] = {}
        for (table_id, partition, _), (table, key, value, ks, vs) in held.items():
            name = names.get(table_id)
            if name is None:
                name = names[table_id] = table.changelog_topic.get_topic_name()
            # bytes go out as they are (Faust's serializers pass bytes through unchanged)
            key_bytes: bytes | None = key if isinstance(key, bytes) else None
            if key_bytes is None:
                key_bytes, _ = table.changelog_topic.prepare_key(key, ks if ks is not None else table.key_serializer)
            value_bytes: bytes | None = value if isinstance(value, bytes) else None
            if value_bytes is None and value is not None:
                serializer = vs if vs is not None else table.value_serializer
                value_bytes, _ = table.changelog_topic.prepare_value(value, serializer)
            out.append((name, partition, key_bytes, value_bytes))
        return out


EXIT_AGENT_CRASHED = 70  # EX_SOFTWARE: the worker stopped because an agent failed


class WorkerApp(faust.App):
    """A Faust app whose pre-commit flush also delivers the :class:`RecordProducer`'s records and
    then the held changelog records of its tables (see the module's doc)."""

    records: RecordProducer | None = None

    def before_commit(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` in every pre-commit flush, before the records are awaited."""
        self.__dict__.setdefault("_before_commit", []).append(callback)

    def record_producer(self, bootstrap: str) -> RecordProducer:
        if self.records is None:
            self.records = RecordProducer(bootstrap)
        return self.records

    def defer_changelog(self, *tables: Any) -> None:
        """Hold the changelog records of ``tables`` until the records they follow from are in Kafka."""
        if self.records is None:
            raise RuntimeError("defer_changelog() needs the record producer (record_producer() first)")
        deferred = self.__dict__.setdefault("_deferred_changelog", DeferredChangelog())
        for table in tables:
            deferred.attach(table)

    def every(self, interval: float, callback: Callable[[], Awaitable[None]]) -> None:
        """Run ``callback`` every ``interval`` seconds from the app's start, during table recovery
        too (Faust's timers start only once the first recovery is complete)."""
        self.__dict__.setdefault("_every", []).append((interval, callback))

    async def on_start(self) -> None:
        await super().on_start()
        for interval, callback in self.__dict__.get("_every", []):
            self.add_future(self._repeat(interval, callback))

    async def _repeat(self, interval: float, callback: Callable[[], Awaitable[None]]) -> None:
        while not self.should_stop:
            await self.sleep(interval)
            try:
                await callback()
            except Exception:  # a watch must not stop the worker
                log.exception("%s failed", getattr(callback, "__qualname__", callback))

    # an agent that stopped on an error it does not handle (a bug): the worker stops with it
    agent_crash: BaseException | None = None

    async def _on_agent_error(self, agent: Any, exc: BaseException) -> None:
        """Faust (every agent's ``on_error``) commits what was acknowledged, then restarts the
        agent on a fresh stream, while the events its stream had taken
        stayed unacknowledged: their partition stopped committing, and nothing said so (seen when
        the applier's database restarted, before passing failures were retried). The worker stops
        instead (SIGTERM: a clean stop, records delivered) and exits non-zero
        (:data:`EXIT_AGENT_CRASHED`): restarted, it resumes from the committed offsets."""
        await super()._on_agent_error(agent, exc)
        if self.agent_crash is not None:
            return
        self.agent_crash = exc
        log.critical(
            "agent %s stopped on an unexpected error (%s: %s): stopping the worker; restarted, it"
            " resumes from its committed offsets",
            getattr(agent, "name", agent),
            type(exc).__name__,
            exc,
            exc_info=exc,
        )
        os.kill(os.getpid(), signal.SIGTERM)

    def _new_transport(self) -> Any:
        return WorkerTransport(self.conf.broker_consumer, self)  # its consumer keeps fetched records

    def _new_producer(self) -> Any:
        producer = super()._new_producer()
        faust_flush = producer.flush

        async def flush() -> None:
            for callback in self.__dict__.get("_before_commit", []):
                await callback()
            deferred: DeferredChangelog | None = self.__dict__.get("_deferred_changelog")
            held = deferred.take() if deferred is not None else []
            if self.records is not None:
                await self.records.delivered()  # the output records of the events to commit
                if held:
                    for topic, partition, key, value in held:
                        self.records.send(topic, key, value, partition)
                    await self.records.delivered()  # then the state they leave behind
            await faust_flush()

        producer.flush = flush  # type: ignore[method-assign]
        return producer
