"""The pure transform: captured changes of an aggregate → apply commands (no Kafka, no database).

For each captured :class:`Change` the caller

1. finds the aggregate instance with :func:`aggregate_key_of` (the Kafka key to repartition by),
2. loads that instance's :class:`AggregateState` (a JSON-able record kept in a changelogged table),
3. calls :func:`transform`, which applies the change to the state (dropping duplicates by source
   position) and evaluates every matching flow of the topology,
4. publishes ``result.commands`` (in order: a parent command before its children), the
   ``result.conflicts``, and dead-letters ``result.rejected``; then saves the state.

Command semantics (for the applier):

``upsert``       update the one row matching ``match`` with ``values``, insert it when absent;
                 ``values`` include the match columns. A value ``{"$init": v}`` is written only
                 when the row is inserted and left alone when it exists.
``update``       update the rows matching ``match`` with ``values``; 0 rows is fine (nothing to do).
``insert_once``  insert ``values`` (match columns included) unless a row matching ``match``
                 exists; never update (append-only tables, events).
``delete``       delete the rows matching ``match``.

Special values: ``{"$lookup": ...}`` and ``{"$allocate": ...}`` (see processors/model.py),
``{"$init": v}`` (above) and, in ``match`` of update/delete only, ``{"$in": [v, ...]}``: the
column's value must be one of the list (e.g. cancel an item only while it is not filed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from processors.model import ApplyCommand, Change, Conflict, command_id, json_default, to_jsonable
from processors.notifications import NotificationError, flow_actions
from topology.expressions import ExpressionError
from topology.flows import Aggregate, CommandSpec, Flow, evaluate_value
from topology.model import Topology

MAX_COMMAND_BYTES = 1024 * 1024


@dataclass
class AggregateState:
    """What the transform remembers of one aggregate instance (JSON-able via to_dict/from_dict).

    ``rows`` holds the current rows of the root and member tables: ``{table: {key json: row}}``.
    ``positions`` maps ``"<table> <key json>"`` to the ``[commit_lsn, order]`` of the newest change
    applied to that row (kept after a delete, as a tombstone, so a replayed older change stays
    dropped). ``previous`` is the stored image of the row the last applied change replaced (None
    when new): the transform's ``before`` when the source sent no before image. ``fired`` maps a
    flow name to the position of the change that last fired it.
    """

    aggregate: str = ""
    key: Any = None
    rows: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    positions: dict[str, list[int]] = field(default_factory=dict)
    previous: dict[str, Any] | None = None
    fired: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        # shallow on purpose: the caller stores it at once (a deep copy per change was the
        # transform's biggest cost)
        return {
            "aggregate": self.aggregate,
            "key": self.key,
            "rows": self.rows,
            "positions": self.positions,
            "previous": self.previous,
            "fired": self.fired,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AggregateState:
        return cls(**dict(data))

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict(), default=json_default)

    @classmethod
    def from_json(cls, data: bytes | str) -> AggregateState:
        return cls.from_dict(orjson.loads(data))

    def table_rows(self, table: str) -> list[dict[str, Any]]:
        """A table's current rows, ordered by primary key."""
        rows = self.rows.get(table, {})
        return [rows[k] for k in sorted(rows, key=_key_order)]

    def root(self, root_table: str) -> dict[str, Any] | None:
        """The root row (an aggregate instance has one), or None when unknown or deleted."""
        rows = self.table_rows(root_table)
        return rows[0] if rows else None


@dataclass
class TransformResult:
    commands: list[ApplyCommand] = field(default_factory=list)
    conflicts: list[Conflict] = field(default_factory=list)
    rejected: list[tuple[str, Change]] = field(default_factory=list)  # (reason, change) → dead letter
    duplicate: bool = False  # the change was not newer than the state: dropped
    notifications: list[dict[str, Any]] = field(default_factory=list)  # notification.v1 records (notify:)
    releases: list[str] = field(default_factory=list)  # held flows a rule releases (release:)


class _Reject(Exception):
    """A command cannot be built; the change goes to the dead-letter topic with this reason."""


def _key_json(key: Mapping[str, Any]) -> str:
    return orjson.dumps(dict(key), option=orjson.OPT_SORT_KEYS, default=json_default).decode()


def _key_order(key_json: str) -> list[tuple[int, Any]]:
    values = orjson.loads(key_json).values()
    return [(0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, str(v)) for v in values]


def new_state(aggregate: str = "", key: Any = None) -> AggregateState:
    """An empty state (the aggregate and key are filled in by the first transform)."""
    return AggregateState(aggregate=aggregate, key=key)


def aggregate_key_of(topology: Topology, change: Change) -> tuple[str, Any] | None:
    """(aggregate name, root key value) of a change; None when its table is in no aggregate or
    the key cannot be known (e.g. a member row whose reference to the root is NULL)."""
    image = change.before if change.op == "d" else change.after
    image = image or change.before or {}
    for agg in topology.aggregates.values():
        if agg.source != change.system:
            continue
        if change.table == agg.root:
            value = image.get(agg.key, change.key.get(agg.key))
        elif change.table in agg.members:
            value = image.get(agg.members[change.table])
        else:
            continue
        return None if value is None else (agg.name, value)
    return None


