"""The operational part of a topology: sync modes, notifications, scheduled scans and reconciliation.

Per flow (keys next to ``name``/``from``/``to`` in ``flows``)::

    mode: realtime | scheduled | triggered     # default realtime
    window: "0 2 * * *"                        # scheduled: cron (5 fields, or 6 with seconds last)
    window_minutes: 60                         # scheduled: keep releasing while the window is open
    notify:                                    # raise a notification when the flow's `when` holds
      kind: archive_filed                      # processors/notifications.py KINDS
      to: root.responsible                     # expressions (like a command's values)
      subject: "concat('Item ', root.archive_code, ' filed')"
      body: ...                                # optional
      id: root.id                              # optional: the subject's id (default: the changed row's key)
      table: public.arc_item                   # optional: the subject's table (default: the changed table)
      ref: root.archive_code                   # optional: business reference
      due: root.expire_date                    # optional: the date it is about
      when: ...                                # optional extra condition
      severity: warning                        # optional (default per kind)
      todo: true                               # also an OA to-do row (see notifications.todo)
    release: [other_flow]                      # when `when` holds, release these held flows

A flow with ``notify`` or ``release`` needs no ``to`` (then only ``when``/``vars`` apply).

Top level::

    notifications:
      todo: oa.public.oa_task                  # where OA to-do rows go (reference OA schema)
      scan_schedule: "*/15 * * * *"            # the worker's scanner for time-based kinds
      scans:
        - name: borrowing_due_soon
          kind: borrowing_due
          table: archive.public.arc_borrow_request
          due: due_date                        # a date column of the table
          days: [0, 3]                         # due_date - today within [min, max] (null = open)
          when: "row.status in ('APPROVED', 'BORROWED')"
          to: row.requester
          subject: "concat('Archive borrowing #', row.id, ' is due on ', row.due_date)"
          ref: ...                             # optional
          todo: true
    reconcile:
      schedule: "30 3 * * *"                   # the worker runs `archsync reconcile` on this cron
      repair: false                            # … and re-emits commands for what drifted
      ignore:                                  # columns not compared, per target table
        archive.public.arc_item: [source_version]

Cron expressions are checked with croniter.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from croniter import croniter

from topology.expressions import Expression, ExpressionSyntaxError, compile_expression

if TYPE_CHECKING:
    from topology.model import Source, _Reader

Keys = tuple[str | int, ...]

MODES = frozenset({"realtime", "scheduled", "triggered"})
NOTIFY_KINDS = (
    "archive_filed",
    "check_failed",
    "borrowing_due",
    "borrowing_overdue",
    "retention_expiring",
    "fixity_violation",
)
SEVERITIES = frozenset({"info", "warning", "critical"})
TARGET = re.compile(r"^([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_$]*)$")
COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
FLOW_KEYS = frozenset({"mode", "window", "window_minutes", "notify", "release"})


@dataclass(frozen=True)
class NotifySpec:
    """A notification template: expressions evaluated in the flow's (or scan's) context."""

    where: str
    kind: str
    subject: Expression | None
    to: Expression | None = None
    body: Expression | None = None
    id: Expression | None = None
    table: str | None = None
    ref: Expression | None = None
    due: Expression | None = None
    when: Expression | None = None
    severity: str | None = None
    todo: bool = False


@dataclass(frozen=True)
class SyncMode:
    """How a flow's commands reach the apply topic."""

    mode: str = "realtime"
    window: str | None = None  # cron of the window opening (scheduled)
    window_minutes: float = 0.0

    @property
    def held(self) -> bool:
        return self.mode != "realtime"


@dataclass(frozen=True)
class Scan:
    """A scheduled scan of a table for time-based notifications."""

    name: str
    system: str
    table: str  # schema.table
    due: str  # a date column
    days: tuple[int | None, int | None]
    notify: NotifySpec


@dataclass(frozen=True)
class Operations:
    """Notification settings, scans and the reconciliation schedule of a topology."""

    todo_table: str | None = None  # "<system>.<schema>.<table>" of OA to-do rows
    scan_schedule: str | None = None
    scans: tuple[Scan, ...] = ()
    reconcile_schedule: str | None = None
    reconcile_repair: bool = False
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)


