"""Unit tests for connectors.pgtypes: pgoutput text values -> Python values by type OID."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from connectors.pgoutput import UNCHANGED_TOAST, RelationColumn
from connectors.pgtypes import (
    BUILTIN_TYPE_NAMES,
    KNOWN_TYPE_OIDS,
    UnknownValue,
    ValueConversionError,
    convert_text,
    convert_tuple,
)

# --------------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------------


def test_bool() -> None:
    assert convert_text(16, "t") is True
    assert convert_text(16, "f") is False
    for bad in ("true", "T", "", "1"):
        with pytest.raises(ValueConversionError, match="bool"):
            convert_text(16, bad)


@pytest.mark.parametrize("oid", [21, 23, 20, 26])
def test_integers(oid: int) -> None:
    assert convert_text(oid, "0") == 0
    assert convert_text(oid, "-32768") == -32768
    assert type(convert_text(oid, "42")) is int


def test_int8_extremes() -> None:
    assert convert_text(20, "9223372036854775807") == 2**63 - 1
    assert convert_text(20, "-9223372036854775808") == -(2**63)
    assert convert_text(26, "4294967295") == 2**32 - 1


def test_integer_malformed() -> None:
    with pytest.raises(ValueConversionError, match=r"int4 \(oid 23\) value '12a'"):
        convert_text(23, "12a")


@pytest.mark.parametrize("oid", [700, 701])
def test_floats(oid: int) -> None:
    assert convert_text(oid, "1.5") == 1.5
    assert convert_text(oid, "-0") == 0.0
    assert convert_text(oid, "1e+300") == 1e300
    assert convert_text(oid, "Infinity") == math.inf
    assert convert_text(oid, "-Infinity") == -math.inf
    nan = convert_text(oid, "NaN")
    assert isinstance(nan, float)
    assert math.isnan(nan)
    with pytest.raises(ValueConversionError):
        convert_text(oid, "one")


def test_numeric_is_exact_decimal() -> None:
    many = "123456789012345678901234567890.123456789012345678901234567890"
    value = convert_text(1700, many)
    assert isinstance(value, Decimal)
    assert value == Decimal(many)
    assert str(value) == many
    assert convert_text(1700, "-0.01") == Decimal("-0.01")
    assert str(convert_text(1700, "100.00")) == "100.00"  # scale kept
    assert str(convert_text(1700, "0.0000000000000000000000000001")) == "1E-28"
    assert convert_text(1700, "-99999999999999999999999999999999999999") == -(10**38 - 1)


def test_numeric_never_float() -> None:
    for text in ("0.1", "1", "1e5", "-3.14"):
        assert type(convert_text(1700, text)) is Decimal


def test_numeric_special_values() -> None:
    nan = convert_text(1700, "NaN")
    assert isinstance(nan, Decimal)
    assert nan.is_nan()
    assert convert_text(1700, "Infinity") == Decimal("Infinity")
    assert convert_text(1700, "-Infinity") == Decimal("-Infinity")


@pytest.mark.parametrize("bad", ["1.2.3", "abc", "", "1,5"])
def test_numeric_malformed(bad: str) -> None:
    with pytest.raises(ValueConversionError, match=r"numeric \(oid 1700\)") as info:
        convert_text(1700, bad)
    assert info.value.type_oid == 1700
    assert info.value.type_name == "numeric"
    assert info.value.text == bad


@pytest.mark.parametrize("oid", [25, 1043, 1042, 19, 18])
def test_text_types(oid: int) -> None:
    for text in ("", "hello", "  padded  ", "NULL", "多语言 ✓", 'a\\b"c'):
        assert convert_text(oid, text) == text


def test_date() -> None:
    assert convert_text(1082, "2024-02-29") == date(2024, 2, 29)
    assert convert_text(1082, "0001-01-01") == date(1, 1, 1)
    assert convert_text(1082, "9999-12-31") == date(9999, 12, 31)


@pytest.mark.parametrize("text", ["infinity", "-infinity", "0044-03-15 BC", "0001-12-31 BC", "10000-01-01"])
def test_date_unrepresentable(text: str) -> None:
    assert convert_text(1082, text) == UnknownValue(1082, "date", text)


@pytest.mark.parametrize("bad", ["2024-02-30", "2024-13-01", "yesterday", "2024-3-1", ""])
def test_date_malformed(bad: str) -> None:
    with pytest.raises(ValueConversionError, match="date"):
        convert_text(1082, bad)


def test_timestamp_naive() -> None:
    value = convert_text(1114, "2024-03-01 12:34:56.123456")
    assert value == datetime(2024, 3, 1, 12, 34, 56, 123456)
    assert isinstance(value, datetime)
    assert value.tzinfo is None


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("2024-03-01 12:34:56", 0),
        ("2024-03-01 12:34:56.1", 100000),
        ("2024-03-01 12:34:56.12", 120000),
        ("2024-03-01 12:34:56.123", 123000),
        ("2024-03-01 12:34:56.1234", 123400),
        ("2024-03-01 12:34:56.12345", 123450),
        ("2024-03-01 12:34:56.000001", 1),
    ],
)
def test_timestamp_fraction_digits(text: str, micros: int) -> None:
    assert convert_text(1114, text) == datetime(2024, 3, 1, 12, 34, 56, micros)


@pytest.mark.parametrize("text", ["infinity", "-infinity", "0044-03-15 12:00:00 BC", "10000-01-01 00:00:00"])
def test_timestamp_unrepresentable(text: str) -> None:
    assert convert_text(1114, text) == UnknownValue(1114, "timestamp", text)


def test_timestamp_malformed() -> None:
    with pytest.raises(ValueConversionError, match="timestamp"):
        convert_text(1114, "2024-03-01 25:00:00")
    with pytest.raises(ValueConversionError, match="offset"):
        convert_text(1114, "2024-03-01 12:00:00+00")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-03-01 12:34:56.123456+00", datetime(2024, 3, 1, 12, 34, 56, 123456, tzinfo=UTC)),
        ("2024-03-01 12:34:56+00", datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)),
        ("2024-03-01 12:34:56.5+00", datetime(2024, 3, 1, 12, 34, 56, 500000, tzinfo=UTC)),
        ("2024-03-01 18:04:56+05:30", datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)),
        ("2024-03-01 04:34:56.123-08", datetime(2024, 3, 1, 12, 34, 56, 123000, tzinfo=UTC)),
        ("2024-03-01 12:40:24+00:05:28", datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)),
    ],
)
def test_timestamptz(text: str, expected: datetime) -> None:
    value = convert_text(1184, text)
    assert isinstance(value, datetime)
    assert value.tzinfo is not None
    assert value == expected


def test_timestamptz_keeps_offset_as_sent() -> None:
    value = convert_text(1184, "2024-03-01 18:04:56+05:30")
    assert isinstance(value, datetime)
    assert value.utcoffset() == timedelta(hours=5, minutes=30)
    utc = convert_text(1184, "2024-03-01 12:34:56+00")
    assert isinstance(utc, datetime)
    assert utc.tzinfo == timezone.utc  # noqa: UP017


@pytest.mark.parametrize("text", ["infinity", "-infinity", "0044-03-15 12:00:00+00 BC"])
def test_timestamptz_unrepresentable(text: str) -> None:
    assert convert_text(1184, text) == UnknownValue(1184, "timestamptz", text)


def test_timestamptz_without_offset_is_an_error() -> None:
    with pytest.raises(ValueConversionError, match="offset"):
        convert_text(1184, "2024-03-01 12:34:56")


@pytest.mark.parametrize("oid", [114, 3802])
def test_json(oid: int) -> None:
    assert convert_text(oid, '{"a": [1, 2.5, null, true], "b": {"c": "d"}}') == {
        "a": [1, 2.5, None, True],
        "b": {"c": "d"},
    }
    assert convert_text(oid, "[]") == []
    assert convert_text(oid, '"str"') == "str"
    assert convert_text(oid, "null") is None
    assert convert_text(oid, "42") == 42
    with pytest.raises(ValueConversionError, match="json"):
        convert_text(oid, "{not json")


def test_bytea_hex() -> None:
    assert convert_text(17, "\\x") == b""
    assert convert_text(17, "\\x00ff10") == b"\x00\xff\x10"
    assert convert_text(17, "\\xDEADbeef") == b"\xde\xad\xbe\xef"
    with pytest.raises(ValueConversionError, match="bytea"):
        convert_text(17, "\\x0")
    with pytest.raises(ValueConversionError, match="bytea"):
        convert_text(17, "\\xzz")


def test_bytea_escape_format() -> None:
    assert convert_text(17, "abc") == b"abc"
    assert convert_text(17, "a\\\\b\\000\\377") == b"a\\b\x00\xff"
    with pytest.raises(ValueConversionError, match="bytea"):
        convert_text(17, "bad\\9")


def test_uuid() -> None:
    text = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    assert convert_text(2950, text) == uuid.UUID(text)
    with pytest.raises(ValueConversionError, match="uuid"):
        convert_text(2950, "not-a-uuid")


# --------------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("oid", [1005, 1007, 1016])
def test_int_arrays(oid: int) -> None:
    assert convert_text(oid, "{}") == []
    assert convert_text(oid, "{1,-2,3}") == [1, -2, 3]
    assert convert_text(oid, "{1,NULL,3}") == [1, None, 3]
    assert convert_text(oid, "{{1,2},{3,4}}") == [[1, 2], [3, 4]]
    assert convert_text(oid, "{{{1},{2}},{{3},{4}}}") == [[[1], [2]], [[3], [4]]]
    assert convert_text(oid, "{{1,NULL},{NULL,4}}") == [[1, None], [None, 4]]


def test_bool_array() -> None:
    assert convert_text(1000, "{t,f,NULL}") == [True, False, None]


def test_float_arrays() -> None:
    value = convert_text(1022, "{1.5,NaN,Infinity,-Infinity}")
    assert isinstance(value, list)
    assert value[0] == 1.5
    assert math.isnan(value[1])
    assert value[2:] == [math.inf, -math.inf]
    assert convert_text(1021, "{0.25}") == [0.25]


def test_numeric_array_exact() -> None:
    value = convert_text(1231, "{1.10,NaN,-12345678901234567890.000000000000000001,NULL}")
    assert isinstance(value, list)
    assert value[0] == Decimal("1.10")
    assert str(value[0]) == "1.10"
    assert value[1].is_nan()
    assert value[2] == Decimal("-12345678901234567890.000000000000000001")
    assert value[3] is None


@pytest.mark.parametrize("oid", [1009, 1015, 1014])
def test_text_arrays_quoting_and_escapes(oid: int) -> None:
    literal = r'{plain,"with space","comma,inside","quote\"inside","back\\slash","NULL",NULL,"","{braces}"}'
    assert convert_text(oid, literal) == [
        "plain",
        "with space",
        "comma,inside",
        'quote"inside',
        "back\\slash",
        "NULL",  # quoted NULL is the string
        None,  # bare NULL is SQL NULL
        "",
        "{braces}",
    ]


def test_text_array_unicode_and_newlines() -> None:
    assert convert_text(1009, '{"多 语","line\nbreak",ünï}') == ["多 语", "line\nbreak", "ünï"]


def test_nested_text_array() -> None:
    assert convert_text(1009, '{{a,"b c"},{NULL,"d}"}}') == [["a", "b c"], [None, "d}"]]


def test_date_and_timestamp_arrays() -> None:
    assert convert_text(1182, "{2024-01-01,infinity,NULL}") == [
        date(2024, 1, 1),
        UnknownValue(1082, "date", "infinity"),
        None,
    ]
    assert convert_text(1115, '{"2024-03-01 12:34:56.5","2024-03-01 00:00:00"}') == [
        datetime(2024, 3, 1, 12, 34, 56, 500000),
        datetime(2024, 3, 1),
    ]
    assert convert_text(1185, '{"2024-03-01 12:34:56+00","2024-03-01 18:04:56.1+05:30"}') == [
        datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC),
        datetime(2024, 3, 1, 12, 34, 56, 100000, tzinfo=UTC),
    ]


def test_uuid_array() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    assert convert_text(2951, f"{{{a},{b},NULL}}") == [a, b, None]


@pytest.mark.parametrize("oid", [199, 3807])
def test_json_arrays(oid: int) -> None:
    literal = r'{"{\"a\": 1, \"b\": \"x,y\"}","[1, 2]",NULL,"\"s\\\\t\""}'
    assert convert_text(oid, literal) == [{"a": 1, "b": "x,y"}, [1, 2], None, "s\\t"]


def test_json_array_elements_that_are_json_arrays_are_not_dimensions() -> None:
    assert convert_text(3807, '{"[1]","[2, 3]"}') == [[1], [2, 3]]
    assert convert_text(3807, '{{"[1]",2},{"{}",null}}') == [[[1], 2], [{}, None]]
    assert convert_text(3807, "{{1,2}}") == [[1, 2]]


def _render_element(value: str | None) -> str:
    """Render one element the way PostgreSQL's array_out does."""
    if value is None:
        return "NULL"
    if value == "" or value.upper() == "NULL" or any(c in value for c in '{},"\\ \t\n\r\v\f'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _render(value: list[object]) -> str:
    parts = [_render(v) if isinstance(v, list) else _render_element(v) for v in value]  # type: ignore[arg-type]
    return "{" + ",".join(parts) + "}"


def test_text_array_round_trip_random() -> None:
    rng = random.Random(5)
    alphabet = ["a", "Z", "0", " ", ",", "{", "}", '"', "\\", "'", "\n", "é", "日", "N", "U", "L"]

    def element() -> str | None:
        if rng.random() < 0.15:
            return None
        if rng.random() < 0.05:
            return rng.choice(["NULL", "null", ""])
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 6)))

    def build(dims: list[int]) -> list[object]:
        if len(dims) == 1:
            return [element() for _ in range(dims[0])]
        return [build(dims[1:]) for _ in range(dims[0])]

    for _ in range(2000):
        value = build([rng.randrange(1, 4) for _ in range(rng.randrange(1, 4))])
        literal = _render(value)
        assert convert_text(1009, literal) == value, literal


