"""Watch the worker's assigned partitions for a stall: records waiting in a partition that the worker
has stopped reading (its position unchanged while the partition's end offset is ahead of it).

A stall is logged once as a warning with the consumer's state for that partition (Faust's
active / paused / buffered sets, aiokafka's fetch state) and shown as ``archsync_partition_stalled``;
the worker then seeks the partition back to its committed offset, so what is waiting is read again
(see :func:`ConsumerWatch._resume` and ``processors/worker_consumer.py`` for how Faust loses track
of records in a rebalance).

The decisions are pure functions (:func:`watch_step` over snapshots of positions, :func:`remedy` over
a partition's consumer state); the I/O (end offsets, the consumer's state, the seek) sits in
:class:`ConsumerWatch`.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from archsync import metrics

log = logging.getLogger(__name__)

STALL_SECONDS = 15.0  # a partition with records waiting and no progress this long is stalled
# right after a rebalance (when Faust loses records) a partition is stalled sooner: nothing queued
# or in processing there means records vanished, not a slow agent
STALL_SECONDS_AFTER_REBALANCE = 5.0
AFTER_REBALANCE = 60.0


@dataclass(frozen=True)
class Progress:
    """Where the worker is in a partition, and since when it has been there."""

    position: int  # the next offset to process (the committed offset)
    end: int  # the partition's end offset
    since: float  # when ``position`` last changed (monotonic seconds)

    @property
    def behind(self) -> bool:
        return self.end > self.position


def watch_step(
    before: Mapping[Any, Progress],
    positions: Mapping[Any, int],
    ends: Mapping[Any, int],
    now: float,
    stall_after: float = STALL_SECONDS,
) -> tuple[dict[Any, Progress], list[Any]]:
    """The new progress of each partition in ``positions`` and the partitions stalled now: behind
    their end offset with the same position for ``stall_after`` seconds. A partition the worker
    caught up on (or that got new records while it moved) starts a new period."""
    after: dict[Any, Progress] = {}
    stalled = []
    for tp, position in positions.items():
        end = ends.get(tp)
        if end is None:
            continue
        prev = before.get(tp)
        still = prev is not None and prev.position == position and prev.behind
        since = prev.since if still and prev is not None else now
        progress = Progress(position, end, since)
        after[tp] = progress
        if progress.behind and now - since >= stall_after:
            stalled.append(tp)
    return after, stalled


def task_stacks(depth: int = 12) -> str:
    """Where each asyncio task of this thread waits (its chain of awaits, innermost last)."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        where: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None and len(where) < depth:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            frame = frame or getattr(awaited, "gi_frame", None)
            if frame is None:
                where.append(type(awaited).__name__)
                break
            where.append(f"{frame.f_code.co_name}@{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno}")
            awaited = (
                getattr(awaited, "cr_await", None)
                or getattr(awaited, "ag_await", None)
                or getattr(awaited, "gi_yieldfrom", None)
            )
        out.write(f"  {task.get_name()}: {' > '.join(where)}\n")
    return out.getvalue()


def kafka_state(consumer: Any, tp: Any) -> dict[str, Any]:
    """What aiokafka knows of ``tp`` under Faust's ``consumer``: paused, fetch position, highwater,
    fetched records buffered (internals of another library: what is there, or why not)."""
    try:
        kafka = consumer._thread._consumer
        tp_state = kafka._subscription.subscription.assignment.state_value(tp)
        return {
            "kafka_paused": tp_state.paused,
            "kafka_has_position": tp_state.has_valid_position,
            "kafka_position": tp_state.position if tp_state.has_valid_position else None,
            "kafka_highwater": tp_state.highwater,
            "kafka_fetched_buffered": tp in kafka._fetcher._records,
        }
    except Exception as exc:  # noqa: BLE001 - report what is there
        return {"kafka_state": f"unavailable: {exc!r}"}


def remedy(state: Mapping[str, Any], earliest: int | None) -> tuple[str, int]:
    """What to do for a stalled partition, from its consumer state: ``("seek", committed)`` when
    aiokafka's position is past the committed offset and no record of it is queued, held by the
    consumer or in processing (records vanished on their way to the agents); ``("retention", earliest)`` when the
    partition now starts after the committed offset; ``("none", 0)`` otherwise."""
    position = state.get("position")
    if position is None or state.get("unacked") or state.get("queued") or state.get("held"):
        return "none", 0
    if earliest is not None and earliest > position:
        return "retention", earliest
    if (state.get("kafka_position") or 0) > position:
        return "seek", position
    return "none", 0