def check_cron(r: _Reader, keys: Keys, text: Any) -> str:
    """A valid cron expression (5 fields, or 6 with seconds last), else a TopologyError."""
    if not isinstance(text, str) or not croniter.is_valid(text):
        raise r.fail(keys, f"not a valid cron expression: {text!r} (e.g. '0 2 * * *')")
    return text


def _expr(r: _Reader, keys: Keys, text: Any) -> Expression:
    if not isinstance(text, str):
        raise r.fail(keys, f"expected an expression string, got {type(text).__name__} {text!r}")
    try:
        return compile_expression(text, ".".join(map(str, keys)))
    except ExpressionSyntaxError as exc:
        raise r.fail(keys, exc.problem) from None


def parse_notify(r: _Reader, keys: Keys, raw: Any) -> NotifySpec:
    """Parse a ``notify:`` mapping."""
    m = r.mapping(raw, keys, {"kind", "to", "subject", "body", "id", "table", "ref", "due", "when", "severity", "todo"})
    kind = r.get(m, keys, "kind", str, allowed=set(NOTIFY_KINDS))
    table = r.get(m, keys, "table", str, None)
    if table is not None and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_$]*$", table):
        raise r.fail((*keys, "table"), f"expected schema.table, got {table!r}")

    def opt(name: str) -> Expression | None:
        return _expr(r, (*keys, name), m[name]) if name in m else None

    return NotifySpec(
        where=".".join(map(str, keys)),
        kind=kind,
        subject=opt("subject"),
        to=opt("to"),
        body=opt("body"),
        id=opt("id"),
        table=table,
        ref=opt("ref"),
        due=opt("due"),
        when=opt("when"),
        severity=r.get(m, keys, "severity", str, None, allowed=set(SEVERITIES)),
        todo=r.get(m, keys, "todo", bool, False),
    )


def parse_flow_operations(
    r: _Reader, keys: Keys, m: Mapping[str, Any], flow_names: set[str] | None = None
) -> tuple[SyncMode, NotifySpec | None, tuple[str, ...]]:
    """The ``mode``/``window``/``notify``/``release`` keys of one flow."""
    mode = r.get(m, keys, "mode", str, "realtime", allowed=set(MODES))
    window = m.get("window")
    minutes = r.get(m, keys, "window_minutes", float, 0.0)
    if mode == "scheduled":
        if window is None:
            raise r.fail((*keys, "mode"), "a scheduled flow needs a 'window' (cron expression)")
        check_cron(r, (*keys, "window"), window)
    elif window is not None or "window_minutes" in m:
        raise r.fail((*keys, "window"), "'window' only fits mode: scheduled")
    if minutes < 0:
        raise r.fail((*keys, "window_minutes"), "must be >= 0")
    notify = parse_notify(r, (*keys, "notify"), m["notify"]) if "notify" in m else None
    release_raw = m.get("release", [])
    if isinstance(release_raw, str):
        release_raw = [release_raw]
    if not isinstance(release_raw, list) or not all(isinstance(x, str) for x in release_raw):
        raise r.fail((*keys, "release"), "expected a flow name or a list of flow names")
    return SyncMode(mode, window, minutes), notify, tuple(release_raw)


def check_releases(r: _Reader, flows: Any) -> None:
    """Every ``release`` names a held (scheduled/triggered) flow."""
    by_name = {f.name: f for f in flows}
    for i, flow in enumerate(flows):
        for j, name in enumerate(flow.release):
            target = by_name.get(name)
            if target is None:
                raise r.fail(("flows", i, "release", j), f"unknown flow {name!r}")
            if not target.sync.held:
                raise r.fail(("flows", i, "release", j), f"flow {name!r} is realtime: nothing is held to release")


