"""Decoder (and test encoder) for PostgreSQL's ``pgoutput`` logical replication protocol.

Covers protocol version 1 as documented for PostgreSQL 15:

* logical replication messages (Begin, Commit, Origin, Relation, Type, Insert, Update, Delete,
  Truncate, Message) -- https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html
* the replication COPY sub-protocol frames (XLogData ``w``, primary keepalive ``k`` and the standby
  status update ``r``) -- https://www.postgresql.org/docs/15/protocol-replication.html

All integers are big-endian.  LSNs are unsigned 64-bit integers, timestamps are signed 64-bit
microseconds since 2000-01-01 00:00:00 UTC and are exposed as aware UTC datetimes.

The decoder is on the hot path: one ``bytes`` copy of a memoryview at most, precompiled ``Struct``
objects read in place with ``unpack_from``, dict dispatch on the message type byte, and a single
tight loop over the columns of a tuple.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Final, TypeAlias

__all__ = [
    "PG_EPOCH",
    "UNCHANGED_TOAST",
    "Begin",
    "Commit",
    "Delete",
    "Insert",
    "Message",
    "Origin",
    "PgOutputError",
    "PgOutputMessage",
    "PrimaryKeepalive",
    "Relation",
    "RelationColumn",
    "Truncate",
    "TupleData",
    "TupleValue",
    "TypeInfo",
    "UnchangedToast",
    "Update",
    "XLogData",
    "datetime_to_pg_micros",
    "decode_message",
    "encode_message",
    "lsn_to_str",
    "parse_copy_frame",
    "pg_micros_to_datetime",
    "standby_status_update",
    "str_to_lsn",
]


class PgOutputError(ValueError):
    """A pgoutput message or replication frame is truncated, malformed or of an unknown type."""


# --------------------------------------------------------------------------------------------------
# Unchanged TOAST marker
# --------------------------------------------------------------------------------------------------


class UnchangedToast:
    """Marker for a TOASTed column whose value did not change (tuple column kind ``'u'``).

    The real value is not sent by the server; it is *not* NULL.  There is exactly one instance,
    :data:`UNCHANGED_TOAST`; compare with ``is``.
    """

    __slots__ = ()
    _instance: ClassVar[UnchangedToast | None] = None

    def __new__(cls) -> UnchangedToast:
        inst = cls._instance
        if inst is None:
            inst = super().__new__(cls)
            cls._instance = inst
        return inst

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"

    def __reduce__(self) -> str:
        return "UNCHANGED_TOAST"

    def __copy__(self) -> UnchangedToast:
        return self

    def __deepcopy__(self, memo: object) -> UnchangedToast:
        return self


UNCHANGED_TOAST: Final[UnchangedToast] = UnchangedToast()

TupleValue: TypeAlias = str | bytes | UnchangedToast | None
TupleData: TypeAlias = tuple[TupleValue, ...]


# --------------------------------------------------------------------------------------------------
# Message types
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    origin_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class RelationColumn:
    is_key: bool
    name: str
    type_oid: int
    type_modifier: int


@dataclass(frozen=True, slots=True)
class Relation:
    oid: int
    namespace: str  # empty string for pg_catalog
    name: str
    replica_identity: str  # 'd' default, 'n' nothing, 'f' full, 'i' index
    columns: tuple[RelationColumn, ...]


@dataclass(frozen=True, slots=True)
class TypeInfo:
    """The ``'Y'`` (Type) message describing a non-builtin data type."""

    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    old: TupleData | None
    old_kind: str | None  # 'K' (replica identity key columns only), 'O' (whole old row) or None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old: TupleData
    old_kind: str  # 'K' or 'O'


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Message:
    """A logical decoding message emitted by ``pg_logical_emit_message``."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes


PgOutputMessage: TypeAlias = (
    Begin | Commit | Origin | Relation | TypeInfo | Insert | Update | Delete | Truncate | Message
)


@dataclass(frozen=True, slots=True)
class XLogData:
    """Replication ``'w'`` frame: a chunk of WAL data (one pgoutput message with pgoutput)."""

    data_start: int
    wal_end: int
    send_time: datetime
    payload: memoryview | bytes


@dataclass(frozen=True, slots=True)
class PrimaryKeepalive:
    """Replication ``'k'`` frame."""

    wal_end: int
    send_time: datetime
    reply_requested: bool


