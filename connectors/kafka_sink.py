"""Produces change events to Kafka, at least once, reporting acknowledgements to a FlushTracker."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from confluent_kafka import KafkaError, Producer

from archsync.errors import ConfigError
from connectors.changes import ChangeRecord, TransactionBatch
from connectors.envelope import change_event, dead_letter, rejected_dead_letter
from connectors.kafka_admin import RDKAFKA_LOG
from connectors.offsets import FlushTracker, PendingUnit
from schemas.codec import (
    ChangeEventCodec,
    DeadLetterCodec,
    event_tail,
    key_bytes,
    source_table_prefix,
    source_tx_suffix,
    to_json,
    txn_prefix,
)

log = logging.getLogger(__name__)

SCHEMA_HEADER = "archsync.schema"
CHANGE_SCHEMA = b"change_event.v1"
DEAD_LETTER_SCHEMA = b"dead_letter.v1"


class FatalProduceError(RuntimeError):
    """The producer hit an error it cannot recover from (e.g. a fenced idempotent producer)."""


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Producer settings for at-least-once capture: idempotent, acks=all, never give up on a record."""
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "max.in.flight.requests.per.connection": 5,  # ordering kept by idempotence
        "message.timeout.ms": 0,  # a lost broker makes us wait, never drop
        # a batch waits at most this long for more records. 10 ms would cut ~20 ms of OA → archive
        # latency at light load (p50 commit → transform 42 → 21–26 ms with 5 ms), but costs the
        # capture's rate (300k rows, in turns: 20.3k / 18.7k rows/s at 50 ms, 16.9k / 17.8k at 10 —
        # 26–27% of pg_recvlogical against a 30% target). ARCHSYNC_PRODUCER_CONFIG overrides it.
        "linger.ms": 50,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 200_000,
        "queue.buffering.max.kbytes": 131_072,
        "partitioner": "murmur2_random",  # same partition for a key as Java and aiokafka clients
        "logger": RDKAFKA_LOG,
    }
    extra = os.environ.get("ARCHSYNC_PRODUCER_CONFIG")  # JSON object of librdkafka settings
    if extra:
        try:
            config.update(orjson.loads(extra))
        except orjson.JSONDecodeError as exc:
            raise ConfigError("ARCHSYNC_PRODUCER_CONFIG", f"not a JSON object: {exc}") from None
    config.update(overrides)
    return config


