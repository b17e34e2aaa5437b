"""Convert pgoutput text-format column values into Python values, by PostgreSQL type OID.

The replication session is expected to run with ``TimeZone=UTC`` and ``DateStyle=ISO`` (and the
default ``bytea_output=hex``), so values arrive in PostgreSQL's canonical ISO text output.

Rules (see ``_CONVERTERS``):

* bool -> ``bool``; int2/int4/int8/oid -> ``int``; float4/float8 -> ``float`` (NaN, +/-Infinity);
  numeric -> ``decimal.Decimal`` (exact; ``NaN`` and +/-``Infinity`` too); text-like -> ``str``;
* date -> ``datetime.date``, timestamp -> naive ``datetime``, timestamptz -> aware ``datetime``
  (the offset as sent); values Python cannot represent (``infinity``, ``-infinity``, BC dates,
  years after 9999) become :class:`UnknownValue` keeping the text;
* json/jsonb -> parsed with orjson; bytea -> ``bytes``; uuid -> ``uuid.UUID``;
* one-or-more-dimensional arrays of those -> nested ``list`` (NULL elements -> ``None``).  Arrays
  with explicit lower bounds (``[0:1]={1,2}``) cannot be represented as lists without losing the
  bounds and become :class:`UnknownValue`;
* anything else -> :class:`UnknownValue` (type OID, type name if known, original text).

``None`` (SQL NULL), :data:`~connectors.pgoutput.UNCHANGED_TOAST` and ``bytes`` (binary-format
columns) pass through :func:`convert_tuple` unchanged.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Final

import orjson

from connectors.pgoutput import RelationColumn, TupleData

__all__ = [
    "BUILTIN_TYPE_NAMES",
    "KNOWN_TYPE_OIDS",
    "UnknownValue",
    "ValueConversionError",
    "convert_text",
    "convert_tuple",
]


@dataclass(frozen=True, slots=True)
class UnknownValue:
    """A value of a type this module does not convert, kept as PostgreSQL's text output."""

    type_oid: int
    type_name: str | None
    text: str


class ValueConversionError(ValueError):
    """A text value does not parse as its declared PostgreSQL type."""

    def __init__(self, type_oid: int, type_name: str | None, text: str, reason: str = "") -> None:
        shown = text if len(text) <= 80 else text[:80] + "…"
        label = f"{type_name} (oid {type_oid})" if type_name else f"type oid {type_oid}"
        message = f"cannot convert {label} value {shown!r}"
        if reason:
            message += f": {reason}"
        super().__init__(message)
        self.type_oid = type_oid
        self.type_name = type_name
        self.text = shown
        self.reason = reason


BUILTIN_TYPE_NAMES: Final[Mapping[int, str]] = {
    16: "bool",
    17: "bytea",
    18: "char",
    19: "name",
    20: "int8",
    21: "int2",
    23: "int4",
    24: "regproc",
    25: "text",
    26: "oid",
    27: "tid",
    28: "xid",
    114: "json",
    142: "xml",
    143: "_xml",
    199: "_json",
    600: "point",
    601: "lseg",
    602: "path",
    603: "box",
    604: "polygon",
    628: "line",
    650: "cidr",
    651: "_cidr",
    700: "float4",
    701: "float8",
    718: "circle",
    774: "macaddr8",
    790: "money",
    791: "_money",
    829: "macaddr",
    869: "inet",
    1000: "_bool",
    1001: "_bytea",
    1002: "_char",
    1003: "_name",
    1005: "_int2",
    1007: "_int4",
    1009: "_text",
    1014: "_bpchar",
    1015: "_varchar",
    1016: "_int8",
    1021: "_float4",
    1022: "_float8",
    1028: "_oid",
    1041: "_inet",
    1042: "bpchar",
    1043: "varchar",
    1082: "date",
    1083: "time",
    1114: "timestamp",
    1115: "_timestamp",
    1182: "_date",
    1183: "_time",
    1184: "timestamptz",
    1185: "_timestamptz",
    1186: "interval",
    1187: "_interval",
    1231: "_numeric",
    1266: "timetz",
    1270: "_timetz",
    1560: "bit",
    1562: "varbit",
    1700: "numeric",
    2205: "regclass",
    2249: "record",
    2950: "uuid",
    2951: "_uuid",
    3220: "pg_lsn",
    3614: "tsvector",
    3615: "tsquery",
    3802: "jsonb",
    3807: "_jsonb",
    3904: "int4range",
    3906: "numrange",
    3908: "tsrange",
    3910: "tstzrange",
    3912: "daterange",
    3926: "int8range",
    4072: "jsonpath",
    5069: "xid8",
}


