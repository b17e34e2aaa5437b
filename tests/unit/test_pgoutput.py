"""Unit tests for connectors.pgoutput: pgoutput proto_version 1 messages and replication frames.

Most byte strings are written out by hand following
https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html and
https://www.postgresql.org/docs/15/protocol-replication.html, independently of encode_message.
"""

from __future__ import annotations

import contextlib
import copy
import pickle
import random
import struct
from datetime import UTC, datetime, timedelta, timezone

import pytest

from connectors.pgoutput import (
    PG_EPOCH,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputError,
    PgOutputMessage,
    PrimaryKeepalive,
    Relation,
    RelationColumn,
    Truncate,
    TupleData,
    TypeInfo,
    UnchangedToast,
    Update,
    XLogData,
    datetime_to_pg_micros,
    decode_message,
    encode_message,
    lsn_to_str,
    parse_copy_frame,
    pg_micros_to_datetime,
    standby_status_update,
    str_to_lsn,
)

# 2024-03-01 12:34:56.123456 UTC as microseconds since 2000-01-01 UTC
TS = datetime(2024, 3, 1, 12, 34, 56, 123456, tzinfo=UTC)
TS_MICROS = 762_611_696_123_456  # 8826 days * 86400 s + 45296 s, then the micros


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def i16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def i32(n: int) -> bytes:
    return n.to_bytes(4, "big", signed=True)


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def i64(n: int) -> bytes:
    return n.to_bytes(8, "big", signed=True)


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def text_col(value: str) -> bytes:
    raw = value.encode()
    return b"t" + i32(len(raw)) + raw


# --------------------------------------------------------------------------------------------------
# Time and LSN helpers
# --------------------------------------------------------------------------------------------------


def test_ts_constant_is_consistent() -> None:
    assert (TS - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) == TS_MICROS


def test_pg_micros_to_datetime() -> None:
    assert pg_micros_to_datetime(0) == datetime(2000, 1, 1, tzinfo=UTC)
    assert pg_micros_to_datetime(0).tzinfo is UTC
    assert pg_micros_to_datetime(TS_MICROS) == TS
    assert pg_micros_to_datetime(-1) == datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    assert datetime(2000, 1, 1, tzinfo=UTC) == PG_EPOCH


def test_datetime_to_pg_micros() -> None:
    assert datetime_to_pg_micros(TS) == TS_MICROS
    assert datetime_to_pg_micros(datetime(2000, 1, 1, tzinfo=UTC)) == 0
    # Other offsets are converted to the same instant.
    plus2 = TS.astimezone(timezone(timedelta(hours=2)))
    assert datetime_to_pg_micros(plus2) == TS_MICROS
    assert datetime_to_pg_micros(datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)) == -1


def test_datetime_to_pg_micros_rejects_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        datetime_to_pg_micros(datetime(2024, 1, 1))


def test_micros_round_trip_random() -> None:
    rng = random.Random(7)
    for _ in range(1000):
        micros = rng.randrange(-(2**55), 2**55)
        assert datetime_to_pg_micros(pg_micros_to_datetime(micros)) == micros


@pytest.mark.parametrize(
    ("lsn", "text"),
    [
        (0, "0/0"),
        (0x16B374D848, "16/B374D848"),
        (0x1_0000_0000, "1/0"),
        (0xFF, "0/FF"),
        (0xFFFF_FFFF_FFFF_FFFF, "FFFFFFFF/FFFFFFFF"),
        (0x0000_0001_0000_00A0, "1/A0"),
    ],
)
def test_lsn_round_trip(lsn: int, text: str) -> None:
    assert lsn_to_str(lsn) == text
    assert str_to_lsn(text) == lsn


def test_str_to_lsn_accepts_lowercase_padding_and_whitespace() -> None:
    assert str_to_lsn("16/b374d848") == 0x16B374D848
    assert str_to_lsn("00000016/0B374D84") == 0x160B374D84
    assert str_to_lsn(" 0/1\n") == 1


