from __future__ import annotations

from pathlib import Path

import pytest

from topology.expressions import Expression
from topology.model import Topology, TopologyError, load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]

HEAD = """version: 1
sources:
  oa:
    tables: [public.oa_form, public.oa_attachment, public.oa_task]
  archive:
    tables: [public.arc_item]
"""
AGG = """aggregates:
  form:
    source: oa
    root: public.oa_form
    key: id
    members:
      public.oa_attachment: form_id
"""
FLOW = """flows:
  - name: f1
    from: form
    on: [public.oa_form]
    when: "root.status == 'APPROVED'"
    to: archive.public.arc_item
    match: {source_system: "'oa'", source_ref: root.form_no}
    set: {title: root.title}
"""


def parse(text: str) -> Topology:
    return parse_topology(text, "t.yaml")


def test_minimal_flow_parses() -> None:
    topo = parse(HEAD + AGG + FLOW)
    (flow,) = topo.flows
    assert flow.name == "f1" and flow.aggregate == "form" and flow.source_system == "oa"
    assert flow.on == ("public.oa_form",)  # YAML's `on:` is the boolean True: normalised
    assert flow.ops == {"c", "u", "r"}
    assert flow.command.target_system == "archive" and flow.command.table == "public.arc_item"
    assert flow.command.action == "upsert"
    assert isinstance(flow.command.match["source_ref"], Expression)
    assert topo.aggregates["form"].tables == ("public.oa_form", "public.oa_attachment")


def test_defaults_and_nested_values() -> None:
    text = (
        HEAD
        + AGG
        + """flows:
  - name: f1
    from: form
    to: archive.public.arc_item
    match: {source_ref: root.form_no}
    set:
      metadata: {a: root.a, n: 3, flag: true, list: [root.b, null]}
"""
    )
    (flow,) = parse(text).flows
    assert flow.on == ("public.oa_form",)
    meta = flow.command.set["metadata"]
    assert isinstance(meta, dict) and isinstance(meta["list"], list)


def test_reference_topology_flows() -> None:
    topo = load_topology()
    names = {f.name for f in topo.flows}
    assert {
        "approved_form_to_item",
        "approved_form_attachment_to_file",
        "form_cancelled_to_item",
        "approval_revoked_to_event",
        "item_status_to_form",
        "borrow_request_to_task",
        "task_decision_to_borrow",
    } <= names
    assert set(topo.aggregates) >= {"form", "task", "item", "borrow"}
    own = topo.ownership["archive.public.arc_item"]
    assert own.owner("status") == "archive" and own.owner("title") == "oa"
    assert own.may_write("oa", "form_cancelled_to_item", "status")
    assert not own.may_write("oa", "approved_form_to_item", "status")


def test_acme_example_parses() -> None:
    topo = load_topology(ROOT / "topology" / "examples" / "acme.yaml")
    assert topo.topics.prefix == "acme"
    assert topo.source("acme").slot == "acme_oa" and topo.source("archive").publication == "acme_archive"
    assert len(topo.flows) >= 5


def test_writing_a_column_not_owned_is_not_a_parse_error() -> None:
    text = (
        HEAD
        + AGG
        + FLOW
        + """ownership:
  archive.public.arc_item: {default: archive}
"""
    )
    assert parse(text).ownership["archive.public.arc_item"].owner("title") == "archive"


@pytest.mark.parametrize(
    ("tail", "needle"),
    [
        (AGG.replace("source: oa", "source: erp"), ":9: aggregates.form.source: unknown source 'erp'"),
        (
            AGG.replace("root: public.oa_form", "root: public.nope"),
            ":10: aggregates.form.root: table 'public.nope' is not captured",
        ),
        (
            AGG.replace("form_id", "1"),
            ":13: aggregates.form.members.public.oa_attachment: expected the member's column",
        ),
        (
            AGG + "  task:\n    source: oa\n    root: public.oa_form\n    key: id\n",
            ":16: aggregates.task.root: table 'public.oa_form' already belongs",
        ),
        (AGG + FLOW.replace("from: form", "from: forms"), ":16: flows.0.from: unknown aggregate 'forms'"),
        (
            AGG + FLOW.replace("on: [public.oa_form]", "on: [public.oa_task]"),
            ":17: flows.0.on.0: table 'public.oa_task' is not part",
        ),
        (
            AGG + FLOW.replace("to: archive.public.arc_item", "to: public.arc_item"),
            ":19: flows.0.to: expected <system>.<schema>.<table>",
        ),
        (
            AGG + FLOW.replace("to: archive.public.arc_item", "to: erp.public.arc_item"),
            ":19: flows.0.to: unknown target system 'erp'",
        ),
        (AGG + FLOW.replace("root.status == 'APPROVED'", "boom(root)"), ":18: flows.0.when: unknown function 'boom'"),
        (AGG + FLOW.replace("root.status == 'APPROVED'", "root.status =="), ":18: flows.0.when: syntax error"),
        (
            AGG + FLOW.replace("title: root.title", "title: root.__dict__"),
            ":21: flows.0.set.title: attribute '__dict__'",
        ),
        (AGG + FLOW + "    colour: red\n", ":22: flows.0.colour: unknown key 'colour'"),
        (AGG + FLOW + "    ops: [c, x]\n", ":22: flows.0.ops.1: unknown op 'x'"),
        (AGG + FLOW + "    action: merge\n", ":22: flows.0.action: must be one of"),
        (AGG + FLOW + "    action: delete\n", "flows.0.action: a delete takes only 'match'"),
        (
            AGG + FLOW.replace("match: {source_system: \"'oa'\", source_ref: root.form_no}", "match: {}"),
            ":20: flows.0.match: at least one column",
        ),
        (AGG + FLOW + FLOW.replace("flows:\n", ""), ":22: flows.1.name: flow 'f1' is defined twice"),
        (
            AGG
            + FLOW
            + "    children:\n      - to: archive.public.arc_file\n"
            + "        match: {seq: row.id}\n        set: {x: nope}\n",
            ":25: flows.0.children.0.set.x: unknown name 'nope'",
        ),
        (
            AGG + FLOW + "ownership:\n  archive.public.arc_item: {default: erp}\n",
            ":23: ownership.archive.public.arc_item.default: must be one of",
        ),
        (
            AGG + FLOW + "ownership:\n  public.arc_item: {default: oa}\n",
            ":23: ownership.public.arc_item: expected system.schema.table",
        ),
        (
            AGG + FLOW + "ownership:\n  archive.public.arc_item: {default: oa, grants: {nope: [status]}}\n",
            "ownership.archive.public.arc_item.grants.nope: unknown flow 'nope'",
        ),
        (
            AGG + FLOW + "ownership:\n  archive.public.arc_item: {default: oa, oa: [a], archive: [a]}\n",
            "column 'a' is already owned by 'oa'",
        ),
    ],
)
def test_errors_name_key_and_line(tail: str, needle: str) -> None:
    with pytest.raises(TopologyError) as info:
        parse(HEAD + tail)
    assert needle in str(info.value)
    assert str(info.value).startswith("t.yaml:")


def test_echo_is_read_per_command() -> None:
    from topology.model import load_topology

    flow = next(f for f in load_topology().flows if f.name == "approved_form_to_item")
    assert flow.command is not None and flow.command.echo is True
    assert [c.echo for c in flow.command.children] == [False]
