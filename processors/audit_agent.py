"""The audit agent: chains audit facts per aggregate into the compacted audit log.

Topics (``<prefix>`` from the topology):
  ``<prefix>.audit.facts``  audit facts (JSON list of facts), in their aggregates' partition, keyed by
                            the aggregate (or ``@partition:<n>`` when a message holds several)
  ``<prefix>.audit``        the audit log: Avro audit_event.v1 records keyed by audit id,
                            ``cleanup.policy=compact``, no time or size retention
  ``<prefix>.dlq.audit``    facts that could not be chained (malformed), with the reason

The agents of processors/app.py call :class:`AuditHooks` (one line each); the CLI produces admin
and fixity facts with :func:`connectors.audit_log.produce_facts`. Every producer partitions a
fact by the murmur2 hash of its aggregate (:func:`fact_partition`, Kafka's default partitioner),
so one aggregate's facts meet in one partition of the facts topic and one audit agent instance
chains them. The agent writes each record to the SAME partition number of the audit topic: a
chain lives in one partition, in order.

State: the changelog-backed table ``audit_chains`` (aggregate → last seq, last hash, the last
ids with their seq/prev_hash) survives restarts and rebalances; a redelivered fact re-produces
its identical record (see processors/audit.py). With ``audit: {enabled: false}`` in the topology
nothing is registered and the hooks do nothing.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import faust
import orjson

from archsync import metrics
from connectors.kafka_admin import TopicSpec
from processors import audit
from processors.model import ApplyCommand, Change, kept
from processors.record_producer import WorkerApp
from processors.state_store import raw_reader
from topology.audit_config import audit_config
from topology.flows import aggregate_partition
from topology.model import Topology

log = logging.getLogger(__name__)

AUDIT_TOPIC_CONFIG = {"cleanup.policy": "compact", "retention.ms": "-1", "retention.bytes": "-1"}
SCHEMA_HEADER = ("schema", b"audit_event.v1")
CHAINS_TABLE = "audit_chains"
FACTS_BUFFER = 1000  # facts gathered before they are sent (also sent every FACTS_FLUSH_SECONDS)
FACTS_FLUSH_SECONDS = 0.05


def audit_topics(topology: Topology) -> dict[str, str]:
    prefix = topology.topics.prefix
    return {"facts": f"{prefix}.audit.facts", "audit": f"{prefix}.audit", "dlq_audit": f"{prefix}.dlq.audit"}


def audit_topic_specs(topology: Topology) -> list[TopicSpec]:
    """The audit topics to create (none when the audit is switched off)."""
    if not audit_config(topology).enabled:
        return []
    names = audit_topics(topology)
    t = topology.topics
    return [
        TopicSpec(names["facts"], t.partitions, t.replication_factor),
        TopicSpec(names["audit"], t.partitions, t.replication_factor, AUDIT_TOPIC_CONFIG),
        TopicSpec(names["dlq_audit"], 1, t.replication_factor),
    ]


def chains_changelog_topic(topology: Topology, app_id: str | None = None) -> str:
    """The changelog topic of the agent's chain table (the heads ``audit verify`` checks against)."""
    return f"{app_id or default_app_id(topology)}-{CHAINS_TABLE}-changelog"


def default_app_id(topology: Topology) -> str:
    return f"archsync-{topology.name}-{topology.topics.prefix}"


# the partition of an aggregate's facts: its changes' partition (Kafka's default, murmur2, partitioner)
fact_partition = aggregate_partition


