"""Catalog work on a source database: keys, publications, slots and their lag."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from archsync.errors import SchemaError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotInfo:
    """A replication slot as ``pg_replication_slots`` shows it, with its lag in bytes."""

    name: str
    database: str
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: int | None
    restart_lsn: int | None
    lag_bytes: int | None
    retained_bytes: int | None
    wal_status: str | None


def split_table(qualified: str) -> tuple[str, str]:
    schema, _, table = qualified.partition(".")
    return schema, table


def primary_keys(conn: psycopg.Connection[Any], tables: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``schema.table`` → primary-key columns (or replica-identity index columns).

    A table that does not exist, or has neither a primary key nor a replica identity index,
    raises :class:`SchemaError` naming it: archsync cannot key its events.
    """
    result: dict[str, tuple[str, ...]] = {}
    for qualified in tables:
        schema, table = split_table(qualified)
        row = conn.execute(
            "SELECT c.oid, c.relreplident FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')",
            (schema, table),
        ).fetchone()
        if row is None:
            raise SchemaError(f"table {qualified} (in the topology) does not exist in {conn.info.dbname}")
        oid, replident = row
        cols = conn.execute(
            "SELECT a.attname FROM pg_index i"
            " JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord) ON true"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum"
            " WHERE i.indrelid = %s AND (i.indisprimary OR (%s = 'i' AND i.indisreplident))"
            " ORDER BY i.indisprimary DESC, k.ord",
            (oid, replident),
        ).fetchall()
        if not cols or replident == "n":
            raise SchemaError(
                f"table {qualified} has no primary key or replica identity: archsync cannot key its change "
                f"events; add a primary key (or REPLICA IDENTITY USING INDEX) or remove it from the topology"
            )
        result[qualified] = tuple(dict.fromkeys(c[0] for c in cols))
    return result


def ensure_publication(conn: psycopg.Connection[Any], name: str, tables: Iterable[str]) -> list[str]:
    """Create the publication, or add the tables it lacks; return the tables added."""
    wanted = list(tables)
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    idents = {t: sql.Identifier(*split_table(t)) for t in wanted}
    if not exists:
        conn.execute(
            sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish = 'insert, update, delete, truncate')").format(
                sql.Identifier(name), sql.SQL(", ").join(idents.values())
            )
        )
        log.info("publication created", extra={"publication": name, "tables": wanted})
        return wanted
    have = {
        f"{r[0]}.{r[1]}"
        for r in conn.execute("SELECT schemaname, tablename FROM pg_publication_tables WHERE pubname = %s", (name,))
    }
    missing = [t for t in wanted if t not in have]
    if missing:
        conn.execute(
            sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
                sql.Identifier(name), sql.SQL(", ").join(idents[t] for t in missing)
            )
        )
        log.info("publication extended", extra={"publication": name, "tables": missing})
    return missing


def list_slots(conn: psycopg.Connection[Any], name: str | None = None) -> list[SlotInfo]:
    """Logical slots of the cluster (or one of them), with lag = current WAL − confirmed flush."""
    rows = conn.execute(
        "SELECT slot_name, database, active, active_pid, confirmed_flush_lsn::text, restart_lsn::text,"
        " (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint,"
        " (pg_current_wal_lsn() - restart_lsn)::bigint, wal_status"
        " FROM pg_replication_slots WHERE slot_type = 'logical' AND (%s::text IS NULL OR slot_name = %s)"
        " ORDER BY slot_name",
        (name, name),
    ).fetchall()
    from connectors.pgoutput import str_to_lsn

    return [
        SlotInfo(
            r[0],
            r[1],
            r[2],
            r[3],
            str_to_lsn(r[4]) if r[4] else None,
            str_to_lsn(r[5]) if r[5] else None,
            r[6],
            r[7],
            r[8],
        )
        for r in rows
    ]


def drop_slot(conn: psycopg.Connection[Any], name: str, *, terminate: bool = False) -> bool:
    """Drop a slot; with ``terminate`` first end the walsender that holds it. False if absent."""
    info = list_slots(conn, name)
    if not info:
        return False
    if info[0].active_pid and terminate:
        conn.execute("SELECT pg_terminate_backend(%s)", (info[0].active_pid,))
    conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    return True


SNAPSHOT_STATE_DDL = """
CREATE TABLE IF NOT EXISTS archsync_snapshot_state (
  slot_name     text        NOT NULL,
  table_name    text        NOT NULL,
  snapshot_lsn  pg_lsn      NOT NULL,
  done          boolean     NOT NULL DEFAULT false,
  rows_emitted  bigint      NOT NULL DEFAULT 0,
  started_at    timestamptz NOT NULL DEFAULT now(),
  finished_at   timestamptz,
  PRIMARY KEY (slot_name, table_name)
);
COMMENT ON TABLE archsync_snapshot_state IS
  'archsync capture: per slot and table, the LSN of the snapshot that holds the table''s initial state';
"""


@dataclass(frozen=True)
class TableSnapshotState:
    table: str
    snapshot_lsn: int
    done: bool
    rows: int


def snapshot_states(conn: psycopg.Connection[Any], slot: str) -> dict[str, TableSnapshotState]:
    conn.execute(SNAPSHOT_STATE_DDL)
    from connectors.pgoutput import str_to_lsn

    return {
        r[0]: TableSnapshotState(r[0], str_to_lsn(r[1]), r[2], r[3])
        for r in conn.execute(
            "SELECT table_name, snapshot_lsn::text, done, rows_emitted FROM archsync_snapshot_state"
            " WHERE slot_name = %s",
            (slot,),
        )
    }


def record_snapshot(conn: psycopg.Connection[Any], slot: str, table: str, lsn: int, *, done: bool, rows: int) -> None:
    from connectors.pgoutput import lsn_to_str

    conn.execute(
        "INSERT INTO archsync_snapshot_state (slot_name, table_name, snapshot_lsn, done, rows_emitted, finished_at)"
        " VALUES (%s, %s, %s::pg_lsn, %s, %s, CASE WHEN %s THEN now() END)"
        " ON CONFLICT (slot_name, table_name) DO UPDATE SET snapshot_lsn = EXCLUDED.snapshot_lsn,"
        " done = EXCLUDED.done, rows_emitted = EXCLUDED.rows_emitted, finished_at = EXCLUDED.finished_at",
        (slot, table, lsn_to_str(lsn), done, rows, done),
    )


def forget_snapshots(conn: psycopg.Connection[Any], slot: str) -> None:
    conn.execute(SNAPSHOT_STATE_DDL)
    conn.execute("DELETE FROM archsync_snapshot_state WHERE slot_name = %s", (slot,))
