"""The audit log end to end on the real services: a pipeline run (with a worker killed mid-run)
whose log verifies; reconstruction of past states; export and report; fixity; tampering."""

from __future__ import annotations

import csv
import hashlib
import io
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import orjson
from click.testing import CliRunner
from confluent_kafka import Producer

from archsync.cli import cli
from archsync.settings import Settings
from connectors.audit_log import read_log
from connectors.kafka_admin import TopicSpec, ensure_topics
from processors import audit
from processors.audit_agent import AUDIT_TOPIC_CONFIG, audit_topics

from .pipeline_kit import Pipeline
from .test_pipeline import approve, item_of, new_form


def run(p: Pipeline, *args: str) -> Any:
    result = CliRunner().invoke(cli, ["--topology", str(p.file), *args], catch_exceptions=False)
    return result


def now_ms() -> int:
    return int(time.time() * 1000)


def events_of(p: Pipeline) -> list[dict[str, Any]]:
    out = []
    for r in read_log(p.settings, audit_topics(p.topology)["audit"]):
        if r.value is not None:
            out.append({**audit.decode_record(r.value), "partition": r.partition, "offset": r.offset})
    return out


class TextOf(HTMLParser):
    """The visible text of a page, and its svg/table counts (a headless read of the report)."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1

    def handle_data(self, data: str) -> None:
        if data.strip():
            self.text.append(data.strip())


def test_audit_log_of_a_pipeline_run(pipeline: Pipeline, unique: str, tmp_path: Path) -> None:
    p = pipeline
    fonds = f"U{unique}"
    form_no = f"U-{unique}"
    form_id = new_form(p, form_no, fonds, amount="4321.09", attachments=2)
    time.sleep(0.5)
    t_submitted = now_ms()
    time.sleep(0.5)
    approve(p, form_id)
    item = p.wait_for(lambda: item_of(p, form_no), 60, "the archive item")
    others = [new_form(p, f"U-{unique}-{n}", fonds, attachments=1) for n in range(6)]
    for n, other in enumerate(others):
        approve(p, other)
        if n == 2:  # the worker is killed mid-run and restarted: chains stay intact
            p.kill_worker()
            # restarted at once: it joins while the group still counts the dead member, and a second
            # rebalance follows when that member's session (10 s) expires — where Faust lost track
            # of records (processors/worker_consumer.py)
            p.start_worker()
    # (after a SIGKILL the group waits for the dead member's session to expire before rebalancing)
    p.wait_for(lambda: all(item_of(p, f"U-{unique}-{n}") for n in range(6)), 180, "all items")
    p.sql("archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (item["id"],))
    p.wait_for(
        lambda: p.sql("oa", "SELECT 1 FROM oa_form WHERE id = %s AND archive_status = 'FILED'", (form_id,)),
        120,
        "the write-back",
    )
    time.sleep(0.5)
    t_filed = now_ms()
    time.sleep(0.5)
    p.sql("archive", "UPDATE arc_item SET status = 'TRANSFERRED' WHERE id = %s", (item["id"],))
    # the last change's audit events are in the log
    p.wait_for(
        lambda: any(
            e["kind"] == "change_captured" and e["aggregate"] == f"item:{item['id']}" and "TRANSFERRED" in e["values"]
            for e in events_of(p)
        ),
        180,
        "the audit events",
    )

    verified = run(p, "audit", "verify", "--quiet")
    assert verified.exit_code == 0, verified.output
    assert "INTACT" in verified.output and " 0 break(s)" in verified.output

    events = events_of(p)
    kinds = {e["kind"] for e in events}
    assert {"change_captured", "rule_fired", "command_applied", "own_origin_skipped"} <= kinds
    # the captures skipped the appliers' own transactions, and said so
    skips = [e for e in events if e["kind"] == "own_origin_skipped"]
    assert {e["aggregate"] for e in skips} <= {"capture:oa", "capture:archive"}
    assert all(e["actor"].startswith("archsync_apply_") for e in skips)
    # every command has its outcome recorded: items and files of 7 forms and the write-back. (A
    # batch applied just before the kill may be recorded as skipped_replay, by its redelivery.)
    done = {e["command_id"] for e in events if e["kind"] == "command_applied" and e["outcome"] != "failed"}
    assert len(done) >= 7 + 8 + 1

    # history: the form's timeline across both systems (form → business key → archive item)
    history = run(p, "audit", "history", f"form:{form_id}")
    assert history.exit_code == 0, history.output
    assert f"item:{item['id']}" in history.output and f"oa:{form_no}" in history.output
    assert "approved_form_to_item" in history.output and "item_status_to_form" in history.output

    # state --at: the form as submitted (OA side), the item as filed (archive side)
    state = run(p, "audit", "state", f"form:{form_id}", "--at", str(t_submitted), "--side", "oa")
    assert state.exit_code == 0, state.output
    rows = orjson.loads(state.output)
    form = rows["oa.public.oa_form"][orjson.dumps({"id": form_id}).decode()]
    assert form["status"] == "SUBMITTED" and form["amount"] == "4321.09" and form["form_no"] == form_no
    assert len(rows["oa.public.oa_attachment"]) == 2 and len(rows["oa.public.oa_approval_record"]) == 1
    state = run(p, "audit", "state", f"item:{item['id']}", "--at", str(t_filed), "--side", "archive")
    archived = orjson.loads(state.output)["archive.public.arc_item"][orjson.dumps({"id": item["id"]}).decode()]
    db = p.sql(
        "archive", "SELECT archive_code, amount::text, retention_code FROM arc_item WHERE id = %s", (item["id"],)
    )
    assert archived["status"] == "FILED" and archived["archive_code"] == db[0][0] == item["archive_code"]
    assert archived["amount"] == "4321.09"
    later = run(p, "audit", "state", f"item:{item['id']}", "--at", str(now_ms()), "--side", "both")
    both = orjson.loads(later.output)
    assert both["archive.public.arc_item"][orjson.dumps({"id": item["id"]}).decode()]["status"] == "TRANSFERRED"
    # the OA side carries what archsync wrote back (its own writes are audited as applied commands)
    assert both["oa.public.oa_form"][orjson.dumps({"id": form_id}).decode()]["archive_status"] == "TRANSFERRED"
    at_filing = orjson.loads(run(p, "audit", "state", f"form:{form_id}", "--at", str(t_filed)).output)
    oa_form = at_filing["oa.public.oa_form"][orjson.dumps({"id": form_id}).decode()]
    assert oa_form["archive_status"] == "FILED" and oa_form["archive_code"] == item["archive_code"]
    assert oa_form["status"] == "APPROVED"

    # export: CSV, JSON and XML parse and agree
    counts = {}
    for fmt in ("csv", "json", "xml"):
        out = tmp_path / f"export.{fmt}"
        res = run(p, "audit", "export", "--from", "2000-01-01", "--format", fmt, "--output", str(out))
        assert res.exit_code == 0, res.output
        text = out.read_text()
        if fmt == "csv":
            parsed = list(csv.DictReader(io.StringIO(text)))
            assert parsed[0]["kind"] and parsed[0]["hash"]
            counts[fmt] = len(parsed)
        elif fmt == "json":
            doc = orjson.loads(text)
            assert doc["count"] == len(doc["events"])
            counts[fmt] = len(doc["events"])
        else:
            root = ET.fromstring(text)
            counts[fmt] = len(root.findall("event"))
            assert root.find("event/audit_id") is not None
    # (each export reads the log as it is then: the access events of earlier exports may have joined)
    assert len({e["audit_id"] for e in events}) <= counts["csv"] <= counts["json"] <= counts["xml"]

    # fixity: one file's stored bytes match, another's were altered after filing
    files = p.sql("archive", "SELECT id, sha256 FROM arc_file WHERE item_id = %s ORDER BY seq", (item["id"],))
    good, bad = files[0], files[1]
    p.sql("archive", "UPDATE arc_file SET content = %s WHERE id = %s", (f"{form_no}-0".encode(), good[0]))
    assert hashlib.sha256(f"{form_no}-0".encode()).hexdigest() == good[1]
    p.sql("archive", "UPDATE arc_file SET content = %s WHERE id = %s", (b"altered bytes", bad[0]))
    fixity = run(p, "audit", "fixity")
    assert fixity.exit_code == 1, fixity.output
    assert f"(id {bad[0]})" in fixity.output and f"(id {good[0]})" not in fixity.output
    assert run(p, "audit", "fixity").exit_code == 1  # found again: the same audit event (same id)
    p.sql("archive", "UPDATE arc_file SET content = NULL WHERE id = %s", (bad[0],))  # (a shared database)
    violations = p.wait_for(
        lambda: [e for e in events_of(p) if e["kind"] == "fixity_violation"] if _runs(p) >= 2 else None,
        60,
        "the fixity audit events",
    )
    ours = [e for e in violations if e["aggregate"] == f"item:{item['id']}"]
    assert len({e["audit_id"] for e in ours}) == 1 and orjson.loads(ours[0]["row_key"]) == {"id": bad[0]}

    # report: one HTML file with the numbers and the four checks
    report = tmp_path / "report.html"
    res = run(p, "audit", "report", "--output", str(report))
    assert res.exit_code == 0, res.output
    page = TextOf()
    page.feed(report.read_text())
    text = " | ".join(page.text)
    distinct = len({e["audit_id"] for e in events_of(p)})
    assert page.tags.get("svg", 0) >= 5 and page.tags.get("table", 0) >= 2
    for check in ("Authenticity", "Integrity", "Usability", "Security"):
        assert check in text
    assert "Authenticity | FAIL" in text  # the fixity violation
    assert "Security | PASS" in text, text[text.index("Security") :][:600]
    assert "approved_form_to_item" in text
    reported = int(text.split("events | ")[1].split(" |")[0])
    assert distinct - 10 <= reported <= distinct  # (access events of the report itself may still arrive)

    # tampering: a forged record produced into the live log is found, with its place
    topic = audit_topics(p.topology)["audit"]
    victim = next(e for e in events_of(p) if e["aggregate"] == f"form:{form_id}" and e["seq"] == 2)
    forged = {k: victim[k] for k in audit.CANON_FIELDS if k in victim} | {"hash": victim["hash"]}
    forged["values"] = '{"amount":"1.00"}'
    producer = Producer({"bootstrap.servers": p.settings.kafka_bootstrap})
    producer.produce(topic, audit.encode_record(forged), forged["audit_id"].encode(), partition=victim["partition"])
    producer.flush(10)
    res = run(p, "audit", "verify", "--quiet")
    assert res.exit_code == 1
    assert f"{topic}[{victim['partition']}]@" in res.output and f"aggregate form:{form_id} seq 2" in res.output
    assert "altered or forged" in res.output


def _runs(p: Pipeline) -> int:
    return sum(1 for e in events_of(p) if e["kind"] == "fixity_run")


def copy_log(p: Pipeline, records: list[Any], name: str) -> str:
    topic = f"p{p.unique}.audit.{name}"
    ensure_topics(p.settings.kafka_bootstrap, [TopicSpec(topic, 1, 1, AUDIT_TOPIC_CONFIG)])
    producer = Producer({"bootstrap.servers": p.settings.kafka_bootstrap, "enable.idempotence": True})
    for key, value in records:
        producer.produce(topic, value, key, partition=0)
    assert producer.flush(10) == 0
    return topic


def test_tampering_is_detected_and_located(settings: Settings, unique: str, tmp_path: Path) -> None:
    """Altered, forged, deleted and reordered records in copies of a log: verify names each place."""
    p = Pipeline(settings, unique, tmp_path)  # not started: only its topology and topic names
    try:
        state = audit.ChainState()
        chain = []
        for n in range(6):
            record, data, _ = audit.append_encoded(state, audit.admin_fact("test", "t", 1_000 + n, f"n{n}"))
            chain.append((record["audit_id"].encode(), data))
        altered_record = audit.decode_record(chain[2][1]) | {"actor": "mallory"}
        forged_record, _ = audit.chain_encoded(audit.admin_fact("grant", "mallory", 1_003, "x"), 4, "0" * 64)
        cases = {
            "altered": ([*chain[:2], (chain[2][0], audit.encode_record(altered_record)), *chain[3:]], 2, "altered"),
            "forged": (
                [*chain[:3], (b"forged", audit.chain_encoded(forged_record, 4, "0" * 64)[1]), *chain[3:]],
                3,
                "audit id",
            ),
            "deleted": ([*chain[:3], *chain[4:]], 3, "seq 4 missing"),
            "reordered": ([*chain[:2], chain[3], chain[2], *chain[4:]], 2, "missing"),
            "tombstone": ([*chain, (chain[1][0], None)], 6, f"({chain[1][0].decode()}): tombstone"),
        }
        for name, (records, offset, problem) in cases.items():
            topic = copy_log(p, records, name)
            res = run(p, "audit", "verify", "--topic", topic, "--quiet")
            assert res.exit_code == 1, (name, res.output)
            first = next(line for line in res.output.splitlines() if line.startswith("BREAK"))
            assert f"BREAK {topic}[0]@{offset} aggregate " in first and problem in first, (name, res.output)
            assert name == "tombstone" or "aggregate admin" in first
        intact = copy_log(p, chain, "intact")
        assert run(p, "audit", "verify", "--topic", intact, "--quiet").exit_code == 0
    finally:
        from connectors.kafka_admin import delete_topics

        delete_topics(settings.kafka_bootstrap, [f"p{unique}.audit.{n}" for n in (*cases, "intact")])


def test_audit_agent_in_its_own_worker(settings: Settings, unique: str, tmp_path: Path) -> None:
    """`worker --role pipeline` + `worker --role audit`: the pipeline workers only send facts, the
    audit worker (its own consumer group) chains them; the log verifies against its heads."""
    p = Pipeline(settings, unique, tmp_path)
    p.worker_role = "pipeline"
    try:
        p.start()
        p.start_audit_worker()
        form_no = f"AS-{unique}"
        approve(p, new_form(p, form_no, f"A{unique}", attachments=1))
        item = p.wait_for(lambda: item_of(p, form_no), 60, "the archive item")

        def chained() -> list[dict[str, Any]]:
            events = events_of(p)
            done = [e for e in events if e["kind"] == "command_applied" and e["aggregate"] == f"oa:{form_no}"]
            return events if len(done) >= 2 else []

        events = p.wait_for(chained, 90, "the item's and its file's applied commands in the audit log")
        assert {"change_captured", "rule_fired", "command_applied"} <= {e["kind"] for e in events}
        verified = run(p, "audit", "verify", "--quiet")
        assert verified.exit_code == 0 and "INTACT" in verified.output, verified.output
        assert item["archive_code"]
        assert "audit_chains" not in (tmp_path / "worker.log").read_text()  # the pipeline worker chains nothing
    finally:
        p.cleanup()
