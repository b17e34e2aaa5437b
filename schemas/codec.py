"""Avro encoding of archsync change events (``change_event.v1``) and dead letters (``dead_letter.v1``).

Row values (``event["before"]`` / ``event["after"]``, column name -> value) are plain Python values
as produced by ``connectors.pgtypes``; each becomes a ``Cell`` of the envelope:

    None -> null, bool -> boolean, int -> long, float -> double, str -> string, bytes -> bytes,
    Decimal -> Decimal{value} (exact text, NaN/Infinity too), aware datetime -> TimestampTz (UTC micros),
    naive datetime -> LocalTimestamp, date -> Date, UUID -> Uuid, dict / JsonValue -> Json (canonical
    text), list/tuple -> Array (nested for multi-dimensional arrays), unchanged TOAST -> Unchanged,
    unknown type -> Unknown{type_name, text}.

Duck typing, so this module does not import the connectors: any object whose class is named
``UnchangedToast`` is the unchanged-TOAST marker, and any object with ``type_name`` and ``text``
attributes (``UnknownValue(type_oid, type_name, text)``) is an unknown value.

JSON columns: a parsed json/jsonb value that is not a dict (a list, string, number, boolean) looks
like an array or a plain scalar. Pass ``json_columns=`` to :meth:`ChangeEventCodec.encode` (the names
of the json/jsonb columns of the relation) or wrap the value in :class:`JsonValue`. ``None`` in a
JSON column is SQL NULL; ``JsonValue(None)`` is the JSON ``null``.

Decoding gives the same Python values back (aware datetimes in UTC), :data:`UNCHANGED` (or the injected
sentinel) for unchanged TOAST and :class:`UnknownText` (or the injected factory) for unknown values.

Speed: the fastavro writer resolves every union by validating the datum against each branch, which
costs ~3 us per cell; the capture path needs ~10 us per row for everything. ``ChangeEventCodec``
therefore uses an encoder/decoder written for this one schema (it checks the schema's fingerprint at
start-up). ``engine="fastavro"`` runs the same conversion through ``fastavro.schemaless_writer`` /
``schemaless_reader`` with tuple notation; the tests assert both produce identical bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
import struct
import time
from collections.abc import Callable, Collection, Mapping
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, ClassVar, Final
from uuid import UUID

import fastavro
import orjson
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas import registry

__all__ = [
    "CHANGE_EVENT_SCHEMA",
    "DEAD_LETTER_SCHEMA",
    "OPS",
    "UNCHANGED",
    "ChangeEventCodec",
    "DeadLetterCodec",
    "JsonValue",
    "UnknownText",
    "event_id",
    "from_cell",
    "key_bytes",
    "register_type",
    "to_cell",
    "to_json",
]

CHANGE_EVENT_SCHEMA: Final = "change_event.v1"
DEAD_LETTER_SCHEMA: Final = "dead_letter.v1"
# CRC-64-AVRO of the parsing canonical form of change_event.v1: the hand-written codec below encodes
# exactly this schema (published versions are immutable; a v2 needs a new codec version).
_CHANGE_EVENT_V1_FINGERPRINT: Final = "148b650fc69cce35"

NS: Final = "io.archsync."
OPS: Final = ("c", "u", "d", "r", "t")


# ------------------------------------------------------------------------------ value types


class _Unchanged:
    """Type of :data:`UNCHANGED`: an unchanged TOAST column (not the same as NULL)."""

    __slots__ = ()
    _instance: ClassVar[_Unchanged | None] = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"

    def __reduce__(self) -> str:
        return "UNCHANGED"

    def __copy__(self) -> _Unchanged:
        return self

    def __deepcopy__(self, memo: Any) -> _Unchanged:
        return self


UNCHANGED: Final = _Unchanged()


@dataclasses.dataclass(frozen=True, slots=True)
class UnknownText:
    """A decoded value of a type archsync keeps as PostgreSQL text."""

    type_name: str
    text: str


@dataclasses.dataclass(frozen=True, slots=True)
class JsonValue:
    """Marks a parsed JSON value (any JSON type, ``None`` = JSON null) as a json/jsonb cell."""

    value: Any


# ------------------------------------------------------------------------------ small helpers

_EPOCH_UTC: Final = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE: Final = datetime(1970, 1, 1)
_EPOCH_ORDINAL: Final = 719163  # date(1970, 1, 1).toordinal()
_pack_double = struct.Struct("<d").pack
_unpack_double = struct.Struct("<d").unpack_from


def _varint_loop(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_NTAB: Final = 4096
_ZZ_SMALL: Final = tuple(_varint_loop(n) for n in range(1 << 14))  # varints of 0 .. 2**14-1
# two varint bytes, both with the continuation bit: the low 14 bits of a larger number
_C14: Final = tuple(bytes(((x & 0x7F) | 0x80, ((x >> 7) & 0x7F) | 0x80)) for x in range(1 << 14))
# zigzag varints of 0.._NTAB-1 (Avro lengths/counts), and the same prefixed by the Cell string branch
_LEN: Final = _ZZ_SMALL[0 : _NTAB << 1 : 2]
_STR_HDR: Final = tuple(b"\x08" + x for x in _LEN)  # Cell branch 4 = string


def _varint(n: int) -> bytes:
    """Unsigned varint of 0 <= n < 2**64, 14 bits per table lookup."""
    if n < 0x4000:
        return _ZZ_SMALL[n]
    if n < 0x10000000:
        return _C14[n & 0x3FFF] + _ZZ_SMALL[n >> 14]
    if n < 0x40000000000:
        return _C14[n & 0x3FFF] + _C14[(n >> 14) & 0x3FFF] + _ZZ_SMALL[n >> 28]
    if n < 0x100000000000000:
        return b"".join((_C14[n & 0x3FFF], _C14[(n >> 14) & 0x3FFF], _C14[(n >> 28) & 0x3FFF], _ZZ_SMALL[n >> 42]))
    if n >> 64:
        raise OverflowError("integer does not fit an Avro long")
    return _varint_loop(n)


def _zz(n: int) -> bytes:
    """Avro long: zigzag varint (OverflowError outside the signed 64-bit range)."""
    if n >= 0:
        n <<= 1
        if n < 0x4000:
            return _ZZ_SMALL[n]
        return _varint(n)
    return _varint(~(n << 1))


def _put_bytes(ap: Callable[[bytes], Any], b: bytes) -> None:
    n = len(b)
    ap(_LEN[n] if n < _NTAB else _varint(n << 1))
    ap(b)


def _micros(delta: timedelta) -> int:
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _json_text(value: Any) -> bytes:
    """Canonical JSON: compact, object keys sorted."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # e.g. integers beyond 64 bits: the stdlib handles them exactly
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