# --------------------------------------------------------------------------------------------------
# Scalar converters.  Each takes the text and returns the value, or raises ValueError/ArithmeticError
# (wrapped into ValueConversionError by the callers).
# --------------------------------------------------------------------------------------------------


def _bool(text: str) -> bool:
    if text == "t":
        return True
    if text == "f":
        return False
    raise ValueError("expected 't' or 'f'")


def _numeric(text: str, _decimal: type[Decimal] = Decimal) -> Decimal:
    # Decimal(str) is exact whatever the context precision.
    try:
        return _decimal(text)
    except InvalidOperation:
        raise ValueError("not a numeric literal") from None


def _text(text: str) -> str:
    return text


_FAR_YEAR_RE: Final = re.compile(r"\d{5,}-")


def _unrepresentable(type_oid: int, text: str) -> UnknownValue | None:
    """infinity / -infinity / BC / year > 9999: valid in PostgreSQL, not in Python's datetime."""
    if text in ("infinity", "-infinity") or text.endswith(" BC") or _FAR_YEAR_RE.match(text):
        return UnknownValue(type_oid, BUILTIN_TYPE_NAMES[type_oid], text)
    return None


def _date(text: str, _fromiso: Callable[[str], date] = date.fromisoformat) -> date | UnknownValue:
    if len(text) == 10:
        return _fromiso(text)
    special = _unrepresentable(1082, text)
    if special is not None:
        return special
    raise ValueError("expected YYYY-MM-DD")


def _timestamp(text: str, _fromiso: Callable[[str], datetime] = datetime.fromisoformat) -> datetime | UnknownValue:
    try:
        value = _fromiso(text)
    except ValueError:
        special = _unrepresentable(1114, text)
        if special is not None:
            return special
        raise
    if value.tzinfo is not None:
        raise ValueError("timestamp without time zone carries a UTC offset")
    return value


def _timestamptz(text: str, _fromiso: Callable[[str], datetime] = datetime.fromisoformat) -> datetime | UnknownValue:
    try:
        value = _fromiso(text)
    except ValueError:
        special = _unrepresentable(1184, text)
        if special is not None:
            return special
        raise
    if value.tzinfo is None:
        raise ValueError("timestamp with time zone has no UTC offset")
    return value


_BYTEA_ESCAPE_RE: Final = re.compile(r"\\(\\|[0-3][0-7]{2})")


def _bytea(text: str) -> bytes:
    if text.startswith("\\x"):
        return bytes.fromhex(text[2:])
    # bytea_output = 'escape': printable ASCII as is, '\\' for a backslash, '\ooo' octal otherwise.
    if "\\" not in text:
        return text.encode("latin-1")
    rest = _BYTEA_ESCAPE_RE.sub("", text)
    if "\\" in rest:
        raise ValueError("malformed bytea escape sequence")
    return _BYTEA_ESCAPE_RE.sub(lambda m: "\\" if m[1] == "\\" else chr(int(m[1], 8)), text).encode("latin-1")


def _uuid(text: str) -> uuid.UUID:
    return uuid.UUID(text)


_Converter = Callable[[str], object]

_SCALARS: Final[dict[int, _Converter]] = {
    16: _bool,
    17: _bytea,
    18: _text,
    19: _text,
    20: int,
    21: int,
    23: int,
    25: _text,
    26: int,
    114: orjson.loads,
    700: float,
    701: float,
    1042: _text,
    1043: _text,
    1082: _date,
    1114: _timestamp,
    1184: _timestamptz,
    1700: _numeric,
    2950: _uuid,
    3802: orjson.loads,
}

