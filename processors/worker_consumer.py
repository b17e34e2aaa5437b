"""The worker's Kafka consumer: Faust's aiokafka consumer, minus ways to lose records.

Seen in this project's kill tests (``tests/integration/test_pipeline.py``, about 1 run in 5): after
a rebalance, records that aiokafka had handed to Faust (its position past them) never reached an
agent, and either the partition stalled (nothing else read it until the next rebalance) or — when
newer records came in — the apply commands of one form were committed, never applied. Faust
commits the highest run of acknowledged offsets and fills holes with its "gap" tracking (made for
offsets a compacted or transactional topic does not have), and its check that the run starts at
the committed offset is off by one. So a record that vanished was committed over.

:class:`WorkerConsumer` closes both ways:

- commits are contiguous: a partition's offset is committed only up to the first record not
  acknowledged, starting exactly at the committed offset (:func:`committable_run`); no gap filling —
  the worker's input topics are never compacted or written in transactions (``topology check``
  refuses compaction there), so their offsets have no holes. A record that vanished holds the
  partition's commits back, and the consumer watch (``processors/consumer_watch.py``) seeks the
  stalled partition back to its committed offset, so it is read again;
- ``getmany`` (which stops early when a rebalance starts or a partition is paused and drops the
  records it has not handed on) seeks a partition back to the first record it did not hand on.

It also keeps one busy agent from holding up the others. Faust hands every fetched record to its
streams from one delivery loop, which waits whenever a stream's buffer is full, and fetches again
only after the whole batch (thousands of records) is handed on. With a backlog of captured changes
the transform agent set the pace and the apply agents got nothing for seconds (measured in the
pipeline benchmark: no archive row written for 5 s while 5,000 apply commands waited), so the two
stages took turns instead of overlapping, and the consumer watch took the waiting partitions for
stalled ones. ``getmany`` therefore hands on at most :attr:`WorkerConsumer.MAX_HANDED` records per
call and never one whose stream has no room: the others are held, in order, per partition (not
fetched again, not sought back), and go on when their stream's buffer is half empty again.

Records read twice this way are processed twice: every agent of the worker is idempotent (event-id
dedupe, position guards, deterministic audit ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine, Generator, Mapping
from typing import Any, NamedTuple, cast

from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP, Message

from archsync.settings import env_int
from processors.worker_conductor import WorkerConductor

log = logging.getLogger(__name__)


def undelivered(records: Mapping[Any, list[Any]], delivered: Mapping[Any, int]) -> dict[Any, int]:
    """For each partition of a fetched batch with records not handed on: the offset of the first
    of them (``delivered`` counts the records handed on, in order, per partition)."""
    out = {}
    for tp, batch in records.items():
        n = delivered.get(tp, 0)
        if n < len(batch):
            out[tp] = batch[n].offset
    return out


def committable_run(acked: list[int], committed: int | None) -> tuple[int | None, int]:
    """Sort ``acked`` and find what can be committed: (the offset to commit or None, how many of
    the sorted offsets that consumes). Offsets below ``committed`` are consumed as done; the run
    must start at ``committed`` (when known) and have no hole."""
    acked.sort()
    start = 0
    if committed is not None:
        while start < len(acked) and acked[start] < committed:
            start += 1
        if start == len(acked) or acked[start] != committed:
            return None, start
    if start == len(acked):
        return None, start
    end = start
    while end + 1 < len(acked) and acked[end + 1] <= acked[end] + 1:
        end += 1
    return acked[end] + 1, end + 1


# why getmany dropped fetched records: a rebalance stopped the flow or began while it handed them on
REBALANCE_DROPS = frozenset({"flow stopped", "flow not active", "generation changed"})


def seek_back_changelog(reason: str, first_dropped: int, position: int | None) -> bool:
    """Seek a changelog partition back to the first of its records ``getmany`` dropped?

    Faust seeks the changelog partitions when a table recovery starts, then resumes the flow; a
    fetch in flight meanwhile comes back with the records the recovery waits for, and getmany drops
    them while the flow is stopped. Nothing fetches them again: the recovery waited for ever (seen
    about once in 10 two-worker kill tests; the recovery watch, processors/recovery_watch.py, healed
    it after 30 s). So: only for records dropped in a rebalance, and only backwards, when the
    consumer's position is past them (a seek of Faust's made since then stays)."""
    return reason in REBALANCE_DROPS and position is not None and position > first_dropped


def merge_held(held: Mapping[Any, list[Any]], records: Mapping[Any, list[Any]]) -> dict[Any, list[Any]]:
    """A partition's held records (fetched earlier, not handed on yet) come before its new ones."""
    merged = {tp: list(batch) for tp, batch in held.items()}
    for tp, batch in records.items():
        if tp in merged:
            merged[tp].extend(batch)
        else:
            merged[tp] = batch
    return merged


