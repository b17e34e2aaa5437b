"""Reconciliation, sync modes and notifications on the real services (issue 6)."""

from __future__ import annotations

import subprocess
import time
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Consumer, TopicPartition

from archsync.settings import Settings
from processors.notifications import decode_notification
from processors.sync_modes import held_backlog, next_fire

from .pipeline_kit import REPO, Pipeline
from .test_pipeline import approve, item_of, new_form

CLI = [str(REPO / ".venv" / "bin" / "archsync")]


def run(p: Pipeline, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--topology", str(p.file), *args], capture_output=True, text=True, env=p.env, timeout=180
    )


def test_drift_behind_archsyncs_back_is_found_and_repaired(pipeline: Pipeline, unique: str) -> None:
    p = pipeline
    form_no = f"R-{unique}"
    form_id = new_form(p, form_no, f"R{unique}", attachments=1)
    approve(p, form_id)
    item = p.wait_for(lambda: item_of(p, form_no), 60, "the archive item")
    p.wait_for(lambda: p.sql("archive", "SELECT 1 FROM arc_file WHERE item_id = %s", (item["id"],)), 30, "its file")
    # a clerk files it: status and code are written back to the form
    p.sql("archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (item["id"],))
    p.wait_for(
        lambda: p.sql("oa", "SELECT 1 FROM oa_form WHERE id = %s AND archive_status = 'FILED'", (form_id,)),
        60,
        "the write-back",
    )
    scope = ["--only", f"form:{form_id}", "--only", f"item:{item['id']}"]
    clean = run(p, "reconcile", *scope)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "OK" in clean.stdout and "drifted" in clean.stdout
    # drift behind archsync's back: the amount on the archive side, the status on the OA side
    p.sql("archive", "UPDATE arc_item SET amount = 1.00 WHERE id = %s", (item["id"],))
    p.sql("oa", "UPDATE oa_form SET archive_status = 'LOST' WHERE id = %s", (form_id,))
    drift = run(p, "reconcile", *scope)
    assert drift.returncode == 1, drift.stdout + drift.stderr
    assert f"form:{form_id}" in drift.stdout and 'amount: expected "1234.56", found "1.00"' in drift.stdout
    assert f"item:{item['id']}" in drift.stdout and 'archive_status: expected "FILED", found "LOST"' in drift.stdout
    repair = run(p, "reconcile", "--repair", *scope)
    assert repair.returncode == 1 and "repair commands sent" in repair.stdout, repair.stdout + repair.stderr
    p.wait_for(lambda: (item_of(p, form_no) or {}).get("amount") == "1234.56", 60, "the repaired amount")
    p.wait_for(
        lambda: p.sql("oa", "SELECT 1 FROM oa_form WHERE id = %s AND archive_status = 'FILED'", (form_id,)),
        60,
        "the repaired write-back",
    )
    again = run(p, "reconcile", *scope)
    assert again.returncode == 0, again.stdout + again.stderr
    # the repair did not disturb what archsync owns elsewhere, and the run was recorded for `status`
    assert (item_of(p, form_no) or {}).get("status") == "FILED"
    from processors.reconcile import last_run

    assert "OK" in (last_run(p.topology, p.settings) or "")


def _modes_topology(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO / "topology" / "reference.yaml").read_text())
    for flow in data["flows"]:
        if flow["name"] == "approved_form_to_item":
            flow.update(mode="scheduled", window="* * * * * */15")  # every 15 s (seconds field last)
        if flow["name"] == "borrow_request_to_task":
            flow["mode"] = "triggered"
    path = tmp_path / "modes.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def _notifications(p: Pipeline) -> list[dict[str, Any]]:
    topic = f"{p.topology.topics.prefix}.notifications"
    consumer = Consumer({"bootstrap.servers": p.settings.kafka_bootstrap, "group.id": f"t-{time.time_ns()}"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {n: consumer.get_watermark_offsets(TopicPartition(topic, n), timeout=10)[1] for n in parts}
        consumer.assign([TopicPartition(topic, n, 0) for n in parts if ends[n]])
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while sum(ends.values()) > len(out) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and not msg.error() and msg.offset() < ends[msg.partition()]:
                out.append(decode_notification(msg.value()))
        return out
    finally:
        consumer.close()


def test_scheduled_and_triggered_flows_and_notifications(settings: Settings, unique: str, tmp_path: Path) -> None:
    p = Pipeline(settings, unique, tmp_path, base=_modes_topology(tmp_path))
    try:
        p.start()
        from processors.app import READY_LINE

        p.wait_for(lambda: READY_LINE in p.log.read_text(errors="replace"), 120, "the worker")
        cron = "* * * * * */15"
        # start just after a window opened (the worker checks windows every second): the next is ~13 s away
        opened = next_fire(cron)
        time.sleep(max(0.0, (opened - datetime.now().astimezone()).total_seconds()) + 2.0)
        window = next_fire(cron)
        fonds = f"M{unique}"
        forms = [new_form(p, f"M-{unique}-{n}", fonds, attachments=1) for n in range(3)]
        for form_id in forms:
            approve(p, form_id)
        # held in Kafka (3 items + 3 files), nothing applied before the window
        p.wait_for(lambda: held_backlog(p.topology, p.settings).get("approved_form_to_item", 0) >= 6, 12, "held")
        assert datetime.now().astimezone() < window - timedelta(seconds=0.5), "the test machine is too slow"
        assert p.sql("archive", "SELECT count(*) FROM arc_item WHERE fonds_code = %s", (fonds,))[0][0] == 0
        # the window opens: all of them are applied
        p.wait_for(
            lambda: p.sql("archive", "SELECT count(*) FROM arc_item WHERE fonds_code = %s", (fonds,))[0][0] == 3,
            40,
            "the items after the window opened",
        )
        p.wait_for(
            lambda: (
                p.sql(
                    "archive",
                    "SELECT count(*) FROM arc_file f JOIN arc_item i ON i.id = f.item_id WHERE i.fonds_code = %s",
                    (fonds,),
                )[0][0]
                == 3
            ),
            30,
            "their files",
        )
        assert held_backlog(p.topology, p.settings)["approved_form_to_item"] == 0
        items = [item_of(p, f"M-{unique}-{n}") for n in range(3)]
        assert all(items)
        first, second, third = (i["id"] for i in items if i)
        second_code = items[1]["archive_code"] if items[1] else None

        # triggered: a borrowing request waits until `archsync release`
        borrow = p.sql(
            "archive",
            "INSERT INTO arc_borrow_request (item_id, requester, purpose) VALUES (%s, 'auditor', 'audit') RETURNING id",
            (first,),
        )[0][0]
        p.wait_for(
            lambda: held_backlog(p.topology, p.settings).get("borrow_request_to_task", 0) >= 1, 30, "held request"
        )
        assert not p.sql("oa", "SELECT 1 FROM oa_task WHERE ref_id = %s", (f"borrow:{borrow}",))
        released = run(p, "release", "borrow_request_to_task")
        assert released.returncode == 0 and "released 1 held command" in released.stdout, released.stdout
        p.wait_for(lambda: p.sql("oa", "SELECT 1 FROM oa_task WHERE ref_id = %s", (f"borrow:{borrow}",)), 30, "task")
        assert "released 0" in run(p, "release", "borrow_request_to_task").stdout

        # notifications: filed, check failed + fixity violation (rules), due / overdue / expiring (scan)
        p.sql("archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (first,))
        p.sql(
            "archive",
            "INSERT INTO arc_check_result (item_id, stage, authenticity, integrity, usability, security, fault_code)"
            " VALUES (%s, 'PRESERVATION', true, false, true, true, 'HASH_MISMATCH')",
            (second,),
        )
        today = date.today()
        due = p.sql(
            "archive",
            "INSERT INTO arc_borrow_request (item_id, requester, status, due_date) VALUES"
            " (%s, 'li.si', 'BORROWED', %s), (%s, 'wang.wu', 'BORROWED', %s) RETURNING id",
            (first, today + timedelta(days=2), first, today - timedelta(days=3)),
        )
        soon, late = due[0][0], due[1][0]
        p.sql(
            "archive",
            "UPDATE arc_item SET status = 'FILED', filed_at = now(), expire_date = %s WHERE id = %s",
            (today + timedelta(days=30), third),
        )
        for _ in range(2):  # the second scan finds them all sent already
            scan = run(p, "notify", "scan")
            assert scan.returncode == 0, scan.stdout + scan.stderr
        wanted = {
            ("archive_filed", "public.arc_item", str(first)),
            ("borrowing_due", "public.arc_borrow_request", str(soon)),
            ("borrowing_overdue", "public.arc_borrow_request", str(late)),
            ("retention_expiring", "public.arc_item", str(third)),
        }

        def ours() -> list[dict[str, Any]]:
            notes = _notifications(p)
            return [
                n
                for n in notes
                if (n["kind"], n["subject_table"], n["subject_id"]) in wanted
                or (
                    n["kind"] in ("check_failed", "fixity_violation")
                    # the item's code once its echo is in the archive aggregate, else "item #<id>"
                    and (str(second) in (n["subject_ref"] or "") or n["subject_ref"] == second_code)
                )
            ]

        notes = p.wait_for(lambda: (n := ours()) and len(n) >= 6 and n, 60, "a notification of every kind")
        kinds = sorted(n["kind"] for n in notes)
        assert kinds == sorted(
            [
                "archive_filed",
                "check_failed",
                "fixity_violation",
                "borrowing_due",
                "borrowing_overdue",
                "retention_expiring",
            ]
        ), kinds  # each exactly once, although the scan ran twice
        due_note = next(n for n in notes if n["kind"] == "borrowing_due")
        assert due_note["due_date"] == today + timedelta(days=2) and due_note["recipient"] == "li.si"
        # OA to-do rows for those that ask for one (check failed, fixity, overdue, expiring)
        p.wait_for(
            lambda: (
                p.sql(
                    "oa",
                    "SELECT count(*) FROM oa_task WHERE task_type = 'NOTIFICATION' AND idempotency_key = ANY(%s)",
                    ([f"notification:{n['notification_id']}" for n in notes],),
                )[0][0]
                == 4
            ),
            60,
            "the OA to-do rows",
        )
    finally:
        p.cleanup()
