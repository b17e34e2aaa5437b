"""The topology model and its YAML loader, with errors that name the offending key and line."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from archsync.errors import ArchsyncError

if TYPE_CHECKING:
    from topology.audit_config import AuditConfig
    from topology.flows import Aggregate, Flow, Ownership
    from topology.operations import Operations

IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
QUALIFIED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_$]*$")


class TopologyError(ArchsyncError):
    """The topology file is malformed; the message names the key path and line."""


@dataclass(frozen=True)
class TopicDefaults:
    """How archsync names and sizes the topics it owns."""

    prefix: str = "archsync"
    partitions: int = 3
    replication_factor: int = 1
    config: Mapping[str, str] = field(default_factory=dict)

    def change_topic(self, system: str, schema: str, table: str) -> str:
        """``<prefix>.<system>.<schema>.<table>``: the topic of one captured table."""
        return f"{self.prefix}.{system}.{schema}.{table}"

    def dead_letter_topic(self, stage: str) -> str:
        """The dead-letter topic of a pipeline stage (``capture``, ``transform``…)."""
        return f"{self.prefix}.dlq.{stage}"

    def heartbeat_topic(self) -> str:
        """The topic that receives capture heartbeats (one small record per interval)."""
        return f"{self.prefix}.heartbeat"


@dataclass(frozen=True)
class Source:
    """A captured PostgreSQL database: its slot, publication and tables."""

    name: str
    dsn_env: str
    slot: str
    publication: str
    tables: tuple[str, ...]
    heartbeat_seconds: float = 10.0
    snapshot: str = "initial"  # initial | never
    snapshot_chunk_rows: int = 5000
    max_message_bytes: int = 1_000_000

    def dsn(self, settings: Any) -> str:
        """This source's DSN: its ``dsn_env`` variable, else the settings' default for oa/archive."""
        value = os.environ.get(self.dsn_env)
        if value:
            return value
        try:
            return str(settings.dsn_for(self.name))
        except ArchsyncError:
            raise TopologyError(f"{self.dsn_env}: not set (the DSN of source {self.name!r})") from None

    @property
    def lock_id(self) -> int:
        """The advisory-lock key that elects the active capture process of this source."""
        # a digest of the whole slot name: the first 8 bytes alone were "archsync" for every slot,
        # so all captures of a database cluster shared one lock (one streamed, the others stood by)
        digest = hashlib.blake2b(f"archsync:{self.slot}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)


@dataclass(frozen=True)
class Topology:
    """Everything archsync needs to know about what flows where."""

    name: str
    topics: TopicDefaults
    sources: Mapping[str, Source]
    appliers: tuple[str, ...]
    path: str = "<memory>"
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)
    aggregates: Mapping[str, Aggregate] = field(default_factory=dict)
    ownership: Mapping[str, Ownership] = field(default_factory=dict)  # "<system>.<schema>.<table>" → owners
    flows: tuple[Flow, ...] = ()
    audit: AuditConfig | None = None  # the audit log's settings (topology/audit_config.py)
    operations: Operations | None = None  # notifications, scans, reconcile schedule (topology/operations.py)

    def source(self, name: str) -> Source:
        """A source by name, or a TopologyError listing the known ones."""
        try:
            return self.sources[name]
        except KeyError:
            raise TopologyError(
                f"{self.path}: unknown source {name!r} (known: {', '.join(sorted(self.sources))})"
            ) from None


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path of a YAML document to its 1-based line."""
    index: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                kpath = (*path, str(key.value))
                index[kpath] = key.start_mark.line + 1
                walk(value, kpath)
                index[kpath] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return index