def group_facts(facts: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for f in facts:
        grouped[str(f["aggregate"])].append(f)
    return grouped


def group_by_partition(
    facts: Iterable[Mapping[str, Any]], partitions: int
) -> dict[int, tuple[bytes, list[Mapping[str, Any]]]]:
    """Facts grouped by their aggregate's partition: partition → (message key, facts in order).
    The key is the aggregate when the message holds one aggregate, else ``@partition:<n>``."""
    grouped: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for f in facts:
        grouped[fact_partition(str(f["aggregate"]), partitions)].append(f)
    out: dict[int, tuple[bytes, list[Mapping[str, Any]]]] = {}
    for p, items in grouped.items():
        aggregates = {str(f["aggregate"]) for f in items}
        key = next(iter(aggregates)) if len(aggregates) == 1 else f"@partition:{p}"
        out[p] = (key.encode(), items)
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


MAX_FACTS_MESSAGE_BYTES = 512 * 1024


def facts_messages(
    facts: Iterable[Mapping[str, Any]], partitions: int, max_bytes: int = MAX_FACTS_MESSAGE_BYTES
) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) messages for ``facts``: one per facts partition, split when the JSON
    list would pass ``max_bytes`` (the key — the aggregate, or ``@partition:<n>`` — fits every
    part); each aggregate's facts stay in order."""
    out: list[tuple[int, bytes, bytes]] = []
    for partition, (key, items) in group_by_partition(facts, partitions).items():
        chunk: list[bytes] = []
        size = 0
        for item in items:
            data = orjson.dumps(item)
            if chunk and size + len(data) > max_bytes:
                out.append((partition, key, b"[" + b",".join(chunk) + b"]"))
                chunk, size = [], 0
            chunk.append(data)
            size += len(data) + 1
        if chunk:
            out.append((partition, key, b"[" + b",".join(chunk) + b"]"))
    return out


class AuditHooks:
    """What the pipeline agents call to record audit facts (no-ops when the audit is off).

    With ``buffer_facts`` the facts are gathered and sent as one message per facts partition when
    that many are waiting, on the worker's 50 ms timer and before every offset commit (see
    :class:`processors.record_producer.WorkerApp`): a few messages where a message per change was
    the audit's largest cost. Without, each :meth:`emit` sends at once.
    """

    def __init__(self, topology: Topology, facts_topic: Any, *, buffer_facts: int = 0) -> None:
        self.topology = topology
        self.topic = facts_topic
        self.partitions = topology.topics.partitions
        self.buffer_facts = buffer_facts
        self._pending: list[Mapping[str, Any]] = []

    @property
    def enabled(self) -> bool:
        return self.topic is not None

    async def emit(self, facts: Iterable[Mapping[str, Any]]) -> None:
        """One message per facts partition (all of an aggregate's facts land in its partition, in
        order): an apply batch touching hundreds of aggregates sends a handful of messages."""
        if self.topic is None:
            return
        if self.buffer_facts:
            self._pending.extend(facts)
            if len(self._pending) >= self.buffer_facts:
                await self.flush()
            return
        await self._send(facts)

    async def flush(self) -> None:
        """Send the gathered facts."""
        if self._pending:
            pending, self._pending = self._pending, []
            await self._send(pending)

    async def _send(self, facts: Iterable[Mapping[str, Any]]) -> None:
        assert self.topic is not None
        for partition, key, value in facts_messages(facts, self.partitions):
            await self.topic.send(key=key, value=value, partition=partition)

    async def dead_letter(
        self, stage: str, reason: str, *, origin: str, aggregate: str | None = None, **fields: Any
    ) -> None:
        """A record went to a dead-letter topic."""
        if self.topic is None:
            return
        await self.emit(
            [audit.dead_letter_fact(aggregate or f"dlq:{stage}", stage, reason, _now_ms(), origin=origin, **fields)]
        )

    async def transformed(
        self, aggregate: str, change: Change, state: Any, result: Any, error: str | None = None
    ) -> None:
        """A change was applied to its aggregate's state (and transformed, unless ``error``)."""
        if self.topic is None:
            return
        await self.emit(transform_facts(aggregate, change, state, result, error))

    async def applied(self, system: str, commands: list[ApplyCommand], result: Any) -> None:
        """An apply batch ran: one fact per command with its outcome, conflicts, failures."""
        if self.topic is None:
            return
        await self.emit(apply_facts(commands, result, _now_ms()))


def transform_facts(
    aggregate: str, change: Change, state: Any, result: Any, error: str | None = None
) -> list[dict[str, Any]]:
    """The facts of one transformed change (pure): the captured change, the rules that fired,
    conflicts and dead letters."""
    after = None
    if change.op != "d":
        after = state.rows.get(change.table, {}).get(audit.canonical_json(dict(change.key or {})))
        if after is None:
            after = change.after
    facts = [audit.change_fact(aggregate, change, state.previous, after)]
    where = {"source_event_id": change.event_id, "table": change.table, "system": "transform"}
    if error is not None:
        facts.append(
            audit.dead_letter_fact(
                aggregate, "transform", error, change.commit_ts_ms or 0, origin=change.event_id, **where
            )
        )
        return facts
    by_flow: dict[str, list[ApplyCommand]] = defaultdict(list)
    for cmd in result.commands:
        by_flow[cmd.flow].append(cmd)
    facts += [audit.rule_fact(aggregate, change, flow, cmds) for flow, cmds in by_flow.items()]
    facts += [audit.conflict_fact(aggregate, c, "transform") for c in result.conflicts]
    for reason, rejected in result.rejected:
        facts.append(
            audit.dead_letter_fact(
                aggregate, "transform", reason, change.commit_ts_ms or 0, origin=rejected.event_id, **where
            )
        )
    return facts


