"""Kafka I/O of the audit log: produce facts (CLI, fixity), read the log and the chain heads."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from archsync.errors import ConfigError
from archsync.settings import Settings
from connectors.kafka_admin import ensure_topics


@dataclass(frozen=True)
class LogRecord:
    """One record of the audit topic as stored."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None  # None: a tombstone


def produce_facts(settings: Settings, topology: Any, facts: Iterable[Mapping[str, Any]]) -> int:
    """Produce facts to ``<prefix>.audit.facts`` (created when missing), one message per aggregate,
    partitioned like the worker's (murmur2 of the aggregate); waits for the acks."""
    from processors.audit_agent import audit_topic_specs, audit_topics, fact_partition, group_facts

    specs = audit_topic_specs(topology)
    if not specs:
        return 0  # the audit is switched off in the topology
    ensure_topics(settings.kafka_bootstrap, specs)
    topic = audit_topics(topology)["facts"]
    errors: list[Any] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "on_delivery": delivered,
        }
    )
    count = 0
    for aggregate, items in group_facts(facts).items():
        producer.produce(
            topic,
            orjson.dumps(items),
            aggregate.encode(),
            partition=fact_partition(aggregate, topology.topics.partitions),
        )
        count += len(items)
    if producer.flush(30) or errors:
        raise ConfigError("audit", f"the broker did not acknowledge the audit facts on {topic}: {errors[:1]}")
    return count


def _consumer(settings: Settings) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"archsync-audit-reader-{time.time_ns()}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
        }
    )


def end_offsets(settings: Settings, topic: str) -> dict[int, tuple[int, int]]:
    """Partition → (low, high) watermarks of ``topic``; ConfigError when it does not exist."""
    consumer = _consumer(settings)
    try:
        meta = consumer.list_topics(topic, timeout=10)
        info = meta.topics.get(topic)
        if info is None or info.error is not None or not info.partitions:
            raise ConfigError("audit", f"topic {topic} does not exist (is the audit enabled and the worker run?)")
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10) for p in sorted(info.partitions)
        }
    except KafkaException as exc:
        raise ConfigError("audit", f"cannot read {topic}: {exc.args[0]}") from None
    finally:
        consumer.close()


def read_messages(
    settings: Settings, topic: str, partitions: Iterable[int] | None = None, batch: int = 5000
) -> Iterator[list[Any]]:
    """Batches of confluent-kafka messages of ``topic`` (or of some of its ``partitions``) from the
    beginning up to the end as of the call; each partition in offset order."""
    marks = end_offsets(settings, topic)
    wanted = set(marks) if partitions is None else set(partitions) & set(marks)
    remaining = {p: marks[p][1] for p in wanted if marks[p][1] > marks[p][0]}
    if not remaining:
        return
    consumer = _consumer(settings)
    try:
        consumer.assign([TopicPartition(topic, p, marks[p][0]) for p in remaining])
        idle = time.monotonic()
        while remaining:
            msgs = consumer.consume(batch, 1.0)
            if not msgs:
                if time.monotonic() - idle > 30:
                    raise ConfigError("audit", f"{topic}: no records for 30 s before the end offsets were reached")
                continue
            idle = time.monotonic()
            out = []
            for msg in msgs:
                if msg.error():
                    continue
                p, off = msg.partition(), msg.offset()
                if p is None or off is None:
                    continue
                end = remaining.get(p)
                if end is None:
                    continue
                if off < end:
                    out.append(msg)
                if off >= end - 1:
                    del remaining[p]
            if out:
                yield out
            # a compacted partition may end below its high watermark (the last offsets removed)
            for p in list(remaining):
                pos = consumer.position([TopicPartition(topic, p)])[0].offset
                if pos >= remaining[p]:
                    del remaining[p]
    finally:
        consumer.close()


def read_log(settings: Settings, topic: str, partitions: Iterable[int] | None = None) -> Iterator[LogRecord]:
    """Every record of ``topic`` from the beginning up to the end as of the call (each partition
    in offset order, partitions interleaved as fetched)."""
    for msgs in read_messages(settings, topic, partitions):
        for m in msgs:
            yield LogRecord(m.topic(), m.partition(), m.offset(), m.key(), m.value())


def read_heads(settings: Settings, changelog_topic: str) -> dict[str, tuple[int, str]]:
    """The chain heads the audit agent recorded (the last value per aggregate of its table's
    changelog): aggregate → (seq, hash). Empty when the changelog does not exist."""
    heads: dict[str, tuple[int, str]] = {}
    try:
        records = list(read_log(settings, changelog_topic))
    except ConfigError:
        return heads
    for r in records:
        if r.key is None:
            continue
        aggregate = orjson.loads(r.key)
        if r.value is None:
            heads.pop(str(aggregate), None)
            continue
        value = orjson.loads(r.value)
        if isinstance(value, dict) and "seq" in value:
            heads[str(aggregate)] = (int(value["seq"]), str(value["hash"]))
    return heads


# ------------------------------------------------------------------------------ verify

_COUNTER: Any = None


def _init_worker(counter: Any) -> None:
    global _COUNTER
    _COUNTER = counter


def _count(n: int) -> None:
    with _COUNTER.get_lock():
        _COUNTER.value += n


def verify_partitions(
    settings: Settings, topic: str, partitions: list[int], key: bytes | None, progress: Any = None
) -> Any:
    """A ChainVerifier fed with every record of some partitions of ``topic``."""
    from processors.audit import ChainVerifier

    v = ChainVerifier(key)
    feed, tomb = v.feed_raw, v.tombstone
    for msgs in read_messages(settings, topic, partitions):
        for m in msgs:
            k = m.key()
            ks = k.decode("utf-8", "replace") if k is not None else None
            value = m.value()
            if value is None:
                tomb(topic, m.partition(), m.offset(), ks or "?")
            else:
                feed(topic, m.partition(), m.offset(), value, ks)
        if progress is not None:
            progress(len(msgs))
    return v


def _verify_job(args: tuple[Settings, str, list[int], bytes | None]) -> Any:
    v = verify_partitions(*args, progress=_count)
    v.compact()  # only the chain ends travel back
    return v


def verify_topic(settings: Settings, topic: str, key: bytes | None, jobs: int = 1, progress: Any = None) -> Any:
    """Verify every chain of ``topic``; with ``jobs`` > 1 the partitions are verified in parallel
    processes (a chain lives in one partition) and the results merged. ``progress(n)`` is called
    with the number of records read since the last call."""
    import multiprocessing

    from processors.audit import ChainVerifier

    parts = sorted(end_offsets(settings, topic))
    jobs = max(1, min(jobs, len(parts)))
    if jobs == 1:
        return verify_partitions(settings, topic, parts, key, progress)
    from concurrent.futures import ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    groups = [parts[i::jobs] for i in range(jobs)]
    merged = ChainVerifier(key)
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool:
        futures = [pool.submit(_verify_job, (settings, topic, g, key)) for g in groups]
        seen = 0
        while True:
            _done, pending = wait(futures, timeout=0.5)
            if progress is not None:
                now = counter.value
                progress(now - seen)
                seen = now
            if not pending:
                break
        for f in futures:
            merged.merge(f.result())
    return merged
