"""Fixity: re-hash the archived files and compare with the sha256 recorded at filing.

``arc_file`` (schemas/sql/archive/001_reference.sql) records per file its ``sha256`` (lower-case
hex), ``size_bytes``, and the stored bytes in ``content`` (or a ``storage_uri``). The check:

* ``content`` stored: PostgreSQL re-hashes it (``sha256(content)``, no bytes leave the server)
  and measures it; a different digest or size is a violation;
* no content but a ``file://`` storage URI: the file is read and hashed here;
* neither: the file cannot be checked here (counted as ``unverifiable``, not a violation).

Each violation becomes a ``fixity_violation`` audit fact on the file's aggregate chain (e.g.
``item:7``; its id is derived from the file, the recorded and the actual digest, so the same
violation found by every scheduled run is ONE audit event), a run summary a ``fixity_run`` fact on
the ``fixity`` chain, the metrics ``archsync_fixity_checked_files_total`` /
``archsync_fixity_violations_total``, and a ``fixity_violation`` notification
(processors/notifications.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from archsync import metrics
from connectors.postgres import connect
from processors import audit
from topology.model import Topology, TopologyError

FILE_TABLE = "public.arc_file"

QUERY = """
SELECT f.id, f.item_id, f.seq, f.file_name, f.sha256, f.size_bytes, f.storage_uri,
       CASE WHEN f.content IS NULL THEN NULL ELSE encode(sha256(f.content), 'hex') END,
       octet_length(f.content),
       (extract(epoch FROM f.updated_at) * 1000)::bigint
  FROM arc_file f
 WHERE f.id > %s
 ORDER BY f.id
 LIMIT %s
"""


@dataclass(frozen=True)
class FileRow:
    file_id: int
    item_id: int
    seq: int
    file_name: str
    recorded_sha256: str
    recorded_size: int | None
    storage_uri: str | None
    content_sha256: str | None
    content_size: int | None
    updated_ms: int


@dataclass(frozen=True)
class Violation:
    file: FileRow
    actual_sha256: str | None
    actual_size: int | None
    reason: str


@dataclass
class FixityReport:
    started_ms: int
    checked: int = 0
    unverifiable: int = 0
    violations: list[Violation] = field(default_factory=list)
    facts: list[dict[str, Any]] = field(default_factory=list)


def _hash_file(uri: str) -> tuple[str, int] | None:
    parts = urlsplit(uri)
    if parts.scheme != "file":
        return None
    path = Path(unquote(parts.path))
    if not path.is_file():
        return None
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def check_file(row: FileRow, read_uri: Callable[[str], tuple[str, int] | None] = _hash_file) -> Violation | bool | None:
    """A violation, None when intact, False when the bytes are not available here (pure but for
    ``read_uri``)."""
    if row.content_sha256 is not None:
        actual, size = row.content_sha256, row.content_size
    elif row.storage_uri:
        got = read_uri(row.storage_uri)
        if got is None:
            return False
        actual, size = got
    else:
        return False
    if actual != row.recorded_sha256:
        return Violation(row, actual, size, f"sha256 is {actual}, {row.recorded_sha256} was recorded at filing")
    if row.recorded_size is not None and size is not None and size != row.recorded_size:
        return Violation(row, actual, size, f"size is {size} bytes, {row.recorded_size} were recorded")
    return None


def file_aggregate(topology: Topology) -> tuple[str, str, str]:
    """(source system, aggregate name, column of arc_file holding the aggregate key)."""
    for agg in topology.aggregates.values():
        if agg.root == FILE_TABLE:
            return agg.source, agg.name, agg.key
        if FILE_TABLE in agg.members:
            return agg.source, agg.name, agg.members[FILE_TABLE]
    for name, source in topology.sources.items():
        if FILE_TABLE in source.tables:
            return name, "file", "id"
    raise TopologyError(f"{topology.path}: no source captures {FILE_TABLE}: nothing to check fixity of")


def violation_fact(aggregate: str, v: Violation) -> dict[str, Any]:
    """A violation as an audit fact; deterministic (its time is the file row's last update, when
    the bytes changed at the latest), so every run that finds it again yields the same event."""
    f = v.file
    return audit.fact(
        "fixity_violation",
        aggregate,
        f.updated_ms,
        audit.audit_id("fixity_violation", f.file_id, f.recorded_sha256, v.actual_sha256, v.actual_size),
        system="archive",
        actor="fixity",
        table=FILE_TABLE,
        row_key=audit.canonical_json({"id": f.file_id}),
        outcome="violation",
        reason=v.reason,
        before_digest=f.recorded_sha256,
        after_digest=v.actual_sha256,
        detail=audit.canonical_json(
            {
                "item_id": f.item_id,
                "seq": f.seq,
                "file_name": f.file_name,
                "recorded_size": f.recorded_size,
                "actual_size": v.actual_size,
                "storage_uri": f.storage_uri,
            }
        ),
    )


def iter_files(conn: Any, page: int = 2000) -> Iterator[FileRow]:
    last = 0
    while True:
        rows = conn.execute(QUERY, (last, page)).fetchall()
        if not rows:
            return
        for r in rows:
            yield FileRow(*r)
        last = rows[-1][0]


def run_fixity(topology: Topology, settings: Any, progress: Callable[[int], None] | None = None) -> FixityReport:
    """Re-hash every archived file; the report carries the audit facts to produce."""
    system, agg_name, key_col = file_aggregate(topology)
    source = topology.source(system)
    report = FixityReport(started_ms=int(time.time() * 1000))
    with connect(source.dsn(settings), source.dsn_env, autocommit=True) as conn:
        for row in iter_files(conn):
            result = check_file(row)
            if result is False:
                report.unverifiable += 1
            else:
                report.checked += 1
                metrics.FIXITY_CHECKED.inc()
                if isinstance(result, Violation):
                    metrics.FIXITY_VIOLATIONS.inc()
                    report.violations.append(result)
                    key = row.item_id if key_col != "id" else row.file_id
                    report.facts.append(violation_fact(f"{agg_name}:{key}", result))
            if progress is not None:
                progress(1)
    report.facts.append(
        audit.fact(
            "fixity_run",
            "fixity",
            report.started_ms,
            audit.audit_id("fixity_run", report.started_ms, report.checked, len(report.violations)),
            system="archive",
            actor="fixity",
            outcome="violation" if report.violations else "ok",
            detail=audit.canonical_json(
                {
                    "checked": report.checked,
                    "violations": len(report.violations),
                    "unverifiable": report.unverifiable,
                    "files": [v.file.file_id for v in report.violations],
                }
            ),
        )
    )
    return report


def violation_notifications(topology: Topology, report: FixityReport) -> list[tuple[bytes, bytes]]:
    """(key, value) notification messages, one per distinct violation (processors/notifications.py)."""
    from processors.notifications import build_notification, notification_message

    out = []
    for v in report.violations:
        f = v.file
        record = build_notification(
            "fixity_violation",
            subject_system="archive",
            subject_table=FILE_TABLE,
            subject_id=str(f.file_id),
            subject_ref=f"item {f.item_id} file {f.seq}",
            subject=f"Fixity violation on archive item {f.item_id}, file {f.seq} ({f.file_name})",
            detail={"expected_sha256": f.recorded_sha256, "actual_sha256": v.actual_sha256, "reason": v.reason},
            occurrence=v.actual_sha256,
            rule="fixity",
        )
        out.append(notification_message(record))
    return out
