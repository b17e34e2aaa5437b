"""The audit agent's pure parts: facts of a transform and of an apply batch, partitioning, the switch."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import yaml

from archsync import metrics
from archsync.audit_cli import parse_ts, to_csv, to_xml
from archsync.settings import Settings
from processors import audit
from processors.audit_agent import (
    ChainGauges,
    apply_facts,
    audit_topic_specs,
    audit_topics,
    fact_partition,
    register_audit,
    transform_facts,
)
from processors.model import ApplyCommand, Change, Conflict
from topology.model import parse_topology

REFERENCE = Path(__file__).resolve().parents[2] / "topology" / "reference.yaml"


def cmd(n: int, flow: str = "f") -> ApplyCommand:
    return ApplyCommand(
        command_id=f"{flow}:{n}",
        flow=flow,
        target_system="archive",
        table="public.arc_item",
        action="upsert",
        match={"source_ref": "F-1"},
        values={"title": "x", "code": {"$init": "K-1"}},
        source_system="oa",
        source_event_id="oa:1:1",
        source_commit_lsn=1,
        source_order=1,
        source_commit_ts_ms=1000,
        aggregate_key="oa:F-1",
    )


def test_transform_facts_record_change_rules_conflicts_and_dead_letters() -> None:
    change = Change("oa:1:1", "oa", "public.oa_form", "u", {"id": 1}, None, {"id": 1, "s": "B"}, 1, 1, 1000)
    state = SimpleNamespace(rows={"public.oa_form": {'{"id":1}': {"id": 1, "s": "B", "t": "kept"}}},
                            previous={"id": 1, "s": "A", "t": "kept"})  # fmt: skip
    conflict = Conflict("f", "public.arc_item", {"id": 1}, "status", "X", None, "rejected-not-owner", "r", "oa:1:1", 1)
    result = SimpleNamespace(commands=[cmd(1), cmd(2), cmd(3, "g")], conflicts=[conflict], rejected=[("bad", change)])
    facts = transform_facts("form:1", change, state, result)
    assert [f["kind"] for f in facts] == ["change_captured", "rule_fired", "rule_fired", "conflict", "dead_letter"]
    assert facts[0]["changed"] == ["s"] and facts[0]["values"] == '{"s":"B"}'
    assert facts[1]["links"] == ["oa:F-1"] and {f["aggregate"] for f in facts} == {"form:1"}
    failed = transform_facts("form:1", change, state, None, "TypeError: boom")
    assert [f["kind"] for f in failed] == ["change_captured", "dead_letter"] and failed[1][
        "reason"
    ] == "TypeError: boom"
    assert transform_facts("form:1", change, state, result) == facts  # deterministic: a re-emit is the same


def test_apply_facts_one_per_command_outcome() -> None:
    a, b = cmd(1), cmd(2)
    result = SimpleNamespace(outcomes=[(a, "applied"), (b, "failed")], failed=[(b, "constraint")], conflicts=[])
    facts = apply_facts([a, b], result, 5000)
    assert [(f["kind"], f["outcome"]) for f in facts] == [
        ("command_applied", "applied"),
        ("command_applied", "failed"),
        ("dead_letter", None),
    ]
    assert facts[1]["reason"] == "constraint" and facts[0]["aggregate"] == "oa:F-1"
    assert facts[0]["audit_id"] != audit.command_fact(a, "skipped_replay", 5000)["audit_id"]


def test_facts_of_one_aggregate_share_a_partition() -> None:
    assert fact_partition("form:42", 3) == fact_partition("form:42", 3)
    assert {fact_partition(f"form:{n}", 3) for n in range(50)} == {0, 1, 2}


def test_audit_can_be_switched_off() -> None:
    data = yaml.safe_load(REFERENCE.read_text())
    on = parse_topology(yaml.safe_dump(data))
    assert [s.name for s in audit_topic_specs(on)] == [
        "archsync.audit.facts",
        "archsync.audit",
        "archsync.dlq.audit",
    ]
    assert dict(audit_topic_specs(on)[1].config) == {
        "cleanup.policy": "compact",
        "retention.ms": "-1",
        "retention.bytes": "-1",
    }
    data["audit"] = {"enabled": False}
    off = parse_topology(yaml.safe_dump(data))
    assert audit_topic_specs(off) == [] and audit_topics(off)["audit"] == "archsync.audit"
    import faust

    app = faust.App("t-audit-off", broker="kafka://localhost:1", store="memory://", autodiscover=False)
    assert not register_audit(app, off, Settings()).enabled
    app2 = faust.App("t-audit-on", broker="kafka://localhost:1", store="memory://", autodiscover=False)
    assert register_audit(app2, on, Settings()).enabled and "audit" in app2.agents


def test_timestamps_and_export_formats() -> None:
    assert parse_ts("1700000000000") == 1_700_000_000_000
    assert parse_ts("2026-01-01") == parse_ts("2026-01-01T00:00:00Z") == parse_ts("2026-01-01T08:00:00+08:00")
    rows = [{"audit_id": "a", "kind": "k", "links": ["x", "y"], "values": '{"a":"<&>"}', "ts": "t"}]
    assert to_csv(rows).splitlines()[1].split(",")[2:5] == ["a", "k", ""]
    assert "<item>x</item>" in to_xml(rows, {"count": "1"}) and "&lt;&amp;&gt;" in to_xml(rows, {})


def test_facts_are_sent_one_message_per_partition_in_order() -> None:
    from processors.audit_agent import group_by_partition

    facts = [{"aggregate": f"oa:F-{n % 7}", "n": n} for n in range(40)]
    grouped = group_by_partition(facts, 3)
    assert sum(len(items) for _, items in grouped.values()) == 40
    for partition, (key, items) in grouped.items():
        assert {fact_partition(f["aggregate"], 3) for f in items} == {partition}
        aggregates = {f["aggregate"] for f in items}
        assert key == (next(iter(aggregates)).encode() if len(aggregates) == 1 else f"@partition:{partition}".encode())
        for agg in aggregates:  # each aggregate's facts keep their order
            ns = [f["n"] for f in items if f["aggregate"] == agg]
            assert ns == sorted(ns)
    [(key, items)] = group_by_partition([{"aggregate": "form:1", "n": 0}], 3).values()
    assert key == b"form:1" and len(items) == 1


def test_chain_gauges_count_the_heads_once_per_assignment_then_follow_the_appends() -> None:
    heads = [b'{"seq":3,"hash":"a","recent":{}}', b'{"seq":5,"hash":"b","recent":{}}', None]
    reads: list[int] = []

    def read() -> list[bytes | None]:
        reads.append(1)
        return heads

    gauges = ChainGauges()
    gauges.publish(frozenset({0, 1}), read)
    assert (gauges.chains, gauges.length, len(reads)) == (2, 8, 1)
    gauges.appended(new_chain=True, records=2)  # a new chain of two events
    gauges.appended(new_chain=False, records=1)  # one more event on a chain held
    gauges.publish(frozenset({0, 1}), read)  # same partitions: the heads are not read again
    assert (gauges.chains, gauges.length, len(reads)) == (3, 11, 1)
    assert metrics.AUDIT_CHAINS._value.get() == 3 and metrics.AUDIT_CHAIN_LENGTH._value.get() == 11
    gauges.publish(frozenset({1}), read)  # a rebalance: counted again from the table
    assert (gauges.chains, gauges.length, len(reads)) == (2, 8, 2)