def test_bytea_array() -> None:
    assert convert_text(1001, r'{"\\x0102","\\x",NULL}') == [b"\x01\x02", b"", None]


def test_array_with_explicit_bounds_is_unknown() -> None:
    assert convert_text(1007, "[0:1]={1,2}") == UnknownValue(1007, "_int4", "[0:1]={1,2}")


def test_array_tolerates_whitespace_between_tokens() -> None:
    assert convert_text(1007, "{ 1 , 2 }") == [1, 2]
    assert convert_text(1009, '{ "a" , b }') == ["a", "b"]


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1,2",
        "{1,2",
        "{1,,2}",
        "{,1}",
        "{1,}",
        "{1,{2}}",
        "{{1},2}",
        "{1}{2}",
        '{"a}',
        "{1 2}",
        "{1}x",
        "{{1}",
    ],
)
def test_array_malformed(bad: str) -> None:
    with pytest.raises(ValueConversionError, match="_int4"):
        convert_text(1007, bad)


def test_array_bad_element_names_both_types() -> None:
    with pytest.raises(ValueConversionError) as info:
        convert_text(1007, "{1,x,3}")
    message = str(info.value)
    assert "_int4 (oid 1007)" in message
    assert "int4 (oid 23)" in message
    assert "'x'" in message
    with pytest.raises(ValueConversionError, match="_numeric"):
        convert_text(1231, '{"1.2.3"}')


