"""The whole pipeline, both directions, on the real services: capture → worker → the other database."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from archsync.settings import Settings

from .pipeline_kit import Pipeline


def new_form(
    p: Pipeline, form_no: str, fonds: str, form_type: str = "EXPENSE", amount: str = "1234.56", attachments: int = 2
) -> int:
    rows = p.sql(
        "oa",
        "INSERT INTO oa_form (form_no, form_type, status, amount, fonds_code, applicant, title,"
        " fiscal_year, fiscal_month) VALUES (%s, %s, 'SUBMITTED', %s, %s, 'tester', %s, 2026, 11)"
        " RETURNING id",
        (form_no, form_type, amount, fonds, f"claim {form_no}"),
    )
    form_id = rows[0][0]
    for n in range(attachments):
        content = f"{form_no}-{n}".encode()
        p.sql(
            "oa",
            "INSERT INTO oa_attachment (form_id, kind, file_name, size_bytes, sha256) VALUES"
            " (%s, 'EINVOICE_XML', %s, %s, %s)",
            (form_id, f"inv-{n}.xml", len(content), hashlib.sha256(content).hexdigest()),
        )
    p.sql(
        "oa",
        "INSERT INTO oa_approval_record (form_id, approver, node, action) VALUES (%s, 'tester', 'start', 'SUBMIT')",
        (form_id,),
    )
    return form_id


def approve(p: Pipeline, form_id: int) -> None:
    p.sql(
        "oa",
        "INSERT INTO oa_approval_record (form_id, approver, node, action) VALUES (%s, 'boss', 'finance', 'APPROVE')",
        (form_id,),
    )
    p.sql("oa", "UPDATE oa_form SET status = 'APPROVED', approved_at = now() WHERE id = %s", (form_id,))


def item_of(p: Pipeline, form_no: str) -> dict | None:
    rows = p.sql(
        "archive",
        "SELECT id, archive_code, status, amount::text, retention_code, expire_date::text,"
        " fonds_code FROM arc_item WHERE source_system = 'oa' AND source_ref = %s",
        (form_no,),
    )
    if not rows:
        return None
    keys = ("id", "archive_code", "status", "amount", "retention_code", "expire_date", "fonds_code")
    return dict(zip(keys, rows[0], strict=True))


def test_approved_form_is_archived_and_the_code_flows_back(pipeline: Pipeline, unique: str) -> None:
    p = pipeline
    form_no, fonds = f"T-{unique}", f"T{unique}"
    form_id = new_form(p, form_no, fonds)
    approve(p, form_id)
    item = p.wait_for(lambda: item_of(p, form_no), 60, "the archive item")
    assert item["amount"] == "1234.56" and item["status"] == "RECEIVED"
    assert item["archive_code"] and item["archive_code"].endswith("-0001")
    assert item["retention_code"] == "Y30"
    files = p.wait_for(
        lambda: (
            (r := p.sql("archive", "SELECT sha256 FROM arc_file WHERE item_id = %s", (item["id"],)))
            and len(r) == 2
            and r
        ),
        30,
        "both files",
    )
    expected = {hashlib.sha256(f"{form_no}-{n}".encode()).hexdigest() for n in range(2)}
    assert {r[0] for r in files} == expected
    # the item as the archive wrote it (its new code) is echoed back onto the OA form at once
    p.wait_for(
        lambda: (
            p.sql("oa", "SELECT archive_code, archive_status FROM oa_form WHERE id = %s", (form_id,))
            == [(item["archive_code"], "RECEIVED")]
        ),
        60,
        "the archival code on the OA form",
    )
    # an archive clerk files the item: status and code flow back onto the OA form
    p.sql("archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (item["id"],))
    back = p.wait_for(
        lambda: (
            (r := p.sql("oa", "SELECT archive_code, archive_status FROM oa_form WHERE id = %s", (form_id,)))
            and r[0][1] == "FILED"
            and r[0]
        ),
        60,
        "the write-back",
    )
    assert back[0] == item["archive_code"]
    # no loop: the write-back is not captured again, nothing else changes afterwards
    version = p.sql("oa", "SELECT row_version FROM oa_form WHERE id = %s", (form_id,))[0][0]
    updated = p.sql("archive", "SELECT updated_at FROM arc_item WHERE id = %s", (item["id"],))[0][0]
    import time

    time.sleep(4)
    assert p.sql("oa", "SELECT row_version FROM oa_form WHERE id = %s", (form_id,))[0][0] == version
    assert p.sql("archive", "SELECT updated_at FROM arc_item WHERE id = %s", (item["id"],))[0][0] == updated


def test_withdrawn_rejected_revoked_and_borrowing_round_trip(pipeline: Pipeline, unique: str) -> None:
    p = pipeline
    fonds = f"W{unique}"
    # approved then rejected before filing: the pending item is cancelled
    a = new_form(p, f"A-{unique}", fonds, attachments=0)
    approve(p, a)
    p.wait_for(lambda: item_of(p, f"A-{unique}"), 60, "item A")
    p.sql("oa", "UPDATE oa_form SET status = 'REJECTED' WHERE id = %s", (a,))
    p.wait_for(lambda: (item_of(p, f"A-{unique}") or {}).get("status") == "CANCELLED", 60, "item A cancelled")
    # approved, filed, then the approval is revoked: a correcting business event, the item stays
    b = new_form(p, f"B-{unique}", fonds, attachments=1)
    approve(p, b)
    item_b = p.wait_for(lambda: item_of(p, f"B-{unique}"), 60, "item B")
    p.sql("archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (item_b["id"],))
    p.wait_for(
        lambda: p.sql("oa", "SELECT 1 FROM oa_form WHERE id = %s AND archive_status = 'FILED'", (b,)),
        60,
        "B filed on the OA side",
    )
    p.sql(
        "oa",
        "INSERT INTO oa_approval_record (form_id, approver, node, action, comment) VALUES"
        " (%s, 'boss', 'finance', 'REVOKE', 'duplicate invoice')",
        (b,),
    )
    events = p.wait_for(
        lambda: p.sql(
            "archive",
            "SELECT event_type FROM arc_business_event WHERE item_id = %s AND event_type = 'CORRECTION'",
            (item_b["id"],),
        ),
        60,
        "correction",
    )
    assert len(events) == 1
    assert (item_of(p, f"B-{unique}") or {}).get("status") == "FILED"
    # a borrowing request becomes an OA task; the OA decision flows back
    borrow = p.sql(
        "archive",
        "INSERT INTO arc_borrow_request (item_id, requester, purpose) VALUES (%s, 'auditor',"
        " 'annual audit') RETURNING id",
        (item_b["id"],),
    )[0][0]
    task = p.wait_for(
        lambda: p.sql("oa", "SELECT id, status, task_type FROM oa_task WHERE ref_id = %s", (f"borrow:{borrow}",)),
        60,
        "the OA task",
    )
    assert task[0][1:] == ("PENDING", "ARCHIVE_BORROW")
    p.sql(
        "oa",
        "UPDATE oa_task SET status = 'APPROVED', decided_by = 'boss', decided_at = now() WHERE id = %s",
        (task[0][0],),
    )
    p.wait_for(
        lambda: p.sql("archive", "SELECT 1 FROM arc_borrow_request WHERE id = %s AND status = 'APPROVED'", (borrow,)),
        60,
        "the decision back on the borrow request",
    )


def archive_fingerprint(p: Pipeline, fonds: str) -> list:
    return p.sql(
        "archive",
        "SELECT i.archive_code, i.status, i.row_version, i.updated_at::text,"
        " (SELECT count(*) FROM arc_file f WHERE f.item_id = i.id),"
        " (SELECT count(*) FROM arc_business_event e WHERE e.item_id = i.id)"
        " FROM arc_item i WHERE i.fonds_code = %s ORDER BY i.archive_code",
        (fonds,),
    )


def file_count(p: Pipeline, fonds: str) -> int:
    return int(
        p.sql(
            "archive",
            "SELECT count(*) FROM arc_file f JOIN arc_item i ON i.id = f.item_id WHERE i.fonds_code = %s",
            (fonds,),
        )[0][0]
    )


def test_worker_killed_mid_run_and_apply_topic_replayed_change_nothing(pipeline: Pipeline, unique: str) -> None:
    import time

    from confluent_kafka import Consumer, Producer, TopicPartition

    p = pipeline
    fonds = f"K{unique}"
    forms = []
    for n in range(30):
        forms.append(new_form(p, f"K-{unique}-{n:02d}", fonds, attachments=1))
    for n, form_id in enumerate(forms):
        approve(p, form_id)
        if n in (8, 19):
            p.kill_worker()
            time.sleep(0.5)
            p.start_worker()
    p.wait_for(lambda: len(archive_fingerprint(p, fonds)) == 30, 120, "all 30 items")
    p.wait_for(
        lambda: file_count(p, fonds) == 30,
        60,
        "all 30 files",
    )
    before = archive_fingerprint(p, fonds)
    numbers = sorted(p.sql("archive", "SELECT item_no FROM arc_item WHERE fonds_code = %s", (fonds,)))
    assert [n[0] for n in numbers] == list(range(1, 31)), "archival item numbers have gaps or duplicates"
    # replay the whole apply topic: every command again
    topic = f"{p.topology.topics.prefix}.apply.archive"
    consumer = Consumer(
        {
            "bootstrap.servers": p.settings.kafka_bootstrap,
            "group.id": f"replay-{unique}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    ends = {tp: consumer.get_watermark_offsets(TopicPartition(topic, tp), timeout=10)[1] for tp in range(2)}
    consumer.assign([TopicPartition(topic, tp, 0) for tp in range(2)])
    producer = Producer({"bootstrap.servers": p.settings.kafka_bootstrap, "enable.idempotence": True})
    copied = 0
    deadline = time.monotonic() + 120
    while copied < sum(ends.values()) and time.monotonic() < deadline:  # copy exactly what was there
        msg = consumer.poll(0.5)
        if msg is None or msg.error() or msg.offset() >= ends[msg.partition()]:
            continue
        while True:
            try:
                producer.produce(topic, msg.value(), msg.key())
                break
            except BufferError:
                producer.poll(0.2)
        copied += 1
    consumer.close()
    assert producer.flush(30) == 0 and copied >= 60, (copied, ends)
    time.sleep(8)
    assert archive_fingerprint(p, fonds) == before


def test_second_schema_syncs_with_yaml_only(
    settings: Settings, unique: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ACME OA (other table and column names) syncs through topology/examples/acme.yaml alone."""
    from connectors.postgres import connect

    repo = Path(__file__).resolve().parents[2]
    with connect(settings.oa_dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
        conn.execute((repo / "schemas" / "sql" / "examples" / "acme_oa.sql").read_text())
    monkeypatch.setenv("ARCHSYNC_ACME_DSN", settings.oa_dsn)  # the ACME tables live in the OA database here
    p = Pipeline(settings, unique, tmp_path, base=repo / "topology" / "examples" / "acme.yaml")
    try:
        p.start()
        code = f"AC-{unique}"
        claim = p.sql(
            "acme",
            "INSERT INTO acme_expense_claim (claim_code, claim_kind, state, total_amt, claimant,"
            " subject, booked_on) VALUES (%s, 'TRAVEL', 'PENDING', 88.80, 'zhang', 'trip',"
            " '2026-11-03') RETURNING claim_id",
            (code,),
        )[0][0]
        content = code.encode()
        p.sql(
            "acme",
            "INSERT INTO acme_claim_file (claim_id, file_kind, original_name, byte_size, sha256_hex)"
            " VALUES (%s, 'INVOICE', 'receipt.pdf', %s, %s)",
            (claim, len(content), hashlib.sha256(content).hexdigest()),
        )
        p.sql("acme", "UPDATE acme_expense_claim SET state = 'OK', decided_on = now() WHERE claim_id = %s", (claim,))
        item = p.wait_for(
            lambda: p.sql(
                "archive",
                "SELECT id, archive_code, amount::text FROM arc_item WHERE source_system = 'acme' AND source_ref = %s",
                (code,),
            ),
            60,
            "the ACME claim's archive item",
        )
        assert item[0][2] == "88.80" and item[0][1]
        p.wait_for(lambda: p.sql("archive", "SELECT 1 FROM arc_file WHERE item_id = %s", (item[0][0],)), 30, "file")
        p.sql("archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (item[0][0],))
        back = p.wait_for(
            lambda: (
                (r := p.sql("acme", "SELECT arc_code, arc_state FROM acme_expense_claim WHERE claim_id = %s", (claim,)))
                and r[0][1] == "FILED"
                and r
            ),
            60,
            "the write-back onto the ACME claim",
        )
        assert back[0][0] == item[0][1]
    finally:
        p.cleanup()


def test_failed_apply_is_dead_lettered_and_replayed_after_a_fix(pipeline: Pipeline, unique: str) -> None:
    import subprocess

    p = pipeline
    poison = f"poison-{unique}"
    p.sql(
        "archive",
        f"ALTER TABLE arc_item ADD CONSTRAINT no_{unique} CHECK (title IS DISTINCT FROM '{poison}') NOT VALID",
    )
    try:
        form_id = new_form(p, f"P-{unique}", f"P{unique}", attachments=1)
        p.sql("oa", "UPDATE oa_form SET title = %s WHERE id = %s", (poison, form_id))
        approve(p, form_id)
        ok = new_form(p, f"Q-{unique}", f"P{unique}", attachments=0)
        approve(p, ok)
        p.wait_for(lambda: item_of(p, f"Q-{unique}"), 60, "the healthy form's item (the stream went on)")
        assert item_of(p, f"P-{unique}") is None
        cli = [str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "archsync"), "--topology", str(p.file)]
        listing = p.wait_for(
            lambda: (
                (
                    r := subprocess.run(
                        [*cli, "dlq", "list", "--stage", "apply"], capture_output=True, text=True, env=p.env, timeout=60
                    )
                )
                and "no_" in r.stdout
                and r.stdout
            ),
            60,
            "the dead letter",
        )
        assert f"no_{unique}" in listing
    finally:
        p.sql("archive", f"ALTER TABLE arc_item DROP CONSTRAINT no_{unique}")
    replay = subprocess.run(
        [*cli, "dlq", "replay", "--stage", "apply"], capture_output=True, text=True, env=p.env, timeout=120
    )
    assert replay.returncode == 0, replay.stderr
    assert "re-driven" in replay.stdout
    item = p.wait_for(lambda: item_of(p, f"P-{unique}"), 60, "the replayed item")
    assert p.wait_for(
        lambda: p.sql("archive", "SELECT count(*) FROM arc_file WHERE item_id = %s", (item["id"],))[0][0] == 1,
        30,
        "its file",
    )


def test_two_workers_share_the_work_and_survive_one_dying(pipeline: Pipeline, unique: str) -> None:
    import subprocess
    import time

    p = pipeline
    first = p.worker
    from processors.app import READY_LINE

    p.wait_for(lambda: p.log.read_text(errors="replace").count(READY_LINE) >= 1, 120, "the first worker ready")
    p.start_worker()  # a second worker in the same group: the partitions are shared
    second = p.worker
    p.wait_for(lambda: p.log.read_text(errors="replace").count(READY_LINE) >= 3, 120, "the rebalance to both")
    assert first is not None and second is not None
    fonds = f"S{unique}"
    forms = [new_form(p, f"S-{unique}-{n:02d}", fonds, attachments=1) for n in range(20)]
    try:
        for n, form_id in enumerate(forms):
            approve(p, form_id)
            if n == 10:
                p.wait_for(lambda: len(archive_fingerprint(p, fonds)) == 11, 60, "the first items, both workers up")
                # one worker dies mid-run (kill -9): the group notices after the session timeout
                # (10 s) and the survivor takes its partitions, recovering their tables
                first.kill()
                first.wait(30)
                time.sleep(0.2)
        p.wait_for(lambda: len(archive_fingerprint(p, fonds)) == 20, 180, "all 20 items with one worker left")
        numbers = sorted(r[0] for r in p.sql("archive", "SELECT item_no FROM arc_item WHERE fonds_code = %s", (fonds,)))
        assert numbers == list(range(1, 21))
        files = file_count(p, fonds)
        assert (
            p.wait_for(
                lambda: file_count(p, fonds) == 20,
                60,
                "all 20 files",
            )
            and files <= 20
        )
    finally:
        if first.poll() is None:
            first.kill()
        assert isinstance(second, subprocess.Popen)
    # both appliers were active at once: the second used its own numbered replication origin
    assert p.sql("archive", "SELECT 1 FROM pg_replication_origin WHERE roname = 'archsync_apply_archive_2'")


def test_refused_write_is_recorded_on_the_conflicts_topic(settings: Settings, unique: str, tmp_path: Path) -> None:
    """A flow writing a column the other side owns: the column is dropped, the rest applied, and
    the conflict (both versions, the decision, the source event) lands on ``<prefix>.conflicts``."""
    import orjson
    import yaml

    from processors.dead_letters import _consume_all

    repo = Path(__file__).resolve().parents[2]
    data = yaml.safe_load((repo / "topology" / "reference.yaml").read_text())
    data["ownership"]["archive.public.arc_item"]["archive"].append("title")  # the archive owns titles here
    base = tmp_path / "archive_owns_titles.yaml"
    base.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    p = Pipeline(settings, unique, tmp_path, base=base)
    try:
        p.start()
        form_no, fonds = f"C-{unique}", f"C{unique}"
        approve(p, new_form(p, form_no, fonds, attachments=0))
        item = p.wait_for(lambda: item_of(p, form_no), 60, "the archive item")
        assert item["status"] == "RECEIVED"
        title = p.sql("archive", "SELECT title FROM arc_item WHERE id = %s", (item["id"],))[0][0]
        assert title is None  # refused; everything else written

        def conflicts() -> list[dict]:
            topic = f"{p.topology.topics.prefix}.conflicts"
            found = [orjson.loads(m.value()) for m in _consume_all(settings, topic, f"t-{unique}", idle_seconds=1)]
            return [c for c in found if c["match"].get("source_ref") == form_no]

        found = p.wait_for(conflicts, 30, "the conflict record")
        assert [(c["table"], c["column"], c["decision"]) for c in found] == [
            ("archive.public.arc_item", "title", "rejected-not-owner")
        ]
        assert found[0]["incoming"] == f"claim {form_no}" and found[0]["current"] is None
        assert found[0]["flow"] == "approved_form_to_item" and found[0]["source_event_id"].startswith("oa:")
        assert "owner" in found[0]["reason"]
    finally:
        p.cleanup()


def test_rejected_change_is_dead_lettered_and_replayed_after_a_topology_fix(
    settings: Settings, unique: str, tmp_path: Path
) -> None:
    """A flow that cannot map a value (PAYMENT missing from a value map) dead-letters the change with
    the reason; the stream goes on; after the topology is fixed and the worker restarted,
    ``dlq replay --stage transform`` re-runs the flow and the item appears."""
    import subprocess

    import yaml

    repo = Path(__file__).resolve().parents[2]
    fixed = yaml.safe_load((repo / "topology" / "reference.yaml").read_text())
    flow = next(f for f in fixed["flows"] if f["name"] == "approved_form_to_item")
    broken = yaml.safe_load((repo / "topology" / "reference.yaml").read_text())
    next(f for f in broken["flows"] if f["name"] == "approved_form_to_item")["vars"]["category"] = (
        "map(root.form_type, {'EXPENSE': 'VOUCHER', 'CONTRACT': 'OTHER'})"
    )
    base = tmp_path / "broken.yaml"
    base.write_text(yaml.safe_dump(broken, sort_keys=False, allow_unicode=True))
    p = Pipeline(settings, unique, tmp_path, base=base)
    try:
        p.start()
        fonds = f"R{unique}"
        approve(p, new_form(p, f"R-{unique}", fonds, form_type="PAYMENT", attachments=1))
        approve(p, new_form(p, f"S-{unique}", fonds, attachments=0))
        p.wait_for(lambda: item_of(p, f"S-{unique}"), 60, "the healthy form's item (the stream went on)")
        assert item_of(p, f"R-{unique}") is None
        cli = [str(repo / ".venv" / "bin" / "archsync"), "--topology", str(p.file)]
        listing = p.wait_for(
            lambda: (
                (
                    r := subprocess.run(
                        [*cli, "dlq", "list", "--stage", "transform"],
                        capture_output=True,
                        text=True,
                        env=p.env,
                        timeout=60,
                    )
                )
                and "PAYMENT" in r.stdout
                and r.stdout
            ),
            60,
            "the dead letter",
        )
        assert "approved_form_to_item" in listing and "unknown value 'PAYMENT'" in listing
        # the fix: the value map knows PAYMENT again; the worker restarts with it
        assert p.worker is not None
        p.worker.terminate()
        p.worker.wait(60)
        data = yaml.safe_load(p.file.read_text())
        next(f for f in data["flows"] if f["name"] == "approved_form_to_item")["vars"] = flow["vars"]
        p.file.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        p.start_worker()
        replay = subprocess.run(
            [*cli, "dlq", "replay", "--stage", "transform"], capture_output=True, text=True, env=p.env, timeout=120
        )
        assert replay.returncode == 0, replay.stderr
        item = p.wait_for(lambda: item_of(p, f"R-{unique}"), 90, "the replayed form's item")
        assert item["retention_code"] == "Y30" and item["status"] == "RECEIVED"
        assert p.wait_for(
            lambda: p.sql("archive", "SELECT count(*) FROM arc_file WHERE item_id = %s", (item["id"],))[0][0] == 1,
            30,
            "its file",
        )
    finally:
        p.cleanup()


def twelve_forms_four_synced(p: Pipeline, fonds: str, unique: str) -> tuple[str, list[int]]:
    """12 forms of one fonds (one attachment each), the first 4 approved and archived."""
    forms = [new_form(p, f"{fonds}-{unique}-{n:02d}", fonds, attachments=1) for n in range(12)]
    for form_id in forms[:4]:
        approve(p, form_id)
    p.wait_for(lambda: len(archive_fingerprint(p, fonds)) == 4, 60, "the first items")
    return fonds, forms


def all_twelve_synced(p: Pipeline, fonds: str) -> str:
    """After an outage: 12 items with their files, numbered 1..12 (no gap, no duplicate), every
    code written back, no agent crashed, the worker still running. Returns the worker log."""
    p.wait_for(lambda: len(archive_fingerprint(p, fonds)) == 12, 180, "all 12 items after the outage")
    p.wait_for(lambda: file_count(p, fonds) == 12, 60, "all 12 files")
    items = p.sql("archive", "SELECT source_ref, item_no FROM arc_item WHERE fonds_code = %s ORDER BY 2", (fonds,))
    assert sorted(n for _, n in items) == list(range(1, 13)), items
    p.wait_for(
        lambda: (
            p.sql("oa", "SELECT count(*) FROM oa_form WHERE fonds_code = %s AND archive_code IS NOT NULL", (fonds,))
            == [(12,)]
        ),
        120,
        "every archival code written back",
    )
    log = p.log.read_text(errors="replace")
    assert "Crashed" not in log, "an agent crashed"
    assert p.worker is not None and p.worker.poll() is None, "the worker stopped"
    return log


@pytest.mark.parametrize("restarted", ["archive", "oa"])
def test_database_restarts_mid_run_nothing_lost_or_duplicated(pipeline: Pipeline, unique: str, restarted: str) -> None:
    """A target database restarts (fast shutdown: every session cut) while forms flow: the applier
    retries its batch until the database is back, the captures reconnect; every form ends as one
    item with its file and its code written back, numbered without gaps."""
    import subprocess
    import threading

    import psycopg

    from archsync.errors import ConfigError

    p = pipeline
    fonds, forms = twelve_forms_four_synced(p, f"R{unique}", unique)
    repo = Path(__file__).resolve().parents[2]
    restart = threading.Thread(
        target=subprocess.run,
        args=([str(repo / "scripts" / "services.sh"), "restart-db", restarted],),
        kwargs={"check": True, "capture_output": True, "timeout": 120},
    )
    restart.start()  # forms go on being approved while the database goes down and comes back
    for form_id in forms[4:8]:
        try:
            approve(p, form_id)
        except (psycopg.OperationalError, ConfigError):  # the OA database is the one restarting: approve afterwards
            restart.join()
            approve(p, form_id)
    restart.join()
    for form_id in forms[8:]:
        approve(p, form_id)
    log = all_twelve_synced(p, fonds)
    assert "trying again" in log  # the applier's connection was cut: its next batch was tried again


def test_broker_stops_answering_mid_run_nothing_lost_or_duplicated(pipeline: Pipeline, unique: str) -> None:
    """The Kafka broker stops answering for 12 s (SIGSTOP: longer than the worker's 10 s session)
    while forms are approved: the captures hold their slots, the worker's records wait in its
    producer, its group rejoins afterwards; every form ends as one item, numbered without gaps."""
    import os
    import signal
    import time

    from .test_capture_recovery import kafka_pid

    p = pipeline
    fonds, forms = twelve_forms_four_synced(p, f"K{unique}", unique)
    pid = kafka_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        for form_id in forms[4:8]:
            approve(p, form_id)
        time.sleep(12)
    finally:
        os.kill(pid, signal.SIGCONT)
    for form_id in forms[8:]:
        approve(p, form_id)
    all_twelve_synced(p, fonds)
