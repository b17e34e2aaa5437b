"""Writing :class:`ApplyCommand` records into a target database, effectively once.

One :class:`Applier` owns one connection to one target database. :meth:`Applier.apply_batch`
runs a whole batch in ONE target transaction, with a SAVEPOINT per source transaction and
aggregate (a *group*): a command that cannot be applied (constraint violation, bad value,
missing parent) rolls back its group only, which is reported in ``ApplyResult.failed`` for the
caller to dead-letter, while the other groups commit.

Loop prevention and progress: the session is bound to the replication origin
``archsync_apply_<target>`` (``pg_replication_origin_session_setup``), so every commit is tagged
with that origin (archsync's capture skips those transactions), and each transaction records the
greatest source LSN of its batch (``pg_replication_origin_xact_setup``) as the origin's progress.

Effectively once:

``archsync_apply_guard``
    one row per (target table, target row, source system) holding the source position of the
    last command applied to that row from that system. A command whose position is not newer
    is skipped (replay or older), so a later commit always wins and replays change nothing.
    A delete keeps its guard row (a tombstone), so an older upsert cannot bring the row back.
    Positions of different systems are never compared by LSN: across systems the commit
    timestamp decides, for shared (ownerless) columns only.
``archsync_applied_command``
    the command ids of ``insert_once`` commands, written in the same transaction as the row,
    so an append-only table never gets a duplicate. An ``insert_once`` with a ``match`` also
    inserts nothing when a row matching it exists (and never updates one).

Special values (see processors/transform.py): ``{"$init": v}`` in ``values`` is written only when
the row is inserted (``v`` may be a ``$lookup`` or ``$allocate``, resolved only then) and is not
subject to ownership; ``{"$in": [v, ...]}`` in the ``match`` of an update/delete matches the rows
whose column is one of the values (the guard key keeps the list as given).

Round trips: a ``$lookup`` is a subquery of the statement that uses it (``archsync_one``, created
with the guard table, raises unless exactly one row matches) and an ``$allocate`` draws its number
in the statement that writes the code (``arc_next_item_no`` as a FROM item). A write that needs no
current values (no column refused by ownership, no other system's write to weigh, no number for a
row that may already exist) is ONE statement — update the matched rows where a value differs, or
insert the missing row — so on the fast path (pipeline mode) a batch waits for the server only for
its guard rows and its echoes: 2026-11-28, ``bench_applier`` 1,660–1,791 commands/s against
726–944 with a read before each write and a round trip per lookup and code (in turns).

PostgreSQL 15 lets one session at a time use a replication origin: one Applier per origin.

The pieces its statements are composed from, the target tables it keeps and its session settings
are in :mod:`connectors.apply_sql` (pure); this module runs them.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from archsync.errors import ArchsyncError
from connectors import apply_sql as q
from connectors.apply_sql import CommandError, TargetTable
from connectors.pgoutput import lsn_to_str, str_to_lsn
from connectors.postgres import connect, first_line, numbered_placeholders
from processors import domain
from processors.model import ApplyCommand, Change, Conflict, json_default, to_jsonable

if TYPE_CHECKING:
    from archsync.settings import Settings
    from topology.model import Topology

log = logging.getLogger(__name__)

#: (table ``schema.table``, source system, flow, column) → may the command write the column?
MayWrite = Callable[[str, str, str, str], bool]

ACTIONS = ("upsert", "update", "insert_once", "delete")

# Errors that say the connection or the transaction as a whole is in trouble (lost connection,
# deadlock, serialization failure, lock timeout): the batch is raised for the caller to retry,
# never reported as a bad command.
_TRANSIENT = (psycopg.OperationalError, psycopg.InterfaceError)


class ApplyError(ArchsyncError):
    """The applier cannot start or run (not a problem of one command)."""


@dataclass
class ApplyResult:
    """What :meth:`Applier.apply_batch` did."""

    applied: int = 0
    skipped_replay: int = 0
    skipped_older: int = 0
    rows_affected: int = 0
    conflicts: list[Conflict] = field(default_factory=list)
    failed: list[tuple[ApplyCommand, str]] = field(default_factory=list)
    progress_lsn: int | None = None  # the source LSN recorded as the origin's progress
    #: one entry per command: applied | skipped_replay | skipped_older | failed
    outcomes: list[tuple[ApplyCommand, str]] = field(default_factory=list)
    #: rows written by ``echo`` commands, to be fed back as changes of the target (see :func:`echo_changes`)
    echoes: list[Echo] = field(default_factory=list)
    echo_lsn: int | None = None  # the target's WAL position just before the batch committed
    echo_ts_ms: int | None = None  # the target's clock just before the batch committed
    #: the fast path failed and the batch was applied group by group (a command could not be applied)
    isolated: bool = False

    @property
    def skipped(self) -> int:
        return self.skipped_replay + self.skipped_older

    def merge(self, other: ApplyResult) -> None:
        self.applied += other.applied
        self.skipped_replay += other.skipped_replay
        self.skipped_older += other.skipped_older
        self.rows_affected += other.rows_affected
        self.conflicts.extend(other.conflicts)
        self.failed.extend(other.failed)
        self.outcomes.extend(other.outcomes)
        self.echoes.extend(other.echoes)


@dataclass(frozen=True)
class Echo:
    """A row an ``echo`` command wrote (the whole row after the write)."""

    command: ApplyCommand
    table: str  # schema.table
    op: str  # c (inserted) | u (updated) | r (read back for a replayed command)
    key: dict[str, Any]  # primary key columns
    row: dict[str, Any]


@dataclass(frozen=True)
class _Guard:
    system: str
    lsn: int
    order: int
    ts_ms: int | None
    command_id: str


def target_key(match: Mapping[str, Any]) -> str:
    """Canonical JSON of a command's ``match`` (sorted keys): the target row's guard key."""
    return orjson.dumps(match, option=orjson.OPT_SORT_KEYS, default=json_default).decode()


def qualified(table: str) -> tuple[str, str]:
    schema, dot, name = table.partition(".")
    return (schema, name) if dot else ("public", table)


def _special(value: Any, key: str) -> Any:
    if isinstance(value, dict) and len(value) == 1 and key in value:
        return value[key]
    return None


class _WrittenInOne:
    """What a write made in one statement (:meth:`Applier._write_in_one`) did: rows updated, rows
    inserted, read from its result once (in pipeline mode, when the batch is synced)."""

    __slots__ = ("_counts", "cur")

    def __init__(self, cur: psycopg.Cursor[Any]) -> None:
        self.cur = cur
        self._counts: tuple[int, int] | None = None

    def counts(self) -> tuple[int, int]:
        if self._counts is None:
            row = self.cur.fetchone()
            self._counts = (int(row[0]), int(row[1])) if row else (0, 0)
        return self._counts

    @property
    def rows(self) -> int:
        return sum(self.counts())

    @property
    def op(self) -> str | None:
        """``c`` (inserted), ``u`` (updated) or None (nothing changed)."""
        updated, inserted = self.counts()
        return "c" if inserted else "u" if updated else None


def _decode_bytes(value: Any) -> Any:
    spec = _special(value, "$bytes")
    if spec is not None:
        return base64.b64decode(spec, validate=True)
    if isinstance(value, list):
        return [_decode_bytes(v) for v in value]
    return value


class Applier:
    """Applies ApplyCommands to one target database through one dedicated connection.

    ``conn`` is a psycopg connection (switched to autocommit; the Applier owns its transactions
    and binds the session to the origin) or a DSN, opened with :func:`connect` so a failure names
    ``setting``. ``ownership`` maps ``schema.table`` → column → owning system; columns not in it
    are asked of ``default_owner(table, column)``; ``None`` means anyone may write the column
    (shared: the later commit wins). ``may_write(table, source_system, flow, column)``, when
    given, decides instead whether a command may write a column (e.g. flow grants); see
    :meth:`for_topology`. Synchronous and not thread-safe: one Applier per thread.
    """

    def __init__(
        self,
        conn: psycopg.Connection[Any] | str,
        target: str,
        origin: str | None = None,
        ownership: Mapping[str, Mapping[str, str]] | None = None,
        default_owner: Callable[[str, str], str | None] | None = None,
        *,
        setting: str = "target DSN",
        may_write: MayWrite | None = None,
    ) -> None:
        self.target = target
        self.origin = origin or f"archsync_apply_{target}"
        self.ownership = {k: dict(v) for k, v in (ownership or {}).items()}
        self.default_owner = default_owner
        self.may_write = may_write
        self._own_conn = isinstance(conn, str)
        if isinstance(conn, str):
            self.conn: psycopg.Connection[Any] = connect(conn, setting, autocommit=True)
        else:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                raise ApplyError("the applier's connection must be idle (no open transaction)")
            conn.autocommit = True
            self.conn = conn
        self._tables: dict[str, TargetTable] = {}
        self._sql_cache: dict[tuple[Any, ...], bytes] = {}
        self._statements: dict[tuple[Any, ...], bytes] = {}  # shape → statement, $n placeholders
        # per batch (see _run_batch): fast path on, its guard cache and pending guard rows
        self._fast = False
        self._written: list[psycopg.Cursor[Any]] = []
        self._written_in_one: list[_WrittenInOne] = []
        # fast path: echo reads sent in the pipeline, their rows fetched once the batch is written
        self._pending_echoes: list[
            tuple[ApplyCommand, TargetTable, str | _WrittenInOne, psycopg.Cursor[Any], ApplyResult]
        ] = []
        self._batch_guards: dict[tuple[str, str], dict[str, _Guard]] = {}
        self._pending_guards: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        self._keys: dict[int, str] = {}  # id(command) → its guard key, for the batch being applied
        try:
            self._start()
        except BaseException:
            if self._own_conn:
                self.conn.close()
            raise

    @classmethod
    def for_topology(cls, topology: Topology, settings: Settings, system: str, origin: str | None = None) -> Applier:
        """The applier of target ``system`` with the topology's column ownership and grants.

        Tables with an ownership entry (``<system>.<schema>.<table>``) are written per
        ``Ownership.may_write`` (owner or granted flow); tables without one: anyone may write.
        """
        owns = {
            target.partition(".")[2]: own
            for target, own in topology.ownership.items()
            if target.partition(".")[0] == system
        }

        def may_write(table: str, source_system: str, flow: str, column: str) -> bool:
            own = owns.get(table)
            return own is None or own.may_write(source_system, flow, column)

        def default_owner(table: str, column: str) -> str | None:
            own = owns.get(table)
            return None if own is None else own.owner(column)

        return cls(
            topology.source(system).dsn(settings),
            system,
            origin,
            default_owner=default_owner,
            setting=topology.source(system).dsn_env,
            may_write=may_write,
        )

    # ------------------------------------------------------------------------------ lifecycle

    def _start(self) -> None:
        for name, value in q.SESSION_SETTINGS.items():
            self.conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        for attempt in (1, 2):  # two appliers starting together may race on CREATE ... IF NOT EXISTS
            try:
                with self.conn.transaction():
                    self.conn.execute(q.GUARD_DDL)
                break
            except psycopg.errors.UniqueViolation:
                if attempt == 2:
                    raise
        exists = self.conn.execute("SELECT 1 FROM pg_replication_origin WHERE roname = %s", (self.origin,)).fetchone()
        if not exists:
            try:
                self.conn.execute("SELECT pg_replication_origin_create(%s)", (self.origin,))
                log.info("replication origin created", extra={"origin": self.origin})
            except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject):
                pass  # created meanwhile by another applier
            except psycopg.Error as exc:
                raise ApplyError(f"cannot create replication origin {self.origin}: {first_line(exc)}") from None
        try:
            self.conn.execute("SELECT pg_replication_origin_session_setup(%s)", (self.origin,))
        except psycopg.Error as exc:
            raise ApplyError(
                f"cannot use replication origin {self.origin}: {first_line(exc)} "
                f"(PostgreSQL lets one session at a time use an origin: one applier per origin)"
            ) from None

    def close(self) -> None:
        """Release the origin (and close the connection if the Applier opened it)."""
        if self.conn.closed:
            return
        try:
            if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self.conn.rollback()
            self.conn.execute("SELECT pg_replication_origin_session_reset()")
        except psycopg.Error as exc:
            log.warning("could not release replication origin %s: %s", self.origin, first_line(exc))
        if self._own_conn:
            self.conn.close()

    def __enter__(self) -> Applier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget_catalog(self) -> None:
        """Drop cached column types (after a schema change of a target table), and the statements
        composed with them (their casts)."""
        self._tables.clear()
        self._sql_cache.clear()
        self._statements.clear()

    def owner_of(self, table: str, column: str) -> str | None:
        """The system that owns ``table.column``; None = shared (anyone may write it)."""
        for key in (table, qualified(table)[1]):
            columns = self.ownership.get(key)
            if columns is not None and column in columns:
                return columns[column]
        if self.default_owner is not None:
            return self.default_owner(table, column)
        return None

    def refusal(self, table: str, cmd: ApplyCommand, column: str) -> str | None:
        """Why ``cmd`` may not write ``table.column``; None when it may."""
        if self.may_write is not None:
            if self.may_write(table, cmd.source_system, cmd.flow, column):
                return None
            owner = self.owner_of(table, column)
            return f"flow {cmd.flow} of {cmd.source_system} may not write {column} (owner: {owner or 'none'})"
        owner = self.owner_of(table, column)
        if owner is not None and owner != cmd.source_system:
            return f"{column} is owned by {owner}, not by {cmd.source_system}"
        return None

    def _checked(self, table: str, cmd: ApplyCommand, column: str, value: Any) -> str | None:
        """The ownership refusal for a value of ``cmd``; a value equal to the command's match value
        for that column writes nothing new and is never refused."""
        if column in cmd.match and cmd.match[column] == value:
            return None
        return self.refusal(table, cmd, column)

    # ------------------------------------------------------------------------------ batches

    def apply_batch(self, commands: Iterable[ApplyCommand]) -> ApplyResult:
        """Apply ``commands`` in one target transaction, one savepoint per source transaction group.

        Commands that cannot be applied are returned in ``failed`` (their whole group rolled back);
        a connection-level or transient error (deadlock, serialization failure) raises and rolls
        back the batch, which is safe to retry as a whole.

        The batch first runs on the fast path: psycopg pipeline mode (writes are queued, only the
        reads wait for the server), the guard rows of the whole batch read in one query and
        written in one statement, no savepoints. Should any command fail there, the transaction
        is rolled back and the batch is run again group by group with savepoints, which isolates
        the failing groups (the fast path never commits a partial batch).
        """
        commands = list(commands)
        if not commands:
            return ApplyResult()
        try:
            return self._run_batch(commands, fast=True)
        except (psycopg.Error, CommandError, ValueError, TypeError) as exc:
            if self.conn.broken or self.conn.closed:
                raise
            log.info(
                "a command of the batch cannot be applied; applying it group by group: %s",
                first_line(exc) if isinstance(exc, psycopg.Error) else exc,
            )
        result = self._run_batch(commands, fast=False)
        result.isolated = True
        return result

    def _run_batch(self, commands: list[ApplyCommand], *, fast: bool) -> ApplyResult:
        result = ApplyResult()
        groups: dict[tuple[str, str, str], list[ApplyCommand]] = {}
        for cmd in commands:
            txn = cmd.txn_id or f"@{cmd.source_commit_lsn}"
            groups.setdefault((cmd.source_system, txn, cmd.aggregate_key), []).append(cmd)
        last = max(commands, key=lambda c: (c.source_commit_lsn, c.source_order))
        ts = (
            datetime.fromtimestamp(last.source_commit_ts_ms / 1000, UTC)
            if last.source_commit_ts_ms is not None
            else None
        )
        self._fast = fast
        self._written = []
        self._written_in_one = []
        self._pending_guards = {}
        try:
            with self.conn.pipeline() if fast else nullcontext(), self.conn.transaction():
                rows = self._guarded_rows(commands)
                self._lock_rows(rows)
                if fast:
                    self._batch_guards = self._prefetch_guards(rows)
                    for group in groups.values():
                        for cmd in group:
                            self._apply_one(cmd, result)
                    self._flush_guards()
                    self._fetch_echoes()
                else:
                    for group in groups.values():
                        result.merge(self._apply_group(group))
                done = self.conn.execute(
                    "SELECT pg_replication_origin_xact_setup(%s::pg_lsn, coalesce(%s::timestamptz, now())),"
                    " pg_current_wal_insert_lsn()::text, (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
                    (lsn_to_str(last.source_commit_lsn), ts),
                )
                if result.echoes:
                    # before the commit, so below its commit LSN; rows written here stay locked until
                    # then, so any later change to them commits at a greater LSN (echo order is safe)
                    row = done.fetchone()
                    result.echo_lsn = str_to_lsn(row[1]) if row else None
                    result.echo_ts_ms = int(row[2]) if row else None
            if fast:
                result.rows_affected += sum(max(cur.rowcount, 0) for cur in self._written)
                result.rows_affected += sum(w.rows for w in self._written_in_one)
        finally:
            self._fast = False
            self._written = []
            self._written_in_one = []
            self._pending_echoes = []
            self._batch_guards = {}
            self._pending_guards = {}
            self._keys = {}
        result.progress_lsn = last.source_commit_lsn
        return result

    def _apply_group(self, group: list[ApplyCommand]) -> ApplyResult:
        out = ApplyResult()
        current = group[0]
        try:
            with self.conn.transaction():  # SAVEPOINT
                for cmd in group:
                    current = cmd
                    self._apply_one(cmd, out)
        except _TRANSIENT:
            raise
        except (psycopg.Error, CommandError, ValueError, TypeError) as exc:
            reason = self._reason(current, exc)
            log.warning("apply failed: %s", reason, extra={"command_id": current.command_id})
            failed = ApplyResult()
            for cmd in group:
                why = reason if cmd is current else f"rolled back with its source transaction: {reason}"
                failed.failed.append((cmd, why))
                failed.outcomes.append((cmd, "failed"))
            return failed
        return out

    @staticmethod
    def _reason(cmd: ApplyCommand, exc: BaseException) -> str:
        where = f"{cmd.action} {cmd.table} {target_key(cmd.match)}"
        if isinstance(exc, psycopg.Error):
            state = f" [{exc.sqlstate}]" if exc.sqlstate else ""
            return f"{where}: {first_line(exc)}{state}"
        if isinstance(exc, CommandError):
            return f"{where}: {exc}"
        return f"{where}: bad value: {exc.__class__.__name__}: {exc}"

    # ------------------------------------------------------------------------------ one command

    def _apply_one(self, cmd: ApplyCommand, out: ApplyResult) -> None:
        if cmd.action not in ACTIONS:
            raise CommandError(f"unknown action {cmd.action!r} (expected one of {', '.join(ACTIONS)})")
        if cmd.target_system and cmd.target_system != self.target:
            raise CommandError(f"command for target {cmd.target_system!r} sent to the {self.target!r} applier")
        if not cmd.match and cmd.action != "insert_once":
            raise CommandError("empty match: the command does not identify a target row")
        if cmd.action not in ("update", "delete"):
            for col, value in cmd.match.items():
                if _is_special(value, "$in"):
                    raise CommandError(f"$in in match.{col} only fits an update/delete (not {cmd.action})")
        table = self._table(cmd.table)
        if cmd.action == "insert_once":
            self._insert_once(cmd, table, out)
            return
        key = self._keys.get(id(cmd)) or target_key(cmd.match)
        guards = self._batch_guards.get((table.name, key), {}) if self._fast else self._guards(table.name, key)
        mine = guards.get(cmd.source_system)
        if mine is not None:
            theirs, ours = (mine.lsn, mine.order), (cmd.source_commit_lsn, cmd.source_order)
            if theirs > ours:
                out.skipped_older += 1
                out.outcomes.append((cmd, "skipped_older"))
                return
            if theirs == ours and mine.command_id == cmd.command_id:
                out.skipped_replay += 1
                out.outcomes.append((cmd, "skipped_replay"))
                if cmd.echo:  # the first apply's echo may not have reached Kafka (a crash in between)
                    self._echo(cmd, table, "r", {c: self._match_param(v, table, c) for c, v in cmd.match.items()}, out)
                return
        others = [g for s, g in guards.items() if s != cmd.source_system]
        match = {c: self._match_param(v, table, c) for c, v in cmd.match.items()}
        if cmd.action == "delete":
            query = self._statement(
                ("delete", table.name, q.shape(match)),
                lambda: sql.SQL("DELETE FROM {} WHERE {}").format(table.ident, self._where(table, match)),
            )
            self._count(self._execute(query, list(self._where_params(match))), out)
        else:
            self._write(cmd, table, match, others, insert=cmd.action == "upsert", out=out)
        self._save_guard(cmd, table.name, key, deleted=cmd.action == "delete")
        out.applied += 1
        out.outcomes.append((cmd, "applied"))

    def _write(
        self,
        cmd: ApplyCommand,
        table: TargetTable,
        match: dict[str, Any],
        others: list[_Guard],
        *,
        insert: bool,
        out: ApplyResult,
    ) -> None:
        now_ms = int(time.time() * 1000)
        plain: dict[str, Any] = {}
        allocations: dict[str, dict[str, Any]] = {}
        init: dict[str, Any] = {}  # written only when the row is inserted; not subject to ownership
        rejected: dict[str, str] = {}
        for col, value in cmd.values.items():
            table.type_of(col)
            if _is_special(value, "$init"):
                init[col] = value["$init"]
                continue
            why = self._checked(table.name, cmd, col, value)
            if why is not None:
                rejected[col] = why
                continue
            spec = _special(value, "$allocate")
            if spec is not None:
                allocations[col] = spec
            else:
                plain[col] = self._param(value, table, col)
        if not (rejected or allocations or others):
            self._write_in_one(cmd, table, match, plain, init, insert=insert, out=out)
            return
        rows = self._current(table, match, plain, [*rejected, *allocations])
        first = rows[0][0] if rows else {}

        def conflict(col: str, decision: str, reason: str) -> None:
            out.conflicts.append(
                Conflict(
                    flow=cmd.flow,
                    table=table.name,
                    match=cmd.match,
                    column=col,
                    incoming=cmd.values[col],
                    current=to_jsonable(first.get(col)),
                    decision=decision,
                    reason=reason,
                    source_event_id=cmd.source_event_id,
                    ts_ms=now_ms,
                )
            )

        for col, why in rejected.items():
            conflict(col, "rejected-not-owner", why)
        newer = [g for g in others if _newer_than(g, cmd)]
        write: dict[str, Any] = {}
        for col, param in plain.items():
            differs = any(d[col] for _, d in rows)
            if rows and not differs:
                continue  # no change: no UPDATE, no version bump, no captured echo
            if rows and others and self.owner_of(table.name, col) is None:
                if newer:
                    conflict(col, "kept-newer", f"{newer[0].system} wrote this row at a later commit time")
                    continue
                conflict(col, "applied-newer", f"this commit is later than the last write from {others[0].system}")
            write[col] = param
        for col, spec in allocations.items():
            if rows and len(rows) > 1:
                raise CommandError(f"$allocate for {col} needs a match that identifies one row, {len(rows)} match")
            if rows and first.get(col) is not None:
                continue  # already numbered: a replayed or repeated upsert never consumes a number
            write.update(self._allocate(table, col, spec))
        if rows:
            if write:
                sources = q.sources(write.values())
                query = self._statement(
                    ("update", table.name, q.value_shape(write), q.shape(match)),
                    lambda: sql.SQL("UPDATE {} SET {}{} WHERE {}").format(
                        table.ident,
                        sql.SQL(", ").join(
                            sql.SQL("{} = {}").format(sql.Identifier(c), q.value_sql(table, c, v))
                            for c, v in write.items()
                        ),
                        q.from_clause(sources),
                        self._where(table, match),
                    ),
                )
                params = [*q.value_params(write.values()), *(p for s in sources for p in s.params)]
                cur = self._execute(query, [*params, *self._where_params(match)])
                if cmd.echo:
                    self._echo(cmd, table, "u", match, out)
                self._count(cur, out)
        elif insert:
            row = {**match, **write}
            for col, value in init.items():
                row.update(self._init_value(table, col, value))
            self._insert(table, row)
            if cmd.echo:
                self._echo(cmd, table, "c", match, out)
            out.rows_affected += 1

    def _write_in_one(
        self,
        cmd: ApplyCommand,
        table: TargetTable,
        match: dict[str, Any],
        plain: dict[str, Any],
        init: dict[str, Any],
        *,
        insert: bool,
        out: ApplyResult,
    ) -> None:
        """A write that needs no current values (no column refused, no number drawn for a row that
        may exist, no other system's write to weigh) in ONE statement, nothing read first: it
        updates the matched rows in which a value differs (no change: no UPDATE, no version bump,
        no echo) and, for an upsert, inserts the row when none matches, with its ``init`` values
        (numbers are drawn only then: gap-free). The fast path sends it without waiting."""
        if not plain and not insert:
            return
        row = {**match, **plain}
        if insert:
            for col, value in init.items():
                row.update(self._init_value(table, col, value))
        sources = q.sources(row.values()) if insert else []

        def build() -> sql.Composable:
            where = self._where(table, match)
            ctes: list[sql.Composable] = []
            if plain:
                ctes.append(
                    sql.SQL("upd AS (UPDATE {} SET {} WHERE {} AND ({}) RETURNING 1)").format(
                        table.ident,
                        sql.SQL(", ").join(
                            sql.SQL("{} = {}").format(sql.Identifier(c), q.value_sql(table, c, v))
                            for c, v in plain.items()
                        ),
                        where,
                        sql.SQL(" OR ").join(q.differs(table, c, v) for c, v in plain.items()),
                    )
                )
            if insert:
                absent = sql.SQL("NOT EXISTS (SELECT 1 FROM {} WHERE {})").format(table.ident, where)
                values = sql.SQL(", ").join(q.value_sql(table, c, v) for c, v in row.items())
                ctes.append(
                    sql.SQL("ins AS (INSERT INTO {} ({}) SELECT {} {} RETURNING 1)").format(
                        table.ident,
                        sql.SQL(", ").join(sql.Identifier(c) for c in row),
                        values,
                        sql.SQL("FROM {}").format(sql.SQL(", ").join(s.from_item(absent) for s in sources))
                        if sources
                        else sql.SQL("WHERE {}").format(absent),
                    )
                )
            return sql.SQL("WITH {} SELECT {}, {}").format(
                sql.SQL(", ").join(ctes),
                sql.SQL("(SELECT count(*) FROM upd)" if plain else "0"),
                sql.SQL("(SELECT count(*) FROM ins)" if insert else "0"),
            )

        key = ("in_one", table.name, q.value_shape(plain), q.value_shape(row) if insert else None, q.shape(match))
        query = self._statement(key, build)
        where_params = list(self._where_params(match))
        params: list[Any] = []
        if plain:
            values = q.value_params(plain.values())
            params += [*values, *where_params, *values]
        if insert:
            params += q.value_params(row.values())
            for source in sources:  # each draws its number only when no row matches
                params += [*source.params, *where_params]
            if not sources:
                params += where_params
        written = _WrittenInOne(self._execute(query, params))
        if self._fast:
            self._written_in_one.append(written)
        else:
            out.rows_affected += written.rows
        if cmd.echo:
            self._echo(cmd, table, written, match, out)

    def _insert_once(self, cmd: ApplyCommand, table: TargetTable, out: ApplyResult) -> None:
        first = self.conn.execute(
            "INSERT INTO archsync_applied_command (command_id, target_table) VALUES (%s, %s)"
            " ON CONFLICT (command_id) DO NOTHING RETURNING 1",
            (cmd.command_id, table.name),
        ).fetchone()
        if first is None:
            out.skipped_replay += 1
            out.outcomes.append((cmd, "skipped_replay"))
            return
        row: dict[str, Any] = {c: self._param(v, table, c) for c, v in cmd.match.items()}
        if row:  # insert unless a row matching ``match`` exists; never update it
            query = self._statement(
                ("exists", table.name, q.shape(row)),
                lambda: sql.SQL("SELECT 1 FROM {} WHERE {} LIMIT 1 FOR UPDATE").format(
                    table.ident, self._where(table, row)
                ),
            )
            exists = self._execute(query, list(self._where_params(row))).fetchone()
            if exists is not None:
                out.skipped_replay += 1
                out.outcomes.append((cmd, "skipped_replay"))
                return
        now_ms = int(time.time() * 1000)
        for col, value in cmd.values.items():
            table.type_of(col)
            if _is_special(value, "$init"):
                row.update(self._init_value(table, col, value["$init"]))
                continue
            why = self._checked(table.name, cmd, col, value)
            if why is not None:
                out.conflicts.append(
                    Conflict(
                        cmd.flow,
                        table.name,
                        cmd.match,
                        col,
                        value,
                        None,
                        "rejected-not-owner",
                        why,
                        cmd.source_event_id,
                        now_ms,
                    )
                )
                continue
            spec = _special(value, "$allocate")
            if spec is not None:
                row.update(self._allocate(table, col, spec))
            else:
                row[col] = self._param(value, table, col)
        if not row:
            raise CommandError("insert_once with neither match nor values")
        self._insert(table, row)
        out.rows_affected += 1
        out.applied += 1
        out.outcomes.append((cmd, "applied"))

    # ------------------------------------------------------------------------------ helpers
    def _insert(self, table: TargetTable, row: Mapping[str, Any]) -> None:
        """INSERT one row, each value cast to its column's type (or computed by the target)."""
        sources = q.sources(row.values())

        def build() -> sql.Composable:
            values = sql.SQL(", ").join(q.value_sql(table, c, v) for c, v in row.items())
            return sql.SQL("INSERT INTO {} ({}) {}").format(
                table.ident,
                sql.SQL(", ").join(sql.Identifier(c) for c in row),
                sql.SQL("SELECT {}{}").format(values, q.from_clause(sources))
                if sources
                else sql.SQL("VALUES ({})").format(values),
            )

        query = self._statement(("insert", table.name, q.value_shape(row)), build)
        self._execute(query, [*q.value_params(row.values()), *(p for s in sources for p in s.params)])

    def _echo(
        self, cmd: ApplyCommand, table: TargetTable, op: str | _WrittenInOne, match: dict[str, Any], out: ApplyResult
    ) -> None:
        """Read back the row ``cmd`` wrote (for ``echo`` commands) into ``out.echoes``; ``op`` may
        be the write's outcome, known once its result is read (no echo when it changed nothing)."""
        if not table.primary_key:
            raise CommandError(f"echo needs a primary key on {table.name}")
        query = self._statement(
            ("echo", table.name, q.shape(match)),
            lambda: sql.SQL("SELECT * FROM {} WHERE {}").format(table.ident, self._where(table, match)),
        )
        cur = self._execute(query, list(self._where_params(match)))
        if self._fast:  # no round trip per echo: the rows are fetched with the batch's last reads
            self._pending_echoes.append((cmd, table, op, cur, out))
            return
        self._read_echo(cmd, table, op, cur, out)

    def _fetch_echoes(self) -> None:
        """The rows of the batch's echo reads, in the order of the commands."""
        pending, self._pending_echoes = self._pending_echoes, []
        for cmd, table, op, cur, out in pending:
            self._read_echo(cmd, table, op, cur, out)

    @staticmethod
    def _read_echo(
        cmd: ApplyCommand, table: TargetTable, op: str | _WrittenInOne, cur: psycopg.Cursor[Any], out: ApplyResult
    ) -> None:
        found = cur.fetchall()  # first: in pipeline mode the description comes with the results
        if isinstance(op, _WrittenInOne):
            if op.op is None:
                return
            op = op.op
        names = [d.name for d in cur.description or ()]
        for values in found:
            row = {n: to_jsonable(v) for n, v in zip(names, values, strict=True)}
            key = {c: row[c] for c in table.primary_key}
            out.echoes.append(Echo(cmd, table.name, op, key, row))

    def _cached(self, key: tuple[Any, ...], build: Callable[[], sql.Composable]) -> bytes:
        """The SQL text of a piece of a statement (``%s`` placeholders), composed once per applier
        (composition is costly)."""
        query = self._sql_cache.get(key)
        if query is None:
            query = self._sql_cache[key] = build().as_bytes(self.conn)
        return query

    def _statement(self, key: tuple[Any, ...], build: Callable[[], sql.Composable]) -> bytes:
        """A statement shape composed once per applier, its placeholders numbered once for
        :meth:`_execute` (psycopg would parse a long statement's placeholders on every execute)."""
        query = self._statements.get(key)
        if query is None:
            query = self._statements[key] = numbered_placeholders(build().as_bytes(self.conn))
        return query

    def _execute(self, query: bytes, params: list[Any]) -> psycopg.RawCursor[Any]:
        """Run a statement of :meth:`_statement` (``$n`` placeholders, as PostgreSQL takes them)."""
        return psycopg.RawCursor(self.conn).execute(query, params)

    def _count(self, cur: psycopg.Cursor[Any] | psycopg.RawCursor[Any], out: ApplyResult) -> None:
        """Rows affected by a write: known at once, or (pipeline mode) when the batch is synced."""
        if self._fast:
            self._written.append(cur)
        else:
            out.rows_affected += max(cur.rowcount, 0)

    def _table(self, name: str) -> TargetTable:
        table = self._tables.get(name)
        if table is not None:
            return table
        schema, rel = qualified(name)
        rows = self.conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
            " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')"
            " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            (schema, rel),
        ).fetchall()
        if not rows:
            raise CommandError(f"table {schema}.{rel} does not exist in the {self.target} database")
        pk = self.conn.execute(
            "SELECT a.attname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
            " WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary"
            " ORDER BY array_position(i.indkey::int2[], a.attnum)",
            (schema, rel),
        ).fetchall()
        table = TargetTable(
            f"{schema}.{rel}", sql.Identifier(schema, rel), {r[0]: r[1] for r in rows}, tuple(r[0] for r in pk)
        )
        self._tables[name] = table
        return table

    def _param(self, value: Any, table: TargetTable, column: str) -> Any:
        """A JSON value turned into a query parameter for ``table.column`` (lookups resolved)."""
        ctype = table.type_of(column)
        lookup = _special(value, "$lookup")
        if lookup is not None:
            return self._lookup(lookup)
        if _special(value, "$allocate") is not None:
            raise CommandError(f"$allocate is only allowed in values, not for {column}")
        if _is_special(value, "$init"):
            raise CommandError(f"$init is only allowed in values (as a whole value), not for {column}")
        if _is_special(value, "$in"):
            raise CommandError(f"$in is only allowed in the match of an update/delete, not for {column}")
        if value is None:
            return None
        if ctype in ("json", "jsonb"):
            return Jsonb(value)
        return _decode_bytes(value)

    def _match_param(self, value: Any, table: TargetTable, column: str) -> Any:
        """A match value as a query parameter; ``{"$in": [...]}`` becomes an :class:`q.InList`."""
        if not _is_special(value, "$in"):
            return self._param(value, table, column)
        spec = value["$in"]
        if not isinstance(spec, list):
            raise CommandError(f"$in for {column} must be a list, got {type(spec).__name__}")
        return q.InList(tuple(self._param(v, table, column) for v in spec))

    def _init_value(self, table: TargetTable, column: str, value: Any) -> dict[str, Any]:
        """The column(s) an ``$init`` value writes on insert (an ``$allocate`` allocates only now)."""
        spec = _special(value, "$allocate")
        if spec is not None:
            return self._allocate(table, column, spec)
        return {column: self._param(value, table, column)}

    def _lookup(self, spec: Any) -> q.Computed:
        """A ``$lookup``, found by the statement that uses it (no round trip): ``archsync_one``
        (q.GUARD_DDL) raises, naming the lookup, unless exactly one row matches."""
        if not isinstance(spec, dict) or not {"table", "column", "where"} <= spec.keys() or not spec["where"]:
            raise CommandError(f"malformed $lookup {spec!r}: expected table, column and a non-empty where")
        table = self._table(str(spec["table"]))
        column = str(spec["column"])
        if table.type_of(column).endswith("]"):
            raise CommandError(f"$lookup of {table.name}.{column}: an array column cannot be looked up")
        where = {c: self._param(v, table, c) for c, v in spec["where"].items()}
        described = orjson.dumps(spec["where"], option=orjson.OPT_SORT_KEYS, default=json_default).decode()
        shape = ("lookup", table.name, column, q.shape(where))
        text = self._cached(
            shape,
            lambda: sql.SQL("archsync_one(ARRAY(SELECT {} FROM {} WHERE {} LIMIT 2), %s::text)").format(
                sql.Identifier(column), table.ident, self._where(table, where)
            ),
        )
        what = f"$lookup {table.name}.{column} where {described}"
        return q.Computed(shape, sql.SQL(text.decode()), (*self._where_params(where), what))

    def _allocate(self, table: TargetTable, column: str, spec: Any) -> dict[str, Any]:
        """A new gap-free archival code (and item/volume numbers) for ``table.column``, the numbers
        drawn by the statement that writes the row (no round trip). A volume holds
        ``items_per_volume`` items (9,999 at most, the default); a full one opens the next."""
        if not isinstance(spec, dict) or not {"class", "year", "retention"} <= spec.keys():
            raise CommandError(f"malformed $allocate {spec!r}: expected fonds, class, year and retention")
        fonds = spec.get("fonds") or None
        try:
            year = int(spec["year"])
        except (TypeError, ValueError):
            raise CommandError(f"$allocate year {spec['year']!r} is not an integer") from None
        per_volume = spec.get("items_per_volume", domain.MAX_CODE_NUMBER)
        if type(per_volume) is not int or not 1 <= per_volume <= domain.MAX_CODE_NUMBER:
            raise CommandError(
                f"$allocate items_per_volume {per_volume!r} is not an integer from 1 to {domain.MAX_CODE_NUMBER}"
            )
        number = q.NextItemNo(f"next_{column}", (fonds, str(spec["class"]), year, per_volume))
        prefix = q.archival_code_prefix(fonds, str(spec["class"]), year, str(spec["retention"]))
        code = sql.SQL(q.CODE_SQL).format(number.volume(), number.item())
        result: dict[str, Any] = {column: q.Computed(("code", number.alias), code, (prefix,), number)}
        if "item_no" in table.columns:
            result["item_no"] = q.Computed(("item", number.alias), number.item(), (), number)
        if "volume_no" in table.columns:
            result["volume_no"] = q.Computed(("volume", number.alias), number.volume(), (), number)
        return result

    def _where(self, table: TargetTable, match: Mapping[str, Any]) -> sql.Composed:
        return sql.SQL(" AND ").join(self._condition(table, c, v) for c, v in match.items())

    @staticmethod
    def _condition(table: TargetTable, column: str, value: Any) -> sql.Composable:
        ident = sql.Identifier(column)
        if value is None:
            return sql.SQL("{} IS NULL").format(ident)
        if isinstance(value, q.Computed):
            return sql.SQL("{} = {}").format(ident, value.text)
        cast = sql.SQL("%s::{}").format(sql.SQL(table.type_of(column)))
        if not isinstance(value, q.InList):
            return sql.SQL("{} = {}").format(ident, cast)
        terms: list[sql.Composable] = []
        listed = [v for v in value.values if v is not None]
        if listed:
            terms.append(sql.SQL("{} IN ({})").format(ident, sql.SQL(", ").join([cast] * len(listed))))
        if len(listed) < len(value.values):
            terms.append(sql.SQL("{} IS NULL").format(ident))
        if not terms:
            return sql.SQL("false")  # an empty list matches no row
        return sql.SQL("({})").format(sql.SQL(" OR ").join(terms))

    @staticmethod
    def _where_params(match: Mapping[str, Any]) -> Iterable[Any]:
        for v in match.values():
            if isinstance(v, q.InList):
                yield from (x for x in v.values if x is not None)
            elif isinstance(v, q.Computed):
                yield from v.params
            elif v is not None:
                yield v

    def _current(
        self, table: TargetTable, match: dict[str, Any], plain: dict[str, Any], read_only: list[str]
    ) -> list[tuple[dict[str, Any], dict[str, bool]]]:
        """The matched rows, locked: (current values, does the incoming value differ) per column."""

        def build() -> sql.Composable:
            select: list[sql.Composable] = [sql.SQL("1")]
            for col, value in plain.items():
                select.append(sql.SQL("{}, {}").format(sql.Identifier(col), q.differs(table, col, value)))
            select.extend(sql.Identifier(c) for c in read_only)
            return sql.SQL("SELECT {} FROM {} WHERE {} FOR UPDATE").format(
                sql.SQL(", ").join(select), table.ident, self._where(table, match)
            )

        query = self._statement(("current", table.name, q.value_shape(plain), tuple(read_only), q.shape(match)), build)
        rows = self._execute(query, [*q.value_params(plain.values()), *self._where_params(match)]).fetchall()
        out: list[tuple[dict[str, Any], dict[str, bool]]] = []
        for r in rows:
            values: dict[str, Any] = {}
            differs: dict[str, bool] = {}
            i = 1
            for col in plain:
                values[col], differs[col] = r[i], bool(r[i + 1])
                i += 2
            for col in read_only:
                values[col] = r[i]
                i += 1
            out.append((values, differs))
        return out

    def _guards(self, table: str, key: str) -> dict[str, _Guard]:
        rows = self.conn.execute(
            "SELECT source_system, source_commit_lsn, source_order, source_commit_ts_ms, command_id"
            " FROM archsync_apply_guard WHERE target_table = %s AND target_key = %s FOR UPDATE",
            (table, key),
        ).fetchall()
        return {r[0]: _Guard(r[0], r[1], r[2], r[3], r[4]) for r in rows}

    def _guarded_rows(self, commands: list[ApplyCommand]) -> set[tuple[str, str]]:
        """(``schema.table``, guard key) of every target row the batch writes through a guard;
        each command's key is kept for :meth:`_apply_one` (computed once per batch)."""
        rows: set[tuple[str, str]] = set()
        for cmd in commands:
            if cmd.action != "insert_once" and cmd.match:
                key = self._keys[id(cmd)] = target_key(cmd.match)
                rows.add(("{}.{}".format(*qualified(cmd.table)), key))
        return rows

    def _lock_rows(self, rows: set[tuple[str, str]]) -> None:
        """Take a transaction-level advisory lock per target row of the batch, in one statement and
        in a fixed order. Two appliers may briefly apply the same commands (a worker that lost its
        partitions in a rebalance finishing its batch while the new owner starts): the second then
        waits for the first to commit and finds its guard (a replay) instead of racing it to
        insert the same new row. The guard rows cannot do this: a new row has none yet."""
        keys = sorted(f"{table} {key}" for table, key in rows)
        if keys:
            self.conn.execute(
                "SELECT count(pg_advisory_xact_lock(h)) FROM (SELECT DISTINCT hashtextextended(k, 7314) AS h"
                " FROM jsonb_array_elements_text(%s::jsonb) k ORDER BY 1) s",
                (_json_param(keys),),
            )

    def _prefetch_guards(self, rows: set[tuple[str, str]]) -> dict[tuple[str, str], dict[str, _Guard]]:
        """The guard rows of every target row the batch touches, read (and locked) in one query."""
        out: dict[tuple[str, str], dict[str, _Guard]] = {}
        if not rows:
            return out
        found = self.conn.execute(
            "SELECT g.target_table, g.target_key, g.source_system, g.source_commit_lsn, g.source_order,"
            " g.source_commit_ts_ms, g.command_id FROM archsync_apply_guard g"
            " JOIN (SELECT e->>0 AS t, e->>1 AS k FROM jsonb_array_elements(%s::jsonb) e) k"
            " ON g.target_table = k.t AND g.target_key = k.k FOR UPDATE OF g",
            (_json_param(list(rows)),),
        ).fetchall()
        for r in found:
            out.setdefault((r[0], r[1]), {})[r[2]] = _Guard(r[2], r[3], r[4], r[5], r[6])
        return out

    def _flush_guards(self) -> None:
        """Write the batch's guard rows in one statement (the last command per row wins)."""
        if not self._pending_guards:
            return
        self.conn.execute(
            "INSERT INTO archsync_apply_guard (target_table, target_key, source_system, source_commit_lsn,"
            " source_order, source_commit_ts_ms, command_id, deleted, applied_at)"
            " SELECT e->>0, e->>1, e->>2, (e->>3)::bigint, (e->>4)::bigint, (e->>5)::bigint, e->>6,"
            " (e->>7)::boolean, now() FROM jsonb_array_elements(%s::jsonb) e" + q.GUARD_UPSERT,
            (_json_param(list(self._pending_guards.values())),),
        )

    def _save_guard(self, cmd: ApplyCommand, table: str, key: str, *, deleted: bool) -> None:
        row = (
            table,
            key,
            cmd.source_system,
            cmd.source_commit_lsn,
            cmd.source_order,
            cmd.source_commit_ts_ms,
            cmd.command_id,
            deleted,
        )
        if self._fast:
            self._pending_guards[(table, key, cmd.source_system)] = row
            self._batch_guards.setdefault((table, key), {})[cmd.source_system] = _Guard(
                cmd.source_system, cmd.source_commit_lsn, cmd.source_order, cmd.source_commit_ts_ms, cmd.command_id
            )
            return
        self.conn.execute(
            "INSERT INTO archsync_apply_guard (target_table, target_key, source_system, source_commit_lsn,"
            " source_order, source_commit_ts_ms, command_id, deleted, applied_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now())" + q.GUARD_UPSERT,
            row,
        )


