"""``archsync audit …``: the auditor's tools over the audit log (``<prefix>.audit``).

  verify                       check every hash chain; exit 0 only when intact
  history AGGREGATE            the timeline of a form / archive item across both systems
  state AGGREGATE --at TS      the rows as they were at TS, on either side
  export --from --to --format  csv | json | xml, for external auditors
  report                       one self-contained HTML page: charts and the four checks
  fixity [--every SECONDS]     re-hash archived files; violations become audit events

Reading commands record an ``audit_accessed`` admin event (who read what), so access to the
audit log is itself audited. Timestamps: ISO-8601 (``2026-11-28T10:00:00``, UTC unless an offset
is given), a date, or epoch milliseconds.
"""

from __future__ import annotations

import csv
import getpass
import io
import os
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import click
import orjson

from archsync import metrics
from processors.audit import FACT_FIELDS
from processors.audit_report import item_number_gaps

#: export columns: where the record is, its identity, a readable time, the facts, then the chain
EXPORT_FIELDS = (
    "partition",
    "offset",
    *FACT_FIELDS[:3],  # audit_id, kind, aggregate
    "seq",
    "ts",
    *FACT_FIELDS[3:],
    "prev_hash",
    "hash_alg",
    "hash",
)


def parse_ts(text: str) -> int:
    """Epoch ms from ISO-8601 / a date / epoch milliseconds (naive times are UTC)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        if len(text) == 10:
            d = date.fromisoformat(text)
            return int(datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp() * 1000)
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"not a timestamp: {text!r} (ISO-8601 or epoch ms)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _topic(ctx: Any, topic: str | None) -> str:
    from processors.audit_agent import audit_topics

    return topic or audit_topics(ctx.topology())["audit"]


def load_events(ctx: Any, topic: str | None = None, progress: bool = False) -> list[dict[str, Any]]:
    """Every audit record (decoded, duplicates dropped), with its partition and offset."""
    from tqdm import tqdm

    from connectors.audit_log import end_offsets, read_log
    from processors.audit import decode_record

    name = _topic(ctx, topic)
    total = sum(hi - lo for lo, hi in end_offsets(ctx.settings, name).values())
    seen: set[str] = set()
    out = []
    with tqdm(total=total, unit="ev", disable=not progress or total < 10000, file=sys.stderr) as bar:
        for r in read_log(ctx.settings, name):
            bar.update(1)
            if r.value is None:
                continue
            try:
                record = decode_record(r.value)
            except Exception:  # noqa: BLE001 - verify reports these; readers skip them
                continue
            if record["audit_id"] in seen:
                continue
            seen.add(record["audit_id"])
            record["partition"], record["offset"] = r.partition, r.offset
            out.append(record)
    out.sort(key=lambda e: (e["ts_ms"], e["aggregate"], e["seq"]))
    return out


def record_admin_action(ctx: Any, action: str, **detail: Any) -> None:
    """Produce an admin_action audit fact (the worker's audit agent chains it). Never fails the
    command it records: a broker problem is reported on stderr."""
    from connectors.audit_log import produce_facts
    from processors.audit import admin_fact

    try:
        now = int(time.time() * 1000)
        fact = admin_fact(action, getpass.getuser(), now, uuid.uuid4().hex, **detail)
        produce_facts(ctx.settings, ctx.topology(), [fact])
    except Exception as exc:  # noqa: BLE001 - auditing must not break the admin command
        click.echo(f"warning: could not record the audit event {action}: {exc}", err=True)


# ------------------------------------------------------------------------------ verify


def default_jobs() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def run_verify(ctx: Any, topic: str | None, heads: bool, progress: bool = True, jobs: int | None = None) -> Any:
    """Verify the log (then the chain heads the agent recorded); returns the ChainVerifier."""
    from tqdm import tqdm

    from connectors.audit_log import end_offsets, read_heads, verify_topic
    from processors.audit import audit_key
    from processors.audit_agent import chains_changelog_topic

    name = _topic(ctx, topic)
    # the heads first: the log read afterwards must contain every one of them
    recorded = read_heads(ctx.settings, chains_changelog_topic(ctx.topology())) if heads and topic is None else None
    total = sum(hi - lo for lo, hi in end_offsets(ctx.settings, name).values())
    with tqdm(total=total, unit="ev", unit_scale=True, disable=not progress, file=sys.stderr, mininterval=0.5) as bar:
        v = verify_topic(ctx.settings, name, audit_key(), jobs or default_jobs(), bar.update)
    if recorded is not None:
        v.check_heads(recorded, name)
    return v


@click.group("audit")
def audit_group() -> None:
    """The tamper-evident audit log: verify, history, state, export, report, fixity."""


@audit_group.command("verify")
@click.option("--topic", default=None, help="Verify another copy of the log (default: <prefix>.audit).")
@click.option(
    "--heads/--no-heads",
    default=True,
    show_default=True,
    help="Also compare each chain's end with the heads the audit agent recorded (its changelog).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--jobs", type=int, default=None, help="Partitions verified in parallel (default: CPUs, at most 4).")
@click.pass_obj
def verify_command(ctx: Any, topic: str | None, heads: bool, quiet: bool, jobs: int | None) -> None:
    """Read the log from the beginning and check every chain; exit 0 only when intact."""
    started = time.perf_counter()
    v = run_verify(ctx, topic, heads, not quiet, jobs)
    if v.breaks and heads and topic is None and any(b.audit_id == "-" for b in v.breaks):
        time.sleep(3)  # the agent writes the record and its head separately: settle, then look again
        v = run_verify(ctx, topic, heads, not quiet, jobs)
    elapsed = time.perf_counter() - started
    for b in v.breaks:
        click.echo(f"BREAK {b}")
    metrics.AUDIT_CHAIN_BREAKS.inc(len(v.breaks))
    rate = v.records / elapsed if elapsed > 0 else 0.0
    click.echo(
        f"{_topic(ctx, topic)}: {v.records} record(s), {len(v.chains)} chain(s), {v.duplicates} duplicate(s), "
        f"{len(v.breaks)} break(s) in {elapsed:.1f} s ({rate:,.0f} events/s): "
        + ("INTACT" if v.intact else "NOT INTACT")
    )
    raise SystemExit(0 if v.intact else 1)


# ------------------------------------------------------------------------------ history / state


def _timeline(events: list[dict[str, Any]], aggregate: str) -> tuple[set[str], list[dict[str, Any]]]:
    from processors.audit import related_aggregates

    related = related_aggregates(events, aggregate)
    return related, [e for e in events if e["aggregate"] in related]


def describe(e: dict[str, Any]) -> str:
    kind = e["kind"]
    if kind == "change_captured":
        what = f"{e['system']} {e['table']} {e['op']} {e['row_key']} changed {','.join(e['changed']) or '-'}"
        if e.get("values"):
            what += f" = {e['values']}"
    elif kind == "command_applied":
        what = f"{e['system']} {e['table']} {e['op']} {e['row_key']} by {e['flow']}: {e['outcome']}"
    elif kind == "rule_fired":
        what = f"flow {e['flow']} fired on {e['source_event_id']} -> {', '.join(e['links'])}"
    elif kind == "conflict":
        what = f"{e['table']}.{','.join(e['changed'])}: {e['outcome']} ({e['reason']})"
    elif kind == "dead_letter":
        what = f"{e['system']}: {e['reason']}"
    else:
        what = f"{e.get('outcome') or ''} {e.get('reason') or ''} {e.get('detail') or ''}".strip()
    return what


@audit_group.command("history")
@click.argument("aggregate")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def history_command(ctx: Any, aggregate: str, as_json: bool) -> None:
    """The timeline of one aggregate (e.g. form:42, item:7, oa:F-2026-001) and everything linked
    to it, across both systems."""
    events = load_events(ctx)
    record_admin_action(ctx, "audit_accessed", command="history", aggregate=aggregate)
    related, timeline = _timeline(events, aggregate)
    if not timeline:
        raise click.ClickException(f"no audit events for {aggregate}")
    if as_json:
        for e in timeline:
            click.echo(orjson.dumps(e).decode())
        return
    click.echo(f"{aggregate}: {len(timeline)} event(s) in chain(s) {', '.join(sorted(related))}")
    for e in timeline:
        click.echo(f"{iso(e['ts_ms'])}  {e['aggregate']:<22} #{e['seq']:<4} {e['kind']:<18} {describe(e)}")


@audit_group.command("state")
@click.argument("aggregate")
@click.option("--at", "at", required=True, help="The moment (ISO-8601 or epoch ms).")
@click.option("--side", type=click.Choice(["both", "oa", "archive"]), default="both", show_default=True,
              help="Which system's rows (a source name of the topology).")  # fmt: skip
@click.pass_obj
def state_command(ctx: Any, aggregate: str, at: str, side: str) -> None:
    """Reconstruct the rows of AGGREGATE (and the aggregates linked to it) as they were at --at,
    as JSON: {"<system>.<schema>.<table>": {"<row key>": row}}."""
    from processors.audit import state_at

    at_ms = parse_ts(at)
    events = load_events(ctx)
    record_admin_action(ctx, "audit_accessed", command="state", aggregate=aggregate, at=at_ms)
    _, timeline = _timeline(events, aggregate)
    if not timeline:
        raise click.ClickException(f"no audit events for {aggregate}")
    rows = state_at(timeline, at_ms)
    if side != "both":
        rows = {t: r for t, r in rows.items() if t.split(".", 1)[0] == side}
    click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())


# ------------------------------------------------------------------------------ export


def export_rows(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**{f: e.get(f) for f in EXPORT_FIELDS if f != "ts"}, "ts": iso(e["ts_ms"])} for e in events]


def to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EXPORT_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ";".join(v) if isinstance(v, list) else ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def to_xml(rows: list[dict[str, Any]], meta: dict[str, str]) -> str:
    root = ET.Element("audit_events", {k: str(v) for k, v in meta.items()})
    for r in rows:
        ev = ET.SubElement(root, "event")
        for k in EXPORT_FIELDS:
            v = r.get(k)
            if v is None:
                continue
            el = ET.SubElement(ev, k)
            if isinstance(v, list):
                for item in v:
                    ET.SubElement(el, "item").text = str(item)
            else:
                el.text = str(v)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


@audit_group.command("export")
@click.option("--from", "from_", default=None, help="First moment included (default: the beginning).")
@click.option("--to", "to", default=None, help="Last moment included (default: now).")
@click.option("--format", "fmt", type=click.Choice(["csv", "json", "xml"]), default="json", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="File to write (default: stdout).")  # fmt: skip
@click.option("--aggregate", default=None, help="Only this aggregate and those linked to it.")
@click.pass_obj
def export_command(
    ctx: Any, from_: str | None, to: str | None, fmt: str, output: Path | None, aggregate: str | None
) -> None:
    """Export the audit events of a period for external auditors."""
    lo = parse_ts(from_) if from_ else 0
    hi = parse_ts(to) if to else int(time.time() * 1000) + 1
    events = load_events(ctx, progress=output is not None)
    record_admin_action(ctx, "audit_accessed", command="export", frm=lo, to=hi, format=fmt)
    if aggregate:
        events = _timeline(events, aggregate)[1]
    rows = export_rows(e for e in events if lo <= e["ts_ms"] <= hi)
    meta = {"topic": _topic(ctx, None), "from": iso(lo), "to": iso(hi), "count": str(len(rows))}
    if fmt == "csv":
        text = to_csv(rows)
    elif fmt == "json":
        text = orjson.dumps({**meta, "count": len(rows), "events": rows}, option=orjson.OPT_INDENT_2).decode() + "\n"
    else:
        text = to_xml(rows, meta)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"{len(rows)} event(s) written to {output}", err=True)


# ------------------------------------------------------------------------------ report


def archive_checks(ctx: Any) -> tuple[list[str] | None, Counter[str] | None]:
    """Gaps in archival volume/item numbers and the archived file formats, from the archive database
    (None, None when it cannot be reached)."""
    from connectors.postgres import connect

    try:
        source = ctx.topology().source("archive")
        with connect(source.dsn(ctx.settings), source.dsn_env, autocommit=True) as conn:
            numbered = conn.execute(
                "SELECT coalesce(fonds_code, ''), class_code, fiscal_year, coalesce(volume_no, 1), array_agg(item_no)"
                " FROM arc_item WHERE item_no IS NOT NULL GROUP BY 1, 2, 3, 4"
            ).fetchall()
            formats = conn.execute("SELECT coalesce(upper(format), '?'), count(*) FROM arc_file GROUP BY 1").fetchall()
    except Exception as exc:  # noqa: BLE001 - the report still renders, marking these as not checked
        click.echo(f"warning: archive database checks skipped: {exc}", err=True)
        return None, None
    return item_number_gaps(numbered), Counter({str(f): int(n) for f, n in formats})


@audit_group.command("report")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("audit-report.html"),
              show_default=True)  # fmt: skip
@click.option("--no-db", is_flag=True, help="Skip the archive-database checks (item numbers, file formats).")
@click.pass_obj
def report_command(ctx: Any, output: Path, no_db: bool) -> None:
    """Write one self-contained HTML report with charts and the four checks."""
    from processors.audit_report import render_html, summarise

    topology = ctx.topology()
    v = run_verify(ctx, None, True, progress=False)
    events = load_events(ctx)
    record_admin_action(ctx, "audit_accessed", command="report", output=str(output))
    gaps, formats = (None, None) if no_db else archive_checks(ctx)
    s = summarise(
        events,
        chains=len(v.chains),
        breaks=[str(b) for b in v.breaks],
        duplicates=v.duplicates,
        appliers=topology.appliers,
        item_number_gaps=gaps,
        file_formats=formats,
    )
    page = render_html(
        s,
        title=f"archsync audit report — {topology.name}",
        topic=_topic(ctx, None),
        generated_ms=int(time.time() * 1000),
    )
    output.write_text(page, encoding="utf-8")
    passed = sum(1 for _, ok, _ in s.checks() if ok)
    click.echo(f"report written to {output}: {s.events} events, {len(v.breaks)} break(s), {passed}/4 checks pass")


# ------------------------------------------------------------------------------ fixity


def run_fixity_once(ctx: Any) -> Any:
    from tqdm import tqdm

    from connectors.audit_log import produce_facts
    from processors.fixity import run_fixity, violation_notifications

    topology = ctx.topology()
    with tqdm(unit="file", file=sys.stderr, disable=None, mininterval=0.5) as bar:
        report = run_fixity(topology, ctx.settings, progress=bar.update)
    produce_facts(ctx.settings, topology, report.facts)
    if report.violations:
        _notify(ctx, topology, violation_notifications(topology, report))
    for v in report.violations:
        click.echo(f"VIOLATION item {v.file.item_id} file {v.file.seq} (id {v.file.file_id}): {v.reason}")
    click.echo(
        f"fixity: {report.checked} file(s) re-hashed, {len(report.violations)} violation(s), "
        f"{report.unverifiable} without stored bytes"
    )
    return report


def _notify(ctx: Any, topology: Any, messages: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import Producer

    from connectors.kafka_admin import TopicSpec, ensure_topics
    from processors.notifications import notifications_topic

    topic = notifications_topic(topology.topics.prefix)
    t = topology.topics
    ensure_topics(ctx.settings.kafka_bootstrap, [TopicSpec(topic, t.partitions, t.replication_factor)])
    producer = Producer({"bootstrap.servers": ctx.settings.kafka_bootstrap, "enable.idempotence": True})
    for key, value in messages:
        producer.produce(topic, value, key)
    producer.flush(30)


@audit_group.command("fixity")
@click.option("--every", type=float, default=None, help="Run again every SECONDS (until stopped).")
@click.pass_obj
def fixity_command(ctx: Any, every: float | None) -> None:
    """Re-hash the archived files' stored bytes against the sha256 recorded at filing; each
    mismatch becomes a fixity_violation audit event, metric and notification. Exit 1 on violations."""
    while True:
        report = run_fixity_once(ctx)
        if every is None:
            raise SystemExit(1 if report.violations else 0)
        time.sleep(every)


class _Ctx:
    def __init__(self, settings: Any, topology: Any) -> None:
        self.settings = settings
        self._topology = topology

    def topology(self) -> Any:
        return self._topology


def demo_audit_line(settings: Any, topology: Any, settle_seconds: float = 3.0) -> str:
    """The demo summary's audit line: does the audit log verify (``archsync audit verify``)?"""
    from processors.audit_agent import audit_topic_specs

    if not audit_topic_specs(topology):
        return "off (audit: {enabled: false})"
    time.sleep(settle_seconds)  # the last facts of the run reach the log
    try:
        v = run_verify(_Ctx(settings, topology), None, True, progress=False)
        if not v.intact:
            time.sleep(settle_seconds)
            v = run_verify(_Ctx(settings, topology), None, True, progress=False)
    except Exception as exc:  # noqa: BLE001 - the demo reports it and goes on
        return f"NOT CHECKED ({exc})"
    verdict = "verifies" if v.intact else f"NOT INTACT: {v.breaks[0]}"
    return f"{verdict} ({v.records} events, {len(v.chains)} chains, archsync audit verify)"
