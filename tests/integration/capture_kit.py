"""Helpers for capture tests: a throw-away source (tables, slot, publication, topics) per test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from archsync.settings import Settings
from connectors.capture import CaptureService
from connectors.catalog import drop_slot, forget_snapshots
from connectors.kafka_admin import delete_topics
from connectors.postgres import connect
from schemas.codec import ChangeEventCodec, DeadLetterCodec
from topology.model import Topology, parse_topology


@dataclass
class SourceFixture:
    """A source named ``oa`` over the OA database, with its own slot, publication and topic prefix."""

    settings: Settings
    unique: str
    tables: list[str]
    heartbeat_seconds: float = 1.0
    extra: str = ""
    topology: Topology = field(init=False)

    def __post_init__(self) -> None:
        self.prefix = f"t{self.unique}"
        self.slot = f"s_{self.unique}"
        tables = "\n".join(f"      - public.{t}" for t in self.tables)
        self.yaml = (
            f"version: 1\nname: test\ntopics:\n  prefix: {self.prefix}\n  partitions: 2\n"
            f"sources:\n  oa:\n    slot: {self.slot}\n    publication: p_{self.unique}\n"
            f"    heartbeat_seconds: {self.heartbeat_seconds}\n    snapshot_chunk_rows: 1000\n{self.extra}"
            f"    tables:\n{tables}\n"
        )
        self.topology = parse_topology(self.yaml, f"test-{self.unique}.yaml")

    def sql(self, *statements: str, params: Any = None) -> list[Any]:
        out: list[Any] = []
        with connect(self.settings.oa_dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
            for st in statements:
                cur = conn.execute(st, params)
                out.append(cur.fetchall() if cur.description else None)
        return out

    def topic(self, table: str) -> str:
        return self.topology.topics.change_topic("oa", "public", table)

    def cleanup(self) -> None:
        with connect(self.settings.oa_dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
            for _ in range(50):
                try:
                    drop_slot(conn, self.slot, terminate=True)
                    break
                except Exception:  # noqa: BLE001 - reported, never swallowed silently
                    time.sleep(0.2)
            forget_snapshots(conn, self.slot)
            conn.execute(f"DROP PUBLICATION IF EXISTS p_{self.unique}")
            for t in self.tables:
                conn.execute(f"DROP TABLE IF EXISTS {t} CASCADE")
        delete_topics(
            self.settings.kafka_bootstrap,
            [self.topic(t) for t in self.tables] + [f"{self.prefix}.dlq.capture"],
        )


class CaptureThread:
    """Runs a CaptureService in a thread of the test process."""

    def __init__(self, source: SourceFixture) -> None:
        self.service = CaptureService(source.topology, "oa", source.settings)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.service.run()
        except BaseException as exc:  # noqa: BLE001 - reported, never swallowed silently
            self.error = exc

    def __enter__(self) -> CaptureThread:
        self.thread.start()
        return self

    def wait_streaming(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.service.stats.streaming:
            if self.error:
                raise self.error
            assert time.monotonic() < deadline, "capture did not start streaming"
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        self.service.stop()
        self.thread.join(30)
        if self.error and not exc[0]:
            raise self.error


def consume(
    settings: Settings,
    topics: Iterable[str],
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 60,
    dead_letters: bool = False,
) -> list[dict[str, Any]]:
    """Read the topics from the beginning, decoding records, until ``until(records)`` or timeout."""
    codec: Any = DeadLetterCodec() if dead_letters else ChangeEventCodec()
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"test-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(list(topics))
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msgs = consumer.consume(1000, 0.5)
            for msg in msgs:
                if msg.error():
                    continue
                record = codec.decode(msg.value())
                record["_key"] = msg.key()
                record["_partition"] = msg.partition()
                record["_offset"] = msg.offset()
                record["_topic"] = msg.topic()
                out.append(record)
            if until(out):
                break
    finally:
        consumer.close()
    return out


def topic_size(settings: Settings, topic: str, partitions: int) -> int:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "sizer"})
    try:
        total = 0
        for p in range(partitions):
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            except KafkaException:  # the topic does not exist yet
                return 0
            total += high - low
        return total
    finally:
        consumer.close()
