"""Aggregate routing (captures put an aggregate's rows in one partition), audit fact messages,
and the held changelog records of the worker's tables."""

from __future__ import annotations

from decimal import Decimal
from types import SimpleNamespace
from typing import Any
from uuid import UUID

import orjson
import pytest
from aiokafka.partitioner import murmur2

from connectors.kafka_sink import ChangeProducer
from connectors.offsets import FlushTracker
from processors.audit_agent import fact_partition, facts_messages
from processors.model import Change, to_jsonable
from processors.record_producer import DeferredChangelog
from processors.transform import aggregate_key_of
from topology.flows import AggregateRouter, aggregate_message_key
from topology.model import Topology, load_topology


@pytest.fixture(scope="module")
def topo() -> Topology:
    return load_topology()


def test_message_key_is_the_same_for_typed_and_json_values() -> None:
    assert aggregate_message_key("form", 42) == b"form:42"
    assert aggregate_message_key("form", "A-1") == b"form:A-1"
    uid = UUID("12345678-1234-5678-1234-567812345678")
    assert aggregate_message_key("x", uid) == aggregate_message_key("x", to_jsonable(uid))
    assert aggregate_message_key("x", Decimal("1.50")) == aggregate_message_key("x", to_jsonable(Decimal("1.50")))


def test_router_agrees_with_the_transform(topo: Topology) -> None:
    router = AggregateRouter(topo.aggregates)
    cases = [
        ("public.oa_form", {"id": 8, "status": "APPROVED"}),
        ("public.oa_attachment", {"id": 3, "form_id": 8}),
        ("public.oa_approval_record", {"id": 5, "form_id": 9}),
    ]
    for table, row in cases:
        change = Change(
            event_id="oa:1:1",
            system="oa",
            table=table,
            op="c",
            key={"id": row["id"]},
            before=None,
            after=row,
            commit_lsn=1,
            order=1,
            commit_ts_ms=None,
        )
        target = aggregate_key_of(topo, change)
        assert target is not None
        assert router.route("oa", table, row) == target
        assert router.message_key("oa", table, row) == aggregate_message_key(*target)
    # no aggregate, or a NULL reference to the root: no route (the primary key decides)
    assert router.route("oa", "public.unknown", {"id": 1}) is None
    assert router.route("oa", "public.oa_attachment", {"id": 1, "form_id": None}) is None
    assert router.route("archive", "public.oa_form", {"id": 1}) is None


def test_change_producer_partitions_by_aggregate(topo: Topology) -> None:
    router = AggregateRouter(topo.aggregates)
    producer = ChangeProducer(
        "127.0.0.1:1",  # never contacted: partition_of is pure
        FlushTracker(),
        system="oa",
        database="oa",
        topic_for=lambda schema, table: f"t.{table}",
        dead_letter_topic="t.dlq",
        partitions=6,
        route=lambda table, image: router.message_key("oa", table, image),
    )
    expected = (murmur2(b"form:8") & 0x7FFFFFFF) % 6
    assert producer.partition_of("public.oa_form", "c", None, {"id": 8}) == expected
    assert producer.partition_of("public.oa_attachment", "u", {"id": 1}, {"id": 1, "form_id": 8}) == expected
    assert producer.partition_of("public.oa_attachment", "d", {"id": 1, "form_id": 8}, None) == expected
    # a delete whose before image holds only the key: no route
    assert producer.partition_of("public.oa_attachment", "d", {"id": 1}, None) is None
    assert producer.partition_of("public.unknown", "c", None, {"id": 1}) is None


def test_facts_messages_group_by_partition_and_split_large_ones() -> None:
    facts = [{"aggregate": f"form:{i % 5}", "n": i, "pad": "x" * 100} for i in range(200)]
    messages = facts_messages(facts, 3, max_bytes=2_000)
    seen: list[dict[str, Any]] = []
    for partition, key, value in messages:
        items = orjson.loads(value)
        assert len(value) <= 2_000 + 200
        for item in items:
            assert fact_partition(item["aggregate"], 3) == partition
        aggregates = {item["aggregate"] for item in items}
        assert key == (next(iter(aggregates)).encode() if key[:1] != b"@" else f"@partition:{partition}".encode())
        seen += items
    assert sorted(f["n"] for f in seen) == list(range(200))
    for agg in {f["aggregate"] for f in facts}:  # each aggregate's facts keep their order
        ns = [f["n"] for f in seen if f["aggregate"] == agg]
        assert ns == sorted(ns)


class _Topic:
    def get_topic_name(self) -> str:
        return "app-aggregates-changelog"

    def prepare_key(self, key: Any, serializer: Any) -> tuple[bytes, None]:
        return (key if isinstance(key, bytes) else orjson.dumps(key)), None

    def prepare_value(self, value: Any, serializer: Any) -> tuple[bytes, None]:
        return (value if isinstance(value, bytes) else orjson.dumps(value)), None


def test_deferred_changelog_keeps_the_last_write_of_a_key() -> None:
    sent: list[Any] = []
    table = SimpleNamespace(
        name="aggregates",
        changelog_topic=_Topic(),
        key_serializer="raw",
        value_serializer="raw",
        send_changelog=lambda *a, **k: sent.append(a),
    )
    deferred = DeferredChangelog()
    deferred.attach(table)
    assert table.send_changelog(1, b"form:1", b"v1").message.partition == 1  # what Faust reads back
    table.send_changelog(1, b"form:1", b"v2")
    table.send_changelog(0, b"form:2", b"w1")
    table.send_changelog(0, b"form:3", None)  # a delete: a tombstone
    assert not sent  # nothing goes by Faust's producer
    held = deferred.take()
    assert held == [
        ("app-aggregates-changelog", 1, b"form:1", b"v2"),
        ("app-aggregates-changelog", 0, b"form:2", b"w1"),
        ("app-aggregates-changelog", 0, b"form:3", None),
    ]
    assert deferred.take() == []
    assert (deferred.written, deferred.sent) == (4, 3)
    with pytest.raises(RuntimeError, match="partition"):
        table.send_changelog(None, b"k", b"v")
