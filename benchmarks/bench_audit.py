"""Benchmark: ``archsync audit verify`` over a log of at least 1M events, on the real broker.

    .venv/bin/python benchmarks/bench_audit.py [--events 1000000] [--chains 20000] [--partitions 3]

Builds synthetic audit records with the real chaining code (captured-change events of realistic
size spread over ``--chains`` aggregate chains), produces them into a fresh compacted topic, then
runs the verify of ``archsync audit verify`` (same code: read from the beginning, check every
hash and link) and reports events/s. Results go to benchmarks/results/audit.json. Target:
verify >= 50,000 events/s.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer
from tqdm import tqdm

from archsync.settings import load_settings
from connectors.audit_log import verify_topic
from connectors.kafka_admin import TopicSpec, delete_topics, ensure_topics
from processors import audit
from processors.audit_agent import AUDIT_TOPIC_CONFIG, fact_partition

RESULTS = Path(__file__).resolve().parent / "results" / "audit.json"


def synthetic_fact(n: int, chain: int) -> dict[str, Any]:
    after = {"id": chain, "status": "APPROVED", "amount": f"{n % 100000}.{n % 100:02d}", "row_version": n}
    return audit.fact(
        "change_captured",
        f"form:{chain}",
        1_767_225_600_000 + n,
        audit.audit_id("change_captured", f"oa:{n:016x}:1"),
        system="oa",
        source_event_id=f"oa:{n:016x}:1",
        table="public.oa_form",
        op="u",
        row_key=audit.canonical_json({"id": chain}),
        changed=["amount", "row_version", "status"],
        values=audit.canonical_json(after),
        before_digest=audit.digest({"n": n - 1}),
        after_digest=audit.digest(after),
        source_lsn=0x1000000 + n * 64,
        source_order=1,
    )


def build(topic: str, events: int, chains: int, partitions: int, bootstrap: str) -> float:
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "compression.type": "lz4",
            "queue.buffering.max.messages": 500_000,
        }
    )
    states: dict[int, audit.ChainState] = {}
    started = time.perf_counter()
    for n in tqdm(range(events), unit="ev", unit_scale=True, desc="build+produce", mininterval=1):
        chain = n % chains
        state = states.setdefault(chain, audit.ChainState())
        record, data, _ = audit.append_encoded(state, synthetic_fact(n, chain), window=1)
        while True:
            try:
                producer.produce(
                    topic, data, record["audit_id"].encode(), partition=fact_partition(f"form:{chain}", partitions)
                )
                break
            except BufferError:
                producer.poll(0.05)
        if n % 10000 == 0:
            producer.poll(0)
    assert producer.flush(120) == 0
    return time.perf_counter() - started


def verify(topic: str, settings: Any, jobs: int) -> tuple[float, audit.ChainVerifier]:
    started = time.perf_counter()
    v = verify_topic(settings, topic, None, jobs)
    return time.perf_counter() - started, v


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--chains", type=int, default=20_000)
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--jobs", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args(argv)
    settings = load_settings()
    topic = f"bench.audit.{uuid.uuid4().hex[:8]}"
    ensure_topics(settings.kafka_bootstrap, [TopicSpec(topic, args.partitions, 1, AUDIT_TOPIC_CONFIG)])
    try:
        build_s = build(topic, args.events, args.chains, args.partitions, settings.kafka_bootstrap)
        rounds: dict[int, list[float]] = {}
        for _ in range(args.rounds):
            for jobs in args.jobs:
                elapsed, v = verify(topic, settings, jobs)
                assert v.intact and v.records == args.events, (v.records, [str(b) for b in v.breaks[:3]])
                rounds.setdefault(jobs, []).append(elapsed)
                print(f"jobs={jobs} ", end="")
                print(f"verify: {v.records:,} events, {len(v.chains):,} chains in {elapsed:.1f} s "
                  f"= {v.records / elapsed:,.0f} events/s")  # fmt: skip
    finally:
        delete_topics(settings.kafka_bootstrap, [topic])
    result = {
        "benchmark": "audit verify",
        "events": args.events,
        "chains": args.chains,
        "partitions": args.partitions,
        "verify_seconds_all": {f"jobs={j}": [round(r, 2) for r in rs] for j, rs in rounds.items()},
        "verify_events_per_s": {f"jobs={j}": round(args.events / min(rs)) for j, rs in rounds.items()},
        "target_events_per_s": 50_000,
        "build_and_produce_events_per_s": round(args.events / build_s),
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}",
        "note": (
            "verify = archsync audit verify's reader and checks (read the compacted topic from the beginning, "
            "sha256 of every record's stored bytes, chain links), jobs = partitions verified in parallel processes; "
            "build = synthetic change facts + the audit agent's chaining and Avro encoding + produce (one process). "
            "Shared 2-core machine: rounds vary."
        ),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
