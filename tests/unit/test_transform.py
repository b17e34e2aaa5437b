from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from processors.model import ApplyCommand, Change
from processors.transform import (
    AggregateState,
    TransformResult,
    aggregate_key_of,
    apply_change,
    duplicate_kind,
    new_state,
    transform,
)
from topology.model import Topology, load_topology, parse_topology

ROOT = Path(__file__).resolve().parents[2]
SHA = "ab" * 32
_lsn = itertools.count(1000, 10)


@pytest.fixture(scope="module")
def topo() -> Topology:
    return load_topology()


def change(
    system: str,
    table: str,
    op: str,
    after: dict[str, Any] | None,
    before: dict[str, Any] | None = None,
    key: str = "id",
    lsn: int | None = None,
) -> Change:
    row = after if after is not None else before
    assert row is not None
    commit_lsn = next(_lsn) if lsn is None else lsn
    return Change(
        event_id=f"{system}:{commit_lsn}:0",
        system=system,
        table=table,
        op=op,
        key={key: row[key]},
        before=before,
        after=after,
        commit_lsn=commit_lsn,
        order=0,
        commit_ts_ms=1_780_000_000_000,
    )


def form(**kw: Any) -> dict[str, Any]:
    row = {
        "id": 1,
        "form_no": "EX-2026-0001",
        "form_type": "EXPENSE",
        "status": "IN_APPROVAL",
        "amount": "1234.50",
        "fonds_code": None,
        "applicant": "zhang.san",
        "department": "Finance",
        "currency": "CNY",
        "payee": "ACME Ltd",
        "title": "Travel to Shanghai",
        "fiscal_year": 2026,
        "fiscal_month": 3,
        "archive_code": None,
        "archive_status": None,
        "archive_fault": None,
        "row_version": 3,
        "created_at": "2026-03-01T09:00:00+00:00",
        "updated_at": "2026-03-02T09:00:00+00:00",
        "approved_at": None,
    }
    row.update(kw)
    return row


def attachment(id_: int, **kw: Any) -> dict[str, Any]:
    row = {
        "id": id_,
        "form_id": 1,
        "kind": "EINVOICE_PDF",
        "file_name": f"invoice-{id_}.pdf",
        "size_bytes": 2048,
        "sha256": SHA,
        "storage_uri": f"s3://oa/{id_}",
    }
    row.update(kw)
    return row


def run(topo: Topology, state: AggregateState, ch: Change) -> TransformResult:
    assert apply_change(state, ch)  # the caller's contract: apply, then transform
    return transform(topo, state, ch)


def by_flow(result: TransformResult, flow: str) -> list[ApplyCommand]:
    return [c for c in result.commands if c.flow == flow]


def approved_form_state(topo: Topology, **kw: Any) -> tuple[AggregateState, TransformResult]:
    state = new_state()
    run(topo, state, change("oa", "public.oa_form", "c", form(**kw)))
    for a in (attachment(11), attachment(12, file_name="scan.OFD", kind="SCAN")):
        run(topo, state, change("oa", "public.oa_attachment", "c", a))
    run(
        topo,
        state,
        change(
            "oa",
            "public.oa_approval_record",
            "c",
            {
                "id": 5,
                "form_id": 1,
                "approver": "li.si",
                "node": "CFO",
                "action": "APPROVE",
                "comment": "ok",
                "acted_at": "2026-03-03T10:00:00+00:00",
            },
        ),
    )
    before = form(**kw)
    after = form(**{**kw, "status": "APPROVED", "row_version": 4, "approved_at": "2026-03-03T10:00:00+00:00"})
    result = run(topo, state, change("oa", "public.oa_form", "u", after, before))
    return state, result


# ------------------------------------------------------------------------------------- F1


