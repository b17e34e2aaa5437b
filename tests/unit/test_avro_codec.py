"""Round trips of the change-event codec (schemas.codec) against fastavro and the Apache Avro library."""

from __future__ import annotations

import io
import json
import math
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import avro.io
import avro.schema
import fastavro
import orjson
import pytest

from schemas import registry
from schemas.codec import (
    UNCHANGED,
    ChangeEventCodec,
    DeadLetterCodec,
    JsonValue,
    UnknownText,
    event_id,
    from_cell,
    key_bytes,
    to_cell,
    to_json,
)

UTC = UTC


# stand-ins for connectors.pgoutput.UnchangedToast / connectors.pgtypes.UnknownValue (duck typing)
class UnchangedToast:
    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST = UnchangedToast()


@dataclass(frozen=True)
class UnknownValue:
    type_oid: int
    type_name: str | None
    text: str


@pytest.fixture(scope="module")
def codec() -> ChangeEventCodec:
    return ChangeEventCodec()


@pytest.fixture(scope="module")
def reference() -> ChangeEventCodec:
    return ChangeEventCodec(engine="fastavro")


def make_event(after: dict[str, Any] | None, before: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": event_id("oa", 0x16B3748, 2),
        "op": "u",
        "before": before,
        "after": after,
        "source": {
            "system": "oa",
            "database": "oa_db",
            "schema": "public",
            "table": "approval",
            "lsn": 0x16B3700,
            "commit_lsn": 0x16B3748,
            "xid": 7781,
            "commit_ts": datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC),
            "origin": None,
            "snapshot": False,
        },
        "txn": {"id": "7781:23803720", "order": 2, "total": 3},
        "ts_ms": 1714564800123,
        "key_columns": ["id"],
    }
    event.update(kw)
    return event


def normalize(v: Any) -> Any:
    """What a value is expected to decode to."""
    if isinstance(v, (list, tuple)):
        return [normalize(x) for x in v]
    if isinstance(v, JsonValue):
        return v.value
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, UnknownValue):
        return UnknownText(v.type_name or f"oid:{v.type_oid}", v.text)
    if isinstance(v, UnchangedToast):
        return UNCHANGED
    return v


