"""Reads tables inside an exported snapshot, in primary-key chunks (the initial snapshot).

The capture creates its slot with ``EXPORT_SNAPSHOT`` and imports that snapshot here with
``SET TRANSACTION SNAPSHOT``, so the rows read are exactly the state the slot's stream starts
from. Rows come back as the same text values pgoutput sends, so one converter serves both.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.string import TextLoader

from connectors.catalog import split_table
from connectors.pgoutput import RelationColumn, TupleData

log = logging.getLogger(__name__)


def table_columns(
    conn: psycopg.Connection[Any], qualified: str, key_columns: Sequence[str]
) -> tuple[tuple[RelationColumn, ...], dict[str, str]]:
    """The table's live columns in order, as pgoutput would describe them, and each column's SQL type."""
    schema, table = split_table(qualified)
    rows = conn.execute(
        "SELECT a.attname, a.atttypid::int, a.atttypmod, format_type(a.atttypid, a.atttypmod)"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " AND a.attgenerated = '' ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    keys = set(key_columns)
    columns = tuple(RelationColumn(name in keys, name, oid, typmod) for name, oid, typmod, _ in rows)
    return columns, {r[0]: r[3] for r in rows}


class SnapshotSession:
    """A REPEATABLE READ transaction that imported an exported snapshot."""

    def __init__(self, conn: psycopg.Connection[Any], snapshot_name: str | None) -> None:
        self.conn = conn
        conn.autocommit = False
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        if snapshot_name:
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot_name)))

    def read_table(
        self, qualified: str, key_columns: Sequence[str], chunk_rows: int
    ) -> tuple[tuple[RelationColumn, ...], int, Iterator[list[TupleData]]]:
        """(columns, estimated rows, chunks of rows as pgoutput-style text tuples)."""
        columns, types = table_columns(self.conn, qualified, key_columns)
        estimate_row = self.conn.execute(
            "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = %s::regclass", (qualified,)
        ).fetchone()
        estimate = int(estimate_row[0]) if estimate_row else 0
        return columns, estimate, self._chunks(qualified, columns, types, list(key_columns), chunk_rows)

    def _chunks(
        self,
        qualified: str,
        columns: tuple[RelationColumn, ...],
        types: dict[str, str],
        keys: list[str],
        chunk_rows: int,
    ) -> Iterator[list[TupleData]]:
        ident = sql.Identifier(*split_table(qualified))
        select_list = sql.SQL(", ").join(sql.Identifier(c.name) for c in columns)
        order = sql.SQL(", ").join(sql.Identifier(k) for k in keys)
        first = sql.SQL("SELECT {} FROM {} ORDER BY {} LIMIT {}").format(
            select_list, ident, order, sql.Literal(chunk_rows)
        )
        after = sql.SQL("SELECT {} FROM {} WHERE ({}) > ({}) ORDER BY {} LIMIT {}").format(
            select_list,
            ident,
            order,
            sql.SQL(", ").join(sql.SQL("{}::{}").format(sql.Placeholder(), sql.SQL(types[k])) for k in keys),
            order,
            sql.Literal(chunk_rows),
        )
        positions = [next(i for i, c in enumerate(columns) if c.name == k) for k in keys]
        oids = {c.type_oid for c in columns}
        last: list[Any] | None = None
        while True:
            with self.conn.cursor(binary=False) as cur:
                for oid in oids:  # values as text, exactly as pgoutput sends them
                    cur.adapters.register_loader(oid, TextLoader)
                rows = cur.execute(first if last is None else after, last).fetchall()
            if not rows:
                return
            yield rows
            if len(rows) < chunk_rows:
                return
            last = [rows[-1][p] for p in positions]

    def close(self) -> None:
        try:
            self.conn.rollback()
        finally:
            self.conn.autocommit = True