# array type OID -> element type OID
_ARRAYS: Final[dict[int, int]] = {
    1000: 16,
    1001: 17,
    1002: 18,
    1003: 19,
    1005: 21,
    1007: 23,
    1009: 25,
    1014: 1042,
    1015: 1043,
    1016: 20,
    1021: 700,
    1022: 701,
    1028: 26,
    1115: 1114,
    1182: 1082,
    1185: 1184,
    1231: 1700,
    199: 114,
    2951: 2950,
    3807: 3802,
}


# --------------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------------

# Tokens of array_out's output: braces, the delimiter, a double-quoted element (backslash escapes)
# or an unquoted element.  Whitespace between tokens is tolerated (array_in accepts it).
_ARRAY_TOKEN_RE: Final = re.compile(
    r'\s*(?:(?P<open>\{)|(?P<close>\})|(?P<comma>,)|"(?P<quoted>(?:[^"\\]|\\.)*)"'
    r'|(?P<bare>(?:[^{},"\\\s]|\\.)+)|(?P<bad>.))',
    re.DOTALL,
)
_ARRAY_SPECIAL_RE: Final = re.compile(r'[{}"\\]')
_UNESCAPE_RE: Final = re.compile(r"\\(.)", re.DOTALL)


class _ArraySyntaxError(ValueError):
    pass


def _parse_array(text: str, element: _Converter) -> list[object] | None:
    """Parse an array literal into nested lists; None if it has explicit bounds (``[1:2]={..}``)."""
    if text.startswith("["):
        return None
    if not text.startswith("{") or not text.endswith("}"):
        raise _ArraySyntaxError("array literal must be enclosed in braces")
    inner = text[1:-1]
    # Fast path: one dimension, no quoting or escapes (typical of numbers, dates, booleans).
    if _ARRAY_SPECIAL_RE.search(inner) is None:
        if not inner:
            return []
        out: list[object] = []
        for item in inner.split(","):
            if not item or item.isspace():
                raise _ArraySyntaxError("empty array element")
            item = item.strip()
            out.append(None if item == "NULL" else element(item))
        return out
    return _parse_array_general(text, element)


_EMPTY, _ELEMENTS, _SUBARRAYS = 0, 1, 2  # what one level of a (multidimensional) array holds


def _parse_array_general(text: str, element: _Converter) -> list[object]:
    """Tokenizing parser for quoted, escaped or nested array literals (``text`` is ``{...}``)."""
    root: list[object] = []
    current = root
    holds = _EMPTY
    stack: list[tuple[list[object], int]] = []
    expect_item = True  # after '{' or ',': an element or '{' (or '}' right after '{')
    just_opened = True
    pos = 1  # past the outer '{'
    end = len(text) - 1  # the outer '}'
    while True:
        m = _ARRAY_TOKEN_RE.match(text, pos)
        if m is None:  # ran off the end: the 'bad' alternative matches any other character
            raise _ArraySyntaxError("unbalanced braces")
        pos = m.end()
        kind = m.lastgroup
        if kind == "close":
            if expect_item and not just_opened:
                raise _ArraySyntaxError("unexpected '}' after a delimiter")
            if not stack:
                if pos <= end:
                    raise _ArraySyntaxError("junk after the closing brace")
                return root
            current, holds = stack.pop()
            expect_item = just_opened = False
        elif kind == "comma":
            if expect_item:
                raise _ArraySyntaxError("unexpected delimiter")
            expect_item = True
        elif kind == "open":
            if not expect_item:
                raise _ArraySyntaxError("missing delimiter before '{'")
            if holds == _ELEMENTS:
                raise _ArraySyntaxError("multidimensional array mixes elements and sub-arrays")
            child: list[object] = []
            current.append(child)
            stack.append((current, _SUBARRAYS))
            current, holds = child, _EMPTY
            just_opened = True
        elif kind == "quoted" or kind == "bare":
            if not expect_item:
                raise _ArraySyntaxError("missing delimiter between elements")
            if holds == _SUBARRAYS:
                raise _ArraySyntaxError("multidimensional array mixes elements and sub-arrays")
            raw = m.group(kind)
            if kind == "bare" and raw == "NULL":
                current.append(None)
            else:
                if "\\" in raw:
                    raw = _UNESCAPE_RE.sub(r"\1", raw)
                current.append(element(raw))
            holds = _ELEMENTS
            expect_item = just_opened = False
        else:
            raise _ArraySyntaxError(f"unexpected character {m.group('bad')!r}")


