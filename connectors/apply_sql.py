"""The SQL of the applier's statements: the pieces :class:`connectors.applier.Applier` composes
them from (values written, computed in the statement, compared, matched), the target tables as the
catalog shows them, the archival code's format, and the tables and session settings the applier
keeps in each target. Pure: nothing here talks to a database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from psycopg import sql

from archsync.errors import ArchsyncError
from processors import domain

# The applier's statements are point reads and writes by key, prepared once per connection
# (psycopg prepares a statement shape after 5 runs) and kept with their first generic plan. A plan
# made while the target table was (nearly) empty — a new archive, or one vacuumed down to a page —
# is a sequential scan, and it stays one while the table grows: measured in the pipeline benchmark,
# 150-390 buffers read per statement instead of ~23, 2.2 ms instead of 0.5 ms a write, the archive
# applier's database 3.5x the CPU and the burst at two thirds of the rate, in about one run of three
# (whenever the applier connected right after autovacuum had truncated the bench's emptied table).
# Without sequential scans the planner keeps to the key's index whatever the table's size; a
# target without an index on a match key still gets its sequential scan (there is no other plan),
# costed so high that PostgreSQL would JIT-compile every run of it (~140 ms each, measured): the
# applier's point statements never gain from JIT, so it is off too.
SESSION_SETTINGS = {"enable_seqscan": "off", "jit": "off"}

GUARD_DDL = """
CREATE TABLE IF NOT EXISTS archsync_apply_guard (
  target_table        text        NOT NULL,
  target_key          text        NOT NULL,
  source_system       text        NOT NULL,
  source_commit_lsn   bigint      NOT NULL,
  source_order        bigint      NOT NULL,
  source_commit_ts_ms bigint,
  command_id          text        NOT NULL,
  deleted             boolean     NOT NULL DEFAULT false,
  applied_at          timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (target_table, target_key, source_system)
);
COMMENT ON TABLE archsync_apply_guard IS
  'archsync applier: per target row and source system, the source position last applied (replay/order guard)';
