"""Versioned Avro schemas shipped in ``schemas/avro`` and a schema-evolution checker.

Files are named ``<name>.v<N>.avsc`` (e.g. ``change_event.v1.avsc``); a published version is immutable,
a change is a new file with the next version number. ``check_all()`` verifies that each version can be
read by, and can read, the previous one (FULL compatibility).

Public API:
    SCHEMA_DIR, list_schemas(), schema_keys(), latest_version(name), schema_dict(name, version=None),
    load_schema(name, version=None), check_evolution(old, new, mode="full"), check_all()
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fastavro

__all__ = [
    "SCHEMA_DIR",
    "SchemaNotFoundError",
    "check_all",
    "check_evolution",
    "latest_version",
    "list_schemas",
    "load_schema",
    "schema_dict",
    "schema_keys",
]

SCHEMA_DIR = Path(__file__).resolve().parent / "avro"
_FILE_RE = re.compile(r"^(?P<name>[A-Za-z0-9_]+)\.v(?P<version>[1-9][0-9]*)\.avsc$")


class SchemaNotFoundError(LookupError):
    """No such schema name or version in ``schemas/avro``."""


# --------------------------------------------------------------------------------------- loading


def _scan(directory: Path) -> tuple[dict[str, dict[int, Path]], list[str]]:
    found: dict[str, dict[int, Path]] = {}
    bad: list[str] = []
    for path in sorted(directory.glob("*.avsc")):
        m = _FILE_RE.match(path.name)
        if m is None:
            bad.append(f"{path.name}: file name is not <name>.v<N>.avsc")
            continue
        found.setdefault(m["name"], {})[int(m["version"])] = path
    return found, bad


@functools.cache
def _index() -> dict[str, dict[int, Path]]:
    return _scan(SCHEMA_DIR)[0]


def list_schemas() -> dict[str, list[int]]:
    """Schema name -> sorted versions present in ``schemas/avro``."""
    return {name: sorted(versions) for name, versions in sorted(_index().items())}


def schema_keys() -> list[str]:
    """All schemas as ``<name>.v<N>`` keys, e.g. ``["change_event.v1", "dead_letter.v1"]``."""
    return [f"{name}.v{v}" for name, versions in list_schemas().items() for v in versions]


def _split(name: str, version: int | None) -> tuple[str, int | None]:
    m = re.fullmatch(r"(?P<name>[A-Za-z0-9_]+)\.v(?P<version>[0-9]+)", name)
    if m is not None:
        v = int(m["version"])
        if version is not None and version != v:
            raise SchemaNotFoundError(f"conflicting versions for {name!r}: {version}")
        return m["name"], v
    return name, version


def latest_version(name: str) -> int:
    versions = _index().get(name)
    if not versions:
        raise SchemaNotFoundError(f"no schema {name!r} in {SCHEMA_DIR} (have: {', '.join(_index()) or '-'})")
    return max(versions)


def _path(name: str, version: int | None) -> tuple[str, int, Path]:
    name, version = _split(name, version)
    if version is None:
        version = latest_version(name)
    try:
        return name, version, _index()[name][version]
    except KeyError:
        raise SchemaNotFoundError(f"no schema {name}.v{version} in {SCHEMA_DIR}") from None


@functools.cache
def _raw(name: str, version: int) -> dict[str, Any]:
    _, _, path = _path(name, version)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name}: top-level schema must be a JSON object")
    return data


def schema_dict(name: str, version: int | None = None) -> dict[str, Any]:
    """The schema as written in the ``.avsc`` file (a deep copy, safe to modify)."""
    name, version, _ = _path(name, version)
    return copy.deepcopy(_raw(name, version))


@functools.cache
def _parsed(name: str, version: int) -> dict[str, Any]:
    parsed = fastavro.parse_schema(_raw(name, version))
    assert isinstance(parsed, dict)
    return parsed


def load_schema(name: str, version: int | None = None) -> dict[str, Any]:
    """The fastavro-parsed schema ``name`` (``"change_event"`` or ``"change_event.v1"``).

    ``version=None`` gives the latest version. The result is cached and shared: do not modify it.
    """
    name, version, _ = _path(name, version)
    return _parsed(name, version)


# ------------------------------------------------------------------------- evolution checking

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
# writer type -> reader types that can read it (Avro specification, "Schema Resolution")
_PROMOTIONS = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_NAMED = frozenset({"record", "error", "enum", "fixed"})
_MODES = {"backward": (True,), "forward": (False,), "full": (True, False)}


def _parse_for_check(schema: Any) -> tuple[Any, dict[str, Any]]:
    """Fully qualify names (and validate) with fastavro; return the schema and its named types."""
    if isinstance(schema, dict):
        schema = {k: v for k, v in schema.items() if k not in ("__fastavro_parsed", "__named_schemas")}
    names: dict[str, Any] = {}
    parsed = fastavro.parse_schema(copy.deepcopy(schema), named_schemas=names)
    return parsed, names


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class _Checker:
    """Avro schema resolution (reader vs writer), reporting in old/new terms."""

    def __init__(self, old_names: dict[str, Any], new_names: dict[str, Any]) -> None:
        self.old_names = old_names
        self.new_names = new_names
        # message -> set of broken directions ("BACKWARD": new readers/old data, "FORWARD": the reverse)
        self.issues: dict[str, set[str]] = {}
        self._seen: set[tuple[str, str, bool]] = set()

    # helpers ------------------------------------------------------------------------------
    def _deref(self, schema: Any, is_old: bool) -> Any:
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            names = self.old_names if is_old else self.new_names
            if schema not in names:
                raise ValueError(f"unknown named type {schema!r}")
            return names[schema]
        if isinstance(schema, dict) and not isinstance(schema.get("type"), str):
            return self._deref(schema["type"], is_old)
        return schema

    @staticmethod
    def _kind(schema: Any) -> str:
        if isinstance(schema, str):
            return schema
        if isinstance(schema, list):
            return "union"
        kind = schema["type"]
        return "record" if kind == "error" else kind

    def _fmt(self, schema: Any, is_old: bool) -> str:
        schema = self._deref(schema, is_old)
        kind = self._kind(schema)
        if kind == "union":
            return "[" + ", ".join(self._fmt(b, is_old) for b in schema) + "]"
        if kind in _NAMED or kind == "record":
            return f"{kind} {_short(schema['name'])}"
        if kind == "array":
            return f"array<{self._fmt(schema['items'], is_old)}>"
        if kind == "map":
            return f"map<{self._fmt(schema['values'], is_old)}>"
        if isinstance(schema, dict) and schema.get("logicalType"):
            return f"{kind}({schema['logicalType']})"
        return kind

    def _add(self, message: str, reader_is_new: bool) -> None:
        self.issues.setdefault(message, set()).add("BACKWARD" if reader_is_new else "FORWARD")

    def _matches(self, reader: Any, writer: Any, reader_is_new: bool, *, exact: bool) -> bool:
        """Whether a union branch ``reader`` is the resolution target for writer branch ``writer``."""
        r = self._deref(reader, not reader_is_new)
        w = self._deref(writer, reader_is_new)
        rk, wk = self._kind(r), self._kind(w)
        if rk in _NAMED or rk == "record":
            if rk != wk:
                return False
            aliases = {_short(a) for a in r.get("aliases", ())}
            return _short(r["name"]) == _short(w["name"]) or _short(w["name"]) in aliases
        if rk == wk:
            return True
        return not exact and rk in _PROMOTIONS.get(wk, ())

    # resolution ---------------------------------------------------------------------------
    def check(self, reader: Any, writer: Any, path: str, reader_is_new: bool) -> None:
        r_old, w_old = (not reader_is_new), reader_is_new
        r = self._deref(reader, r_old)
        w = self._deref(writer, w_old)
        rk, wk = self._kind(r), self._kind(w)
        old, new = (w, r) if reader_is_new else (r, w)

        if wk == "union":
            for branch in w:
                target = (
                    self._union_target(r, branch, reader_is_new)
                    if rk == "union"
                    else (r if self._matches(r, branch, reader_is_new, exact=False) else None)
                )
                if target is None:
                    if rk == "union":
                        label = self._fmt(branch, w_old)
                        what = "removed" if reader_is_new else "added"
                        self._add(f"{path}: union branch {label} {what}", reader_is_new)
                    else:
                        self._add(
                            f"{path}: type changed from {self._fmt(old, True)} to {self._fmt(new, False)}",
                            reader_is_new,
                        )
                    continue
                self.check(target, branch, path, reader_is_new)
            return
        if rk == "union":
            target = self._union_target(r, w, reader_is_new)
            if target is None:
                self._add(
                    f"{path}: type changed from {self._fmt(old, True)} to {self._fmt(new, False)}",
                    reader_is_new,
                )
            else:
                self.check(target, w, path, reader_is_new)
            return

        if rk != wk and rk not in _PROMOTIONS.get(wk, ()):
            self._add(f"{path}: type changed from {self._fmt(old, True)} to {self._fmt(new, False)}", reader_is_new)
            return
        if rk != wk:  # legal one-way promotion; the other direction fails on its own pass
            return
        r_logical = r.get("logicalType") if isinstance(r, dict) else None
        w_logical = w.get("logicalType") if isinstance(w, dict) else None
        if r_logical != w_logical:
            self._add(
                f"{path}: logical type changed from {self._fmt(old, True)} to {self._fmt(new, False)}",
                reader_is_new,
            )
        if rk in ("record", "enum", "fixed"):
            key = (r["name"], w["name"], reader_is_new)
            if key in self._seen:
                return
            self._seen.add(key)
            aliases = {_short(a) for a in r.get("aliases", ())}
            if _short(r["name"]) != _short(w["name"]) and _short(w["name"]) not in aliases:
                self._add(f"{path}: {rk} renamed from {_short(old['name'])} to {_short(new['name'])}", reader_is_new)
                return
            getattr(self, f"_check_{rk}")(r, w, path, reader_is_new)
        elif rk == "array":
            self.check(r["items"], w["items"], f"{path}[]", reader_is_new)
        elif rk == "map":
            self.check(r["values"], w["values"], f"{path}{{}}", reader_is_new)

    def _union_target(self, reader_union: list[Any], writer_branch: Any, reader_is_new: bool) -> Any:
        for exact in (True, False):
            for branch in reader_union:
                if self._matches(branch, writer_branch, reader_is_new, exact=exact):
                    return branch
        return None

    def _check_record(self, r: dict[str, Any], w: dict[str, Any], path: str, reader_is_new: bool) -> None:
        w_fields = {f["name"]: f for f in w.get("fields", ())}
        for field in r.get("fields", ()):
            candidates = [field["name"], *field.get("aliases", ())]
            wf = next((w_fields[n] for n in candidates if n in w_fields), None)
            fpath = f"{path}.{field['name']}"
            if wf is None:
                if "default" not in field:
                    what = "added" if reader_is_new else "removed"
                    self._add(f"{fpath}: field {what} without a default", reader_is_new)
                continue
            self.check(field["type"], wf["type"], fpath, reader_is_new)

    def _check_enum(self, r: dict[str, Any], w: dict[str, Any], path: str, reader_is_new: bool) -> None:
        missing = [s for s in w.get("symbols", ()) if s not in set(r.get("symbols", ()))]
        if missing and "default" not in r:
            what = "removed" if reader_is_new else "added"
            self._add(f"{path}: enum {_short(r['name'])} symbols {what}: {', '.join(missing)}", reader_is_new)

    def _check_fixed(self, r: dict[str, Any], w: dict[str, Any], path: str, reader_is_new: bool) -> None:
        if r.get("size") != w.get("size"):
            old, new = (w, r) if reader_is_new else (r, w)
            self._add(
                f"{path}: fixed {_short(r['name'])} size changed from {old.get('size')} to {new.get('size')}",
                reader_is_new,
            )


def check_evolution(old_schema: Any, new_schema: Any, mode: str = "full") -> list[str]:
    """Incompatibilities between two versions of a schema, as human-readable lines.

    ``mode``: ``"backward"`` (consumers on ``new`` read data written with ``old``), ``"forward"``
    (consumers on ``old`` read data written with ``new``) or ``"full"`` (both; the default). Each line
    names the path, the problem and the broken direction(s), e.g.
    ``"ChangeEvent.source.xid: field added without a default [breaks BACKWARD]"``.

    Reported: fields added or removed without a default, type changes that are not Avro promotions
    (int->long->float->double, string<->bytes; note a promotion is one-way, so under FULL it still
    breaks FORWARD), enum symbols removed (or added, for old readers without an enum default), union
    branches removed (or added), renamed named types, changed fixed sizes and changed logical types.
    Schemas may be raw JSON dicts or fastavro-parsed ones. An empty list means compatible.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, not {mode!r}")
    old, old_names = _parse_for_check(old_schema)
    new, new_names = _parse_for_check(new_schema)
    checker = _Checker(old_names, new_names)
    root = _short(old["name"]) if isinstance(old, dict) and "name" in old else "<root>"
    for reader_is_new in _MODES[mode]:
        reader, writer = (new, old) if reader_is_new else (old, new)
        checker.check(reader, writer, root, reader_is_new)
    order = ("BACKWARD", "FORWARD")
    return [f"{msg} [breaks {'+'.join(d for d in order if d in dirs)}]" for msg, dirs in checker.issues.items()]


