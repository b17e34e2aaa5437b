"""Table state on the worker's local disk: a Faust store that keeps the recently used keys of a
table in memory and the rest in a private SQLite file (``store="archsync-disk://"``).

Why: the ``aggregates`` table holds every aggregate's rows for as long as the aggregate exists
(revoke-after-filing needs the filed state, years later), and the audit agent's table a chain head
per aggregate. In Faust's memory store that is a few KB per form for ever: the worker's memory grew
with the forms ever seen, not with the load. Here memory is bounded: the hot part is an LRU cache of
at most ``ARCHSYNC_STATE_MEMORY_MB`` (per table, written back to SQLite when evicted) and SQLite's
page cache; the rest is on disk.

What it is not: durable, on purpose. The file is unlinked as soon as it is opened (its space is
freed when the process ends, however it ends); like the memory store, the table is rebuilt from its
changelog at every start and every partition assignment (``persisted_offset`` is None). So a crash
can never leave a local store ahead of the changelog — the worker holds changelog records back until
the output they follow from is in Kafka (processors/record_producer.py), and a local store that
outlived the process (RocksDB) would be read back with writes whose output was never sent.

``ARCHSYNC_STATE_STORE=memory`` selects Faust's memory store instead.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from faust.stores import STORES
from faust.stores.base import SerializedStore
from faust.streams import current_event
from faust.types import TP, EventT

from archsync.errors import ConfigError
from archsync.settings import env_int

SCHEME = "archsync-disk"
STORES.aliases[SCHEME] = f"{__name__}:DiskStore"

STORE_KINDS = {"disk": f"{SCHEME}://", "memory": "memory://"}

# per entry of the hot cache, beyond its key and value (dict slot, tuple, bytes headers)
ENTRY_OVERHEAD = 160

_UPSERT = (
    "INSERT INTO kv (key, part, value) VALUES (?, ?, ?)"
    " ON CONFLICT (key) DO UPDATE SET part = excluded.part, value = excluded.value"
)


def store_url(env: dict[str, str] | None = None) -> str:
    """The Faust store URL of ``ARCHSYNC_STATE_STORE`` (``disk``, the default, or ``memory``)."""
    raw = (env if env is not None else os.environ).get("ARCHSYNC_STATE_STORE", "").strip().lower() or "disk"
    try:
        return STORE_KINDS[raw]
    except KeyError:
        raise ConfigError("ARCHSYNC_STATE_STORE", f"unknown store {raw!r} (expected disk or memory)") from None


def memory_budget(env: dict[str, str] | None = None) -> int:
    """Bytes of recently used keys and values one table keeps in memory (``ARCHSYNC_STATE_MEMORY_MB``)."""
    return env_int("ARCHSYNC_STATE_MEMORY_MB", 32, minimum=1, env=env) * 2**20


class DiskStore(SerializedStore[Any, Any]):
    """A table's keys and values: the hot ones in memory, all of them in an unlinked SQLite file."""

    PAGE_CACHE_KIB = 8 * 1024  # SQLite's own cache of the file's pages
    COMMIT_EVERY = 1000  # writes per SQLite transaction (no journal, no fsync: nothing to roll back)

    def __init__(self, url: Any, app: Any, table: Any, **kwargs: Any) -> None:
        super().__init__(url, app, table, **kwargs)
        self.budget = memory_budget()
        # key → (partition or None, value); newest last. ``_dirty``: keys whose value is not in SQLite yet
        self._hot: OrderedDict[bytes, tuple[int | None, bytes]] = OrderedDict()
        self._dirty: set[bytes] = set()
        self._hot_bytes = 0
        self._uncommitted = 0
        self._db = self._open(Path(app.conf.tabledir))
        self._raw = self.key_serializer == "raw" and self.value_serializer == "raw"

    def _open(self, directory: Path) -> sqlite3.Connection:
        directory.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=f"{self.table_name}-", suffix=".sqlite", dir=directory)
        os.close(fd)
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "locking_mode=EXCLUSIVE", "temp_store=MEMORY"):
                db.execute(f"PRAGMA {pragma}")
            db.execute(f"PRAGMA cache_size=-{self.PAGE_CACHE_KIB}")
            db.execute("CREATE TABLE kv (key BLOB PRIMARY KEY, part INTEGER, value BLOB NOT NULL)")
        finally:
            os.unlink(path)  # private to this process; freed when it ends
        db.execute("BEGIN")
        return db

    # -- the hot cache

    @staticmethod
    def _partition() -> int | None:
        event = current_event()
        return event.message.partition if event is not None else None

    def _remember(self, key: bytes, part: int | None, value: bytes, *, dirty: bool) -> None:
        old = self._hot.pop(key, None)
        if old is not None:
            self._hot_bytes -= len(key) + len(old[1]) + ENTRY_OVERHEAD
        self._hot[key] = (part, value)
        self._hot_bytes += len(key) + len(value) + ENTRY_OVERHEAD
        if dirty:
            self._dirty.add(key)
        while self._hot_bytes > self.budget and len(self._hot) > 1:
            self._evict()

    def _evict(self) -> None:
        key, (part, value) = self._hot.popitem(last=False)
        self._hot_bytes -= len(key) + len(value) + ENTRY_OVERHEAD
        if key in self._dirty:
            self._dirty.discard(key)
            self._write(_UPSERT, (key, part, value))

    def _forget(self, key: bytes) -> None:
        old = self._hot.pop(key, None)
        if old is not None:
            self._hot_bytes -= len(key) + len(old[1]) + ENTRY_OVERHEAD
            self._dirty.discard(key)

    def _write(self, statement: str, params: tuple[Any, ...]) -> None:
        self._db.execute(statement, params)
        self._uncommitted += 1
        if self._uncommitted >= self.COMMIT_EVERY:
            self._commit()

    def _commit(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        self._uncommitted = 0

    def flush(self) -> None:
        """Write every value only the hot cache has to SQLite (before a query over all keys)."""
        if self._dirty:
            self._db.executemany(_UPSERT, [(k, *self._hot[k]) for k in self._dirty])
            self._dirty.clear()
        self._commit()

    # -- SerializedStore (keys and values of raw tables are stored as they are: no codec calls)

    def __getitem__(self, key: Any) -> Any:
        if not self._raw:
            return super().__getitem__(key)
        value = self._get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        if not self._raw:
            return super().__setitem__(key, value)
        return self._set(key, value)

    def raw_get(self, key: bytes) -> bytes | None:
        """The value of ``key`` in a raw table, None when absent."""
        return self._get(key)

    def _get(self, key: bytes) -> bytes | None:
        hot = self._hot.get(key)
        if hot is not None:
            self._hot.move_to_end(key)
            return hot[1]
        row = self._db.execute("SELECT part, value FROM kv WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        self._remember(key, row[0], row[1], dirty=False)
        return row[1]

    def _set(self, key: bytes, value: bytes | None) -> None:
        if value is None:
            self._del(key)
            return
        self._remember(key, self._partition(), value, dirty=True)

    def _del(self, key: bytes) -> None:
        self._forget(key)
        self._write("DELETE FROM kv WHERE key = ?", (key,))

    def _contains(self, key: bytes) -> bool:
        # a table's ``get`` asks ``in`` and then reads: a key found on disk is loaded into the hot
        # cache here, so the read that follows does not query SQLite again
        return self._get(key) is not None

    def _size(self) -> int:
        self.flush()
        return int(self._db.execute("SELECT count(*) FROM kv").fetchone()[0])

    def _iterkeys(self) -> Iterator[bytes]:
        for key, _ in self._iteritems():
            yield key

    def _itervalues(self) -> Iterator[bytes | None]:
        for _, value in self._iteritems():
            yield value

    ITER_CHUNK = 1000

    def _iteritems(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value, read ITER_CHUNK rows at a time in key order (memory bounded: all
        of a big table at once held hundreds of MB); each a statement of its own, so the table
        may change between chunks (a key written meanwhile may come with its new value or not)."""
        self.flush()
        last = b""
        while True:
            rows = self._db.execute(
                "SELECT key, value FROM kv WHERE key > ? ORDER BY key LIMIT ?", (last, self.ITER_CHUNK)
            ).fetchall()
            for key, value in rows:
                hot = self._hot.get(key)
                yield bytes(key), bytes(hot[1] if hot is not None else value)
            if len(rows) < self.ITER_CHUNK:
                return
            last = rows[-1][0]

    def _clear(self) -> None:
        self._hot.clear()
        self._dirty.clear()
        self._hot_bytes = 0
        self._write("DELETE FROM kv", ())

    def apply_changelog_batch(
        self, batch: Iterable[EventT], to_key: Callable[[Any], Any], to_value: Callable[[Any], Any]
    ) -> None:
        """Recovery: the changelog's records straight into SQLite (the last record of a key wins)."""
        last: dict[bytes, tuple[int, bytes | None]] = {}
        for event in batch:
            message = event.message
            if message.key is None:
                raise TypeError(f"changelog record without a key: {message}")
            last[message.key] = (message.partition, message.value)
        for key in last:
            self._forget(key)
        self._db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k, (_, v) in last.items() if v is None])
        self._db.executemany(_UPSERT, [(k, p, v) for k, (p, v) in last.items() if v is not None])
        self._commit()

    def persisted_offset(self, tp: TP) -> int | None:
        return None  # rebuilt from the changelog, like the memory store

    def reset_state(self) -> None:
        """Nothing on disk outlives the process."""

    async def on_recovery_completed(self, active_tps: set[TP], standby_tps: set[TP]) -> None:
        """Drop the keys of partitions no longer active here (as Faust's memory store does)."""
        partitions = {tp.partition for tp in active_tps}
        for key in [k for k, (part, _) in self._hot.items() if part is not None and part not in partitions]:
            self._forget(key)
        keep = ",".join(str(int(p)) for p in sorted(partitions))
        self._db.execute(f"DELETE FROM kv WHERE part IS NOT NULL AND part NOT IN ({keep})")
        self._commit()

    async def backup_partition(self, tp: TP | int, flush: bool = True, purge: bool = False, keep: int = 1) -> None:
        """No backups: the changelog is the copy."""

    def restore_backup(self, tp: TP | int, latest: bool = True, backup_id: int = 0) -> None:
        """No backups: the changelog is the copy."""

    async def stop(self) -> None:
        await super().stop()
        self._db.close()


def raw_reader(table: Any) -> Callable[[bytes], bytes | None]:
    """``table.get`` for a raw table (bytes keys and values) of a default of None, reading the disk
    store directly: a Faust table's ``get`` also calls the sensors (nothing here listens to table
    reads) and takes a KeyError round trip for a key it does not hold, ~4% of the worker's CPU on a
    burst (py-spy). With the memory store it is ``table.get``. The store is looked up at the first
    read (a table makes its store when it starts)."""
    read: Callable[[bytes], bytes | None] | None = None

    def get(key: bytes) -> bytes | None:
        nonlocal read
        if read is None:
            store = table.data
            read = store.raw_get if isinstance(store, DiskStore) and store._raw else table.get
        return read(key)

    return get
