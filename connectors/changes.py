"""Turns decoded pgoutput messages into row-change records grouped by transaction (pure logic).

The :class:`TransactionAssembler` keeps the state a pgoutput stream needs — the relation cache,
the current transaction, its origin — and yields :class:`TransactionBatch` objects holding
:class:`ChangeRecord` values (or :class:`RejectedChange` values for rows that cannot be
converted), ready to be wrapped into envelopes and produced. It does no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from connectors.pgoutput import (
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    Truncate,
    TupleData,
    TypeInfo,
    Update,
)
from connectors.pgtypes import BUILTIN_TYPE_NAMES, KNOWN_TYPE_OIDS, ValueConversionError, convert_tuple

HEARTBEAT_PREFIX = "archsync.heartbeat"
JSON_TYPE_OIDS = frozenset({114, 3802})


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A captured table as the stream knows it: names, columns and primary-key columns."""

    oid: int
    schema: str
    name: str
    relation: Relation
    key_columns: tuple[str, ...]
    unknown_types: dict[str, str]  # column -> PostgreSQL type name, for values kept as text
    json_columns: frozenset[str] = frozenset()

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass(slots=True)
class ChangeRecord:
    """One row change: op c/u/d/t, before/after images (None when absent) and its key."""

    op: str
    table: TableInfo
    before: dict[str, object] | None
    after: dict[str, object] | None
    key: dict[str, object]
    lsn: int
    order: int
    unknown_types: dict[str, str]


@dataclass(slots=True)
class RejectedChange:
    """A row that could not be turned into a record; it goes to the dead-letter topic."""

    reason: str
    error_class: str
    schema: str
    table: str
    lsn: int
    order: int
    raw: dict[str, object]


@dataclass(slots=True)
class Transaction:
    """The transaction being assembled."""

    xid: int
    commit_lsn: int
    commit_ts: datetime
    origin: str | None = None
    end_lsn: int = 0
    order: int = 0  # rows seen so far (1-based order of the last one)