def _make_array_converter(array_oid: int, element_oid: int) -> _Converter:
    element_conv = _SCALARS[element_oid]
    element_name = BUILTIN_TYPE_NAMES[element_oid]
    array_name = BUILTIN_TYPE_NAMES[array_oid]

    def element(text: str) -> object:
        try:
            return element_conv(text)
        except (ValueError, ArithmeticError) as exc:
            raise ValueConversionError(element_oid, element_name, text, str(exc) or type(exc).__name__) from exc

    def convert(text: str) -> object:
        try:
            parsed = _parse_array(text, element)
        except ValueConversionError as exc:
            raise ValueConversionError(array_oid, array_name, text, f"bad element: {exc}") from exc
        if parsed is None:
            return UnknownValue(array_oid, array_name, text)
        return parsed

    return convert


_CONVERTERS: Final[dict[int, _Converter]] = dict(_SCALARS)
_CONVERTERS.update({oid: _make_array_converter(oid, elem) for oid, elem in _ARRAYS.items()})

KNOWN_TYPE_OIDS: Final[frozenset[int]] = frozenset(_CONVERTERS)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def _type_name(type_oid: int, type_names: Mapping[int, str] | None) -> str | None:
    if type_names is not None:
        name = type_names.get(type_oid)
        if name is not None:
            return name
    return BUILTIN_TYPE_NAMES.get(type_oid)


def _conversion_error(
    type_oid: int, type_names: Mapping[int, str] | None, text: str, exc: Exception
) -> ValueConversionError:
    return ValueConversionError(type_oid, _type_name(type_oid, type_names), text, str(exc) or type(exc).__name__)


def convert_text(type_oid: int, text: str, type_names: Mapping[int, str] | None = None) -> object:
    """Convert one text-format value of type ``type_oid``.

    ``type_names`` (e.g. collected from pgoutput Type messages) names non-builtin types in
    :class:`UnknownValue` and in errors; :data:`BUILTIN_TYPE_NAMES` is the fallback.
    """
    conv = _CONVERTERS.get(type_oid)
    if conv is None:
        return UnknownValue(type_oid, _type_name(type_oid, type_names), text)
    try:
        return conv(text)
    except ValueConversionError:
        raise
    except (ValueError, ArithmeticError) as exc:
        raise _conversion_error(type_oid, type_names, text, exc) from exc


def convert_tuple(
    columns: tuple[RelationColumn, ...],
    values: TupleData,
    type_names: Mapping[int, str] | None = None,
) -> dict[str, object]:
    """Convert a decoded tuple into ``{column name: value}`` using the relation's column types.

    None (NULL), UNCHANGED_TOAST and bytes (binary-format values) are kept as they are.
    """
    if len(columns) != len(values):
        raise ValueError(f"tuple has {len(values)} values but the relation has {len(columns)} columns")
    converters = _CONVERTERS
    identity = _text
    out: dict[str, object] = {}
    for col, value in zip(columns, values, strict=True):
        if isinstance(value, str):
            type_oid = col.type_oid
            conv = converters.get(type_oid)
            if conv is identity:
                out[col.name] = value
            elif conv is None:
                out[col.name] = UnknownValue(type_oid, _type_name(type_oid, type_names), value)
            else:
                try:
                    out[col.name] = conv(value)
                except ValueConversionError:
                    raise
                except (ValueError, ArithmeticError) as exc:
                    raise _conversion_error(type_oid, type_names, value, exc) from exc
        else:
            out[col.name] = value
    return out