CREATE TABLE IF NOT EXISTS archsync_applied_command (
  command_id   text        PRIMARY KEY,
  target_table text        NOT NULL,
  applied_at   timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE archsync_applied_command IS
  'archsync applier: ids of insert_once commands already applied (no duplicate on replay)';
DO $do$ BEGIN
  IF to_regprocedure('archsync_one(anyarray, text)') IS NULL THEN
    CREATE FUNCTION archsync_one(candidates anyarray, what text) RETURNS anyelement
    LANGUAGE plpgsql STABLE AS $f$
    BEGIN
      IF cardinality(candidates) = 1 THEN
        RETURN candidates[1];
      ELSIF cardinality(candidates) = 0 THEN
        RAISE EXCEPTION '% found no row (parent not applied yet?)', what USING ERRCODE = 'no_data_found';
      END IF;
      RAISE EXCEPTION '% matches more than one row', what USING ERRCODE = 'too_many_rows';
    END $f$;
    COMMENT ON FUNCTION archsync_one(anyarray, text) IS
      'archsync applier: the one value a $lookup finds, or an error naming the lookup';
  END IF;
END $do$;
"""

# a guard row replaces the one of the same target row and source system
GUARD_UPSERT = (
    " ON CONFLICT (target_table, target_key, source_system) DO UPDATE SET"
    " source_commit_lsn = EXCLUDED.source_commit_lsn, source_order = EXCLUDED.source_order,"
    " source_commit_ts_ms = EXCLUDED.source_commit_ts_ms, command_id = EXCLUDED.command_id,"
    " deleted = EXCLUDED.deleted, applied_at = EXCLUDED.applied_at"
)


class CommandError(ArchsyncError):
    """One command cannot be applied; its group is rolled back and reported as failed."""


@dataclass(frozen=True)
class TargetTable:
    """A target table as the catalog shows it: ``schema.table``, column → SQL type, primary key."""

    name: str
    ident: sql.Identifier
    columns: dict[str, str]
    primary_key: tuple[str, ...] = ()

    def type_of(self, column: str) -> str:
        try:
            return self.columns[column]
        except KeyError:
            raise CommandError(f"column {column!r} does not exist in table {self.name}") from None


@dataclass(frozen=True)
class InList:
    """A ``{"$in": [...]}`` match value, its elements turned into query parameters."""

    values: tuple[Any, ...]


@dataclass(frozen=True, eq=False)
class NextItemNo:
    """The next gap-free (volume, item) number of a fonds/class/year, drawn by the statement that
    writes it (``arc_next_volume_item`` as a FROM item named ``alias``, its value the array
    ``n = [volume_no, item_no]``): no round trip to fetch it first."""

    alias: str
    params: tuple[Any, ...]  # fonds, class, year, items per volume

    def from_item(self, when: sql.Composable | None = None) -> sql.Composable:
        """The FROM item; with ``when``, a number is drawn only if that holds (else no row). The
        function is called in a select list, not as a FROM function: a FROM function would run
        (and allocate) before the WHERE clause is checked."""
        return sql.SQL("(SELECT arc_next_volume_item(%s::text, %s::text, %s::integer, %s::integer) AS n{}) {}").format(
            sql.SQL(" WHERE {}").format(when) if when is not None else sql.SQL(""), sql.Identifier(self.alias)
        )

    def volume(self) -> sql.Composable:
        return sql.SQL("{}.n[1]").format(sql.Identifier(self.alias))

    def item(self) -> sql.Composable:
        return sql.SQL("{}.n[2]").format(sql.Identifier(self.alias))


@dataclass(frozen=True, eq=False)
class Computed:
    """A value the target computes in the statement that matches or writes it (a ``$lookup``, an
    allocated code): ``text`` with its ``params``, in place of a ``%s`` parameter. ``shape`` tells
    the statement texts apart for the SQL cache; ``source`` is a FROM item the text reads."""

    shape: tuple[Any, ...]
    text: sql.Composable
    params: tuple[Any, ...] = ()
    source: NextItemNo | None = None


def value_sql(table: TargetTable, column: str, value: Any) -> sql.Composable:
    """How a value to write appears in a statement: its computation, or a parameter cast to the column's type."""
    if isinstance(value, Computed):
        return value.text
    return sql.SQL("%s::{}").format(sql.SQL(table.type_of(column)))


def differs(table: TargetTable, column: str, value: Any) -> sql.Composable:
    """Is the incoming ``value`` different from the column's current value?"""
    if table.type_of(column) == "json":  # json has no equality operator
        return sql.SQL("{0}::jsonb IS DISTINCT FROM ({1})::jsonb").format(
            sql.Identifier(column), value_sql(table, column, value)
        )
    return sql.SQL("{} IS DISTINCT FROM {}").format(sql.Identifier(column), value_sql(table, column, value))


def value_params(values: Iterable[Any]) -> list[Any]:
    """The parameters of values rendered by :func:`value_sql`, in order."""
    out: list[Any] = []
    for v in values:
        if isinstance(v, Computed):
            out.extend(v.params)
        else:
            out.append(v)
    return out


def value_shape(values: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple((c, v.shape if isinstance(v, Computed) else 0) for c, v in values.items())


def sources(values: Iterable[Any]) -> list[NextItemNo]:
    """The FROM items the computed ``values`` read, each once, in order."""
    found: dict[str, NextItemNo] = {}
    for v in values:
        if isinstance(v, Computed) and v.source is not None:
            found.setdefault(v.source.alias, v.source)
    return list(found.values())


def from_clause(sources: list[NextItemNo]) -> sql.Composable:
    if not sources:
        return sql.SQL("")
    return sql.SQL(" FROM ") + sql.SQL(", ").join(s.from_item() for s in sources)


def archival_code_prefix(fonds: str | None, class_code: str, year: int, retention: str) -> str:
    """The code an ``$allocate`` writes, up to its volume number: ``[fonds-]class·year·retention-``
    (:func:`processors.domain.format_archive_code` without the numbers)."""
    return domain.archive_code_prefix(fonds, [class_code, str(year), retention])


# the archival code the target writes: the prefix parameter, then the drawn volume ({0}) and item
# ({1}) numbers, 4 digits at least (as ``format_archive_code`` formats them)
CODE_SQL = (
    "%s::text || lpad({0}::text, greatest(4, length({0}::text)), '0')"
    " || '-' || lpad({1}::text, greatest(4, length({1}::text)), '0')"
)


def shape(match: Mapping[str, Any]) -> tuple[Any, ...]:
    """What the WHERE clause of ``match`` looks like (columns, NULLs, IN-list sizes, computed values):
    the SQL cache key."""
    return tuple((c, value_key(v)) for c, v in match.items())


def value_key(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, InList):
        return (len(value.values), None in value.values)
    if isinstance(value, Computed):
        return value.shape
    return 1
