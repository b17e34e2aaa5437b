"""Reconciliation: do the target databases hold what the topology's flows say they should?

For every aggregate of every source (``form`` in OA, ``item`` in the archive…):

1. the source rows are streamed with server-side cursors inside one REPEATABLE READ snapshot,
   root and member tables merged by the aggregate key (never a whole table in memory);
2. each aggregate instance becomes a synthesized :class:`~processors.transform.AggregateState`
   (every row as a snapshot change), and the topology's flows run on it through
   :func:`processors.transform.transform`: the apply commands it yields are what the target
   should contain (notify-only flows and OA to-do rows are left out);
3. each expected command is checked against the target: ``upsert`` → the row exists with those
   values, ``update`` → the matched rows have them (a guarded ``one_of`` match that matches
   nothing is fine), ``insert_once`` → a row matching exists, ``delete`` → none does. Values are
   compared after PostgreSQL casts the expected value to the column's type, so ``1234.5`` and
   ``1234.50`` agree. ``$init`` values (written only on insert) and the columns named in
   ``reconcile.ignore`` are not compared;
4. a checksum of the expected and of the found values is kept per aggregate; an aggregate whose
   two checksums differ has drifted, and each differing field is reported.

``repair=True`` re-emits every expected command of a drifted aggregate to the apply topic, so the
normal apply agent fixes it. A repair command carries the source position
``(pg_current_wal_lsn() read before the snapshot, n)``: newer than every change the snapshot
contains, so the applier's per-row guard lets it win over what was applied before, and older than
any change committed after the snapshot, so a real later change still wins over the repair. Its
command id is new (``repair:<run>:<original id>``), so it is not mistaken for a replay.

Each run is recorded in ``archsync_reconcile_run`` in both databases (``archsync status`` shows
the last one) and in the metrics ``archsync_reconcile_*``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from archsync import metrics
from archsync.errors import ArchsyncError
from archsync.settings import Settings
from connectors.pgoutput import lsn_to_str, str_to_lsn
from connectors.postgres import connect
from processors.model import ApplyCommand, Change, json_default, to_jsonable
from processors.transform import AggregateState, apply_change, new_state, transform
from topology.flows import Aggregate, Flow
from topology.model import Topology

log = logging.getLogger(__name__)

RUN_DDL = """
CREATE TABLE IF NOT EXISTS archsync_reconcile_run (
  run_id          text        PRIMARY KEY,
  prefix          text        NOT NULL,
  topology        text        NOT NULL,
  started_at      timestamptz NOT NULL,
  finished_at     timestamptz NOT NULL DEFAULT now(),
  result          text        NOT NULL,
  aggregates      bigint      NOT NULL,
  drifted         bigint      NOT NULL,
  repaired        bigint      NOT NULL,
  detail          jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS archsync_reconcile_run_prefix_idx ON archsync_reconcile_run (prefix, finished_at);
COMMENT ON TABLE archsync_reconcile_run IS 'archsync reconcile: one row per run (archsync status shows the last)';
"""

FETCH_ROWS = 2000


class ReconcileError(ArchsyncError):
    """The reconciliation cannot run (unknown flow, database trouble)."""


@dataclass(frozen=True)
class Drift:
    """One field (or row) of a target that differs from what the source says."""

    aggregate: str  # "<aggregate>:<key>" in the source
    source: str
    target: str
    flow: str
    table: str
    match: Mapping[str, Any]
    column: str  # "<row>" for a missing / unexpected row
    expected: Any
    actual: Any

    def describe(self) -> str:
        where = orjson.dumps(self.match, option=orjson.OPT_SORT_KEYS, default=json_default).decode()
        what = orjson.dumps(self.expected, default=json_default).decode()
        found = orjson.dumps(self.actual, default=json_default).decode()
        return (
            f"{self.aggregate} ({self.source} -> {self.target}, flow {self.flow}) {self.table} {where} "
            f"{self.column}: expected {what}, found {found}"
        )


@dataclass
class ReconcileReport:
    run_id: str
    started: float
    aggregates: dict[tuple[str, str], int] = field(default_factory=dict)  # (source, target) → checked
    drifted: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (source, target) → aggregates
    drifts: list[Drift] = field(default_factory=list)
    unmappable: list[str] = field(default_factory=list)  # aggregates whose flows failed (dead-letter cases)
    repaired: int = 0  # commands re-emitted
    finished: float = 0.0

    @property
    def drift_count(self) -> int:
        return len({a for s in self.drifted.values() for a in s})

    @property
    def checked(self) -> int:
        return sum(self.aggregates.values())

    @property
    def result(self) -> str:
        return "drift" if self.drift_count else "ok"


# ------------------------------------------------------------------------------ source side


def _columns(conn: psycopg.Connection[Any], table: str) -> dict[str, str]:
    """Column → type of a table, without generated columns (the capture does not send them)."""
    schema, _, name = table.partition(".")
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a"
        " JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " AND a.attgenerated = '' ORDER BY a.attnum",
        (schema, name),
    ).fetchall()
    if not rows:
        raise ReconcileError(f"table {table} does not exist")
    return {r[0]: r[1] for r in rows}


def _primary_key(conn: psycopg.Connection[Any], table: str) -> list[str]:
    rows = conn.execute(
        "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
        " WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey, a.attnum)",
        (table,),
    ).fetchall()
    if not rows:
        raise ReconcileError(f"table {table} has no primary key")
    return [r[0] for r in rows]


def _order(column: str, ctype: str) -> sql.Composable:
    ident = sql.Identifier(column)
    textual = ctype.startswith(("text", "character", "varchar"))
    return sql.SQL('{} COLLATE "C"').format(ident) if textual else ident


class _Cursor:
    """A server-side cursor over one table ordered by (group column, primary key), with peek."""

    def __init__(
        self, conn: psycopg.Connection[Any], table: str, group: str, only: list[Any] | None, name: str
    ) -> None:
        cols = _columns(conn, table)
        pk = _primary_key(conn, table)
        self.pk = pk
        self.table = table
        self.group = group
        where = sql.SQL("{} IS NOT NULL").format(sql.Identifier(group))
        params: list[Any] = []
        if only is not None:
            where = sql.SQL("{} = ANY(%s::{}[])").format(sql.Identifier(group), sql.SQL(cols[group]))
            params.append([str(k) for k in only])
        order = [_order(group, cols[group]), *(_order(c, cols[c]) for c in pk if c != group)]
        query = sql.SQL("SELECT {} FROM {} WHERE {} ORDER BY {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in cols),
            sql.Identifier(*table.split(".", 1)),
            where,
            sql.SQL(", ").join(order),
        )
        self.cur = conn.cursor(name=name, row_factory=dict_row)
        self.cur.itersize = FETCH_ROWS
        self.cur.execute(query, params)
        self.rows: Iterator[dict[str, Any]] = iter(self.cur)
        self.head: dict[str, Any] | None = next(self.rows, None)

    def take(self, key: Any) -> list[dict[str, Any]]:
        """The rows whose group column equals ``key`` (skipping smaller ones: orphans)."""
        out: list[dict[str, Any]] = []
        while self.head is not None and _less(self.head[self.group], key):
            self.head = next(self.rows, None)
        while self.head is not None and self.head[self.group] == key:
            out.append(self.head)
            self.head = next(self.rows, None)
        return out


def _less(a: Any, b: Any) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return a.encode() < b.encode()
    return bool(a < b)


def stream_aggregates(
    conn: psycopg.Connection[Any], agg: Aggregate, only: list[Any] | None = None
) -> Iterator[tuple[Any, dict[str, list[dict[str, Any]]]]]:
    """(root key, {table: rows}) of every instance of ``agg``, in key order (server-side cursors;
    the caller holds the snapshot transaction)."""
    tag = uuid.uuid4().hex[:8]
    root = _Cursor(conn, agg.root, agg.key, only, f"rc_{tag}_root")
    members = {
        table: _Cursor(conn, table, fk, only, f"rc_{tag}_m{i}") for i, (table, fk) in enumerate(agg.members.items())
    }
    while root.head is not None:
        row = root.head
        root.head = next(root.rows, None)
        key = row[agg.key]
        rows = {agg.root: [row], **{t: c.take(key) for t, c in members.items()}}
        yield key, rows


def synthesize(
    agg: Aggregate, rows: Mapping[str, list[dict[str, Any]]], system: str, lsn: int, pks: Mapping[str, list[str]]
) -> tuple[AggregateState, list[Change]]:
    """An aggregate state holding ``rows`` (as snapshot changes), and those changes (root first)."""
    state = new_state()
    changes: list[Change] = []
    order = 0
    for table in (agg.root, *agg.members):
        for raw in rows.get(table, []):
            row = to_jsonable(raw)
            key = {c: row.get(c) for c in pks[table]}
            order += 1
            change = Change(
                event_id=f"reconcile:{system}:{table}:{orjson.dumps(key, default=json_default).decode()}",
                system=system,
                table=table,
                op="r",
                key=key,
                before=None,
                after=row,
                commit_lsn=lsn,
                order=order,
                commit_ts_ms=None,
                snapshot=True,
            )
            apply_change(state, change)
            changes.append(change)
    return state, changes


def _command_topologies(topology: Topology, flows: set[str] | None) -> tuple[Topology, Topology]:
    """Views of the topology for the synthesized changes: flows that take snapshot rows (op r),
    and flows that only take inserts (op c, e.g. an approval REVOKE record); without notify /
    release actions (those are not target state)."""

    def keep(f: Flow) -> bool:
        return f.command is not None and (flows is None or f.name in flows)

    bare = [dataclasses.replace(f, notify=None, release=()) for f in topology.flows if keep(f)]
    on_r = tuple(f for f in bare if "r" in f.ops)
    on_c = tuple(dataclasses.replace(f, ops=frozenset({"r"})) for f in bare if "r" not in f.ops and "c" in f.ops)
    return dataclasses.replace(topology, flows=on_r), dataclasses.replace(topology, flows=on_c)


def expected_commands(
    topology: Topology, views: tuple[Topology, Topology], state: AggregateState, changes: list[Change]
) -> tuple[list[ApplyCommand], list[str]]:
    """The commands the flows give for a synthesized aggregate (deduplicated by target row, in
    order), and the reasons of flows that could not be evaluated."""
    out: dict[tuple[str, str, str], ApplyCommand] = {}
    problems: list[str] = []
    for change in changes:
        for view in views:
            if not view.flows:
                continue
            result = transform(view, state, change)
            problems.extend(reason for reason, _ in result.rejected)
            for cmd in result.commands:
                key = (cmd.target_system, cmd.table, _canonical(cmd.match))
                if key in out:
                    merged = {**out[key].values, **cmd.values}
                    out[key] = dataclasses.replace(out[key], values=merged)
                else:
                    out[key] = cmd
    return list(out.values()), problems


def _canonical(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=json_default).decode()


# ------------------------------------------------------------------------------ target side


def _special(value: Any, name: str) -> Any:
    if isinstance(value, dict) and len(value) == 1 and name in value:
        return value[name]
    return None


class TargetChecker:
    """Compares expected commands with one target database (a read-only snapshot)."""

    def __init__(self, conn: psycopg.Connection[Any], ignore: Mapping[str, frozenset[str]]) -> None:
        self.conn = conn
        self.ignore = ignore
        self._types: dict[str, dict[str, str]] = {}

    def types(self, table: str) -> dict[str, str]:
        if table not in self._types:
            self._types[table] = _columns(self.conn, table)
        return self._types[table]

    def _value(self, table: str, column: str, value: Any) -> tuple[sql.Composable, list[Any]]:
        """SQL for an expected value cast to ``table.column``'s type (a $lookup as a subquery)."""
        lookup = _special(value, "$lookup")
        if lookup is not None:
            where, params = self._where(str(lookup["table"]), lookup["where"])
            return (
                sql.SQL("(SELECT {} FROM {} WHERE {} LIMIT 1)").format(
                    sql.Identifier(str(lookup["column"])), sql.Identifier(*str(lookup["table"]).split(".", 1)), where
                ),
                params,
            )
        ctype = self.types(table).get(column)
        if ctype is None:
            raise ReconcileError(f"column {column!r} does not exist in {table}")
        if ctype in ("json", "jsonb"):
            return sql.SQL("%s::jsonb"), [None if value is None else Jsonb(value)]
        spec = _special(value, "$bytes")
        if spec is not None:
            import base64

            value = base64.b64decode(spec)
        return sql.SQL("%s::{}").format(sql.SQL(ctype)), [value]

    def _where(self, table: str, match: Mapping[str, Any]) -> tuple[sql.Composable, list[Any]]:
        parts: list[sql.Composable] = []
        params: list[Any] = []
        for col, value in match.items():
            ident = sql.Identifier(col)
            listed = _special(value, "$in")
            if listed is not None:
                terms = []
                for v in listed:
                    s, p = self._value(table, col, v)
                    terms.append(
                        sql.SQL("{} = {}").format(ident, s) if v is not None else sql.SQL("{} IS NULL").format(ident)
                    )
                    params.extend(p if v is not None else [])
                parts.append(sql.SQL("({})").format(sql.SQL(" OR ").join(terms)) if terms else sql.SQL("false"))
            elif value is None:
                parts.append(sql.SQL("{} IS NULL").format(ident))
            else:
                s, p = self._value(table, col, value)
                parts.append(sql.SQL("{} = {}").format(ident, s))
                params.extend(p)
        return sql.SQL(" AND ").join(parts), params

    def compared_values(self, cmd: ApplyCommand, target: str) -> dict[str, Any]:
        skip = self.ignore.get(f"{target}.{cmd.table}", frozenset())
        out: dict[str, Any] = {}
        for col, value in cmd.values.items():
            if col in skip or _special(value, "$init") is not None or _special(value, "$allocate") is not None:
                continue
            if col in cmd.match and cmd.match[col] == value:
                continue
            out[col] = value
        return out

    def check(self, cmd: ApplyCommand) -> tuple[list[tuple[str, Any, Any]], list[Any], list[Any]]:
        """(differences as (column, expected, found), expected digest parts, found digest parts)."""
        table = cmd.table
        values = self.compared_values(cmd, cmd.target_system) if cmd.action in ("upsert", "update") else {}
        select: list[sql.Composable] = [sql.SQL("1")]
        params: list[Any] = []
        cols = list(values)
        for col in cols:
            s, p = self._value(table, col, values[col])
            ident = sql.Identifier(col)
            if self.types(table).get(col) == "json":
                select.append(sql.SQL("{}::jsonb").format(ident))
            else:
                select.append(ident)
            select.append(s)
            params.extend(p)
        where, wparams = self._where(table, cmd.match)
        query = sql.SQL("SELECT {} FROM {} WHERE {} LIMIT 2").format(
            sql.SQL(", ").join(select), sql.Identifier(*table.split(".", 1)), where
        )
        rows = self.conn.execute(query, [*params, *wparams]).fetchall()
        key = _canonical(cmd.match)
        diffs: list[tuple[str, Any, Any]] = []
        expected: list[Any] = []
        found: list[Any] = []
        if cmd.action == "delete":
            expected.append([table, key, "<absent>"])
            found.append([table, key, "<absent>" if not rows else "<present>"])
            if rows:
                diffs.append(("<row>", "absent", "present"))
            return diffs, expected, found
        if not rows:
            if cmd.action == "update":
                return [], [], []  # nothing matches (e.g. a one_of guard): nothing to do
            expected.append([table, key, "<present>"])
            found.append([table, key, "<absent>"])
            return [("<row>", "present", "absent")], expected, found
        expected.append([table, key, "<present>"])
        found.append([table, key, "<present>"])
        row = rows[0]
        for i, col in enumerate(cols):
            have, want = to_jsonable(row[1 + 2 * i]), to_jsonable(row[2 + 2 * i])
            expected.append([table, key, col, want])
            found.append([table, key, col, have])
            if have != want:
                diffs.append((col, want, have))
        return diffs, expected, found


def digest(parts: list[Any]) -> str:
    return hashlib.sha256(orjson.dumps(parts, default=json_default, option=orjson.OPT_SORT_KEYS)).hexdigest()


# ------------------------------------------------------------------------------ run


def _open(topology: Topology, settings: Settings, system: str) -> psycopg.Connection[Any]:
    """A read-only REPEATABLE READ connection (its snapshot starts with the first statement)."""
    source = topology.source(system)
    conn = connect(source.dsn(settings), source.dsn_env)
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


CONFIRM_SECONDS = 2.0  # drift found while changes are in flight is checked again after this


def reconcile(
    topology: Topology,
    settings: Settings,
    *,
    repair: bool = False,
    flows: list[str] | None = None,
    only: Mapping[str, list[Any]] | None = None,
    on_drift: Callable[[Drift], None] | None = None,
    progress: Callable[[int], None] | None = None,
    record: bool = True,
    confirm_seconds: float = CONFIRM_SECONDS,
) -> ReconcileReport:
    """Compare every mapped aggregate of both databases; optionally re-emit commands for drift.

    ``flows`` limits the check to those flows (and their aggregates); ``only`` to some aggregate
    keys (``{"form": [1, 2]}``). Aggregates that drift in the first pass are read again (fresh
    snapshots) after ``confirm_seconds``, so changes still in flight are not reported; only drift
    seen twice counts (and is repaired). ``on_drift`` sees each confirmed drift.
    """
    known = {f.name for f in topology.flows if f.command is not None}
    wanted = set(flows) if flows else None
    if wanted and wanted - known:
        raise ReconcileError(f"unknown flow(s) {', '.join(sorted(wanted - known))} (flows: {', '.join(sorted(known))})")
    if only:
        unknown = set(only) - set(topology.aggregates)
        if unknown:
            raise ReconcileError(f"unknown aggregate(s) {', '.join(sorted(unknown))}")
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    report = ReconcileReport(run_id=run_id, started=time.time())
    first = _pass(topology, settings, wanted, only, progress)
    report.aggregates = first.aggregates
    report.unmappable = first.unmappable
    suspects: dict[str, list[Any]] = {}
    for labels in first.drifted.values():
        for label in labels:
            agg, _, key = label.partition(":")
            suspects.setdefault(agg, []).append(key)
    if suspects:
        time.sleep(confirm_seconds)
        second = _pass(topology, settings, wanted, suspects, None, repair_run=run_id if repair else None)
        confirmed = {a for v in first.drifted.values() for a in v} & {a for v in second.drifted.values() for a in v}
        report.drifted = {pair: labels & confirmed for pair, labels in second.drifted.items() if labels & confirmed}
        report.drifts = [d for d in second.drifts if d.aggregate in confirmed]
        report.repaired = second.repaired
        for d in report.drifts:
            if on_drift is not None:
                on_drift(d)
    report.finished = time.time()
    _metrics(topology, report)
    if record:
        record_run(topology, settings, report, wanted)
    return report


def _pass(
    topology: Topology,
    settings: Settings,
    wanted: set[str] | None,
    only: Mapping[str, list[Any]] | None,
    progress: Callable[[int], None] | None,
    repair_run: str | None = None,
) -> ReconcileReport:
    """One comparison of (some of) the aggregates; with ``repair_run``, drifted aggregates get
    their commands re-emitted."""
    report = ReconcileReport(run_id=repair_run or "", started=time.time())
    views = _command_topologies(topology, wanted)
    ignore = _ignored(topology)
    relevant = {f.aggregate for v in views for f in v.flows}
    producer = None
    for agg in topology.aggregates.values():
        if agg.name not in relevant or (only is not None and agg.name not in only):
            continue
        src = _open(topology, settings, agg.source)
        targets: dict[str, psycopg.Connection[Any]] = {}
        try:
            row = src.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            lsn = str_to_lsn(row[0]) if row else 0
            src.commit()  # the snapshot below starts after the position was read
            pks = {t: _primary_key(src, t) for t in agg.tables}
            # the targets' snapshots start after the source's: what the source had is applied or in flight
            targets = {name: _open(topology, settings, name) for name in topology.sources}
            checkers = {name: TargetChecker(conn, ignore) for name, conn in targets.items()}
            for key, rows in stream_aggregates(src, agg, list(only[agg.name]) if only else None):
                state, changes = synthesize(agg, rows, agg.source, lsn, pks)
                commands, problems = expected_commands(topology, views, state, changes)
                label = f"{agg.name}:{key}"
                if problems:
                    report.unmappable.append(f"{label}: {problems[0]}")
                drifted = _check_aggregate(label, agg.source, commands, checkers, report)
                if drifted and repair_run is not None:
                    producer = producer or _producer(settings)
                    report.repaired += _repair(topology, producer, repair_run, commands, lsn)
                if progress is not None:
                    progress(1)
        finally:
            src.close()
            for conn in targets.values():
                conn.close()
    if producer is not None and producer.flush(60):
        raise ReconcileError("the broker did not acknowledge every repair command")
    return report


def _ignored(topology: Topology) -> dict[str, frozenset[str]]:
    ops = topology.operations
    raw = (ops.raw.get("reconcile") or {}).get("ignore") if ops else None
    return {str(t): frozenset(map(str, cols)) for t, cols in (raw or {}).items()}


def _check_aggregate(
    label: str,
    source: str,
    commands: list[ApplyCommand],
    checkers: Mapping[str, TargetChecker],
    report: ReconcileReport,
) -> bool:
    expected: dict[str, list[Any]] = {}
    found: dict[str, list[Any]] = {}
    drifts: list[Drift] = []
    for cmd in commands:
        if cmd.action == "insert_once" and not cmd.match:
            continue
        diffs, want, have = checkers[cmd.target_system].check(cmd)
        expected.setdefault(cmd.target_system, []).extend(want)
        found.setdefault(cmd.target_system, []).extend(have)
        for column, e, a in diffs:
            drifts.append(Drift(label, source, cmd.target_system, cmd.flow, cmd.table, cmd.match, column, e, a))
    for target in expected:
        pair = (source, target)
        report.aggregates[pair] = report.aggregates.get(pair, 0) + 1
        if digest(expected[target]) != digest(found[target]):
            report.drifted.setdefault(pair, set()).add(label)
    report.drifts.extend(drifts)
    return bool(drifts)


def _producer(settings: Settings) -> Any:
    from confluent_kafka import Producer

    return Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
        }
    )


