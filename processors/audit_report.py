"""The auditor's HTML report (``archsync audit report``): one self-contained file, inline SVG charts.

Pure: :func:`summarise` turns audit events (+ the verify result and optional archive-database
checks) into numbers, :func:`render_html` into the page. The four checks (DA/T 70):

* authenticity — every hash chain intact; archived files' sha256 fixity (violations found);
* integrity    — event counts, required metadata present on every event, no gaps in archival
                 volume and item numbers (per fonds/class/year and volume, from the archive
                 database: :func:`item_number_gaps`);
* usability    — every record decodes and its JSON parts parse; archived file formats are open
                 formats (OFD/PDF/XML/…);
* security     — own-origin writes filtered (skipped own transactions recorded, none re-captured),
                 access to the audit log recorded (admin/audit_accessed events).
"""

from __future__ import annotations

import contextlib
import html
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

OPEN_FORMATS = frozenset({"OFD", "PDF", "PDF/A", "XML", "JPG", "JPEG", "PNG", "TIF", "TIFF", "TXT", "CSV", "JSON"})
REQUIRED = {
    "change_captured": ("source_event_id", "system", "table", "op", "row_key", "source_lsn"),
    "command_applied": ("command_id", "system", "table", "op", "outcome", "source_event_id"),
    "rule_fired": ("flow", "source_event_id"),
    "conflict": ("table", "outcome", "reason"),
    "dead_letter": ("reason",),
    "admin_action": ("outcome", "actor"),
    "fixity_violation": ("row_key", "reason"),
}


def item_number_gaps(numbered: Iterable[tuple[str, str, int, int, Iterable[int]]]) -> list[str]:
    """The gaps in archival numbering, one line per fonds/class/year: volumes missing below the
    highest one, and item numbers missing below the highest of their volume. ``numbered``: (fonds,
    class, year, volume, item numbers) per volume, as the archive database holds them."""
    years: dict[tuple[str, str, int], dict[int, set[int]]] = {}
    for fonds, cls, year, volume, items in numbered:
        years.setdefault((fonds, cls, year), {}).setdefault(volume, set()).update(items)
    gaps = []
    for (fonds, cls, year), volumes in sorted(years.items()):
        problems = []
        missing_volumes = sorted(set(range(1, max(volumes) + 1)) - volumes.keys())
        if missing_volumes:
            problems.append(f"missing volumes {missing_volumes[:20]}")
        for volume, items in sorted(volumes.items()):
            missing = sorted(set(range(1, max(items) + 1)) - items)
            if missing:
                problems.append(f"volume {volume} missing item numbers {missing[:20]}")
        if problems:
            gaps.append(f"{fonds}/{cls}/{year}: {'; '.join(problems)}")
    return gaps


