"""The foundation: the real broker and both real databases do what archsync relies on."""

from __future__ import annotations

import subprocess
import sys
import time

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from archsync.settings import Settings
from connectors.kafka_admin import TopicSpec, delete_topics, ensure_topics
from connectors.postgres import connect


def test_kafka_round_trip_compacted_idempotent_group(settings: Settings, unique: str) -> None:
    topic = f"test.foundation.{unique}"
    created = ensure_topics(
        settings.kafka_bootstrap,
        [TopicSpec(topic, partitions=3, config={"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.01"})],
    )
    assert created == [topic]
    assert ensure_topics(settings.kafka_bootstrap, [TopicSpec(topic, partitions=3)]) == []  # idempotent
    try:
        admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        resource = ConfigResource(ConfigResource.Type.TOPIC, topic)
        configs = admin.describe_configs([resource])[resource].result()
        assert configs["cleanup.policy"].value == "compact"

        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "enable.idempotence": True, "acks": "all"})
        acked: list[str] = []
        for i in range(200):
            producer.produce(
                topic,
                key=f"k{i % 20}".encode(),
                value=f"v{i}".encode(),
                on_delivery=lambda err, msg: acked.append("ok" if err is None else str(err)),
            )
        assert producer.flush(30) == 0
        assert acked == ["ok"] * 200

        consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"g-{unique}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
            }
        )
        consumer.subscribe([topic])
        seen: dict[str, list[str]] = {}
        deadline = time.monotonic() + 60
        while sum(map(len, seen.values())) < 200 and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None or msg.error():
                continue
            seen.setdefault(msg.key().decode(), []).append(msg.value().decode())
        consumer.commit(asynchronous=False)
        committed = consumer.committed(consumer.assignment(), timeout=10)
        consumer.close()
        assert sum(map(len, seen.values())) == 200
        # per-key order is the produce order
        for key, values in seen.items():
            nums = [int(v[1:]) for v in values]
            assert nums == sorted(nums), key
        assert sum(tp.offset for tp in committed) == 200
    finally:
        delete_topics(settings.kafka_bootstrap, [topic])


def test_both_databases_write_read_and_logical_wal(settings: Settings, unique: str) -> None:
    for system in ("oa", "archive"):
        with connect(settings.dsn_for(system), settings.dsn_setting(system)) as conn:
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
            conn.execute(f"CREATE TEMP TABLE t_{unique} (id int primary key, amount numeric(18,2))")
            conn.execute(f"INSERT INTO t_{unique} VALUES (1, 1234567890123456.78)")
            row = conn.execute(f"SELECT amount::text FROM t_{unique}").fetchone()
            assert row == ("1234567890123456.78",)
            rolreplication = conn.execute("SELECT rolreplication FROM pg_roles WHERE rolname = current_user")
            assert rolreplication.fetchone() == (True,)


def test_reference_schemas_accept_minimal_rows(settings: Settings, unique: str) -> None:
    with connect(settings.oa_dsn, "ARCHSYNC_OA_DSN") as conn:
        conn.execute(
            "INSERT INTO oa_form (id, form_no, form_type, status, amount) VALUES (%s, %s, 'EXPENSE', 'DRAFT', 10.05)",
            (9_000_000_000 + int(unique[:6], 16), f"T-{unique}"),
        )
        row = conn.execute(
            "SELECT amount, archive_code, archive_status FROM oa_form WHERE form_no = %s", (f"T-{unique}",)
        ).fetchone()
        assert row is not None and str(row[0]) == "10.05" and row[1] is None
        conn.rollback()
    with connect(settings.archive_dsn, "ARCHSYNC_ARCHIVE_DSN") as conn:
        cols = {
            r[0]
            for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'arc_item'")
        }
        assert {
            "archive_code",
            "source_system",
            "source_ref",
            "status",
            "retention_code",
            "expire_date",
        } <= cols


def test_services_up_twice_is_harmless(repo) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(["scripts/services.sh", "up"], cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stderr


OFFSET_READER_PROBE = """
import sys
from confluent_kafka import TopicPartition
from archsync.observability import OffsetReader

bootstrap, topic, group, unique = sys.argv[1:5]
reader = OffsetReader(bootstrap)
try:
    rows = {(r.partition, r.committed, r.high) for r in reader.lag(group, [topic])}
    assert rows == {(0, 3, 5), (1, None, 0)}, rows
    for i in range(30):  # groups the broker never saw: NOT_COORDINATOR answers
        unseen = reader.committed(f"unseen-{unique}-{i}", [TopicPartition(topic, 0)])
        assert unseen == {(topic, 0): None}, unseen
finally:
    reader.close()
print("read")
"""


def test_offset_reader_reads_committed_offsets_of_real_and_unseen_groups(settings: Settings, unique: str) -> None:
    """The worker's lag poller and `archsync status` read committed offsets with a group consumer:
    AdminClient.list_consumer_group_offsets segfaults librdkafka on a NOT_COORDINATOR answer (an
    unseen group, a restarting broker; librdkafka#5040) — it killed workers here. A child process,
    so a crash fails this test instead of ending the session."""
    topic = f"test.offsets.{unique}"
    group = f"g-offsets-{unique}"
    ensure_topics(settings.kafka_bootstrap, [TopicSpec(topic, partitions=2)])
    try:
        producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
        for i in range(5):
            producer.produce(topic, value=f"v{i}".encode(), partition=0)
        assert producer.flush(30) == 0
        committer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
        committer.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
        committer.close()
        probe = subprocess.run(
            [sys.executable, "-c", OFFSET_READER_PROBE, settings.kafka_bootstrap, topic, group, unique],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert probe.returncode == 0 and "read" in probe.stdout, (probe.returncode, probe.stderr[-2000:])
    finally:
        delete_topics(settings.kafka_bootstrap, [topic])