_LONG_NUMBER = re.compile(rb"\d{19}")


def _json_load(text: bytes) -> Any:
    # orjson reads integers beyond 64 bits as floats: let the stdlib read those texts exactly
    if _LONG_NUMBER.search(text) is not None:
        return json.loads(text)
    return orjson.loads(text)


def _decimal_text(value: Decimal) -> str:
    # plain notation, as PostgreSQL prints numeric ("0.0000001", not "1E-7"); NaN/Infinity as words
    return format(value, "f")


def _is_unknown(v: object) -> bool:
    return hasattr(v, "type_name") and hasattr(v, "text")


def _unknown_parts(v: Any) -> tuple[str, str]:
    name = v.type_name
    if not name:
        name = f"oid:{getattr(v, 'type_oid', '?')}"
    return str(name), str(v.text)


# ------------------------------------------------------------------------------ encoding cells
# Cell union branches (wire format, see change_event.v1.avsc); array items use branches 0..13.
# index:  0 null  1 boolean  2 long  3 double  4 string  5 bytes  6 Decimal  7 TimestampTz
#         8 LocalTimestamp  9 Date  10 Uuid  11 Json  12 Unknown  13 Array  14 Unchanged
# The branch byte is the zigzag varint of the index, i.e. 2 * index.

_Append = Callable[[bytes], Any]
_Encoder = Callable[[Any, _Append], None]


def _enc_none(v: Any, ap: _Append) -> None:
    ap(b"\x00")


def _enc_bool(v: Any, ap: _Append) -> None:
    ap(b"\x02\x01" if v else b"\x02\x00")


def _enc_int(v: Any, ap: _Append) -> None:
    ap(b"\x04" + _zz(int(v)))


def _enc_float(v: Any, ap: _Append) -> None:
    ap(b"\x06" + _pack_double(v))


def _enc_str(v: Any, ap: _Append) -> None:
    b = v.encode()
    n = len(b)
    ap(_STR_HDR[n] if n < _NTAB else b"\x08" + _varint(n << 1))
    ap(b)


def _enc_bytes(v: Any, ap: _Append) -> None:
    ap(b"\x0a")
    _put_bytes(ap, bytes(v))


def _enc_decimal(v: Any, ap: _Append) -> None:
    ap(b"\x0c")
    _put_bytes(ap, format(v, "f").encode())


def _enc_datetime(v: Any, ap: _Append) -> None:
    if v.tzinfo is None:
        ap(b"\x10" + _zz(_micros(v - _EPOCH_NAIVE)))
    else:
        ap(b"\x0e" + _zz(_micros(v - _EPOCH_UTC)))


def _enc_date(v: Any, ap: _Append) -> None:
    ap(b"\x12" + _zz(v.toordinal() - _EPOCH_ORDINAL))


def _enc_uuid(v: Any, ap: _Append) -> None:
    h = f"{v.int:032x}"  # == str(v) without the dashes, faster than UUID.__str__
    ap(b"\x14\x48" + f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode())  # 36 chars: 0x48


def _enc_json(v: Any, ap: _Append) -> None:
    ap(b"\x16")
    _put_bytes(ap, _json_text(v))


def _enc_json_value(v: Any, ap: _Append) -> None:
    ap(b"\x16")
    _put_bytes(ap, _json_text(v.value))


def _enc_unknown(v: Any, ap: _Append) -> None:
    name, text = _unknown_parts(v)
    ap(b"\x18")
    _put_bytes(ap, name.encode())
    _put_bytes(ap, text.encode())


def _enc_array(v: Any, ap: _Append) -> None:
    n = len(v)
    if not n:
        ap(b"\x1a\x00")
        return
    ap(b"\x1a" + _zz(n))
    get = _ENCODERS.get
    for x in v:
        t = type(x)
        if t is str:
            b = x.encode()
            n = len(b)
            ap(_STR_HDR[n] if n < _NTAB else b"\x08" + _varint(n << 1))
            ap(b)
        elif x is None:
            ap(b"\x00")
        else:
            enc = get(t) or _resolve(x)
            if enc is _enc_unchanged:
                raise ValueError("an unchanged-TOAST marker cannot be an array element")
            enc(x, ap)
    ap(b"\x00")


def _enc_unchanged(v: Any, ap: _Append) -> None:
    ap(b"\x1c")


# exact type -> encoder; extended at run time by _resolve() for subclasses and duck-typed classes
_ENCODERS: dict[type, _Encoder] = {
    type(None): _enc_none,
    bool: _enc_bool,
    int: _enc_int,
    float: _enc_float,
    str: _enc_str,
    bytes: _enc_bytes,
    bytearray: _enc_bytes,
    memoryview: _enc_bytes,
    Decimal: _enc_decimal,
    datetime: _enc_datetime,
    date: _enc_date,
    UUID: _enc_uuid,
    dict: _enc_json,
    JsonValue: _enc_json_value,
    list: _enc_array,
    tuple: _enc_array,
    _Unchanged: _enc_unchanged,
    UnknownText: _enc_unknown,
}
_ISINSTANCE_ORDER: tuple[tuple[type | tuple[type, ...], _Encoder], ...] = (
    (bool, _enc_bool),
    (int, _enc_int),
    (float, _enc_float),
    (str, _enc_str),
    ((bytes, bytearray, memoryview), _enc_bytes),
    (Decimal, _enc_decimal),
    (datetime, _enc_datetime),
    (date, _enc_date),
    (UUID, _enc_uuid),
    (Mapping, _enc_json),
    ((list, tuple), _enc_array),
)


