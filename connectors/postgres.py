"""Opening PostgreSQL connections with errors that name the setting at fault."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import psycopg

from archsync.errors import ConfigError

# Every archsync session speaks UTC and ISO dates, so captured text values parse one way.
SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601 -c extra_float_digits=3"


def describe_dsn(dsn: str) -> str:
    """``user@host:port/db`` of a DSN, without its password, for messages."""
    parts = urlsplit(dsn)
    return f"{parts.username or ''}@{parts.hostname}:{parts.port or 5432}{parts.path}"


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's text."""
    text = str(exc)
    if "FATAL:" in text:
        text = text.rsplit("FATAL:", 1)[1]
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return exc.__class__.__name__


def connect(dsn: str, setting: str, *, replication: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
    """Connect to ``dsn``; a failure raises :class:`ConfigError` naming ``setting``.

    With ``replication=True`` the connection is a logical replication connection
    (``replication=database``), autocommit, able to run ``START_REPLICATION``.
    """
    params: dict[str, Any] = {"options": SESSION_OPTIONS, "connect_timeout": 5, **kwargs}
    if replication:
        params["replication"] = "database"
        params["autocommit"] = True
    try:
        return psycopg.connect(dsn, **params)
    except psycopg.OperationalError as exc:
        raise ConfigError(setting, f"cannot connect to {describe_dsn(dsn)}: {first_line(exc)}") from None


_PLACEHOLDER = re.compile(rb"%(.)", re.DOTALL)


def numbered_placeholders(query: bytes) -> bytes:
    """A query written with psycopg's positional ``%s`` placeholders (``%%`` for a literal ``%``)
    in PostgreSQL's own ``$1, $2, …`` form, for a :class:`psycopg.RawCursor`.

    psycopg parses a query's placeholders on every execute unless the query is short (4,096
    bytes) with few parameters (50); the applier's statement shapes are longer, so converting each
    once and running it raw saves that parse (a fifth of the applier's time, measured)."""
    numbered = 0

    def replace(match: re.Match[bytes]) -> bytes:
        nonlocal numbered
        kind = match.group(1)
        if kind == b"%":
            return b"%"
        if kind == b"s":
            numbered += 1
            return b"$%d" % numbered
        raise ValueError(f"unsupported placeholder %{kind.decode(errors='replace')} (only %s and %%)")

    return _PLACEHOLDER.sub(replace, query)