def _parse_scan(r: _Reader, keys: Keys, raw: Any, sources: Mapping[str, Source]) -> Scan:
    notify_keys = {"kind", "to", "subject", "body", "id", "ref", "when", "severity", "todo"}
    m = r.mapping(raw, keys, {"name", "table", "due", "days", *notify_keys})
    name = r.get(m, keys, "name", str)
    if not re.match(r"^[a-z_][a-z0-9_]*$", name):
        raise r.fail((*keys, "name"), "a scan name is lower-case letters, digits and _")
    table = r.get(m, keys, "table", str)
    tm = TARGET.match(table)
    if not tm:
        raise r.fail((*keys, "table"), f"expected <system>.<schema>.<table>, got {table!r}")
    if tm[1] not in sources:
        raise r.fail((*keys, "table"), f"unknown system {tm[1]!r} (known: {', '.join(sorted(sources))})")
    due = r.get(m, keys, "due", str)
    if not COLUMN.match(due):
        raise r.fail((*keys, "due"), f"not a column name: {due!r}")
    days_raw = r.get(m, keys, "days", list)
    if len(days_raw) != 2 or not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in days_raw):
        raise r.fail((*keys, "days"), "expected [min, max] days from today (integers or null)")
    lo, hi = days_raw
    if lo is not None and hi is not None and lo > hi:
        raise r.fail((*keys, "days"), f"min {lo} is greater than max {hi}")
    if lo is None and hi is None:
        raise r.fail((*keys, "days"), "at least one bound is needed")
    notify = parse_notify(r, keys, {k: v for k, v in m.items() if k in notify_keys})
    notify = NotifySpec(**{**notify.__dict__, "table": tm[2]})
    return Scan(name=name, system=tm[1], table=tm[2], due=due, days=(lo, hi), notify=notify)


def parse_operations(r: _Reader, top: Mapping[str, Any], sources: Mapping[str, Source]) -> Operations:
    """Parse the ``notifications`` and ``reconcile`` sections of a topology document."""
    n = r.mapping(top.get("notifications") or {}, ("notifications",), {"todo", "scan_schedule", "scans"})
    keys: Keys = ("notifications",)
    todo = r.get(n, keys, "todo", str, None)
    if todo is not None:
        tm = TARGET.match(todo)
        if not tm or tm[1] not in sources:
            raise r.fail((*keys, "todo"), f"expected <system>.<schema>.<table> of a known system, got {todo!r}")
    schedule = n.get("scan_schedule")
    if schedule is not None:
        check_cron(r, (*keys, "scan_schedule"), schedule)
    scans_raw = r.get(n, keys, "scans", list, [])
    scans = tuple(_parse_scan(r, (*keys, "scans", i), s, sources) for i, s in enumerate(scans_raw))
    names = [s.name for s in scans]
    if len(set(names)) != len(names):
        raise r.fail((*keys, "scans"), "two scans share a name")
    if any(s.notify.todo for s in scans) and todo is None:
        raise r.fail((*keys, "todo"), "a scan asks for OA to-do rows (todo: true) but 'todo' names no table")
    rc = r.mapping(top.get("reconcile") or {}, ("reconcile",), {"schedule", "repair", "ignore"})
    ignore = r.get(rc, ("reconcile",), "ignore", dict, {}) or {}
    for target, cols in ignore.items():
        tm = TARGET.match(str(target))
        if not tm or tm[1] not in sources:
            raise r.fail(("reconcile", "ignore", str(target)), f"expected <system>.<schema>.<table>, got {target!r}")
        if not isinstance(cols, list) or not all(isinstance(c, str) and COLUMN.match(c) for c in cols):
            raise r.fail(("reconcile", "ignore", str(target)), "expected a list of column names")
    rschedule = rc.get("schedule")
    if rschedule is not None:
        check_cron(r, ("reconcile", "schedule"), rschedule)
    return Operations(
        todo_table=todo,
        scan_schedule=schedule,
        scans=scans,
        reconcile_schedule=rschedule,
        reconcile_repair=r.get(rc, ("reconcile",), "repair", bool, False),
        raw={"notifications": n, "reconcile": rc},
    )