class _Reader:
    """Typed access to the parsed YAML with errors carrying the key path and line."""

    def __init__(self, path: str, lines: dict[tuple[str | int, ...], int]) -> None:
        self.path = path
        self.lines = lines

    def fail(self, keys: tuple[str | int, ...], problem: str) -> TopologyError:
        line = None
        probe = keys
        while probe and line is None:
            line = self.lines.get(probe)
            probe = probe[:-1]
        where = ".".join(str(k) for k in keys) or "<top>"
        at = f":{line}" if line else ""
        return TopologyError(f"{self.path}{at}: {where}: {problem}")

    def get(
        self,
        data: Mapping[str, Any],
        keys: tuple[str | int, ...],
        key: str,
        kind: type | tuple[type, ...],
        default: Any = ...,
        allowed: set[str] | None = None,
    ) -> Any:
        if key not in data:
            if default is ...:
                raise self.fail(keys, f"missing required key {key!r}")
            return default
        value = data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.fail((*keys, key), f"expected {names}, got {type(value).__name__} {value!r}")
        if allowed is not None and value not in allowed:
            raise self.fail((*keys, key), f"must be one of {sorted(allowed)}, got {value!r}")
        return value

    def mapping(self, value: Any, keys: tuple[str | int, ...], known: set[str]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(keys, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(set(map(str, value)) - known)
        if unknown:
            raise self.fail((*keys, unknown[0]), f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
        return value


def _parse_source(r: _Reader, name: str, data: Any) -> Source:
    keys: tuple[str | int, ...] = ("sources", name)
    if not IDENT.match(name):
        raise r.fail(keys, "a source name is lower-case letters, digits and _")
    known = {
        "dsn_env",
        "slot",
        "publication",
        "tables",
        "heartbeat_seconds",
        "snapshot",
        "snapshot_chunk_rows",
        "max_message_bytes",
    }
    m = r.mapping(data, keys, known)
    tables = r.get(m, keys, "tables", list)
    if not tables:
        raise r.fail((*keys, "tables"), "a source needs at least one table")
    for i, table in enumerate(tables):
        if not isinstance(table, str) or not QUALIFIED.match(table):
            raise r.fail((*keys, "tables", i), f"expected schema.table, got {table!r}")
    if len(set(tables)) != len(tables):
        raise r.fail((*keys, "tables"), "a table is listed twice")
    slot = r.get(m, keys, "slot", str, f"archsync_{name}")
    publication = r.get(m, keys, "publication", str, f"archsync_{name}")
    for key, value in (("slot", slot), ("publication", publication)):
        if not IDENT.match(value) or len(value) > 63:
            raise r.fail((*keys, key), f"{value!r} is not a valid slot/publication name (a-z, 0-9, _)")
    heartbeat = r.get(m, keys, "heartbeat_seconds", float, 10.0)
    if heartbeat <= 0:
        raise r.fail((*keys, "heartbeat_seconds"), "must be > 0")
    chunk = r.get(m, keys, "snapshot_chunk_rows", int, 5000)
    if chunk <= 0:
        raise r.fail((*keys, "snapshot_chunk_rows"), "must be > 0")
    return Source(
        name=name,
        dsn_env=r.get(m, keys, "dsn_env", str, f"ARCHSYNC_{name.upper()}_DSN"),
        slot=slot,
        publication=publication,
        tables=tuple(tables),
        heartbeat_seconds=heartbeat,
        snapshot=r.get(m, keys, "snapshot", str, "initial", allowed={"initial", "never"}),
        snapshot_chunk_rows=chunk,
        max_message_bytes=r.get(m, keys, "max_message_bytes", int, 1_000_000),
    )


def parse_topology(text: str, path: str = "<memory>") -> Topology:
    """Parse and validate topology YAML text."""
    try:
        data = yaml.safe_load(text)
        lines = _line_index(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise TopologyError(f"{path}{at}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    r = _Reader(path, lines)
    top = r.mapping(
        data,
        (),
        {
            "version",
            "name",
            "topics",
            "sources",
            "appliers",
            "aggregates",
            "mappings",
            "rules",
            "flows",
            "ownership",
            "audit",
            "notifications",
            "reconcile",
        },
    )
    version = r.get(top, (), "version", int)
    if version != 1:
        raise r.fail(("version",), f"unsupported topology version {version} (this archsync reads version 1)")
    t = r.mapping(top.get("topics", {}), ("topics",), {"prefix", "partitions", "replication_factor", "config"})
    topics = TopicDefaults(
        prefix=r.get(t, ("topics",), "prefix", str, "archsync"),
        partitions=r.get(t, ("topics",), "partitions", int, 3),
        replication_factor=r.get(t, ("topics",), "replication_factor", int, 1),
        config={str(k): str(v) for k, v in r.get(t, ("topics",), "config", dict, {}).items()},
    )
    if "compact" in topics.config.get("cleanup.policy", "delete"):
        # the worker commits contiguous offsets (processors/worker_consumer.py): a compacted input
        # topic has holes in its offsets, read as records gone missing
        raise r.fail(
            ("topics", "config", "cleanup.policy"),
            "the pipeline's topics cannot be compacted (the worker reads every offset); use retention",
        )
    sources_raw = r.get(top, (), "sources", dict)
    if not sources_raw:
        raise r.fail(("sources",), "at least one source is needed")
    sources = {str(name): _parse_source(r, str(name), body) for name, body in sources_raw.items()}
    slots = [s.slot for s in sources.values()]
    if len(set(slots)) != len(slots):
        raise r.fail(("sources",), "two sources share a replication slot name")
    appliers = r.get(top, (), "appliers", list, [f"archsync_apply_{n}" for n in sources])
    for i, applier in enumerate(appliers):
        if not isinstance(applier, str) or not IDENT.match(applier):
            raise r.fail(("appliers", i), f"expected a replication origin name, got {applier!r}")
    from topology.flows import parse_flow_sections  # flows imports this module

    aggregates, ownership, flows = parse_flow_sections(r, top, sources)
    from topology.audit_config import parse_audit

    audit = parse_audit(r, top)
    from topology.operations import parse_operations

    operations = parse_operations(r, top, sources)
    return Topology(
        name=r.get(top, (), "name", str, Path(path).stem),
        topics=topics,
        sources=sources,
        appliers=tuple(appliers),
        path=path,
        raw=top,
        aggregates=aggregates,
        ownership=ownership,
        flows=flows,
        audit=audit,
        operations=operations,
    )


def load_topology(path: str | Path | None = None) -> Topology:
    """Load a topology file; the packaged reference topology when ``path`` is None."""
    if path is None:
        text = resources.files("topology").joinpath("reference.yaml").read_text(encoding="utf-8")
        return parse_topology(text, "topology/reference.yaml")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise TopologyError(f"{p}: cannot read topology file: {exc.strerror}") from None
    return parse_topology(text, str(p))
