"""`make demo`: the whole pipeline on the local default services, with a simulated office.

It creates the schemas, applies the topology (publications, topics), starts both captures and a
worker, then simulates an OA office and archive clerks: forms submitted with attachments, approved,
rejected or withdrawn; approved forms archived; clerks filing items (one check failure); an approval
revoked after filing; borrowing requests decided in OA. It shows progress and ends with a summary:
forms approved, items filed, codes written back, tasks round-tripped, dead letters and end-to-end
latency percentiles. It exits 0 only when both databases agree.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
from confluent_kafka import Consumer, TopicPartition

from archsync.audit_cli import demo_audit_line
from archsync.settings import Settings
from connectors.capture import CaptureService
from connectors.catalog import drop_slot, ensure_publication, forget_snapshots
from connectors.kafka_admin import check_broker
from connectors.migrations import apply_migrations
from connectors.postgres import connect
from processors.app import ensure_pipeline_topics, pipeline_topics
from topology.model import Topology


class Office:
    """SQL helpers for the two databases."""

    def __init__(self, settings: Settings, topology: Topology) -> None:
        self.dsn = {name: s.dsn(settings) for name, s in topology.sources.items()}
        self.setting = {name: s.dsn_env for name, s in topology.sources.items()}

    def sql(self, system: str, statement: str, params: Any = None) -> list[Any]:
        with connect(self.dsn[system], self.setting[system], autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []


def _wait(
    what: str, predicate: Callable[[], tuple[int, int]], timeout: float, workers: Sequence[subprocess.Popen[bytes]]
) -> bool:
    """Wait until ``predicate`` returns (done, total) with done == total, printing progress."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        done, total = predicate()
        line = f"\r  … {what}: {done}/{total}"
        if line != last:
            click.echo(line, nl=False)
            last = line
        if done >= total:
            click.echo("")
            return True
        for worker in workers:
            if worker.poll() is not None:
                click.echo("")
                raise click.ClickException(f"a worker (pid {worker.pid}) exited with code {worker.returncode}")
        if time.monotonic() > deadline:
            click.echo("  (timed out)")
            return False
        time.sleep(0.3)


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    values = sorted(values)

    def pct(p: float) -> float:
        return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]

    return f"p50 {pct(50) * 1000:.0f} ms · p95 {pct(95) * 1000:.0f} ms · p99 {pct(99) * 1000:.0f} ms"


def _dead_letters(settings: Settings, topology: Topology) -> int:
    names = [topology.topics.dead_letter_topic("capture")] + [
        v for k, v in pipeline_topics(topology).items() if k.startswith("dlq")
    ]
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "archsync-demo-count"})
    total = 0
    try:
        for name in names:
            for partition in range(1):
                try:
                    low, high = consumer.get_watermark_offsets(TopicPartition(name, partition), timeout=5)
                    total += high - low
                except Exception:  # noqa: BLE001 - a topic that does not exist holds none
                    pass
    finally:
        consumer.close()
    return total


def _from_now(office: Office, topology: Topology) -> Topology:
    """The demo's captures start from now: their slots are dropped and re-created without a
    snapshot, so neither the rows nor the WAL that other runs and tests left behind (a slot keeps
    every change since it was last read) delay the demo. Topics, worker state and the audit log
    carry on from earlier runs."""
    for system, source in topology.sources.items():
        with connect(office.dsn[system], source.dsn_env, autocommit=True) as conn:
            drop_slot(conn, source.slot, terminate=True)
            forget_snapshots(conn, source.slot)
    sources = {name: replace(source, snapshot="never") for name, source in topology.sources.items()}
    return replace(topology, sources=sources)