class ChangeProducer:
    """Encodes envelopes, produces them keyed by primary key, dead-letters what cannot go."""

    def __init__(
        self,
        bootstrap: str,
        tracker: FlushTracker,
        *,
        system: str,
        database: str,
        topic_for: Callable[[str, str], str],
        dead_letter_topic: str,
        partitions: int,
        max_message_bytes: int = 1_000_000,
        on_wait: Callable[[], None] | None = None,
        metrics: Any = None,
        config: Mapping[str, Any] | None = None,
        route: Callable[[str, Mapping[str, Any] | None], bytes | None] | None = None,
    ) -> None:
        self.producer = Producer(producer_config(bootstrap, error_cb=self._on_error, **(config or {})))
        self.tracker = tracker
        self.system = system
        self.database = database
        self.topic_for = topic_for
        self.dead_letter_topic = dead_letter_topic
        self.partitions = partitions
        self.max_message_bytes = max_message_bytes
        self.on_wait = on_wait
        self.codec = ChangeEventCodec()
        self.dl_codec = DeadLetterCodec()
        self.metrics = metrics
        self.fatal: str | None = None
        # route(table, row image) → the row's aggregate key: the event goes to that key's partition
        # (murmur2, like the default partitioner), its message key staying the primary key
        self.route = route
        self.produced = 0
        self.dead_lettered = 0

    # -- errors -------------------------------------------------------------------------
    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self.fatal = err.str()
            log.error("fatal producer error", extra={"error": err.str()})
        elif err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN):
            log.warning("broker unreachable, waiting", extra={"error": err.str()})

    def check(self) -> None:
        if self.fatal:
            raise FatalProduceError(self.fatal)

    # -- producing ----------------------------------------------------------------------
    def _produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, str | bytes | None]],
        on_delivery: Callable[[Any, Any], None],
        partition: int | None = None,
    ) -> None:
        produce = self.producer.produce
        while True:
            try:
                if partition is None:
                    produce(topic, value, key, on_delivery=on_delivery, headers=headers)
                else:
                    produce(topic, value, key, partition=partition, on_delivery=on_delivery, headers=headers)
                return
            except BufferError:
                # local queue full (slow or absent broker): serve callbacks and wait; keep the
                # replication connection alive meanwhile
                self.producer.poll(0.1)
                self.check()
                if self.on_wait is not None:
                    self.on_wait()

    def send_event(
        self,
        event: dict[str, Any],
        key: bytes | None,
        unit: PendingUnit,
        json_columns: frozenset[str] = frozenset(),
        partition: int | None = None,
    ) -> None:
        """Encode and produce one envelope; on failure produce a dead letter instead."""
        source = event["source"]
        topic = self.topic_for(source["schema"], source["table"])
        try:
            value = self.codec.encode(event, json_columns)
        except Exception as exc:  # noqa: BLE001 - reported, never swallowed silently
            self.send_dead_letter(
                dead_letter(
                    "capture",
                    f"cannot encode the change event: {exc}",
                    type(exc).__name__,
                    system=self.system,
                    table=f"{source['schema']}.{source['table']}",
                    lsn=source["lsn"],
                    original_json=_safe_json(event),
                    original_key=key,
                    source_topic=topic,
                ),
                unit,
                "encode",
            )
            return
        if len(value) + (len(key) if key else 0) > self.max_message_bytes:
            self.send_dead_letter(
                dead_letter(
                    "capture",
                    f"change event of {len(value)} bytes is over the {self.max_message_bytes}-byte limit",
                    "MessageTooLarge",
                    system=self.system,
                    table=f"{source['schema']}.{source['table']}",
                    lsn=source["lsn"],
                    original_key=key,
                    source_topic=topic,
                    original_json=_safe_json(event, limit=self.max_message_bytes // 4),
                ),
                unit,
                "oversized",
            )
            return
        self.tracker.add(unit)
        self._produce(topic, key, value, [(SCHEMA_HEADER, CHANGE_SCHEMA)], self.tracker.callback(unit), partition)
        self.produced += 1

    def partition_of(self, table: str, op: str, before: Any, after: Any) -> int | None:
        """The partition of a row change: its aggregate's, None (key hash) outside any aggregate."""
        if self.route is None:
            return None
        image = (before if op == "d" else after) or before
        key = self.route(table, image)
        return None if key is None else (murmur2(key) & 0x7FFFFFFF) % self.partitions

    def send_dead_letter(self, record: dict[str, Any], unit: PendingUnit, reason: str) -> None:
        value = self.dl_codec.encode(record)
        if len(value) > self.max_message_bytes:
            record = {
                **record,
                "original_json": (record.get("original_json") or "")[: self.max_message_bytes // 4],
                "original_value": None,
            }
            value = self.dl_codec.encode(record)
        self.tracker.add(unit)
        self._produce(
            self.dead_letter_topic,
            record.get("original_key"),
            value,
            [(SCHEMA_HEADER, DEAD_LETTER_SCHEMA)],
            self.tracker.callback(unit),
        )
        self.dead_lettered += 1
        if self.metrics is not None:
            self.metrics.DEAD_LETTERS.labels("capture", reason).inc()
        log.warning(
            "dead letter",
            extra={
                "reason": record["reason"],
                "table": record.get("source_table"),
                "lsn": record.get("source_lsn"),
            },
        )

    def send_batch(self, batch: TransactionBatch, unit: PendingUnit) -> int:
        """Produce every record of a transaction batch into ``unit``; return how many.

        The hot path of the capture: the common case (a row change that encodes and fits) is
        inlined; truncates, rejected rows, encoding failures and oversized events take the slow
        path through :meth:`send_event` / :meth:`send_dead_letter`.
        """
        tx = batch.tx
        system, database = self.system, self.database
        ts_ms = int(time.time() * 1000)
        total = batch.total
        encode_change = self.codec.encode_change
        produce = self.producer.produce
        on_delivery = self.tracker.callback(unit)
        limit = self.max_message_bytes
        # what every event of this transaction shares is encoded once
        tx_source = source_tx_suffix(tx.commit_lsn, tx.xid, tx.commit_ts, tx.origin, False)
        txn = txn_prefix(f"{tx.xid}:{tx.commit_lsn:X}")
        eid_prefix = f"{system}:{tx.commit_lsn:016X}:"
        headers: list[tuple[str, str | bytes | None]] = [(SCHEMA_HEADER, CHANGE_SCHEMA)]
        per_table: dict[int, tuple[bytes, bytes, str, str]] = {}
        route = self.route
        for record in batch.records:
            if type(record) is not ChangeRecord:
                self.send_dead_letter(rejected_dead_letter(system, record, tx), unit, "conversion")  # type: ignore[arg-type]
                continue
            table = record.table
            op = record.op
            if op == "t":
                event = change_event(system, database, record, tx, total, ts_ms)
                for each in range(self.partitions):  # every partition sees the truncate in order
                    self.send_event(event, None, unit, table.json_columns, each)
                continue
            parts = per_table.get(id(table))
            if parts is None:
                parts = per_table[id(table)] = (
                    source_table_prefix(system, database, table.schema, table.name),
                    event_tail(total, ts_ms, table.key_columns, table.unknown_types),
                    self.topic_for(table.schema, table.name),
                    table.qualified,
                )
            key = key_bytes(system, table.schema, table.name, record.key)
            partition = self.partition_of(parts[3], op, record.before, record.after) if route else None
            eid = f"{eid_prefix}{record.order}"
            try:
                value = encode_change(
                    eid,
                    op,
                    record.before,
                    record.after,
                    parts[0],
                    record.lsn,
                    tx_source,
                    txn,
                    record.order,
                    parts[1],
                    table.json_columns,
                )
            except Exception:  # noqa: BLE001 - reported, never swallowed silently
                self.send_event(
                    change_event(system, database, record, tx, total, ts_ms), key, unit, table.json_columns, partition
                )
                continue
            if len(value) + len(key) > limit:
                self.send_event(
                    change_event(system, database, record, tx, total, ts_ms), key, unit, table.json_columns, partition
                )
                continue
            unit.pending += 1
            try:
                if partition is None:
                    produce(parts[2], value, key, on_delivery=on_delivery, headers=headers)
                else:
                    produce(parts[2], value, key, partition=partition, on_delivery=on_delivery, headers=headers)
            except BufferError:
                self._produce(parts[2], key, value, headers, on_delivery, partition)
            self.produced += 1
        return len(batch.records)

    def send_raw(self, topic: str, key: bytes, value: bytes, unit: PendingUnit) -> None:
        """Produce an already encoded record (heartbeats) into ``unit``."""
        self.tracker.add(unit)
        self._produce(topic, key, value, [], self.tracker.callback(unit))

    def poll(self, timeout: float = 0) -> None:
        self.producer.poll(timeout)
        self.check()

    def flush(self, timeout: float | None = None) -> int:
        """Wait for every queued record (forever by default); return how many are left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = self.producer.flush(1.0)
            self.check()
            if left == 0 or (deadline is not None and time.monotonic() > deadline):
                return int(left)
            if self.on_wait is not None:
                self.on_wait()


def _safe_json(event: Any, limit: int | None = None) -> str:
    try:
        text = to_json(event).decode()
    except Exception:  # noqa: BLE001 - reported, never swallowed silently
        text = orjson.dumps(event, default=repr).decode()
    return text if limit is None else text[:limit]