# --------------------------------------------------------------------------------------------------
# Time and LSN helpers
# --------------------------------------------------------------------------------------------------

PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_MICRO: Final = timedelta(microseconds=1)


def pg_micros_to_datetime(micros: int) -> datetime:
    """Microseconds since 2000-01-01 UTC -> aware UTC datetime.

    Raises OverflowError for values outside Python's datetime range (e.g. PostgreSQL's infinity).
    """
    return PG_EPOCH + timedelta(0, 0, micros)


def datetime_to_pg_micros(value: datetime) -> int:
    """Aware datetime -> microseconds since 2000-01-01 UTC.  Naive datetimes are rejected."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} has no time zone; use an aware datetime")
    return (value - PG_EPOCH) // _ONE_MICRO


_LSN_RE: Final = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")
_U64_MAX: Final = 0xFFFF_FFFF_FFFF_FFFF


def lsn_to_str(lsn: int) -> str:
    """Format an LSN as PostgreSQL prints it: ``16/B374D848`` (uppercase hex, no zero padding)."""
    if not 0 <= lsn <= _U64_MAX:
        raise ValueError(f"LSN {lsn} is outside the unsigned 64-bit range")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def str_to_lsn(text: str) -> int:
    """Parse ``'16/B374D848'`` (either case, surrounding whitespace ignored) into an integer LSN."""
    m = _LSN_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"invalid LSN {text[:80]!r}: expected two hex numbers of up to 8 digits, as 16/B374D848")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------

_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")  # final LSN, commit timestamp, xid
_COMMIT = struct.Struct("!BQQq")  # flags, commit LSN, end LSN, commit timestamp
_REL_COLUMN_TAIL = struct.Struct("!Ii")  # type OID, type modifier
_TRUNCATE_HEAD = struct.Struct("!IB")  # number of relations, option bits
_MESSAGE_HEAD = struct.Struct("!BQ")  # flags, LSN
_OID_AND_KIND = struct.Struct("!IB")  # relation OID, next submessage byte
_XLOG_HEAD = struct.Struct("!QQq")  # start LSN, server WAL end, send time
_KEEPALIVE = struct.Struct("!QqB")  # server WAL end, send time, reply requested
_STATUS_UPDATE = struct.Struct("!cQQQqB")

_K, _O, _NEW = 0x4B, 0x4F, 0x4E  # 'K', 'O', 'N'

_TRUNCATE_CASCADE: Final = 1
_TRUNCATE_RESTART_IDENTITY: Final = 2


class _Truncated(Exception):
    """Internal: a length field points past the end of the buffer."""


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.find(0, pos)
    if end < 0:
        raise _Truncated
    return buf[pos:end].decode(), end + 1


def _tuple(
    buf: bytes,
    pos: int,
    _u16: Callable[[bytes, int], tuple[int]] = _U16.unpack_from,
    _u32: Callable[[bytes, int], tuple[int]] = _U32.unpack_from,
    _toast: UnchangedToast = UNCHANGED_TOAST,
) -> tuple[TupleData, int]:
    # Hot loop: struct readers and the marker are bound as defaults (fast locals) and the kind bytes
    # are literals.  Lengths are unsigned, so ``pos`` only grows: one bounds check at the end catches
    # any value that ran past the buffer (a slice past the end is merely short).
    (ncols,) = _u16(buf, pos)
    pos += 2
    values: list[TupleValue] = []
    append = values.append
    for _ in range(ncols):
        kind = buf[pos]
        if kind == 116:  # 't' text
            start = pos + 5
            pos = start + _u32(buf, pos + 1)[0]
            append(buf[start:pos].decode())
        elif kind == 110:  # 'n' null
            append(None)
            pos += 1
        elif kind == 117:  # 'u' unchanged TOAST
            append(_toast)
            pos += 1
        elif kind == 98:  # 'b' binary
            start = pos + 5
            pos = start + _u32(buf, pos + 1)[0]
            append(buf[start:pos])
        else:
            raise PgOutputError(f"unknown tuple column kind {chr(kind)!r} (0x{kind:02x}) at offset {pos}")
    if pos > len(buf):
        raise _Truncated
    return tuple(values), pos


def _done(buf: bytes, pos: int) -> None:
    if pos != len(buf):
        raise PgOutputError(
            f"{len(buf) - pos} unexpected trailing byte(s) after {chr(buf[0])!r} message "
            f"(expected {pos} bytes, got {len(buf)}); is the publication using proto_version 1?"
        )


def _decode_begin(buf: bytes) -> Begin:
    final_lsn, ts, xid = _BEGIN.unpack_from(buf, 1)
    _done(buf, 21)
    return Begin(final_lsn, PG_EPOCH + timedelta(0, 0, ts), xid)


def _decode_commit(buf: bytes) -> Commit:
    flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(buf, 1)
    _done(buf, 26)
    return Commit(flags, commit_lsn, end_lsn, PG_EPOCH + timedelta(0, 0, ts))


def _decode_origin(buf: bytes) -> Origin:
    (lsn,) = _U64.unpack_from(buf, 1)
    name, pos = _cstring(buf, 9)
    _done(buf, pos)
    return Origin(lsn, name)


def _decode_relation(buf: bytes) -> Relation:
    (oid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    identity = buf[pos]
    (ncols,) = _U16.unpack_from(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(ncols):
        flags = buf[pos]
        col_name, pos = _cstring(buf, pos + 1)
        type_oid, type_mod = _REL_COLUMN_TAIL.unpack_from(buf, pos)
        pos += 8
        columns.append(RelationColumn(bool(flags & 1), col_name, type_oid, type_mod))
    _done(buf, pos)
    return Relation(oid, namespace, name, chr(identity), tuple(columns))


def _decode_type(buf: bytes) -> TypeInfo:
    (oid,) = _U32.unpack_from(buf, 1)
    namespace, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    _done(buf, pos)
    return TypeInfo(oid, namespace, name)


def _decode_insert(buf: bytes) -> Insert:
    oid, kind = _OID_AND_KIND.unpack_from(buf, 1)
    if kind != _NEW:
        raise PgOutputError(f"Insert message: expected 'N' before the new tuple, got {chr(kind)!r}")
    new, pos = _tuple(buf, 6)
    _done(buf, pos)
    return Insert(oid, new)


def _decode_update(buf: bytes) -> Update:
    oid, kind = _OID_AND_KIND.unpack_from(buf, 1)
    old: TupleData | None = None
    old_kind: str | None = None
    pos = 6
    if kind in (_K, _O):
        old_kind = "K" if kind == _K else "O"
        old, pos = _tuple(buf, pos)
        kind = buf[pos]
        pos += 1
    if kind != _NEW:
        raise PgOutputError(f"Update message: expected 'K', 'O' or 'N' submessage, got {chr(kind)!r}")
    new, pos = _tuple(buf, pos)
    _done(buf, pos)
    return Update(oid, old, old_kind, new)


def _decode_delete(buf: bytes) -> Delete:
    oid, kind = _OID_AND_KIND.unpack_from(buf, 1)
    if kind == _K:
        old_kind = "K"
    elif kind == _O:
        old_kind = "O"
    else:
        raise PgOutputError(f"Delete message: expected 'K' or 'O' submessage, got {chr(kind)!r}")
    old, pos = _tuple(buf, 6)
    _done(buf, pos)
    return Delete(oid, old, old_kind)


def _decode_truncate(buf: bytes) -> Truncate:
    nrels, options = _TRUNCATE_HEAD.unpack_from(buf, 1)
    end = 6 + 4 * nrels
    if end > len(buf):
        raise _Truncated
    oids = struct.unpack_from(f"!{nrels}I", buf, 6)
    _done(buf, end)
    return Truncate(oids, bool(options & _TRUNCATE_CASCADE), bool(options & _TRUNCATE_RESTART_IDENTITY))


def _decode_logical_message(buf: bytes) -> Message:
    flags, lsn = _MESSAGE_HEAD.unpack_from(buf, 1)
    prefix, pos = _cstring(buf, 10)
    (length,) = _I32.unpack_from(buf, pos)
    start = pos + 4
    end = start + length
    if end > len(buf) or end < start:
        raise _Truncated
    _done(buf, end)
    return Message(bool(flags & 1), lsn, prefix, buf[start:end])


_DECODERS: Final[dict[int, Callable[[bytes], PgOutputMessage]]] = {
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("O"): _decode_origin,
    ord("R"): _decode_relation,
    ord("Y"): _decode_type,
    ord("I"): _decode_insert,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("T"): _decode_truncate,
    ord("M"): _decode_logical_message,
}

_NAMES: Final = {
    ord("B"): "Begin",
    ord("C"): "Commit",
    ord("O"): "Origin",
    ord("R"): "Relation",
    ord("Y"): "Type",
    ord("I"): "Insert",
    ord("U"): "Update",
    ord("D"): "Delete",
    ord("T"): "Truncate",
    ord("M"): "Message",
}

# Known in later protocol versions / two-phase mode but not in proto_version 1.
_LATER_PROTOCOL: Final = {
    ord("S"): "Stream Start (proto_version 2)",
    ord("E"): "Stream Stop (proto_version 2)",
    ord("c"): "Stream Commit (proto_version 2)",
    ord("A"): "Stream Abort (proto_version 2)",
    ord("b"): "Begin Prepare (proto_version 3)",
    ord("P"): "Prepare (proto_version 3)",
    ord("K"): "Commit Prepared (proto_version 3)",
    ord("r"): "Rollback Prepared (proto_version 3)",
    ord("p"): "Stream Prepare (proto_version 3)",
}


def decode_message(buf: bytes | memoryview) -> PgOutputMessage:
    """Decode one pgoutput (proto_version 1) message, e.g. the payload of an XLogData frame."""
    if type(buf) is not bytes:
        buf = bytes(buf)
    if not buf:
        raise PgOutputError("empty pgoutput message")
    kind = buf[0]
    decoder = _DECODERS.get(kind)
    if decoder is None:
        later = _LATER_PROTOCOL.get(kind)
        detail = f" ({later}, not supported)" if later else ""
        raise PgOutputError(f"unknown pgoutput message type {chr(kind)!r} (0x{kind:02x}){detail}")
    try:
        return decoder(buf)
    except (struct.error, IndexError, _Truncated) as exc:
        raise PgOutputError(f"truncated pgoutput {_NAMES[kind]} message ({len(buf)} bytes)") from exc
    except UnicodeDecodeError as exc:
        raise PgOutputError(f"pgoutput {_NAMES[kind]} message holds invalid UTF-8: {exc}") from exc
    except OverflowError as exc:
        raise PgOutputError(f"pgoutput {_NAMES[kind]} message holds an out-of-range timestamp") from exc


# --------------------------------------------------------------------------------------------------
# Replication COPY frames
# --------------------------------------------------------------------------------------------------


def parse_copy_frame(buf: bytes | memoryview) -> XLogData | PrimaryKeepalive:
    """Parse one CopyData payload of a START_REPLICATION stream (``'w'`` or ``'k'`` frame).

    The XLogData payload is a zero-copy slice of ``buf`` (a memoryview if ``buf`` is one).
    """
    size = len(buf)
    if size == 0:
        raise PgOutputError("empty replication frame")
    kind = buf[0]
    if kind == 0x77:  # 'w'
        if size < 25:
            raise PgOutputError(f"truncated XLogData frame ({size} bytes, header needs 25)")
        start, wal_end, ts = _XLOG_HEAD.unpack_from(buf, 1)
        return XLogData(start, wal_end, _frame_time(ts), buf[25:])
    if kind == 0x6B:  # 'k'
        if size != 18:
            raise PgOutputError(f"primary keepalive frame must be 18 bytes, got {size}")
        wal_end, ts, reply = _KEEPALIVE.unpack_from(buf, 1)
        return PrimaryKeepalive(wal_end, _frame_time(ts), reply != 0)
    raise PgOutputError(f"unknown replication frame type {chr(kind)!r} (0x{kind:02x}); expected 'w' or 'k'")


def _frame_time(micros: int) -> datetime:
    try:
        return PG_EPOCH + timedelta(0, 0, micros)
    except OverflowError as exc:
        raise PgOutputError(f"replication frame holds an out-of-range timestamp ({micros})") from exc


def standby_status_update(
    written: int,
    flushed: int,
    applied: int,
    reply_requested: bool = False,
    now: datetime | None = None,
) -> bytes:
    """Build a Standby Status Update (``'r'``) frame, to be sent as CopyData.

    ``written``/``flushed``/``applied`` are the LSN of the last byte + 1 written, flushed and applied.
    """
    if now is None:
        now = datetime.now(UTC)
    try:
        return _STATUS_UPDATE.pack(
            b"r", written, flushed, applied, datetime_to_pg_micros(now), 1 if reply_requested else 0
        )
    except struct.error as exc:
        raise ValueError(f"standby status update: LSN out of unsigned 64-bit range ({exc})") from exc


# --------------------------------------------------------------------------------------------------
# Encoding (tests and benchmarks)
# --------------------------------------------------------------------------------------------------


def _enc_cstring(text: str) -> bytes:
    raw = text.encode()
    if b"\x00" in raw:
        raise ValueError(f"string {text[:80]!r} contains a NUL byte and cannot be sent in pgoutput")
    return raw + b"\x00"


def _enc_tuple(values: TupleData) -> bytes:
    parts = [_U16.pack(len(values))]
    for value in values:
        if value is None:
            parts.append(b"n")
        elif value is UNCHANGED_TOAST:
            parts.append(b"u")
        elif isinstance(value, str):
            raw = value.encode()
            parts.append(b"t" + _I32.pack(len(raw)) + raw)
        elif isinstance(value, bytes | bytearray | memoryview):
            raw = bytes(value)
            parts.append(b"b" + _I32.pack(len(raw)) + raw)
        else:
            raise TypeError(f"tuple value of type {type(value).__name__} cannot be encoded")
    return b"".join(parts)


def _enc_old_kind(kind: str | None) -> bytes:
    if kind == "K":
        return b"K"
    if kind == "O":
        return b"O"
    raise ValueError(f"old tuple kind must be 'K' or 'O', got {kind!r}")


def encode_message(msg: PgOutputMessage) -> bytes:
    """Encode a message exactly as pgoutput proto_version 1 sends it (inverse of decode_message)."""
    if isinstance(msg, Insert):
        return b"I" + _U32.pack(msg.relation_oid) + b"N" + _enc_tuple(msg.new)
    if isinstance(msg, Update):
        head = b"U" + _U32.pack(msg.relation_oid)
        if msg.old is None:
            if msg.old_kind is not None:
                raise ValueError("Update with old_kind set needs an old tuple")
            return head + b"N" + _enc_tuple(msg.new)
        return head + _enc_old_kind(msg.old_kind) + _enc_tuple(msg.old) + b"N" + _enc_tuple(msg.new)
    if isinstance(msg, Delete):
        return b"D" + _U32.pack(msg.relation_oid) + _enc_old_kind(msg.old_kind) + _enc_tuple(msg.old)
    if isinstance(msg, Begin):
        return b"B" + _BEGIN.pack(msg.final_lsn, datetime_to_pg_micros(msg.commit_ts), msg.xid)
    if isinstance(msg, Commit):
        return b"C" + _COMMIT.pack(msg.flags, msg.commit_lsn, msg.end_lsn, datetime_to_pg_micros(msg.commit_ts))
    if isinstance(msg, Relation):
        identity = msg.replica_identity.encode("ascii")
        if len(identity) != 1:
            raise ValueError(f"replica_identity must be one ASCII character, got {msg.replica_identity!r}")
        parts = [
            b"R",
            _U32.pack(msg.oid),
            _enc_cstring(msg.namespace),
            _enc_cstring(msg.name),
            identity,
            _U16.pack(len(msg.columns)),
        ]
        for col in msg.columns:
            parts.append(b"\x01" if col.is_key else b"\x00")
            parts.append(_enc_cstring(col.name))
            parts.append(_REL_COLUMN_TAIL.pack(col.type_oid, col.type_modifier))
        return b"".join(parts)
    if isinstance(msg, TypeInfo):
        return b"Y" + _U32.pack(msg.oid) + _enc_cstring(msg.namespace) + _enc_cstring(msg.name)
    if isinstance(msg, Truncate):
        options = (_TRUNCATE_CASCADE if msg.cascade else 0) | (
            _TRUNCATE_RESTART_IDENTITY if msg.restart_identity else 0
        )
        n = len(msg.relation_oids)
        return b"T" + _TRUNCATE_HEAD.pack(n, options) + struct.pack(f"!{n}I", *msg.relation_oids)
    if isinstance(msg, Origin):
        return b"O" + _U64.pack(msg.origin_lsn) + _enc_cstring(msg.name)
    if isinstance(msg, Message):
        content = bytes(msg.content)
        return (
            b"M"
            + _MESSAGE_HEAD.pack(1 if msg.transactional else 0, msg.lsn)
            + _enc_cstring(msg.prefix)
            + _I32.pack(len(content))
            + content
        )
    raise TypeError(f"cannot encode {type(msg).__name__} as a pgoutput message")
