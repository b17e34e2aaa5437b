"""Watch the worker's table recovery for a stall: an active changelog partition with records left to
restore and none received for a while.

Seen once in ~20 runs of the two-worker kill test (``tests/integration/test_pipeline.py``): after a
rebalance the surviving worker's recovery received no changelog record for minutes (Faust: "No event
received for active tp …-changelog since recovery start", every 5 s) and the worker never became
ready. Faust only logs it. The worker's consumer drops fetched records in a rebalance without
seeking back for changelog partitions (Faust seeks them when a recovery starts), so a changelog batch
dropped between that seek and the recovery's reads leaves aiokafka's position past records the
recovery is waiting for: nothing fetches them again.

:class:`RecoveryWatch` (a timer of the worker) reports such a partition once — a warning with the
consumer's state of it, ``archsync_partition_stalled`` set to 1 — and seeks it back to the first
offset the recovery has not restored yet (:func:`recovery_remedy`), at most once per stall period.
The decisions are pure functions; the I/O (the consumer's state, the seek) sits in the class.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from archsync import metrics
from archsync.settings import env_int
from processors.consumer_watch import kafka_state

log = logging.getLogger(__name__)

# no changelog record for this long, with records left to restore: stalled. Faust warns after 5 s
# per partition (a slow broker is not a stall); a seek that was not needed costs a re-read only.
RECOVERY_STALL_SECONDS = 30


def recovery_stall_seconds() -> int:
    """``ARCHSYNC_RECOVERY_STALL_SECONDS`` or :data:`RECOVERY_STALL_SECONDS`."""
    return env_int("ARCHSYNC_RECOVERY_STALL_SECONDS", RECOVERY_STALL_SECONDS, minimum=1)


def stalled_recovery(
    remaining: Mapping[Any, int],
    received_at: Mapping[Any, float],
    started_at: float | None,
    now: float,
    stall_after: float,
) -> list[Any]:
    """The active changelog partitions with records left to restore (``remaining`` > 0) and no
    record received for ``stall_after`` seconds (counted from the recovery's start when none came)."""
    if started_at is None:
        return []
    stalled = []
    for tp, left in remaining.items():
        if left <= 0:
            continue
        last = received_at.get(tp)
        since = max(last, started_at) if last is not None else started_at
        if now - since >= stall_after:
            stalled.append(tp)
    return stalled


def recovery_remedy(restored: int | None, fetch_position: int | None, queued: int, fetched: bool) -> tuple[str, int]:
    """What to do for a stalled changelog partition: ``("seek", offset)`` — the first offset not
    restored — when aiokafka's fetch position is past it and no record of the partition is on its way
    (queued for the recovery or fetched and buffered in aiokafka), i.e. records vanished; else
    ``("none", 0)``. ``restored`` is the last offset the recovery applied (-1: none)."""
    if restored is None or fetch_position is None or queued or fetched:
        return "none", 0
    first_missing = restored + 1
    if fetch_position > first_missing:
        return "seek", first_missing
    return "none", 0


class RecoveryWatch:
    """A timer of the worker: finds stalled table recoveries, reports them, seeks them back."""

    def __init__(self, app: Any, stall_after: float | None = None) -> None:
        self.app = app
        self.stall_after = float(stall_after if stall_after is not None else recovery_stall_seconds())
        self.attempted: dict[Any, float] = {}  # when a stalled partition was last sought back
        self.reported: set[Any] = set()

    async def check(self) -> None:
        recovery = getattr(getattr(self.app, "tables", None), "recovery", None)
        consumer = getattr(self.app, "consumer", None)
        if recovery is None or consumer is None or not recovery.in_recovery:
            self._clear(self.reported)
            self.reported, self.attempted = set(), {}
            return
        now = time.monotonic()
        stalled = stalled_recovery(
            recovery.active_remaining(),
            recovery._active_events_received_at,
            recovery._recovery_started_at,
            now,
            self.stall_after,
        )
        for tp in stalled:
            if now - self.attempted.get(tp, -self.stall_after) < self.stall_after:
                continue  # sought back a moment ago; give it time to work
            self.attempted[tp] = now
            state = self.state_of(tp)
            if tp not in self.reported:
                log.warning(
                    "table recovery stalled: records left to restore and none received for %.0f s: %s[%d] %s",
                    self.stall_after,
                    tp.topic,
                    tp.partition,
                    " ".join(f"{k}={v}" for k, v in state.items()),
                    extra={"topic": tp.topic, "partition": tp.partition, **state},
                )
                metrics.PARTITION_STALLED.labels(tp.topic, str(tp.partition)).set(1)
            fetched = bool(state.get("kafka_fetched_buffered"))
            action, offset = recovery_remedy(state["restored"], state.get("kafka_position"), state["queued"], fetched)
            if action == "seek":
                log.warning("seeking stalled changelog partition %s[%d] back to %d", tp.topic, tp.partition, offset)
                consumer.resume_partitions({tp})
                await consumer.seek(tp, offset)
        self._clear(self.reported - set(stalled))
        self.reported = set(stalled)

    @staticmethod
    def _clear(tps: set[Any]) -> None:
        for tp in tps:
            metrics.PARTITION_STALLED.labels(tp.topic, str(tp.partition)).set(0)
            log.warning("table recovery flows again: %s[%d]", tp.topic, tp.partition)

    def state_of(self, tp: Any) -> dict[str, Any]:
        """What the recovery and the consumer know of ``tp`` (a snapshot, read without locks)."""
        recovery = self.app.tables.recovery
        consumer = self.app.consumer
        queue = getattr(self.app.tables.changelog_queue, "_queue", ())
        state: dict[str, Any] = {
            "restored": recovery.active_offsets.get(tp),
            "highwater": recovery.active_highwaters.get(tp),
            "queued": sum(1 for e in list(queue or ()) if getattr(getattr(e, "message", None), "tp", None) == tp),
            "faust_active": tp in (consumer._active_partitions or ()),
            "faust_paused": tp in consumer._paused_partitions,
            "flow_active": consumer.flow_active,
        }
        state.update(kafka_state(consumer, tp))
        return state
