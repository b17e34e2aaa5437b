"""The notification scanner: time-based notifications (borrowing due/overdue, retention expiring).

Each scan of the topology (``notifications.scans``) reads the rows of one table whose date column
``due`` lies within ``days`` of today (server-side cursor, rows filtered by the scan's ``when``),
and raises one notification per row: to ``<prefix>.notifications`` and, with ``todo: true``, as an
OA to-do row (an ``insert_once`` command on the apply topic of the to-do table's system).

Idempotent: a notification's id is deterministic (kind, subject, due date), and the ids already
sent are kept in ``archsync_notification_sent`` (in the scanned database, per topic prefix): a
row is notified once per kind and due date, however often the scanner runs. The id is recorded
only after the broker acknowledged the notification (a crash in between sends it again, with the
same id and key, and the OA to-do row is still inserted once).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from archsync import metrics
from archsync.settings import Settings
from connectors.pgoutput import str_to_lsn
from connectors.postgres import connect
from processors.model import to_jsonable
from processors.notifications import NotificationError, notification_message, notifications_topic, render, todo_command
from topology.expressions import ExpressionError
from topology.model import Topology
from topology.operations import Scan

log = logging.getLogger(__name__)

SENT_DDL = """
CREATE TABLE IF NOT EXISTS archsync_notification_sent (
  prefix           text        NOT NULL,
  notification_id  text        NOT NULL,
  kind             text        NOT NULL,
  rule             text        NOT NULL,
  subject_table    text,
  subject_id       text        NOT NULL,
  due_date         date,
  sent_at          timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (prefix, notification_id)
);
COMMENT ON TABLE archsync_notification_sent IS
  'archsync notification scanner: notifications already sent (one per subject, kind and due date)';
"""

CHUNK = 500


@dataclass
class ScanResult:
    sent: dict[str, int] = field(default_factory=dict)  # kind → notifications sent now
    already: int = 0  # rows notified by an earlier run
    failed: list[str] = field(default_factory=list)  # rows whose rule could not be evaluated

    @property
    def total(self) -> int:
        return sum(self.sent.values())


def _bounds(scan: Scan, today: date) -> tuple[date | None, date | None]:
    lo, hi = scan.days
    return (None if lo is None else today + timedelta(days=lo), None if hi is None else today + timedelta(days=hi))


def _rows(conn: psycopg.Connection[Any], scan: Scan, today: date) -> Iterator[dict[str, Any]]:
    lo, hi = _bounds(scan, today)
    due = sql.Identifier(scan.due)
    conds: list[sql.Composable] = [sql.SQL("{} IS NOT NULL").format(due)]
    params: list[Any] = []
    if lo is not None:
        conds.append(sql.SQL("{} >= %s").format(due))
        params.append(lo)
    if hi is not None:
        conds.append(sql.SQL("{} <= %s").format(due))
        params.append(hi)
    cur = conn.cursor(name=f"scan_{uuid.uuid4().hex[:8]}", row_factory=dict_row)
    cur.itersize = 2000
    cur.execute(
        sql.SQL("SELECT * FROM {} WHERE {}").format(
            sql.Identifier(*scan.table.split(".", 1)), sql.SQL(" AND ").join(conds)
        ),
        params,
    )
    yield from cur


def _pk(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = %s::regclass AND i.indisprimary",
        (table,),
    ).fetchall()
    return [r[0] for r in rows]


def scan_notifications(
    topology: Topology, settings: Settings, *, today: date | None = None, scans: list[str] | None = None
) -> ScanResult:
    """Run the topology's scans once; the notifications sent now (and those sent before)."""
    from confluent_kafka import Producer

    ops = topology.operations
    result = ScanResult()
    if ops is None or not ops.scans:
        return result
    today = today or date.today()
    prefix = topology.topics.prefix
    topic = notifications_topic(prefix)
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
        }
    )
    for scan in ops.scans:
        if scans and scan.name not in scans:
            continue
        source = topology.source(scan.system)
        with connect(source.dsn(settings), source.dsn_env, autocommit=True) as book:
            book.execute(SENT_DDL)
            row = book.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            lsn = str_to_lsn(row[0]) if row else 0
            with connect(source.dsn(settings), source.dsn_env) as conn:
                pk = _pk(conn, scan.table)
                batch: list[dict[str, Any]] = []
                for raw in _rows(conn, scan, today):
                    rec = _notification(scan, raw, pk, result)
                    if rec is not None:
                        batch.append(rec)
                    if len(batch) >= CHUNK:
                        _send(topology, book, producer, topic, scan, batch, lsn, result)
                        batch = []
                if batch:
                    _send(topology, book, producer, topic, scan, batch, lsn, result)
                conn.rollback()
    return result


def _notification(scan: Scan, raw: dict[str, Any], pk: list[str], result: ScanResult) -> dict[str, Any] | None:
    row = to_jsonable(raw)
    ctx = {"root": row, "row": row, "before": None, "change": {}, "members": {}, "parent": None, "vars": {}}
    ident = row.get(pk[0]) if len(pk) == 1 else "|".join(str(row.get(c)) for c in pk)
    try:
        return render(
            scan.notify,
            ctx,
            rule=scan.name,
            subject_system=scan.system,
            default_table=scan.table,
            default_id=ident,
            source_event_id=None,
            default_due=row.get(scan.due),
        )
    except (ExpressionError, NotificationError) as exc:
        result.failed.append(f"{scan.name} {scan.table} {ident}: {exc}")
        log.warning("notification scan %s: %s", scan.name, exc)
        return None


def _send(
    topology: Topology,
    book: psycopg.Connection[Any],
    producer: Any,
    topic: str,
    scan: Scan,
    batch: list[dict[str, Any]],
    lsn: int,
    result: ScanResult,
) -> None:
    prefix = topology.topics.prefix
    ids = [r["notification_id"] for r in batch]
    seen = {
        r[0]
        for r in book.execute(
            "SELECT notification_id FROM archsync_notification_sent WHERE prefix = %s AND notification_id = ANY(%s)",
            (prefix, ids),
        ).fetchall()
    }
    fresh = [r for r in batch if r["notification_id"] not in seen]
    result.already += len(batch) - len(fresh)
    if not fresh:
        return
    todo = topology.operations.todo_table if topology.operations else None
    for rec in fresh:
        key, value = notification_message(rec)
        producer.produce(topic, value, key)
        if scan.notify.todo and todo:
            cmd = todo_command(
                rec,
                todo,
                flow=f"scan_{scan.name}",
                source_system=scan.system,
                source_event_id=f"scan:{rec['notification_id']}",
                source_commit_lsn=lsn,
            )
            producer.produce(f"{prefix}.apply.{cmd.target_system}", cmd.to_json(), cmd.aggregate_key.encode())
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("the broker did not acknowledge every notification; none recorded as sent")
    with book.cursor() as cur:
        cur.executemany(
            "INSERT INTO archsync_notification_sent (prefix, notification_id, kind, rule, subject_table, subject_id,"
            " due_date) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [
                (prefix, r["notification_id"], r["kind"], r["rule"], r["subject_table"], r["subject_id"], r["due_date"])
                for r in fresh
            ],
        )
    for rec in fresh:
        result.sent[rec["kind"]] = result.sent.get(rec["kind"], 0) + 1
        metrics.NOTIFICATIONS.labels(rec["kind"]).inc()
