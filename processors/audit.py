"""The audit log's pure core: facts, deterministic ids, the per-aggregate hash chain, verification.

An *audit fact* is an audit event without its chain fields: what an agent (or the CLI) saw, as
a JSON-able dict with the fields of ``schemas/avro/audit_event.v1.avsc``. The audit agent
(processors/audit_agent.py) turns facts into *records* by chaining them per aggregate:

    seq       = previous seq + 1 (1 for the first event of an aggregate)
    prev_hash = hash of the previous record ("" for the first)
    hash      = sha256(canonical_bytes(record))   or HMAC-SHA256 with the audit key

``canonical_bytes`` is the compact JSON array of every field but ``hash``, in the schema's order
(:data:`CANON_FIELDS`): a later schema version adds its fields to a new canonical form, old
records keep hashing the same.

Idempotency: an audit id is derived from what is audited (``audit_id(kind, *parts)``), never from
a clock, and every builder here is deterministic, so a fact re-emitted after a redelivery is the
same fact. :func:`append` keeps the ids of the chain's last :data:`REPLAY_WINDOW` events with
their seq and prev_hash: a fact seen again yields the identical record (same key, same bytes:
compaction collapses it) and leaves the chain untouched. A fact arriving again with the same id
but other content is chained as a distinct event with id ``<id>~<digest>`` (never two different
records under one key, which compaction would silently reduce to one).

:class:`ChainVerifier` checks records in log order and names each break's topic, partition,
offset and aggregate.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from processors.model import ApplyCommand, Change, Conflict, json_default
from schemas.audit_codec import AuditCodec

#: the environment variable holding the secret that keys the chain hashes (HMAC-SHA256)
ENV_AUDIT_KEY = "ARCHSYNC_AUDIT_KEY"
REPLAY_WINDOW = 64

KINDS = (
    "change_captured",
    "rule_fired",
    "command_applied",
    "own_origin_skipped",
    "conflict",
    "dead_letter",
    "admin_action",
    "fixity_violation",
    "fixity_run",
)

#: the fields of a record covered by its hash, in canonical order (audit_event.v1: all but ``hash``)
CANON_FIELDS = (
    "audit_id",
    "kind",
    "aggregate",
    "seq",
    "prev_hash",
    "hash_alg",
    "ts_ms",
    "system",
    "actor",
    "source_event_id",
    "command_id",
    "table",
    "op",
    "row_key",
    "changed",
    "values",
    "before_digest",
    "after_digest",
    "source_lsn",
    "source_order",
    "flow",
    "outcome",
    "reason",
    "links",
    "detail",
)
CHAIN_FIELDS = ("seq", "prev_hash", "hash", "hash_alg")
FACT_FIELDS = tuple(f for f in CANON_FIELDS if f not in CHAIN_FIELDS)
_LIST_FIELDS = ("changed", "links")
_REQUIRED = ("audit_id", "kind", "aggregate", "ts_ms")
_FIELD_SET = frozenset(FACT_FIELDS)
_OPTIONAL_FIELDS = _FIELD_SET - frozenset(_REQUIRED)
_KIND_SET = frozenset(KINDS)
_EMPTY_FACT = {f: None for f in FACT_FIELDS}


class AuditError(ValueError):
    """A fact is malformed (missing required field, unknown field or kind)."""


# ------------------------------------------------------------------------------ encodings


def canonical_json(value: Any) -> str:
    """Compact JSON with sorted keys; exact decimals as strings (processors.model.json_default)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS, default=json_default).decode()


def digest(value: Any) -> str:
    """sha256 hex of the canonical JSON of ``value``."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def audit_id(kind: str, *parts: Any) -> str:
    """Deterministic id of an audited event: ``<kind>:<24 hex>`` of the canonical parts."""
    return f"{kind}:{hashlib.sha256(canonical_json([kind, *parts]).encode()).hexdigest()[:24]}"


_CODEC: AuditCodec | None = None
_HASH_TAIL = 66  # the hash field at the end of a record: varint length 64 (0x80 0x01) + 64 hex digits
_HASH_MARK = b"\x80\x01"


def codec() -> AuditCodec:
    global _CODEC
    if _CODEC is None:
        _CODEC = AuditCodec()
    return _CODEC


def canonical_bytes(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash covers: the Avro binary encoding (audit_event.v1) of every field
    but ``hash``, which is the schema's last field, so these are the stored bytes but the last 66."""
    return codec().encode({**record, "hash": "0" * 64})[:-_HASH_TAIL]