@dataclass
class Summary:
    events: int = 0
    chains: int = 0
    breaks: list[str] = field(default_factory=list)
    duplicates: int = 0
    by_kind: Counter[str] = field(default_factory=Counter)
    by_day: Counter[str] = field(default_factory=Counter)
    flows: Counter[str] = field(default_factory=Counter)
    conflicts: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    missing_metadata: list[str] = field(default_factory=list)
    unparseable: list[str] = field(default_factory=list)
    fixity_violations: int = 0
    fixity_runs: int = 0
    fixity_checked: int = 0
    own_origin_skipped: int = 0
    own_writes_recaptured: int = 0
    accesses: int = 0
    admin_actions: Counter[str] = field(default_factory=Counter)
    item_number_gaps: list[str] | None = None  # None: not checked (no archive database)
    file_formats: Counter[str] | None = None
    first_ms: int | None = None
    last_ms: int | None = None

    def checks(self) -> list[tuple[str, bool, str]]:
        """The four checks: (name, passed, evidence)."""
        formats = self.file_formats or Counter()
        closed = {f: n for f, n in formats.items() if f.upper() not in OPEN_FORMATS}
        gaps = self.item_number_gaps
        return [
            (
                "Authenticity",
                not self.breaks and self.fixity_violations == 0,
                f"{self.chains} hash chains, {len(self.breaks)} break(s); "
                f"{self.fixity_checked} file(s) re-hashed in {self.fixity_runs} fixity run(s), "
                f"{self.fixity_violations} fixity violation(s)",
            ),
            (
                "Integrity",
                not self.missing_metadata and not gaps,
                f"{self.events} events; {len(self.missing_metadata)} event(s) missing required metadata; "
                + ("item numbers not checked" if gaps is None else f"{len(gaps)} gap(s) in archival item numbers"),
            ),
            (
                "Usability",
                not self.unparseable and not closed,
                f"{self.events - len(self.unparseable)} of {self.events} events decode and parse; "
                + (
                    "file formats not checked"
                    if self.file_formats is None
                    else f"file formats {dict(sorted(formats.items()))}" + (f", not open: {closed}" if closed else "")
                ),
            ),
            (
                "Security",
                self.own_writes_recaptured == 0,
                f"{self.outcomes.get('applied', 0)} write(s) by archsync's appliers under their replication "
                f"origins (skipped by the capture: {self.own_writes_recaptured} re-captured), "
                f"{self.own_origin_skipped} own-origin skip event(s); {self.accesses} recorded access(es) "
                f"to the audit log; {sum(self.admin_actions.values())} admin action(s)",
            ),
        ]


def summarise(
    events: Iterable[Mapping[str, Any]],
    *,
    chains: int,
    breaks: Iterable[str],
    duplicates: int = 0,
    appliers: Iterable[str] = (),
    item_number_gaps: list[str] | None = None,
    file_formats: Counter[str] | None = None,
) -> Summary:
    s = Summary(chains=chains, breaks=list(breaks), duplicates=duplicates)
    s.item_number_gaps = item_number_gaps
    s.file_formats = file_formats
    own = tuple(appliers)
    for e in events:
        s.events += 1
        kind = str(e.get("kind"))
        s.by_kind[kind] += 1
        ts = int(e.get("ts_ms") or 0)
        if ts:
            s.by_day[datetime.fromtimestamp(ts / 1000, UTC).strftime("%Y-%m-%d")] += 1
            s.first_ms = ts if s.first_ms is None else min(s.first_ms, ts)
            s.last_ms = ts if s.last_ms is None else max(s.last_ms, ts)
        for name in REQUIRED.get(kind, ()):
            if e.get(name) in (None, ""):
                s.missing_metadata.append(f"{e.get('audit_id')}: no {name}")
        for name in ("values", "detail", "row_key"):
            if e.get(name):
                try:
                    orjson.loads(e[name])
                except orjson.JSONDecodeError:
                    s.unparseable.append(f"{e.get('audit_id')}: {name} is not JSON")
        if kind == "rule_fired":
            s.flows[str(e.get("flow"))] += 1
        elif kind == "conflict":
            s.conflicts[str(e.get("outcome"))] += 1
        elif kind == "dead_letter":
            s.dead_letters[str(e.get("system"))] += 1
        elif kind == "command_applied":
            s.outcomes[str(e.get("outcome"))] += 1
        elif kind == "fixity_violation":
            s.fixity_violations += 1
        elif kind == "fixity_run":
            s.fixity_runs += 1
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, ValueError):
                s.fixity_checked += int(orjson.loads(e.get("detail") or "{}").get("checked", 0))
        elif kind == "own_origin_skipped":
            s.own_origin_skipped += 1
        elif kind == "admin_action":
            s.admin_actions[str(e.get("outcome"))] += 1
            if e.get("outcome") == "audit_accessed":
                s.accesses += 1
        if (
            kind == "change_captured"
            and e.get("actor")
            and ":echo:" not in str(e.get("source_event_id"))  # the applier's echo of its own write
            and any(str(e["actor"]) == o or str(e["actor"]).startswith(f"{o}_") for o in own)
        ):
            s.own_writes_recaptured += 1
    return s


