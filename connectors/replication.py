"""The logical replication connection: slots, exported snapshots and the COPY_BOTH stream.

psycopg >= 3.3 runs ``START_REPLICATION ... LOGICAL`` on a ``replication=database`` connection
and leaves it in COPY_BOTH; frames are then read with ``pgconn.get_copy_data`` and standby
status updates written with ``pgconn.put_copy_data``.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import pq, sql

from connectors.pgoutput import lsn_to_str, standby_status_update, str_to_lsn
from connectors.postgres import connect

log = logging.getLogger(__name__)


class ReplicationError(RuntimeError):
    """The replication stream broke (server closed it, or answered with an error)."""


@dataclass(frozen=True)
class CreatedSlot:
    """A slot just created: where its stream starts and the snapshot that matches it."""

    name: str
    consistent_lsn: int
    snapshot_name: str | None


class ReplicationConnection:
    """A ``replication=database`` connection to one database."""

    def __init__(self, dsn: str, setting: str) -> None:
        self.conn: psycopg.Connection[Any] = connect(dsn, setting, replication=True)
        self.pgconn = self.conn.pgconn
        self._streaming = False

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception:
            log.debug("closing the replication connection failed", exc_info=True)

    def __enter__(self) -> ReplicationConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def identify_system(self) -> tuple[str, int, int, str]:
        row = self.conn.execute("IDENTIFY_SYSTEM").fetchone()
        assert row is not None
        return str(row[0]), int(row[1]), str_to_lsn(row[2]), str(row[3])

    def create_slot(self, name: str, *, export_snapshot: bool, temporary: bool = False) -> CreatedSlot:
        """Create a pgoutput slot; with ``export_snapshot`` the snapshot stays importable until the
        next command on this connection (``SET TRANSACTION SNAPSHOT`` on another one)."""
        query = sql.SQL("CREATE_REPLICATION_SLOT {} {} LOGICAL pgoutput (SNAPSHOT {})").format(
            sql.Identifier(name),
            sql.SQL("TEMPORARY" if temporary else ""),
            sql.Literal("export" if export_snapshot else "nothing"),
        )
        row = self.conn.execute(query).fetchone()
        assert row is not None
        return CreatedSlot(str(row[0]), str_to_lsn(row[1]), row[2])

    def start(self, slot: str, publication: str, start_lsn: int = 0, *, messages: bool = True) -> None:
        """START_REPLICATION from ``start_lsn`` (0: the slot's confirmed position)."""
        options = sql.SQL("proto_version '1', publication_names {}, messages {}").format(
            sql.Literal(publication), sql.Literal("true" if messages else "false")
        )
        query = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(slot), sql.SQL(lsn_to_str(start_lsn)), options
        )
        self.conn.execute(query)
        if self.pgconn.transaction_status != pq.TransactionStatus.ACTIVE:
            raise ReplicationError(f"START_REPLICATION did not enter COPY_BOTH on slot {slot}")
        self.pgconn.nonblocking = 1
        self._streaming = True

    def frames(self, limit: int = 5000) -> Iterator[memoryview]:
        """Frames already received or readable without blocking, at most ``limit`` of them.

        When libpq's buffer runs dry the socket is read once more without waiting (the server
        usually sent more while we worked), so a busy stream costs no ``select`` per frame.
        """
        get = self.pgconn.get_copy_data
        consume = self.pgconn.consume_input
        drained = False
        for _ in range(limit):
            nbytes, data = get(1)
            if nbytes > 0:
                drained = False
                yield data
            elif nbytes == 0:
                if drained:
                    return
                consume()
                drained = True
            else:
                self._raise_stream_end()

    def wait(self, timeout: float) -> None:
        """Block until data may be readable (or ``timeout`` seconds), then take it from the socket."""
        readable, _, _ = select.select([self.pgconn.socket], [], [], timeout)
        if readable:
            self.pgconn.consume_input()

    def send_status(self, written: int, flushed: int, *, reply: bool = False) -> None:
        """Standby status update: ``flushed`` is what PostgreSQL may consider consumed."""
        frame = standby_status_update(written, flushed, flushed, reply)
        if self.pgconn.put_copy_data(frame) != 1:
            raise ReplicationError(f"cannot send standby status: {self.pgconn.get_error_message()}")
        self.pgconn.flush()

    def _raise_stream_end(self) -> None:
        res = self.pgconn.get_result()
        message = self.pgconn.get_error_message() or "the server ended the replication stream"
        if res is not None and res.error_message:
            message = res.error_message.decode(errors="replace")
        raise ReplicationError(message.strip())
