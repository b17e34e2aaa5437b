"""Captured change events (Avro envelopes) → normalised :class:`~processors.model.Change` records (pure)."""

from __future__ import annotations

from typing import Any

from processors.model import Change, to_jsonable
from schemas.codec import UNCHANGED


def _image(row: dict[str, Any] | None, unchanged: list[str]) -> dict[str, Any] | None:
    if row is None:
        return None
    out: dict[str, Any] = {}
    for column, value in row.items():
        if value is UNCHANGED:  # TOAST value not sent: unknown here, never written as null
            unchanged.append(column)
        else:
            out[column] = value
    return to_jsonable(out)


def normalise(event: dict[str, Any]) -> Change:
    """One decoded change event as a Change with JSON values."""
    source = event["source"]
    txn = event.get("txn") or {}
    commit_ts = source.get("commit_ts")
    unchanged: list[str] = []
    before = _image(event.get("before"), [])
    after = _image(event.get("after"), unchanged)
    key_columns = event.get("key_columns") or []
    image = after if after is not None else (before or {})
    return Change(
        event_id=event["event_id"],
        system=source["system"],
        table=f"{source['schema']}.{source['table']}",
        op=event["op"],
        key={k: image.get(k) for k in key_columns},
        before=before,
        after=after,
        commit_lsn=int(source["commit_lsn"]),
        order=int(txn.get("order") or 0) if txn else _snapshot_order(event["event_id"]),
        commit_ts_ms=int(commit_ts.timestamp() * 1000) if commit_ts is not None else None,
        origin=source.get("origin"),
        snapshot=bool(source.get("snapshot")),
        unchanged=unchanged,
    )


def _snapshot_order(event_id: str) -> int:
    """Snapshot event ids end with the row number: it orders snapshot rows like ``txn.order``."""
    tail = event_id.rsplit(":", 1)[-1]
    return int(tail) if tail.isdigit() else 0
