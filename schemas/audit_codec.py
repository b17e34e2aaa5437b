"""Avro (audit_event.v1, schemaless binary) encoding of audit records.

audit_event.v1 is flat (strings, longs, nullable strings/longs, string arrays), so the encoder
here is a small hand-written one, about 10x faster than fastavro's per-record writer; the tests
check it writes the same bytes as ``fastavro.schemaless_writer``. Decoding uses fastavro.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any, Final

from fastavro import schemaless_reader, schemaless_writer

from schemas import registry

AUDIT_EVENT_SCHEMA: Final = "audit_event.v1"


def _long(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    if z < 0x80:
        return bytes((z,))
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


_SMALL = [_long(n) for n in range(4096)]


def _string(value: str) -> bytes:
    data = value.encode()
    n = len(data)
    return (_SMALL[n] if n < 4096 else _long(n)) + data


def _nullable(enc: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    def write(value: Any) -> bytes:
        return b"\x00" if value is None else b"\x02" + enc(value)

    return write


def _str_array(values: Any) -> bytes:
    if not values:
        return b"\x00"
    return _long(len(values)) + b"".join(_string(str(v)) for v in values) + b"\x00"


def _field_writer(field: Mapping[str, Any]) -> Callable[[Any], bytes]:
    t = field["type"]
    if t == "string":
        return _string
    if t == "long":
        return lambda n: _SMALL[n] if 0 <= n < 4096 else _long(n)
    if t == ["null", "string"]:
        return _nullable(_string)
    if t == ["null", "long"]:
        return _nullable(_long)
    if isinstance(t, dict) and t.get("type") == "array" and t.get("items") == "string":
        return _str_array
    raise ValueError(f"audit codec: unsupported field type {t!r} of {field['name']}")


class AuditCodec:
    """Encode/decode audit records (dicts with the fields of audit_event.v1)."""

    def __init__(self, schema: str = AUDIT_EVENT_SCHEMA) -> None:
        self.schema = registry.load_schema(schema)
        raw = registry.schema_dict(schema)
        self._writers = [(f["name"], _field_writer(f), f.get("default")) for f in raw["fields"]]

    def encode(self, record: Mapping[str, Any]) -> bytes:
        get = record.get
        try:
            return b"".join([write(get(name, default)) for name, write, default in self._writers])
        except (TypeError, AttributeError) as exc:
            raise ValueError(f"audit record does not fit {AUDIT_EVENT_SCHEMA}: {exc}") from None

    def encode_fastavro(self, record: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        schemaless_writer(buf, self.schema, dict(record))
        return buf.getvalue()

    def decode(self, data: bytes) -> dict[str, Any]:
        value = schemaless_reader(io.BytesIO(data), self.schema, None)
        assert isinstance(value, dict)
        return value
