"""The ``archsync`` command line."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from archsync.errors import ArchsyncError
from archsync.logs import configure_logging
from archsync.settings import ENV_KAFKA_BOOTSTRAP, Settings, load_settings

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
@click.option("--topology", "topology_path", envvar="ARCHSYNC_TOPOLOGY", default=None,
              help="Topology YAML (default: the packaged reference topology).")
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
                raise ArchsyncError(f"{s.dsn_setting(system)}: {describe_dsn(s.dsn_for(system))} runs with "
                                    f"wal_level={wal}; archsync needs wal_level=logical")
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