# How long the broker may hold a fetch request that finds no new records, while the worker keeps up.
# Faust's aiokafka consumer hard-codes 1,500 ms, and aiokafka keeps one fetch request in flight per
# broker, for the partitions that had no fetched records waiting when it was sent: records of the
# others arriving meanwhile waited for that request to time out. Measured (pipeline benchmark, 280
# OA row changes/s, audit in the worker): records reached the transform agent 1.3–2.1 s after they
# were produced, its input buffer empty; with 100 ms, 0.04–0.25 s, and the OA → archive latency went
# from p50 3.7 s to 0.26 s. With a backlog the long wait is better: it makes the fetches of the busy
# partitions few and large (a burst of 3,000 forms drained at 396 row changes/s with 100 ms, 476
# with 1,500 ms, in turns) — so the worker switches to FETCH_MAX_WAIT_BUSY_MS while behind (see below).
#
# While it keeps up, a fetch also waits for FETCH_MIN_BYTES (at most FETCH_MAX_WAIT_MS). With the
# broker's default of 1 byte every fetch came back with the first record to arrive: at a steady 200
# OA row changes/s the worker fetched hundreds of times a second, a few records each, and spent
# 2.1 ms of CPU per row change (0.9–1.2 in bursts). Measured 2026-12-02 (2-core VM, steady phases of
# the pipeline benchmark, in turns), 1 byte / 100 ms against 32 KiB / 25 ms: at 200/s the worker
# used 2.11 against 1.49 ms per row change and the broker 0.68 against 0.53, p50 101 against 127 ms;
# at 600/s 1.21–1.23 against 1.06–1.08 ms, the consumer thread a third less, p99 221–265 against
# 265–275 ms. The wait bounds what the minimum costs in latency at low rates (one wait per hop).
#
# The busy wait was 1,500 ms until 2026-12-02. It is also a stall: the one fetch request in flight
# holds the partitions that had nothing waiting when it was sent, often only quiet ones, and a busy
# partition whose fetched records are used up is not fetched again until that request returns. At a
# steady 1,000 row changes/s (one worker, its event loop 25–35% idle with a backlog) 1,500 ms gave
# p99 5.3 / 4.1 / 5.8 / 4.7 / 4.3 s, p50 3.5–4.7 s; 300 ms 8.8 / 2.1 / 4.8 / 2.1 s, p50 1.3–3.1 s;
# 100 ms 1.5 / 1.6 / 7.8 / 10.2 / 1.1 s (the VM's drift swings single runs). Bursts of 3,000 forms,
# in turns: 1,500 ms 714 row changes/s, 300 ms 1,030; 100 ms used 25–65% more worker CPU per row.
#
# Idle (the last fetch brought nothing) a fetch returns on the first record and waits at most
# FETCH_MAX_WAIT_IDLE_MS: the minimum would only make an idle worker ask 40 times a second. Measured
# on an idle pipeline (15 s, two runs each): 32 KiB / 25 ms throughout cost the worker 6.5–7.1% of a
# core and the broker 11–22%, against 3.4–3.6% and 5–8% with 1 byte / 100 ms.
FETCH_MAX_WAIT_MS = 25
FETCH_MIN_BYTES = 32 * 1024
FETCH_MAX_WAIT_BUSY_MS = 300
FETCH_MAX_WAIT_IDLE_MS = 100
# behind: records held by the consumer, or a stream's buffer at least this full
BUSY_FILL = 0.5


class FetchTuning(NamedTuple):
    """How the worker's fetch requests wait at the broker (see :data:`FETCH_MAX_WAIT_MS`)."""

    wait_ms: int  # while keeping up: at most this long ...
    min_bytes: int  # ... for at least this many bytes
    busy_wait_ms: int  # while behind (any record returns the fetch)
    idle_wait_ms: int = FETCH_MAX_WAIT_IDLE_MS  # while idle (any record returns the fetch)

    def for_state(self, busy: bool, idle: bool = False) -> tuple[int, int]:
        """(fetch max wait in ms, fetch min bytes) while behind, idle or keeping up."""
        if busy:
            return self.busy_wait_ms, 1
        if idle:
            return self.idle_wait_ms, 1
        return self.wait_ms, self.min_bytes