def _classify(v: object) -> _Encoder | None:
    t = type(v)
    if t.__name__ == "UnchangedToast":
        return _enc_unchanged
    if _is_unknown(v):
        return _enc_unknown
    for base, enc in _ISINSTANCE_ORDER:
        if isinstance(v, base):
            return enc
    return None


def _resolve(v: object) -> _Encoder:
    """Encoder for a value whose exact type is not in the table yet (cached per type)."""
    enc = _classify(v)
    t = type(v)
    if enc is None:
        raise TypeError(f"cannot encode a value of type {t.__module__}.{t.__qualname__}: {v!r:.100}")
    _ENCODERS[t] = enc
    return enc


def register_type(cls: type, kind: str) -> None:
    """Map a class to a Cell kind explicitly (instead of duck typing): ``"unchanged"`` or ``"unknown"``
    (instances need ``type_name`` and ``text`` attributes)."""
    _ENCODERS[cls] = {"unchanged": _enc_unchanged, "unknown": _enc_unknown}[kind]


def _encode_row(row: Mapping[str, Any] | None, ap: _Append, unknown: dict[str, str] | None) -> None:
    """A ``null | map<Cell>`` union: ``row`` is a mapping column -> value, or None.

    The common types are inlined (a function call costs as much as encoding a small cell).
    """
    if row is None:
        ap(b"\x00")
        return
    n = len(row)
    if not n:
        ap(b"\x02\x00")
        return
    ap(b"\x02" + _zz(n))
    keys = _KEYS
    get = _ENCODERS.get
    small = _ZZ_SMALL
    for k, v in row.items():
        kb = keys.get(k)
        if kb is None:
            kb = _key_prefix(k)
        ap(kb)
        t = type(v)
        if t is str:
            b = v.encode()
            n = len(b)
            ap(_STR_HDR[n] if n < _NTAB else b"\x08" + _varint(n << 1))
            ap(b)
        elif v is None:
            ap(b"\x00")
        elif t is int:
            if v >= 0:
                n = v << 1
                ap(b"\x04" + (small[n] if n < 0x4000 else _varint(n)))
            else:
                ap(b"\x04" + _varint(~(v << 1)))
        elif t is datetime:
            if v.tzinfo is None:
                d = v - _EPOCH_NAIVE
                n = (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds
                ap(b"\x10" + (_varint(n << 1) if n >= 0 else _varint(~(n << 1))))
            else:
                d = v - _EPOCH_UTC
                n = (d.days * 86400 + d.seconds) * 1_000_000 + d.microseconds
                ap(b"\x0e" + (_varint(n << 1) if n >= 0 else _varint(~(n << 1))))
        elif t is bool:
            ap(b"\x02\x01" if v else b"\x02\x00")
        elif t is Decimal:
            b = format(v, "f").encode()
            ap(b"\x0c" + _LEN[len(b)] if len(b) < _NTAB else b"\x0c" + _varint(len(b) << 1))
            ap(b)
        elif t is float:
            ap(b"\x06" + _pack_double(v))
        else:
            enc = get(t) or _resolve(v)
            enc(v, ap)
            if enc is _enc_unknown and unknown is not None:
                unknown[k] = _unknown_parts(v)[0]
    ap(b"\x00")


_KEYS: dict[str, bytes] = {}


def _key_prefix(k: str) -> bytes:
    b = k.encode()
    kb = (_LEN[len(b)] if len(b) < _NTAB else _varint(len(b) << 1)) + b
    if len(_KEYS) < 65536:
        _KEYS[k] = kb
    return kb


def _str_bytes(s: str) -> bytes:
    b = s.encode()
    return (_LEN[len(b)] if len(b) < _NTAB else _varint(len(b) << 1)) + b


_OP_BYTES: Final = {op: _varint(i << 1) for i, op in enumerate(OPS)}
_SOURCE_PREFIX: dict[tuple[str, str, str, str], bytes] = {}
_KEY_COLUMNS: dict[tuple[str, ...], bytes] = {}


def _source_prefix(system: str, database: str, schema: str, table: str) -> bytes:
    key = (system, database, schema, table)
    b = _SOURCE_PREFIX.get(key)
    if b is None:
        b = b"".join(_str_bytes(s) for s in key)
        if len(_SOURCE_PREFIX) < 65536:
            _SOURCE_PREFIX[key] = b
    return b


def _key_columns(cols: Collection[str]) -> bytes:
    key = tuple(cols)
    b = _KEY_COLUMNS.get(key)
    if b is None:
        b = (_zz(len(key)) + b"".join(_str_bytes(c) for c in key) + b"\x00") if key else b"\x00"
        if len(_KEY_COLUMNS) < 65536:
            _KEY_COLUMNS[key] = b
    return b


def _ts_micros(v: Any) -> int:
    if isinstance(v, datetime):
        return _micros(v - (_EPOCH_NAIVE if v.tzinfo is None else _EPOCH_UTC))
    return int(v)


def source_table_prefix(system: str, database: str, schema: str, table: str) -> bytes:
    """Encoded leading ``source`` fields (system, database, schema, table)."""
    return _source_prefix(system, database, schema, table)


def source_tx_suffix(commit_lsn: int, xid: int | None, commit_ts: Any, origin: str | None, snapshot: bool) -> bytes:
    """Encoded trailing ``source`` fields every event of one transaction shares (after ``lsn``)."""
    parts: list[bytes] = [
        _zz(commit_lsn),
        b"\x00" if xid is None else b"\x02" + _zz(xid),
        b"\x00" if commit_ts is None else b"\x02" + _zz(_ts_micros(commit_ts)),
    ]
    if origin is None:
        parts.append(b"\x00")
    else:
        parts.append(b"\x02")
        _put_bytes(parts.append, origin.encode())
    parts.append(b"\x01" if snapshot else b"\x00")
    return b"".join(parts)


def txn_prefix(txn_id: str | None) -> bytes:
    """Encoded start of the ``txn`` field up to ``order`` (``b"\\x00"`` alone encodes a null txn)."""
    if txn_id is None:
        raise ValueError("a null txn has no order: use encode() for snapshot events")
    parts: list[bytes] = [b"\x02"]
    _put_bytes(parts.append, txn_id.encode())
    return b"".join(parts)


def event_tail(total: int | None, ts_ms: int, key_columns: Collection[str], unknown_types: Mapping[str, str]) -> bytes:
    """Encoded fields after ``txn.order``: total, ts_ms, key_columns, unknown_types."""
    parts: list[bytes] = [
        b"\x00" if total is None else b"\x02" + _zz(total),
        _zz(ts_ms),
        _key_columns(key_columns),
    ]
    if unknown_types:
        parts.append(_zz(len(unknown_types)))
        for k, v in unknown_types.items():
            _put_bytes(parts.append, k.encode())
            _put_bytes(parts.append, v.encode())
    parts.append(b"\x00")
    return b"".join(parts)


def _mark_json(row: Mapping[str, Any] | None, json_columns: Collection[str]) -> Mapping[str, Any] | None:
    if not row:
        return row
    out = dict(row)
    for c in json_columns:
        v = out.get(c)
        if type(v) in _JSON_SCALARS:
            out[c] = JsonValue(v)
    return out


_JSON_SCALARS: Final = frozenset({list, tuple, str, int, float, bool})


# ------------------------------------------------------------------------------ decoding


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return (b >> 1) ^ -(b & 1), pos + 1
    n = b & 0x7F
    b = data[pos + 1]
    if b < 0x80:
        n |= b << 7
        return (n >> 1) ^ -(n & 1), pos + 2
    n |= (b & 0x7F) << 7
    pos += 2
    shift = 14
    while True:
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return (n >> 1) ^ -(n & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("Avro long longer than 10 bytes")


def _read_bytes(data: bytes, pos: int) -> tuple[bytes, int]:
    b = data[pos]
    if b < 0x80:
        end = pos + 1 + (b >> 1)
        if end > len(data):
            raise ValueError("truncated Avro data")
        return data[pos + 1 : end], end
    n, pos = _read_long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise ValueError("truncated or corrupt Avro data")
    return data[pos:end], end


def _read_str(data: bytes, pos: int) -> tuple[str, int]:
    b = data[pos]
    if b < 0x80:
        end = pos + 1 + (b >> 1)
        if end > len(data):
            raise ValueError("truncated Avro data")
        return data[pos + 1 : end].decode(), end
    n, pos = _read_long(data, pos)
    end = pos + n
    if n < 0 or end > len(data):
        raise ValueError("truncated or corrupt Avro data")
    return data[pos:end].decode(), end


def _read_opt_long(data: bytes, pos: int) -> tuple[int | None, int]:
    tag = data[pos]
    if tag == 0:
        return None, pos + 1
    if tag != 2:
        raise ValueError(f"bad union branch {tag >> 1}")
    return _read_long(data, pos + 1)


def _read_opt_str(data: bytes, pos: int) -> tuple[str | None, int]:
    tag = data[pos]
    if tag == 0:
        return None, pos + 1
    if tag != 2:
        raise ValueError(f"bad union branch {tag >> 1}")
    return _read_str(data, pos + 1)


def _block_count(data: bytes, pos: int) -> tuple[int, int]:
    count, pos = _read_long(data, pos)
    if count < 0:  # negative count: block byte size follows
        count = -count
        _, pos = _read_long(data, pos)
    return count, pos


_Decoder = Callable[[bytes, int], tuple[Any, int]]


def _dec_bad(data: bytes, pos: int) -> tuple[Any, int]:
    raise ValueError(f"bad Cell union branch at offset {pos - 1}")


def _dec_bool(data: bytes, pos: int) -> tuple[Any, int]:
    return data[pos] == 1, pos + 1


def _dec_double(data: bytes, pos: int) -> tuple[Any, int]:
    return _unpack_double(data, pos)[0], pos + 8


def _dec_decimal(data: bytes, pos: int) -> tuple[Any, int]:
    text, pos = _read_bytes(data, pos)
    return Decimal(text.decode()), pos


def _dec_tstz(data: bytes, pos: int) -> tuple[Any, int]:
    micros, pos = _read_long(data, pos)
    return _EPOCH_UTC + timedelta(0, 0, micros), pos


def _dec_local_ts(data: bytes, pos: int) -> tuple[Any, int]:
    micros, pos = _read_long(data, pos)
    return _EPOCH_NAIVE + timedelta(0, 0, micros), pos


def _dec_date(data: bytes, pos: int) -> tuple[Any, int]:
    days, pos = _read_long(data, pos)
    return date.fromordinal(days + _EPOCH_ORDINAL), pos


def _dec_uuid(data: bytes, pos: int) -> tuple[Any, int]:
    text, pos = _read_str(data, pos)
    return UUID(text), pos


def _dec_json(data: bytes, pos: int) -> tuple[Any, int]:
    text, pos = _read_bytes(data, pos)
    return _json_load(text), pos


# ------------------------------------------------------------------------------ the codec


def _check_fingerprint(parsed: dict[str, Any]) -> None:
    fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    if fp != _CHANGE_EVENT_V1_FINGERPRINT:
        raise RuntimeError(
            f"schemas/avro/change_event.v1.avsc changed (fingerprint {fp}, codec built for "
            f"{_CHANGE_EVENT_V1_FINGERPRINT}): published schema versions are immutable; add a v2 and a codec "
            "for it instead"
        )


class ChangeEventCodec:
    """Encode/decode ``change_event.v1`` events (schemaless Avro binary, no header).

    An event is a dict with the envelope fields: ``event_id`` (see :func:`event_id`), ``op`` (one of
    ``c u d r t``), ``before`` / ``after`` (column -> Python value, or None), ``source`` (dict: system,
    database, schema, table, lsn, commit_lsn, xid, commit_ts (datetime or epoch micros), origin,
    snapshot), ``txn`` (None or dict: id, order, total), ``ts_ms`` (default: now), ``key_columns``
    and ``unknown_types`` (default: computed from the Unknown values in the rows).

    ``unchanged``: object returned for unchanged-TOAST cells by :meth:`decode` (default
    :data:`UNCHANGED`); ``unknown_factory(type_name, text)`` builds decoded unknown values (default
    :class:`UnknownText`). ``engine="fastavro"`` uses fastavro instead of the built-in codec (slow;
    a reference for tests). The built-in engine keeps no per-call state: one instance can be shared.
    """

    def __init__(
        self,
        *,
        unchanged: object = UNCHANGED,
        unknown_factory: Callable[[str, str], object] = UnknownText,
        engine: str = "builtin",
    ) -> None:
        if engine not in ("builtin", "fastavro"):
            raise ValueError(f"engine must be 'builtin' or 'fastavro', not {engine!r}")
        self.schema = registry.load_schema(CHANGE_EVENT_SCHEMA)
        _check_fingerprint(self.schema)
        self.engine = engine
        self.unchanged = unchanged
        self.unknown_factory = unknown_factory
        if type(unchanged).__module__ != "builtins" and type(unchanged) not in _ENCODERS:
            _ENCODERS[type(unchanged)] = _enc_unchanged  # the injected sentinel re-encodes as Unchanged
        self._buf = io.BytesIO()
        self._cell_dec, self._item_dec = self._decoders()

    # -------------------------------------------------------------------------- encode
    def encode(self, event: Mapping[str, Any], json_columns: Collection[str] | None = None) -> bytes:
        """Avro binary of ``event``. ``json_columns``: names of json/jsonb columns (see module doc).

        Raises TypeError/ValueError/OverflowError/KeyError for a value or field that cannot be encoded.
        """
        if json_columns:
            event = {
                **event,
                "before": _mark_json(event.get("before"), json_columns),
                "after": _mark_json(event.get("after"), json_columns),
            }
        if self.engine == "fastavro":
            return self._encode_fastavro(event)
        parts: list[bytes] = []
        ap = parts.append
        eid = event["event_id"].encode()
        ap(_LEN[len(eid)] if len(eid) < _NTAB else _varint(len(eid) << 1))
        ap(eid)
        try:
            ap(_OP_BYTES[event["op"]])
        except KeyError:
            raise ValueError(f"op must be one of {OPS}, not {event['op']!r}") from None
        unknown_types = event.get("unknown_types")
        unknown: dict[str, str] | None = {} if unknown_types is None else None
        _encode_row(event.get("before"), ap, unknown)
        _encode_row(event.get("after"), ap, unknown)
        src = event["source"]
        ap(_source_prefix(src["system"], src["database"], src["schema"], src["table"]))
        ap(_zz(src["lsn"]))
        ap(_zz(src["commit_lsn"]))
        xid = src.get("xid")
        ap(b"\x00" if xid is None else b"\x02" + _zz(xid))
        commit_ts = src.get("commit_ts")
        ap(b"\x00" if commit_ts is None else b"\x02" + _zz(_ts_micros(commit_ts)))
        origin = src.get("origin")
        if origin is None:
            ap(b"\x00")
        else:
            ap(b"\x02")
            _put_bytes(ap, origin.encode())
        ap(b"\x01" if src.get("snapshot") else b"\x00")
        txn = event.get("txn")
        if txn is None:
            ap(b"\x00")
        else:
            ap(b"\x02")
            _put_bytes(ap, str(txn["id"]).encode())
            ap(_zz(txn["order"]))
            total = txn.get("total")
            ap(b"\x00" if total is None else b"\x02" + _zz(total))
        ts_ms = event.get("ts_ms")
        ap(_zz(time.time_ns() // 1_000_000 if ts_ms is None else ts_ms))
        ap(_key_columns(event.get("key_columns") or ()))
        if unknown_types is None:
            unknown_types = unknown
        if unknown_types:
            ap(_zz(len(unknown_types)))
            for k, v in unknown_types.items():
                _put_bytes(ap, k.encode())
                _put_bytes(ap, v.encode())
        ap(b"\x00")
        return b"".join(parts)

    def encode_change(
        self,
        event_id: str,
        op: str,
        before: Mapping[str, Any] | None,
        after: Mapping[str, Any] | None,
        table_prefix: bytes,
        lsn: int,
        tx_source: bytes,
        txn: bytes,
        order: int,
        tail: bytes,
        json_columns: Collection[str] = (),
    ) -> bytes:
        """The capture's fast path: the same bytes as :meth:`encode`, from precomputed parts.

        ``table_prefix`` is :func:`source_table_prefix`, ``tx_source`` :func:`source_tx_suffix` (the
        source fields a transaction shares), ``txn`` :func:`txn_prefix`, ``tail`` :func:`event_tail`
        (ts_ms, key columns and unknown types, shared by a table's events of one batch).
        """
        if json_columns:
            before = _mark_json(before, json_columns)
            after = _mark_json(after, json_columns)
        parts: list[bytes] = []
        ap = parts.append
        eid = event_id.encode()
        ap(_LEN[len(eid)] if len(eid) < _NTAB else _varint(len(eid) << 1))
        ap(eid)
        ap(_OP_BYTES[op])
        _encode_row(before, ap, None)
        _encode_row(after, ap, None)
        ap(table_prefix)
        ap(_zz(lsn))
        ap(tx_source)
        ap(txn)
        ap(_zz(order))
        ap(tail)
        return b"".join(parts)

    def _encode_fastavro(self, event: Mapping[str, Any]) -> bytes:
        unknown: dict[str, str] = {}

        def row(r: Mapping[str, Any] | None) -> dict[str, Any] | None:
            if r is None:
                return None
            out = {}
            for k, v in r.items():
                cell = to_cell(v)
                if isinstance(cell, tuple) and cell[0] == NS + "Unknown":
                    unknown[k] = cell[1]["type_name"]
                out[k] = cell
            return out

        src = dict(event["source"])
        if src.get("commit_ts") is not None:
            src["commit_ts"] = _ts_micros(src["commit_ts"])
        txn = event.get("txn")
        record = {
            "event_id": event["event_id"],
            "op": event["op"],
            "before": row(event.get("before")),
            "after": row(event.get("after")),
            "source": src,
            "txn": None if txn is None else (NS + "Txn", {"total": None, **txn, "id": str(txn["id"])}),
            "ts_ms": time.time_ns() // 1_000_000 if event.get("ts_ms") is None else event["ts_ms"],
            "key_columns": list(event.get("key_columns") or ()),
            "unknown_types": unknown if event.get("unknown_types") is None else event["unknown_types"],
        }
        if record["op"] not in OPS:
            raise ValueError(f"op must be one of {OPS}, not {record['op']!r}")
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        fastavro.schemaless_writer(buf, self.schema, record)
        return buf.getvalue()

    # -------------------------------------------------------------------------- decode
    def _decoders(self) -> tuple[list[_Decoder], list[_Decoder]]:
        unchanged = self.unchanged
        factory = self.unknown_factory

        def dec_unknown(data: bytes, pos: int) -> tuple[Any, int]:
            name, pos = _read_str(data, pos)
            text, pos = _read_str(data, pos)
            return factory(name, text), pos

        def dec_unchanged(data: bytes, pos: int) -> tuple[Any, int]:
            return unchanged, pos

        def dec_array(data: bytes, pos: int) -> tuple[Any, int]:
            items: list[Any] = []
            ap = items.append
            dec = item_dec
            while True:
                b = data[pos]
                if b == 0:
                    return items, pos + 1
                if b < 0x80:
                    count = (b >> 1) ^ -(b & 1)
                    pos += 1
                    if count < 0:
                        count = -count
                        _, pos = _read_long(data, pos)
                else:
                    count, pos = _block_count(data, pos)
                for _ in range(count):
                    tag = data[pos]
                    if tag == 8:
                        b = data[pos + 1]
                        if b < 0x80:
                            end = pos + 2 + (b >> 1)
                            ap(data[pos + 2 : end].decode())
                            pos = end
                        else:
                            s, pos = _read_str(data, pos + 1)
                            ap(s)
                    elif tag == 0:
                        ap(None)
                        pos += 1
                    else:
                        v, pos = dec[tag](data, pos + 1)
                        ap(v)

        def dec_str(data: bytes, pos: int) -> tuple[Any, int]:
            return _read_str(data, pos)

        def dec_bytes(data: bytes, pos: int) -> tuple[Any, int]:
            return _read_bytes(data, pos)

        def dec_null(data: bytes, pos: int) -> tuple[Any, int]:
            return None, pos

        by_index: list[_Decoder] = [
            dec_null,
            _dec_bool,
            _read_long,
            _dec_double,
            dec_str,
            dec_bytes,
            _dec_decimal,
            _dec_tstz,
            _dec_local_ts,
            _dec_date,
            _dec_uuid,
            _dec_json,
            dec_unknown,
            dec_array,
            dec_unchanged,
        ]
        cell_dec: list[_Decoder] = [_dec_bad] * 256
        for i, fn in enumerate(by_index):
            cell_dec[i << 1] = fn
        item_dec = list(cell_dec)
        item_dec[14 << 1] = _dec_bad  # Unchanged is not an array item branch
        return cell_dec, item_dec

    def _decode_row(self, data: bytes, pos: int) -> tuple[dict[str, Any] | None, int]:
        tag = data[pos]
        pos += 1
        if tag == 0:
            return None, pos
        if tag != 2:
            raise ValueError(f"bad row union branch {tag >> 1}")
        row: dict[str, Any] = {}
        dec = self._cell_dec
        while True:
            b = data[pos]
            if b < 0x80:
                count = (b >> 1) ^ -(b & 1)
                pos += 1
            else:
                count, pos = _read_long(data, pos)
            if not count:
                return row, pos
            if count < 0:
                count = -count
                _, pos = _read_long(data, pos)
            for _ in range(count):
                b = data[pos]
                if b < 0x80:
                    end = pos + 1 + (b >> 1)
                    key = data[pos + 1 : end].decode()
                else:
                    n, pos = _read_long(data, pos)
                    end = pos + n
                    key = data[pos:end].decode()
                tag = data[end]
                pos = end + 1
                # the common branches inline (see _encode_row), the others through the table
                if tag == 8:  # string
                    b = data[pos]
                    if b < 0x80:
                        end = pos + 1 + (b >> 1)
                        row[key] = data[pos + 1 : end].decode()
                        pos = end
                    else:
                        s, pos = _read_bytes(data, pos)
                        row[key] = s.decode()
                elif tag == 0:
                    row[key] = None
                elif tag == 4 or tag == 14 or tag == 16:  # long, TimestampTz, LocalTimestamp
                    b = data[pos]
                    if b < 0x80:
                        n = (b >> 1) ^ -(b & 1)
                        pos += 1
                    else:
                        n, pos = _read_long(data, pos)
                    if tag == 4:
                        row[key] = n
                    elif tag == 14:
                        row[key] = _EPOCH_UTC + timedelta(0, 0, n)
                    else:
                        row[key] = _EPOCH_NAIVE + timedelta(0, 0, n)
                elif tag == 2:
                    row[key] = data[pos] == 1
                    pos += 1
                elif tag == 12:  # Decimal
                    end = pos + 1 + (data[pos] >> 1)
                    if data[pos] < 0x80:
                        row[key] = Decimal(data[pos + 1 : end].decode())
                        pos = end
                    else:
                        row[key], pos = _dec_decimal(data, pos)
                else:
                    row[key], pos = dec[tag](data, pos)

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        """The event dict encoded in ``data`` (Python values in ``before``/``after``).

        Json cells come back as parsed JSON (a JSON ``null`` as None, like pgtypes gives it); TimestampTz
        as datetimes in UTC. Raises ValueError for data that is not a ``change_event.v1`` message.
        """
        if type(data) is not bytes:
            data = bytes(data)
        if self.engine == "fastavro":
            return self._decode_fastavro(data)
        try:
            event, pos = self._decode(data)
        except (IndexError, struct.error, OverflowError) as exc:
            raise ValueError(f"truncated or corrupt change event: {exc}") from exc
        if pos > len(data):
            raise ValueError("truncated change event")
        if pos != len(data):
            raise ValueError(f"{len(data) - pos} trailing bytes after the change event")
        return event

    def _decode(self, data: bytes) -> tuple[dict[str, Any], int]:
        eid, pos = _read_str(data, 0)
        op_index, pos = _read_long(data, pos)
        if not 0 <= op_index < len(OPS):
            raise ValueError(f"bad op index {op_index}")
        before, pos = self._decode_row(data, pos)
        after, pos = self._decode_row(data, pos)
        system, pos = _read_str(data, pos)
        database, pos = _read_str(data, pos)
        schema, pos = _read_str(data, pos)
        table, pos = _read_str(data, pos)
        lsn, pos = _read_long(data, pos)
        commit_lsn, pos = _read_long(data, pos)
        xid, pos = _read_opt_long(data, pos)
        commit_micros, pos = _read_opt_long(data, pos)
        origin, pos = _read_opt_str(data, pos)
        snapshot = data[pos] == 1
        pos += 1
        tag = data[pos]
        pos += 1
        txn: dict[str, Any] | None = None
        if tag == 2:
            txn_id, pos = _read_str(data, pos)
            order, pos = _read_long(data, pos)
            total, pos = _read_opt_long(data, pos)
            txn = {"id": txn_id, "order": order, "total": total}
        elif tag != 0:
            raise ValueError(f"bad txn union branch {tag >> 1}")
        ts_ms, pos = _read_long(data, pos)
        key_columns: list[str] = []
        while True:
            if data[pos] == 0:  # end of blocks
                pos += 1
                break
            count, pos = _block_count(data, pos)
            if not count:
                break
            for _ in range(count):
                col, pos = _read_str(data, pos)
                key_columns.append(col)
        unknown_types: dict[str, str] = {}
        while True:
            if data[pos] == 0:
                pos += 1
                break
            count, pos = _block_count(data, pos)
            if not count:
                break
            for _ in range(count):
                col, pos = _read_str(data, pos)
                unknown_types[col], pos = _read_str(data, pos)
        return {
            "event_id": eid,
            "op": OPS[op_index],
            "before": before,
            "after": after,
            "source": {
                "system": system,
                "database": database,
                "schema": schema,
                "table": table,
                "lsn": lsn,
                "commit_lsn": commit_lsn,
                "xid": xid,
                "commit_ts": None if commit_micros is None else _EPOCH_UTC + timedelta(0, 0, commit_micros),
                "origin": origin,
                "snapshot": snapshot,
            },
            "txn": txn,
            "ts_ms": ts_ms,
            "key_columns": key_columns,
            "unknown_types": unknown_types,
        }, pos

    def _decode_fastavro(self, data: bytes) -> dict[str, Any]:
        record: Any = fastavro.schemaless_reader(io.BytesIO(data), self.schema, None, return_record_name=True)
        unchanged, factory = self.unchanged, self.unknown_factory
        for side in ("before", "after"):
            if record[side] is not None:
                record[side] = {k: from_cell(v, unchanged, factory) for k, v in record[side].items()}
        if record["txn"] is not None:
            record["txn"] = record["txn"][1]
        return dict(record)


# ------------------------------------------------------------------------------ fastavro notation


def to_cell(value: Any) -> Any:
    """A Python value as a fastavro Cell datum: primitives as-is, others as ``(record name, dict)``."""
    t = type(value)
    if t in _PRIMITIVE_CELLS:
        return value
    enc = _ENCODERS.get(t) or _resolve(value)
    if enc is _enc_none:
        return None
    if enc is _enc_bool:
        return bool(value)
    if enc is _enc_int:
        return int(value)
    if enc is _enc_float:
        return float(value)
    if enc is _enc_str:
        return str.__str__(value)
    if enc is _enc_bytes:
        return bytes(value)
    if enc is _enc_decimal:
        return (NS + "Decimal", {"value": _decimal_text(value)})
    if enc is _enc_datetime:
        if value.tzinfo is None:
            return (NS + "LocalTimestamp", {"micros": _micros(value - _EPOCH_NAIVE)})
        return (NS + "TimestampTz", {"utc_micros": _micros(value - _EPOCH_UTC)})
    if enc is _enc_date:
        return (NS + "Date", {"days": value.toordinal() - _EPOCH_ORDINAL})
    if enc is _enc_uuid:
        return (NS + "Uuid", {"value": str(value)})
    if enc is _enc_json:
        return (NS + "Json", {"json": _json_text(value).decode()})
    if enc is _enc_json_value:
        return (NS + "Json", {"json": _json_text(value.value).decode()})
    if enc is _enc_array:
        items = [to_cell(x) for x in value]
        if any(isinstance(x, tuple) and x[0] == NS + "Unchanged" for x in items):
            raise ValueError("an unchanged-TOAST marker cannot be an array element")
        return (NS + "Array", {"items": items})
    if enc is _enc_unchanged:
        return _UNCHANGED_CELL
    if enc is _enc_unknown:
        name, text = _unknown_parts(value)
        return (NS + "Unknown", {"type_name": name, "text": text})
    raise TypeError(f"cannot encode {value!r:.100}")  # pragma: no cover - _resolve raises first


_PRIMITIVE_CELLS: Final = frozenset({type(None), bool, int, float, str, bytes})
_UNCHANGED_CELL: Final[tuple[str, dict[str, Any]]] = (NS + "Unchanged", {})


def from_cell(
    cell: Any,
    unchanged: object = UNCHANGED,
    unknown_factory: Callable[[str, str], object] = UnknownText,
) -> Any:
    """Inverse of :func:`to_cell`, for data read by fastavro with ``return_record_name=True``."""
    if type(cell) is not tuple:
        return cell
    name, rec = cell
    kind = name.rsplit(".", 1)[-1]
    if kind == "Decimal":
        return Decimal(rec["value"])
    if kind == "TimestampTz":
        v = rec["utc_micros"]
        return v if isinstance(v, datetime) else _EPOCH_UTC + timedelta(microseconds=v)
    if kind == "LocalTimestamp":
        v = rec["micros"]
        return v if isinstance(v, datetime) else _EPOCH_NAIVE + timedelta(microseconds=v)
    if kind == "Date":
        v = rec["days"]
        return v if isinstance(v, date) else date.fromordinal(v + _EPOCH_ORDINAL)
    if kind == "Uuid":
        return UUID(rec["value"])
    if kind == "Json":
        return _json_load(rec["json"].encode())
    if kind == "Array":
        return [from_cell(x, unchanged, unknown_factory) for x in rec["items"]]
    if kind == "Unchanged":
        return unchanged
    if kind == "Unknown":
        return unknown_factory(rec["type_name"], rec["text"])
    raise ValueError(f"unknown Cell record {name!r}")


# ------------------------------------------------------------------------------ ids, keys, JSON


def event_id(system: str, commit_lsn: int, order: int) -> str:
    """Deterministic event id: ``"<system>:<commit_lsn as 16 upper-case hex digits>:<order>"``.

    ``order`` is the 1-based position of the change in its transaction (snapshot rows: row number
    within the snapshot of the table, with the snapshot's consistent point as ``commit_lsn``).
    """
    if commit_lsn < 0:
        raise ValueError(f"commit_lsn must be >= 0, not {commit_lsn}")
    return f"{system}:{commit_lsn:016X}:{order}"


def _key_default(v: Any) -> Any:
    if isinstance(v, datetime):
        return v.isoformat() if v.tzinfo is None else v.astimezone(UTC).isoformat()
    if isinstance(v, date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return _decimal_text(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(v).decode()
    if type(v).__name__ == "UnchangedToast" or isinstance(v, _Unchanged):
        raise ValueError("a key column value cannot be an unchanged-TOAST marker")
    if isinstance(v, JsonValue):
        return v.value
    if _is_unknown(v):
        return str(v.text)
    raise TypeError(f"cannot render {type(v).__qualname__} in a key")


_KEY_OPTS: Final = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS
)


def key_bytes(system: str, schema: str, table: str, key: Mapping[str, Any]) -> bytes:
    """Kafka message key: deterministic compact JSON, keys sorted, independent of dict order.

    ``b'{"key":{"id":1},"schema":"public","system":"oa","table":"orders"}'``. Key values are
    rendered JSON-safe: Decimal as exact text, aware datetimes as UTC ISO-8601 (so the same instant
    always gives the same key), dates ISO, UUID text, bytes base64, unknown values as their text.
    """
    return orjson.dumps(
        {"system": system, "schema": schema, "table": table, "key": dict(key)},
        default=_key_default,
        option=_KEY_OPTS,
    )


def _human_default(v: Any) -> Any:
    if isinstance(v, Decimal):
        return _decimal_text(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return base64.b64encode(v).decode()
    if type(v).__name__ == "UnchangedToast" or isinstance(v, _Unchanged):
        return {"$unchanged": True}
    if isinstance(v, JsonValue):
        return v.value
    if _is_unknown(v):
        name, text = _unknown_parts(v)
        return {"$unknown": name, "text": text}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return dataclasses.asdict(v)
    if isinstance(v, (set, frozenset)):
        return sorted(v, key=repr)
    raise TypeError(f"cannot render {type(v).__qualname__} as JSON")


def to_json(event: Mapping[str, Any], *, pretty: bool = False) -> bytes:
    """Human-readable JSON of an event (as given to ``encode`` or returned by ``decode``).

    Decimal as its exact text, bytes as base64, datetimes ISO-8601, UUID text, unchanged TOAST as
    ``{"$unchanged": true}``, unknown values as ``{"$unknown": type_name, "text": text}``.
    """
    option = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_NON_STR_KEYS
    if pretty:
        option |= orjson.OPT_INDENT_2
    return orjson.dumps(event, default=_human_default, option=option)


# ------------------------------------------------------------------------------ dead letters


class DeadLetterCodec:
    """Encode/decode ``dead_letter.v1`` records (rare, so plain fastavro)."""

    def __init__(self) -> None:
        self.schema = registry.load_schema(DEAD_LETTER_SCHEMA)
        self._buf = io.BytesIO()

    @staticmethod
    def build(
        reason: str | BaseException,
        stage: str,
        *,
        error: BaseException | type[BaseException] | str | None = None,
        source_topic: str | None = None,
        source_system: str | None = None,
        source_table: str | None = None,
        source_lsn: int | None = None,
        original_key: bytes | None = None,
        original_value: bytes | None = None,
        original_json: str | bytes | None = None,
        ts_ms: int | None = None,
    ) -> dict[str, Any]:
        """A dead-letter record dict; ``reason`` may be the exception itself."""
        if error is None and isinstance(reason, BaseException):
            error = reason
        if isinstance(error, BaseException):
            error = type(error)
        error_class = f"{error.__module__}.{error.__qualname__}" if isinstance(error, type) else error or ""
        if isinstance(reason, BaseException):
            reason = str(reason) or type(reason).__name__
        if isinstance(original_json, bytes):
            original_json = original_json.decode("utf-8", "replace")
        return {
            "reason": reason,
            "error_class": error_class,
            "stage": stage,
            "source_topic": source_topic,
            "source_system": source_system,
            "source_table": source_table,
            "source_lsn": source_lsn,
            "original_key": None if original_key is None else bytes(original_key),
            "original_value": None if original_value is None else bytes(original_value),
            "original_json": original_json,
            "ts_ms": time.time_ns() // 1_000_000 if ts_ms is None else ts_ms,
        }

    def encode(self, record: Mapping[str, Any]) -> bytes:
        buf = self._buf
        buf.seek(0)
        buf.truncate()
        fastavro.schemaless_writer(buf, self.schema, dict(record), strict_allow_default=True)
        return buf.getvalue()

    def decode(self, data: bytes | bytearray | memoryview) -> dict[str, Any]:
        record: Any = fastavro.schemaless_reader(io.BytesIO(bytes(data)), self.schema, None)
        return dict(record)
