"""The faust-streaming application: normalise → deduplicate → transform → apply, both ways.

Topics (``<prefix>`` from the topology):
  ``<prefix>.<system>.<schema>.<table>``  captured change events (Avro, keyed by primary key, in the
                                          partition of their aggregate instance)
  ``<prefix>.changes``                    changes keyed by aggregate (JSON): echoes of applied rows,
                                          dead letters replayed, captured events re-keyed
  ``<prefix>.apply.<system>``             apply commands for one target system, keyed by target aggregate
  ``<prefix>.conflicts``                  conflicts with both versions and the decision
  ``<prefix>.dlq.normalise`` / ``.dlq.transform`` / ``.dlq.apply``  dead letters with the reason
                                          and the original record

Agents: ``transform`` (captured events and changes: decode, normalise, drop duplicates, transform
in the aggregate's state, emit commands), ``apply_<system>`` (batches of commands → the target
database) and the audit agent (processors/audit_agent.py). Output records go through
:class:`processors.record_producer.RecordProducer`, delivered before offsets are committed.

State (a changelog-backed Faust table, rebuilt from Kafka on restart or rebalance):
  ``aggregates``  per aggregate: the rows of the aggregate and each row's last source position

Deduplication: a captured event's id is its source position (``<system>:<commit LSN>:<order>``),
so an event seen again is one whose position is the one its row's state already holds: dropped and
counted (``archsync_dedupe_hits_total{stage="event_id"}``), like an older one (``stage="position"``).
The aggregate's state is the horizon: it is kept as long as the aggregate, and costs nothing per
event (a table of event ids cost one changelog record per row change and ~0.5 KB per id held).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import faust
import orjson
from faust.sensors.base import SensorDelegate

from archsync import metrics
from archsync.observability import observe_flow_latency
from archsync.settings import Settings, env_int, state_dir
from connectors.kafka_admin import TopicSpec, ensure_topics
from processors.apply_process import ApplyRunner
from processors.audit_agent import audit_topic_specs, hooks_for, register_audit
from processors.consumer_watch import ConsumerWatch
from processors.model import ApplyCommand, Change, Conflict, kept
from processors.normalise import normalise
from processors.record_producer import EXIT_AGENT_CRASHED, OutputTopic, WorkerApp
from processors.recovery_watch import RecoveryWatch, recovery_stall_seconds
from processors.state_store import memory_budget, raw_reader, store_url
from processors.sync_modes import operations_topics
from processors.worker_consumer import fetch_tuning
from schemas.codec import ChangeEventCodec
from topology.flows import aggregate_message_key, aggregate_partition
from topology.model import Topology

log = logging.getLogger(__name__)


def pipeline_topics(topology: Topology) -> dict[str, str]:
    prefix = topology.topics.prefix
    names = {
        "changes": f"{prefix}.changes",
        "conflicts": f"{prefix}.conflicts",
        "dlq_normalise": f"{prefix}.dlq.normalise",
        "dlq_transform": f"{prefix}.dlq.transform",
        "dlq_apply": f"{prefix}.dlq.apply",
    }
    for system in topology.sources:
        names[f"apply_{system}"] = f"{prefix}.apply.{system}"
    names.update(operations_topics(topology))  # held.<flow>, notifications, control
    return names


def captured_topics(topology: Topology) -> list[str]:
    return [
        topology.topics.change_topic(name, *q.split(".", 1)) for name, s in topology.sources.items() for q in s.tables
    ]


def ensure_pipeline_topics(topology: Topology, settings: Settings) -> None:
    t = topology.topics
    specs = [
        TopicSpec(
            name,
            t.partitions if not key.startswith(("dlq", "conflicts")) else 1,
            t.replication_factor,
        )
        for key, name in pipeline_topics(topology).items()
    ]
    specs += [TopicSpec(name, t.partitions, t.replication_factor, t.config) for name in captured_topics(topology)]
    specs += audit_topic_specs(topology)  # <prefix>.audit (compacted), .audit.facts, .dlq.audit
    ensure_topics(settings.kafka_bootstrap, specs)


def dead_letter(stage: str, reason: str, original: bytes | None, **fields: Any) -> bytes:
    """Dead letters of the processors are JSON: why, where from, the original record."""
    return orjson.dumps(
        {
            "stage": stage,
            "reason": reason,
            "ts_ms": int(time.time() * 1000),
            "original": original.decode("utf-8", "replace") if original is not None else None,
            **fields,
        },
        default=str,
    )


async def send_conflicts(topic: Any, conflicts: Iterable[Conflict]) -> None:
    """Conflicts (transform's or applier's) to the conflicts topic, counted."""
    for conflict in conflicts:
        metrics.CONFLICTS.labels(conflict.table, conflict.decision).inc()
        await topic.send(key=conflict.table.encode(), value=conflict.to_json())


READY_LINE = "archsync worker ready: partitions assigned, state recovered"


class ReadySensor(faust.Sensor):
    """Says on stderr when a rebalance ended (partitions assigned, tables recovered), and keeps
    ``archsync_worker_rebalancing`` (a rebalance or table recovery that never ends is alerted on)."""

    def on_rebalance_start(self, app: faust.App) -> dict[str, Any]:  # type: ignore[override]
        metrics.WORKER_REBALANCING.set(1)
        return super().on_rebalance_start(app)

    def on_rebalance_end(self, app: faust.App, state: dict[str, Any]) -> None:  # type: ignore[override]
        metrics.WORKER_REBALANCING.set(0)
        print(READY_LINE, file=sys.stderr, flush=True)


class RebalanceSensors(SensorDelegate):
    """The app's sensors told about rebalances, assignments and commits, not about every record.

    Faust calls its sensors several times per record (message in/out, stream event in/out, table
    get/set: a dict built per event), which cost ~3% of the worker's CPU (py-spy, 3,000-form burst);
    nothing reads what Faust's own Monitor gathers from them here (its web views are off; the
    worker's metrics are archsync's own, archsync/metrics.py)."""

    def on_message_in(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_stream_event_in(self, tp: Any, offset: int, stream: Any, event: Any) -> dict[Any, Any] | None:
        return None

    def on_stream_event_out(self, tp: Any, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        pass

    def on_message_out(self, tp: Any, offset: int, message: Any) -> None:
        pass

    def on_topic_buffer_full(self, tp: Any) -> None:
        pass

    def on_table_get(self, table: Any, key: Any) -> None:
        pass

    def on_table_set(self, table: Any, key: Any, value: Any) -> None:
        pass

    def on_table_del(self, table: Any, key: Any) -> None:
        pass

    def on_send_initiated(self, producer: Any, topic: str, message: Any, keysize: int, valsize: int) -> Any:
        return None

    def on_send_completed(self, producer: Any, state: Any, metadata: Any) -> None:
        pass


WORKER_ROLES = ("all", "pipeline", "audit")


def _new_app(app_id: str, topology: Topology, settings: Settings) -> WorkerApp:
    faust_dirs = state_dir() / "worker"
    faust_dirs.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = WorkerApp(
        app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        # table state: recent keys in memory, the rest on local disk (processors/state_store.py)
        store=store_url(),
        # Faust's own directory per app (its default is ``<app id>-data`` in the current directory)
        datadir=str(faust_dirs / "{conf.name}-data"),
        topic_partitions=topology.topics.partitions,
        topic_replication_factor=topology.topics.replication_factor,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
        table_cleanup_interval=60.0,
        broker_commit_every=env_int("ARCHSYNC_COMMIT_EVERY", 1000, minimum=1),
        broker_commit_interval=1.0,
        # a few ms of linger lets aiokafka send one produce request for many records (per-record
        # requests were a third of the event loop's time)
        producer_linger=0.005,
        # a worker that died (kill -9, lost machine) is noticed by the group after this long; until
        # then its partitions wait (faust's default is 60 s)
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
        # read-ahead: ~30 partitions are consumed; with a backlog, what is fetched ahead sits in the
        # worker as Python objects. Measured (benchmarks/bench_pipeline.py, audit in the worker):
        # 1 MiB per partition (faust's default) 400 MiB peak; 512 KiB 388 MiB at the same rate;
        # 128 KiB 291 MiB but about half the rate (all before the consumer held records itself).
        # 2026-11-28, make bench defaults (30 s at 1,000/s, then 5,000 forms): 512 KiB 207 / 208 MiB,
        # 256 KiB 174 / 197 MiB (bursts of 3,000 forms: 134–145 vs 122–126 MiB); capacity in turns
        # (3,000 forms, 5 pairs, 512 vs 256 KiB): 354/235, 225/237, 358/306, 358/405, 375/450 — no
        # cost beyond the VM's noise. ARCHSYNC_WORKER_FETCH_BYTES trades one for the other.
        stream_buffer_maxsize=1024,
        consumer_max_fetch_size=env_int("ARCHSYNC_WORKER_FETCH_BYTES", 256 * 1024, minimum=1024),
    )
    app.sensors = RebalanceSensors(app)
    app.sensors.add(ReadySensor())
    watch = ConsumerWatch(app)
    app.timer(5.0)(watch.check)  # a partition left unread after a rebalance: reported, fetched again
    app.every(5.0, RecoveryWatch(app).check)  # a table recovery that stopped receiving: reported, fetched again
    return app


def create_audit_app(topology: Topology, settings: Settings, *, app_id: str | None = None) -> faust.App:
    """The audit agent alone, in its own consumer group (``archsync worker --role audit``): it
    chains the facts the pipeline workers send, on its own processes and cores."""
    app = _new_app(app_id or f"archsync-{topology.name}-{topology.topics.prefix}-audit", topology, settings)
    register_audit(app, topology, settings)
    return app


def create_app(
    topology: Topology,
    settings: Settings,
    *,
    app_id: str | None = None,
    batch_size: int = 500,
    audit_agent: bool = True,
    applier_cls: Any = None,
) -> faust.App:
    """Build the Faust app for a topology (agents registered, not started). With
    ``audit_agent=False`` the agents still record audit facts, for a separate audit worker."""
    from processors.operations import WorkerOperations
    from processors.transform import (
        AggregateState,
        aggregate_key_of,
        apply_change,
        duplicate_kind,
        is_replay_of_latest,
        new_state,
        replayable,
        transform,
    )

    names = pipeline_topics(topology)
    partitions = topology.topics.partitions
    app = _new_app(app_id or f"archsync-{topology.name}-{topology.topics.prefix}", topology, settings)
    records = app.record_producer(settings.kafka_bootstrap)

    def raw_topic(*topic_names: str, **kw: Any) -> faust.TopicT:
        return app.topic(*topic_names, key_serializer="raw", value_serializer="raw", **kw)

    captured_names = captured_topics(topology)
    # one agent reads the captured topics and the changes topic (echoes, forwarded and replayed
    # changes); the captures send every row of an aggregate instance to its partition
    inputs = raw_topic(*captured_names, names["changes"], partitions=partitions)
    captured_set = frozenset(captured_names)
    changes = records.topic(names["changes"])
    conflicts = records.topic(names["conflicts"])
    dlq_normalise = records.topic(names["dlq_normalise"])
    dlq_transform = records.topic(names["dlq_transform"])
    apply_in = {system: raw_topic(names[f"apply_{system}"], partitions=partitions) for system in topology.sources}
    apply_out = {system: records.topic(names[f"apply_{system}"]) for system in topology.sources}
    ops = WorkerOperations(app, topology, settings, raw_topic)  # sync modes, notifications, schedules
    # the audit agent (unless it runs in its own worker); the hooks below record audit facts
    audit = register_audit(app, topology, settings, agent=audit_agent)

    # values are the state's own orjson bytes (faust's json codec was a large part of the cost)
    aggregates = app.Table("aggregates", default=None, partitions=partitions, key_type=bytes, value_type=bytes)
    # its changelog records wait until the records derived from the same events are in Kafka
    app.defer_changelog(aggregates)
    read_aggregate = raw_reader(aggregates)
    codec = ChangeEventCodec()

    async def captured_change(event: faust.EventT) -> Change | None:
        """Decode and normalise a captured event; None for a bad one (dead-lettered)."""
        message = event.message
        try:
            change = normalise(codec.decode(message.value or b""))
        except Exception as exc:  # noqa: BLE001 - bad input goes to the dead letters
            metrics.DEAD_LETTERS.labels("normalise", type(exc).__name__).inc()
            where = {"topic": message.topic, "offset": message.offset}
            await dlq_normalise.send(value=dead_letter("normalise", f"cannot decode: {exc}", None, **where))
            await audit.dead_letter("normalise", f"cannot decode: {exc}", origin=f"{message.topic}@{message.offset}")
            return None
        metrics.child(metrics.NORMALISED, change.system, change.table).inc()
        return change

    async def transformed(key_bytes: bytes, change: Change) -> None:
        """Keep the aggregate's rows, run the topology's flows, emit apply commands."""
        key = key_bytes.decode()
        started = time.perf_counter()
        # the table holds the state's JSON bytes (what its changelog carries), so a state restored
        # from Kafka after a restart or rebalance is the same as one kept in memory
        stored = read_aggregate(key_bytes)
        state = AggregateState.from_json(stored) if stored else new_state()
        if not apply_change(state, change) and not is_replay_of_latest(state, change):
            metrics.child(metrics.DEDUPE_HITS, duplicate_kind(state, change)).inc()  # seen again, or older
            return
        try:
            result = transform(topology, state, change)
        except Exception as exc:  # noqa: BLE001 - a broken flow must not stop the pipeline
            metrics.DEAD_LETTERS.labels("transform", type(exc).__name__).inc()
            await dlq_transform.send(
                key=key_bytes,
                value=dead_letter(
                    "transform",
                    f"{type(exc).__name__}: {exc}",
                    replayable(change, state).to_json(),
                    topic=names["changes"],
                    event_id=change.event_id,
                ),
            )
            aggregates[key_bytes] = kept(state.to_json())
            await audit.transformed(key, change, state, None, f"{type(exc).__name__}: {exc}")
            return
        aggregates[key_bytes] = kept(state.to_json())
        for cmd in result.commands:
            metrics.child(metrics.TRANSFORMED, cmd.flow).inc()
            await ops.topic_for(cmd, apply_out).send(key=cmd.aggregate_key.encode(), value=cmd.to_json())
        await send_conflicts(conflicts, result.conflicts)
        for reason, rejected in result.rejected:
            metrics.DEAD_LETTERS.labels("transform", "rejected").inc()
            await dlq_transform.send(
                key=key_bytes,
                value=dead_letter(
                    "transform",
                    reason,
                    replayable(rejected, state).to_json(),
                    topic=names["changes"],
                    event_id=rejected.event_id,
                ),
            )
        await ops.after_transform(result)  # notifications, release markers
        await audit.transformed(key, change, state, result)  # audit: change, rules fired, conflicts
        # no wait for the acks here: the worker's records are delivered before Faust commits
        # offsets (processors/record_producer.py), so a change's offset is committed only after
        # its commands are in Kafka (at least once)
        metrics.TRANSFORM_LATENCY.observe(time.perf_counter() - started)

    @app.agent(inputs, name="transform")
    async def transform_agent(stream: faust.StreamT) -> None:
        """Captured events: decode and normalise; then, like the changes of the changes topic,
        drop duplicates and transform them in their aggregate's state. A captured event that is not
        in its aggregate's partition (a capture without routing) is re-keyed through the changes
        topic first: an aggregate's state lives in one partition."""
        async for event in stream.events():
            message = event.message
            if message.topic in captured_set:
                change = await captured_change(event)
                if change is None:
                    continue
                target = aggregate_key_of(topology, change)
                if target is None:
                    continue
                key_bytes = aggregate_message_key(*target)
                if aggregate_partition(key_bytes, partitions) != message.partition:
                    await changes.send(key=key_bytes, value=change.to_json())
                    continue
                await transformed(key_bytes, change)
            else:
                await transformed(event.key, Change.from_json(event.value))

    dlq_apply = records.topic(names["dlq_apply"])
    for system in topology.sources:
        _register_applier(
            app, topology, settings, system, apply_in[system], conflicts, dlq_apply, batch_size, applier_cls, changes
        )
    return app