def apply_facts(commands: list[ApplyCommand], result: Any, now_ms: int) -> list[dict[str, Any]]:
    """The facts of one apply batch (pure)."""
    reasons = {cmd.command_id: reason for cmd, reason in result.failed}
    outcomes = getattr(result, "outcomes", None)
    if not outcomes:  # an applier without per-command outcomes: failed or done
        outcomes = [(cmd, "failed" if cmd.command_id in reasons else "done") for cmd in commands]
    facts = [audit.command_fact(cmd, outcome, now_ms, reasons.get(cmd.command_id)) for cmd, outcome in outcomes]
    for cmd, reason in result.failed:
        facts.append(
            audit.dead_letter_fact(
                cmd.aggregate_key,
                "apply",
                reason,
                now_ms,
                origin=cmd.command_id,
                command_id=cmd.command_id,
                table=cmd.table,
                source_event_id=cmd.source_event_id,
                system="apply",
            )
        )
    by_event = {(cmd.source_event_id, cmd.table.split(".")[-1]): cmd for cmd in commands}
    by_event.update({(cmd.source_event_id, cmd.table): cmd for cmd in commands})
    for conflict in result.conflicts:
        cmd = by_event.get((conflict.source_event_id, conflict.table))
        aggregate = cmd.aggregate_key if cmd is not None else f"conflicts:{conflict.table}"
        facts.append(audit.conflict_fact(aggregate, conflict, "apply", cmd.command_id if cmd else None))
    return facts


class ChainGauges:
    """``archsync_audit_chains`` / ``archsync_audit_chain_length`` (the chains this worker holds and
    their events) without reading every chain head each time: the heads are counted when this
    worker's partitions change (start, rebalance), then the counts follow the appends. Reading
    every head every 30 s stalled the event loop and held them all in memory at once (measured
    with 2 KB heads: 0.47 s and +191 MiB at 27,000 chains, 4.4 s and +1.4 GiB at 200,000)."""

    def __init__(self) -> None:
        self.chains = 0
        self.length = 0
        self._assignment: frozenset[int] | None = None

    def appended(self, *, new_chain: bool, records: int) -> None:
        self.chains += new_chain
        self.length += records

    def publish(self, assignment: frozenset[int], heads: Callable[[], Iterable[bytes | None]]) -> None:
        """Set the gauges; count the ``heads`` first when ``assignment`` (partitions) changed."""
        if assignment != self._assignment:
            self._assignment = assignment
            self.chains = self.length = 0
            for head in heads():
                if head:
                    self.appended(new_chain=True, records=int(orjson.loads(head).get("seq", 0)))
        metrics.AUDIT_CHAINS.set(self.chains)
        metrics.AUDIT_CHAIN_LENGTH.set(self.length)