# ------------------------------------------------------------------------------ rendering


def bar_chart(title: str, data: Mapping[str, int], width: int = 560) -> str:
    """A horizontal bar chart as inline SVG (numbers printed next to the bars)."""
    items = list(data.items())
    if not items:
        return f"<figure><figcaption>{html.escape(title)}</figcaption><p class='none'>none</p></figure>"
    top = max(v for _, v in items) or 1
    bar_h, label_w, gap = 18, 190, 6
    height = len(items) * (bar_h + gap) + 10
    rows = []
    for i, (label, value) in enumerate(items):
        y = 5 + i * (bar_h + gap)
        w = max(1, int((width - label_w - 70) * value / top))
        rows.append(
            f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{html.escape(str(label))}</text>'
            f'<rect x="{label_w}" y="{y}" width="{w}" height="{bar_h}" fill="#3b6ea5"/>'
            f'<text x="{label_w + w + 5}" y="{y + 13}" class="num">{value}</text>'
        )
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{html.escape(title)}" font-size="12" font-family="sans-serif">{"".join(rows)}</svg></figure>'
    )


def _table(rows: Iterable[tuple[Any, ...]], head: tuple[str, ...]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _when(ms: int | None) -> str:
    return "-" if ms is None else datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_html(s: Summary, *, title: str, topic: str, generated_ms: int) -> str:
    checks = s.checks()
    check_rows = "".join(
        f'<tr class="{"pass" if ok else "fail"}"><th>{name}</th><td>{"PASS" if ok else "FAIL"}</td>'
        f"<td>{html.escape(evidence)}</td></tr>"
        for name, ok, evidence in checks
    )
    chain_status = {"intact chains": max(0, s.chains - len({b.split(" aggregate ")[-1] for b in s.breaks}))}
    chain_status["breaks"] = len(s.breaks)
    breaks = (
        "<ol class='breaks'>" + "".join(f"<li>{html.escape(b)}</li>" for b in s.breaks[:200]) + "</ol>"
        if s.breaks
        else "<p>No break: every chain verifies.</p>"
    )
    css = (
        "body{font-family:sans-serif;margin:2em;max-width:1000px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
        ".pass td:nth-child(2){color:#1a7f37;font-weight:bold}.fail td:nth-child(2){color:#c0392b;font-weight:bold}"
        "figure{margin:1em 0}figcaption{font-weight:bold;margin-bottom:4px}.num{fill:#333}"
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{css}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>Audit log <code>{html.escape(topic)}</code>, generated {_when(generated_ms)}.
Events from {_when(s.first_ms)} to {_when(s.last_ms)}.</p>
<h2>Summary</h2>
{
        _table(
            [
                ("events", s.events),
                ("chains", s.chains),
                ("chain breaks", len(s.breaks)),
                ("duplicates awaiting compaction", s.duplicates),
                ("dead letters", sum(s.dead_letters.values())),
                ("conflicts", sum(s.conflicts.values())),
                ("fixity violations", s.fixity_violations),
            ],
            ("measure", "value"),
        )
    }
<h2>The four checks</h2>
<table id="checks"><thead><tr><th>check</th><th>result</th><th>evidence</th></tr></thead><tbody>{
        check_rows
    }</tbody></table>
<h2>Charts</h2>
{bar_chart("Events per day", dict(sorted(s.by_day.items())))}
{bar_chart("Events by kind", dict(s.by_kind.most_common()))}
{bar_chart("Flows fired, by type", dict(s.flows.most_common()))}
{bar_chart("Apply outcomes", dict(s.outcomes.most_common()))}
{bar_chart("Conflicts, by decision", dict(s.conflicts.most_common()))}
{bar_chart("Dead letters, by stage", dict(s.dead_letters.most_common()))}
{bar_chart("Chain status", chain_status)}
<h2>Chain breaks</h2>
{breaks}
</body></html>
"""