# --------------------------------------------------------------------------------------------------
# Unknown types, names, errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("oid", "name", "text"),
    [
        (1083, "time", "12:34:56.789"),
        (1186, "interval", "1 day 02:03:04"),
        (869, "inet", "192.168.0.1/24"),
        (790, "money", "$1,234.56"),
        (1266, "timetz", "12:34:56+02"),
        (1560, "bit", "1010"),
        (142, "xml", "<a>b</a>"),
    ],
)
def test_unknown_builtin_types_keep_text_and_name(oid: int, name: str, text: str) -> None:
    value = convert_text(oid, text)
    assert value == UnknownValue(type_oid=oid, type_name=name, text=text)
    assert BUILTIN_TYPE_NAMES[oid] == name
    assert oid not in KNOWN_TYPE_OIDS


def test_unknown_user_type_uses_type_names() -> None:
    assert convert_text(98765, "approved") == UnknownValue(98765, None, "approved")
    names = {98765: "approval_state"}
    assert convert_text(98765, "approved", names) == UnknownValue(98765, "approval_state", "approved")
    # type_names may also rename a builtin in errors and unknown values; builtins are the fallback
    assert convert_text(1186, "1 day", {}) == UnknownValue(1186, "interval", "1 day")


def test_unknown_value_is_frozen_and_hashable() -> None:
    value = UnknownValue(1, "x", "y")
    with pytest.raises(AttributeError):
        value.text = "z"  # type: ignore[misc]
    assert hash(value) == hash(UnknownValue(1, "x", "y"))


