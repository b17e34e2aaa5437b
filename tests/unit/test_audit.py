"""The audit log's pure core: ids, facts, chaining, idempotent replay, verification, reconstruction."""

from __future__ import annotations

import orjson
import pytest

from processors import audit
from processors.model import ApplyCommand, Change


def change(op: str, after: dict | None, lsn: int, ts: int, before: dict | None = None, key: int = 1) -> Change:
    return Change(
        event_id=f"oa:{lsn:016x}:1",
        system="oa",
        table="public.oa_form",
        op=op,
        key={"id": key},
        before=before,
        after=after,
        commit_lsn=lsn,
        order=1,
        commit_ts_ms=ts,
    )


def facts() -> list[dict]:
    a = change("c", {"id": 1, "status": "SUBMITTED", "amount": "10.00"}, 100, 1000)
    b = change("u", {"id": 1, "status": "APPROVED", "amount": "10.00"}, 200, 2000)
    c = change("u", {"id": 1, "status": "ARCHIVED", "amount": "10.00"}, 300, 3000)
    return [
        audit.change_fact("form:1", a, None, a.after),
        audit.change_fact("form:1", b, a.after, b.after),
        audit.change_fact("form:1", c, b.after, c.after),
    ]


def chained(fs: list[dict], key: bytes | None = None) -> list[dict]:
    state = audit.ChainState()
    return [audit.append(state, f, key)[0] for f in fs]


def test_ids_are_deterministic_and_distinct() -> None:
    assert audit.audit_id("dead_letter", "x", 1) == audit.audit_id("dead_letter", "x", 1)
    assert audit.audit_id("dead_letter", "x", 1) != audit.audit_id("dead_letter", "x", 2)
    assert facts() == facts()


def test_change_fact_keeps_changed_values_and_digests() -> None:
    f = facts()[1]
    assert f["changed"] == ["status"] and f["values"] == '{"status":"APPROVED"}'
    assert f["before_digest"] and f["after_digest"] and f["before_digest"] != f["after_digest"]
    assert (f["source_lsn"], f["source_order"], f["row_key"]) == (200, 1, '{"id":1}')


def test_chain_links_and_verifies() -> None:
    records = chained(facts())
    assert [r["seq"] for r in records] == [1, 2, 3]
    assert records[0]["prev_hash"] == "" and records[1]["prev_hash"] == records[0]["hash"]
    assert audit.verify_records(records) == []


def test_replayed_fact_gives_the_identical_record_and_keeps_the_chain() -> None:
    fs = facts()
    state = audit.ChainState()
    first = [audit.append(state, f)[0] for f in fs]
    again, replayed = audit.append(state, fs[1])
    assert replayed and again == first[1] and state.seq == 3
    # the state restored from its JSON (the changelog) behaves the same
    restored = audit.ChainState.from_dict(state.to_dict())
    assert audit.append(restored, fs[0]) == (first[0], True)
    # same id, other content: a distinct event, never a second record under one key
    other = {**fs[0], "reason": "different"}
    rec, replayed = audit.append(state, other)
    assert not replayed and rec["audit_id"].startswith(fs[0]["audit_id"] + "~") and rec["seq"] == 4
    # duplicates in the log (not compacted yet) are not breaks
    assert audit.verify_records([*first, first[1], first[2], rec]) == []


def test_tampering_is_detected_and_located() -> None:
    records = chained(facts() + facts()[:0])
    altered = [dict(r) for r in records]
    altered[1]["values"] = '{"status":"REJECTED"}'
    (b,) = audit.verify_records(altered)
    assert b.offset == 1 and "altered" in b.problem and b.aggregate == "form:1"
    deleted = [records[0], records[2]]
    (b,) = audit.verify_records(deleted)
    assert b.offset == 1 and "seq 2 missing" in b.problem
    reordered = [records[0], records[2], records[1]]
    problems = [(x.offset, x.problem) for x in audit.verify_records(reordered)]
    assert problems[0][0] == 1 and "missing" in problems[0][1]
    assert problems[1][0] == 2 and "out of order" in problems[1][1]
    # a forger who recomputes the sha256 still cannot link into the middle of the chain
    forged = audit.chain({**records[1], "values": '{"status":"PAID"}'}, 2, "f" * 64)
    problems = [x.problem for x in audit.verify_records([records[0], forged, records[1], records[2]])]
    assert any("link" in p for p in problems) and any("second, different record" in p for p in problems)


def test_keyed_chain_rejects_unkeyed_forgeries() -> None:
    key = b"secret"
    records = chained(facts(), key)
    assert audit.verify_records(records, key) == []
    assert audit.verify_records(records, b"other")  # wrong key: every hash fails
    forged = audit.chain(
        audit.fact("admin_action", "form:1", 4000, "admin_action:x"), 4, records[-1]["hash"]
    )  # a plausible next link, but plain sha256
    (b,) = audit.verify_records([*records, forged], key)
    assert b.offset == 3 and "unkeyed" in b.problem


def test_heads_detect_a_removed_last_event() -> None:
    records = chained(facts())
    v = audit.ChainVerifier()
    for i, r in enumerate(records[:2]):
        v.feed("t", 0, i, r)
    v.check_heads({"form:1": (3, records[2]["hash"])}, "t")
    assert len(v.breaks) == 1 and "deleted" in v.breaks[0].problem