def _slot(change: Change) -> tuple[str, str]:
    key_json = _key_json(change.key or {})
    return key_json, f"{change.table} {key_json}"


def apply_change(state: AggregateState, change: Change) -> bool:
    """Apply a change to the state; False (state untouched) when it is not newer than the row's
    stored position (a duplicate or a replay) or carries no row (truncate)."""
    if change.op == "t":
        return False
    key_json, slot = _slot(change)
    position = [change.commit_lsn, change.order]
    stored = state.positions.get(slot)
    if stored is not None and tuple(stored) >= tuple(position):
        return False
    table_rows = state.rows.setdefault(change.table, {})
    current = table_rows.get(key_json)
    if change.op == "d" or change.after is None:
        table_rows.pop(key_json, None)
    else:
        row = dict(change.after)
        for col in change.unchanged:  # unchanged TOAST values are not sent: keep what we know
            for known in (current, change.before):
                if known is not None and col in known:
                    row[col] = known[col]
                    break
        table_rows[key_json] = row
    state.previous = current
    state.positions[slot] = position
    return True


def duplicate_kind(state: AggregateState, change: Change) -> str:
    """Why :func:`apply_change` dropped a change: ``"event_id"`` when the row's state holds this
    very change (an event id is its source position: a capture or producer retry sent it again),
    ``"position"`` when the row holds a newer one (an older change replayed)."""
    _, slot = _slot(change)
    return "event_id" if state.positions.get(slot) == [change.commit_lsn, change.order] else "position"


def replayable(change: Change, state: AggregateState) -> Change:
    """The change as its transform dead letter keeps it: with the before image the transform saw
    (the stored row it replaced), so a replay after a fix evaluates ``changed()`` the same way."""
    if change.before is not None or change.op in ("c", "r") or state.previous is None:
        return change
    return replace(change, before=dict(state.previous))


def is_replay_of_latest(state: AggregateState, change: Change) -> bool:
    """A dead letter re-driven by ``archsync dlq replay`` whose row has not changed since: the state
    already holds it, and the flows run again. (A row changed since is superseded: not re-run.)"""
    _, slot = _slot(change)
    return change.replayed and state.positions.get(slot) == [change.commit_lsn, change.order]


def _context(agg: Aggregate, state: AggregateState, change: Change) -> dict[str, Any]:
    root = state.root(agg.root)
    if change.table == agg.root:
        before = None if change.op in ("c", "r") else {**(state.previous or {}), **(change.before or {})} or None
        if root is None:  # deleted: the last image
            root = before
    else:
        before = root  # a member changed: the root did not
    return {
        "root": root,
        "before": before,
        "row": change.row,
        "change": {
            "op": change.op,
            "table": change.table,
            "system": change.system,
            "snapshot": change.snapshot,
            "commit_ts_ms": change.commit_ts_ms,
            "event_id": change.event_id,
        },
        "members": {t: state.table_rows(t) for t in agg.members},
        "parent": None,
        "vars": {},
        "index": None,
    }


def _special(value: Any, name: str) -> bool:
    return isinstance(value, dict) and len(value) == 1 and name in value


def _check_amounts(spec: CommandSpec, part: str, values: Mapping[str, Any]) -> None:
    for col, value in values.items():
        if "amount" not in col or value is None or isinstance(value, dict):
            continue
        try:
            ok = not isinstance(value, bool) and Decimal(str(value)).is_finite()
        except InvalidOperation:
            ok = False
        if not ok:
            raise _Reject(f"{spec.where}.{part}.{col}: not a valid decimal amount: {value!r}")


