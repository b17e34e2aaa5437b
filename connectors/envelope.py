"""Builds change-event envelopes (``schemas/avro/change_event.v1.avsc``) and dead letters (pure)."""

from __future__ import annotations

import time
from typing import Any

from connectors.changes import ChangeRecord, RejectedChange, TableInfo, Transaction
from schemas.codec import event_id


def change_event(
    system: str,
    database: str,
    record: ChangeRecord,
    tx: Transaction,
    total: int | None,
    ts_ms: int | None = None,
) -> dict[str, Any]:
    """The envelope of a streamed row change."""
    table = record.table
    return {
        "event_id": event_id(system, tx.commit_lsn, record.order),
        "op": record.op,
        "before": record.before,
        "after": record.after,
        "source": {
            "system": system,
            "database": database,
            "schema": table.schema,
            "table": table.name,
            "lsn": record.lsn,
            "commit_lsn": tx.commit_lsn,
            "xid": tx.xid,
            "commit_ts": tx.commit_ts,
            "origin": tx.origin,
            "snapshot": False,
        },
        "txn": {"id": f"{tx.xid}:{tx.commit_lsn:X}", "order": record.order, "total": total},
        "ts_ms": ts_ms if ts_ms is not None else int(time.time() * 1000),
        "key_columns": list(table.key_columns),
        "unknown_types": table.unknown_types,
    }


def snapshot_event(
    system: str,
    database: str,
    table: TableInfo,
    row: dict[str, Any],
    snapshot_lsn: int,
    order: int,
    ts_ms: int,
) -> dict[str, Any]:
    """The envelope of a row read by a snapshot (op ``r``)."""
    return {
        "event_id": f"{system}:{snapshot_lsn:016X}:r:{table.qualified}:{order}",
        "op": "r",
        "before": None,
        "after": row,
        "source": {
            "system": system,
            "database": database,
            "schema": table.schema,
            "table": table.name,
            "lsn": snapshot_lsn,
            "commit_lsn": snapshot_lsn,
            "xid": None,
            "commit_ts": None,
            "origin": None,
            "snapshot": True,
        },
        "txn": None,
        "ts_ms": ts_ms,
        "key_columns": list(table.key_columns),
        "unknown_types": table.unknown_types,
    }


def dead_letter(
    stage: str,
    reason: str,
    error_class: str,
    *,
    system: str | None,
    table: str | None,
    lsn: int | None,
    original_json: str | None = None,
    original_key: bytes | None = None,
    original_value: bytes | None = None,
    source_topic: str | None = None,
) -> dict[str, Any]:
    """A dead-letter record: why, where from, and the original (as far as it can be kept)."""
    return {
        "reason": reason,
        "error_class": error_class,
        "source_topic": source_topic,
        "source_system": system,
        "source_table": table,
        "source_lsn": lsn,
        "original_key": original_key,
        "original_value": original_value,
        "original_json": original_json,
        "ts_ms": int(time.time() * 1000),
        "stage": stage,
    }


def rejected_dead_letter(system: str, rejected: RejectedChange, tx: Transaction) -> dict[str, Any]:
    """Dead letter of a row the assembler could not convert."""
    import orjson

    original = orjson.dumps(
        {"xid": tx.xid, "commit_lsn": tx.commit_lsn, "order": rejected.order, "tuple": rejected.raw},
        default=str,
    ).decode()
    return dead_letter(
        "capture",
        rejected.reason,
        rejected.error_class,
        system=system,
        table=f"{rejected.schema}.{rejected.table}",
        lsn=rejected.lsn,
        original_json=original,
    )