def test_known_type_oids() -> None:
    expected = {
        16,
        20,
        21,
        23,
        26,
        700,
        701,
        1700,
        25,
        1043,
        1042,
        19,
        18,
        1082,
        1114,
        1184,
        114,
        3802,
        17,
        2950,
    }
    expected |= {
        1000,
        1005,
        1007,
        1016,
        1021,
        1022,
        1231,
        1009,
        1015,
        1014,
        1182,
        1115,
        1185,
        2951,
        199,
        3807,
        1001,
    }
    assert expected <= KNOWN_TYPE_OIDS
    assert isinstance(KNOWN_TYPE_OIDS, frozenset)
    assert all(oid in BUILTIN_TYPE_NAMES for oid in KNOWN_TYPE_OIDS)


def test_conversion_error_truncates_long_text() -> None:
    long_text = "9" * 50 + "x" + "9" * 200
    with pytest.raises(ValueConversionError) as info:
        convert_text(1700, long_text)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.type_oid == 1700
    assert err.text == long_text[:80] + "…"
    assert long_text[:80] in str(err)
    assert long_text not in str(err)
    assert "numeric" in str(err)


def test_conversion_error_names_user_type() -> None:
    # a domain over int4 reported with its builtin OID but a custom name map
    with pytest.raises(ValueConversionError, match="my_int"):
        convert_text(23, "x", {23: "my_int"})


