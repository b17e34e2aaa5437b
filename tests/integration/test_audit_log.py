"""The audit log's topic on the real broker: compaction keeps every distinct event, drops duplicates."""

from __future__ import annotations

import time

from confluent_kafka import Producer

from archsync.settings import Settings
from connectors.audit_log import read_log
from connectors.kafka_admin import TopicSpec, delete_topics, ensure_topics
from processors import audit
from processors.audit_agent import AUDIT_TOPIC_CONFIG

TINY_SEGMENTS = {
    **AUDIT_TOPIC_CONFIG,
    "segment.ms": "100",
    "segment.bytes": "65536",
    "min.cleanable.dirty.ratio": "0.01",
    "delete.retention.ms": "100",
    "min.compaction.lag.ms": "0",
}


def test_compaction_keeps_every_distinct_event_and_no_duplicate(settings: Settings, unique: str) -> None:
    topic = f"p{unique}.audit"
    ensure_topics(settings.kafka_bootstrap, [TopicSpec(topic, 1, 1, TINY_SEGMENTS)])
    try:
        errors: list[object] = []
        producer = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "enable.idempotence": True,
                "batch.size": 16384,
                "on_delivery": lambda err, msg: err and errors.append(err),
            }
        )
        state = audit.ChainState()
        distinct: dict[str, bytes] = {}
        for n in range(300):
            f = audit.admin_fact("test", "tester", 1_700_000_000_000 + n, f"n{n}", n=n)
            record, data, _ = audit.append_encoded(state, f)
            distinct[record["audit_id"]] = data
            producer.produce(topic, data, record["audit_id"].encode())
            if n % 3 == 0:  # an at-least-once redelivery: the identical record again, a bit later
                again, data2, replayed = audit.append_encoded(state, f)
                assert replayed and data2 == data
                producer.produce(topic, data2, again["audit_id"].encode())
        assert producer.flush(30) == 0 and not errors
        total = 300 + 100
        # keep rolling segments (segment.ms) with filler records until the cleaner has run
        deadline = time.monotonic() + 120
        while True:
            time.sleep(1)
            producer.produce(topic, b"", f"filler-{time.monotonic_ns()}".encode())
            producer.flush(10)
            ours = [r for r in read_log(settings, topic) if r.key and not r.key.startswith(b"filler-")]
            if len(ours) < total and len(ours) == len(distinct):
                break
            assert time.monotonic() < deadline, f"no compaction within 120 s ({len(ours)} of {total} records left)"
        keys = [r.key.decode() for r in ours if r.key]
        assert sorted(keys) == sorted(distinct), "a distinct event was lost or a duplicate kept"
        assert all(r.value == distinct[r.key.decode()] for r in ours if r.key)
        # the compacted log still verifies as one intact chain
        v = audit.ChainVerifier()
        for r in ours:
            assert r.value is not None
            v.feed_raw(topic, r.partition, r.offset, r.value, r.key.decode() if r.key else None)
        assert v.intact, [str(b) for b in v.breaks]
        assert v.chains["admin"].seq == 300
    finally:
        delete_topics(settings.kafka_bootstrap, [topic])