def _register_applier(
    app: faust.App,
    topology: Topology,
    settings: Settings,
    system: str,
    topic: faust.TopicT,
    conflicts: OutputTopic,
    dlq_apply: OutputTopic,
    batch_size: int,
    applier_cls: Any,
    changes: OutputTopic,
) -> None:
    from connectors.applier import echo_changes
    from processors.transform import aggregate_key_of

    runner = ApplyRunner(topology, settings, system, applier_cls=applier_cls)
    # how long a batch waits for more commands before it is applied (a full batch goes at once)
    within = env_int("ARCHSYNC_APPLY_WITHIN_MS", 50, minimum=1) / 1000

    async def open_applier() -> None:
        try:
            await runner.open()
        except Exception:  # the first batch retries and reports it
            log.exception("the %s applier could not start yet", system)

    async def apply_agent(stream: faust.StreamT) -> None:
        # the applier process and its connection start now, beside the stream (not before it: the
        # agent reads its partitions from the start), so the first batch does not wait for them
        opening = asyncio.ensure_future(open_applier())
        async for values in stream.take(batch_size, within=within):
            if not opening.done():
                await opening
            commands = [ApplyCommand.from_json(v) for v in values]
            started = time.perf_counter()
            result, origin = await runner.apply_until_done(values)
            log.debug(
                "batch applied",
                extra={"system": system, "commands": len(commands), "seconds": round(time.perf_counter() - started, 4)},
            )
            metrics.APPLY_LATENCY.labels(system).observe(time.perf_counter() - started)
            if result.isolated:
                metrics.APPLY_ISOLATED.labels(system).inc()
            now_ms = time.time() * 1000
            for cmd in commands:
                if cmd.source_commit_ts_ms:
                    metrics.child(metrics.END_TO_END, system).observe(
                        max(0.0, (now_ms - cmd.source_commit_ts_ms) / 1000)
                    )
            observe_flow_latency(system, commands)
            for outcome in ("applied", "skipped_replay", "skipped_older"):
                n = getattr(result, outcome, 0)
                if n:
                    metrics.child(metrics.APPLIED, system, outcome).inc(n)
            await send_conflicts(conflicts, result.conflicts)
            for cmd, reason in result.failed:
                metrics.DEAD_LETTERS.labels("apply", "failed").inc()
                await dlq_apply.send(
                    key=cmd.aggregate_key.encode(),
                    value=dead_letter(
                        "apply", reason, cmd.to_json(), topic=topic.get_topic_name(), command_id=cmd.command_id
                    ),
                )
            await hooks_for(app).applied(system, commands, result)  # audit: each command's outcome
            # rows of echo commands go back in as changes of this system (its flows see them);
            # sent before the batch's offsets are committed; after a crash the replayed commands are
            # skipped by their guards but still echo the row (op r), so no echo is lost
            for change in echo_changes(result, system, origin):
                target = aggregate_key_of(topology, change)
                if target is not None:
                    await changes.send(key=aggregate_message_key(*target), value=change.to_json())

    app.agent(topic, name=f"apply_{system}")(apply_agent)


