"""Notifications: records for people, on ``<prefix>.notifications`` (Avro ``notification.v1``).

A notification says that something needs someone's attention: an archive item was filed, a check
failed, a borrowing is due or overdue, a retention period is expiring, a file's fixity was
violated. archsync raises them from topology rules (a flow's ``notify:``), from the scheduled
scanner (due dates) and from other components (the fixity checker); the OA system's messaging
delivers them, either from the topic or from OA to-do rows (``oa_task``, ``task_type`` =
``NOTIFICATION``) that archsync writes through the normal apply path.

Usage (any component)::

    from processors.notifications import build_notification, notification_message, notifications_topic

    record = build_notification(
        "fixity_violation",
        subject_system="archive",
        subject_table="public.arc_file",
        subject_id=str(file_id),
        subject_ref=archive_code,
        subject=f"Fixity violation on {archive_code} file {seq}",
        detail={"expected_sha256": expected, "actual_sha256": actual},
        occurrence=actual,            # one notification per distinct bad hash, not per check run
        rule="fixity",
    )
    key, value = notification_message(record)   # bytes, bytes: produce to notifications_topic(prefix)

The ``notification_id`` is deterministic: the same kind, subject (system, table, id), due date and
occurrence always give the same id, so raising it twice is harmless (the Kafka key is the id,
consumers drop repeats, and the OA to-do row is inserted once).
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Mapping
from datetime import date, datetime
from typing import TYPE_CHECKING, Any, Final

import fastavro
import orjson

from processors.model import ApplyCommand, Change, command_id, json_default, to_jsonable
from schemas import registry

if TYPE_CHECKING:
    from topology.flows import Flow
    from topology.model import Topology
    from topology.operations import NotifySpec

NOTIFICATION_SCHEMA: Final = "notification.v1"

#: the kinds of notification (Avro enum ``NotificationKind``; ``other`` is a reader fallback only)
KINDS: Final = (
    "archive_filed",
    "check_failed",
    "borrowing_due",
    "borrowing_overdue",
    "retention_expiring",
    "fixity_violation",
)
SEVERITIES: Final = ("info", "warning", "critical")
DEFAULT_SEVERITY: Final = {
    "archive_filed": "info",
    "check_failed": "warning",
    "borrowing_due": "warning",
    "borrowing_overdue": "critical",
    "retention_expiring": "warning",
    "fixity_violation": "critical",
}


class NotificationError(ValueError):
    """A notification cannot be built (unknown kind, missing subject...)."""


def notifications_topic(prefix: str) -> str:
    """``<prefix>.notifications``: the topic of notifications (``topology.topics.prefix``)."""
    return f"{prefix}.notifications"


def _date(value: date | datetime | str | None) -> date | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value)[:10])
    except ValueError:
        raise NotificationError(f"due_date: not a date: {value!r}") from None


def notification_id(
    kind: str,
    subject_system: str,
    subject_table: str | None,
    subject_id: str,
    due_date: date | datetime | str | None = None,
    occurrence: str | None = None,
) -> str:
    """The deterministic id of a notification: ``<kind>:<24 hex digits>``."""
    due = _date(due_date)
    parts = [
        kind,
        subject_system,
        subject_table or "",
        str(subject_id),
        due.isoformat() if due else "",
        occurrence or "",
    ]
    return f"{kind}:{hashlib.sha256(orjson.dumps(parts)).hexdigest()[:24]}"


def build_notification(
    kind: str,
    *,
    subject_system: str,
    subject_id: Any,
    subject: str,
    subject_table: str | None = None,
    subject_ref: str | None = None,
    recipient: str | None = None,
    body: str = "",
    due_date: date | datetime | str | None = None,
    severity: str | None = None,
    rule: str = "",
    detail: Mapping[str, Any] | None = None,
    occurrence: str | None = None,
    source_event_id: str | None = None,
    ts_ms: int | None = None,
) -> dict[str, Any]:
    """A ``notification.v1`` record (a dict ready for :func:`encode_notification`).

    ``kind`` is one of :data:`KINDS`; ``severity`` defaults per kind (:data:`DEFAULT_SEVERITY`).
    ``occurrence`` (not stored) distinguishes repeated notifications about the same subject and
    due date (e.g. the bad hash of a fixity violation); leave it None for "once per subject".
    """
    if kind not in KINDS:
        raise NotificationError(f"unknown notification kind {kind!r} (one of {', '.join(KINDS)})")
    severity = severity or DEFAULT_SEVERITY[kind]
    if severity not in SEVERITIES:
        raise NotificationError(f"unknown severity {severity!r} (one of {', '.join(SEVERITIES)})")
    if subject_id is None or str(subject_id) == "":
        raise NotificationError(f"{kind}: subject_id is required")
    if not subject_system:
        raise NotificationError(f"{kind}: subject_system is required")
    due = _date(due_date)
    return {
        "notification_id": notification_id(kind, subject_system, subject_table, str(subject_id), due, occurrence),
        "kind": kind,
        "severity": severity,
        "rule": rule,
        "recipient": None if recipient in (None, "") else str(recipient),
        "subject": str(subject) if subject else f"{kind.replace('_', ' ')}: {subject_ref or subject_id}",
        "body": body or "",
        "subject_system": subject_system,
        "subject_table": subject_table,
        "subject_id": str(subject_id),
        "subject_ref": None if subject_ref in (None, "") else str(subject_ref),
        "due_date": due,
        "detail_json": orjson.dumps(dict(detail or {}), default=json_default, option=orjson.OPT_SORT_KEYS).decode(),
        "source_event_id": source_event_id,
        "created_ts_ms": time.time_ns() // 1_000_000 if ts_ms is None else ts_ms,
    }


class NotificationCodec:
    """Encode/decode ``notification.v1`` records (schemaless Avro binary, like the other codecs)."""

    def __init__(self) -> None:
        self.schema = registry.load_schema(NOTIFICATION_SCHEMA)

    def encode(self, record: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, self.schema, dict(record), strict_allow_default=True)
        return buf.getvalue()

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        record: Any = fastavro.schemaless_reader(io.BytesIO(bytes(data)), self.schema, None)
        return dict(record)


_CODEC: NotificationCodec | None = None


def _codec() -> NotificationCodec:
    global _CODEC
    if _CODEC is None:
        _CODEC = NotificationCodec()
    return _CODEC


def encode_notification(record: Mapping[str, Any]) -> bytes:
    """The Avro bytes of a notification record."""
    return _codec().encode(record)


def decode_notification(data: bytes | bytearray | memoryview) -> dict[str, Any]:
    """A notification record from its Avro bytes (``due_date`` as a ``date``)."""
    return _codec().decode(data)


def notification_message(record: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(Kafka key, value) of a notification: the id as UTF-8, the Avro record."""
    return str(record["notification_id"]).encode(), encode_notification(record)


