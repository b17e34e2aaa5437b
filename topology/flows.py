"""Aggregates, column ownership and flows: the declarative part of a topology that says what a
captured change turns into (see ``topology/reference.yaml`` for the reference flows).

``aggregates``  a root table of a source plus member tables referring to the root key; changes are
                grouped (and ordered, and deduplicated) per aggregate instance.
``ownership``   per target table, which system owns which columns. A flow of a system writing a
                column it does not own is not a parse error: the transform drops the column and
                records a ``rejected-not-owner`` Conflict. ``grants`` lets a named flow write a
                column it does not own (e.g. the OA cancelling a not-yet-filed archive item).
``flows``       when a change of an aggregate matches (``on`` tables, ``ops``, ``when``), emit
                commands to ``to`` (``system.schema.table``) with ``match``/``set``/``init``
                values, and ``children`` commands (optionally ``for_each`` row of a list).

Value specs (``match``/``set``/``init``/``vars`` values): a string is an expression (so a text
literal is written ``"'oa'"``), a YAML number/boolean/null is that constant, a YAML mapping or
list is a JSON object/array of value specs (handy for jsonb columns).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from topology.expressions import Expression, ExpressionSyntaxError, compile_expression, constant
from topology.model import IDENT, QUALIFIED, Source, _Reader
from topology.operations import FLOW_KEYS, NotifySpec, SyncMode, check_releases, parse_flow_operations

ACTIONS = frozenset({"upsert", "update", "insert_once", "delete"})
OPS = frozenset({"c", "u", "d", "r"})
TARGET = re.compile(r"^([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_$]*)$")
COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Keys = tuple[str | int, ...]


@dataclass(frozen=True)
class Aggregate:
    """A root table of one source and the member tables that refer to its key."""

    name: str
    source: str
    root: str
    key: str
    members: Mapping[str, str] = field(default_factory=dict)  # member table → FK column to the root key

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.root, *self.members)


def aggregate_message_key(aggregate: str, root_key: Any) -> bytes:
    """The Kafka key of an aggregate instance: ``<aggregate>:<root key>``, the root key in its JSON
    text form (``form:42``), the same whether the value is a typed capture value or its JSON form."""
    if not isinstance(root_key, (str, int)) or isinstance(root_key, bool):
        from processors.model import to_jsonable

        root_key = to_jsonable(root_key)
    return f"{aggregate}:{root_key}".encode()


@lru_cache(maxsize=65_536)  # murmur2 is pure Python (µs per key); an aggregate's records come in bunches
def aggregate_partition(key: str | bytes, partitions: int) -> int:
    """The partition of an aggregate instance's records (its key, ``form:42``, as text or bytes):
    Kafka's default (murmur2) partitioner, as the captures, aiokafka and librdkafka's
    ``murmur2_random`` place them."""
    from aiokafka.partitioner import murmur2  # not at import: the applier processes need no aiokafka

    return (murmur2(key.encode() if isinstance(key, str) else key) & 0x7FFFFFFF) % partitions


class AggregateRouter:
    """Which aggregate instance a row belongs to (root key value), from a row image alone.

    The capture uses it to send every row of an aggregate instance to one partition (the
    partition of :func:`aggregate_message_key`, the message key staying the primary key), so the
    worker transforms captured events where they arrive; the worker uses it to key changes.
    """

    def __init__(self, aggregates: Mapping[str, Aggregate]) -> None:
        # (system, table) → (aggregate name, column holding the root key)
        self._by_table: dict[tuple[str, str], tuple[str, str]] = {}
        for agg in aggregates.values():
            self._by_table.setdefault((agg.source, agg.root), (agg.name, agg.key))
            for member, column in agg.members.items():
                self._by_table.setdefault((agg.source, member), (agg.name, column))

    def route(self, system: str, table: str, image: Mapping[str, Any] | None) -> tuple[str, Any] | None:
        """(aggregate, root key value) of a row of ``table`` (``schema.table``) in ``system``;
        None when the table is in no aggregate or the row does not say (NULL reference)."""
        found = self._by_table.get((system, table))
        if found is None or not image:
            return None
        value = image.get(found[1])
        return None if value is None else (found[0], value)

    def message_key(self, system: str, table: str, image: Mapping[str, Any] | None) -> bytes | None:
        target = self.route(system, table, image)
        return None if target is None else aggregate_message_key(*target)


@dataclass(frozen=True)
class Ownership:
    """Which system owns each column of a target table (``<system>.<schema>.<table>``)."""

    target: str
    default: str
    columns: Mapping[str, str] = field(default_factory=dict)  # column → owning system
    grants: Mapping[str, frozenset[str]] = field(default_factory=dict)  # flow name → columns it may write

    def owner(self, column: str) -> str:
        return self.columns.get(column, self.default)

    def may_write(self, system: str, flow: str, column: str) -> bool:
        return self.owner(column) == system or column in self.grants.get(flow, frozenset())


@dataclass(frozen=True)
class CommandSpec:
    """One command template: a target table, an action and value specs."""

    where: str  # key path of the spec in the topology ("flows.0", "flows.0.children.1")
    target_system: str
    table: str  # schema.table in the target system
    action: str
    match: Mapping[str, Any]
    set: Mapping[str, Any] = field(default_factory=dict)
    init: Mapping[str, Any] = field(default_factory=dict)  # written only when the row is inserted
    when: Expression | None = None
    for_each: Expression | None = None
    target_aggregate: Expression | None = None
    children: tuple[CommandSpec, ...] = ()
    #: the row this command writes is fed back as a change of the target system, so that
    #: system's flows see what the applier wrote (e.g. the archival code allocated on insert)
    echo: bool = False

    @property
    def target(self) -> str:
        return f"{self.target_system}.{self.table}"


@dataclass(frozen=True)
class Flow:
    """A named rule: changes of an aggregate → commands."""

    name: str
    aggregate: str
    source_system: str
    on: tuple[str, ...]
    ops: frozenset[str]
    vars: tuple[tuple[str, Any], ...]
    command: CommandSpec | None  # None: a flow that only notifies / releases (topology/operations.py)
    when: Expression | None = None  # the flow's condition (also the top command's ``when``)
    sync: SyncMode = field(default_factory=SyncMode)
    notify: NotifySpec | None = None
    release: tuple[str, ...] = ()


def evaluate_value(spec: Any, ctx: Mapping[str, Any]) -> Any:
    """Evaluate a value spec (expression, or dict/list of value specs)."""
    if isinstance(spec, Expression):
        return spec(ctx)
    if isinstance(spec, Mapping):
        return {k: evaluate_value(v, ctx) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [evaluate_value(v, ctx) for v in spec]
    return spec


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------


def _where(keys: Keys) -> str:
    return ".".join(str(k) for k in keys)


def _expr(r: _Reader, keys: Keys, text: Any) -> Expression:
    if not isinstance(text, str):
        raise r.fail(keys, f"expected an expression string, got {type(text).__name__} {text!r}")
    try:
        return compile_expression(text, _where(keys))
    except ExpressionSyntaxError as exc:
        raise r.fail(keys, exc.problem) from None


def _value(r: _Reader, keys: Keys, raw: Any) -> Any:
    if isinstance(raw, str):
        return _expr(r, keys, raw)
    if raw is None or isinstance(raw, (bool, int, float)):
        return constant(raw, _where(keys))
    if isinstance(raw, Mapping):
        return {str(k): _value(r, (*keys, str(k)), v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_value(r, (*keys, i), v) for i, v in enumerate(raw)]
    raise r.fail(keys, f"unsupported value {raw!r}")


def _columns(r: _Reader, keys: Keys, raw: Any, required: bool) -> dict[str, Any]:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise r.fail(keys, f"expected a mapping of column: value, got {type(raw).__name__}")
    if required and not raw:
        raise r.fail(keys, "at least one column is needed")
    out: dict[str, Any] = {}
    for col, raw_value in raw.items():
        if not isinstance(col, str) or not COLUMN.match(col):
            raise r.fail((*keys, str(col)), f"not a column name: {col!r}")
        out[col] = _value(r, (*keys, col), raw_value)
    return out


def _normalise_on(data: Any) -> Any:
    """YAML 1.1 reads a bare ``on:`` key as the boolean True."""
    if isinstance(data, Mapping) and True in data:
        return {("on" if k is True else k): v for k, v in data.items()}
    return data


def _parse_aggregates(r: _Reader, raw: Any, sources: Mapping[str, Source]) -> dict[str, Aggregate]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise r.fail(("aggregates",), f"expected a mapping, got {type(raw).__name__}")
    aggregates: dict[str, Aggregate] = {}
    owner_of_table: dict[tuple[str, str], str] = {}
    for name, body in raw.items():
        keys: Keys = ("aggregates", str(name))
        if not isinstance(name, str) or not IDENT.match(name):
            raise r.fail(keys, "an aggregate name is lower-case letters, digits and _")
        m = r.mapping(body, keys, {"source", "root", "key", "members"})
        source_name = r.get(m, keys, "source", str)
        if source_name not in sources:
            raise r.fail((*keys, "source"), f"unknown source {source_name!r} (known: {', '.join(sorted(sources))})")
        source = sources[source_name]
        root = r.get(m, keys, "root", str)
        key = r.get(m, keys, "key", str)
        if not COLUMN.match(key):
            raise r.fail((*keys, "key"), f"not a column name: {key!r}")
        members_raw = r.get(m, keys, "members", dict, {}) or {}
        tables: list[tuple[Keys, str]] = [((*keys, "root"), root)]
        members: dict[str, str] = {}
        for table, fk in members_raw.items():
            mkeys = (*keys, "members", str(table))
            if not isinstance(fk, str) or not COLUMN.match(fk):
                raise r.fail(mkeys, f"expected the member's column referring to the root key, got {fk!r}")
            members[str(table)] = fk
            tables.append((mkeys, str(table)))
        for tkeys, table in tables:
            if not QUALIFIED.match(table):
                raise r.fail(tkeys, f"expected schema.table, got {table!r}")
            if table not in source.tables:
                raise r.fail(tkeys, f"table {table!r} is not captured by source {source_name!r}")
            if (source_name, table) in owner_of_table:
                other = owner_of_table[source_name, table]
                raise r.fail(tkeys, f"table {table!r} already belongs to aggregate {other!r}")
            owner_of_table[source_name, table] = name
        aggregates[name] = Aggregate(name=name, source=source_name, root=root, key=key, members=members)
    return aggregates


def _parse_ownership(r: _Reader, raw: Any, sources: Mapping[str, Source]) -> dict[str, Ownership]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise r.fail(("ownership",), f"expected a mapping, got {type(raw).__name__}")
    out: dict[str, Ownership] = {}
    for target, body in raw.items():
        keys: Keys = ("ownership", str(target))
        tm = TARGET.match(str(target))
        if not tm:
            raise r.fail(keys, f"expected system.schema.table, got {target!r}")
        if tm[1] not in sources:
            raise r.fail(keys, f"unknown system {tm[1]!r} (known: {', '.join(sorted(sources))})")
        m = r.mapping(body, keys, {"default", "grants", *sources})
        default = r.get(m, keys, "default", str, allowed=set(sources))
        columns: dict[str, str] = {}
        for system in sources:
            cols = r.get(m, keys, system, list, [])
            for i, col in enumerate(cols):
                if not isinstance(col, str) or not COLUMN.match(col):
                    raise r.fail((*keys, system, i), f"not a column name: {col!r}")
                if col in columns and columns[col] != system:
                    raise r.fail((*keys, system, i), f"column {col!r} is already owned by {columns[col]!r}")
                columns[col] = system
        grants_raw = r.get(m, keys, "grants", dict, {}) or {}
        grants: dict[str, frozenset[str]] = {}
        for flow_name, cols in grants_raw.items():
            if not isinstance(cols, list) or not all(isinstance(c, str) and COLUMN.match(c) for c in cols):
                raise r.fail((*keys, "grants", str(flow_name)), "expected a list of column names")
            grants[str(flow_name)] = frozenset(cols)
        out[str(target)] = Ownership(target=str(target), default=default, columns=columns, grants=grants)
    return out


_COMMAND_KEYS = {"to", "action", "match", "set", "init", "when", "for_each", "target_aggregate", "children", "echo"}


def _parse_command(r: _Reader, keys: Keys, m: Mapping[str, Any], sources: Mapping[str, Source]) -> CommandSpec:
    to = r.get(m, keys, "to", str)
    tm = TARGET.match(to)
    if not tm:
        raise r.fail((*keys, "to"), f"expected <system>.<schema>.<table>, got {to!r}")
    if tm[1] not in sources:
        raise r.fail((*keys, "to"), f"unknown target system {tm[1]!r} (known: {', '.join(sorted(sources))})")
    action = r.get(m, keys, "action", str, "upsert", allowed=set(ACTIONS))
    match = _columns(r, (*keys, "match"), m.get("match"), required=True)
    set_ = _columns(r, (*keys, "set"), m.get("set"), required=False)
    init = _columns(r, (*keys, "init"), m.get("init"), required=False)
    if action == "delete" and (set_ or init):
        raise r.fail((*keys, "action"), "a delete takes only 'match' (no 'set'/'init')")
    if action == "update" and init:
        raise r.fail((*keys, "init"), "'init' (values for a new row) only fits upsert/insert_once")
    if action in ("update", "upsert") and not set_ and not init:
        raise r.fail((*keys, "set"), f"an {action} needs columns to write")
    # an update may guard on a column it writes (match status one_of(...) → set status)
    overlap = set() if action == "update" else set(set_) & set(match)
    clash = sorted(overlap | (set(init) & set(match)) | (set(set_) & set(init)))
    if clash:
        raise r.fail(keys, f"column {clash[0]!r} appears twice (match/set/init)")
    children_raw = r.get(m, keys, "children", list, [])
    children = tuple(
        _parse_command(r, (*keys, "children", i), r.mapping(c, (*keys, "children", i), _COMMAND_KEYS), sources)
        for i, c in enumerate(children_raw)
    )
    opt = {k: _expr(r, (*keys, k), m[k]) if k in m else None for k in ("when", "for_each", "target_aggregate")}
    return CommandSpec(
        where=_where(keys),
        target_system=tm[1],
        table=tm[2],
        action=action,
        match=match,
        set=set_,
        init=init,
        when=opt["when"],
        for_each=opt["for_each"],
        target_aggregate=opt["target_aggregate"],
        children=children,
        echo=r.get(m, keys, "echo", bool, False),
    )


def _parse_flows(
    r: _Reader, raw: Any, sources: Mapping[str, Source], aggregates: Mapping[str, Aggregate]
) -> tuple[Flow, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise r.fail(("flows",), f"expected a list, got {type(raw).__name__}")
    flows: list[Flow] = []
    names: set[str] = set()
    for i, body in enumerate(raw):
        keys: Keys = ("flows", i)
        m = r.mapping(_normalise_on(body), keys, {"name", "from", "on", "ops", "vars", *_COMMAND_KEYS, *FLOW_KEYS})
        name = r.get(m, keys, "name", str)
        if not IDENT.match(name):
            raise r.fail((*keys, "name"), "a flow name is lower-case letters, digits and _")
        if name in names:
            raise r.fail((*keys, "name"), f"flow {name!r} is defined twice")
        names.add(name)
        agg_name = r.get(m, keys, "from", str)
        if agg_name not in aggregates:
            known = ", ".join(sorted(aggregates)) or "none defined"
            raise r.fail((*keys, "from"), f"unknown aggregate {agg_name!r} (known: {known})")
        agg = aggregates[agg_name]
        on = r.get(m, keys, "on", list, [agg.root])
        for j, table in enumerate(on):
            if table not in agg.tables:
                raise r.fail((*keys, "on", j), f"table {table!r} is not part of aggregate {agg_name!r}")
        ops = r.get(m, keys, "ops", list, ["c", "u", "r"])
        for j, op in enumerate(ops):
            if op not in OPS:
                raise r.fail((*keys, "ops", j), f"unknown op {op!r} (c, u, d, r)")
        vars_raw = r.get(m, keys, "vars", dict, {}) or {}
        vars_: list[tuple[str, Any]] = []
        for var, text in vars_raw.items():
            if not isinstance(var, str) or not COLUMN.match(var):
                raise r.fail((*keys, "vars", str(var)), f"not a variable name: {var!r}")
            vars_.append((var, _value(r, (*keys, "vars", var), text)))
        sync, notify, release = parse_flow_operations(r, keys, m)
        if "to" in m or (notify is None and not release):
            command: CommandSpec | None = _parse_command(r, keys, m, sources)
        else:
            extra = sorted(set(m) & (_COMMAND_KEYS - {"when"}))
            if extra:
                raise r.fail((*keys, extra[0]), f"{extra[0]!r} needs a command target 'to'")
            command = None
        if notify is not None and "for_each" in m:
            raise r.fail((*keys, "notify"), "a flow with a top-level for_each cannot notify (one row at a time)")
        when = _expr(r, (*keys, "when"), m["when"]) if "when" in m else None
        flows.append(
            Flow(
                name=name,
                aggregate=agg_name,
                source_system=agg.source,
                on=tuple(on),
                ops=frozenset(ops),
                vars=tuple(vars_),
                command=command,
                when=when,
                sync=sync,
                notify=notify,
                release=release,
            )
        )
    check_releases(r, flows)
    return tuple(flows)


def parse_flow_sections(
    r: _Reader, top: Mapping[str, Any], sources: Mapping[str, Source]
) -> tuple[dict[str, Aggregate], dict[str, Ownership], tuple[Flow, ...]]:
    """Parse ``aggregates``, ``ownership`` and ``flows`` of a topology document."""
    aggregates = _parse_aggregates(r, top.get("aggregates"), sources)
    ownership = _parse_ownership(r, top.get("ownership"), sources)
    flows = _parse_flows(r, top.get("flows"), sources, aggregates)
    flow_names = {f.name for f in flows}
    for target, own in ownership.items():
        for flow_name in own.grants:
            if flow_name not in flow_names:
                raise r.fail(("ownership", target, "grants", flow_name), f"unknown flow {flow_name!r}")
    return aggregates, ownership, flows