@pytest.mark.parametrize(
    "bad", ["", "16", "16/", "/1", "1/2/3", "G/0", "123456789/0", "0/123456789", "-1/0", "+1/0", "1_0/0"]
)
def test_str_to_lsn_rejects(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid LSN"):
        str_to_lsn(bad)


@pytest.mark.parametrize("bad", [-1, 2**64])
def test_lsn_to_str_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        lsn_to_str(bad)


# --------------------------------------------------------------------------------------------------
# UNCHANGED_TOAST
# --------------------------------------------------------------------------------------------------


def test_unchanged_toast_singleton() -> None:
    assert UnchangedToast() is UNCHANGED_TOAST
    assert UNCHANGED_TOAST is not None
    assert UNCHANGED_TOAST != None  # noqa: E711
    assert repr(UNCHANGED_TOAST) == "UNCHANGED_TOAST"
    assert copy.copy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert copy.deepcopy(UNCHANGED_TOAST) is UNCHANGED_TOAST
    assert pickle.loads(pickle.dumps(UNCHANGED_TOAST)) is UNCHANGED_TOAST


# --------------------------------------------------------------------------------------------------
# Hand-built messages
# --------------------------------------------------------------------------------------------------


def test_begin() -> None:
    raw = b"B" + u64(0x16B374D848) + i64(TS_MICROS) + u32(0xFFFF_FFF0)
    assert len(raw) == 21
    msg = decode_message(raw)
    assert msg == Begin(final_lsn=0x16B374D848, commit_ts=TS, xid=0xFFFF_FFF0)
    assert isinstance(msg, Begin)
    assert msg.commit_ts.tzinfo is UTC
    assert encode_message(msg) == raw


def test_commit() -> None:
    raw = b"C" + u8(0) + u64(0x16B374D848) + u64(0x16B374D878) + i64(TS_MICROS)
    assert len(raw) == 26
    msg = decode_message(raw)
    assert msg == Commit(flags=0, commit_lsn=0x16B374D848, end_lsn=0x16B374D878, commit_ts=TS)
    assert encode_message(msg) == raw


def test_origin() -> None:
    raw = b"O" + u64(0xABCDEF) + b"node_a\x00"
    msg = decode_message(raw)
    assert msg == Origin(origin_lsn=0xABCDEF, name="node_a")
    assert encode_message(msg) == raw


def test_relation() -> None:
    raw = (
        b"R"
        + u32(16384)
        + b"public\x00"
        + b"voucher\x00"
        + b"d"
        + i16(3)
        + u8(1)
        + b"id\x00"
        + u32(20)
        + i32(-1)
        + u8(0)
        + b"amount\x00"
        + u32(1700)
        + i32(((12 << 16) | 2) + 4)  # numeric(12,2) typmod
        + u8(0)
        + "名称".encode()
        + b"\x00"
        + u32(1043)
        + i32(64 + 4)
    )
    msg = decode_message(raw)
    assert msg == Relation(
        oid=16384,
        namespace="public",
        name="voucher",
        replica_identity="d",
        columns=(
            RelationColumn(is_key=True, name="id", type_oid=20, type_modifier=-1),
            RelationColumn(is_key=False, name="amount", type_oid=1700, type_modifier=786438),
            RelationColumn(is_key=False, name="名称", type_oid=1043, type_modifier=68),
        ),
    )
    assert encode_message(msg) == raw


def test_relation_pg_catalog_namespace_is_empty_and_no_columns() -> None:
    raw = b"R" + u32(1259) + b"\x00" + b"pg_class\x00" + b"n" + i16(0)
    msg = decode_message(raw)
    assert msg == Relation(oid=1259, namespace="", name="pg_class", replica_identity="n", columns=())


@pytest.mark.parametrize("identity", ["d", "n", "f", "i"])
def test_relation_replica_identities(identity: str) -> None:
    raw = b"R" + u32(1) + b"s\x00t\x00" + identity.encode() + i16(0)
    msg = decode_message(raw)
    assert isinstance(msg, Relation)
    assert msg.replica_identity == identity


def test_type_message() -> None:
    raw = b"Y" + u32(98765) + b"public\x00" + b"approval_state\x00"
    msg = decode_message(raw)
    assert msg == TypeInfo(oid=98765, namespace="public", name="approval_state")
    assert encode_message(msg) == raw


def test_insert_all_column_kinds() -> None:
    raw = (
        b"I"
        + u32(16384)
        + b"N"
        + i16(5)
        + text_col("42")
        + b"n"
        + b"u"
        + b"b"
        + i32(3)
        + b"\x00\x01\xff"
        + text_col("héllo, 世界")
    )
    msg = decode_message(raw)
    assert msg == Insert(relation_oid=16384, new=("42", None, UNCHANGED_TOAST, b"\x00\x01\xff", "héllo, 世界"))
    assert isinstance(msg, Insert)
    assert msg.new[1] is None
    assert msg.new[2] is UNCHANGED_TOAST
    assert isinstance(msg.new[3], bytes)
    assert encode_message(msg) == raw


def test_insert_empty_text_and_zero_columns() -> None:
    assert decode_message(b"I" + u32(1) + b"N" + i16(1) + b"t" + i32(0)) == Insert(1, ("",))
    assert decode_message(b"I" + u32(1) + b"N" + i16(0)) == Insert(1, ())


def test_update_without_old_tuple() -> None:
    raw = b"U" + u32(16384) + b"N" + i16(2) + text_col("1") + text_col("new")
    msg = decode_message(raw)
    assert msg == Update(relation_oid=16384, old=None, old_kind=None, new=("1", "new"))
    assert encode_message(msg) == raw


def test_update_with_key_old_tuple() -> None:
    # REPLICA IDENTITY DEFAULT and the key changed: old holds the key columns, the rest are null.
    raw = b"U" + u32(16384) + b"K" + i16(2) + text_col("1") + b"n" + b"N" + i16(2) + text_col("2") + text_col("x")
    msg = decode_message(raw)
    assert msg == Update(relation_oid=16384, old=("1", None), old_kind="K", new=("2", "x"))
    assert encode_message(msg) == raw


def test_update_with_full_old_tuple_and_toast() -> None:
    # REPLICA IDENTITY FULL: the whole old row; an unchanged TOASTed column stays 'u' in the new row.
    raw = (
        b"U"
        + u32(7)
        + b"O"
        + i16(3)
        + text_col("1")
        + text_col("old")
        + text_col("big")
        + b"N"
        + i16(3)
        + text_col("1")
        + text_col("new")
        + b"u"
    )
    msg = decode_message(raw)
    assert msg == Update(relation_oid=7, old=("1", "old", "big"), old_kind="O", new=("1", "new", UNCHANGED_TOAST))
    assert isinstance(msg, Update)
    assert msg.new[2] is UNCHANGED_TOAST
    assert msg.new[2] is not None
    assert encode_message(msg) == raw


@pytest.mark.parametrize("kind", ["K", "O"])
def test_delete(kind: str) -> None:
    raw = b"D" + u32(16384) + kind.encode() + i16(2) + text_col("1") + b"n"
    msg = decode_message(raw)
    assert msg == Delete(relation_oid=16384, old=("1", None), old_kind=kind)
    assert encode_message(msg) == raw


@pytest.mark.parametrize(
    ("options", "cascade", "restart"),
    [(0, False, False), (1, True, False), (2, False, True), (3, True, True)],
)
def test_truncate(options: int, cascade: bool, restart: bool) -> None:
    raw = b"T" + u32(2) + u8(options) + u32(16384) + u32(16390)
    msg = decode_message(raw)
    assert msg == Truncate(relation_oids=(16384, 16390), cascade=cascade, restart_identity=restart)
    assert encode_message(msg) == raw


def test_logical_message() -> None:
    raw = b"M" + u8(1) + u64(0x16B374D848) + b"archsync\x00" + i32(5) + b"hel\x00o"
    msg = decode_message(raw)
    assert msg == Message(transactional=True, lsn=0x16B374D848, prefix="archsync", content=b"hel\x00o")
    assert encode_message(msg) == raw
    raw_nt = b"M" + u8(0) + u64(1) + b"p\x00" + i32(0)
    assert decode_message(raw_nt) == Message(transactional=False, lsn=1, prefix="p", content=b"")


def test_decode_accepts_memoryview_and_bytearray() -> None:
    raw = b"I" + u32(1) + b"N" + i16(1) + text_col("v")
    expected = Insert(1, ("v",))
    assert decode_message(memoryview(raw)) == expected
    assert decode_message(memoryview(b"xx" + raw)[2:]) == expected
    assert decode_message(bytearray(raw)) == expected  # type: ignore[arg-type]


def test_decoded_values_are_plain_bytes_not_views() -> None:
    raw = b"I" + u32(1) + b"N" + i16(1) + b"b" + i32(2) + b"\x01\x02"
    msg = decode_message(memoryview(raw))
    assert isinstance(msg, Insert)
    assert type(msg.new[0]) is bytes


def test_messages_are_frozen_and_hashable() -> None:
    msg = Insert(1, ("a", None, UNCHANGED_TOAST))
    with pytest.raises(AttributeError):
        msg.relation_oid = 2  # type: ignore[misc]
    assert hash(msg) == hash(Insert(1, ("a", None, UNCHANGED_TOAST)))
    assert not hasattr(msg, "__dict__")


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

VALID_MESSAGES: list[bytes] = [
    b"B" + u64(1) + i64(TS_MICROS) + u32(5),
    b"C" + u8(0) + u64(1) + u64(2) + i64(TS_MICROS),
    b"O" + u64(1) + b"origin\x00",
    b"R" + u32(1) + b"public\x00t\x00d" + i16(1) + u8(1) + b"id\x00" + u32(23) + i32(-1),
    b"Y" + u32(1) + b"public\x00mood\x00",
    b"I" + u32(1) + b"N" + i16(2) + text_col("abc") + b"b" + i32(1) + b"\x00",
    b"U" + u32(1) + b"K" + i16(1) + text_col("1") + b"N" + i16(1) + text_col("2"),
    b"D" + u32(1) + b"O" + i16(1) + text_col("1"),
    b"T" + u32(2) + u8(0) + u32(1) + u32(2),
    b"M" + u8(1) + u64(1) + b"p\x00" + i32(3) + b"abc",
]


@pytest.mark.parametrize("raw", VALID_MESSAGES, ids=lambda r: chr(r[0]))
def test_every_truncation_raises(raw: bytes) -> None:
    decode_message(raw)  # the full message is fine
    for cut in range(len(raw)):
        with pytest.raises(PgOutputError):
            decode_message(raw[:cut])


@pytest.mark.parametrize("raw", VALID_MESSAGES, ids=lambda r: chr(r[0]))
def test_trailing_bytes_raise(raw: bytes) -> None:
    with pytest.raises(PgOutputError, match="trailing"):
        decode_message(raw + b"\x00")


def test_empty_buffer() -> None:
    with pytest.raises(PgOutputError, match="empty"):
        decode_message(b"")


@pytest.mark.parametrize("kind", [b"Z", b"\x00", b"\xff", b"x"])
def test_unknown_message_type(kind: bytes) -> None:
    with pytest.raises(PgOutputError, match="unknown pgoutput message type"):
        decode_message(kind + b"\x00" * 30)


@pytest.mark.parametrize("kind", [b"S", b"E", b"c", b"A"])
def test_streaming_messages_are_rejected_with_a_hint(kind: bytes) -> None:
    with pytest.raises(PgOutputError, match="proto_version 2"):
        decode_message(kind + b"\x00" * 10)


def test_pg_output_error_is_value_error() -> None:
    assert issubclass(PgOutputError, ValueError)


def test_unknown_tuple_column_kind() -> None:
    with pytest.raises(PgOutputError, match="tuple column kind 'x'"):
        decode_message(b"I" + u32(1) + b"N" + i16(1) + b"x")


def test_insert_without_new_marker() -> None:
    with pytest.raises(PgOutputError, match="'N'"):
        decode_message(b"I" + u32(1) + b"K" + i16(0))


def test_update_with_bad_submessage() -> None:
    with pytest.raises(PgOutputError, match="'K', 'O' or 'N'"):
        decode_message(b"U" + u32(1) + b"X" + i16(0))
    with pytest.raises(PgOutputError, match="'K', 'O' or 'N'"):
        # old tuple present but followed by something other than 'N'
        decode_message(b"U" + u32(1) + b"K" + i16(0) + b"K" + i16(0))


def test_delete_with_bad_submessage() -> None:
    with pytest.raises(PgOutputError, match="'K' or 'O'"):
        decode_message(b"D" + u32(1) + b"N" + i16(0))


def test_length_past_end_raises() -> None:
    with pytest.raises(PgOutputError, match="truncated"):
        decode_message(b"I" + u32(1) + b"N" + i16(1) + b"t" + i32(100) + b"abc")
    with pytest.raises(PgOutputError, match="truncated"):
        decode_message(b"I" + u32(1) + b"N" + i16(1) + b"b" + i32(-1) + b"abc")
    with pytest.raises(PgOutputError, match="truncated"):
        decode_message(b"M" + u8(1) + u64(1) + b"p\x00" + i32(-1))
    with pytest.raises(PgOutputError, match="truncated"):
        decode_message(b"T" + u32(1_000_000) + u8(0) + u32(1))


def test_invalid_utf8_raises() -> None:
    with pytest.raises(PgOutputError, match="UTF-8"):
        decode_message(b"I" + u32(1) + b"N" + i16(1) + b"t" + i32(2) + b"\xff\xfe")


def test_random_garbage_only_raises_pgoutput_error() -> None:
    rng = random.Random(1234)
    kinds = b"BCORYIUDTM"
    for _ in range(3000):
        size = rng.randrange(0, 60)
        raw = bytes([rng.choice(kinds)]) + rng.randbytes(size)
        with contextlib.suppress(PgOutputError):
            decode_message(raw)


def test_random_corruption_of_valid_messages() -> None:
    rng = random.Random(99)
    for _ in range(3000):
        raw = bytearray(rng.choice(VALID_MESSAGES))
        pos = rng.randrange(1, len(raw))
        raw[pos] = rng.randrange(256)
        with contextlib.suppress(PgOutputError):
            decode_message(bytes(raw))


# --------------------------------------------------------------------------------------------------
# Round trips via encode_message
# --------------------------------------------------------------------------------------------------


def _random_text(rng: random.Random) -> str:
    alphabet = "abcXYZ 019,{}\"\\'\n\t€日本語😀"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))


