"""Schema loading and the evolution checker (schemas.registry)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from schemas import registry
from schemas.registry import SchemaNotFoundError, check_all, check_evolution, load_schema


def record(*fields: dict[str, Any], name: str = "R", **extra: Any) -> dict[str, Any]:
    return {"type": "record", "name": name, "namespace": "t", "fields": list(fields), **extra}


def field(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


# ---------------------------------------------------------------------------------------- loading


def test_shipped_schemas_are_listed_and_load() -> None:
    listed = registry.list_schemas()
    assert listed["change_event"][0] == 1 and listed["dead_letter"][0] == 1
    assert "change_event.v1" in registry.schema_keys() and "dead_letter.v1" in registry.schema_keys()
    latest = load_schema("change_event")
    assert latest is load_schema("change_event", registry.latest_version("change_event"))
    assert load_schema("change_event.v1") is load_schema("change_event", 1)
    assert load_schema("change_event", 1)["name"] == "io.archsync.ChangeEvent"
    assert load_schema("dead_letter")["name"] == "io.archsync.DeadLetter"


def test_unknown_schema() -> None:
    with pytest.raises(SchemaNotFoundError):
        load_schema("nope")
    with pytest.raises(SchemaNotFoundError):
        load_schema("change_event", 999)
    with pytest.raises(SchemaNotFoundError):
        load_schema("change_event.v1", 2)


def test_schema_dict_is_a_copy() -> None:
    raw = registry.schema_dict("change_event")
    raw["fields"].clear()
    assert registry.schema_dict("change_event")["fields"]


def test_change_event_shape() -> None:
    raw = registry.schema_dict("change_event", 1)
    assert raw["namespace"] == "io.archsync"
    fields = {f["name"]: f for f in raw["fields"]}
    assert list(fields) == [
        "event_id",
        "op",
        "before",
        "after",
        "source",
        "txn",
        "ts_ms",
        "key_columns",
        "unknown_types",
    ]
    assert fields["op"]["type"]["symbols"] == ["c", "u", "d", "r", "t"]
    assert fields["unknown_types"]["default"] == {}
    cell = fields["before"]["type"][1]["values"]
    names = [b if isinstance(b, str) else b["name"] for b in cell]
    assert names == [
        "null",
        "boolean",
        "long",
        "double",
        "string",
        "bytes",
        "Decimal",
        "TimestampTz",
        "LocalTimestamp",
        "Date",
        "Uuid",
        "Json",
        "Unknown",
        "Array",
        "Unchanged",
    ]
    # `after` refers to the same named records; Array items refer to them (and to Array) by name
    assert fields["after"]["type"][1]["values"][6:] == [f"io.archsync.{n}" for n in names[6:]]
    array = cell[13]
    assert array["fields"][0]["type"]["items"][-1] == "io.archsync.Array"
    assert "io.archsync.Unchanged" not in array["fields"][0]["type"]["items"]
    assert all(b.get("doc") for b in cell if isinstance(b, dict))
    source = {f["name"]: f for f in fields["source"]["type"]["fields"]}
    assert source["commit_ts"]["type"][1]["logicalType"] == "timestamp-micros"


def test_check_all_passes_on_shipped_schemas() -> None:
    assert check_all() == []


# ------------------------------------------------------------------------------------- evolution

BASE = record(field("id", "long"), field("name", "string"), field("note", ["null", "string"], default=None))


def test_identical_and_compatible_changes() -> None:
    assert check_evolution(BASE, copy.deepcopy(BASE)) == []
    added = copy.deepcopy(BASE)
    added["fields"].append(field("extra", ["null", "long"], default=None))
    added["fields"].append(field("count", "int", default=0))
    assert check_evolution(BASE, added) == []
    # removing a field that has a default is fine both ways
    assert check_evolution(added, BASE) == []
    # docs and field order do not matter; string <-> bytes is a two-way promotion
    reordered = record(
        field("name", "bytes", doc="now bytes"),
        field("note", ["null", "string"], default=None),
        field("id", "long"),
    )
    assert check_evolution(BASE, reordered) == []


def test_added_field_without_default() -> None:
    new = copy.deepcopy(BASE)
    new["fields"].append(field("extra", "long"))
    problems = check_evolution(BASE, new)
    assert problems == ["R.extra: field added without a default [breaks BACKWARD]"]
    assert check_evolution(BASE, new, mode="forward") == []


def test_removed_field_without_default() -> None:
    new = record(field("id", "long"), field("note", ["null", "string"], default=None))
    assert check_evolution(BASE, new) == ["R.name: field removed without a default [breaks FORWARD]"]
    assert check_evolution(BASE, new, mode="backward") == []


def test_illegal_type_change() -> None:
    new = record(field("id", "string"), field("name", "string"), field("note", ["null", "string"], default=None))
    assert check_evolution(BASE, new) == ["R.id: type changed from long to string [breaks BACKWARD+FORWARD]"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("int", "long"),
        ("int", "float"),
        ("int", "double"),
        ("long", "float"),
        ("long", "double"),
        ("float", "double"),
    ],
)
def test_promotions(old: str, new: str) -> None:
    a, b = record(field("x", old)), record(field("x", new))
    assert check_evolution(a, b, mode="backward") == []
    # a promotion is one-way: old readers cannot read the wider type
    assert check_evolution(a, b) == [f"R.x: type changed from {old} to {new} [breaks FORWARD]"]
    assert check_evolution(b, a, mode="backward") == [f"R.x: type changed from {new} to {old} [breaks BACKWARD]"]


def test_enum_symbols() -> None:
    old = record(field("op", {"type": "enum", "name": "Op", "symbols": ["c", "u", "d"]}))
    removed = record(field("op", {"type": "enum", "name": "Op", "symbols": ["c", "u"]}))
    assert check_evolution(old, removed) == ["R.op: enum Op symbols removed: d [breaks BACKWARD]"]
    added = record(field("op", {"type": "enum", "name": "Op", "symbols": ["c", "u", "d", "t"]}))
    assert check_evolution(old, added) == ["R.op: enum Op symbols added: t [breaks FORWARD]"]
    assert check_evolution(old, added, mode="backward") == []
    # an enum default lets readers map unknown symbols
    with_default = record(field("op", {"type": "enum", "name": "Op", "symbols": ["c", "u"], "default": "c"}))
    assert check_evolution(old, with_default, mode="backward") == []


def test_union_branches() -> None:
    old = record(field("v", ["null", "long", "string"]))
    removed = record(field("v", ["null", "long"]))
    assert check_evolution(old, removed) == ["R.v: union branch string removed [breaks BACKWARD]"]
    added = record(field("v", ["null", "long", "string", "boolean"]))
    assert check_evolution(old, added) == ["R.v: union branch boolean added [breaks FORWARD]"]
    # Avro resolves a writer branch through a promotion: old readers read new bytes as string
    assert check_evolution(old, record(field("v", ["null", "long", "string", "bytes"]))) == []
    # making a field nullable: new readers fine, old readers cannot read null
    plain, nullable = record(field("v", "string")), record(field("v", ["null", "string"], default=None))
    assert check_evolution(plain, nullable, mode="backward") == []
    assert check_evolution(plain, nullable) == ["R.v: type changed from string to [null, string] [breaks FORWARD]"]


def test_nested_records_arrays_maps() -> None:
    inner = {"type": "record", "name": "Inner", "fields": [field("a", "int")]}
    old = record(
        field("rec", inner),
        field("arr", {"type": "array", "items": "string"}),
        field("map", {"type": "map", "values": ["null", "long"]}),
        field("again", "Inner"),
    )
    new = copy.deepcopy(old)
    new["fields"][0]["type"]["fields"][0]["type"] = "string"
    new["fields"][1]["type"]["items"] = "int"
    new["fields"][2]["type"]["values"] = ["null", "string"]
    problems = check_evolution(old, new)
    assert "R.rec.a: type changed from int to string [breaks BACKWARD+FORWARD]" in problems
    assert "R.arr[]: type changed from string to int [breaks BACKWARD+FORWARD]" in problems
    assert "R.map{}: union branch long removed [breaks BACKWARD]" in problems
    assert "R.map{}: union branch string added [breaks FORWARD]" in problems
    renamed = copy.deepcopy(old)
    renamed["fields"][0]["type"]["name"] = "Other"
    renamed["fields"][3]["type"] = "Other"
    renamed_msg = "R.rec: record renamed from Inner to Other [breaks BACKWARD+FORWARD]"
    assert renamed_msg in check_evolution(old, renamed)
    aliased = copy.deepcopy(renamed)
    aliased["fields"][0]["type"]["aliases"] = ["Inner"]
    assert check_evolution(old, aliased, mode="backward") == []


def test_logical_type_and_fixed() -> None:
    old = record(
        field("t", {"type": "long", "logicalType": "timestamp-micros"}),
        field("f", {"type": "fixed", "name": "F", "size": 4}),
    )
    new = record(
        field("t", {"type": "long", "logicalType": "timestamp-millis"}),
        field("f", {"type": "fixed", "name": "F", "size": 8}),
    )
    problems = check_evolution(old, new)
    assert (
        "R.t: logical type changed from long(timestamp-micros) to long(timestamp-millis) [breaks BACKWARD+FORWARD]"
    ) in problems
    assert "R.f: fixed F size changed from 4 to 8 [breaks BACKWARD+FORWARD]" in problems


def test_change_event_evolution() -> None:
    v1 = registry.schema_dict("change_event", 1)
    assert check_evolution(v1, v1) == []  # recursive Array does not loop
    assert check_evolution(load_schema("change_event", 1), v1) == []  # parsed schemas are accepted
    v2 = copy.deepcopy(v1)
    source = next(f for f in v2["fields"] if f["name"] == "source")["type"]
    source["fields"].append(field("tx_seq", ["null", "long"], default=None))
    assert check_evolution(v1, v2) == []
    # dropping Cell branches (boolean, and the Unchanged record: its definition in `before` and the
    # reference in `after`)
    v3 = copy.deepcopy(v1)
    for f in v3["fields"]:
        if f["name"] in ("before", "after"):
            f["type"][1]["values"] = [
                b
                for b in f["type"][1]["values"]
                if b not in ("boolean", "io.archsync.Unchanged")
                and not (isinstance(b, dict) and b["name"] == "Unchanged")
            ]
    problems = check_evolution(v1, v3)
    assert sorted(problems) == [
        "ChangeEvent.after{}: union branch boolean removed [breaks BACKWARD]",
        "ChangeEvent.after{}: union branch record Unchanged removed [breaks BACKWARD]",
        "ChangeEvent.before{}: union branch boolean removed [breaks BACKWARD]",
        "ChangeEvent.before{}: union branch record Unchanged removed [breaks BACKWARD]",
    ]
    v4 = copy.deepcopy(v1)
    v4["fields"].append(field("required_new", "string"))
    assert check_evolution(v1, v4) == ["ChangeEvent.required_new: field added without a default [breaks BACKWARD]"]


def test_bad_mode() -> None:
    with pytest.raises(ValueError):
        check_evolution(BASE, BASE, mode="sideways")


def test_check_all_on_a_folder(tmp_path: Path) -> None:
    def write(name: str, schema: Any) -> None:
        (tmp_path / name).write_text(json.dumps(schema))

    write("thing.v1.avsc", BASE)
    ok = copy.deepcopy(BASE)
    ok["fields"].append(field("extra", ["null", "long"], default=None))
    write("thing.v2.avsc", ok)
    assert check_all(tmp_path) == []
    bad = copy.deepcopy(ok)
    bad["fields"].append(field("must", "long"))
    write("thing.v3.avsc", bad)
    write("other.v1.avsc", BASE)
    write("other.v3.avsc", BASE)
    write("README.avsc", BASE)
    write("broken.v1.avsc", {"type": "record", "name": "B", "fields": [field("x", "no_such_type")]})
    problems = check_all(tmp_path)
    assert "thing.v2 -> thing.v3: R.must: field added without a default [breaks BACKWARD]" in problems
    assert any(p.startswith("README.avsc: file name") for p in problems)
    assert any(p.startswith("broken.v1.avsc: cannot be parsed") for p in problems)
    assert "other: versions are not consecutive: [1, 3]" in problems
    assert not any(p.startswith("thing.v1 -> thing.v2") for p in problems)