def audit_key() -> bytes | None:
    """The HMAC key from ``ARCHSYNC_AUDIT_KEY`` (None: plain sha256 chains)."""
    value = os.environ.get(ENV_AUDIT_KEY)
    return value.encode() if value else None


def _digest(data: bytes, alg: str | None, key: bytes | None) -> str:
    if alg == "hmac-sha256":
        if key is None:
            raise AuditError("an hmac-sha256 record needs the audit key to be hashed")
        return hmac.new(key, data, hashlib.sha256).hexdigest()
    return hashlib.sha256(data).hexdigest()


def compute_hash(record: Mapping[str, Any], key: bytes | None = None) -> str:
    return _digest(canonical_bytes(record), record.get("hash_alg"), key)


def encode_record(record: Mapping[str, Any]) -> bytes:
    return codec().encode(dict(record))


def decode_record(data: bytes) -> dict[str, Any]:
    return codec().decode(data)


def _read_long(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos]
    pos += 1
    n = b & 0x7F
    shift = 7
    while b & 0x80:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos


def _read_str(buf: bytes, pos: int) -> tuple[str, int]:
    n, pos = _read_long(buf, pos)
    end = pos + n
    if n < 0 or end > len(buf):
        raise AuditError("truncated string")
    return buf[pos:end].decode(), end


