"""CLI commands of the operations features: ``archsync reconcile``, ``archsync release FLOW``,
``archsync notify scan`` (the work itself is in processors/reconcile.py, sync_modes.py, scanner.py).

``last_run(topology, settings)`` is what ``archsync status`` shows as the last reconciliation.
"""

from __future__ import annotations

import sys
import time
from datetime import date
from typing import Any

import click
from tqdm import tqdm

from archsync.errors import ArchsyncError
from archsync.settings import Settings
from topology.model import Topology


def last_run(topology: Topology, settings: Settings) -> str | None:
    """The last reconciliation of this topology (one line), None when it never ran."""
    from processors.reconcile import last_run as read

    return read(topology, settings)


def _only(values: tuple[str, ...]) -> dict[str, list[str]] | None:
    if not values:
        return None
    out: dict[str, list[str]] = {}
    for v in values:
        agg, sep, key = v.partition(":")
        if not sep or not key:
            raise click.BadParameter(f"expected AGGREGATE:KEY (e.g. form:42), got {v!r}", param_hint="--only")
        out.setdefault(agg, []).append(key)
    return out


@click.command("reconcile")
@click.option("--repair", is_flag=True, help="Re-emit the apply commands of drifted aggregates.")
@click.option("--flow", "flows", multiple=True, help="Only this flow (repeatable).")
@click.option("--only", "only", multiple=True, help="Only this aggregate instance, AGGREGATE:KEY (repeatable).")
@click.option("--schedule", is_flag=True, help="Run on the topology's reconcile.schedule until stopped.")
@click.option("--max-drifts", type=int, default=50, show_default=True, help="Drifted fields printed.")
@click.pass_obj
def reconcile_command(
    ctx: Any, repair: bool, flows: tuple[str, ...], only: tuple[str, ...], schedule: bool, max_drifts: int
) -> None:
    """Compare the mapped aggregates of both databases; exit 1 on drift (after --repair too, as
    the repair is applied by the worker: run again to confirm)."""
    from processors.reconcile import reconcile

    topology = ctx.topology()
    settings = ctx.settings
    if schedule:
        _run_scheduled(topology, settings, repair, list(flows) or None)
        return
    shown = 0

    def show(drift: Any) -> None:
        nonlocal shown
        shown += 1
        if shown <= max_drifts:
            tqdm.write(f"DRIFT {drift.describe()}")

    with tqdm(desc="aggregates", unit=" agg", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        report = reconcile(
            topology,
            settings,
            repair=repair,
            flows=list(flows) or None,
            only=_only(only),
            on_drift=show,
            progress=bar.update,
        )
    if shown > max_drifts:
        click.echo(f"... and {shown - max_drifts} more drifted field(s)")
    for (source, target), n in sorted(report.aggregates.items()):
        drifted = len(report.drifted.get((source, target), ()))
        click.echo(f"{source} -> {target}: {n} aggregates checked, {drifted} drifted")
    for problem in report.unmappable[:10]:
        click.echo(f"unmappable: {problem}")
    seconds = report.finished - report.started
    click.echo(
        f"reconcile {report.run_id}: {report.result.upper()} - {report.checked} aggregates, "
        f"{report.drift_count} drifted, {report.repaired} repair commands sent, {seconds:.1f}s"
    )
    if report.drift_count:
        sys.exit(1)


def _run_scheduled(topology: Topology, settings: Settings, repair: bool, flows: list[str] | None) -> None:
    from processors.operations import CronTicker
    from processors.reconcile import reconcile

    ops = topology.operations
    if ops is None or not ops.reconcile_schedule:
        raise ArchsyncError(f"{topology.path}: no reconcile.schedule in the topology")
    ticker = CronTicker(ops.reconcile_schedule)
    click.echo(f"reconcile on schedule {ops.reconcile_schedule!r}; next run {ticker.due:%Y-%m-%d %H:%M:%S}")
    while True:
        time.sleep(1)
        if ticker.tick():
            report = reconcile(topology, settings, repair=repair or ops.reconcile_repair, flows=flows)
            click.echo(f"reconcile {report.run_id}: {report.result} ({report.drift_count} drifted)")


@click.command("release")
@click.argument("flow")
@click.option("--via-worker", is_flag=True, help="Only put a release marker on <prefix>.control for the worker.")
@click.pass_obj
def release_command(ctx: Any, flow: str, via_worker: bool) -> None:
    """Release the commands held for a scheduled or triggered FLOW to the apply topic."""
    from processors.sync_modes import release_held, send_release_marker

    topology = ctx.topology()
    if via_worker:
        send_release_marker(topology, ctx.settings, flow)
        click.echo(f"release marker for {flow} sent")
        return
    count = release_held(topology, ctx.settings, flow)
    click.echo(f"released {count} held command(s) of {flow}")


@click.group("notify")
def notify_group() -> None:
    """Notifications (topic <prefix>.notifications, schemas/avro/notification.v1.avsc)."""


@notify_group.command("scan")
@click.option("--today", type=click.DateTime(["%Y-%m-%d"]), default=None, help="Scan as if today were this date.")
@click.option("--scan", "scans", multiple=True, help="Only this scan (repeatable).")
@click.pass_obj
def notify_scan(ctx: Any, today: Any, scans: tuple[str, ...]) -> None:
    """Run the time-based notification scans once (idempotent: each is sent once)."""
    from processors.scanner import scan_notifications

    day: date | None = today.date() if today is not None else None
    result = scan_notifications(ctx.topology(), ctx.settings, today=day, scans=list(scans) or None)
    for kind, n in sorted(result.sent.items()):
        click.echo(f"{kind:20} {n} sent")
    for problem in result.failed[:10]:
        click.echo(f"failed: {problem}")
    click.echo(f"{result.total} notification(s) sent, {result.already} already sent before")


COMMANDS = (reconcile_command, release_command, notify_group)