# ------------------------------------------------------------------------------ from topology rules

TODO_TASK_TYPE: Final = "NOTIFICATION"


def todo_command(
    record: Mapping[str, Any],
    todo_table: str,
    *,
    flow: str,
    source_system: str,
    source_event_id: str,
    source_commit_lsn: int,
    source_order: int = 0,
    source_commit_ts_ms: int | None = None,
) -> ApplyCommand:
    """The OA to-do row of a notification, as an ``insert_once`` apply command.

    ``todo_table`` is ``<system>.<schema>.<table>`` (the reference OA's ``oa.public.oa_task``);
    the row is keyed by ``idempotency_key = 'notification:<notification_id>'``, so it is
    inserted once however often the notification is raised.
    """
    system, _, table = todo_table.partition(".")
    match = {"idempotency_key": f"notification:{record['notification_id']}"}
    payload = {k: v for k, v in record.items() if k != "detail_json"}
    payload["detail"] = orjson.loads(record.get("detail_json") or "{}")
    values = {
        **match,
        "task_type": TODO_TASK_TYPE,
        "assignee": record.get("recipient"),
        "title": record["subject"],
        "ref_system": record["subject_system"],
        "ref_id": record.get("subject_ref") or f"{record.get('subject_table') or ''}:{record['subject_id']}",
        "payload": to_jsonable(payload),
    }
    return ApplyCommand(
        command_id=command_id(source_event_id, flow, table, match),
        flow=flow,
        target_system=system,
        table=table,
        action="insert_once",
        match=match,
        values=values,
        source_system=source_system,
        source_event_id=source_event_id,
        source_commit_lsn=source_commit_lsn,
        source_order=source_order,
        source_commit_ts_ms=source_commit_ts_ms,
        aggregate_key=f"notification:{record['notification_id']}",
        txn_id=f"notification:{record['notification_id']}",
    )


