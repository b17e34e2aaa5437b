"""Topology operations (topology/operations.py): sync modes, notify rules, scans, reconcile; and
notifications raised by the transform (processors/notifications.py flow_actions)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from processors.model import Change
from processors.notifications import TODO_TASK_TYPE, decode_notification, notification_message
from processors.transform import new_state, transform
from topology.model import Topology, TopologyError, load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ref() -> Topology:
    return load_topology()


def with_changes(mutate: Any) -> str:
    data = yaml.safe_load((ROOT / "topology" / "reference.yaml").read_text())
    mutate(data)
    return yaml.safe_dump(data, sort_keys=False)


def flow(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in data["flows"] if f["name"] == name)


def test_reference_has_a_rule_for_every_kind(ref: Topology) -> None:
    from processors.notifications import KINDS

    assert ref.operations is not None
    kinds = {f.notify.kind for f in ref.flows if f.notify} | {s.notify.kind for s in ref.operations.scans}
    assert kinds == set(KINDS)
    assert ref.operations.todo_table == "oa.public.oa_task"
    assert ref.operations.reconcile_schedule == "30 3 * * *"
    assert all(f.sync.mode == "realtime" for f in ref.flows)


def test_sync_modes_parse_and_are_checked() -> None:
    def modes(d: dict[str, Any]) -> None:
        flow(d, "approved_form_to_item").update(mode="scheduled", window="0 2 * * *", window_minutes=30)
        flow(d, "borrow_request_to_task")["mode"] = "triggered"
        flow(d, "notify_item_filed")["release"] = "borrow_request_to_task"

    t = parse_topology(with_changes(modes), "t.yaml")
    flows = {f.name: f for f in t.flows}
    assert flows["approved_form_to_item"].sync.window == "0 2 * * *"
    assert flows["approved_form_to_item"].sync.window_minutes == 30.0
    assert flows["borrow_request_to_task"].sync.held
    assert flows["notify_item_filed"].release == ("borrow_request_to_task",)

    cases = [
        (lambda d: flow(d, "approved_form_to_item").update(mode="scheduled"), "needs a 'window'"),
        (lambda d: flow(d, "approved_form_to_item").update(mode="scheduled", window="61 * * * *"), "not a valid cron"),
        (lambda d: flow(d, "approved_form_to_item").update(mode="nightly"), "must be one of"),
        (lambda d: flow(d, "approved_form_to_item").update(window="0 2 * * *"), "only fits mode: scheduled"),
        (lambda d: flow(d, "notify_item_filed").update(release="approved_form_to_item"), "is realtime"),
        (lambda d: flow(d, "notify_item_filed").update(release="nope"), "unknown flow 'nope'"),
        (lambda d: flow(d, "notify_item_filed")["notify"].update(kind="party"), "must be one of"),
        (lambda d: flow(d, "notify_item_filed").update(match={"a": "1"}), "needs a command target 'to'"),
        (lambda d: d["notifications"]["scans"][0].update(days=[5, 1]), "min 5 is greater than max 1"),
        (lambda d: d["notifications"]["scans"][0].update(table="nope.public.x"), "unknown system 'nope'"),
        (lambda d: d["reconcile"].update(schedule="every night"), "not a valid cron"),
        (lambda d: d["notifications"].pop("todo"), "names no table"),
    ]
    for mutate, message in cases:
        with pytest.raises(TopologyError, match=message) as err:
            parse_topology(with_changes(mutate), "t.yaml")
        assert "t.yaml:" in str(err.value)


def item(**kw: Any) -> dict[str, Any]:
    row = {
        "id": 7,
        "archive_code": "F001-KJ·2026·Y30-0001-0007",
        "status": "RECEIVED",
        "source_system": "oa",
        "source_ref": "EX-1",
        "responsible": "zhang.san",
        "title": "Travel",
        "expire_date": "2056-12-31",
        "hold": False,
    }
    row.update(kw)
    return row


def ch(table: str, op: str, after: dict[str, Any], before: dict[str, Any] | None, lsn: int) -> Change:
    return Change(
        f"archive:{lsn}:0", "archive", table, op, {"id": after["id"]}, before, after, lsn, 0, 1_780_000_000_000
    )


def test_filed_item_notifies_once(ref: Topology) -> None:
    state = new_state()
    transform(ref, state, ch("public.arc_item", "c", item(), None, 10))
    result = transform(ref, state, ch("public.arc_item", "u", item(status="FILED"), item(), 20))
    [note] = result.notifications
    assert note["kind"] == "archive_filed" and note["recipient"] == "zhang.san"
    assert note["subject"] == "Archive item F001-KJ·2026·Y30-0001-0007 filed"
    assert note["subject_id"] == "7" and note["subject_table"] == "public.arc_item"
    assert decode_notification(notification_message(note)[1])["notification_id"] == note["notification_id"]
    assert not [c for c in result.commands if c.table == "public.oa_task"]  # no to-do for this kind
    # another update of a filed item: no second notification
    again = transform(ref, state, ch("public.arc_item", "u", item(status="FILED", title="x"), item(status="FILED"), 30))
    assert again.notifications == []


def test_failed_check_notifies_with_an_oa_todo(ref: Topology) -> None:
    state = new_state()
    transform(ref, state, ch("public.arc_item", "c", item(), None, 10))
    check = {
        "id": 3,
        "item_id": 7,
        "stage": "PRESERVATION",
        "authenticity": True,
        "integrity": False,
        "usability": True,
        "security": True,
        "fault_code": "HASH_MISMATCH",
    }
    result = transform(ref, state, ch("public.arc_check_result", "c", check, None, 40))
    kinds = sorted(n["kind"] for n in result.notifications)
    assert kinds == ["check_failed", "fixity_violation"]
    todos = [c for c in result.commands if c.table == "public.oa_task"]
    assert len(todos) == 2 and {c.action for c in todos} == {"insert_once"}
    todo = todos[0]
    assert todo.target_system == "oa" and todo.values["task_type"] == TODO_TASK_TYPE
    assert todo.match["idempotency_key"].startswith("notification:check_failed:")
    assert "HASH_MISMATCH" in todo.values["title"]
    passed = {**check, "id": 4, "integrity": True}
    assert transform(ref, state, ch("public.arc_check_result", "c", passed, None, 50)).notifications == []
