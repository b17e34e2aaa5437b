"""Sync modes: realtime, scheduled and triggered flows; held commands stay in Kafka.

The transform agent sends the commands of a held flow (``mode: scheduled`` or ``triggered``) to
``<prefix>.held.<flow>`` instead of ``<prefix>.apply.<system>`` (:func:`route_topic`). A release
forwards everything in the held topic up to its end offsets at release time (optionally only what
was held before a given time) to the apply topics, then commits the releaser's consumer offsets
(group ``archsync-<prefix>-releaser``): at least once, and the applier's command ids and source
position guards make a re-forwarded command a no-op. Nothing is buffered in memory beyond one
poll.

Releases happen when a scheduled flow's window opens (:class:`WindowScheduler`, run by the worker
every second, on the leader), while the window stays open (``window_minutes``), on a release
marker on ``<prefix>.control`` (written by a rule's ``release:`` or ``archsync release FLOW
--via-worker``), or directly by ``archsync release FLOW``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from croniter import croniter

from archsync import metrics
from archsync.errors import ArchsyncError
from archsync.settings import Settings
from topology.flows import Flow
from topology.model import Topology

log = logging.getLogger(__name__)

REOPEN_SECONDS = 5.0  # while a window is open, release again this often


class ReleaseError(ArchsyncError):
    """A release cannot run (unknown or realtime flow, broker trouble)."""


def held_topic(prefix: str, flow: str) -> str:
    """``<prefix>.held.<flow>``: where the commands of a held flow wait."""
    return f"{prefix}.held.{flow}"


def control_topic(prefix: str) -> str:
    """``<prefix>.control``: release markers (JSON ``{"action": "release", "flow": ...}``)."""
    return f"{prefix}.control"


def held_flows(topology: Topology) -> list[Flow]:
    return [f for f in topology.flows if f.sync.held]


def operations_topics(topology: Topology) -> dict[str, str]:
    """The topics of the operations features, by pipeline key (created with the pipeline's)."""
    prefix = topology.topics.prefix
    names = {"notifications": f"{prefix}.notifications", "control": control_topic(prefix)}
    for flow in held_flows(topology):
        names[f"held_{flow.name}"] = held_topic(prefix, flow.name)
    return names


def held_flow(topology: Topology, name: str) -> Flow:
    """The held flow ``name``, or a ReleaseError naming the held flows."""
    for flow in topology.flows:
        if flow.name == name:
            if not flow.sync.held:
                raise ReleaseError(f"flow {name!r} is realtime: nothing is held to release")
            return flow
    known = ", ".join(f.name for f in held_flows(topology)) or "none"
    raise ReleaseError(f"unknown flow {name!r} (held flows: {known})")


def release_marker(flow: str, by: str) -> bytes:
    return orjson.dumps({"action": "release", "flow": flow, "by": by, "ts_ms": int(time.time() * 1000)})


# ----------------------------------------------------------------------------------- windows


def _local(now: datetime | None) -> datetime:
    """``now`` as an aware time (cron fields are read in its zone; the local zone by default)."""
    if now is None or now.tzinfo is None:
        return (now or datetime.now()).astimezone()
    return now


def last_fire(cron: str, now: datetime | None = None) -> datetime:
    """The latest window opening at or before ``now`` (local time)."""
    now = _local(now)
    nxt: datetime = croniter(cron, now - timedelta(microseconds=1)).get_next(datetime)
    if nxt <= now:
        return nxt
    prev: datetime = croniter(cron, now).get_prev(datetime)
    return prev


def next_fire(cron: str, now: datetime | None = None) -> datetime:
    """The first window opening after ``now``."""
    nxt: datetime = croniter(cron, _local(now)).get_next(datetime)
    return nxt


@dataclass
class WindowScheduler:
    """Decides when a scheduled flow is released; ``tick(now)`` says whether to release now and
    up to which time (``None``: everything held so far).

    The first tick after a (re)start releases what was held before the last window opening (a
    window missed while no worker ran); afterwards each window opening releases everything, and
    while the window is open (``window_minutes``) it releases again every few seconds."""

    cron: str
    minutes: float = 0.0
    released_at: datetime | None = None
    _last_open: datetime | None = field(default=None, repr=False)

    def tick(self, now: datetime | None = None) -> tuple[bool, datetime | None]:
        now = _local(now)
        opened = last_fire(self.cron, now)
        is_open = now < opened + timedelta(minutes=self.minutes)
        if self.released_at is None:
            self.released_at, self._last_open = now, opened
            return True, (None if is_open else opened)
        if self._last_open is None or opened > self._last_open:
            self.released_at, self._last_open = now, opened
            return True, None
        if is_open and (now - self.released_at).total_seconds() >= REOPEN_SECONDS:
            self.released_at = now
            return True, None
        return False, None


# ----------------------------------------------------------------------------------- release


def _producer(settings: Settings) -> Producer:
    # murmur2 like the Java client and aiokafka (Faust): a key lands in the same partition as the
    # commands the transform agent sends straight to the apply topic
    return Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
            "linger.ms": 5,
        }
    )


