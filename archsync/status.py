"""``archsync status``: one screen for operators, and a health check (exit 1 when unhealthy).

It reads, once: each source's database and replication slot (active, lag), the pipeline topics
with the worker group's consumer lag, the group's members (the workers), the dead-letter backlog
and the last reconciliation. :func:`assess` turns that into the reasons the pipeline is unhealthy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import click

from archsync.settings import Settings
from topology.model import Topology

DEFAULT_MAX_SLOT_LAG = 1 << 30  # bytes


@dataclass
class SourceStatus:
    name: str
    database: str
    error: str | None = None
    slot: str = ""
    slot_exists: bool = False
    active: bool = False
    lag_bytes: int | None = None
    wal_status: str | None = None


@dataclass
class TopicStatus:
    topic: str
    partitions: int
    messages: int
    lag: int
    never_committed: bool


@dataclass
class StatusReport:
    topology: str
    bootstrap: str
    group: str
    sources: list[SourceStatus] = field(default_factory=list)
    kafka_error: str | None = None
    topics: list[TopicStatus] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: dict[str, int] = field(default_factory=dict)
    last_reconcile: str = "never"

    @property
    def consumer_lag(self) -> int:
        return sum(t.lag for t in self.topics)


@dataclass(frozen=True)
class Thresholds:
    max_slot_lag_bytes: int = DEFAULT_MAX_SLOT_LAG
    max_consumer_lag: int | None = None
    fail_on_dead_letters: bool = False
    require_worker: bool = True


def assess(report: StatusReport, limits: Thresholds) -> list[str]:
    """Why the pipeline is unhealthy (empty: healthy)."""
    problems: list[str] = []
    for s in report.sources:
        if s.error:
            problems.append(f"source {s.name}: {s.error}")
        elif not s.slot_exists:
            problems.append(f"source {s.name}: slot {s.slot} does not exist (no capture ran yet)")
        else:
            if not s.active:
                problems.append(f"source {s.name}: slot {s.slot} inactive (capture down)")
            if s.lag_bytes is not None and s.lag_bytes > limits.max_slot_lag_bytes:
                problems.append(f"source {s.name}: slot lag {s.lag_bytes} B > {limits.max_slot_lag_bytes} B")
            if s.wal_status == "lost":
                problems.append(f"source {s.name}: slot {s.slot} lost WAL it needs (re-snapshot)")
    if report.kafka_error:
        problems.append(f"kafka: {report.kafka_error}")
        return problems
    if limits.max_consumer_lag is not None and report.consumer_lag > limits.max_consumer_lag:
        problems.append(f"consumer lag {report.consumer_lag} > {limits.max_consumer_lag}")
    if limits.require_worker and not report.workers:
        problems.append(f"no worker in consumer group {report.group}")
    dead = sum(report.dead_letters.values())
    if limits.fail_on_dead_letters and dead:
        problems.append(f"{dead} dead letter(s) not re-driven")
    return problems


def last_reconciliation(topology: Topology, settings: Settings) -> str:
    """When ``archsync reconcile`` last ran, if it records it (``never`` otherwise)."""
    try:
        from archsync import reconcile  # issue 6: reconciliation (may not exist yet)
    except ImportError:
        return "never"
    reader = getattr(reconcile, "last_run", None)
    if reader is None:
        return "never"
    try:
        value = reader(topology, settings)
    except Exception as exc:  # noqa: BLE001 - status shows what it cannot read
        return f"unknown ({exc})"
    return str(value) if value else "never"


def collect(topology: Topology, settings: Settings) -> StatusReport:
    """Read everything the status screen shows (errors recorded, not raised)."""
    from archsync.errors import ArchsyncError
    from archsync.observability import OffsetReader, consumed_topics, worker_group_id
    from connectors.catalog import list_slots
    from connectors.kafka_admin import check_broker
    from connectors.postgres import connect, describe_dsn

    report = StatusReport(topology.name, settings.kafka_bootstrap, worker_group_id(topology))
    for name, source in topology.sources.items():
        dsn = source.dsn(settings)
        status = SourceStatus(name, describe_dsn(dsn), slot=source.slot)
        try:
            with connect(dsn, source.dsn_env, autocommit=True) as conn:
                slots = list_slots(conn, source.slot)
        except ArchsyncError as exc:
            status.error = str(exc)
        else:
            if slots:
                slot = slots[0]
                status.slot_exists = True
                status.active = slot.active
                status.lag_bytes = slot.lag_bytes
                status.wal_status = slot.wal_status
        report.sources.append(status)
    reader: OffsetReader | None = None
    try:
        check_broker(settings.kafka_bootstrap, timeout=5.0)
        reader = OffsetReader(settings.kafka_bootstrap)
        by_topic: dict[str, list[Any]] = {}
        for row in reader.lag(report.group, consumed_topics(topology)):
            by_topic.setdefault(row.topic, []).append(row)
        report.topics = [
            TopicStatus(
                topic,
                len(rows),
                sum(r.high - r.low for r in rows),
                sum(r.lag for r in rows),
                all(r.committed is None for r in rows),
            )
            for topic, rows in by_topic.items()
        ]
        report.workers = reader.group_members(report.group)
        report.dead_letters = reader.dead_letter_backlog(topology)
    except Exception as exc:  # noqa: BLE001 - unreachable brokers make the status unhealthy, not a crash
        report.kafka_error = str(exc)
    finally:
        if reader is not None:
            reader.close()
    report.last_reconcile = last_reconciliation(topology, settings)
    return report


def render(report: StatusReport, problems: list[str]) -> list[str]:
    """The status screen, as lines."""
    lines = [
        f"archsync status — topology {report.topology}, kafka {report.bootstrap}, {time.strftime('%Y-%m-%d %H:%M:%S')}",
        "",
        "SOURCES",
    ]
    for s in report.sources:
        if s.error:
            lines.append(f"  {s.name:8} {s.database:32} ERROR {s.error}")
            continue
        state = ("active" if s.active else "INACTIVE") if s.slot_exists else "MISSING"
        lag = f"{s.lag_bytes} B" if s.lag_bytes is not None else "-"
        lines.append(f"  {s.name:8} {s.database:32} slot {s.slot} {state}, lag {lag}, wal {s.wal_status or '-'}")
    lines += ["", f"TOPICS (consumer group {report.group})"]
    if report.kafka_error:
        lines.append(f"  kafka unreachable: {report.kafka_error}")
    else:
        lines.append(f"  {'topic':52} {'parts':>5} {'messages':>10} {'lag':>8}")
        for t in report.topics:
            lag = f"{t.lag}" + (" *" if t.never_committed and t.messages else "")
            lines.append(f"  {t.topic:52} {t.partitions:>5} {t.messages:>10} {lag:>8}")
        lines.append(f"  total consumer lag {report.consumer_lag}  (* never committed by the group)")
        lines += ["", f"WORKERS ({len(report.workers)} in the group)"]
        for w in report.workers:
            lines.append(f"  {w['client_id']:40} {w['host']:20} {len(w['partitions'])} partition(s)")
        lines += [
            "",
            "DEAD LETTERS (not re-driven)",
            "  " + " · ".join(f"{stage} {n}" for stage, n in report.dead_letters.items()),
        ]
    lines += ["", f"RECONCILIATION  last run: {report.last_reconcile}", ""]
    if problems:
        lines.append("UNHEALTHY")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("HEALTHY")
    return lines


@click.command("status")
@click.option("--max-slot-lag-bytes", type=int, default=DEFAULT_MAX_SLOT_LAG, show_default=True)
@click.option("--max-consumer-lag", type=int, default=None, help="Unhealthy above this many messages (all topics).")
@click.option("--fail-on-dead-letters", is_flag=True, help="Unhealthy while dead letters wait to be re-driven.")
@click.option("--no-worker-ok", is_flag=True, help="Healthy even when no worker is in the consumer group.")
@click.pass_obj
def status_command(
    ctx: Any, max_slot_lag_bytes: int, max_consumer_lag: int | None, fail_on_dead_letters: bool, no_worker_ok: bool
) -> None:
    """One screen: sources, slots and lag, topics and consumer lag, workers, dead letters,
    last reconciliation. Exits 1 when unhealthy (usable as a health check)."""
    report = collect(ctx.topology(), ctx.settings)
    problems = assess(report, Thresholds(max_slot_lag_bytes, max_consumer_lag, fail_on_dead_letters, not no_worker_ok))
    for line in render(report, problems):
        click.echo(line)
    if problems:
        raise SystemExit(1)
