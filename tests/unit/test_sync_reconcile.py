"""Pure parts of sync modes (windows) and reconciliation (synthesized state → expected commands)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from processors.model import ApplyCommand
from processors.operations import CronTicker
from processors.reconcile import _command_topologies, expected_commands, repair_commands, synthesize
from processors.sync_modes import WindowScheduler, last_fire, next_fire, route
from topology.model import Topology, load_topology

TZ = timezone(timedelta(hours=8))


def at(h: int, m: int, s: int = 0) -> datetime:
    return datetime(2026, 11, 28, h, m, s, tzinfo=TZ)


def test_fire_times() -> None:
    assert last_fire("0 2 * * *", at(2, 0)) == at(2, 0)
    assert last_fire("0 2 * * *", at(1, 59)) == at(2, 0) - timedelta(days=1)
    assert next_fire("0 2 * * *", at(2, 0)) == at(2, 0) + timedelta(days=1)
    assert next_fire("* * * * * */15", at(3, 0, 16)) == at(3, 0, 30)


def test_window_scheduler_releases_at_each_opening_and_while_open() -> None:
    w = WindowScheduler("0 2 * * *", minutes=10)
    # first tick (worker start, window closed): what was held before the last opening is overdue
    assert w.tick(at(1, 0)) == (True, at(2, 0) - timedelta(days=1))
    assert w.tick(at(1, 59, 59)) == (False, None)
    assert w.tick(at(2, 0, 1)) == (True, None)  # the window opens
    assert w.tick(at(2, 0, 3)) == (False, None)
    assert w.tick(at(2, 0, 7)) == (True, None)  # still open: again every few seconds
    assert w.tick(at(2, 11)) == (False, None)  # closed
    started_open = WindowScheduler("0 2 * * *", minutes=10)
    assert started_open.tick(at(2, 5)) == (True, None)  # started inside a window: everything


def test_cron_ticker_fires_once_per_time() -> None:
    t = CronTicker("30 3 * * *", at(3, 0))
    assert not t.tick(at(3, 29, 59))
    assert t.tick(at(3, 30, 0))
    assert not t.tick(at(3, 30, 1))
    assert t.due == at(3, 30) + timedelta(days=1)


@pytest.fixture(scope="module")
def ref() -> Topology:
    return load_topology()


def test_route_sends_held_flows_to_their_topic(ref: Topology) -> None:
    import dataclasses

    from topology.operations import SyncMode

    flows = tuple(
        dataclasses.replace(f, sync=SyncMode("triggered")) if f.name == "borrow_request_to_task" else f
        for f in ref.flows
    )
    topic_of = route(dataclasses.replace(ref, flows=flows))
    cmd = ApplyCommand(
        "x", "borrow_request_to_task", "oa", "public.oa_task", "upsert", {}, {}, "archive", "e", 1, 0, None, "k"
    )
    assert topic_of(cmd) == "archsync.held.borrow_request_to_task"
    assert topic_of(dataclasses.replace(cmd, flow="item_status_to_form")) is None


def form_rows() -> dict[str, list[dict[str, object]]]:
    form = {
        "id": 5,
        "form_no": "EX-5",
        "form_type": "EXPENSE",
        "status": "APPROVED",
        "amount": "10.50",
        "fonds_code": "F9",
        "applicant": "zhang",
        "department": None,
        "currency": "CNY",
        "payee": None,
        "title": "trip",
        "fiscal_year": 2026,
        "fiscal_month": 11,
        "archive_code": None,
        "archive_status": None,
        "archive_fault": None,
        "row_version": 4,
        "created_at": datetime(2026, 11, 1, tzinfo=UTC),
        "updated_at": datetime(2026, 11, 2, tzinfo=UTC),
        "approved_at": datetime(2026, 11, 2, tzinfo=UTC),
    }
    attachment = {
        "id": 8,
        "form_id": 5,
        "kind": "SCAN",
        "file_name": "a.pdf",
        "size_bytes": 3,
        "sha256": "ab" * 32,
        "storage_uri": None,
        "content": None,
    }
    revoke = {
        "id": 9,
        "form_id": 5,
        "approver": "boss",
        "node": "n",
        "action": "REVOKE",
        "comment": "dup",
        "acted_at": datetime(2026, 11, 3, tzinfo=UTC),
    }
    return {"public.oa_form": [form], "public.oa_attachment": [attachment], "public.oa_approval_record": [revoke]}


def test_expected_commands_of_a_synthesized_form(ref: Topology) -> None:
    agg = ref.aggregates["form"]
    pks = {t: ["id"] for t in agg.tables}
    state, changes = synthesize(agg, form_rows(), "oa", 1000, pks)
    assert changes[0].table == "public.oa_form"  # the root first, then the members
    assert {c.table for c in changes[1:]} == {"public.oa_attachment", "public.oa_approval_record"}
    assert all(c.op == "r" for c in changes)
    commands, problems = expected_commands(ref, _command_topologies(ref, None), state, changes)
    assert problems == []
    by_table = {c.table: c for c in commands if c.flow != "approved_form_trail_to_item"}  # F1c: metadata only
    item = by_table["public.arc_item"]
    assert item.values["amount"] == "10.50" and item.values["status"] == {"$init": "RECEIVED"}
    assert item.values["metadata"]["approved_at"] == "2026-11-02T00:00:00+00:00"
    assert by_table["public.arc_file"].values["sha256"] == "ab" * 32  # child of the item and F1b: one command
    assert len([c for c in commands if c.table == "public.arc_file"]) == 1
    assert by_table["public.arc_business_event"].action == "insert_once"  # the REVOKE (an insert-only flow)
    only_cancel, _ = expected_commands(ref, _command_topologies(ref, {"form_cancelled_to_item"}), state, changes)
    assert only_cancel == []  # the form is approved: no cancel


def test_repair_commands_win_over_the_old_guard(ref: Topology) -> None:
    agg = ref.aggregates["form"]
    state, changes = synthesize(agg, form_rows(), "oa", 1000, {t: ["id"] for t in agg.tables})
    commands, _ = expected_commands(ref, _command_topologies(ref, None), state, changes)
    repaired = repair_commands("run1", commands, 5000)
    assert [c.source_commit_lsn for c in repaired] == [5000] * len(commands)
    assert [c.source_order for c in repaired] == list(range(len(commands)))
    assert all(c.command_id.startswith("repair:run1:") for c in repaired)
    assert len({c.txn_id for c in repaired}) == 1  # applied together
    assert [c.match for c in repaired] == [c.match for c in commands]