def _check_pairs(index: dict[str, dict[int, Path]], mode: str) -> Iterable[str]:
    for name, versions in sorted(index.items()):
        loaded: dict[int, Any] = {}
        for version, path in sorted(versions.items()):
            try:
                loaded[version] = json.loads(path.read_text(encoding="utf-8"))
                fastavro.parse_schema(copy.deepcopy(loaded[version]))
            except Exception as exc:  # noqa: BLE001 - report every broken file, keep checking the others
                yield f"{path.name}: cannot be parsed: {exc}"
        ordered = sorted(loaded)
        if ordered and ordered != list(range(ordered[0], ordered[0] + len(ordered))):
            yield f"{name}: versions are not consecutive: {ordered}"
        for a, b in itertools.pairwise(ordered):
            for problem in check_evolution(loaded[a], loaded[b], mode):
                yield f"{name}.v{a} -> {name}.v{b}: {problem}"


def check_all(directory: Path | None = None, mode: str = "full") -> list[str]:
    """Check every consecutive version pair of every schema in ``directory`` (default: ``SCHEMA_DIR``).

    Also reports files that are misnamed or do not parse. An empty list means all is well.
    """
    index, bad = _scan(directory or SCHEMA_DIR)
    return [*bad, *_check_pairs(index, mode)]