class _Emitter:
    def __init__(self, topology: Topology, flow: Flow, change: Change) -> None:
        self.topology = topology
        self.flow = flow
        self.change = change
        self.commands: list[ApplyCommand] = []
        self.conflicts: list[Conflict] = []

    def emit(self, spec: CommandSpec, ctx: dict[str, Any], inherited_key: str | None) -> None:
        if spec.for_each is None:
            contexts = [ctx]
        else:
            rows = spec.for_each(ctx)
            if rows is None:
                rows = []
            if not isinstance(rows, (list, tuple)):
                raise _Reject(f"{spec.where}.for_each: expected a list, got {type(rows).__name__}")
            contexts = [{**ctx, "row": row, "index": i} for i, row in enumerate(rows, 1)]
        for c in contexts:
            if spec.when is not None and not spec.when(c):
                continue
            self.emit_one(spec, c, inherited_key)

    def emit_one(self, spec: CommandSpec, ctx: dict[str, Any], inherited_key: str | None) -> None:
        change, flow = self.change, self.flow
        match = {k: to_jsonable(evaluate_value(v, ctx)) for k, v in spec.match.items()}
        for col, value in match.items():
            if value is None:
                raise _Reject(f"{spec.where}.match.{col}: required value is null")
            if _special(value, "$in") and spec.action not in ("update", "delete"):
                raise _Reject(f"{spec.where}.match.{col}: one_of() only fits an update/delete match")
        values = {k: to_jsonable(evaluate_value(v, ctx)) for k, v in spec.set.items()}
        init = {k: to_jsonable(evaluate_value(v, ctx)) for k, v in spec.init.items()}
        for part, vals in (("match", match), ("set", values), ("init", init)):
            _check_amounts(spec, part, vals)
        own = self.topology.ownership.get(spec.target)
        if own is not None:
            for col in list(values):
                if not own.may_write(flow.source_system, flow.name, col):
                    self.conflicts.append(
                        Conflict(
                            flow=flow.name,
                            table=spec.target,
                            match=match,
                            column=col,
                            incoming=values.pop(col),
                            current=None,
                            decision="rejected-not-owner",
                            reason=f"{flow.source_system} does not own {spec.target}.{col} (owner: {own.owner(col)})",
                            source_event_id=change.event_id,
                            ts_ms=change.commit_ts_ms or 0,
                        )
                    )
        if spec.action == "update" and not values:
            return  # everything it would write belongs to someone else
        if spec.action == "upsert":
            values = {**match, **values, **{k: {"$init": v} for k, v in init.items()}}
        elif spec.action == "insert_once":
            values = {**match, **values, **init}
        elif spec.action == "delete":
            values = {}
        if spec.target_aggregate is not None:
            key = spec.target_aggregate(ctx)
            if key is None or key == "":
                raise _Reject(f"{spec.where}.target_aggregate: required value is null")
            aggregate_key = str(key)
        elif inherited_key is not None:
            aggregate_key = inherited_key
        else:
            aggregate_key = f"{spec.target}:{_key_json(match)}"
        cmd = ApplyCommand(
            command_id=command_id(change.event_id, flow.name, spec.table, match),
            flow=flow.name,
            target_system=spec.target_system,
            table=spec.table,
            action=spec.action,
            match=match,
            values=values,
            source_system=change.system,
            source_event_id=change.event_id,
            source_commit_lsn=change.commit_lsn,
            source_order=change.order,
            source_commit_ts_ms=change.commit_ts_ms,
            aggregate_key=aggregate_key,
            txn_id=f"{change.system}:{change.commit_lsn}",
            echo=spec.echo,
        )
        size = len(cmd.to_json())
        if size > MAX_COMMAND_BYTES:
            raise _Reject(f"{spec.where}: command of {size} bytes exceeds {MAX_COMMAND_BYTES} bytes")
        self.commands.append(cmd)
        child_ctx = {**ctx, "parent": match}
        for child in spec.children:
            self.emit(child, child_ctx, aggregate_key)


def transform(topology: Topology, state: AggregateState, change: Change) -> TransformResult:
    """Evaluate the flows of the change's aggregate against ``state``.

    Contract: the caller first calls ``apply_change(state, change)`` and drops the change when
    it returns False (a duplicate); then ``transform``. A change not yet applied to ``state``
    (its row's stored position is older) is applied here, so calling ``transform`` alone works
    too (``result.duplicate`` is then set for a duplicate).

    A flow whose evaluation fails (expression error, null match value, bad amount, unknown mapped
    value, oversized command) emits nothing and is reported in ``rejected``; other flows of the
    same change still run.
    """
    _, slot = _slot(change)
    if state.positions.get(slot) != [change.commit_lsn, change.order] and not apply_change(state, change):
        return TransformResult(duplicate=True)
    target = aggregate_key_of(topology, change)
    if target is None:
        return TransformResult()
    agg = topology.aggregates[target[0]]
    state.aggregate, state.key = target
    base = _context(agg, state, change)
    result = TransformResult()
    for flow in topology.flows:
        if flow.aggregate != agg.name or change.table not in flow.on or change.op not in flow.ops:
            continue
        emitter = _Emitter(topology, flow, change)
        try:
            ctx = dict(base)
            ctx["vars"] = variables = {}
            for name, spec in flow.vars:
                variables[name] = evaluate_value(spec, ctx)
            if flow.command is not None:
                emitter.emit(flow.command, ctx, None)
            notes, todo, releases = flow_actions(topology, flow, ctx, change)
        except (_Reject, ExpressionError, NotificationError) as exc:
            result.rejected.append((f"flow {flow.name}: {exc}", change))
            continue
        if emitter.commands:
            state.fired[flow.name] = [change.commit_lsn, change.order]
        result.commands.extend(emitter.commands)
        result.commands.extend(todo)
        result.conflicts.extend(emitter.conflicts)
        result.notifications.extend(notes)
        result.releases.extend(releases)
    return result