def register_audit(app: faust.App, topology: Topology, settings: Any, *, agent: bool = True) -> AuditHooks:
    """Register the audit agent (and its chain table) on the app; return the hooks for the agents.
    With ``agent=False`` only the hooks (facts are chained by a separate ``--role audit`` worker)."""
    cfg = audit_config(topology)
    if not cfg.enabled:
        hooks = AuditHooks(topology, None)
        app._archsync_audit = hooks  # type: ignore[attr-defined]
        return hooks
    names = audit_topics(topology)
    partitions = topology.topics.partitions
    facts_topic = app.topic(names["facts"], key_serializer="raw", value_serializer="raw", partitions=partitions)
    log_topic: Any = app.topic(names["audit"], key_serializer="raw", value_serializer="raw", partitions=partitions)
    facts_out: Any = facts_topic
    hooks = AuditHooks(topology, facts_topic)
    if isinstance(app, WorkerApp):  # the worker's records (facts, audit log) go by librdkafka
        records = app.record_producer(settings.kafka_bootstrap)
        facts_out, log_topic = records.topic(names["facts"]), records.topic(names["audit"])
        hooks = AuditHooks(topology, facts_out, buffer_facts=FACTS_BUFFER)
        app.before_commit(hooks.flush)
        app.timer(FACTS_FLUSH_SECONDS)(hooks.flush)
    app._archsync_audit = hooks  # type: ignore[attr-defined]
    if not agent:
        return hooks
    dlq = app.topic(names["dlq_audit"], key_serializer="raw", value_serializer="raw")
    # keys are the aggregate as a JSON string and values the chain state's JSON, as faust's json
    # codec wrote them (``audit verify`` reads the heads from the changelog), but encoded by orjson
    chains = app.Table(CHAINS_TABLE, default=None, partitions=partitions, key_type=bytes, value_type=bytes)
    # one changelog name whichever worker runs the agent (`audit verify` reads the heads from it)
    chains._changelog_topic_name = lambda: chains_changelog_topic(topology)  # type: ignore[method-assign]
    if isinstance(app, WorkerApp):  # a chain head is never ahead of the audit records it chains
        app.defer_changelog(chains)
    read_chain = raw_reader(chains)
    key = audit.audit_key()
    gauges = ChainGauges()

    @app.agent(facts_topic, name="audit")
    async def audit_agent(stream: faust.StreamT) -> None:
        """Chain each fact onto its aggregate's chain; write the record to the audit log."""
        async for event in stream.events():
            key_text = event.key.decode() if event.key else ""
            partition = event.message.partition
            try:
                items = orjson.loads(event.value)
                facts = [audit.check_fact(x) for x in (items if isinstance(items, list) else [items])]
                for f in facts:
                    if not key_text.startswith("@partition:") and f["aggregate"] != key_text:
                        raise audit.AuditError(f"fact of {f['aggregate']!r} keyed as {key_text!r}")
                    if fact_partition(str(f["aggregate"]), partitions) != partition:
                        raise audit.AuditError(f"fact of {f['aggregate']!r} in partition {partition} (not its own)")
            except Exception as exc:  # noqa: BLE001 - a malformed fact must not stop the audit
                metrics.DEAD_LETTERS.labels("audit", type(exc).__name__).inc()
                await dlq.send(
                    key=event.key,
                    value=orjson.dumps(
                        {
                            "stage": "audit",
                            "reason": f"{type(exc).__name__}: {exc}",
                            "ts_ms": _now_ms(),
                            "original": bytes(event.value or b"").decode("utf-8", "replace"),
                            "topic": event.message.topic,
                            "offset": event.message.offset,
                        }
                    ),
                )
                continue
            for aggregate, aggregate_facts in group_facts(facts).items():  # each aggregate's in order
                table_key = kept(orjson.dumps(aggregate))
                stored = read_chain(table_key)
                state = audit.ChainState.from_dict(orjson.loads(stored) if stored else None)
                seq = state.seq
                for one in aggregate_facts:
                    record, data, replayed = audit.append_encoded(state, one, key)
                    await log_topic.send(
                        key=record["audit_id"].encode(), value=data, partition=partition, headers=[SCHEMA_HEADER]
                    )
                    if not replayed:
                        metrics.child(metrics.AUDIT_EVENTS, record["kind"]).inc()
                chains[table_key] = kept(orjson.dumps(state.to_dict()))
                gauges.appended(new_chain=not stored, records=state.seq - seq)

    @app.timer(10.0)
    async def audit_gauges() -> None:
        if app.rebalancing or getattr(app, "in_recovery", False):
            return  # the table is not complete yet: count it once it is
        assignment = frozenset(tp.partition for tp in app.assignor.assigned_actives() if tp.topic == names["facts"])
        gauges.publish(assignment, chains.values)

    if cfg.fixity_interval_seconds > 0:

        @app.timer(cfg.fixity_interval_seconds, on_leader=True)
        async def fixity_job() -> None:
            import asyncio

            from processors.fixity import run_fixity

            loop = asyncio.get_running_loop()
            try:
                report = await loop.run_in_executor(None, run_fixity, topology, settings)
            except Exception:
                log.exception("fixity run failed")
                return
            await AuditHooks(topology, facts_out).emit(report.facts)

    return hooks


def hooks_for(app: faust.App) -> AuditHooks:
    """The audit hooks registered on ``app`` by :func:`register_audit`."""
    hooks = getattr(app, "_archsync_audit", None)
    if hooks is None:
        raise RuntimeError("register_audit() was not called for this app")
    return hooks