def head_fields(data: bytes) -> tuple[str, str, int, str, str, str]:
    """(audit_id, aggregate, seq, prev_hash, hash_alg, hash) of an encoded record, fast."""
    try:
        pos = 0
        out: list[Any] = []
        for i in range(6):  # audit_id, kind, aggregate, seq (long), prev_hash, hash_alg
            n = data[pos]
            if n < 0x80:
                pos += 1
                n = (n >> 1) ^ -(n & 1)
            else:
                n, pos = _read_long(data, pos)
            if i == 3:
                out.append(n)
                continue
            end = pos + n
            if n < 0 or end > len(data):
                raise AuditError("truncated string")
            out.append(data[pos:end].decode())
            pos = end
    except (IndexError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot decode the record's head: {exc}") from None
    if len(data) < pos + _HASH_TAIL or data[-_HASH_TAIL:-64] != _HASH_MARK:
        raise AuditError("the record does not end with a 64-digit hash")
    return out[0], out[2], out[3], out[4], out[5], data[-64:].decode("ascii", "replace")


def head(data: bytes) -> dict[str, Any]:
    """The chain fields of an encoded record without decoding the rest (audit_event.v1 order):
    audit_id, kind, aggregate, seq, prev_hash, hash_alg and hash."""
    try:
        ident, pos = _read_str(data, 0)
        kind, pos = _read_str(data, pos)
        aggregate, pos = _read_str(data, pos)
        seq, pos = _read_long(data, pos)
        prev, pos = _read_str(data, pos)
        alg, pos = _read_str(data, pos)
    except (IndexError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot decode the record's head: {exc}") from None
    if len(data) < pos + _HASH_TAIL or data[-_HASH_TAIL:-64] != _HASH_MARK:
        raise AuditError("the record does not end with a 64-digit hash")
    return {
        "audit_id": ident,
        "kind": kind,
        "aggregate": aggregate,
        "seq": seq,
        "prev_hash": prev,
        "hash_alg": alg,
        "hash": data[-64:].decode("ascii", "replace"),
    }


# ------------------------------------------------------------------------------ facts


def fact(kind: str, aggregate: str, ts_ms: int | None, ident: str, **fields: Any) -> dict[str, Any]:
    """A complete fact: every field of :data:`FACT_FIELDS` present (None / [] when not given)."""
    if kind not in _KIND_SET:
        raise AuditError(f"unknown audit kind {kind!r} (known: {', '.join(KINDS)})")
    unknown = fields.keys() - _FIELD_SET
    if unknown:
        raise AuditError(f"unknown audit field(s) {sorted(unknown)}")
    out: dict[str, Any] = dict(_EMPTY_FACT)  # the list fields are set below
    out.update(fields)
    out.update(audit_id=ident, kind=kind, aggregate=aggregate, ts_ms=int(ts_ms or 0))
    for f in _LIST_FIELDS:
        out[f] = [str(v) for v in (out[f] or [])]
    return out


def check_fact(data: Any) -> dict[str, Any]:
    """A fact read from Kafka, validated (raises AuditError with the reason)."""
    if not isinstance(data, dict):
        raise AuditError(f"a fact is a JSON object, got {type(data).__name__}")
    for name in _REQUIRED:
        if data.get(name) in (None, ""):
            raise AuditError(f"fact without {name!r}")
    ident = data.get("audit_id")
    return fact(
        str(data["kind"]),
        str(data["aggregate"]),
        int(data["ts_ms"]),
        str(ident),
        **{k: v for k, v in data.items() if k in _OPTIONAL_FIELDS},
    )


def fact_digest(f: Mapping[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps([f.get(k) for k in FACT_FIELDS])).hexdigest()[:16]


def _key_json(key: Mapping[str, Any] | None) -> str | None:
    return None if key is None else canonical_json(dict(key))


def changed_columns(previous: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> list[str]:
    """Columns whose value differs between two row images (all columns of a new row)."""
    if after is None:
        return []
    if previous is None:
        return sorted(after)
    return sorted(c for c in after if c not in previous or previous[c] != after[c])


def change_fact(
    aggregate: str, change: Change, previous: Mapping[str, Any] | None, after: Mapping[str, Any] | None
) -> dict[str, Any]:
    """A captured change: keys, changed columns with their new values, digests, source position.

    ``previous`` is the row as known before the change (None when new or unknown), ``after`` the
    full row after it (None for a delete): the values of the changed columns are kept so a row's
    state at any time can be rebuilt from the log (:func:`state_at`).
    """
    if change.op == "d":
        after = None
    before_image = previous if previous is not None else change.before
    changed = changed_columns(previous, after)
    return fact(
        "change_captured",
        aggregate,
        change.commit_ts_ms,
        audit_id("change_captured", change.event_id),
        system=change.system,
        actor=change.origin,
        source_event_id=change.event_id,
        table=change.table,
        op=change.op,
        row_key=_key_json(change.key),
        changed=changed,
        # an insert or a snapshot/replayed row (op c/r) carries the whole row: it is a row's full
        # image wherever it comes in (an echo replayed after a restart is op r, and may change nothing)
        values=(
            None
            if after is None
            else canonical_json(dict(after) if change.op in ("c", "r") else {c: after[c] for c in changed})
        ),
        before_digest=digest(before_image) if before_image is not None else None,
        after_digest=digest(after) if after is not None else None,
        source_lsn=change.commit_lsn,
        source_order=change.order,
        detail=canonical_json({"snapshot": True}) if change.snapshot else None,
    )


def rule_fact(aggregate: str, change: Change, flow: str, commands: list[ApplyCommand]) -> dict[str, Any]:
    """A flow of the topology fired on a change and issued commands."""
    targets = sorted({c.aggregate_key for c in commands})
    return fact(
        "rule_fired",
        aggregate,
        change.commit_ts_ms,
        audit_id("rule_fired", change.event_id, flow),
        system=change.system,
        source_event_id=change.event_id,
        table=change.table,
        op=change.op,
        source_lsn=change.commit_lsn,
        source_order=change.order,
        flow=flow,
        links=targets,
        detail=canonical_json(
            {"commands": [[c.command_id, c.target_system, c.table, c.action] for c in commands]},
        ),
    )


def conflict_fact(aggregate: str, conflict: Conflict, stage: str, command_id: str | None = None) -> dict[str, Any]:
    """A refused or overridden write with both versions and the decision."""
    return fact(
        "conflict",
        aggregate,
        conflict.ts_ms,
        audit_id("conflict", stage, conflict.source_event_id, conflict.table, conflict.match, conflict.column),
        system=stage,
        source_event_id=conflict.source_event_id,
        command_id=command_id,
        table=conflict.table,
        row_key=canonical_json(conflict.match),
        changed=[conflict.column],
        flow=conflict.flow,
        outcome=conflict.decision,
        reason=conflict.reason,
        detail=canonical_json({"incoming": conflict.incoming, "current": conflict.current}),
    )


def dead_letter_fact(
    aggregate: str, stage: str, reason: str, ts_ms: int, *, origin: str, **fields: Any
) -> dict[str, Any]:
    """A record parked on a dead-letter topic; ``origin`` names it (event id, command id, offset)."""
    return fact("dead_letter", aggregate, ts_ms, audit_id("dead_letter", stage, origin, reason), reason=reason,
                system=fields.pop("system", stage), **fields)  # fmt: skip


def command_fact(cmd: ApplyCommand, outcome: str, ts_ms: int, reason: str | None = None) -> dict[str, Any]:
    """An apply command and its outcome (applied, skipped_replay, skipped_older, failed)."""
    return fact(
        "command_applied",
        cmd.aggregate_key,
        ts_ms,
        audit_id("command_applied", cmd.command_id, outcome),
        system=cmd.target_system,
        actor=f"applier:{cmd.target_system}",
        source_event_id=cmd.source_event_id,
        command_id=cmd.command_id,
        table=cmd.table,
        op=cmd.action,
        row_key=canonical_json(cmd.match),
        values=canonical_json(cmd.values),
        source_lsn=cmd.source_commit_lsn,
        source_order=cmd.source_order,
        flow=cmd.flow,
        outcome=outcome,
        reason=reason,
        detail=canonical_json({"source_commit_ts_ms": cmd.source_commit_ts_ms}),
    )


def own_origin_fact(system: str, origin: str, commit_lsn: int, ts_ms: int, rows: int) -> dict[str, Any]:
    """A source transaction written by archsync's own applier, skipped by the capture (no loop)."""
    return fact(
        "own_origin_skipped",
        f"capture:{system}",
        ts_ms,
        audit_id("own_origin_skipped", system, commit_lsn),
        system=system,
        actor=origin,
        source_lsn=commit_lsn,
        outcome="skipped",
        detail=canonical_json({"rows": rows}),
    )


def admin_fact(action: str, actor: str, ts_ms: int, nonce: str, **detail: Any) -> dict[str, Any]:
    """An administrative action (topology applied, slot dropped, DLQ replayed, audit accessed)."""
    return fact(
        "admin_action",
        "admin",
        ts_ms,
        audit_id("admin_action", action, nonce),
        system="cli",
        actor=actor,
        outcome=action,
        detail=canonical_json(detail),
    )


# ------------------------------------------------------------------------------ chaining


def chain(f: Mapping[str, Any], seq: int, prev_hash: str, key: bytes | None = None) -> dict[str, Any]:
    """The record of a fact at position ``seq`` after ``prev_hash``."""
    record: dict[str, Any] = {name: f.get(name) for name in FACT_FIELDS}
    record.update(seq=seq, prev_hash=prev_hash, hash_alg="hmac-sha256" if key else "sha256")
    record["hash"] = compute_hash(record, key)
    return record


def chain_encoded(
    f: Mapping[str, Any], seq: int, prev_hash: str, key: bytes | None = None
) -> tuple[dict[str, Any], bytes]:
    """:func:`chain` and the record's Avro bytes, with one encoding."""
    record: dict[str, Any] = {name: f.get(name) for name in FACT_FIELDS}
    record.update(seq=seq, prev_hash=prev_hash, hash_alg="hmac-sha256" if key else "sha256", hash="0" * 64)
    body = codec().encode(record)[:-_HASH_TAIL]
    record["hash"] = _digest(body, record["hash_alg"], key)
    return record, body + _HASH_MARK + record["hash"].encode()


@dataclass
class ChainState:
    """What the audit agent keeps per aggregate (JSON-able: a changelogged Faust table value)."""

    seq: int = 0
    hash: str = ""
    recent: dict[str, list[Any]] = field(default_factory=dict)  # audit_id → [seq, prev_hash, fact digest]

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "recent": self.recent}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ChainState:
        if not data:
            return cls()
        return cls(int(data["seq"]), str(data["hash"]), dict(data.get("recent") or {}))


def append_encoded(
    state: ChainState, f: Mapping[str, Any], key: bytes | None = None, window: int = REPLAY_WINDOW
) -> tuple[dict[str, Any], bytes, bool]:
    """Chain a fact: (record, its Avro bytes, replayed). A fact seen again (same id, same content)
    yields its earlier record again, byte for byte, and leaves the chain as it is."""
    d = fact_digest(f)
    ident = str(f["audit_id"])
    seen = state.recent.get(ident)
    if seen is not None and seen[2] != d:
        ident = f"{ident}~{d[:8]}"  # same id, other content: a distinct event under its own key
        f = {**f, "audit_id": ident}
        seen = state.recent.get(ident)
    if seen is not None:
        record, data = chain_encoded(f, int(seen[0]), str(seen[1]), key)
        return record, data, True
    record, data = chain_encoded(f, state.seq + 1, state.hash, key)
    state.recent[ident] = [record["seq"], state.hash, d]
    state.seq, state.hash = record["seq"], record["hash"]
    while len(state.recent) > window:
        del state.recent[next(iter(state.recent))]
    return record, data, False


def append(
    state: ChainState, f: Mapping[str, Any], key: bytes | None = None, window: int = REPLAY_WINDOW
) -> tuple[dict[str, Any], bool]:
    """:func:`append_encoded` without the bytes: (record, replayed)."""
    record, _, replayed = append_encoded(state, f, key, window)
    return record, replayed


# ------------------------------------------------------------------------------ verification


@dataclass(frozen=True)
class Break:
    """A place where the log is not intact."""

    topic: str
    partition: int
    offset: int
    aggregate: str
    seq: int | None
    audit_id: str
    problem: str

    def __str__(self) -> str:
        seq = f" seq {self.seq}" if self.seq is not None else ""
        return (
            f"{self.topic}[{self.partition}]@{self.offset} aggregate {self.aggregate}{seq} "
            f"({self.audit_id}): {self.problem}"
        )


@dataclass
class _Chain:
    partition: int
    seq: int = 0
    hash: str = ""
    offset: int = -1
    recent: dict[int, str] = field(default_factory=dict)


class ChainVerifier:
    """Feed records in log order (per partition), then read ``breaks`` and the counters.

    Checks: each record's hash matches its content (altered/forged), its seq follows the chain
    (gaps: deleted; a seq already seen with another hash: forged; an older seq after a newer one:
    reordered), its prev_hash links to the previous record, a chain stays in one partition, no
    tombstones (deletions). Identical re-emitted records (at-least-once, not yet compacted) are
    duplicates, not breaks. With a key, unkeyed (plain sha256) records are breaks too.
    """

    def __init__(self, key: bytes | None = None, window: int = 256) -> None:
        self.key = key
        self.window = window
        self.chains: dict[str, _Chain] = {}
        self.breaks: list[Break] = []
        self.records = 0
        self.duplicates = 0

    def _break(self, topic: str, partition: int, offset: int, record: Mapping[str, Any], problem: str) -> None:
        self.breaks.append(
            Break(
                topic,
                partition,
                offset,
                str(record.get("aggregate", "?")),
                record.get("seq"),
                str(record.get("audit_id", "?")),
                problem,
            )
        )

    def tombstone(self, topic: str, partition: int, offset: int, key: str) -> None:
        self._break(topic, partition, offset, {"audit_id": key}, "tombstone: an audit record was deleted")

    def undecodable(self, topic: str, partition: int, offset: int, key: str, error: str) -> None:
        self._break(topic, partition, offset, {"audit_id": key}, f"not an audit record: {error}")

    def feed(self, topic: str, partition: int, offset: int, record: Mapping[str, Any], key: str | None = None) -> None:
        """Check a decoded record (it is re-encoded: the hash covers the encoding)."""
        try:
            data = encode_record(record)
        except Exception as exc:  # noqa: BLE001 - a record that does not fit the schema is a break
            self.records += 1
            self._break(topic, partition, offset, record, f"not an audit record: {exc}")
            return
        self.feed_raw(topic, partition, offset, data, key)

    def feed_raw(self, topic: str, partition: int, offset: int, data: bytes, key: str | None = None) -> None:
        """Check a record as stored (its Avro bytes): hash, then its place in its chain."""
        self.records += 1
        try:
            ident, aggregate, seq, prev, alg, h = head_fields(data)
        except AuditError as exc:
            self.undecodable(topic, partition, offset, key or "?", str(exc))
            return
        body = data[:-_HASH_TAIL]
        c = self.chains.get(aggregate)
        # the fast path: plain sha256, intact, next in its chain
        if (
            alg == "sha256"
            and self.key is None
            and c is not None
            and seq == c.seq + 1
            and prev == c.hash
            and c.partition == partition
            and (key is None or key == ident)
            and hashlib.sha256(body).hexdigest() == h
        ):
            c.seq, c.hash, c.offset = seq, h, offset
            recent = c.recent
            recent[seq] = h
            if len(recent) > self.window:
                del recent[next(iter(recent))]
            return
        record = {"audit_id": ident, "aggregate": aggregate, "seq": seq, "prev_hash": prev, "hash_alg": alg, "hash": h}
        if key is not None and key != ident:
            self._break(topic, partition, offset, record, f"Kafka key {key!r} is not the record's audit id")
        if alg == "hmac-sha256" and self.key is None:
            self._break(topic, partition, offset, record, "keyed (hmac-sha256) record: give the audit key to verify")
            expected = h
        elif alg != "hmac-sha256" and self.key is not None:
            self._break(topic, partition, offset, record, f"unkeyed ({alg}) record in a keyed log: forged")
            expected = _digest(body, alg, None)
        else:
            expected = _digest(body, alg, self.key)
        if expected != h:
            self._break(topic, partition, offset, record, "hash does not match the content: altered or forged")
        c = self.chains.get(aggregate)
        if c is None:
            c = self.chains[aggregate] = _Chain(partition)
        elif c.partition != partition:
            self._break(topic, partition, offset, record, f"chain continues in another partition ({c.partition})")
        if seq <= c.seq:
            known = c.recent.get(seq)
            if known == h:
                self.duplicates += 1
            elif known is None and seq <= c.seq - self.window:
                self._break(topic, partition, offset, record, f"seq {seq} re-appears long after (chain at {c.seq})")
            elif known is None:
                self._break(topic, partition, offset, record, f"seq {seq} out of order: after seq {c.seq}")
            else:
                self._break(topic, partition, offset, record, f"a second, different record for seq {seq}: forged")
            return
        if seq > c.seq + 1:
            missing = f"seq {c.seq + 1}" if seq == c.seq + 2 else f"seqs {c.seq + 1}..{seq - 1}"
            self._break(
                topic, partition, offset, record, f"{missing} missing before it (deleted, or reordered after it)"
            )
        elif record.get("prev_hash") != c.hash:
            self._break(topic, partition, offset, record, f"prev_hash does not link to seq {c.seq}: forged/reordered")
        c.seq, c.hash, c.offset = seq, h, offset
        c.recent[seq] = h
        if len(c.recent) > self.window:
            del c.recent[next(iter(c.recent))]

    def compact(self) -> None:
        """Forget the recent hashes but the last: before sending a verifier to another process."""
        for c in self.chains.values():
            c.recent = {c.seq: c.hash}

    def merge(self, other: ChainVerifier) -> None:
        """Add the results of a verifier that read other partitions."""
        self.records += other.records
        self.duplicates += other.duplicates
        self.breaks.extend(other.breaks)
        for aggregate, c in other.chains.items():
            mine = self.chains.get(aggregate)
            if mine is None:
                self.chains[aggregate] = c
            else:
                self.breaks.append(
                    Break("", c.partition, c.offset, aggregate, c.seq, "-",
                          f"chain found in partitions {mine.partition} and {c.partition}: forged")
                )  # fmt: skip

    def check_heads(self, heads: Mapping[str, tuple[int, str]], topic: str = "") -> None:
        """Compare the chains with the heads the audit agent recorded (its changelog) BEFORE the
        log was read: every recorded head must be in the log with the same hash. Detects the
        removal of a chain's last events, which no link can show. (The log may be ahead of the
        heads: events chained since.)"""
        for aggregate, (seq, h) in heads.items():
            c = self.chains.get(aggregate)
            have = c.seq if c else 0
            if have < seq:
                self.breaks.append(
                    Break(topic, c.partition if c else -1, c.offset if c else -1, aggregate, have, "-",
                          f"chain ends at seq {have} but the agent recorded seq {seq}: last events deleted")
                )  # fmt: skip
            elif c is not None and c.recent.get(seq, h) != h:
                self.breaks.append(
                    Break(topic, c.partition, c.offset, aggregate, seq, "-",
                          f"seq {seq} differs from the head the agent recorded: forged")
                )  # fmt: skip

    @property
    def intact(self) -> bool:
        return not self.breaks


def verify_records(records: Iterable[Mapping[str, Any]], key: bytes | None = None, topic: str = "") -> list[Break]:
    """Verify records given in log order (offsets by position): a convenience for tests/tools."""
    v = ChainVerifier(key)
    for offset, record in enumerate(records):
        v.feed(topic, 0, offset, record)
    return v.breaks


# ------------------------------------------------------------------------------ reconstruction


def _plain(value: Any) -> Any:
    """A command value as written: ``{"$init": v}`` is v; unresolved $lookup/$allocate stay as given."""
    if isinstance(value, dict) and len(value) == 1 and "$init" in value:
        return _plain(value["$init"])
    return value


def _matches(row: Mapping[str, Any], match: Mapping[str, Any]) -> bool:
    for col, want in match.items():
        if isinstance(want, dict) and len(want) == 1 and "$in" in want:
            if row.get(col) not in want["$in"]:
                return False
        elif isinstance(want, dict) or row.get(col) != want:
            return False
    return True


def _order(e: Mapping[str, Any]) -> tuple[Any, ...]:
    return (int(e["ts_ms"]), str(e.get("system")), e.get("source_lsn") or 0, e.get("source_order") or 0)


def state_at(events: Iterable[Mapping[str, Any]], at_ms: int) -> dict[str, dict[str, dict[str, Any]]]:
    """The rows as they were at ``at_ms`` on either side, rebuilt from the audit events.

    Returns ``{"<system>.<schema>.<table>": {row key json: row}}`` (rows deleted by then are absent).
    Folded in time order: captured changes (by commit time; an insert or snapshot row sets the
    row, an update sets its changed columns, a delete removes it) and the commands archsync
    applied (by apply time; their writes are not captured, being archsync's own): a command
    updates the rows matching its ``match``, an upsert with no such row inserts one (keyed by the
    match until a captured change of the same row names its primary key).
    """
    wanted = [
        e for e in events
        if int(e["ts_ms"]) <= at_ms
        and (e.get("kind") == "change_captured"
             or (e.get("kind") == "command_applied" and e.get("outcome") == "applied"))
    ]  # fmt: skip
    wanted.sort(key=_order)
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    by_match: dict[str, dict[str, dict[str, Any]]] = {}  # rows known only by a command's match
    for e in wanted:
        name = f"{e['system']}.{e['table']}"
        rows = tables.setdefault(name, {})
        values = orjson.loads(e["values"]) if e.get("values") else {}
        if e["kind"] == "command_applied":
            match = orjson.loads(e["row_key"]) if e.get("row_key") else {}
            hits = [k for k, row in rows.items() if _matches(row, match)]
            if e["op"] == "delete":
                for k in hits:
                    rows.pop(k, None)
                continue
            plain = {c: _plain(v) for c, v in values.items()}
            if hits:
                for k in hits:
                    rows[k].update(
                        {c: _plain(v) for c, v in values.items() if not (isinstance(v, dict) and "$init" in v)}
                    )
            elif e["op"] in ("upsert", "insert_once"):
                key = canonical_json(match)
                rows[key] = plain
                by_match.setdefault(name, {})[key] = match
            continue
        key = str(e.get("row_key"))
        if key not in rows and e["op"] != "t":
            # a row first written by a command (keyed by its match) now captured under its own key
            for mkey, match in list(by_match.get(name, {}).items()):
                if mkey in rows and _matches(values, match):
                    rows[key] = rows.pop(mkey)
                    del by_match[name][mkey]
                    break
        if e["op"] == "d":
            rows.pop(key, None)
        elif e["op"] == "t":
            rows.clear()
        elif e["op"] in ("c", "r"):
            rows[key] = dict(values)
        else:
            rows.setdefault(key, {}).update(values)
    return {t: rows for t, rows in tables.items() if rows}


def related_aggregates(events: Iterable[Mapping[str, Any]], start: str) -> set[str]:
    """``start`` and every chain linked to it, transitively (a form, its business key, its item)."""
    edges: dict[str, set[str]] = {}
    for e in events:
        for link in e.get("links") or ():
            edges.setdefault(str(e["aggregate"]), set()).add(str(link))
            edges.setdefault(str(link), set()).add(str(e["aggregate"]))
    seen = {start}
    todo = [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen
