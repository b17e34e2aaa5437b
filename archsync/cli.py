"""The ``archsync`` command line."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from archsync.audit_cli import audit_group, record_admin_action
from archsync.errors import ArchsyncError
from archsync.logs import configure_logging
from archsync.reconcile import COMMANDS as reconcile_commands
from archsync.settings import ENV_KAFKA_BOOTSTRAP, Settings, load_settings
from archsync.status import status_command

log = logging.getLogger("archsync.cli")


class Context:
    """What every subcommand shares: settings and the topology path."""

    def __init__(self, topology_path: str | None) -> None:
        self.topology_path = topology_path
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings()
        return self._settings

    def topology(self) -> Any:
        from topology.model import load_topology

        return load_topology(self.topology_path)


pass_ctx = click.make_pass_decorator(Context)


@click.group()
@click.option(
    "--topology",
    "topology_path",
    envvar="ARCHSYNC_TOPOLOGY",
    default=None,
    help="Topology YAML (default: the packaged reference topology).",
)
@click.option("--log-level", envvar="ARCHSYNC_LOG_LEVEL", default="INFO", show_default=True)
@click.version_option(package_name="archsync")
@click.pass_context
def cli(ctx: click.Context, topology_path: str | None, log_level: str) -> None:
    """archsync keeps an OA approval system and an accounting archive in sync through Kafka."""
    configure_logging(log_level)
    ctx.obj = Context(topology_path)


@cli.command()
@pass_ctx
def check(ctx: Context) -> None:
    """Check that both databases and the broker answer, with wal_level=logical."""
    from connectors.kafka_admin import check_broker
    from connectors.postgres import connect, describe_dsn

    s = ctx.settings
    for system in ("oa", "archive"):
        with connect(s.dsn_for(system), s.dsn_setting(system)) as conn:
            row = conn.execute("SHOW wal_level").fetchone()
            wal = row[0] if row else "?"
            if wal != "logical":
                raise ArchsyncError(
                    f"{s.dsn_setting(system)}: {describe_dsn(s.dsn_for(system))} runs with "
                    f"wal_level={wal}; archsync needs wal_level=logical"
                )
            click.echo(f"{system:8} ok  {describe_dsn(s.dsn_for(system))} wal_level={wal}")
    brokers = check_broker(s.kafka_bootstrap)
    click.echo(f"{'kafka':8} ok  {s.kafka_bootstrap} ({brokers} broker{'s' if brokers != 1 else ''})")


@cli.group()
def db() -> None:
    """Database schema management."""


@db.command("init")
@click.option("--system", type=click.Choice(["oa", "archive", "all"]), default="all", show_default=True)
@pass_ctx
def db_init(ctx: Context, system: str) -> None:
    """Create the reference schemas (applies schemas/sql/<system>/*.sql once each)."""
    from connectors.migrations import apply_migrations
    from connectors.postgres import connect

    s = ctx.settings
    for name in ("oa", "archive") if system == "all" else (system,):
        with connect(s.dsn_for(name), s.dsn_setting(name), autocommit=True) as conn:
            applied = apply_migrations(conn, name)
        click.echo(f"{name}: {len(applied)} migration(s) applied" + (f" ({', '.join(applied)})" if applied else ""))


@cli.group("topology")
def topology_group() -> None:
    """Check, apply and show the topology."""


@topology_group.command("check")
@pass_ctx
def topology_check(ctx: Context) -> None:
    """Validate the topology file (errors name the key and line) and the tables it captures."""
    from connectors.catalog import primary_keys
    from connectors.postgres import connect

    topology = ctx.topology()
    for name, source in topology.sources.items():
        with connect(source.dsn(ctx.settings), source.dsn_env, autocommit=True) as conn:
            keys = primary_keys(conn, source.tables)
        click.echo(f"{name}: {len(keys)} table(s) ok, keyed by primary key")
    click.echo(f"topology {topology.name} ({topology.path}) is valid")


@topology_group.command("apply")
@pass_ctx
def topology_apply(ctx: Context) -> None:
    """Create the topics and publications of the topology (idempotent).

    Slots are created by the first capture run, together with its consistent snapshot.
    """
    from connectors.catalog import ensure_publication, primary_keys, split_table
    from connectors.kafka_admin import TopicSpec, ensure_topics
    from connectors.postgres import connect

    topology = ctx.topology()
    t = topology.topics
    specs = [
        TopicSpec(t.dead_letter_topic("capture"), 1, t.replication_factor),
        TopicSpec(t.heartbeat_topic(), 1, t.replication_factor, {"cleanup.policy": "compact"}),
    ]
    for name, source in topology.sources.items():
        with connect(source.dsn(ctx.settings), source.dsn_env, autocommit=True) as conn:
            primary_keys(conn, source.tables)
            added = ensure_publication(conn, source.publication, source.tables)
        click.echo(
            f"{name}: publication {source.publication} " + (f"+{len(added)} table(s)" if added else "up to date")
        )
        specs += [
            TopicSpec(t.change_topic(name, *split_table(q)), t.partitions, t.replication_factor, t.config)
            for q in source.tables
        ]
    created = ensure_topics(ctx.settings.kafka_bootstrap, specs)
    click.echo(f"topics: {len(created)} created, {len(specs) - len(created)} already there")
    log.info("topology applied", extra={"topology": topology.name, "admin_action": True, "topics_created": created})
    record_admin_action(ctx, "topology_applied", topology=topology.name, topics_created=created)


@topology_group.command("show")
@pass_ctx
def topology_show(ctx: Context) -> None:
    """Print the graph: sources → captured topics → agents and flows → apply topics → databases."""
    from topology.graph import topology_graph

    for line in topology_graph(ctx.topology()):
        click.echo(line)


@cli.command()
@click.option("--forms", type=int, default=20, show_default=True, help="How many OA forms the office submits.")
@click.option(
    "--metrics-port", type=int, default=0, help="Serve the captures' metrics here (the local Prometheus: 9401)."
)
@click.option(
    "--worker-metrics-port", type=int, default=0, help="Serve the worker's metrics here (local Prometheus: 9403)."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Workers sharing the partitions (one consumer group); metrics ports follow --worker-metrics-port.",
)
@pass_ctx
def demo(ctx: Context, forms: int, metrics_port: int, worker_metrics_port: int, workers: int) -> None:
    """The local demo: the whole pipeline, a simulated OA office and archive; exit 0 if both sides agree."""
    from archsync.demo import run_demo

    raise SystemExit(
        run_demo(
            ctx.settings,
            ctx.topology(),
            forms,
            ctx.topology_path,
            (metrics_port, worker_metrics_port),
            workers=workers,
        )
    )


@cli.command()
@click.option("--source", "source_name", required=True, help="Source name in the topology (oa, archive…).")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@pass_ctx
def capture(ctx: Context, source_name: str, metrics_port: int | None) -> None:
    """Capture a source's row changes into Kafka (runs until stopped; a second one stands by)."""
    import signal

    from archsync.metrics import serve_metrics
    from archsync.observability import start_capture_observer
    from connectors.capture import CaptureService

    topology = ctx.topology()
    service = CaptureService(topology, source_name, ctx.settings)
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    serve_metrics(metrics_port if metrics_port is not None else ctx.settings.metrics_port)
    start_capture_observer(service)
    try:
        service.run_forever()
    except KeyboardInterrupt:
        service.stop()


@cli.command()
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@click.option("--loglevel", type=click.Choice(["crit", "error", "warn", "info", "debug"]), default="warn")
@click.option(
    "--role",
    type=click.Choice(["all", "pipeline", "audit"]),
    default="all",
    show_default=True,
    help="all agents; all but the audit agent; or the audit agent alone (scale them apart).",
)
@pass_ctx
def worker(ctx: Context, metrics_port: int | None, loglevel: str, role: str) -> None:
    """Run the processors (normalise, deduplicate, transform, apply, audit) until stopped."""
    from archsync.metrics import serve_metrics
    from archsync.observability import start_worker_observer
    from processors.app import run_worker

    serve_metrics(metrics_port if metrics_port is not None else ctx.settings.metrics_port)
    start_worker_observer(ctx.topology(), ctx.settings)
    run_worker(ctx.topology(), ctx.settings, loglevel, role)


@cli.group()
def dlq() -> None:
    """Dead letters: list them, re-drive them after a fix."""


DLQ_STAGES = ("capture", "normalise", "transform", "apply")


@dlq.command("list")
@click.option("--stage", type=click.Choice(DLQ_STAGES), multiple=True, help="Default: every stage.")
@click.option("--limit", type=int, default=100, show_default=True)
@pass_ctx
def dlq_list(ctx: Context, stage: tuple[str, ...], limit: int) -> None:
    """Print dead letters (oldest first): stage, reason, source."""
    from processors.dead_letters import read_dead_letters

    shown = 0
    for record in read_dead_letters(ctx.topology(), ctx.settings, stage or DLQ_STAGES):
        click.echo(
            f"{record['stage']:9} {record.get('topic', '')}@{record.get('offset', '')} "
            f"{record.get('source', '')}  {record['reason']}"
        )
        shown += 1
        if shown >= limit:
            break
    click.echo(f"{shown} dead letter(s)")


@dlq.command("replay")
@click.option("--stage", type=click.Choice(["transform", "apply"]), required=True)
@pass_ctx
def dlq_replay(ctx: Context, stage: str) -> None:
    """Re-drive the dead letters of a stage not replayed yet (after fixing their cause)."""
    from processors.dead_letters import replay_dead_letters

    count = replay_dead_letters(ctx.topology(), ctx.settings, stage)
    click.echo(f"{count} dead letter(s) of stage {stage} re-driven")
    log.info("dead letters replayed", extra={"stage": stage, "count": count, "admin_action": True})
    record_admin_action(ctx, "dlq_replayed", stage=stage, count=count)


@cli.group()
def slots() -> None:
    """Replication slots of the topology's sources: list, lag, drop."""


def _slot_rows(ctx: Context) -> list[tuple[str, Any]]:
    from connectors.catalog import list_slots
    from connectors.postgres import connect

    topology = ctx.topology()
    rows = []
    for name, source in topology.sources.items():
        with connect(source.dsn(ctx.settings), source.dsn_env, autocommit=True) as conn:
            for slot in list_slots(conn):
                if slot.name == source.slot or slot.name.startswith(f"{source.slot}_"):
                    rows.append((name, slot))
    return rows


@slots.command("list")
@pass_ctx
def slots_list(ctx: Context) -> None:
    """List the slots with their state, confirmed position and lag."""
    from connectors.pgoutput import lsn_to_str

    click.echo(f"{'source':8} {'slot':24} {'active':6} {'confirmed_flush':>16} {'lag_bytes':>12} {'wal_status':10}")
    for name, s in _slot_rows(ctx):
        confirmed = lsn_to_str(s.confirmed_flush_lsn) if s.confirmed_flush_lsn is not None else "-"
        click.echo(
            f"{name:8} {s.name:24} {'yes' if s.active else 'no':6} {confirmed:>16} "
            f"{s.lag_bytes if s.lag_bytes is not None else '-':>12} {s.wal_status or '-':10}"
        )


@slots.command("lag")
@click.option("--max-bytes", type=int, default=None, help="Exit 1 when any slot lags more than this.")
@pass_ctx
def slots_lag(ctx: Context, max_bytes: int | None) -> None:
    """Print each slot's lag in bytes (usable as a check with --max-bytes)."""
    worst = 0
    for name, s in _slot_rows(ctx):
        click.echo(f"{name} {s.name} {s.lag_bytes}")
        worst = max(worst, s.lag_bytes or 0)
    if max_bytes is not None and worst > max_bytes:
        raise SystemExit(1)


@slots.command("drop")
@click.option("--source", "source_name", required=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def slots_drop(ctx: Context, source_name: str, yes: bool) -> None:
    """Drop a source's slot (the next capture re-snapshots). Ends its walsender if active."""
    from connectors.catalog import drop_slot, forget_snapshots
    from connectors.postgres import connect

    source = ctx.topology().source(source_name)
    if not yes:
        click.confirm(f"drop slot {source.slot} of {source_name}? The next capture takes a new snapshot", abort=True)
    with connect(source.dsn(ctx.settings), source.dsn_env, autocommit=True) as conn:
        dropped = drop_slot(conn, source.slot, terminate=True)
        forget_snapshots(conn, source.slot)
    click.echo(f"slot {source.slot}: {'dropped' if dropped else 'did not exist'}")
    log.info("slot dropped", extra={"source": source_name, "slot": source.slot, "admin_action": True})
    record_admin_action(ctx, "slot_dropped", source=source_name, slot=source.slot, dropped=dropped)


@cli.group()
def volume() -> None:
    """Archive volumes (案卷) of the reference archive schema."""


@volume.command("close")
@click.option("--fonds", "fonds_code", default="", show_default=True, help="Fonds code ('' for codes without one).")
@click.option("--class", "class_code", required=True, help="Class code, e.g. KJ.")
@click.option("--year", "fiscal_year", type=int, required=True, help="Fiscal year.")
@click.option("--by", "closed_by", default=None, help="Who closes it (default: the OS user).")
@pass_ctx
def volume_close(ctx: Context, fonds_code: str, class_code: str, fiscal_year: int, closed_by: str | None) -> None:
    """Close the current volume before it is full: the next item filed opens the next volume."""
    import getpass

    from connectors.postgres import connect
    from connectors.volumes import close_volume

    s = ctx.settings
    who = closed_by or getpass.getuser()
    with connect(s.dsn_for("archive"), s.dsn_setting("archive"), autocommit=True) as conn:
        closed = close_volume(conn, fonds_code, class_code, fiscal_year, who)
    where = f"{fonds_code or '(no fonds)'}/{class_code}/{fiscal_year}"
    if closed is None:
        click.echo(f"{where}: no volume with an item to close (nothing filed yet, or the current volume is empty)")
        raise SystemExit(1)
    click.echo(
        f"{where}: volume {closed.volume_no} closed with {closed.item_count} item(s) by {closed.closed_by};"
        f" the next item opens volume {closed.next_volume_no}"
    )
    detail = {"fonds": fonds_code, "class": class_code, "year": fiscal_year, "volume": closed.volume_no}
    log.info("volume closed", extra={**detail, "items": closed.item_count, "admin_action": True})
    record_admin_action(ctx, "volume_closed", **detail, items=closed.item_count, closed_by=closed.closed_by)


cli.add_command(status_command)
for _command in reconcile_commands:  # reconcile, release, notify (archsync/reconcile.py)
    cli.add_command(_command)
cli.add_command(audit_group)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning archsync errors into one line and exit code 2."""
    try:
        cli.main(args=argv, prog_name="archsync", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except ArchsyncError as exc:
        click.echo(f"archsync: error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


__all__ = ["ENV_KAFKA_BOOTSTRAP", "cli", "main"]

if __name__ == "__main__":
    main()