def test_state_at_rebuilds_past_rows_from_changes_and_commands() -> None:
    fs = facts()
    cmd = ApplyCommand(
        command_id="item_status_to_form:1",
        flow="item_status_to_form",
        target_system="oa",
        table="public.oa_form",
        action="update",
        match={"form_no": "F-1"},
        values={"archive_code": "KJ-0001"},
        source_system="archive",
        source_event_id="archive:1:1",
        source_commit_lsn=5,
        source_order=1,
        source_commit_ts_ms=2400,
        aggregate_key="oa:F-1",
    )
    fs[0]["values"] = audit.canonical_json({"id": 1, "status": "SUBMITTED", "form_no": "F-1"})
    fs[0]["changed"] = ["form_no", "id", "status"]
    events = chained([*fs, audit.command_fact(cmd, "applied", 2500)])
    assert audit.state_at(events, 999) == {}
    assert audit.state_at(events, 1500)["oa.public.oa_form"]['{"id":1}'] == {
        "id": 1,
        "status": "SUBMITTED",
        "form_no": "F-1",
    }
    at = audit.state_at(events, 2600)["oa.public.oa_form"]['{"id":1}']
    assert at["status"] == "APPROVED" and at["archive_code"] == "KJ-0001"
    assert audit.state_at(events, 3000)["oa.public.oa_form"]['{"id":1}']["status"] == "ARCHIVED"
    deleted = audit.change_fact("form:1", change("d", None, 400, 4000, before={"id": 1}), None, None)
    assert audit.state_at([*events, deleted], 5000) == {}


def test_related_aggregates_follow_links() -> None:
    events = [
        {"aggregate": "form:1", "links": ["oa:F-1"]},
        {"aggregate": "item:7", "links": ["oa:F-1"]},
        {"aggregate": "form:2", "links": ["oa:F-2"]},
    ]
    assert audit.related_aggregates(events, "form:1") == {"form:1", "oa:F-1", "item:7"}


def test_bad_facts_are_refused() -> None:
    with pytest.raises(audit.AuditError):
        audit.check_fact({"kind": "change_captured", "aggregate": "x"})
    with pytest.raises(audit.AuditError):
        audit.fact("nope", "x", 1, "id")
    ok = audit.check_fact({"audit_id": "a", "kind": "admin_action", "aggregate": "admin", "ts_ms": 5})
    assert ok["links"] == [] and ok["detail"] is None


def test_hand_written_encoder_matches_fastavro() -> None:
    c = audit.codec()
    for r in [*chained(facts()), *chained(facts(), b"k")]:
        r = {**r, "source_lsn": 2**40, "seq": 300, "links": ["a", "ü"], "detail": "ß" * 200}
        assert c.encode(r) == c.encode_fastavro(r)
        assert c.decode(c.encode(r)) == r
    r = {**chained(facts())[0], "source_lsn": -5, "source_order": None}
    assert c.encode(r) == c.encode_fastavro(r)


def test_report_counts_and_checks() -> None:
    from processors.audit_report import render_html, summarise

    events = chained(facts())
    echo = {**events[0], "actor": "archsync_apply_archive", "source_event_id": "archive:echo:5:0"}
    recaptured = {**events[0], "actor": "archsync_apply_archive_2", "source_event_id": "archive:0000000000000005:1"}
    s = summarise([*events, echo], chains=1, breaks=[], appliers=["archsync_apply_archive"])
    assert s.events == 4 and s.by_kind["change_captured"] == 4 and s.own_writes_recaptured == 0
    assert [ok for _, ok, _ in s.checks()] == [True, True, True, True]
    bad = summarise([*events, recaptured], chains=1, breaks=["x"], appliers=["archsync_apply_archive"])
    assert [ok for _, ok, _ in bad.checks()] == [False, True, True, False]
    page = render_html(s, title="t", topic="p.audit", generated_ms=0)
    assert page.count("<svg") == 3 and "Authenticity" in page and ">4<" in page  # empty charts say "none"


def test_a_replayed_row_that_changed_nothing_keeps_the_row_whole() -> None:
    """An echo replayed after a restart comes as op r with the row as it is (nothing changed): its
    fact carries the whole row, so ``state_at`` does not lose the columns it did not change."""
    row = {"id": 1, "status": "RECEIVED", "archive_code": "KJ-0001"}
    first = audit.change_fact("item:1", change("c", row, 100, 1000), None, row)
    again = audit.change_fact("item:1", change("r", row, 200, 2000), row, row)
    assert again["changed"] == [] and orjson.loads(again["values"]) == row
    filed = {**row, "status": "FILED"}
    update = audit.change_fact("item:1", change("u", filed, 300, 3000), row, filed)
    at = audit.state_at(chained([first, again, update]), 3500)["oa.public.oa_form"]['{"id":1}']
    assert at == filed


def test_item_number_gaps_are_found_per_volume_and_missing_volumes_too() -> None:
    from processors.audit_report import item_number_gaps

    assert item_number_gaps([("F1", "KJ", 2026, 1, [1, 2, 3]), ("F1", "KJ", 2026, 2, [1])]) == []
    assert item_number_gaps(
        [
            ("F1", "KJ", 2026, 1, [3, 1]),  # item 2 missing
            ("F1", "KJ", 2026, 3, [1]),  # volume 2 missing
            ("F2", "KJ", 2026, 1, [1, 2]),
        ]
    ) == ["F1/KJ/2026: missing volumes [2]; volume 1 missing item numbers [2]"]