class ConsumerWatch:
    """A timer of the worker: finds stalled partitions, reports them, asks Faust to fetch them."""

    def __init__(self, app: Any, stall_after: float = STALL_SECONDS) -> None:
        self.app = app
        self.stall_after = stall_after
        self.progress: dict[Any, Progress] = {}
        self.reported: set[Any] = set()
        self.attempted: dict[Any, float] = {}  # when a stalled partition was last sought back
        self.rebalanced_at = time.monotonic()  # the worker starts with a rebalance

    def _positions(self, consumer: Any, tps: list[Any]) -> dict[Any, int]:
        # the committed offset: what was read but never processed (dropped by the consumer in a
        # rebalance) counts as not done
        return {tp: consumer._committed_offset.get(tp) or 0 for tp in tps}

    def _queued(self, tp: Any) -> int:
        """Events of ``tp`` waiting in the agents' input queues (delivered, not yet taken)."""
        n = 0
        for channel in list(getattr(self.app.topics, "_topics", ())):
            queue = getattr(channel, "_queue", None)
            for event in list(getattr(queue, "_queue", ()) or ()):
                if getattr(getattr(event, "message", None), "tp", None) == tp:
                    n += 1
        return n

    async def check(self) -> None:
        app = self.app
        if app.rebalancing or getattr(app, "in_recovery", False) or app.consumer is None:
            self.progress = {}
            self.rebalanced_at = time.monotonic()
            return
        consumer = app.consumer
        try:
            tps = sorted(tp for tp in consumer.assignment() if not consumer._is_changelog_tp(tp))
        except Exception:  # noqa: BLE001 - not started yet
            return
        if not tps:
            return
        ends = await consumer.highwaters(*tps)
        positions = self._positions(consumer, tps)
        now = time.monotonic()
        after = STALL_SECONDS_AFTER_REBALANCE if now - self.rebalanced_at < AFTER_REBALANCE else self.stall_after
        after = min(after, self.stall_after)
        self.progress, stalled = watch_step(self.progress, positions, ends, now, after)
        now_stalled = set(stalled)
        for tp in stalled:
            if now - self.attempted.get(tp, -after) < after:
                continue  # tried a moment ago; give the seek time to work
            self.attempted[tp] = now
            state = self.state_of(tp)
            if tp not in self.reported:
                self._report(tp, state)
            await self._resume(tp, state)
        for tp in self.reported - now_stalled:
            self.attempted.pop(tp, None)
            metrics.PARTITION_STALLED.labels(tp.topic, str(tp.partition)).set(0)
            log.warning(
                "partition flows again: %s[%d]",
                tp.topic,
                tp.partition,
                extra={"topic": tp.topic, "partition": tp.partition},
            )
        self.reported = now_stalled

    def _report(self, tp: Any, state: dict[str, Any]) -> None:
        # the state in the message too: Faust's log handler drops ``extra``
        log.warning(
            "partition stalled: records waiting and none processed for a while: %s[%d] %s",
            tp.topic,
            tp.partition,
            " ".join(f"{k}={v}" for k, v in state.items()),
            extra={"topic": tp.topic, "partition": tp.partition, **state},
        )
        metrics.PARTITION_STALLED.labels(tp.topic, str(tp.partition)).set(1)
        log.info("tasks of the stalled worker:\n%s", task_stacks())

    def state_of(self, tp: Any) -> dict[str, Any]:
        """What the consumer knows of ``tp`` (for the log; read without locks, a snapshot)."""
        consumer = self.app.consumer
        progress = self.progress.get(tp)
        state: dict[str, Any] = {
            "position": progress.position if progress else None,
            "end_offset": progress.end if progress else None,
            "read_offset": consumer._read_offset.get(tp),
            "committed_offset": consumer._committed_offset.get(tp),
            "faust_active": tp in (consumer._active_partitions or ()),
            "faust_paused": tp in consumer._paused_partitions,
            "faust_buffered": tp in consumer._buffered_partitions,
            "flow_active": consumer.flow_active,
            "flow_control_active": self.app.flow_control.is_active(),
            "unacked": sum(1 for m in consumer._unacked_messages if m.tp == tp),
            "queued": self._queued(tp),
            "held": len(getattr(consumer, "_held", {}).get(tp, ())),  # fetched, waiting for room
        }
        state.update(kafka_state(consumer, tp))
        return state

    async def _resume(self, tp: Any, state: dict[str, Any]) -> None:
        """Read ``tp`` again from its committed offset: records aiokafka handed to Faust that never
        reached an agent (a rebalance in between) leave aiokafka's position past them and hold the
        partition's commits back (processors/worker_consumer.py); nothing reads them again until
        the next rebalance. Only when no record of ``tp`` is in an agent's queue or in processing;
        what was processed after the hole is processed again (idempotent)."""
        consumer = self.app.consumer
        consumer._buffered_partitions.discard(tp)
        consumer.resume_partitions({tp})
        earliest = None
        if state.get("position") is not None and not (state.get("unacked") or state.get("queued")):
            earliest = (await consumer.earliest_offsets(tp)).get(tp)
        action, offset = remedy(state, earliest)
        if action == "retention":
            # retention deleted records before the worker read them: they cannot be read again,
            # and the contiguous commits must start where the partition now starts
            log.error(
                "records of %s[%d] deleted by retention before they were processed: offsets %d to %d",
                tp.topic,
                tp.partition,
                state["position"],
                offset - 1,
            )
            consumer._committed_offset[tp] = offset
        elif action == "seek":
            log.warning("seeking stalled partition %s[%d] back to %d", tp.topic, tp.partition, offset)
            await consumer.seek(tp, offset)
