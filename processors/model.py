"""The records that flow between the processors, as plain data (JSON-able dicts on the wire).

``Change``        a captured row change, normalised (one per source row change, any system)
``ApplyCommand``  what to write to a target table, produced by the transform, run by the applier
``Conflict``      a write that was refused or lost to a later one, with both versions

Values inside ``before``/``after``/``values``/``match`` are JSON values: numbers that must stay
exact (PostgreSQL numeric) travel as strings, timestamps as ISO-8601 strings, dates as
``YYYY-MM-DD``, bytes as ``{"$bytes": base64}``. The applier lets PostgreSQL cast them to the
target column's type, so nothing is ever turned into a float on the way.

Special values in ``ApplyCommand.values`` / ``match``:
  ``{"$lookup": {"table": "public.arc_item", "column": "id", "where": {"source_system": "oa", ...}}}``
      the value of ``column`` of the one row of ``table`` matching ``where`` (resolved by the
      applier inside the same transaction, e.g. the generated id of a parent row);
  ``{"$allocate": {"fonds": "F001", "class": "KJ", "year": 2026, "retention": "Y30"}}``
      a new archival code ``F001-KJ·2026·Y30-<volume>-<item>``, allocated in the target
      transaction: item numbers gap-free within a volume, a volume full at ``items_per_volume``
      items (optional key, 1..9999, default 9999) opening the next one at item 1.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson


@dataclass(frozen=True, order=True)
class SourcePosition:
    """Where a change was committed: comparable, so a newer change has a greater position."""

    commit_lsn: int
    order: int
    system: str = ""


@dataclass
class Change:
    """A captured row change, normalised."""

    event_id: str
    system: str  # "oa" / "archive"
    table: str  # "public.oa_form"
    op: str  # c u d r t
    key: dict[str, Any]
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    commit_lsn: int
    order: int
    commit_ts_ms: int | None
    origin: str | None = None
    snapshot: bool = False
    unchanged: list[str] = field(default_factory=list)  # TOAST columns not sent (value unknown)
    replayed: bool = False  # re-driven from the transform's dead letters (``archsync dlq replay``)

    @property
    def position(self) -> SourcePosition:
        return SourcePosition(self.commit_lsn, self.order, self.system)

    @property
    def row(self) -> dict[str, Any]:
        """The row as it is after the change (the before image for a delete)."""
        return self.after if self.after is not None else (self.before or {})

    def changed(self, column: str) -> bool:
        """Did ``column`` change? True for inserts and snapshot rows."""
        if self.op in ("c", "r"):
            return True
        if self.before is None or self.after is None:
            return self.op == "d"
        return self.before.get(column) != self.after.get(column)

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively (no deep copy)

    @classmethod
    def from_json(cls, data: bytes | str) -> Change:
        return cls(**orjson.loads(data))


@dataclass
class ApplyCommand:
    """One write to a target table, idempotent by ``command_id`` and guarded by ``source``."""

    command_id: str  # deterministic: same source change + flow + target row → same id
    flow: str  # the topology flow that produced it
    target_system: str  # "archive" / "oa"
    table: str  # "public.arc_item"
    action: str  # upsert | update | insert_once | delete
    match: dict[str, Any]  # identity of the target row (columns → values)
    values: dict[str, Any]  # columns to write (with match columns for an insert)
    source_system: str
    source_event_id: str
    source_commit_lsn: int
    source_order: int
    source_commit_ts_ms: int | None
    aggregate_key: str  # the target aggregate (Kafka key of the apply topic)
    txn_id: str = ""  # source transaction: commands of one transaction apply together
    echo: bool = False  # feed the written row back as a change of the target (CommandSpec.echo)

    @property
    def position(self) -> SourcePosition:
        return SourcePosition(self.source_commit_lsn, self.source_order, self.source_system)

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively (no deep copy)

    @classmethod
    def from_json(cls, data: bytes | str) -> ApplyCommand:
        return cls(**orjson.loads(data))


@dataclass
class Conflict:
    """A refused or overridden write, with both versions and the decision."""

    flow: str
    table: str
    match: dict[str, Any]
    column: str
    incoming: Any
    current: Any
    decision: str  # rejected-not-owner | kept-newer | applied-newer
    reason: str
    source_event_id: str
    ts_ms: int

    def to_json(self) -> bytes:
        return orjson.dumps(self)  # orjson serialises dataclasses natively (no deep copy)


def command_id(source_event_id: str, flow: str, table: str, match: dict[str, Any]) -> str:
    """Deterministic command id: a replayed source change yields the same id."""
    digest = hashlib.sha256(
        orjson.dumps([source_event_id, flow, table, match], option=orjson.OPT_SORT_KEYS, default=json_default)
    ).hexdigest()[:24]
    return f"{flow}:{digest}"


def kept(data: bytes) -> bytes:
    """``data`` as a bytes object of its own length, for bytes kept in a table for long.

    orjson (3.x) returns its output buffer without shrinking it: at least 4 KiB per result, ~16 KiB
    for a 3 KiB aggregate state (measured with tracemalloc). Kept in the worker's tables that was
    ~40 KB per form — most of the worker's memory after a few thousand forms."""
    return bytes(memoryview(data))


def json_default(value: Any) -> Any:
    """orjson fallback: exact decimals as strings, bytes as base64, the rest as text."""
    if isinstance(value, Decimal):
        return format(value, "f")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return list(value)
    name = getattr(value, "type_name", None)
    if name is not None and hasattr(value, "text"):
        return value.text
    return str(value)


_PLAIN = frozenset({str, bool, type(None)})


def _plain(value: Any) -> bool:
    t = type(value)
    return t in _PLAIN or (t is int and -(2**63) <= value < 2**64)


def to_jsonable(value: Any) -> Any:
    """A Python value from the change-event codec turned into its JSON form (see module doc)."""
    # fast path: text, integers, booleans, null, and flat objects of them are their own JSON form
    if _plain(value):
        return value
    if type(value) is dict and all(type(k) is str and _plain(v) for k, v in value.items()):
        return dict(value)
    return orjson.loads(orjson.dumps(value, default=json_default, option=orjson.OPT_PASSTHROUGH_DATETIME))