def test_f1_approved_form_becomes_item_with_files(topo: Topology) -> None:
    _, result = approved_form_state(topo)
    assert not result.rejected and not result.conflicts
    item, *files = by_flow(result, "approved_form_to_item")
    assert item.target_system == "archive" and item.table == "public.arc_item" and item.action == "upsert"
    assert item.match == {"source_system": "oa", "source_ref": "EX-2026-0001"}
    v = item.values
    assert v["source_system"] == "oa" and v["source_ref"] == "EX-2026-0001"
    assert v["title"] == "Travel to Shanghai" and v["amount"] == "1234.50" and v["currency"] == "CNY"
    assert v["fonds_code"] == "F001" and v["class_code"] == "KJ"
    assert (v["fiscal_year"], v["fiscal_month"]) == (2026, 3)
    assert v["category"] == "VOUCHER" and v["retention_code"] == "Y30" and v["expire_date"] == "2056-12-31"
    assert v["source_version"] == 4
    assert v["status"] == {"$init": "RECEIVED"}
    assert v["archive_code"] == {
        "$init": {"$allocate": {"fonds": "F001", "class": "KJ", "year": 2026, "retention": "Y30"}}
    }
    meta = v["metadata"]
    assert meta["applicant"] == "zhang.san" and meta["payee"] == "ACME Ltd" and meta["form_type"] == "EXPENSE"
    assert [r["approver"] for r in meta["approvals"]] == ["li.si"]
    assert item.aggregate_key == "oa:EX-2026-0001" and item.command_id.startswith("approved_form_to_item:")
    assert item.source_system == "oa" and item.txn_id == f"oa:{item.source_commit_lsn}"
    lookup = {
        "$lookup": {
            "table": "public.arc_item",
            "column": "id",
            "where": {"source_system": "oa", "source_ref": "EX-2026-0001"},
        }
    }
    assert [f.match for f in files] == [{"item_id": lookup, "seq": 11}, {"item_id": lookup, "seq": 12}]
    assert files[0].table == "public.arc_file" and files[0].action == "upsert"
    assert files[0].values["format"] == "PDF" and files[1].values["format"] == "OFD"
    assert files[1].values["role"] == "SCAN" and files[0].values["sha256"] == SHA
    assert files[0].values["size_bytes"] == 2048 and files[0].values["storage_uri"] == "s3://oa/11"
    assert {f.aggregate_key for f in files} == {"oa:EX-2026-0001"}
    assert result.commands[0] is item  # the parent before its children


def test_f1_only_when_status_changes_to_approved(topo: Topology) -> None:
    state, _ = approved_form_state(topo)
    again = change("oa", "public.oa_form", "u", form(status="APPROVED", title="renamed"), form(status="APPROVED"))
    assert by_flow(run(topo, state, again), "approved_form_to_item") == []
    draft = new_state()
    assert run(topo, draft, change("oa", "public.oa_form", "c", form(status="DRAFT"))).commands == []


def test_f1_snapshot_of_approved_form_fires(topo: Topology) -> None:
    state = new_state()
    ch = change("oa", "public.oa_form", "r", form(status="APPROVED"))
    assert len(by_flow(run(topo, state, ch), "approved_form_to_item")) == 1


def test_f1_contract_and_fiscal_year_fallback(topo: Topology) -> None:
    _, result = approved_form_state(topo, form_type="CONTRACT", fiscal_year=None, fiscal_month=None, fonds_code="F009")
    item = by_flow(result, "approved_form_to_item")[0]
    v = item.values
    assert v["category"] == "OTHER" and v["retention_code"] == "Y30"
    assert (v["fiscal_year"], v["fiscal_month"]) == (2026, 3)  # from approved_at
    assert v["fonds_code"] == "F009"
    assert v["archive_code"]["$init"]["$allocate"]["fonds"] == "F009"


# ------------------------------------------------------------------------------------- F1b


def test_f1b_attachment_added_to_approved_form(topo: Topology) -> None:
    state, _ = approved_form_state(topo)
    result = run(topo, state, change("oa", "public.oa_attachment", "c", attachment(13)))
    (cmd,) = result.commands
    assert cmd.flow == "approved_form_attachment_to_file" and cmd.table == "public.arc_file"
    assert cmd.match["seq"] == 13 and cmd.values["file_name"] == "invoice-13.pdf"
    assert cmd.aggregate_key == "oa:EX-2026-0001"


def test_f1b_not_before_approval(topo: Topology) -> None:
    state = new_state()
    run(topo, state, change("oa", "public.oa_form", "c", form()))
    assert run(topo, state, change("oa", "public.oa_attachment", "c", attachment(13))).commands == []


# ------------------------------------------------------------------------------------- F2