@dataclass(slots=True)
class TransactionBatch:
    """Records of one transaction. ``final`` is True for the last batch (with the end LSN)."""

    tx: Transaction
    records: list[ChangeRecord | RejectedChange] = field(default_factory=list)
    final: bool = False
    own_origin: bool = False
    total: int | None = None


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A non-transactional logical decoding message (e.g. a heartbeat) at ``lsn``."""

    lsn: int
    prefix: str
    content: bytes


class TransactionAssembler:
    """Feeds on pgoutput messages; emits batches of change records per transaction.

    ``key_columns`` maps ``schema.table`` to its primary-key columns (tables absent from it are
    rejected as not part of the topology). ``own_origins`` are the replication origins of
    archsync's appliers: their transactions are skipped. ``skip_below`` maps a table to the LSN
    of the snapshot that already contains its state: changes committed before it are dropped
    (deletes too, unless the table is in ``keep_deletes_below``). A transaction of more than
    ``max_batch`` rows is emitted in several batches; then ``total`` is None.
    """

    def __init__(
        self,
        key_columns: Mapping[str, tuple[str, ...]],
        own_origins: Iterable[str] = (),
        skip_below: Mapping[str, int] | None = None,
        keep_deletes_below: Iterable[str] = (),
        max_batch: int = 10_000,
    ) -> None:
        self.key_columns = dict(key_columns)
        self.own_origins = frozenset(own_origins)
        self._own_prefixes = tuple(f"{o}_" for o in self.own_origins)
        self.skip_below = dict(skip_below or {})
        self.keep_deletes_below = frozenset(keep_deletes_below)
        self.max_batch = max_batch
        self.relations: dict[int, TableInfo | Relation] = {}
        self.type_names: dict[int, str] = {}
        self.tx: Transaction | None = None
        self._batch: TransactionBatch | None = None
        self._emitted_partial = False
        self.skipped_own_origin = 0
        self.skipped_below_snapshot = 0

    # -- public -------------------------------------------------------------------------
    def is_own_origin(self, name: str) -> bool:
        """An applier's origin, or one of its numbered siblings (``archsync_apply_oa_2``): each
        concurrent applier session needs an origin of its own."""
        return name in self.own_origins or name.startswith(self._own_prefixes)

    @property
    def in_transaction(self) -> bool:
        return self.tx is not None

    def feed(self, msg: PgOutputMessage, lsn: int) -> TransactionBatch | LogicalMessage | None:
        """Consume one message received at WAL position ``lsn``."""
        kind = type(msg)
        if kind is Insert or kind is Update or kind is Delete:
            return self._row(msg, lsn)  # type: ignore[arg-type]
        if kind is Begin:
            assert isinstance(msg, Begin)
            self.tx = Transaction(msg.xid, msg.final_lsn, msg.commit_ts)
            self._batch = TransactionBatch(self.tx)
            self._emitted_partial = False
            return None
        if kind is Commit:
            assert isinstance(msg, Commit)
            return self._commit(msg)
        if kind is Relation:
            assert isinstance(msg, Relation)
            self._relation(msg)
            return None
        if kind is Origin:
            assert isinstance(msg, Origin)
            if self.tx is not None:
                self.tx.origin = msg.name
                if self._batch is not None and self.is_own_origin(msg.name):
                    self._batch.own_origin = True
            return None
        if kind is Truncate:
            assert isinstance(msg, Truncate)
            return self._truncate(msg, lsn)
        if kind is TypeInfo:
            assert isinstance(msg, TypeInfo)
            self.type_names[msg.oid] = f"{msg.namespace}.{msg.name}" if msg.namespace else msg.name
            return None
        if kind is Message:
            assert isinstance(msg, Message)
            if not msg.transactional:
                return LogicalMessage(msg.lsn, msg.prefix, msg.content)
            return None
        return None

    # -- internals ----------------------------------------------------------------------
    def _relation(self, rel: Relation) -> None:
        qualified = f"{rel.namespace or 'pg_catalog'}.{rel.name}"
        keys = self.key_columns.get(qualified)
        if keys is None:
            self.relations[rel.oid] = rel  # not captured: its rows are rejected
            return
        unknown = {
            col.name: self.type_names.get(col.type_oid) or BUILTIN_TYPE_NAMES.get(col.type_oid) or str(col.type_oid)
            for col in rel.columns
            if col.type_oid not in KNOWN_TYPE_OIDS
        }
        self.relations[rel.oid] = TableInfo(rel.oid, rel.namespace or "pg_catalog", rel.name, rel, keys, unknown)

    def _skip(self, table: TableInfo, op: str) -> bool:
        if not self.skip_below:
            return False
        mark = self.skip_below.get(table.qualified)
        if mark is None or self.tx is None or self.tx.commit_lsn >= mark:
            return False
        if op == "d" and table.qualified in self.keep_deletes_below:
            return False
        self.skipped_below_snapshot += 1
        return True

    def _row(self, msg: Insert | Update | Delete, lsn: int) -> TransactionBatch | None:
        tx, batch = self.tx, self._batch
        if tx is None or batch is None:
            raise ValueError(f"row change at {lsn:X} outside a transaction")
        tx.order += 1
        if batch.own_origin:
            return None
        info = self.relations.get(msg.relation_oid)
        if type(msg) is Insert:
            op, old, new = "c", None, msg.new
        elif type(msg) is Update:
            op, old, new = "u", msg.old, msg.new
        else:
            op, old, new = "d", msg.old, None  # type: ignore[union-attr]
        if not isinstance(info, TableInfo):
            name = f"{info.namespace}.{info.name}" if isinstance(info, Relation) else f"relation {msg.relation_oid}"
            batch.records.append(
                RejectedChange(
                    f"table {name} is not in the topology (or has no primary key)",
                    "UnknownTable",
                    info.namespace if isinstance(info, Relation) else "",
                    info.name if isinstance(info, Relation) else "",
                    lsn,
                    tx.order,
                    {"old": _raw(old), "new": _raw(new)},
                )
            )
            return self._maybe_flush()
        if self._skip(info, op):
            return None
        columns = info.relation.columns
        try:
            before = convert_tuple(columns, old, self.type_names) if old is not None else None
            after = convert_tuple(columns, new, self.type_names) if new is not None else None
        except (ValueConversionError, ValueError) as exc:
            batch.records.append(
                RejectedChange(
                    str(exc),
                    type(exc).__name__,
                    info.schema,
                    info.name,
                    lsn,
                    tx.order,
                    {"old": _raw(old), "new": _raw(new)},
                )
            )
            return self._maybe_flush()
        image = after if after is not None else before
        assert image is not None
        key = {k: image.get(k) for k in info.key_columns}
        batch.records.append(ChangeRecord(op, info, before, after, key, lsn, tx.order, info.unknown_types))
        return self._maybe_flush()

    def _truncate(self, msg: Truncate, lsn: int) -> TransactionBatch | None:
        tx, batch = self.tx, self._batch
        if tx is None or batch is None:
            raise ValueError(f"truncate at {lsn:X} outside a transaction")
        if batch.own_origin:
            return None
        for oid in msg.relation_oids:
            tx.order += 1
            info = self.relations.get(oid)
            if isinstance(info, TableInfo) and not self._skip(info, "t"):
                batch.records.append(ChangeRecord("t", info, None, None, {}, lsn, tx.order, info.unknown_types))
        return self._maybe_flush()

    def _maybe_flush(self) -> TransactionBatch | None:
        batch = self._batch
        if batch is None or len(batch.records) < self.max_batch:
            return None
        self._batch = TransactionBatch(batch.tx, own_origin=batch.own_origin)
        self._emitted_partial = True
        return batch

    def _commit(self, msg: Commit) -> TransactionBatch:
        tx, batch = self.tx, self._batch
        if tx is None or batch is None:
            raise ValueError(f"commit {msg.commit_lsn:X} without a transaction")
        tx.end_lsn = msg.end_lsn
        batch.final = True
        if not self._emitted_partial:
            batch.total = tx.order
        if batch.own_origin:
            self.skipped_own_origin += 1
        self.tx = None
        self._batch = None
        return batch


def _raw(values: TupleData | None) -> list[object] | None:
    if values is None:
        return None
    return [v if isinstance(v, (str, type(None))) else repr(v) for v in values]
