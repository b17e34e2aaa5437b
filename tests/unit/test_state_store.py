"""The disk store of the worker's tables (processors/state_store.py): no Kafka needed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.types import TP

from archsync.errors import ConfigError
from processors.state_store import DiskStore, memory_budget, raw_reader, store_url


def new_store(tmp_path: Path, budget: int = 1 << 20) -> DiskStore:
    app = faust.App(
        "t-state", broker="kafka://localhost:1", store=store_url({}), datadir=str(tmp_path), autodiscover=False
    )
    table = app.Table("aggregates", default=None, partitions=4, key_type=bytes, value_type=bytes)
    store = table.data
    assert isinstance(store, DiskStore)
    store.budget = budget
    return store


def record(key: bytes, value: bytes | None, partition: int = 0) -> Any:
    return SimpleNamespace(message=SimpleNamespace(key=key, value=value, partition=partition))


def test_store_url_and_budget_from_the_environment() -> None:
    assert store_url({}) == "archsync-disk://"
    assert store_url({"ARCHSYNC_STATE_STORE": "Memory"}) == "memory://"
    with pytest.raises(ConfigError, match="ARCHSYNC_STATE_STORE"):
        store_url({"ARCHSYNC_STATE_STORE": "rocksdb"})
    assert memory_budget({}) == 32 * 2**20
    with pytest.raises(ConfigError, match="ARCHSYNC_STATE_MEMORY_MB"):
        memory_budget({"ARCHSYNC_STATE_MEMORY_MB": "0"})


def test_values_outlive_eviction_and_memory_stays_in_budget(tmp_path: Path) -> None:
    store = new_store(tmp_path, budget=64 * 1024)
    value = b"x" * 3000
    for i in range(200):
        store[b"k%d" % i] = value + b"%d" % i
    assert store._hot_bytes <= 64 * 1024
    assert len(store._hot) < 200  # most are only on disk now
    assert store[b"k0"] == value + b"0"  # evicted long ago, read back
    assert store[b"k199"] == value + b"199"
    store[b"k0"] = b"new"
    assert store[b"k0"] == b"new"
    assert len(store) == 200
    assert b"k5" in store and b"nope" not in store
    assert dict(store.items())[b"k0"] == b"new"
    del store[b"k5"]
    assert b"k5" not in store and len(store) == 199
    with pytest.raises(KeyError):
        store[b"k5"]
    assert list(tmp_path.rglob("*.sqlite")) == []  # the file is private: unlinked when opened


def test_recovery_last_record_of_a_key_wins_and_inactive_partitions_go(tmp_path: Path) -> None:
    store = new_store(tmp_path)
    store[b"a"] = b"stale in memory"
    store.apply_changelog_batch(
        [
            record(b"a", b"1", 0),
            record(b"b", b"1", 1),
            record(b"a", None, 0),
            record(b"a", b"2", 0),
            record(b"c", b"1", 2),
        ],
        to_key=lambda k: k,
        to_value=lambda v: v,
    )
    store.apply_changelog_batch([record(b"c", None, 2)], to_key=lambda k: k, to_value=lambda v: v)
    assert store[b"a"] == b"2" and store[b"b"] == b"1" and b"c" not in store
    asyncio.run(store.on_recovery_completed({TP("x-changelog", 0)}, set()))
    assert store[b"a"] == b"2" and b"b" not in store
    assert store.persisted_offset(TP("x-changelog", 0)) is None  # always rebuilt from the changelog


def test_iteration_goes_through_a_big_table_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(tmp_path, budget=8 * 1024)
    monkeypatch.setattr(DiskStore, "ITER_CHUNK", 7)
    for i in range(50):
        store[b"k%02d" % i] = b"v%d" % i
    store[b"k03"] = b"hot"  # a value only the hot cache has until the iteration flushes it
    items = list(store.items())
    assert [k for k, _ in items] == [b"k%02d" % i for i in range(50)]  # each key once, in order
    assert dict(items)[b"k03"] == b"hot" and dict(items)[b"k49"] == b"v49"
    assert list(store.keys()) == [k for k, _ in items]
    assert len(list(store.values())) == 50


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_raw_reader_reads_like_table_get(tmp_path: Path, kind: str) -> None:
    app = faust.App(
        "t-reader", broker="kafka://localhost:1", store=store_url({"ARCHSYNC_STATE_STORE": kind}),
        datadir=str(tmp_path), autodiscover=False,
    )  # fmt: skip
    table = app.Table("aggregates", default=None, partitions=4, key_type=bytes, value_type=bytes)
    read = raw_reader(table)
    table.data[b"k"] = b"v"
    assert read(b"k") == table.get(b"k") == b"v"
    assert read(b"absent") is table.get(b"absent") is None
    assert isinstance(table.data, DiskStore) == (kind == "disk")

