"""The capture service of one source: leader election, snapshots, and the streaming loop.

Pieces, kept apart as in Debezium's connector: :mod:`connectors.catalog` (publication, keys,
slot state), :mod:`connectors.snapshot` (the snapshotter), :mod:`connectors.replication` (the
stream reader), :mod:`connectors.offsets` (what may be confirmed), :mod:`connectors.kafka_sink`
(the producer). This module wires them: it owns no protocol logic of its own.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson
from tqdm import tqdm

from archsync import metrics
from archsync.errors import ArchsyncError
from archsync.settings import Settings
from connectors import catalog
from connectors.changes import (
    HEARTBEAT_PREFIX,
    LogicalMessage,
    TableInfo,
    TransactionAssembler,
    TransactionBatch,
)
from connectors.envelope import snapshot_event
from connectors.kafka_admin import TopicSpec, ensure_topics
from connectors.kafka_sink import ChangeProducer
from connectors.offsets import FlushTracker
from connectors.pgoutput import Relation, decode_message, lsn_to_str, parse_copy_frame
from connectors.pgtypes import BUILTIN_TYPE_NAMES, KNOWN_TYPE_OIDS, convert_tuple
from connectors.postgres import connect
from connectors.replication import CreatedSlot, ReplicationConnection
from connectors.snapshot import SnapshotSession
from schemas.codec import key_bytes
from topology.flows import AggregateRouter
from topology.model import Source, Topology

log = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0  # seconds between standby status updates
JSON_OIDS = frozenset({114, 3802})


@dataclass
class CaptureStats:
    """Counters a caller (tests, benchmarks, the CLI) can read while the capture runs."""

    transactions: int = 0
    events: int = 0
    snapshot_rows: int = 0
    heartbeats: int = 0
    confirmed_lsn: int = 0
    leader: bool = False
    streaming: bool = False


class CaptureService:
    """Captures one source into Kafka until :meth:`stop` is called (or the process dies)."""

    def __init__(
        self,
        topology: Topology,
        source_name: str,
        settings: Settings,
        *,
        dsn: str | None = None,
        lock_poll_seconds: float = 1.0,
    ) -> None:
        self.topology = topology
        self.source: Source = topology.source(source_name)
        self.settings = settings
        self.dsn = dsn or self.source.dsn(settings)
        self.setting = self.source.dsn_env
        self.lock_poll_seconds = lock_poll_seconds
        self.stats = CaptureStats()
        self._stop = threading.Event()
        self.name = source_name
        self.topics = topology.topics

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def run_forever(self, max_backoff: float = 30.0) -> None:
        """Run, and after a failure (database or broker gone, stream broken) start again with
        backoff; each restart resumes from the slot, so nothing is lost. Configuration errors
        (wrong DSN, missing table) end it: retrying cannot fix them."""
        backoff = 1.0
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.run()
                return
            except ArchsyncError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged, counted, retried
                kind = type(exc).__name__
                metrics.CAPTURE_ERRORS.labels(self.name, kind).inc()
                log.error("capture failed, restarting", extra={"source": self.name, "error": str(exc),
                                                               "kind": kind, "retry_in_s": backoff})
            if time.monotonic() - started > 60:
                backoff = 1.0
            self._stop.wait(backoff)
            backoff = min(backoff * 2, max_backoff)

    # -- leadership ---------------------------------------------------------------------
    def _acquire_leadership(self, lock_conn: Any) -> bool:
        """Block until this process holds the source's advisory lock (False if stopped first)."""
        waited = False
        while not self._stop.is_set():
            row = lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (self.source.lock_id,)).fetchone()
            if row and row[0]:
                if waited:
                    log.info("standby took over", extra={"source": self.name})
                return True
            if not waited:
                log.info(
                    "standby: another capture holds the lock, waiting",
                    extra={"source": self.name, "slot": self.source.slot},
                )
                waited = True
            self._stop.wait(self.lock_poll_seconds)
        return False

    def _release_stale_walsender(self, admin: Any) -> None:
        """The lock is ours, so a walsender still holding the slot belongs to a dead leader: end it."""
        for _ in range(100):
            slots = catalog.list_slots(admin, self.source.slot)
            if not slots or not slots[0].active:
                return
            log.warning(
                "slot still held by a previous leader's walsender, terminating it",
                extra={"slot": self.source.slot, "pid": slots[0].active_pid},
            )
            admin.execute("SELECT pg_terminate_backend(%s)", (slots[0].active_pid,))
            time.sleep(0.1)

    # -- main ---------------------------------------------------------------------------
    def run(self) -> None:
        metrics.CAPTURE_ACTIVE.labels(self.name).set(0)
        with connect(
            self.dsn, self.setting, autocommit=True, application_name=f"archsync-capture-lock-{self.name}"
        ) as lock_conn:
            if not self._acquire_leadership(lock_conn):
                return
            self.stats.leader = True
            metrics.CAPTURE_ACTIVE.labels(self.name).set(1)
            try:
                with connect(
                    self.dsn, self.setting, autocommit=True, application_name=f"archsync-capture-{self.name}"
                ) as admin:
                    self._run_leader(admin, lock_conn)
            finally:
                metrics.CAPTURE_ACTIVE.labels(self.name).set(0)
                self.stats.leader = False
                self.stats.streaming = False

    def _router(self) -> Any:
        """The rows of one aggregate instance go to one partition (see AggregateRouter)."""
        router = AggregateRouter(self.topology.aggregates)
        name = self.name
        return lambda table, image: router.message_key(name, table, image)

    def _run_leader(self, admin: Any, lock_conn: Any) -> None:
        source = self.source
        database = admin.info.dbname
        keys = catalog.primary_keys(admin, source.tables)
        catalog.ensure_publication(admin, source.publication, source.tables)
        self._release_stale_walsender(admin)
        ensure_topics(self.settings.kafka_bootstrap, self._topic_specs())

        tracker = FlushTracker(on_confirmed=metrics.PRODUCE_LATENCY.labels(self.name).observe)
        repl = ReplicationConnection(self.dsn, self.setting)
        producer = ChangeProducer(
            self.settings.kafka_bootstrap,
            tracker,
            system=self.name,
            database=database,
            topic_for=lambda schema, table: self.topics.change_topic(self.name, schema, table),
            dead_letter_topic=self.topics.dead_letter_topic("capture"),
            partitions=self.topics.partitions,
            max_message_bytes=source.max_message_bytes,
            metrics=metrics,
            route=self._router(),
        )
        try:
            existing = catalog.list_slots(admin, source.slot)
            if not existing:
                created = repl.create_slot(source.slot, export_snapshot=True)
                log.info(
                    "replication slot created",
                    extra={"slot": source.slot, "consistent_lsn": lsn_to_str(created.consistent_lsn)},
                )
                catalog.forget_snapshots(admin, source.slot)
                self._snapshot(
                    admin,
                    producer,
                    tracker,
                    keys,
                    list(source.tables),
                    created,
                    database,
                    read=source.snapshot == "initial",
                )
                confirmed = created.consistent_lsn
            else:
                confirmed = existing[0].confirmed_flush_lsn or 0
                states = catalog.snapshot_states(admin, source.slot)
                pending = [t for t in source.tables if t not in states or not states[t].done]
                if pending:
                    self._snapshot_added(admin, producer, tracker, keys, pending, database)
            states = catalog.snapshot_states(admin, source.slot)
            partial = [t for t, s in states.items() if s.rows > 0 and s.snapshot_lsn > confirmed]
            skip_below = {t: s.snapshot_lsn for t, s in states.items() if s.snapshot_lsn > confirmed}
            tracker.confirmed_lsn = confirmed
            assembler = TransactionAssembler(keys, self.topology.appliers, skip_below, keep_deletes_below=partial)
            repl.start(source.slot, source.publication)
            self.stats.streaming = True
            log.info(
                "streaming",
                extra={"source": self.name, "slot": source.slot, "from_lsn": lsn_to_str(confirmed)},
            )
            self._stream(repl, producer, tracker, assembler, admin, lock_conn)
        finally:
            try:
                producer.flush(10)
            finally:
                repl.close()

    def _topic_specs(self) -> list[TopicSpec]:
        t = self.topics
        specs = [
            TopicSpec(
                t.change_topic(self.name, *catalog.split_table(q)),
                t.partitions,
                t.replication_factor,
                t.config,
            )
            for q in self.source.tables
        ]
        specs.append(TopicSpec(t.dead_letter_topic("capture"), 1, t.replication_factor, {}))
        specs.append(TopicSpec(t.heartbeat_topic(), 1, t.replication_factor, {"cleanup.policy": "compact"}))
        if self._audit_facts_topic() is not None:  # the worker creates the rest of the audit topics
            specs.append(TopicSpec(f"{t.prefix}.audit.facts", t.partitions, t.replication_factor, {}))
        return specs

    def _audit_facts_topic(self) -> str | None:
        """Where the capture records the own-origin transactions it skips (None: audit off)."""
        from topology.audit_config import audit_config

        return f"{self.topics.prefix}.audit.facts" if audit_config(self.topology).enabled else None

    # -- snapshots ----------------------------------------------------------------------
    def _snapshot_added(
        self,
        admin: Any,
        producer: ChangeProducer,
        tracker: FlushTracker,
        keys: dict[str, tuple[str, ...]],
        tables: list[str],
        database: str,
    ) -> None:
        """Tables not (fully) snapshotted yet: read them in a fresh exported snapshot."""
        tmp = ReplicationConnection(self.dsn, self.setting)
        try:
            created = tmp.create_slot(f"{self.source.slot}_snap_{os.getpid()}", export_snapshot=True, temporary=True)
            log.info(
                "snapshot of added or unfinished tables",
                extra={"tables": tables, "snapshot_lsn": lsn_to_str(created.consistent_lsn)},
            )
            self._snapshot(
                admin,
                producer,
                tracker,
                keys,
                tables,
                created,
                database,
                read=self.source.snapshot == "initial",
            )
        finally:
            tmp.close()

    def _snapshot(
        self,
        admin: Any,
        producer: ChangeProducer,
        tracker: FlushTracker,
        keys: dict[str, tuple[str, ...]],
        tables: list[str],
        created: CreatedSlot,
        database: str,
        *,
        read: bool,
    ) -> None:
        lsn = created.consistent_lsn
        if not read:
            for table in tables:
                catalog.record_snapshot(admin, self.source.slot, table, lsn, done=True, rows=0)
            return
        with connect(self.dsn, self.setting, application_name=f"archsync-snapshot-{self.name}") as conn:
            session = SnapshotSession(conn, created.snapshot_name)
            try:
                for table in tables:
                    self._snapshot_table(session, admin, producer, tracker, keys[table], table, lsn, database)
            finally:
                session.close()

    def _snapshot_table(
        self,
        session: SnapshotSession,
        admin: Any,
        producer: ChangeProducer,
        tracker: FlushTracker,
        key_columns: tuple[str, ...],
        table: str,
        lsn: int,
        database: str,
    ) -> None:
        catalog.record_snapshot(admin, self.source.slot, table, lsn, done=False, rows=0)
        columns, estimate, chunks = session.read_table(table, key_columns, self.source.snapshot_chunk_rows)
        schema, name = catalog.split_table(table)
        relation = Relation(0, schema, name, "d", columns)
        unknown = {
            c.name: BUILTIN_TYPE_NAMES.get(c.type_oid, str(c.type_oid))
            for c in columns
            if c.type_oid not in KNOWN_TYPE_OIDS
        }
        info = TableInfo(
            0,
            schema,
            name,
            relation,
            key_columns,
            unknown,
            frozenset(c.name for c in columns if c.type_oid in JSON_OIDS),
        )
        rows_done = 0
        started = time.monotonic()
        last_log = started
        counter = metrics.SNAPSHOT_ROWS.labels(self.name, table)
        with tqdm(
            total=estimate or None,
            desc=f"snapshot {self.name}:{table}",
            unit="row",
            disable=None,
            mininterval=1.0,
            leave=False,
        ) as bar:
            for chunk in chunks:
                unit = tracker.open(lsn)
                ts_ms = int(time.time() * 1000)
                for values in chunk:
                    rows_done += 1
                    try:
                        row = convert_tuple(columns, values)
                    except ValueError as exc:
                        from connectors.envelope import dead_letter

                        producer.send_dead_letter(
                            dead_letter(
                                "snapshot",
                                str(exc),
                                type(exc).__name__,
                                system=self.name,
                                table=table,
                                lsn=lsn,
                                original_json=orjson.dumps(list(values), default=repr).decode(),
                            ),
                            unit,
                            "conversion",
                        )
                        continue
                    event = snapshot_event(self.name, database, info, row, lsn, rows_done, ts_ms)
                    producer.send_event(
                        event,
                        key_bytes(self.name, schema, name, {k: row[k] for k in key_columns}),
                        unit,
                        info.json_columns,
                        producer.partition_of(f"{schema}.{name}", "r", None, row),
                    )
                tracker.seal(unit)
                producer.poll(0)
                bar.update(len(chunk))
                counter.inc(len(chunk))
                now = time.monotonic()
                if now - last_log > 10:
                    last_log = now
                    log.info("snapshot progress", extra={"table": table, "rows": rows_done, "estimate": estimate})
                    catalog.record_snapshot(admin, self.source.slot, table, lsn, done=False, rows=rows_done)
        producer.flush()
        tracker.advance()
        self.stats.snapshot_rows += rows_done
        catalog.record_snapshot(admin, self.source.slot, table, lsn, done=True, rows=rows_done)
        log.info(
            "snapshot of table done",
            extra={"table": table, "rows": rows_done, "seconds": round(time.monotonic() - started, 3)},
        )

    # -- streaming ----------------------------------------------------------------------
    def _stream(
        self,
        repl: ReplicationConnection,
        producer: ChangeProducer,
        tracker: FlushTracker,
        assembler: TransactionAssembler,
        admin: Any,
        lock_conn: Any,
    ) -> None:
        name = self.name
        source = self.source
        received = tracker.confirmed_lsn
        last_status = 0.0
        next_heartbeat = time.monotonic() + source.heartbeat_seconds
        heartbeat_topic = self.topics.heartbeat_topic()
        facts_topic = self._audit_facts_topic()
        heartbeat_key = name.encode()
        counters: dict[tuple[str, str], Any] = {}
        confirmed_gauge = metrics.CONFIRMED_LSN.labels(name)

        def keep_alive() -> None:  # while blocked on a full producer queue
            nonlocal last_status
            now = time.monotonic()
            if now - last_status > STATUS_INTERVAL:
                repl.send_status(received, tracker.advance())
                last_status = now

        producer.on_wait = keep_alive
        feed = assembler.feed
        while not self._stop.is_set():
            handled = 0
            for frame in repl.frames():
                handled += 1
                if frame[0] == 0x77:  # 'w' XLogData: header is 1 + 8 + 8 + 8 bytes
                    start = int.from_bytes(frame[1:9], "big")
                    out = feed(decode_message(frame[25:]), start)
                    if out is None:
                        continue
                    if type(out) is TransactionBatch:
                        # a large transaction comes in several batches: only the final one's unit
                        # carries the end LSN; the others confirm nothing (end 0) but still block
                        unit = tracker.open(out.tx.end_lsn if out.final else 0)
                        if out.records:
                            producer.send_batch(out, unit)
                            self._count(counters, out)
                        if out.final and out.own_origin and facts_topic is not None:
                            # the skip is audited; in the same unit, so the slot passes the
                            # transaction only once Kafka has the fact
                            key, value = own_origin_fact_message(name, out)
                            producer.send_raw(facts_topic, key, value, unit)
                        tracker.seal(unit)
                        if out.final:
                            self.stats.transactions += 1
                            if out.own_origin:
                                metrics.OWN_ORIGIN_SKIPPED.labels(name, out.tx.origin or "").inc()
                    elif type(out) is LogicalMessage and out.prefix == HEARTBEAT_PREFIX:
                        unit = tracker.open(out.lsn)
                        producer.send_raw(
                            heartbeat_topic,
                            heartbeat_key,
                            orjson.dumps(
                                {"source": name, "lsn": lsn_to_str(out.lsn), "ts_ms": int(time.time() * 1000)}
                            ),
                            unit,
                        )
                        tracker.seal(unit)
                        self.stats.heartbeats += 1
                        metrics.HEARTBEATS.labels(name).inc()
                elif frame[0] == 0x6B:  # 'k' keepalive
                    keepalive = parse_copy_frame(frame)
                    wal_end = keepalive.wal_end
                    if wal_end > received:
                        received = wal_end
                    if not assembler.in_transaction:
                        tracker.advance()
                        tracker.idle_advance(wal_end)
                    if getattr(keepalive, "reply_requested", False):
                        last_status = 0.0
                if handled % 2000 == 0:
                    producer.poll(0)
            producer.poll(0)
            confirmed = tracker.advance()
            now = time.monotonic()
            if now - last_status >= STATUS_INTERVAL:
                repl.send_status(max(received, confirmed), confirmed)
                self.stats.confirmed_lsn = confirmed
                confirmed_gauge.set(confirmed)
                last_status = now
            if now >= next_heartbeat:
                next_heartbeat = now + source.heartbeat_seconds
                self._heartbeat(admin, lock_conn)
            if handled == 0:
                repl.wait(0.2)
        # graceful stop: confirm what was acknowledged
        producer.flush(10)
        confirmed = tracker.advance()
        repl.send_status(max(received, confirmed), confirmed)
        self.stats.confirmed_lsn = confirmed

    def _count(self, counters: dict[tuple[str, str], Any], batch: TransactionBatch) -> None:
        """Metrics of a produced batch: events by table and op, batch size."""
        metrics.BATCH_SIZE.labels(self.name).observe(len(batch.records))
        self.stats.events += len(batch.records)
        tally: dict[tuple[str, str], int] = {}
        for rec in batch.records:
            table = getattr(rec, "table", None)
            key = (table.qualified, rec.op) if isinstance(table, TableInfo) else ("<rejected>", "x")  # type: ignore[union-attr]
            tally[key] = tally.get(key, 0) + 1
        for key, n in tally.items():
            counter = counters.get(key)
            if counter is None:
                counter = counters[key] = metrics.CAPTURED_EVENTS.labels(self.name, key[0], key[1])
            counter.inc(n)

    def _heartbeat(self, admin: Any, lock_conn: Any) -> None:
        """Emit a logical message through the slot (so an idle slot advances) and refresh lag."""
        lock_conn.execute("SELECT 1")  # the lock session must be alive, or another process leads
        admin.execute(
            "SELECT pg_logical_emit_message(false, %s, %s)",
            (HEARTBEAT_PREFIX, f"{socket.gethostname()}:{os.getpid()}"),
        )
        for slot in catalog.list_slots(admin, self.source.slot):
            if slot.lag_bytes is not None:
                metrics.SLOT_LAG.labels(self.name, slot.name).set(slot.lag_bytes)


def own_origin_fact_message(system: str, batch: TransactionBatch) -> tuple[bytes, bytes]:
    """The audit fact of a skipped own-origin transaction, as the worker's facts messages are
    (key = aggregate, value = JSON list of facts; Kafka's default partitioner places it)."""
    from processors.audit import own_origin_fact

    tx = batch.tx
    fact = own_origin_fact(
        system, tx.origin or "", tx.commit_lsn, int(tx.commit_ts.timestamp() * 1000), batch.total or tx.order
    )
    return str(fact["aggregate"]).encode(), orjson.dumps([fact])
