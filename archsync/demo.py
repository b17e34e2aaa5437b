"""`make demo`: the local demo on the default services.

What runs today: both reference schemas are created, the topology is applied, the OA and the
archive captures stream into Kafka while sample activity happens on both sides (forms submitted
and approved with their approval trail and attachments; archive items received and filed; a
borrowing request), then a summary of what reached each topic. The processors that apply the
changes to the other side come with the processors issue.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections import Counter
from typing import Any

import click
from confluent_kafka import Consumer

from archsync.settings import Settings
from connectors.capture import CaptureService
from connectors.catalog import ensure_publication, list_slots, split_table
from connectors.kafka_admin import TopicSpec, check_broker, ensure_topics
from connectors.migrations import apply_migrations
from connectors.postgres import connect
from schemas.codec import ChangeEventCodec, to_json
from topology.model import Topology


def _activity(settings: Settings, run_tag: str, forms: int) -> None:
    rng = random.Random(run_tag)
    with (
        connect(settings.oa_dsn, "ARCHSYNC_OA_DSN", autocommit=True) as oa,
        connect(settings.archive_dsn, "ARCHSYNC_ARCHIVE_DSN", autocommit=True) as arc,
    ):
        for n in range(forms):
            form_type = rng.choice(["EXPENSE", "PAYMENT", "CONTRACT"])
            amount = f"{rng.randint(100, 500000)}.{rng.randint(0, 99):02d}"
            with oa.transaction():
                row = oa.execute(
                    "INSERT INTO oa_form (form_no, form_type, status, amount, fonds_code, applicant, department,"
                    " title, fiscal_year, fiscal_month) VALUES (%s, %s, 'SUBMITTED', %s, 'F001', %s, 'Finance',"
                    " %s, 2026, 11) RETURNING id",
                    (
                        f"DEMO-{run_tag}-{n:03d}",
                        form_type,
                        amount,
                        rng.choice(["王芳", "李雷", "Chen"]),
                        f"{form_type.title()} claim {n}",
                    ),
                ).fetchone()
                assert row is not None
                form_id = row[0]
                oa.execute(
                    "INSERT INTO oa_approval_record (form_id, approver, node, action) VALUES"
                    " (%s, 'applicant', 'start', 'SUBMIT')",
                    (form_id,),
                )
                content = f"e-invoice {run_tag} {n}".encode()
                oa.execute(
                    "INSERT INTO oa_attachment (form_id, kind, file_name, size_bytes, sha256)"
                    " VALUES (%s, 'EINVOICE_XML', %s, %s, %s)",
                    (form_id, f"invoice-{n}.xml", len(content), hashlib.sha256(content).hexdigest()),
                )
            approved = rng.random() < 0.8
            with oa.transaction():
                oa.execute(
                    "INSERT INTO oa_approval_record (form_id, approver, node, action) VALUES"
                    " (%s, 'manager', 'finance-review', %s)",
                    (form_id, "APPROVE" if approved else "REJECT"),
                )
                oa.execute(
                    "UPDATE oa_form SET status = %s, approved_at = CASE WHEN %s THEN now() END WHERE id = %s",
                    ("APPROVED" if approved else "REJECTED", approved, form_id),
                )
            if approved:
                with arc.transaction():
                    item = arc.execute(
                        "INSERT INTO arc_item (fonds_code, class_code, fiscal_year, fiscal_month, title, category,"
                        " retention_code, expire_date, source_system, source_ref, amount)"
                        " VALUES ('F001', 'KJ', 2026, 11, %s, 'VOUCHER', 'Y30', '2056-12-31', 'oa', %s, %s)"
                        " RETURNING id",
                        (f"{form_type} {n}", f"DEMO-{run_tag}-{n:03d}", amount),
                    ).fetchone()
                    assert item is not None
                    arc.execute(
                        "INSERT INTO arc_file (item_id, seq, file_name, format, size_bytes, sha256)"
                        " VALUES (%s, 1, %s, 'XML', %s, %s)",
                        (item[0], f"invoice-{n}.xml", len(content), hashlib.sha256(content).hexdigest()),
                    )
            time.sleep(0.05)


def _summary(settings: Settings, topics: list[str], seconds: float) -> tuple[Counter[tuple[str, str]], Any]:
    codec = ChangeEventCodec()
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"demo-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(topics)
    counts: Counter[tuple[str, str]] = Counter()
    sample = None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for msg in consumer.consume(500, 0.5):
            if msg.error():
                continue
            value, topic = msg.value(), msg.topic() or ""
            if value is None:
                continue
            event = codec.decode(value)
            counts[(topic, event["op"])] += 1
            if sample is None and event["op"] == "u" and topic.endswith("oa_form"):
                sample = event
    consumer.close()
    return counts, sample


def run_demo(settings: Settings, topology: Topology, seconds: float) -> None:
    if "ARCHSYNC_LOG_LEVEL" not in os.environ:  # keep the demo's screen readable
        logging.getLogger().setLevel(logging.WARNING)
    click.echo("archsync demo — OA ⇄ accounting archive change capture on the local services")
    brokers = check_broker(settings.kafka_bootstrap)
    click.echo(f"  kafka {settings.kafka_bootstrap} ({brokers} broker)")
    for system in ("oa", "archive"):
        with connect(settings.dsn_for(system), settings.dsn_setting(system), autocommit=True) as conn:
            applied = apply_migrations(conn, system)
            ensure_publication(conn, topology.source(system).publication, topology.source(system).tables)
        click.echo(f"  {system}: schema ready ({len(applied)} migration(s) applied now)")
    t = topology.topics
    topics = [t.change_topic(name, *split_table(q)) for name, s in topology.sources.items() for q in s.tables]
    ensure_topics(
        settings.kafka_bootstrap,
        [TopicSpec(name, t.partitions, t.replication_factor, t.config) for name in topics],
    )
    services = {name: CaptureService(topology, name, settings) for name in topology.sources}
    errors: list[BaseException] = []

    def run(svc: CaptureService) -> None:
        try:
            svc.run()
        except BaseException as exc:  # noqa: BLE001 - reported, never swallowed silently
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(svc,), name=f"capture-{name}", daemon=True) for name, svc in services.items()
    ]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 60
    while not all(s.stats.streaming for s in services.values()):
        if errors:
            raise errors[0]
        if time.monotonic() > deadline:
            raise click.ClickException("the captures did not start streaming within 60 s")
        time.sleep(0.1)
    click.echo("  captures streaming: " + ", ".join(f"{n} (slot {topology.source(n).slot})" for n in services))
    run_tag = time.strftime("%H%M%S")
    forms = max(5, int(seconds * 2))
    click.echo(f"  simulating {forms} OA forms (submit, approve/reject) and archive filings …")
    _activity(settings, run_tag, forms)
    time.sleep(2)
    for svc in services.values():
        svc.stop()
    for th in threads:
        th.join(30)
    counts, sample = _summary(settings, topics, 5)
    click.echo("\n  events in Kafka (topic, op: count) — r=snapshot c=insert u=update d=delete")
    for topic in topics:
        ops = {op: n for (tp, op), n in counts.items() if tp == topic}
        if ops:
            click.echo(f"    {topic:44} " + "  ".join(f"{op}:{n}" for op, n in sorted(ops.items())))
    for name in services:
        with connect(settings.dsn_for(name), settings.dsn_setting(name), autocommit=True) as conn:
            slot = list_slots(conn, topology.source(name).slot)
        if slot:
            click.echo(f"  slot {slot[0].name}: lag {slot[0].lag_bytes} bytes after the run")
    if sample is not None:
        click.echo("\n  a sample oa_form update event:")
        click.echo("  " + to_json(sample, pretty=True).decode().replace("\n", "\n  "))
    click.echo("\n  next: the processors (OA → archive filing, archive → OA write-back) come in the processors issue.")
