"""Reading and re-driving dead letters (``archsync dlq list|replay``)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
from confluent_kafka import Consumer, Producer

from archsync.settings import Settings
from processors.app import pipeline_topics
from processors.model import ApplyCommand, Change
from schemas.codec import DeadLetterCodec
from topology.model import Topology


def _topic_of(topology: Topology, stage: str) -> str:
    if stage == "capture":
        return topology.topics.dead_letter_topic("capture")
    return pipeline_topics(topology)[f"dlq_{stage}"]


def _consume_all(
    settings: Settings, topic: str, group: str, commit: bool = False, idle_seconds: float = 2.0
) -> Iterator[Any]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    try:
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < idle_seconds:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            idle_since = time.monotonic()
            yield msg
            if commit:
                consumer.commit(message=msg, asynchronous=False)
    finally:
        consumer.close()


def read_dead_letters(topology: Topology, settings: Settings, stages: Iterable[str]) -> Iterator[dict[str, Any]]:
    codec = DeadLetterCodec()
    for stage in stages:
        topic = _topic_of(topology, stage)
        for msg in _consume_all(settings, topic, f"archsync-dlq-list-{time.time_ns()}"):
            if stage == "capture":
                record = codec.decode(msg.value())
                record["source"] = (
                    f"{record.get('source_system')}:{record.get('source_table')}@{record.get('source_lsn')}"
                )
            else:
                record = orjson.loads(msg.value())
                record["source"] = record.get("event_id") or record.get("command_id") or ""
            record["stage"] = stage
            record["topic"], record["offset"] = msg.topic(), msg.offset()
            yield record


def replay_dead_letters(topology: Topology, settings: Settings, stage: str) -> int:
    """Send each not-yet-replayed dead letter's original record back where it failed."""
    names = pipeline_topics(topology)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
    count = 0
    # the replay group's committed offset marks what was re-driven: each record is committed only
    # after the broker acknowledged its re-drive
    for msg in _consume_all(settings, _topic_of(topology, stage), f"archsync-dlq-replay-{stage}", commit=True):
        record = orjson.loads(msg.value())
        original = record.get("original")
        if original is None:
            continue
        if stage == "transform":
            change = Change.from_json(original)
            change.replayed = True
            producer.produce(names["changes"], value=change.to_json(), key=msg.key())
        else:
            cmd = ApplyCommand.from_json(original)
            producer.produce(names[f"apply_{cmd.target_system}"], value=cmd.to_json(), key=cmd.aggregate_key.encode())
        if producer.flush(30):
            raise RuntimeError("a dead letter could not be re-driven: the broker did not acknowledge it")
        count += 1
    return count