@pytest.mark.parametrize("status", ["WITHDRAWN", "REJECTED"])
def test_f2_withdrawn_or_rejected_cancels_pending_item(topo: Topology, status: str) -> None:
    state = new_state()
    run(topo, state, change("oa", "public.oa_form", "c", form()))
    result = run(topo, state, change("oa", "public.oa_form", "u", form(status=status), form()))
    (cmd,) = result.commands
    assert cmd.flow == "form_cancelled_to_item" and cmd.action == "update" and cmd.table == "public.arc_item"
    assert cmd.match == {
        "source_system": "oa",
        "source_ref": "EX-2026-0001",
        "status": {"$in": ["RECEIVED", "CHECKED", "CHECK_FAILED"]},
    }
    assert cmd.values == {"status": "CANCELLED"}
    assert result.conflicts == []  # granted by ownership.grants


# ------------------------------------------------------------------------------------- F3


def test_f3_revoked_approval_adds_correction_event(topo: Topology) -> None:
    state, _ = approved_form_state(topo)
    rec = {
        "id": 9,
        "form_id": 1,
        "approver": "wang.wu",
        "node": "CFO",
        "action": "REVOKE",
        "comment": "wrong payee",
        "acted_at": "2026-04-01T08:00:00+00:00",
    }
    commands = run(topo, state, change("oa", "public.oa_approval_record", "c", rec)).commands
    (cmd,) = [c for c in commands if c.flow != "approved_form_trail_to_item"]
    assert cmd.flow == "approval_revoked_to_event" and cmd.action == "insert_once"
    assert cmd.table == "public.arc_business_event" and cmd.match == {"event_key": "oa:approval:9"}
    v = cmd.values
    assert v["event_key"] == "oa:approval:9" and v["event_type"] == "CORRECTION" and v["actor"] == "wang.wu"
    assert v["item_id"]["$lookup"]["where"] == {"source_system": "oa", "source_ref": "EX-2026-0001"}
    assert v["detail"]["comment"] == "wrong payee" and v["detail"]["form_no"] == "EX-2026-0001"


def test_f3_other_actions_do_nothing(topo: Topology) -> None:
    state, _ = approved_form_state(topo)
    rec = {
        "id": 9,
        "form_id": 1,
        "approver": "x",
        "node": None,
        "action": "APPROVE",
        "comment": None,
        "acted_at": "2026-04-01T08:00:00+00:00",
    }
    # only the pending item's metadata follows the trail (F1c); no business event
    (cmd,) = run(topo, state, change("oa", "public.oa_approval_record", "c", rec)).commands
    assert (cmd.flow, cmd.action, cmd.table) == ("approved_form_trail_to_item", "update", "public.arc_item")
    assert cmd.match["status"] == {"$in": ["RECEIVED", "CHECKED", "CHECK_FAILED"]}
    assert set(cmd.values) == {"metadata"} and cmd.values["metadata"]["approvals"][-1]["approver"] == "x"


def test_f3_revoke_of_unknown_form_is_rejected(topo: Topology) -> None:
    rec = {
        "id": 9,
        "form_id": 77,
        "approver": "x",
        "node": None,
        "action": "REVOKE",
        "comment": None,
        "acted_at": "2026-04-01T08:00:00+00:00",
    }
    result = run(topo, new_state(), ch := change("oa", "public.oa_approval_record", "c", rec))
    assert result.commands == []
    ((reason, rejected),) = result.rejected
    assert rejected is ch and "approval_revoked_to_event" in reason and "'source_ref' is null" in reason


# ------------------------------------------------------------------------------------- F4


def item(**kw: Any) -> dict[str, Any]:
    row = {
        "id": 40,
        "archive_code": None,
        "source_system": "oa",
        "source_ref": "EX-2026-0001",
        "status": "RECEIVED",
        "fault_code": None,
        "hold": False,
    }
    row.update(kw)
    return row


def test_f4_item_status_written_back_to_form(topo: Topology) -> None:
    state = new_state()
    run(topo, state, change("archive", "public.arc_item", "c", item()))
    result = run(
        topo, state, change("archive", "public.arc_item", "u", item(status="CHECK_FAILED", fault_code="E-SHA"), item())
    )
    (cmd,) = result.commands
    assert cmd.flow == "item_status_to_form" and cmd.target_system == "oa" and cmd.table == "public.oa_form"
    assert cmd.action == "update" and cmd.match == {"form_no": "EX-2026-0001"}
    assert cmd.values == {"archive_code": None, "archive_status": "CHECK_FAILED", "archive_fault": "E-SHA"}
    assert result.conflicts == []
    filed = run(
        topo,
        state,
        change(
            "archive",
            "public.arc_item",
            "u",
            item(status="FILED", archive_code="F001-KJ·2026·Y30-0001-0001"),
            item(status="CHECK_FAILED", fault_code="E-SHA"),
        ),
    )
    assert filed.commands[0].values == {
        "archive_code": "F001-KJ·2026·Y30-0001-0001",
        "archive_status": "FILED",
        "archive_fault": None,
    }


