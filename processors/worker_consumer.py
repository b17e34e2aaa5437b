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

Records read twice this way are processed twice: every agent of the worker is idempotent (event-id
dedupe, position guards, deterministic audit ids).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import Transport as AIOKafkaTransport
from faust.types import TP, Message

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


class WorkerConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer whose ``getmany`` never drops a fetched record for good."""

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        # Faust's Consumer.getmany (faust-streaming 0.15.3), plus: count what is handed on and seek
        # back to what is not
        records, active_partitions = await self._wait_next_records(timeout)
        generation_id = self.app.consumer_generation_id
        if records is None or self.should_stop:
            return
        delivered: dict[Any, int] = {}
        reason = ""
        if self.flow_active:
            to_message = self._to_message
            for tp, record in self.scheduler.iterate(records):
                if not self.flow_active:
                    reason = "flow stopped"
                    break
                if self.app.consumer_generation_id != generation_id:
                    reason = "generation changed"
                    break
                if active_partitions is None or tp in active_partitions or tp in self._buffered_partitions:
                    self.app.monitor.track_tp_end_offset(tp, self.highwater(tp))
                    delivered[tp] = delivered.get(tp, 0) + 1
                    yield tp, to_message(tp, record)
                else:
                    # a partition paused meanwhile: its remaining records are not handed on either
                    reason = "partition not active"
        else:
            reason = "flow not active"
        left = undelivered(records, delivered)
        if left:
            await self._seek_back(left, reason)

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
            if tp not in assigned or self._is_changelog_tp(tp):
                # revoked: its next owner starts at the committed offset; a changelog partition's
                # records are dropped on purpose while Faust does not read it (standby, recovered)
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
    """Faust's aiokafka transport with :class:`WorkerConsumer`."""

    Consumer = WorkerConsumer
