"""Which WAL position may be confirmed to PostgreSQL: only what Kafka has acknowledged.

A replication slot only advances to ``confirmed_flush_lsn``; confirming a position tells
PostgreSQL it may recycle the WAL before it and never send those changes again. So the capture
confirms a transaction's end LSN only once every record produced for it, and for every
transaction before it, has been acknowledged by the broker (acks=all). Transactions arrive in
commit order, so the confirmable position is the end of the longest fully acknowledged prefix.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any


class ProduceFailed(RuntimeError):
    """The broker refused a record for good: the capture must stop without confirming it."""


class PendingUnit:
    """One transaction (or heartbeat) in flight: how many of its records Kafka still owes."""

    __slots__ = ("end_lsn", "failure", "on_delivery", "opened_at", "pending", "sealed")

    def __init__(self, end_lsn: int) -> None:
        self.opened_at = time.monotonic()
        self.end_lsn = end_lsn
        self.pending = 0
        self.sealed = False
        self.failure: str | None = None
        self.on_delivery: Callable[[Any, Any], None] | None = None


class FlushTracker:
    """Tracks produced-but-unacknowledged records per transaction, in commit order."""

    def __init__(self, confirmed_lsn: int = 0, on_confirmed: Callable[[float], None] | None = None) -> None:
        """``on_confirmed(seconds)`` is told, per unit that became confirmable, how long it took."""
        self.on_confirmed = on_confirmed
        self._units: deque[PendingUnit] = deque()
        self.confirmed_lsn = confirmed_lsn
        self.acked = 0
        self.failures: list[str] = []

    def open(self, end_lsn: int) -> PendingUnit:
        """Register the next unit in stream order; its records are added before :meth:`seal`."""
        unit = PendingUnit(end_lsn)
        self._units.append(unit)
        return unit

    @staticmethod
    def add(unit: PendingUnit, count: int = 1) -> None:
        unit.pending += count

    def seal(self, unit: PendingUnit) -> None:
        """No more records will be added to ``unit``."""
        unit.sealed = True

    def ack(self, unit: PendingUnit, error: Any = None) -> None:
        """One record of ``unit`` was acknowledged (``error`` None) or failed for good."""
        unit.pending -= 1
        if error is not None:
            unit.failure = str(error)
            self.failures.append(unit.failure)
        else:
            self.acked += 1

    def callback(self, unit: PendingUnit) -> Callable[[Any, Any], None]:
        """A delivery callback for confluent-kafka bound to ``unit``."""

        def on_delivery(err: Any, _msg: Any) -> None:
            self.ack(unit, err)

        return on_delivery

    @property
    def in_flight(self) -> int:
        """Units not yet confirmable."""
        return len(self._units)

    def advance(self) -> int:
        """Pop the fully acknowledged prefix and return the LSN that may now be confirmed.

        Raises :class:`ProduceFailed` when the oldest unit has a failed record: nothing at or
        after it may be confirmed, so the capture stops and a restart re-reads it from the slot.
        """
        units = self._units
        while units:
            head = units[0]
            if head.failure is not None:
                raise ProduceFailed(f"a record was not delivered: {head.failure}")
            if not head.sealed or head.pending > 0:
                break
            units.popleft()
            if self.on_confirmed is not None and head.end_lsn:
                self.on_confirmed(time.monotonic() - head.opened_at)
            if head.end_lsn > self.confirmed_lsn:
                self.confirmed_lsn = head.end_lsn
        return self.confirmed_lsn

    def idle_advance(self, wal_end: int) -> int:
        """With nothing in flight, everything the server sent is handled: confirm ``wal_end``.

        This is how an idle slot follows WAL written by other databases of the cluster
        (PostgreSQL's own apply worker does the same on keepalives).
        """
        if not self._units and wal_end > self.confirmed_lsn:
            self.confirmed_lsn = wal_end
        return self.confirmed_lsn