def run_demo(
    settings: Settings,
    topology: Topology,
    forms: int,
    topology_path: str | None = None,
    metrics_ports: tuple[int, int] = (0, 0),
    workers: int = 1,
) -> int:
    if workers < 1:
        raise click.BadParameter(f"--workers must be at least 1, got {workers}")
    if "ARCHSYNC_LOG_LEVEL" not in os.environ:  # keep the demo's screen readable
        logging.getLogger().setLevel(logging.WARNING)
    click.echo("archsync demo — OA ⇄ electronic accounting archive, through Kafka, on the local services")
    brokers = check_broker(settings.kafka_bootstrap)
    click.echo(f"  kafka {settings.kafka_bootstrap} ({brokers} broker)")
    office = Office(settings, topology)
    for system, source in topology.sources.items():
        with connect(office.dsn[system], source.dsn_env, autocommit=True) as conn:
            if system in ("oa", "archive"):
                apply_migrations(conn, system)
            ensure_publication(conn, source.publication, source.tables)
    ensure_pipeline_topics(topology, settings)
    click.echo("  schemas, publications and topics ready")

    topology = _from_now(office, topology)
    click.echo("  captures start from now (fresh slots; rows of earlier runs are not re-read)")
    services = {name: CaptureService(topology, name, settings) for name in topology.sources}
    if metrics_ports[0]:
        from archsync.metrics import serve_metrics
        from archsync.observability import start_capture_observer

        serve_metrics(metrics_ports[0])
        for s in services.values():
            start_capture_observer(s)
    threads = [threading.Thread(target=s.run_forever, daemon=True, name=f"capture-{n}") for n, s in services.items()]
    for th in threads:
        th.start()
    cmd = [sys.executable, "-m", "archsync.cli"]
    if topology_path:
        cmd += ["--topology", topology_path]
    log_path = Path(os.environ.get("ARCHSYNC_DEMO_LOG", "/tmp/archsync-demo-worker.log"))
    offset = log_path.stat().st_size if log_path.exists() else 0
    procs: list[subprocess.Popen[bytes]] = []
    for n in range(workers):  # one consumer group: the partitions are shared among them
        # the first worker's metrics on the port given, the next ones' on the ports after it
        worker_args = ["--metrics-port", str(metrics_ports[1] + n)] if metrics_ports[1] else []
        procs.append(
            subprocess.Popen([*cmd, "worker", *worker_args], stdout=log_path.open("ab"), stderr=subprocess.STDOUT)
        )
    try:
        deadline = time.monotonic() + 60
        while not all(s.stats.streaming for s in services.values()):
            if time.monotonic() > deadline:
                raise click.ClickException("the captures did not start streaming within 60 s")
            time.sleep(0.1)
        from processors.app import READY_LINE

        deadline = time.monotonic() + 120
        # every worker says so at the end of each rebalance it takes part in: with workers joining
        # one after another, the group is settled after 2n - 1 such lines (1 with one worker)
        while log_path.read_text(errors="replace")[offset:].count(READY_LINE) < 2 * workers - 1:
            if any(w.poll() is not None for w in procs) or time.monotonic() > deadline:
                raise click.ClickException(f"the workers did not become ready (see {log_path})")
            time.sleep(0.2)
        pids = ", ".join(str(w.pid) for w in procs)
        who = f"worker ready (pid {pids}" if workers == 1 else f"{workers} workers ready (pids {pids}"
        click.echo(f"  captures streaming ({', '.join(services)}), {who}, log {log_path})")
        return _simulate(office, settings, topology, forms, procs)
    finally:
        for worker in procs:
            worker.terminate()
        for worker in procs:
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
        for s in services.values():
            s.stop()
        for th in threads:
            th.join(30)