def echo_changes(result: ApplyResult, system: str, origin: str) -> list[Change]:
    """The rows ``echo`` commands wrote, as changes of ``system`` for its flows to see.

    Their position is the target's WAL position read just before the batch committed, with the
    echo's index as the order: a later real change of the same row commits above it, so the
    transform state keeps the newer one. The capture never sends these rows (they are archsync's
    own writes), so an echo is the only way the target's flows learn what the applier wrote."""
    if not result.echoes or result.echo_lsn is None:
        return []
    # the commit time as far as it is known: before the commit, so before any later change of the
    # rows (a worker's clock read after the commit could be later than a clerk's next change)
    ts_ms = result.echo_ts_ms if result.echo_ts_ms is not None else int(time.time() * 1000)
    return [
        Change(
            event_id=f"{system}:echo:{result.echo_lsn}:{i}",
            system=system,
            table=echo.table,
            op=echo.op,
            key=echo.key,
            before=None,
            after=echo.row,
            commit_lsn=result.echo_lsn,
            order=i,
            commit_ts_ms=ts_ms,
            origin=origin,
        )
        for i, echo in enumerate(result.echoes)
    ]


def _is_special(value: Any, key: str) -> bool:
    return isinstance(value, dict) and len(value) == 1 and key in value


def _json_param(rows: list[Any]) -> str:
    """A batch's keys or guard rows as one JSON text parameter (unpacked by jsonb functions in the
    statement): psycopg dumps array parameters element by element in Python, which took 13% of the
    applier's time (py-spy, bench_applier) for the three per-batch statements."""
    return orjson.dumps(rows).decode()


def _newer_than(guard: _Guard, cmd: ApplyCommand) -> bool:
    """Did another system write the row at a later commit time than ``cmd``? (LSNs of different
    systems are not comparable; without both timestamps the incoming command wins.)"""
    return guard.ts_ms is not None and cmd.source_commit_ts_ms is not None and guard.ts_ms > cmd.source_commit_ts_ms