def _random_tuple(rng: random.Random, ncols: int) -> TupleData:
    values: list[str | bytes | UnchangedToast | None] = []
    for _ in range(ncols):
        pick = rng.randrange(4)
        if pick == 0:
            values.append(None)
        elif pick == 1:
            values.append(UNCHANGED_TOAST)
        elif pick == 2:
            values.append(rng.randbytes(rng.randrange(0, 10)))
        else:
            values.append(_random_text(rng))
    return tuple(values)


def _random_ts(rng: random.Random) -> datetime:
    return pg_micros_to_datetime(rng.randrange(-(2**50), 2**50))


def _random_message(rng: random.Random) -> PgOutputMessage:
    lsn = rng.randrange(2**64)
    oid = rng.randrange(2**32)
    kind = rng.randrange(10)
    if kind == 0:
        return Begin(lsn, _random_ts(rng), rng.randrange(2**32))
    if kind == 1:
        return Commit(rng.randrange(256), lsn, rng.randrange(2**64), _random_ts(rng))
    if kind == 2:
        return Origin(lsn, _random_text(rng).replace("\x00", ""))
    if kind == 3:
        columns = tuple(
            RelationColumn(rng.random() < 0.3, _random_text(rng), rng.randrange(2**32), rng.randrange(-(2**31), 2**31))
            for _ in range(rng.randrange(0, 6))
        )
        return Relation(oid, _random_text(rng), _random_text(rng), rng.choice("dnfi"), columns)
    if kind == 4:
        return TypeInfo(oid, _random_text(rng), _random_text(rng))
    ncols = rng.randrange(0, 8)
    if kind == 5:
        return Insert(oid, _random_tuple(rng, ncols))
    if kind == 6:
        old_kind = rng.choice([None, "K", "O"])
        old = None if old_kind is None else _random_tuple(rng, ncols)
        return Update(oid, old, old_kind, _random_tuple(rng, ncols))
    if kind == 7:
        return Delete(oid, _random_tuple(rng, ncols), rng.choice("KO"))
    if kind == 8:
        oids = tuple(rng.randrange(2**32) for _ in range(rng.randrange(0, 5)))
        return Truncate(oids, rng.random() < 0.5, rng.random() < 0.5)
    return Message(rng.random() < 0.5, lsn, _random_text(rng), rng.randbytes(rng.randrange(0, 20)))