def test_f4_ignores_other_sources_and_unchanged_status(topo: Topology) -> None:
    state = new_state()
    assert run(topo, state, change("archive", "public.arc_item", "c", item(source_system="erp"))).commands == []
    state = new_state()
    run(topo, state, change("archive", "public.arc_item", "c", item()))
    assert run(topo, state, change("archive", "public.arc_item", "u", item(hold=True), item())).commands == []


# ------------------------------------------------------------------------------------- F5 / F6


def borrow(**kw: Any) -> dict[str, Any]:
    row = {
        "id": 12,
        "item_id": 40,
        "requester": "auditor",
        "purpose": "audit",
        "status": "REQUESTED",
        "due_date": "2026-05-01",
    }
    row.update(kw)
    return row


def test_f5_borrow_request_becomes_oa_task(topo: Topology) -> None:
    (cmd,) = run(topo, new_state(), change("archive", "public.arc_borrow_request", "c", borrow())).commands
    assert cmd.flow == "borrow_request_to_task" and cmd.target_system == "oa" and cmd.table == "public.oa_task"
    assert cmd.action == "upsert" and cmd.match == {"idempotency_key": "archive:borrow:12"}
    v = cmd.values
    assert v["task_type"] == "ARCHIVE_BORROW" and v["ref_system"] == "archive" and v["ref_id"] == "borrow:12"
    assert v["status"] == {"$init": "PENDING"} and v["assignee"] == "archive-approver"
    assert v["payload"] == {"item_id": 40, "requester": "auditor", "purpose": "audit", "due_date": "2026-05-01"}
    assert cmd.aggregate_key == "archive:borrow:12"


def test_f5_destruction_request_becomes_oa_task(topo: Topology) -> None:
    row = {
        "id": 3,
        "item_id": 40,
        "appraisal_id": None,
        "requested_by": "keeper",
        "reason": "expired",
        "register_no": "D-1",
        "status": "REQUESTED",
    }
    (cmd,) = run(topo, new_state(), change("archive", "public.arc_destruction", "c", row)).commands
    assert cmd.values["task_type"] == "ARCHIVE_DESTRUCTION" and cmd.values["ref_id"] == "destruction:3"


def task(**kw: Any) -> dict[str, Any]:
    row = {
        "id": 70,
        "task_type": "ARCHIVE_BORROW",
        "assignee": "archive-approver",
        "title": "t",
        "ref_system": "archive",
        "ref_id": "borrow:12",
        "status": "PENDING",
        "decided_by": None,
        "decided_at": None,
        "decision_comment": None,
        "updated_at": "2026-04-02T00:00:00+00:00",
    }
    row.update(kw)
    return row


@pytest.mark.parametrize("decision", ["APPROVED", "REJECTED"])
def test_f6_task_decision_goes_back_to_borrow_request(topo: Topology, decision: str) -> None:
    state = new_state()
    run(topo, state, change("oa", "public.oa_task", "c", task()))
    after = task(status=decision, decided_by="boss", decided_at="2026-04-03T00:00:00+00:00", decision_comment="fine")
    result = run(topo, state, change("oa", "public.oa_task", "u", after, task()))
    (cmd,) = result.commands
    assert cmd.flow == "task_decision_to_borrow" and cmd.table == "public.arc_borrow_request"
    assert cmd.action == "update" and cmd.match == {"id": 12, "status": {"$in": ["REQUESTED"]}}
    assert cmd.values == {
        "status": decision,
        "decided_by": "boss",
        "decided_at": "2026-04-03T00:00:00+00:00",
        "decision_comment": "fine",
    }
    assert result.conflicts == []