def quiet_garbage_collector() -> None:
    """Fewer collections of the worker's short-lived objects (each record makes dicts, events,
    futures; none in reference cycles that need collecting soon), and the objects made at start
    (modules, topology, app) moved out of the collector's sight. Measured on a 3,000-form burst
    (gc.callbacks timing the collections): 0.54 s of 15.2 s of worker CPU in 452 collections with
    Python's thresholds (700, 10, 10); 0.016 s in 1 with these."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


def run_worker(topology: Topology, settings: Settings, loglevel: str = "warn", role: str = "all") -> None:
    """Run the pipeline until stopped (``archsync worker``). ``role``: ``all`` (every agent),
    ``pipeline`` (all but the audit agent) or ``audit`` (the audit agent alone)."""
    if role not in WORKER_ROLES:
        raise ValueError(f"unknown worker role {role!r} (expected one of {', '.join(WORKER_ROLES)})")
    fetch_tuning()  # tuning settings checked before the worker starts (a clear error, not a crash)
    recovery_stall_seconds()
    store_url()
    memory_budget()
    ensure_pipeline_topics(topology, settings)
    if role == "audit":
        app = create_audit_app(topology, settings)
    else:
        app = create_app(topology, settings, audit_agent=role == "all")
    # The event loop and the apply threads both do many short I/O waits; with the default 5 ms
    # GIL switch interval a thread coming back from I/O waits for the other one's whole slice
    # (the convoy effect), which cost more than the work itself.
    sys.setswitchinterval(float(os.environ.get("ARCHSYNC_SWITCH_INTERVAL", "0.0005")))
    quiet_garbage_collector()
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        if getattr(app, "agent_crash", None) is not None:
            sys.exit(EXIT_AGENT_CRASHED)