def _simulate(
    office: Office,
    settings: Settings,
    topology: Topology,
    forms: int,
    workers: Sequence[subprocess.Popen[bytes]],
) -> int:
    rng = random.Random()
    tag = time.strftime("%m%d%H%M%S")
    click.echo(f"\n  the OA office: {forms} forms (run {tag})")
    ids: dict[str, int] = {}
    for n in range(forms):
        form_no = f"DEMO-{tag}-{n:03d}"
        form_type = rng.choice(["EXPENSE", "EXPENSE", "PAYMENT", "CONTRACT"])
        amount = f"{rng.randint(100, 90000)}.{rng.randint(0, 99):02d}"
        form_id = office.sql(
            "oa",
            "INSERT INTO oa_form (form_no, form_type, status, amount, fonds_code, applicant,"
            " department, title, fiscal_year, fiscal_month) VALUES (%s, %s, 'SUBMITTED', %s,"
            " 'F001', %s, 'Finance', %s, 2026, 11) RETURNING id",
            (form_no, form_type, amount, rng.choice(["王芳", "李雷", "Chen Jing"]), f"{form_type.title()} {n}"),
        )[0][0]
        ids[form_no] = form_id
        for k in range(rng.randint(1, 2)):
            content = f"{form_no} attachment {k}".encode()
            office.sql(
                "oa",
                "INSERT INTO oa_attachment (form_id, kind, file_name, size_bytes, sha256) VALUES"
                " (%s, 'EINVOICE_XML', %s, %s, %s)",
                (form_id, f"invoice-{k}.xml", len(content), hashlib.sha256(content).hexdigest()),
            )
        office.sql(
            "oa",
            "INSERT INTO oa_approval_record (form_id, approver, node, action) VALUES"
            " (%s, 'applicant', 'start', 'SUBMIT')",
            (form_id,),
        )
    decisions = {no: rng.choices(["APPROVED", "REJECTED", "WITHDRAWN"], [75, 15, 10])[0] for no in ids}
    approved = [no for no, d in decisions.items() if d == "APPROVED"] or [next(iter(ids))]
    decisions[approved[0]] = "APPROVED"
    for no, decision in decisions.items():
        action = {"APPROVED": "APPROVE", "REJECTED": "REJECT", "WITHDRAWN": "RETURN"}[decision]
        office.sql(
            "oa",
            "INSERT INTO oa_approval_record (form_id, approver, node, action) VALUES"
            " (%s, 'manager', 'finance-review', %s)",
            (ids[no], action),
        )
        office.sql(
            "oa",
            "UPDATE oa_form SET status = %s, approved_at = CASE WHEN %s THEN now() END WHERE id = %s",
            (decision, decision == "APPROVED", ids[no]),
        )
    click.echo(
        f"  decisions: {len(approved)} approved, "
        f"{sum(d == 'REJECTED' for d in decisions.values())} rejected, "
        f"{sum(d == 'WITHDRAWN' for d in decisions.values())} withdrawn"
    )

    def items() -> dict[str, tuple[int, str, str]]:
        rows = office.sql(
            "archive",
            "SELECT source_ref, id, archive_code, status FROM arc_item"
            " WHERE source_system = 'oa' AND source_ref LIKE %s",
            (f"DEMO-{tag}-%",),
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    ok = _wait("approved forms archived", lambda: (len(items()), len(approved)), 120, workers)
    archived = items()
    to_file = [no for no in approved if no in archived]
    failed_check = to_file[-1] if len(to_file) > 2 else None
    click.echo("\n  the archive clerks: checking and filing")
    for no in to_file:
        if no == failed_check:
            office.sql(
                "archive",
                "UPDATE arc_item SET status = 'CHECK_FAILED', fault_code = 'E_SIGNATURE' WHERE id = %s",
                (archived[no][0],),
            )
        else:
            office.sql(
                "archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (archived[no][0],)
            )
    filed = [no for no in to_file if no != failed_check]

    def written_back() -> tuple[int, int]:
        rows = office.sql(
            "oa", "SELECT form_no, archive_code, archive_status FROM oa_form WHERE form_no LIKE %s", (f"DEMO-{tag}-%",)
        )
        state = {r[0]: (r[1], r[2]) for r in rows}
        current = items()
        done = sum(1 for no in to_file if state.get(no) == (current[no][1], current[no][2]))
        return done, len(to_file)

    ok &= _wait("archival codes and status written back to OA", written_back, 120, workers)
    revoked = filed[0] if filed else None
    if revoked:
        office.sql(
            "oa",
            "INSERT INTO oa_approval_record (form_id, approver, node, action, comment) VALUES"
            " (%s, 'auditor', 'finance-review', 'REVOKE', 'duplicate invoice')",
            (ids[revoked],),
        )
        ok &= _wait(
            "revocation recorded as a correcting business event",
            lambda: (
                len(
                    office.sql(
                        "archive",
                        "SELECT 1 FROM arc_business_event WHERE item_id = %s AND event_type = 'CORRECTION'",
                        (archived[revoked][0],),
                    )
                ),
                1,
            ),
            60,
            workers,
        )
    borrows = []
    for no in filed[1:3]:
        borrows.append(
            office.sql(
                "archive",
                "INSERT INTO arc_borrow_request (item_id, requester, purpose) VALUES"
                " (%s, 'external auditor', 'annual audit') RETURNING id",
                (archived[no][0],),
            )[0][0]
        )

    def tasks() -> dict[int, tuple[int, str]]:
        rows = office.sql(
            "oa", "SELECT ref_id, id, status FROM oa_task WHERE ref_id = ANY(%s)", ([f"borrow:{b}" for b in borrows],)
        )
        return {int(r[0].split(":")[1]): (r[1], r[2]) for r in rows}

    if borrows:
        ok &= _wait(
            "borrowing requests in the OA approvers' to-do lists", lambda: (len(tasks()), len(borrows)), 60, workers
        )
        for n, (task_id, _) in enumerate(tasks().values()):
            office.sql(
                "oa",
                "UPDATE oa_task SET status = %s, decided_by = 'archive manager', decided_at = now() WHERE id = %s",
                ("APPROVED" if n == 0 else "REJECTED", task_id),
            )

        def decided() -> tuple[int, int]:
            rows = office.sql(
                "archive",
                "SELECT count(*) FROM arc_borrow_request WHERE id = ANY(%s) AND status IN ('APPROVED', 'REJECTED')",
                (borrows,),
            )
            return rows[0][0], len(borrows)

        ok &= _wait("OA decisions back on the borrowing requests", decided, 60, workers)

    cancelled = [no for no, d in decisions.items() if d != "APPROVED"]
    agree = ok and all(no not in items() or items()[no][2] == "CANCELLED" for no in cancelled)
    latency = [
        r[0]
        for r in office.sql(
            "archive",
            "SELECT extract(epoch FROM created_at) FROM arc_item WHERE source_ref LIKE %s ORDER BY source_ref",
            (f"DEMO-{tag}-%",),
        )
    ]
    approved_at = [
        r[0]
        for r in office.sql(
            "oa",
            "SELECT extract(epoch FROM approved_at) FROM oa_form WHERE form_no = ANY(%s) ORDER BY form_no",
            (sorted(archived),),
        )
    ]
    e2e = [float(a) - float(b) for a, b in zip(latency, approved_at, strict=False)]
    dead = _dead_letters(settings, topology)
    click.echo("\n  summary")
    click.echo(f"    forms approved             {len(approved)} of {forms}")
    click.echo(f"    archive items created      {len(archived)}")
    click.echo(
        f"    items filed                {len(filed)} (+1 check failed)"
        if failed_check
        else f"    items filed                {len(filed)}"
    )
    click.echo(f"    codes written back to OA   {written_back()[0]}")
    click.echo(f"    borrowing round trips      {len(borrows)}")
    click.echo(f"    dead letters (all runs)    {dead}")
    click.echo(f"    OA approval → archive item {_percentiles(e2e)}")
    click.echo(f"    audit log                  {demo_audit_line(settings, topology)}")  # issue 5
    click.echo(f"    both databases agree       {'yes' if agree else 'NO'}")
    return 0 if agree else 1