def fetch_tuning() -> FetchTuning:
    """The fetch settings from ``ARCHSYNC_FETCH_MAX_WAIT_MS``, ``ARCHSYNC_FETCH_MIN_BYTES`` and
    ``ARCHSYNC_FETCH_MAX_WAIT_BUSY_MS``, or the defaults above (a clear error for a bad value)."""
    return FetchTuning(
        env_int("ARCHSYNC_FETCH_MAX_WAIT_MS", FETCH_MAX_WAIT_MS, minimum=1),
        env_int("ARCHSYNC_FETCH_MIN_BYTES", FETCH_MIN_BYTES, minimum=1),
        env_int("ARCHSYNC_FETCH_MAX_WAIT_BUSY_MS", FETCH_MAX_WAIT_BUSY_MS, minimum=1),
    )


def _fill(channel: Any) -> float:
    """How full a stream's input buffer is (0 to 1; 0 when it has none yet or is unbounded)."""
    queue = getattr(channel, "_queue", None)  # not ``.queue``: that would create one
    if queue is None or not queue.maxsize:
        return 0.0
    return float(queue.qsize() / queue.maxsize)


class _Rest:
    """The rest of a coroutine that suspended in its first step, awaitable (so a task can run it):
    it hands on what the coroutine waits for, and sends, throws or cancels into it what comes back."""

    __slots__ = ("_coro", "_yielded")

    def __init__(self, coro: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._coro = coro
        self._yielded = yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, value = self._coro, self._yielded
        while True:
            try:
                sent = yield value
            except BaseException as exc:  # noqa: BLE001 - thrown into the coroutine, as a task would
                try:
                    value = coro.throw(exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as stop:
                    return stop.value


async def _finish(rest: _Rest) -> Any:
    return await rest


def run_until_suspended(coro: Awaitable[Any]) -> Awaitable[Any] | None:
    """Run ``coro`` up to its first wait: None when it finished without one (its exceptions are
    raised here), else a coroutine that runs the rest. Handing a record to a stream with room
    finishes without a wait; wrapping every one in ``wait_first`` (four tasks) cost ~55 µs each."""
    if not isinstance(coro, Coroutine):
        return coro  # a future or the like: awaited as it is
    try:
        yielded = coro.send(None)
    except StopIteration:
        return None
    return _finish(_Rest(coro, yielded))


class WorkerConsumerThread(AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread with a short fetch wait (see :data:`FETCH_MAX_WAIT_MS`)."""

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # read when the consumer starts its fetcher
        tuning = getattr(self.consumer, "_fetch_tuning", None) or fetch_tuning()
        consumer._fetch_max_wait_ms, consumer._fetch_min_bytes = tuning.for_state(busy=False, idle=True)
        return consumer

    def set_fetch_wait(self, wait_ms: int, min_bytes: int) -> None:
        """The wait and minimum of the next fetch requests (aiokafka reads both for each request)."""
        fetcher = getattr(getattr(self, "_consumer", None), "_fetcher", None)
        if fetcher is not None and (fetcher._fetch_max_wait_ms, fetcher._fetch_min_bytes) != (wait_ms, min_bytes):
            fetcher._fetch_max_wait_ms = wait_ms
            fetcher._fetch_min_bytes = min_bytes


class WorkerConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer whose ``getmany`` never drops a fetched record for good and never
    lets one full stream hold up the others."""

    # how long getmany waits for new records while it holds some (their stream may have room soon)
    HOLD_POLL = 0.005
    # held records go on when their stream's buffer is at most this full (Faust resumes fetching a
    # partition it paused for a full buffer at 40%)
    HOLD_RESUME = 0.5
    # records handed on per getmany at most; the rest is held. Faust hands on a whole fetch (up to
    # a fetch per partition, thousands of records), and its delivery loop goes at the pace of the
    # slowest stream: new records of the other partitions waited for the next getmany (seconds)
    MAX_HANDED = 500
    # records handed on between two yields to the event loop (Faust: 100, but its ``wait_first``
    # around each record let the streams run between any two). Measured on 3,000-form bursts in
    # turns: every 10 records 454 / 523 / 437 row changes/s against 651 / 707 / 649 with 1, and
    # ~45% more worker CPU per row change: records handed on in bursts fill the streams' buffers, and
    # full buffers cost more (held records, partitions taken out of the fetch) than the yields
    YIELD_EVERY = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # fetched records not handed on yet (their stream's buffer was full, or the call had handed
        # on MAX_HANDED), in order, per partition; dropped in a rebalance, after which Faust seeks
        # every partition it keeps to its committed offset
        self._held: dict[TP, list[Any]] = {}
        self._held_generation: int | None = None
        self._fetch_tuning = fetch_tuning()
        self._idle = True  # the last getmany brought no records
        self._beside_commit: asyncio.Future[None] | None = None  # the delivery loop's commit

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return WorkerConsumerThread(self, loop=self.loop, beacon=self.beacon)

    def _busy(self, index: Mapping[TP, Any]) -> bool:
        """Behind: records held, or a stream's buffer at least half full."""
        return bool(self._held) or any(
            _fill(channel) >= BUSY_FILL for channels in list(index.values()) for channel in channels
        )

    @staticmethod
    def _stream_fill(tp: TP, index: Mapping[TP, Any]) -> float:
        """How full the fullest buffer of the streams reading ``tp`` is (0 to 1)."""
        return max((_fill(channel) for channel in index.get(tp) or ()), default=0.0)

    async def _next_records(self, timeout: float) -> tuple[Any, set[TP] | None]:
        """Faust's ``_wait_next_records``, except that partitions with held records are not
        fetched (what aiokafka has of them waits there: at most one fetch per partition)."""
        if not self._held:
            return await self._wait_next_records(timeout)
        if not self.flow_active:
            await self.wait(self.can_resume_flow)  # type: ignore[arg-type]
        try:
            self.not_waiting_next_records.set()
            active_partitions = self._get_active_partitions()
            fetch = active_partitions - self._held.keys()
            if fetch:
                return await self._getmany(
                    active_partitions=fetch, timeout=min(timeout, self.HOLD_POLL)
                ), active_partitions
            await self.sleep(self.HOLD_POLL)
            return {}, active_partitions
        finally:
            self.not_waiting_next_records.set()

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        # Faust's Consumer.getmany (faust-streaming 0.15.3), plus: hold the records of a stream
        # whose buffer is full, count what is handed on, seek back to what is neither
        index = getattr(self.app.topics, "_tp_index", {})  # the conductor's routing: tp → streams
        thread = getattr(self, "_thread", None)
        if isinstance(thread, WorkerConsumerThread):
            thread.set_fetch_wait(*self._fetch_tuning.for_state(self._busy(index), self._idle))
        generation_id = self.app.consumer_generation_id
        if self._held and (self._held_generation != generation_id or not self.flow_active):
            # a rebalance: Faust seeks every partition it keeps to its committed offset after it
            self._held.clear()
        records, active_partitions = await self._next_records(timeout)
        self._idle = not records
        generation_id = self.app.consumer_generation_id
        if self._held and self._held_generation != generation_id:
            self._held.clear()  # a rebalance began while we waited
        if records is None or self.should_stop:
            return
        # held records go on once their stream has room for many (not one at a time)
        held: dict[Any, list[Any]] = {}
        ready: dict[Any, list[Any]] = {}
        for tp, kept in self._held.items():
            (ready if self._stream_fill(tp, index) <= self.HOLD_RESUME else held)[tp] = kept
        self._held = {}
        batch = merge_held(ready, records) if ready else records
        skipped: set[Any] = set()
        delivered: dict[Any, int] = {}
        reason = ""
        handed = 0
        if self.flow_active:
            to_message = self._to_message
            for tp, record in self.scheduler.iterate(batch):
                if not self.flow_active:
                    reason = "flow stopped"
                    break
                if self.app.consumer_generation_id != generation_id:
                    reason = "generation changed"
                    break
                if tp in skipped:
                    continue
                waiting = held.get(tp)
                if waiting is not None or (
                    (handed >= self.MAX_HANDED or self._stream_fill(tp, index) >= 1.0) and not self._is_changelog_tp(tp)
                ):
                    # the stream has no room: this record and the partition's next ones wait
                    if waiting is None:
                        waiting = held[tp] = []
                    waiting.append(record)
                elif active_partitions is None or tp in active_partitions or tp in self._buffered_partitions:
                    delivered[tp] = delivered.get(tp, 0) + 1
                    handed += 1
                    yield tp, to_message(tp, record)
                else:
                    # a partition paused meanwhile: its remaining records are not handed on either
                    skipped.add(tp)
                    reason = "partition not active"
        else:
            reason = "flow not active"
        # Faust's monitor learns each partition's end offset once per call, not once per record
        # (the highwater lookup was 4% of the delivery loop)
        track_end_offset = self.app.monitor.track_tp_end_offset
        for tp in delivered:
            with contextlib.suppress(Exception):  # revoked meanwhile: nothing to track
                track_end_offset(tp, self.highwater(tp))
        if held and not reason.startswith(("flow", "generation")):
            self._held, self._held_generation = held, generation_id
            for tp, waiting in held.items():
                delivered[tp] = delivered.get(tp, 0) + len(waiting)  # kept, not lost
        left = undelivered(batch, delivered)
        if left:
            await self._seek_back(left, reason)

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - runs in the worker
        """Faust's delivery loop (faust-streaming 0.15.3 ``Consumer._drain_messages``), except that
        a record is handed to its streams directly, and only a hand-over that has to wait (a full
        buffer, the flow stopped for a rebalance) goes through ``wait_first`` with the flow's
        suspension: Faust did that for every record, four asyncio tasks each."""
        callback = self.callback
        getmany = self.getmany
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = cast(Any, fetcher)._stopped.is_set
        get_read_offset = self._read_offset.__getitem__
        set_read_offset = self._read_offset.__setitem__
        set_flag = self.diag.set_flag
        unset_flag = self.diag.unset_flag
        commit_every = self._commit_every
        yield_every = self.YIELD_EVERY
        num_since_yield = 0
        sleep = asyncio.sleep
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                set_flag(CONSUMER_FETCHING)
                ait = getmany(timeout=1.0)
                await self.sleep(0)
                if not self.should_stop:
                    async for tp, message in ait:
                        num_since_yield += 1
                        if num_since_yield >= yield_every:
                            await sleep(0)
                            num_since_yield = 0
                        offset = message.offset
                        r_offset = get_read_offset(tp)
                        if r_offset is None or offset >= r_offset:
                            # (Faust's gap tracking here is gone: this consumer has no gaps, _add_gap)
                            if commit_every is not None and self._n_acked >= commit_every:
                                self._n_acked = 0
                                self._commit_beside()
                            rest = run_until_suspended(callback(message))
                            if rest is not None:
                                await self.wait_first(rest, self.suspend_flow.wait())
                            set_read_offset(tp, offset)
                    unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            unset_flag(CONSUMER_FETCHING)

    def _commit_beside(self) -> None:
        """Commit in a task of its own, beside the delivery loop (Faust awaited it in the loop: no
        record was handed on while the records produced so far were waited for, or while the
        timer's commit ran, which the loop's commit waits for). One such commit at a time."""
        task = self._beside_commit
        if task is not None and not task.done():
            return
        self._beside_commit = asyncio.ensure_future(self._commit_logged())

    async def _commit_logged(self) -> None:
        try:
            await self.commit()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # as when the loop awaited it: the consumer crashes (the worker stops)
            log.exception("commit beside the delivery loop failed")
            await self.crash(exc)

    def _new_offset(self, tp: TP) -> int | None:
        acked = self._acked[tp]
        if not acked:
            return None
        offset, used = committable_run(acked, self._committed_offset[tp])
        if used:
            self._acked_index[tp].difference_update(acked[:used])
            del acked[:used]
        return offset

    async def _add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        """No gaps: a jump in offsets is a record that went missing, not one the topic lacks."""

    def ack(self, message: Message) -> bool:
        done = super().ack(message)
        # Faust keeps a message whose offset was acknowledged before (read twice after a seek) in
        # its unacknowledged set for ever, and a rebalance waits for that set to empty
        self._unacked_messages.discard(message)
        return done

    async def _seek_back(self, left: dict[Any, int], reason: str) -> None:
        try:
            assigned = self.assignment()
        except Exception:  # noqa: BLE001 - consumer stopping
            return
        for tp, offset in left.items():
            if tp not in assigned:
                continue  # revoked: its next owner starts at the committed offset
            if self._is_changelog_tp(tp):
                # records of a changelog partition Faust does not read (standby, recovered) are
                # dropped on purpose; dropped in a rebalance, a table recovery may wait for them
                if reason not in REBALANCE_DROPS:
                    continue
                try:
                    position = await self.position(tp)
                except Exception:  # noqa: BLE001 - revoked meanwhile: the rebalance seeks it
                    continue
                if not seek_back_changelog(reason, offset, position):
                    continue
            log.info(
                "records fetched but not handed on (%s): %s[%d] from %d read again",
                reason,
                tp.topic,
                tp.partition,
                offset,
            )
            try:
                await self.seek(tp, offset)
            except Exception as exc:  # noqa: BLE001 - revoked meanwhile: the rebalance seeks it
                log.info("seek of %s[%d] skipped: %r", tp.topic, tp.partition, exc)


class WorkerTransport(AIOKafkaTransport):
    """Faust's aiokafka transport with :class:`WorkerConsumer` and the lean record handler of
    :class:`~processors.worker_conductor.WorkerConductor`."""

    Consumer = WorkerConsumer
    Conductor = WorkerConductor