# --------------------------------------------------------------------------------------------------
# convert_tuple
# --------------------------------------------------------------------------------------------------

COLUMNS = (
    RelationColumn(True, "id", 20, -1),
    RelationColumn(False, "amount", 1700, 786438),
    RelationColumn(False, "memo", 25, -1),
    RelationColumn(False, "approved", 16, -1),
    RelationColumn(False, "created_at", 1184, -1),
    RelationColumn(False, "attachment", 17, -1),
    RelationColumn(False, "state", 98765, -1),
    RelationColumn(False, "tags", 1009, -1),
)


def test_convert_tuple() -> None:
    values = (
        "7",
        "1234.50",
        None,
        "t",
        "2024-03-01 12:34:56+00",
        UNCHANGED_TOAST,
        "approved",
        '{a,"b c"}',
    )
    row = convert_tuple(COLUMNS, values, {98765: "approval_state"})
    assert row == {
        "id": 7,
        "amount": Decimal("1234.50"),
        "memo": None,
        "approved": True,
        "created_at": datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC),
        "attachment": UNCHANGED_TOAST,
        "state": UnknownValue(98765, "approval_state", "approved"),
        "tags": ["a", "b c"],
    }
    assert row["attachment"] is UNCHANGED_TOAST
    assert row["memo"] is None
    assert list(row) == [c.name for c in COLUMNS]


def test_convert_tuple_passes_binary_values_through() -> None:
    cols = (RelationColumn(True, "id", 23, -1), RelationColumn(False, "blob", 17, -1))
    assert convert_tuple(cols, (b"\x00\x00\x00\x01", b"\xff")) == {"id": b"\x00\x00\x00\x01", "blob": b"\xff"}


def test_convert_tuple_toast_is_not_none() -> None:
    cols = (RelationColumn(False, "a", 25, -1), RelationColumn(False, "b", 25, -1))
    row = convert_tuple(cols, (None, UNCHANGED_TOAST))
    assert row["a"] is None
    assert row["b"] is UNCHANGED_TOAST


def test_convert_tuple_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 values but the relation has 8 columns"):
        convert_tuple(COLUMNS, ("1", "2"))


def test_convert_tuple_error_names_type_and_text() -> None:
    values = ("7", "12..5", None, "t", None, None, None, None)
    with pytest.raises(ValueConversionError, match=r"numeric \(oid 1700\) value '12..5'"):
        convert_tuple(COLUMNS, values)
    with pytest.raises(ValueConversionError, match=r"_text"):
        convert_tuple(COLUMNS, ("7", None, None, None, None, None, None, "{a"))


def test_convert_tuple_matches_convert_text() -> None:
    values = ("-1", "0.000", "x", "f", "2024-03-01 12:34:56.1-02", "\\x01", "s", "{}")
    row = convert_tuple(COLUMNS, values)
    for col, text in zip(COLUMNS, values, strict=True):
        assert row[col.name] == convert_text(col.type_oid, text)
