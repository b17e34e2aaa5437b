"""Process health, consumer lag and dead-letter backlog: read from Kafka, exported as metrics.

The worker runs :class:`LagPoller` in a background thread: every few seconds it reads the worker
group's committed offsets (one request by a consumer of the group, see :class:`OffsetReader`) and
the partitions' watermarks (one batched AdminClient request each), and the dead-letter topics'
sizes minus what ``archsync dlq replay`` re-drove. The capture
runs :func:`start_capture_observer`, which turns the capture's own counters into a progress time.
``archsync status`` uses the same readers once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import OffsetSpec

from archsync import metrics
from archsync.settings import Settings
from connectors.kafka_admin import RDKAFKA_LOG, admin_client
from topology.model import Topology

log = logging.getLogger(__name__)

ENV_LAG_INTERVAL = "ARCHSYNC_LAG_INTERVAL_SECONDS"
DEFAULT_LAG_INTERVAL = 10.0
DLQ_STAGES = ("capture", "normalise", "transform", "apply")
# processors/dead_letters.py commits what `archsync dlq replay` re-drove under this group
REPLAY_GROUP = "archsync-dlq-replay-{stage}"


def mark_started(role: str) -> None:
    """Process health: up, start time, and a first progress time."""
    now = time.time()
    metrics.PROCESS_UP.labels(role).set(1)
    metrics.PROCESS_START.labels(role).set(now)
    metrics.LAST_PROGRESS.labels(role).set(now)


def worker_group_id(topology: Topology) -> str:
    """The consumer group (Faust app id) of ``archsync worker`` for a topology (see processors/app.py)."""
    return f"archsync-{topology.name}-{topology.topics.prefix}"


def consumed_topics(topology: Topology) -> list[str]:
    """The topics the worker's agents consume: captured changes, normalised changes, apply commands."""
    from processors.app import captured_topics, pipeline_topics

    names = pipeline_topics(topology)
    return [*captured_topics(topology), names["changes"], *(names[f"apply_{s}"] for s in topology.sources)]


def dead_letter_topics(topology: Topology) -> dict[str, str]:
    """Dead-letter topic of each stage."""
    from processors.app import pipeline_topics

    names = pipeline_topics(topology)
    return {
        stage: topology.topics.dead_letter_topic("capture") if stage == "capture" else names[f"dlq_{stage}"]
        for stage in DLQ_STAGES
    }


@dataclass(frozen=True)
class PartitionLag:
    """One partition: its offsets range and the group's committed offset (None: never committed)."""

    topic: str
    partition: int
    low: int
    high: int
    committed: int | None

    @property
    def lag(self) -> int:
        """Messages the group has not committed yet (all retained ones when it never committed)."""
        start = self.committed if self.committed is not None else self.low
        return max(0, self.high - max(start, self.low))