def repair_commands(run_id: str, commands: list[ApplyCommand], lsn: int) -> list[ApplyCommand]:
    """The expected commands of a drifted aggregate as repair commands (new ids, the snapshot's
    source position, one source transaction)."""
    now_ms = int(time.time() * 1000)
    return [
        dataclasses.replace(
            cmd,
            command_id=f"repair:{run_id}:{cmd.command_id}",
            source_event_id=f"reconcile:{run_id}",
            source_commit_lsn=lsn,
            source_order=n,
            source_commit_ts_ms=now_ms,
            txn_id=f"reconcile:{run_id}:{lsn_to_str(lsn)}",
        )
        for n, cmd in enumerate(commands)
    ]


def _repair(topology: Topology, producer: Any, run_id: str, commands: list[ApplyCommand], lsn: int) -> int:
    prefix = topology.topics.prefix
    count = 0
    for cmd in repair_commands(run_id, commands, lsn):
        while True:
            try:
                producer.produce(f"{prefix}.apply.{cmd.target_system}", cmd.to_json(), cmd.aggregate_key.encode())
                break
            except BufferError:
                producer.poll(0.2)
        count += 1
    producer.poll(0)
    return count


def _metrics(topology: Topology, report: ReconcileReport) -> None:
    for source in topology.sources:
        for target in topology.sources:
            if (source, target) in report.aggregates:
                metrics.RECONCILE_DRIFT.labels(source, target).set(len(report.drifted.get((source, target), ())))
    metrics.RECONCILE_LAST_RUN.set(report.finished)
    metrics.RECONCILE_RUNS.labels(report.result).inc()