def release_held(
    topology: Topology,
    settings: Settings,
    flow_name: str,
    *,
    until: datetime | None = None,
    timeout: float = 120.0,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Forward the held commands of ``flow_name`` to the apply topics; the number forwarded.

    Reads each partition of the held topic from the releaser group's committed offset up to the
    end offset seen at the start (only messages held before ``until`` when given), produces each
    to ``<prefix>.apply.<target_system>`` with its key, waits for the acks, then commits.
    """
    flow = held_flow(topology, flow_name)
    prefix = topology.topics.prefix
    topic = held_topic(prefix, flow.name)
    until_ms = int(until.timestamp() * 1000) if until is not None else None
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"archsync-{prefix}-releaser",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    producer = _producer(settings)
    forwarded = 0
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            raise ReleaseError(f"held topic {topic} does not exist (run `archsync topology apply` or a worker)")
        parts = sorted(meta.partitions)
        committed = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        start: dict[int, int] = {}
        end: dict[int, int] = {}
        for tp in committed:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
            start[tp.partition] = tp.offset if tp.offset >= 0 else low
            end[tp.partition] = high
        pending = {p for p in parts if start[p] < end[p]}
        if not pending:
            return 0
        consumer.assign([TopicPartition(topic, p, start[p]) for p in sorted(pending)])
        position = dict(start)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise ReleaseError(f"release of {flow.name} timed out with {forwarded} forwarded")
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                log.warning("releaser: %s", msg.error())
                continue
            p, offset = int(msg.partition() or 0), int(msg.offset() or 0)
            if p not in pending or offset >= end[p]:
                pending.discard(p)
                continue
            if until_ms is not None and msg.timestamp()[1] > until_ms:
                pending.discard(p)  # held after the window opened: waits for the next one
                consumer.pause([TopicPartition(topic, p)])
                continue
            target = orjson.loads(msg.value() or b"{}").get("target_system")
            while True:
                try:
                    producer.produce(f"{prefix}.apply.{target}", msg.value(), msg.key())
                    break
                except BufferError:
                    producer.poll(0.2)
            producer.poll(0)
            forwarded += 1
            position[p] = offset + 1
            if position[p] >= end[p]:
                pending.discard(p)
            if forwarded % 5000 == 0:
                _commit(producer, consumer, topic, position)
                if progress is not None:
                    progress(forwarded)
        _commit(producer, consumer, topic, position)
    except KafkaException as exc:
        raise ReleaseError(f"release of {flow.name}: {exc}") from None
    finally:
        producer.flush(30)
        consumer.close()
    if forwarded:
        metrics.RELEASED_COMMANDS.labels(flow.name).inc(forwarded)
        log.info("held commands released", extra={"flow": flow.name, "released": forwarded})
    return forwarded


def _commit(producer: Producer, consumer: Consumer, topic: str, position: dict[int, int]) -> None:
    if producer.flush(60):
        raise ReleaseError("the broker did not acknowledge every released command; nothing committed")
    consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in position.items()], asynchronous=False)


def send_release_marker(topology: Topology, settings: Settings, flow_name: str, by: str = "cli") -> None:
    """Ask the worker(s) to release ``flow_name`` (a marker on ``<prefix>.control``)."""
    held_flow(topology, flow_name)
    producer = _producer(settings)
    producer.produce(control_topic(topology.topics.prefix), release_marker(flow_name, by), flow_name.encode())
    if producer.flush(30):
        raise ReleaseError("the broker did not acknowledge the release marker")


def held_backlog(topology: Topology, settings: Settings) -> dict[str, int]:
    """Per held flow: commands waiting (end offsets minus the releaser's committed offsets)."""
    out: dict[str, int] = {}
    flows = held_flows(topology)
    if not flows:
        return out
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"archsync-{topology.topics.prefix}-releaser"}
    )
    try:
        for flow in flows:
            topic = held_topic(topology.topics.prefix, flow.name)
            meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
            if meta is None or meta.error is not None:
                continue
            tps = [TopicPartition(topic, p) for p in meta.partitions]
            total = 0
            for tp in consumer.committed(tps, timeout=10):
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
                total += high - (tp.offset if tp.offset >= 0 else low)
            out[flow.name] = total
    finally:
        consumer.close()
    return out


def route(topology: Topology) -> Callable[[Any], str | None]:
    """For the transform agent: the held topic of a command's flow, or None (realtime)."""
    prefix = topology.topics.prefix
    held = {f.name: held_topic(prefix, f.name) for f in held_flows(topology)}

    def topic_of(cmd: Any) -> str | None:
        return held.get(cmd.flow)

    return topic_of