def same(a: Any, b: Any) -> bool:
    """Equality that also checks types, tz-ness, decimal digits/exponent and NaN."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return (a.is_nan() and b.is_nan()) or a.as_tuple() == b.as_tuple()
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, datetime) and isinstance(b, datetime):
        return a == b and (a.tzinfo is None) == (b.tzinfo is None)
    return type(a) is type(b) and a == b


CELLS: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    63,
    -64,
    64,
    8191,
    8192,
    2**31,
    2**63 - 1,
    -(2**63),
    0.0,
    -2.5,
    1e300,
    float("inf"),
    float("-inf"),
    float("nan"),
    "",
    "a",
    "héllo ✓ 中文",
    "x" * 4095,
    "y" * 4096,
    "z" * 70000,
    b"",
    b"\x00\xff",
    bytes(range(256)) * 40,
    bytearray(b"abc"),
    memoryview(b"mv"),
    Decimal("0"),
    Decimal("-0"),
    Decimal("12345678901234567890.123456789"),
    Decimal("-12.500"),
    Decimal("0.0000001"),
    Decimal("-0.000000000000000000000000000001"),
    Decimal("1" * 200 + "." + "9" * 200),
    Decimal("NaN"),
    Decimal("Infinity"),
    Decimal("-Infinity"),
    datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
    datetime(2024, 5, 1, 20, 30, 15, 123456, tzinfo=timezone(timedelta(hours=8))),
    datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5))),
    datetime(2024, 5, 1, 12, 30, 15, 123456),
    datetime(1, 1, 1),
    datetime(9999, 12, 31, 23, 59, 59, 999999),
    datetime(1900, 2, 28, 0, 0, 0, 1),
    date(2024, 2, 29),
    date(1970, 1, 1),
    date(1, 1, 1),
    date(9999, 12, 31),
    date(1969, 12, 31),
    uuid.UUID("123e4567-e89b-12d3-a456-426614174000"),
    uuid.UUID(int=0),
    uuid.uuid4(),
    {"b": [1, 2, {"z": None, "a": True}], "a": "x", "n": 1.5, "big": 12345678901234567890123},
    {},
    JsonValue([1, "two", None]),
    JsonValue("just a string"),
    JsonValue(None),
    JsonValue(3),
    [],
    [1, None, 3],
    ["a", None, "ü"],
    [[1, 2], [3, 4]],
    [[["deep"]], [[]]],
    (1, 2),
    [Decimal("1.10"), Decimal("NaN")],
    [datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 1)],
    [date(2024, 1, 1)],
    [uuid.UUID(int=1)],
    [True, False],
    [1.5, -0.0],
    [b"\x01", b""],
    [{"a": 1}],
    [UnknownValue(16400, "mood", "happy"), None],
    UnknownValue(16400, "mood", "happy"),
    UnknownValue(3904, "int4range", "[1,10)"),
    UnknownValue(99999, None, "opaque text"),
    UnknownText("citext", "Hello"),
    UNCHANGED_TOAST,
    UNCHANGED,
]


@pytest.mark.parametrize("value", CELLS, ids=lambda v: f"{type(v).__name__}:{v!r:.40}")
def test_cell_round_trip(codec: ChangeEventCodec, reference: ChangeEventCodec, value: Any) -> None:
    event = make_event({"id": 1, "v": value})
    data = codec.encode(event)
    assert data == reference.encode(event), "built-in encoder must match fastavro byte for byte"
    expected = normalize(value)
    for decoder in (codec, reference):
        decoded = decoder.decode(data)["after"]
        assert same(decoded["v"], expected), (decoded["v"], expected)
        assert decoded["id"] == 1
    # decoding then encoding again gives the same bytes (UNCHANGED, UnknownText re-encode); a JsonValue
    # decodes to the bare JSON value, which needs the json_columns hint to become Json again
    # (JSON null decodes to None, like pgtypes gives it: SQL NULL and JSON null only differ on the wire)
    hint = {"v"} if isinstance(value, JsonValue) else None
    if not (isinstance(value, JsonValue) and value.value is None):
        assert codec.encode(codec.decode(data), json_columns=hint) == data


def test_aware_datetimes_come_back_in_utc(codec: ChangeEventCodec) -> None:
    shanghai = datetime(2024, 5, 1, 20, 0, tzinfo=timezone(timedelta(hours=8)))
    out = codec.decode(codec.encode(make_event({"t": shanghai, "n": datetime(2024, 5, 1, 20, 0)})))["after"]
    assert out["t"] == shanghai and out["t"].tzinfo is UTC and out["t"].hour == 12
    assert out["n"].tzinfo is None and out["n"].hour == 20


def test_decimal_exact(codec: ChangeEventCodec) -> None:
    d = Decimal("12345678901234567890.123456789")
    out = codec.decode(
        codec.encode(
            make_event(
                {
                    "d": d,
                    "neg": -d,
                    "nan": Decimal("NaN"),
                    "small": Decimal("-0.0000001"),
                    "z": Decimal("0.00"),
                }
            )
        )
    )
    after = out["after"]
    assert after["d"] == d and str(after["d"]) == "12345678901234567890.123456789"
    assert after["neg"] == -d and after["neg"].is_signed()
    assert after["nan"].is_nan() and not after["nan"].is_snan()
    assert after["small"] == Decimal("-1E-7") and after["small"].as_tuple().exponent == -7
    assert after["z"].as_tuple() == Decimal("0.00").as_tuple()
    # on the wire: plain text as PostgreSQL prints numeric, never a float
    cell = to_cell(Decimal("-0.0000001"))
    assert cell == ("io.archsync.Decimal", {"value": "-0.0000001"})


def test_null_and_unchanged_are_distinct(codec: ChangeEventCodec, reference: ChangeEventCodec) -> None:
    a = codec.encode(make_event({"id": 1, "doc": None}))
    b = codec.encode(make_event({"id": 1, "doc": UNCHANGED_TOAST}))
    assert a != b
    for decoder in (codec, reference):
        assert decoder.decode(a)["after"]["doc"] is None
        assert decoder.decode(b)["after"]["doc"] is UNCHANGED
    assert UNCHANGED is not None and repr(UNCHANGED) == "UNCHANGED"
    # what fastavro itself sees: a distinct record branch
    raw: Any = fastavro.schemaless_reader(io.BytesIO(b), codec.schema, None, return_record_name=True)
    assert raw["after"]["doc"] == ("io.archsync.Unchanged", {})


def test_injected_sentinel_and_unknown_factory() -> None:
    marker = UnchangedToast()
    made: list[tuple[str, str]] = []

    def factory(type_name: str, text: str) -> tuple[str, str]:
        made.append((type_name, text))
        return ("unknown", type_name, text)  # type: ignore[return-value]

    for engine in ("builtin", "fastavro"):
        c = ChangeEventCodec(unchanged=marker, unknown_factory=factory, engine=engine)
        out = c.decode(
            c.encode(
                make_event(
                    {
                        "t": UNCHANGED,
                        "u": UnknownValue(1, "mood", "sad"),
                        "arr": [UnknownValue(2, "mood", "ok")],
                    }
                )
            )
        )["after"]
        assert out["t"] is marker
        assert out["u"] == ("unknown", "mood", "sad")
        assert out["arr"] == [("unknown", "mood", "ok")]
        # the injected sentinel re-encodes as Unchanged
        assert c.decode(c.encode(make_event({"t": marker})))["after"]["t"] is marker
    assert ("mood", "sad") in made


def test_unknown_text_kept_and_unknown_types_recorded(codec: ChangeEventCodec) -> None:
    event = make_event(
        {"id": 1, "mood": UnknownValue(16400, "mood", "happy"), "geo": UnknownValue(600, None, "(1,2)")},
        before={"id": 1, "mood": UnknownValue(16400, "mood", "sad")},
    )
    out = codec.decode(codec.encode(event))
    assert out["after"]["mood"] == UnknownText("mood", "happy")
    assert out["before"]["mood"] == UnknownText("mood", "sad")
    assert out["after"]["geo"] == UnknownText("oid:600", "(1,2)")
    assert out["unknown_types"] == {"mood": "mood", "geo": "oid:600"}
    # an explicit map wins
    out = codec.decode(codec.encode({**event, "unknown_types": {"mood": "public.mood"}}))
    assert out["unknown_types"] == {"mood": "public.mood"}


def test_unchanged_inside_array_is_rejected(codec: ChangeEventCodec, reference: ChangeEventCodec) -> None:
    for c in (codec, reference):
        with pytest.raises(ValueError, match="array"):
            c.encode(make_event({"a": [1, UNCHANGED_TOAST]}))


def test_nested_arrays_on_the_wire(codec: ChangeEventCodec) -> None:
    value = [[1, 2], [None, 4]]
    data = codec.encode(make_event({"m": value}))
    raw: Any = fastavro.schemaless_reader(io.BytesIO(data), codec.schema, None, return_record_name=True)
    arr = "io.archsync.Array"
    assert raw["after"]["m"] == (arr, {"items": [(arr, {"items": [1, 2]}), (arr, {"items": [None, 4]})]})
    assert from_cell(raw["after"]["m"]) == value


def test_envelope_round_trip(codec: ChangeEventCodec, reference: ChangeEventCodec) -> None:
    event = make_event({"id": 5, "name": "n"}, before={"id": 5}, key_columns=["tenant", "id"])
    event["source"]["origin"] = "archsync_apply_archive"
    for decoder in (codec, reference):
        out = decoder.decode(codec.encode(event))
        assert out["event_id"] == "oa:00000000016B3748:2"
        assert out["op"] == "u"
        assert out["before"] == {"id": 5}
        assert out["source"] == {**event["source"]}
        assert out["source"]["commit_ts"].tzinfo is not None
        assert out["txn"] == {"id": "7781:23803720", "order": 2, "total": 3}
        assert out["ts_ms"] == 1714564800123
        assert out["key_columns"] == ["tenant", "id"]
        assert out["unknown_types"] == {}


@pytest.mark.parametrize("op", ["c", "u", "d", "r", "t"])
def test_ops_and_optional_parts(codec: ChangeEventCodec, reference: ChangeEventCodec, op: str) -> None:
    event = make_event(None if op in "dt" else {"id": 1}, before={"id": 1} if op == "d" else None, op=op, txn=None)
    event["source"].update(xid=None, commit_ts=None, snapshot=op == "r")
    event["key_columns"] = [] if op == "t" else ["id"]
    data = codec.encode(event)
    assert data == reference.encode(event)
    out = codec.decode(data)
    assert out["op"] == op and out["txn"] is None
    assert out["source"]["snapshot"] is (op == "r") and out["source"]["xid"] is None
    assert out["source"]["commit_ts"] is None


def test_commit_ts_as_micros_and_default_ts_ms(codec: ChangeEventCodec) -> None:
    event = make_event({"id": 1})
    event["source"]["commit_ts"] = 1714564800000001
    del event["ts_ms"]
    out = codec.decode(codec.encode(event))
    assert out["source"]["commit_ts"] == datetime(2024, 5, 1, 12, 0, 0, 1, tzinfo=UTC)
    assert abs(out["ts_ms"] - datetime.now(UTC).timestamp() * 1000) < 60_000


def test_wide_row_and_long_names(codec: ChangeEventCodec, reference: ChangeEventCodec) -> None:
    row = {f"col_{i}_" + "n" * (i % 90): (i if i % 3 else f"v{i}") for i in range(300)}
    event = make_event(row)
    data = codec.encode(event)
    assert data == reference.encode(event)
    assert codec.decode(data)["after"] == row


def test_json_columns_hint(codec: ChangeEventCodec, reference: ChangeEventCodec) -> None:
    row = {
        "id": 1,
        "doc": [1, 2],
        "label": "plain",
        "js": "json string",
        "jn": None,
        "jt": UNCHANGED_TOAST,
        "jo": {"k": 1},
        "arr": [1, 2],
    }
    event = make_event(row)
    hinted = codec.encode(event, json_columns={"doc", "js", "jn", "jt", "jo"})
    assert hinted == reference.encode(event, json_columns={"doc", "js", "jn", "jt", "jo"})
    raw: Any = fastavro.schemaless_reader(io.BytesIO(hinted), codec.schema, None, return_record_name=True)
    after = raw["after"]
    assert after["doc"] == ("io.archsync.Json", {"json": "[1,2]"})
    assert after["js"] == ("io.archsync.Json", {"json": '"json string"'})
    assert after["jo"] == ("io.archsync.Json", {"json": '{"k":1}'})
    assert after["jn"] is None  # SQL NULL stays null
    assert after["jt"] == ("io.archsync.Unchanged", {})
    assert after["label"] == "plain" and after["arr"][0] == "io.archsync.Array"
    out = codec.decode(hinted)["after"]
    assert out["doc"] == [1, 2] and out["js"] == "json string" and out["jt"] is UNCHANGED
    assert event["after"]["doc"] == [1, 2]  # the caller's event is not modified


def test_json_is_canonical(codec: ChangeEventCodec) -> None:
    a = codec.encode(make_event({"j": {"b": 1, "a": {"y": 2, "x": 1}}}))
    b = codec.encode(make_event({"j": {"a": {"x": 1, "y": 2}, "b": 1}}))
    assert a == b
    assert to_cell({"b": 1, "a": 2}) == ("io.archsync.Json", {"json": '{"a":2,"b":1}'})


def test_subclasses_are_encoded_by_base_type(codec: ChangeEventCodec) -> None:
    import enum

    class Color(enum.IntEnum):
        RED = 1

    class Name(str):
        pass

    class Stamp(datetime):
        pass

    row = {"c": Color.RED, "n": Name("abc"), "s": Stamp(2024, 1, 1, tzinfo=UTC)}
    out = codec.decode(codec.encode(make_event(row)))["after"]
    assert out == {"c": 1, "n": "abc", "s": datetime(2024, 1, 1, tzinfo=UTC)}
    assert type(out["c"]) is int and type(out["n"]) is str


def test_encode_errors(codec: ChangeEventCodec, reference: ChangeEventCodec) -> None:
    with pytest.raises(OverflowError):
        codec.encode(make_event({"x": 2**63}))
    with pytest.raises(OverflowError):
        codec.encode(make_event({"x": -(2**63) - 1}))
    with pytest.raises(TypeError, match="cannot encode"):
        codec.encode(make_event({"x": object()}))
    with pytest.raises(TypeError):
        codec.encode(make_event({"x": {1, 2}}))
    with pytest.raises(ValueError, match="op"):
        codec.encode(make_event({"x": 1}, op="x"))
    with pytest.raises(ValueError):
        reference.encode(make_event({"x": 1}, op="x"))


def test_decode_errors(codec: ChangeEventCodec) -> None:
    data = codec.encode(make_event({"id": 1, "s": "text"}))
    with pytest.raises(ValueError, match="trailing"):
        codec.decode(data + b"\x00")
    for cut in (1, 5, len(data) // 2, len(data) - 1):
        with pytest.raises(ValueError):
            codec.decode(data[:cut])
    with pytest.raises(ValueError):
        codec.decode(b"")
    assert codec.decode(bytearray(data)) == codec.decode(memoryview(data))


def test_readable_by_apache_avro(codec: ChangeEventCodec) -> None:
    with pytest.warns(Warning, match="local-timestamp-micros"):  # unknown to avro 1.12: read as long
        schema = avro.schema.parse(json.dumps(registry.schema_dict("change_event")))
    event = make_event(
        {
            "id": 1,
            "amount": Decimal("-1.50"),
            "doc": UNCHANGED_TOAST,
            "tags": [["a"], []],
            "u": uuid.UUID(int=5),
            "m": UnknownValue(1, "mood", "ok"),
        }
    )
    decoded = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(io.BytesIO(codec.encode(event))))
    after = decoded["after"]
    assert after["id"] == 1
    assert after["amount"] == {"value": "-1.50"}
    assert after["doc"] == {}
    assert after["tags"] == {"items": [{"items": ["a"]}, {"items": []}]}
    assert after["u"] == {"value": "00000000-0000-0000-0000-000000000005"}
    assert after["m"] == {"type_name": "mood", "text": "ok"}
    assert decoded["txn"]["order"] == 2 and decoded["op"] == "u"


def test_event_id_deterministic() -> None:
    assert event_id("oa", 0x16B3748, 3) == "oa:00000000016B3748:3"
    assert event_id("oa", 0x16B3748, 3) == event_id("oa", 23803720, 3)
    assert event_id("archive", 0, 1) == "archive:0000000000000000:1"
    assert event_id("oa", 2**64 - 1, 10) == "oa:FFFFFFFFFFFFFFFF:10"
    assert len({event_id("oa", lsn, o) for lsn in (1, 2) for o in (1, 2)}) == 4
    # ids sort by commit position within a system for LSNs < 2**64
    assert sorted([event_id("oa", 0x10, 1), event_id("oa", 0x9, 1)]) == [
        event_id("oa", 0x9, 1),
        event_id("oa", 0x10, 1),
    ]
    with pytest.raises(ValueError):
        event_id("oa", -1, 1)


def test_key_bytes_deterministic() -> None:
    k1 = key_bytes("oa", "public", "orders", {"tenant": "t1", "id": 5})
    k2 = key_bytes("oa", "public", "orders", {"id": 5, "tenant": "t1"})
    assert k1 == k2 == b'{"key":{"id":5,"tenant":"t1"},"schema":"public","system":"oa","table":"orders"}'
    assert key_bytes("oa", "public", "orders", {"id": 6}) != key_bytes("oa", "public", "orders", {"id": 5})
    assert key_bytes("oa", "public", "a", {"id": 5}) != key_bytes("archive", "public", "a", {"id": 5})
    # JSON-safe, and the same instant gives the same key whatever its offset
    t8 = datetime(2024, 5, 1, 20, 0, tzinfo=timezone(timedelta(hours=8)))
    key = {
        "d": Decimal("10.50"),
        "t": t8,
        "n": datetime(2024, 5, 1),
        "day": date(2024, 5, 1),
        "u": uuid.UUID(int=1),
        "b": b"\x00\x01",
        "x": UnknownValue(1, "mood", "ok"),
    }
    parsed = orjson.loads(key_bytes("oa", "s", "t", key))["key"]
    assert parsed == {
        "d": "10.50",
        "t": "2024-05-01T12:00:00+00:00",
        "n": "2024-05-01T00:00:00",
        "day": "2024-05-01",
        "u": "00000000-0000-0000-0000-000000000001",
        "b": "AAE=",
        "x": "ok",
    }
    assert key_bytes("oa", "s", "t", {"t": t8}) == key_bytes("oa", "s", "t", {"t": t8.astimezone(UTC)})
    with pytest.raises(TypeError):  # orjson.JSONEncodeError
        key_bytes("oa", "s", "t", {"id": UNCHANGED_TOAST})


def test_to_json_for_humans(codec: ChangeEventCodec) -> None:
    event = make_event(
        {
            "d": Decimal("1.10"),
            "b": b"\xff",
            "t": UNCHANGED_TOAST,
            "m": UnknownValue(1, "mood", "ok"),
            "ts": datetime(2024, 1, 1, tzinfo=UTC),
            "u": uuid.UUID(int=2),
            "j": JsonValue([1]),
        }
    )
    for ev in (event, codec.decode(codec.encode(event))):
        out = orjson.loads(to_json(ev))
        after = out["after"]
        assert after["d"] == "1.10" and after["b"] == "/w=="
        assert after["t"] == {"$unchanged": True}
        assert after["m"] == {"$unknown": "mood", "text": "ok"}
        assert after["ts"] == "2024-01-01T00:00:00+00:00"
        assert after["u"] == "00000000-0000-0000-0000-000000000002"
        assert after["j"] == [1]
        assert out["source"]["commit_ts"].startswith("2024-05-01T12:00:00.000001")
    assert b"\n" in to_json(event, pretty=True)


def test_to_cell_from_cell_inverse() -> None:
    for value in CELLS:
        assert same(from_cell(to_cell(value)), normalize(value)) or (
            value is UNCHANGED_TOAST and from_cell(to_cell(value)) is UNCHANGED
        )


def test_dead_letter_round_trip() -> None:
    dl = DeadLetterCodec()
    try:
        raise OverflowError("integer 18446744073709551616 does not fit an Avro long")
    except OverflowError as exc:
        record = dl.build(
            exc,
            "encode",
            source_topic="archsync.oa.public.orders",
            source_system="oa",
            source_table="public.orders",
            source_lsn=123,
            original_json=b'{"id": 1}',
        )
    assert record["error_class"] == "builtins.OverflowError"
    assert record["reason"].startswith("integer")
    out = dl.decode(dl.encode(record))
    assert out == record
    minimal = dl.build(
        "message too large",
        "produce",
        error="KafkaError",
        original_key=b"k",
        original_value=b"v" * 10,
        ts_ms=5,
    )
    assert dl.decode(dl.encode(minimal)) == minimal
    assert minimal["source_topic"] is None and minimal["error_class"] == "KafkaError"
    with pytest.raises(Exception):  # noqa: B017 - fastavro raises its own error classes
        dl.encode({**minimal, "unexpected": 1})


def test_codec_guards_its_schema() -> None:
    codec = ChangeEventCodec()
    assert codec.schema["name"] == "io.archsync.ChangeEvent"
    with pytest.raises(ValueError):
        ChangeEventCodec(engine="nope")