def test_f6_only_archive_tasks(topo: Topology) -> None:
    state = new_state()
    run(topo, state, change("oa", "public.oa_task", "c", task(ref_system=None, ref_id=None)))
    ch = change(
        "oa",
        "public.oa_task",
        "u",
        task(ref_system=None, ref_id=None, status="APPROVED"),
        task(ref_system=None, ref_id=None),
    )
    assert run(topo, state, ch).commands == []


# ------------------------------------------------------------------------------------- state


def test_duplicates_and_older_changes_are_dropped(topo: Topology) -> None:
    state = new_state()
    first = change("oa", "public.oa_form", "c", form(status="APPROVED"), lsn=5000)
    assert apply_change(state, first)
    assert not apply_change(state, first)  # the same change again
    assert duplicate_kind(state, first) == "event_id"  # its event id is its position
    older = change("oa", "public.oa_form", "u", form(status="DRAFT"), form(), lsn=4000)
    assert not apply_change(state, older)
    assert duplicate_kind(state, older) == "position"
    assert state.root("public.oa_form")["status"] == "APPROVED"
    # transform alone applies (and drops) by itself
    fresh = new_state()
    assert len(transform(topo, fresh, first).commands) == 1
    again = transform(topo, fresh, older)
    assert again.duplicate and again.commands == []


def test_delete_leaves_a_tombstone_position(topo: Topology) -> None:
    state = new_state()
    assert apply_change(state, change("oa", "public.oa_attachment", "c", attachment(11), lsn=100))
    assert apply_change(state, change("oa", "public.oa_attachment", "d", None, attachment(11), lsn=200))
    assert state.table_rows("public.oa_attachment") == []
    assert not apply_change(state, change("oa", "public.oa_attachment", "u", attachment(11), lsn=150))


def test_unchanged_toast_columns_are_kept_and_state_round_trips(topo: Topology) -> None:
    state = new_state()
    apply_change(state, change("oa", "public.oa_form", "c", form(title="long text")))
    upd = change("oa", "public.oa_form", "u", {**form(status="SUBMITTED"), "title": None})
    upd.unchanged = ["title"]
    apply_change(state, upd)
    assert state.root("public.oa_form")["title"] == "long text"
    assert AggregateState.from_json(state.to_json()) == state


def test_aggregate_key_of(topo: Topology) -> None:
    assert aggregate_key_of(topo, change("oa", "public.oa_form", "c", form(id=8))) == ("form", 8)
    assert aggregate_key_of(topo, change("oa", "public.oa_attachment", "c", attachment(3, form_id=8))) == ("form", 8)
    deleted = change("oa", "public.oa_attachment", "d", None, attachment(3, form_id=9))
    assert aggregate_key_of(topo, deleted) == ("form", 9)
    inv = {"id": 1, "form_id": None, "invoice_no": "1"}
    assert aggregate_key_of(topo, change("oa", "public.oa_einvoice", "c", inv)) is None
    assert aggregate_key_of(topo, change("oa", "public.unknown", "c", {"id": 1})) is None
    assert aggregate_key_of(topo, change("archive", "public.arc_borrow_request", "c", borrow())) == ("borrow", 12)


# ------------------------------------------------------------------------------------- ownership, rejects

SMALL = """version: 1
sources:
  oa: {tables: [public.oa_form]}
  archive: {tables: [public.arc_item]}
aggregates:
  form: {source: oa, root: public.oa_form, key: id}
ownership:
  archive.public.arc_item: {default: oa, archive: [status, archive_code]}
flows:
  - name: bad_owner
    from: form
    to: archive.public.arc_item
    match: {source_system: "'oa'", source_ref: root.form_no}
    set: {title: root.title, status: "'RECEIVED'"}
  - name: bad_owner_only
    from: form
    to: archive.public.arc_item
    action: update
    match: {source_system: "'oa'", source_ref: root.form_no}
    set: {archive_code: "'X'"}
  - name: mapped
    from: form
    to: archive.public.arc_item
    match: {source_ref: root.form_no}
    set: {category: "map(root.form_type, {'EXPENSE': 'VOUCHER'})", amount: root.amount}
  - name: big
    from: form
    when: "root.big"
    to: archive.public.arc_item
    match: {source_ref: root.form_no}
    set: {title: root.big}
"""


def small() -> Topology:
    return parse_topology(SMALL, "small.yaml")