def test_round_trip_random_messages() -> None:
    rng = random.Random(20240301)
    for _ in range(3000):
        msg = _random_message(rng)
        raw = encode_message(msg)
        assert decode_message(raw) == msg
        assert decode_message(memoryview(raw)) == msg
        assert encode_message(decode_message(raw)) == raw


def test_round_trip_commit_ts_with_non_utc_offset() -> None:
    ts = datetime(2024, 3, 1, 18, 4, 56, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    decoded = decode_message(encode_message(Begin(1, ts, 2)))
    assert isinstance(decoded, Begin)
    assert decoded.commit_ts == TS
    assert decoded.commit_ts.tzinfo is UTC


def test_encode_rejects_inconsistent_messages() -> None:
    with pytest.raises(ValueError):
        encode_message(Update(1, None, "K", ()))
    with pytest.raises(ValueError):
        encode_message(Update(1, (), None, ()))
    with pytest.raises(ValueError):
        encode_message(Delete(1, (), "N"))
    with pytest.raises(ValueError, match="NUL"):
        encode_message(TypeInfo(1, "a\x00b", "t"))
    with pytest.raises(ValueError):
        encode_message(Relation(1, "s", "t", "dd", ()))
    with pytest.raises(TypeError):
        encode_message(Insert(1, (123,)))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode_message("not a message")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Replication COPY frames
# --------------------------------------------------------------------------------------------------


def test_parse_xlogdata_frame() -> None:
    payload = b"I" + u32(1) + b"N" + i16(1) + text_col("v")
    raw = b"w" + u64(0x16B374D848) + u64(0x16B374E000) + i64(TS_MICROS) + payload
    frame = parse_copy_frame(raw)
    assert frame == XLogData(data_start=0x16B374D848, wal_end=0x16B374E000, send_time=TS, payload=payload)
    assert isinstance(frame, XLogData)
    assert decode_message(frame.payload) == Insert(1, ("v",))


def test_parse_xlogdata_frame_memoryview_payload_is_zero_copy() -> None:
    payload = b"B" + u64(1) + i64(0) + u32(2)
    raw = bytearray(b"w" + u64(1) + u64(2) + i64(0) + payload)
    frame = parse_copy_frame(memoryview(raw))
    assert isinstance(frame, XLogData)
    assert isinstance(frame.payload, memoryview)
    assert bytes(frame.payload) == payload
    raw[25] = ord("C")  # shares the caller's buffer
    assert bytes(frame.payload[:1]) == b"C"


def test_parse_xlogdata_empty_payload() -> None:
    frame = parse_copy_frame(b"w" + u64(1) + u64(2) + i64(0))
    assert isinstance(frame, XLogData)
    assert frame.payload == b""


@pytest.mark.parametrize("reply", [0, 1])
def test_parse_keepalive(reply: int) -> None:
    raw = b"k" + u64(0x16B374D848) + i64(TS_MICROS) + u8(reply)
    frame = parse_copy_frame(raw)
    assert frame == PrimaryKeepalive(wal_end=0x16B374D848, send_time=TS, reply_requested=bool(reply))
    assert parse_copy_frame(memoryview(raw)) == frame


def test_parse_copy_frame_errors() -> None:
    with pytest.raises(PgOutputError, match="empty"):
        parse_copy_frame(b"")
    with pytest.raises(PgOutputError, match="XLogData"):
        parse_copy_frame(b"w" + b"\x00" * 23)
    with pytest.raises(PgOutputError, match="keepalive"):
        parse_copy_frame(b"k" + b"\x00" * 16)
    with pytest.raises(PgOutputError, match="keepalive"):
        parse_copy_frame(b"k" + b"\x00" * 18)
    with pytest.raises(PgOutputError, match="unknown replication frame"):
        parse_copy_frame(b"r" + b"\x00" * 33)
    with pytest.raises(PgOutputError, match="out-of-range"):
        parse_copy_frame(b"k" + u64(0) + i64(2**63 - 1) + u8(0))


def test_standby_status_update_layout() -> None:
    raw = standby_status_update(0x10, 0x20, 0x30, reply_requested=True, now=TS)
    assert len(raw) == 34
    assert raw == b"r" + u64(0x10) + u64(0x20) + u64(0x30) + i64(TS_MICROS) + b"\x01"
    assert struct.unpack("!cQQQqB", raw) == (b"r", 0x10, 0x20, 0x30, TS_MICROS, 1)
    assert standby_status_update(1, 2, 3, now=TS)[-1] == 0


def test_standby_status_update_defaults_to_now() -> None:
    before = datetime_to_pg_micros(datetime.now(UTC))
    raw = standby_status_update(0, 0, 0)
    after = datetime_to_pg_micros(datetime.now(UTC))
    (clock,) = struct.unpack_from("!q", raw, 25)
    assert before <= clock <= after


def test_standby_status_update_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        standby_status_update(-1, 0, 0, now=TS)
    with pytest.raises(ValueError):
        standby_status_update(2**64, 0, 0, now=TS)
    with pytest.raises(ValueError, match="naive"):
        standby_status_update(0, 0, 0, now=datetime(2024, 1, 1))
