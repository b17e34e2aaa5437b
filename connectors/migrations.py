"""Applies the reference SQL schemas (``schemas/sql/<system>/NNN_*.sql``) once each, in order."""

from __future__ import annotations

import hashlib
import logging
from importlib import resources
from typing import Any

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_TABLE = "archsync_schema_migration"


def migration_files(system: str) -> list[tuple[str, str]]:
    """(file name, SQL text) of a system's migrations, in name order."""
    folder = resources.files("schemas").joinpath("sql", system)
    files = sorted((f.name, f.read_text(encoding="utf-8")) for f in folder.iterdir() if f.name.endswith(".sql"))
    return files


def apply_migrations(conn: psycopg.Connection[Any], system: str) -> list[str]:
    """Apply the migrations of ``system`` not applied yet; return the names applied."""
    applied: list[str] = []
    with conn.transaction():
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {MIGRATIONS_TABLE} ("
            " name text PRIMARY KEY, sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    done = {row[0]: row[1] for row in conn.execute(f"SELECT name, sha256 FROM {MIGRATIONS_TABLE}")}
    for name, sql in migration_files(system):
        digest = hashlib.sha256(sql.encode()).hexdigest()
        if name in done:
            if done[name] != digest:
                log.warning("applied migration changed since", extra={"migration": name, "system": system})
            continue
        with conn.transaction():
            conn.execute(sql.encode())
            conn.execute(f"INSERT INTO {MIGRATIONS_TABLE} (name, sha256) VALUES (%s, %s)", (name, digest))
        applied.append(name)
        log.info("migration applied", extra={"migration": name, "system": system})
    return applied