# ------------------------------------------------------------------------------ run records


def record_run(topology: Topology, settings: Settings, report: ReconcileReport, flows: set[str] | None = None) -> None:
    """Write the run into ``archsync_reconcile_run`` of every source database."""
    detail = {
        "pairs": {
            f"{s}->{t}": {"aggregates": n, "drifted": len(report.drifted.get((s, t), ()))}
            for (s, t), n in report.aggregates.items()
        },
        "drifted": sorted({a for v in report.drifted.values() for a in v})[:100],
        "unmappable": len(report.unmappable),
        "flows": sorted(flows) if flows else None,
        "seconds": round(report.finished - report.started, 3),
    }
    for source in topology.sources.values():
        try:
            with connect(source.dsn(settings), source.dsn_env, autocommit=True) as conn:
                conn.execute(RUN_DDL)
                conn.execute(
                    "INSERT INTO archsync_reconcile_run (run_id, prefix, topology, started_at, finished_at, result,"
                    " aggregates, drifted, repaired, detail) VALUES (%s, %s, %s, to_timestamp(%s), to_timestamp(%s),"
                    " %s, %s, %s, %s, %s) ON CONFLICT (run_id) DO NOTHING",
                    (
                        report.run_id,
                        topology.topics.prefix,
                        topology.name,
                        report.started,
                        report.finished,
                        report.result,
                        report.checked,
                        report.drift_count,
                        report.repaired,
                        Jsonb(detail),
                    ),
                )
        except (psycopg.Error, ArchsyncError) as exc:
            log.warning("could not record the reconcile run in %s: %s", source.name, exc)


def last_run(topology: Topology, settings: Settings) -> str | None:
    """The last recorded run of this topology's prefix, one line (None when never run)."""
    for source in topology.sources.values():
        with connect(source.dsn(settings), source.dsn_env, autocommit=True) as conn:
            exists = conn.execute("SELECT to_regclass('archsync_reconcile_run') IS NOT NULL").fetchone()
            if not exists or not exists[0]:
                continue
            row = conn.execute(
                "SELECT finished_at, result, aggregates, drifted, repaired, run_id FROM archsync_reconcile_run"
                " WHERE prefix = %s ORDER BY finished_at DESC LIMIT 1",
                (topology.topics.prefix,),
            ).fetchone()
            if row:
                finished, result, checked, drifted, repaired, run_id = row
                return (
                    f"{finished:%Y-%m-%d %H:%M:%S}Z {result.upper()}: {checked} aggregates checked, "
                    f"{drifted} drifted, {repaired} repair commands (run {run_id})"
                )
    return None
