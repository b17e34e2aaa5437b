"""Capture on the real services: ops, types, TOAST, snapshot, own origin, dead letters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal

import pytest

from archsync.settings import Settings
from schemas.codec import UNCHANGED

from .capture_kit import CaptureThread, SourceFixture, consume


@pytest.fixture
def source(settings: Settings, unique: str) -> Iterator[SourceFixture]:
    src = SourceFixture(settings, unique, [f"cap_{unique}"])
    table = src.tables[0]
    src.sql(f"""CREATE TABLE {table} (
        id bigint PRIMARY KEY, amount numeric(20,4), paid_at timestamptz, due date, ok boolean,
        meta jsonb, blob bytea, ref uuid, tags text[], note text, big text)""")
    yield src
    src.cleanup()


def test_ops_and_types_arrive_as_committed(source: SourceFixture) -> None:
    t = source.tables[0]
    ref = uuid.uuid4()
    source.sql(f"INSERT INTO {t} (id, amount, note) VALUES (1, 5.0000, 'before capture')")  # snapshot row
    with CaptureThread(source) as cap:
        cap.wait_streaming()
        source.sql(
            f"INSERT INTO {t} VALUES (2, 12345678901234.5678, '2024-03-01 12:34:56.123456+08', '2024-02-29',"
            f" true, '{{\"a\": [1, 2]}}', '\\xdeadbeef', '{ref}', '{{x,\"y z\",NULL}}', 'n', NULL)",
            f"UPDATE {t} SET amount = -0.0001, note = 'changed' WHERE id = 2",
            f"DELETE FROM {t} WHERE id = 1",
            f"TRUNCATE {t}",
        )
        events = consume(source.settings, [source.topic(t)], lambda ev: sum(e["op"] == "t" for e in ev) >= 2)
    by_op = [(e["op"], (e["after"] or e["before"] or {}).get("id")) for e in events if e["op"] != "t"]
    assert by_op == [("r", 1), ("c", 2), ("u", 2), ("d", 1)] or sorted(by_op) == sorted(
        [("r", 1), ("c", 2), ("u", 2), ("d", 1)]
    )
    created = next(e for e in events if e["op"] == "c")
    after = created["after"]
    assert after["amount"] == Decimal("12345678901234.5678")
    assert after["paid_at"] == datetime(2024, 3, 1, 4, 34, 56, 123456, tzinfo=UTC)
    assert after["due"] == date(2024, 2, 29)
    assert after["ok"] is True
    assert after["meta"] == {"a": [1, 2]}
    assert after["blob"] == b"\xde\xad\xbe\xef"
    assert after["ref"] == ref
    assert after["tags"] == ["x", "y z", None]
    assert after["big"] is None
    updated = next(e for e in events if e["op"] == "u")
    assert updated["after"]["amount"] == Decimal("-0.0001")
    src = created["source"]
    assert src["system"] == "oa" and src["table"] == t and src["snapshot"] is False and src["commit_ts"]
    assert created["txn"]["order"] == 1 and created["txn"]["total"] == 1
    assert created["event_id"].startswith("oa:")
    snap = next(e for e in events if e["op"] == "r")
    assert snap["source"]["snapshot"] is True and snap["after"]["note"] == "before capture"
    # truncate reaches every partition
    assert {e["_partition"] for e in events if e["op"] == "t"} == {0, 1}
    # per-key order: the partition of id 2 holds c then u
    assert [e["op"] for e in events if (e["after"] or {}).get("id") == 2] == ["c", "u"]


def test_unchanged_toast_is_marked_not_null(source: SourceFixture) -> None:
    t = source.tables[0]
    with CaptureThread(source) as cap:
        cap.wait_streaming()
        source.sql(
            f"INSERT INTO {t} (id, note, big) SELECT 1, 'a', string_agg(md5(random()::text), '')"
            " FROM generate_series(1, 2000)",
            f"UPDATE {t} SET note = 'b' WHERE id = 1",
        )
        events = consume(source.settings, [source.topic(t)], lambda ev: len(ev) >= 2)
    insert, update = events[0], events[1]
    assert len(insert["after"]["big"]) == 64000
    assert update["op"] == "u" and update["after"]["note"] == "b"
    assert update["after"]["big"] is UNCHANGED


def test_own_origin_transactions_are_not_emitted(source: SourceFixture) -> None:
    t = source.tables[0]
    with CaptureThread(source) as cap:
        cap.wait_streaming()
        from connectors.postgres import connect

        with connect(source.settings.oa_dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_replication_origin WHERE roname = 'archsync_apply_oa'")
            if not exists.fetchone():
                conn.execute("SELECT pg_replication_origin_create('archsync_apply_oa')")
            conn.execute("SELECT pg_replication_origin_session_setup('archsync_apply_oa')")
            conn.execute(f"INSERT INTO {t} (id, note) VALUES (10, 'from our applier')")
            conn.execute("SELECT pg_replication_origin_session_reset()")
        source.sql(f"INSERT INTO {t} (id, note) VALUES (11, 'from a user')")
        events = consume(source.settings, [source.topic(t)], lambda ev: len(ev) >= 1, timeout=15)
        assert cap.service.stats.transactions >= 2
    assert [e["after"]["id"] for e in events] == [11]


def test_oversized_row_goes_to_dead_letters_and_stream_goes_on(settings: Settings, unique: str) -> None:
    src = SourceFixture(settings, unique, [f"big_{unique}"], extra="    max_message_bytes: 20000\n")
    t = src.tables[0]
    src.sql(f"CREATE TABLE {t} (id int PRIMARY KEY, body text)")
    try:
        with CaptureThread(src) as cap:
            cap.wait_streaming()
            src.sql(
                f"INSERT INTO {t} SELECT 1, string_agg(md5(i::text), '') FROM generate_series(1, 2000) i",
                f"INSERT INTO {t} VALUES (2, 'small')",
            )
            events = consume(settings, [src.topic(t)], lambda ev: len(ev) >= 1, timeout=30)
            dead = consume(
                settings,
                [f"{src.prefix}.dlq.capture"],
                lambda ev: len(ev) >= 1,
                timeout=30,
                dead_letters=True,
            )
        assert [e["after"]["id"] for e in events] == [2]
        assert len(dead) == 1 and "over the 20000-byte limit" in dead[0]["reason"]
        assert dead[0]["source_table"] == f"public.{t}" and dead[0]["source_lsn"]
    finally:
        src.cleanup()