def test_ownership_conflict_recorded_and_column_dropped() -> None:
    result = run(small(), new_state(), ch := change("oa", "public.oa_form", "c", form()))
    (cmd,) = by_flow(result, "bad_owner")
    assert "status" not in cmd.values and cmd.values["title"] == "Travel to Shanghai"
    assert by_flow(result, "bad_owner_only") == []  # nothing left to write
    assert {(c.flow, c.column) for c in result.conflicts} == {
        ("bad_owner", "status"),
        ("bad_owner_only", "archive_code"),
    }
    conflict = next(c for c in result.conflicts if c.flow == "bad_owner")
    assert conflict.decision == "rejected-not-owner" and conflict.incoming == "RECEIVED"
    assert conflict.table == "archive.public.arc_item" and conflict.source_event_id == ch.event_id
    assert conflict.match == {"source_system": "oa", "source_ref": "EX-2026-0001"}
    assert "owner: archive" in conflict.reason


@pytest.mark.parametrize(
    ("row", "flow", "needle"),
    [
        (form(form_no=None), "bad_owner", "match.source_ref: required value is null"),
        (form(form_type="LOAN"), "mapped", "unknown value 'LOAN'"),
        (form(amount="12,5"), "mapped", "set.amount: not a valid decimal amount: '12,5'"),
        (form(amount="NaN"), "mapped", "not a valid decimal amount"),
        (form(big="x" * (1024 * 1024 + 10)), "big", "exceeds 1048576 bytes"),
    ],
)
def test_rejected_with_reason(row: dict[str, Any], flow: str, needle: str) -> None:
    result = run(small(), new_state(), ch := change("oa", "public.oa_form", "c", row))
    reasons = {reason.split(":")[0]: reason for reason, rejected in result.rejected if rejected is ch}
    assert needle in reasons[f"flow {flow}"]
    assert not by_flow(result, flow)


def test_a_rejected_flow_does_not_stop_the_others() -> None:
    result = run(small(), new_state(), change("oa", "public.oa_form", "c", form(form_type="LOAN")))
    assert by_flow(result, "bad_owner") and len(result.rejected) == 1


# ------------------------------------------------------------------------------------- acme example


def test_acme_claim_syncs_with_yaml_only() -> None:
    acme = load_topology(ROOT / "topology" / "examples" / "acme.yaml")
    claim = {
        "claim_id": 5,
        "claim_code": "C-77",
        "claim_kind": "TRAVEL",
        "state": "PENDING",
        "total_amt": "88.00",
        "currency_code": "CNY",
        "claimant": "amy",
        "dept": "Ops",
        "payee_name": None,
        "subject": None,
        "booked_on": "2025-12-30",
        "arc_code": None,
        "arc_state": None,
        "arc_error": None,
        "version": 2,
        "created_on": "2025-12-29T00:00:00+00:00",
        "decided_on": None,
    }
    file_row = {
        "file_id": 3,
        "claim_id": 5,
        "file_kind": "receipt",
        "original_name": "r.xml",
        "byte_size": 10,
        "sha256_hex": SHA,
        "uri": None,
        "uploaded_on": "2025-12-29T00:00:00+00:00",
    }
    state = new_state()
    run(acme, state, change("acme", "public.acme_expense_claim", "c", claim, key="claim_id"))
    run(acme, state, change("acme", "public.acme_claim_file", "c", file_row, key="file_id"))
    result = run(
        acme, state, change("acme", "public.acme_expense_claim", "u", {**claim, "state": "OK"}, claim, key="claim_id")
    )
    item_cmd, file_cmd = result.commands
    assert item_cmd.match == {"source_system": "acme", "source_ref": "C-77"}
    assert item_cmd.values["fiscal_year"] == 2025 and item_cmd.values["expire_date"] == "2055-12-31"
    assert item_cmd.values["title"] == "Claim C-77" and item_cmd.values["fonds_code"] == "F002"
    assert file_cmd.match["seq"] == 3 and file_cmd.values["format"] == "XML"
    assert result.conflicts == [] and result.rejected == []


def test_bytes_kept_in_tables_are_their_own_size() -> None:
    import sys
    import tracemalloc

    import orjson

    from processors.model import kept

    tracemalloc.start()
    try:
        data = orjson.dumps({"key": "form:1"})
        before = tracemalloc.get_traced_memory()[0]
        copy = kept(data)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert copy == data
    assert grown <= sys.getsizeof(copy) + 64  # orjson's own result holds a 4 KiB buffer