class OffsetReader:
    """Batched offset reads with one AdminClient (thread-confined).

    Committed offsets are read by a consumer of the group (one per group, never subscribed, so it
    joins nothing), not by ``AdminClient.list_consumer_group_offsets``: librdkafka (2.4 to 2.16 at
    least, librdkafka#5040) dereferences the admin client's missing consumer group when the answer
    is NOT_COORDINATOR — a broker restarting, a group never seen — and the process dies of a
    segfault in ``rd_kafka_cgrp_op`` (seen three times killing a worker here).
    """

    def __init__(self, bootstrap: str, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.bootstrap = bootstrap
        self.admin = admin_client(bootstrap)
        self._group_readers: dict[str, Consumer] = {}

    def partitions(self, topics: Iterable[str]) -> list[TopicPartition]:
        """The partitions of the topics that exist."""
        meta = self.admin.list_topics(timeout=self.timeout).topics
        return [TopicPartition(t, p) for t in topics if t in meta for p in sorted(meta[t].partitions)]

    def _offsets(self, tps: Sequence[TopicPartition], spec: OffsetSpec) -> dict[tuple[str, int], int]:
        if not tps:
            return {}
        futures = self.admin.list_offsets({tp: spec for tp in tps}, request_timeout=self.timeout)
        return {(tp.topic, tp.partition): f.result().offset for tp, f in futures.items()}

    def _group_reader(self, group: str) -> Consumer:
        reader = self._group_readers.get(group)
        if reader is None:
            reader = Consumer(
                {
                    "bootstrap.servers": self.bootstrap,
                    "group.id": group,
                    "enable.auto.commit": False,
                    "socket.connection.setup.timeout.ms": 3000,
                    "logger": RDKAFKA_LOG,
                }
            )
            self._group_readers[group] = reader
        return reader

    def committed(self, group: str, tps: Sequence[TopicPartition]) -> dict[tuple[str, int], int | None]:
        if not tps:
            return {}
        asked = [TopicPartition(tp.topic, tp.partition) for tp in tps]
        result = self._group_reader(group).committed(asked, timeout=self.timeout)
        return {(tp.topic, tp.partition): tp.offset if tp.offset >= 0 else None for tp in result}

    def close(self) -> None:
        """Close the group readers (they hold connections and librdkafka threads)."""
        readers, self._group_readers = self._group_readers, {}
        for reader in readers.values():
            reader.close()

    def lag(self, group: str, topics: Iterable[str]) -> list[PartitionLag]:
        """Per partition of ``topics``: low/high watermarks and ``group``'s committed offset."""
        tps = self.partitions(topics)
        low = self._offsets(tps, OffsetSpec.earliest())
        high = self._offsets(tps, OffsetSpec.latest())
        committed = self.committed(group, tps)
        return [
            PartitionLag(tp.topic, tp.partition, low[k], high[k], committed.get(k))
            for tp in tps
            for k in [(tp.topic, tp.partition)]
        ]

    def dead_letter_backlog(self, topology: Topology) -> dict[str, int]:
        """Per stage: dead letters not re-driven by ``archsync dlq replay`` yet (all, for stages without replay)."""
        backlog: dict[str, int] = {}
        for stage, topic in dead_letter_topics(topology).items():
            group = REPLAY_GROUP.format(stage=stage) if stage in ("transform", "apply") else ""
            rows = self.lag(group, [topic]) if group else self.lag("archsync-status", [topic])
            backlog[stage] = sum(r.lag if group else r.high - r.low for r in rows)
        return backlog

    def group_members(self, group: str) -> list[dict[str, Any]]:
        """Members of a consumer group: client id, host and assigned partitions."""
        desc = self.admin.describe_consumer_groups([group], request_timeout=self.timeout)[group].result()
        return [
            {
                "client_id": m.client_id,
                "host": m.host,
                "partitions": [
                    (tp.topic, tp.partition) for tp in (m.assignment.topic_partitions if m.assignment else [])
                ],
            }
            for m in desc.members
        ]


def lag_interval() -> float:
    text = os.environ.get(ENV_LAG_INTERVAL, "")
    try:
        return float(text) if text else DEFAULT_LAG_INTERVAL
    except ValueError:
        log.warning("ignoring %s=%r (not a number)", ENV_LAG_INTERVAL, text)
        return DEFAULT_LAG_INTERVAL


class LagPoller(threading.Thread):
    """Keeps the worker's consumer lag, dead-letter backlog and progress gauges current."""

    def __init__(self, topology: Topology, settings: Settings, interval: float | None = None) -> None:
        super().__init__(name="archsync-lag", daemon=True)
        self.topology = topology
        self.settings = settings
        self.interval = interval if interval is not None else lag_interval()
        self.group = worker_group_id(topology)
        self.topics = consumed_topics(topology)
        self._stop_event = threading.Event()
        self._last_committed: int | None = None
        self._failing = False

    def stop(self) -> None:
        self._stop_event.set()

    def poll_once(self, reader: OffsetReader) -> None:
        rows = reader.lag(self.group, self.topics)
        for r in rows:
            metrics.CONSUMER_LAG.labels(self.group, r.topic, str(r.partition)).set(r.lag)
        for stage, n in reader.dead_letter_backlog(self.topology).items():
            metrics.DLQ_MESSAGES.labels(stage).set(n)
        committed = sum(r.committed or 0 for r in rows)
        if committed != self._last_committed or sum(r.lag for r in rows) == 0:
            metrics.LAST_PROGRESS.labels("worker").set(time.time())
        self._last_committed = committed

    def run(self) -> None:
        reader = OffsetReader(self.settings.kafka_bootstrap)
        try:
            self._poll_until_stopped(reader)
        finally:
            reader.close()

    def _poll_until_stopped(self, reader: OffsetReader) -> None:
        while not self._stop_event.is_set():
            try:
                self.poll_once(reader)
                if self._failing:
                    log.info("consumer lag readable again", extra={"group": self.group})
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - a broker hiccup must not end the worker
                metrics.LAG_POLL_ERRORS.inc()
                if not self._failing:
                    log.warning("cannot read consumer lag: %s", exc, extra={"group": self.group})
                self._failing = True
            self._stop_event.wait(self.interval)


def initialise_worker_series(topology: Topology) -> None:
    """Zero-valued series for the label sets known up front: a counter born at its first event
    has no earlier sample, so rate() and increase() would miss that event (and alerts with it)."""
    for target in topology.sources:
        for outcome in ("applied", "skipped_replay", "skipped_older"):
            metrics.APPLIED.labels(target, outcome)
        metrics.APPLY_LATENCY.labels(target)
        metrics.END_TO_END.labels(target)
    for flow in topology.flows:
        if flow.command is not None:
            metrics.TRANSFORMED.labels(flow.name)
            metrics.FLOW_LATENCY.labels(flow.name, flow.command.target_system)
    metrics.DEAD_LETTERS.labels("apply", "failed")
    metrics.DEAD_LETTERS.labels("transform", "rejected")
    for stage in ("event_id", "position"):
        metrics.DEDUPE_HITS.labels(stage)
    for stage in DLQ_STAGES:
        metrics.DLQ_MESSAGES.labels(stage)


def initialise_capture_series(service: Any) -> None:
    """Zero-valued capture series (see :func:`initialise_worker_series`)."""
    name = service.name
    for table in service.source.tables:
        for op in ("c", "u", "d"):
            metrics.CAPTURED_EVENTS.labels(name, table, op)
    for origin in service.topology.appliers:
        metrics.OWN_ORIGIN_SKIPPED.labels(name, origin)
    metrics.HEARTBEATS.labels(name)


def start_worker_observer(topology: Topology, settings: Settings) -> LagPoller:
    """Process health and the lag poller of ``archsync worker``."""
    mark_started("worker")
    initialise_worker_series(topology)
    poller = LagPoller(topology, settings)
    poller.start()
    return poller


def start_capture_observer(service: Any, interval: float = 2.0) -> threading.Thread:
    """Process health of ``archsync capture``: progress when the capture confirmed or heartbeated."""
    mark_started("capture")
    initialise_capture_series(service)

    def watch() -> None:
        last: tuple[int, int, int] | None = None
        while not service.stopped:
            stats = service.stats
            now = (stats.confirmed_lsn, stats.heartbeats, stats.events)
            # a standby (not streaming) waits by design: ArchsyncCaptureDown watches the source
            if now != last or not stats.streaming:
                metrics.LAST_PROGRESS.labels("capture").set(time.time())
                last = now
            time.sleep(interval)
        metrics.PROCESS_UP.labels("capture").set(0)

    thread = threading.Thread(target=watch, name="archsync-capture-health", daemon=True)
    thread.start()
    return thread


def observe_flow_latency(target: str, commands: Iterable[Any]) -> None:
    """Apply agent hook: source commit → target commit of each applied command, per flow."""
    now_ms = time.time() * 1000
    for cmd in commands:
        if cmd.source_commit_ts_ms:
            metrics.child(metrics.FLOW_LATENCY, cmd.flow, target).observe(
                max(0.0, (now_ms - cmd.source_commit_ts_ms) / 1000)
            )