def render(
    spec: NotifySpec,
    ctx: Mapping[str, Any],
    *,
    rule: str,
    subject_system: str,
    default_table: str,
    default_id: Any,
    source_event_id: str | None,
    ts_ms: int | None = None,
    default_due: Any = None,
) -> dict[str, Any] | None:
    """The notification a ``notify:`` spec gives in ``ctx`` (None when its ``when`` is false)."""
    if spec.when is not None and not spec.when(ctx):
        return None

    def value(expr: Any, default: Any = None) -> Any:
        return default if expr is None else expr(ctx)

    subject_id = value(spec.id, default_id)
    detail: dict[str, Any] = {"rule": rule}
    root = ctx.get("root")
    if isinstance(root, Mapping):
        detail["status"] = root.get("status")
    return build_notification(
        spec.kind,
        subject_system=subject_system,
        subject_table=spec.table or default_table,
        subject_id=subject_id,
        subject_ref=_text(value(spec.ref)),
        subject=_text(value(spec.subject)) or "",
        body=_text(value(spec.body)) or "",
        recipient=_text(value(spec.to)),
        due_date=value(spec.due, default_due),
        severity=spec.severity,
        rule=rule,
        detail=detail,
        source_event_id=source_event_id,
        ts_ms=ts_ms,
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def flow_actions(
    topology: Topology, flow: Flow, ctx: Mapping[str, Any], change: Change
) -> tuple[list[dict[str, Any]], list[ApplyCommand], list[str]]:
    """What a flow's ``notify``/``release`` give for a change: (notifications, OA to-do commands,
    flows to release). Empty unless the flow's ``when`` holds in ``ctx`` (its vars evaluated)."""
    if flow.notify is None and not flow.release:
        return [], [], []
    if flow.when is not None and not flow.when(ctx):
        return [], [], []
    records: list[dict[str, Any]] = []
    commands: list[ApplyCommand] = []
    if flow.notify is not None:
        key = change.key or {}
        default_id = next(iter(key.values())) if len(key) == 1 else orjson.dumps(key, option=orjson.OPT_SORT_KEYS)
        record = render(
            flow.notify,
            ctx,
            rule=flow.name,
            subject_system=change.system,
            default_table=change.table,
            default_id=default_id.decode() if isinstance(default_id, bytes) else default_id,
            source_event_id=change.event_id,
            ts_ms=change.commit_ts_ms,
        )
        if record is not None:
            records.append(record)
            todo = topology.operations.todo_table if topology.operations else None
            if flow.notify.todo and todo:
                commands.append(
                    todo_command(
                        record,
                        todo,
                        flow=flow.name,
                        source_system=change.system,
                        source_event_id=change.event_id,
                        source_commit_lsn=change.commit_lsn,
                        source_order=change.order,
                        source_commit_ts_ms=change.commit_ts_ms,
                    )
                )
    return records, commands, list(flow.release)
