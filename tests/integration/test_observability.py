"""Observability on the real services: /metrics of a capture and a worker move with work, the real
Prometheus scrapes them and loads the alert rules, every dashboard query returns data,
`archsync status` tells healthy from unhealthy.

One pipeline for the module (captures in this process, serving /metrics on a free port; the worker
a child process with --metrics-port), registered with the local Prometheus of
`scripts/services.sh` through a file_sd targets file labelled with the test's unique id.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer
from prometheus_client.parser import text_string_to_metric_families

from archsync.cli import cli
from archsync.dashboards import Prometheus, has_data, load_dashboard, panel_queries, substitute
from archsync.metrics import serve_metrics
from archsync.observability import ENV_LAG_INTERVAL, start_capture_observer, worker_group_id
from archsync.settings import Settings
from processors.app import READY_LINE, captured_topics
from schemas.codec import ChangeEventCodec

from .pipeline_kit import REPO, Pipeline
from .test_pipeline import approve, item_of, new_form

PROMETHEUS_URL = os.environ.get("ARCHSYNC_PROMETHEUS_URL", "http://127.0.0.1:9090")
STATE_DIR = Path(os.environ.get("ARCHSYNC_STATE_DIR", Path.home() / ".local" / "state" / "archsync"))
TARGETS_DIR = STATE_DIR / "prometheus" / "targets"
RULES = REPO / "deploy" / "prometheus"

# Dashboard queries allowed to return nothing after a short run, and why (every other query must draw data).
ALLOWED_EMPTY = {
    "Conflicts by table and decision": "conflicts need both systems to change one aggregate at the same time",
    "Capture errors and apply retries": "only when a capture or an applier loses its database or broker",
    "Reconciliation drift": "set by a reconciliation run in a scraped process, and only when it finds drift",
    "Time since last reconciliation": "no reconciliation ran in a scraped process during the test",
    "Reconciliation runs by result": "no reconciliation ran in a scraped process during the test",
    "Held and released commands by flow": "the reference flows are real-time: nothing is held",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    """Sum of a sample's values over the series matching ``labels``."""
    return sum(v for (n, lab), v in samples.items() if n == name and all((k, v2) in lab for k, v2 in labels.items()))


def series(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> list[dict[str, str]]:
    return [dict(lab) for (n, lab) in samples if n == name]


def work_round(observed: Observed, n: str) -> None:
    """A form approved in OA is archived, filed, its code flows back; one bad record dead-lettered."""
    p, unique = observed.pipe, observed.unique
    form_no = f"OBS{n}-{unique}"
    form_id = new_form(p, form_no, f"O{unique}")
    approve(p, form_id)
    item = p.wait_for(lambda: item_of(p, form_no), 60, "the archive item")
    p.sql("archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (item["id"],))
    p.wait_for(
        lambda: p.sql("oa", "SELECT 1 FROM oa_form WHERE id = %s AND archive_status = 'FILED'", (form_id,)),
        60,
        "the write-back",
    )
    producer = Producer({"bootstrap.servers": p.settings.kafka_bootstrap})
    producer.produce(captured_topics(p.topology)[0], key=b"x", value=b"not an avro change event")
    producer.flush(10)


@dataclass
class Observed:
    pipe: Pipeline
    unique: str
    capture_port: int
    worker_port: int
    started: float


@pytest.fixture(scope="module")
def observed(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    prometheus = Prometheus(PROMETHEUS_URL)
    try:
        prometheus.query("1")
    except OSError as exc:
        pytest.fail(f"no Prometheus answers at {PROMETHEUS_URL} ({exc}); run `make services`")
    unique = uuid.uuid4().hex[:10]
    capture_port, worker_port = free_port(), free_port()
    pipe = Pipeline(settings, unique, tmp_path_factory.mktemp("observability"), metrics_port=worker_port)
    pipe.env[ENV_LAG_INTERVAL] = "1"
    serve_metrics(capture_port)  # the captures run in this process
    TARGETS_DIR.mkdir(parents=True, exist_ok=True)
    targets = TARGETS_DIR / f"test-{unique}.json"
    targets.write_text(
        json.dumps(
            [
                {"targets": [f"127.0.0.1:{capture_port}"], "labels": {"component": "capture", "test": unique}},
                {"targets": [f"127.0.0.1:{worker_port}"], "labels": {"component": "worker", "test": unique}},
            ]
        )
    )
    try:
        started = time.time()
        pipe.start()
        for svc in pipe.captures.values():
            start_capture_observer(svc, interval=0.5)
        pipe.wait_for(lambda: READY_LINE in pipe.log.read_text(errors="replace"), 120, "the worker to be ready")
        yield Observed(pipe, unique, capture_port, worker_port, started)
    finally:
        targets.unlink(missing_ok=True)
        pipe.cleanup()


def test_alert_rules_and_configs_load_and_pass_their_unit_tests() -> None:
    def promtool(*args: str, cwd: Path = RULES) -> str:
        run = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout + run.stderr

    assert "SUCCESS: 18 rules found" in promtool("check", "rules", "alerts.yml")
    promtool("check", "config", "prometheus.yml")  # the docker-compose one
    local = STATE_DIR / "prometheus" / "prometheus.yml"  # the one scripts/services.sh writes
    assert local.exists(), "run `make services` (scripts/services.sh up) to write the local Prometheus config"
    promtool("check", "config", str(local))
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_metrics_endpoints_serve_and_move_with_work(observed: Observed) -> None:
    p = observed.pipe
    group = worker_group_id(p.topology)
    worker0 = scrape(observed.worker_port)
    capture0 = scrape(observed.capture_port)
    # process health on both endpoints
    assert total(worker0, "archsync_process_up", role="worker") == 1
    assert total(capture0, "archsync_process_up", role="capture") == 1
    for samples, role in ((worker0, "worker"), (capture0, "capture")):
        assert total(samples, "archsync_process_start_time_seconds", role=role) > 0
        assert total(samples, "archsync_last_progress_timestamp_seconds", role=role) > 0
    # consumer lag per partition of the worker's group, every consumed topic
    p.wait_for(lambda: series(scrape(observed.worker_port), "archsync_consumer_lag"), 30, "consumer lag gauges")
    lag_series = [s for s in series(scrape(observed.worker_port), "archsync_consumer_lag") if s["group"] == group]
    assert {s["topic"] for s in lag_series} >= set(captured_topics(p.topology))
    assert {s["partition"] for s in lag_series} == {"0", "1"}
    assert {s["stage"] for s in series(worker0, "archsync_dlq_messages")} == {
        "capture",
        "normalise",
        "transform",
        "apply",
    }
    slots = {s.slot for s in p.topology.sources.values()}
    p.wait_for(
        lambda: slots <= {s["slot"] for s in series(scrape(observed.capture_port), "archsync_slot_lag_bytes")},
        30,
        "slot lag gauges",
    )
    assert total(capture0, "archsync_capture_active", source="oa") == 1

    work_round(observed, "1")

    def moved() -> dict[str, float]:
        w, c = scrape(observed.worker_port), scrape(observed.capture_port)
        return {
            "normalised": total(w, "archsync_normalised_events_total")
            - total(worker0, "archsync_normalised_events_total"),
            "transformed": total(w, "archsync_transform_commands_total")
            - total(worker0, "archsync_transform_commands_total"),
            "transform_latency": total(w, "archsync_transform_latency_seconds_count")
            - total(worker0, "archsync_transform_latency_seconds_count"),
            "applied_archive": total(w, "archsync_applied_commands_total", target="archive", outcome="applied")
            - total(worker0, "archsync_applied_commands_total", target="archive", outcome="applied"),
            "applied_oa": total(w, "archsync_applied_commands_total", target="oa", outcome="applied")
            - total(worker0, "archsync_applied_commands_total", target="oa", outcome="applied"),
            "apply_batches": total(w, "archsync_apply_batch_seconds_count")
            - total(worker0, "archsync_apply_batch_seconds_count"),
            "e2e": total(w, "archsync_end_to_end_latency_seconds_count")
            - total(worker0, "archsync_end_to_end_latency_seconds_count"),
            "flow_latency": total(w, "archsync_flow_latency_seconds_count")
            - total(worker0, "archsync_flow_latency_seconds_count"),
            "dead_letters": total(w, "archsync_dead_letters_total", stage="normalise")
            - total(worker0, "archsync_dead_letters_total", stage="normalise"),
            "dlq_waiting": total(w, "archsync_dlq_messages", stage="normalise"),
            "captured_oa": total(c, "archsync_captured_events_total", source="oa")
            - total(capture0, "archsync_captured_events_total", source="oa"),
            "captured_archive": total(c, "archsync_captured_events_total", source="archive")
            - total(capture0, "archsync_captured_events_total", source="archive"),
            "own_origin_skips": total(c, "archsync_own_origin_skipped_total")
            - total(capture0, "archsync_own_origin_skipped_total"),
            "produce_latency": total(c, "archsync_capture_produce_latency_seconds_count")
            - total(capture0, "archsync_capture_produce_latency_seconds_count"),
        }

    p.wait_for(lambda: all(v > 0 for v in moved().values()), 30, f"every metric to move: {moved()}")
    # the worker catches up: lag back to 0 on every partition, progress recent
    p.wait_for(
        lambda: total(scrape(observed.worker_port), "archsync_consumer_lag", group=group) == 0, 30, "lag to drain"
    )
    # the audit chains this worker holds (counted once, then kept up as they grow: every 10 s)
    p.wait_for(
        lambda: 0 < total(scrape(observed.worker_port), "archsync_audit_chains")
        < total(scrape(observed.worker_port), "archsync_audit_chain_length"),
        30,
        "the audit chain gauges",
    )
    w = scrape(observed.worker_port)
    assert total(w, "archsync_last_progress_timestamp_seconds", role="worker") > time.time() - 10
    assert series(w, "archsync_worker_rebalancing") and total(w, "archsync_worker_rebalancing") == 0  # ready
    print(f"moved with work: {moved()}")


def test_a_captured_event_sent_again_is_dropped_and_counted(observed: Observed) -> None:
    """At-least-once capture re-sends what Kafka had not acknowledged: the worker drops an event it
    has seen (its id is its source position, held in the aggregate's state) and counts it."""
    p = observed.pipe
    group = worker_group_id(p.topology)
    work_round(observed, "dup")
    p.wait_for(
        lambda: total(scrape(observed.worker_port), "archsync_consumer_lag", group=group) == 0, 30, "lag to drain"
    )
    topic = p.topology.topics.change_topic("oa", "public", "oa_form")
    consumer = Consumer(
        {
            "bootstrap.servers": p.settings.kafka_bootstrap,
            "group.id": f"dup-{observed.unique}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    codec = ChangeEventCodec()
    last = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is None and last is not None:
            break
        if msg is None or msg.error() is not None:
            continue
        try:
            codec.decode(msg.value())  # not the bad record work_round() sends to this topic
        except Exception:  # noqa: BLE001 - not a change event
            continue
        last = msg
    consumer.close()
    assert last is not None, f"no captured record on {topic}"
    before = scrape(observed.worker_port)
    producer = Producer({"bootstrap.servers": p.settings.kafka_bootstrap})
    producer.produce(topic, key=last.key(), value=last.value(), partition=last.partition())  # the same event again
    producer.flush(10)

    def hits(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], stage: str) -> float:
        return total(samples, "archsync_dedupe_hits_total", stage=stage)

    p.wait_for(
        lambda: hits(scrape(observed.worker_port), "event_id") >= hits(before, "event_id") + 1,
        30,
        "the duplicate to be counted",
    )
    after = scrape(observed.worker_port)
    assert hits(after, "position") == hits(before, "position")
    for outcome in ("applied", "skipped_replay", "skipped_older"):  # nothing was sent to an applier
        assert total(after, "archsync_applied_commands_total", outcome=outcome) == total(
            before, "archsync_applied_commands_total", outcome=outcome
        )
    assert total(after, "archsync_transform_commands_total") == total(before, "archsync_transform_commands_total")


def test_prometheus_scrapes_targets_and_every_dashboard_query_returns_data(observed: Observed) -> None:
    prometheus = Prometheus(PROMETHEUS_URL)
    unique = observed.unique
    p = observed.pipe

    def up() -> list[str]:
        return [r["metric"]["component"] for r in prometheus.query(f'up{{job="archsync", test="{unique}"}} == 1')]

    p.wait_for(lambda: sorted(up()) == ["capture", "worker"], 60, "Prometheus to scrape both targets")
    # a second round of work once Prometheus holds the first one's counters: the rates move
    p.wait_for(
        lambda: prometheus.query(f'archsync_dead_letters_total{{test="{unique}", stage="normalise"}} > 0'),
        30,
        "Prometheus to scrape the metrics after the first work",
    )
    work_round(observed, "2")
    p.wait_for(
        lambda: (
            prometheus.query(f'rate(archsync_applied_commands_total{{test="{unique}"}}[30s]) > 0')
            and prometheus.query(f'increase(archsync_dead_letters_total{{test="{unique}"}}[30s]) > 0')
        ),
        60,
        "Prometheus to see the second round",
    )
    time.sleep(12)  # two more scrapes: the rates over the last steps of the range have two samples
    # the alert rules are loaded
    names = {r["name"] for g in prometheus._get("/api/v1/rules")["groups"] for r in g["rules"]}
    assert {
        "ArchsyncCaptureDown",
        "ArchsyncSlotLagGrowing",
        "ArchsyncConsumerLagGrowing",
        "ArchsyncDeadLettersPresent",
        "ArchsyncApplyErrors",
        "ArchsyncEndToEndLatencyHigh",
        "ArchsyncFixityViolation",
        "ArchsyncReconcileDrift",
    } <= names
    # every panel's query draws data over the run (rare-event panels listed in ALLOWED_EMPTY)
    queries = list(panel_queries(load_dashboard()))
    assert len(queries) >= 30
    empty, allowed_with_data = [], set()
    for q in queries:
        result = prometheus.query_range(substitute(q.expr), observed.started, time.time(), step=5)
        allowed = q.panel in ALLOWED_EMPTY or f"{q.panel} [{q.ref_id}]" in ALLOWED_EMPTY
        if not has_data(result) and not allowed:
            empty.append(f"{q.panel} [{q.ref_id}]: {q.expr}")
        elif allowed and has_data(result):
            allowed_with_data.add(q.panel)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    print(
        f"{len(queries)} dashboard queries checked, {len(ALLOWED_EMPTY)} panels allowed empty "
        f"({len(allowed_with_data)} of them had data: {sorted(allowed_with_data)})"
    )


def test_status_screen_and_health_check(observed: Observed) -> None:
    p = observed.pipe
    runner = CliRunner()
    args = ["--topology", str(p.file), "status"]
    ok = runner.invoke(cli, args)
    assert ok.exit_code == 0, ok.output
    for text in (p.topology.source("oa").slot, "active", worker_group_id(p.topology), "WORKERS (1 in", "HEALTHY"):
        assert text in ok.output
    assert "RECONCILIATION" in ok.output
    # the dead letter injected earlier waits: unhealthy only when asked
    strict = runner.invoke(cli, [*args, "--fail-on-dead-letters"])
    assert strict.exit_code == 1 and "dead letter(s) not re-driven" in strict.output, strict.output
    lagging = runner.invoke(cli, [*args, "--max-slot-lag-bytes", "-1"])
    assert lagging.exit_code == 1 and "slot lag" in lagging.output, lagging.output
    no_broker = runner.invoke(cli, args, env={"ARCHSYNC_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert no_broker.exit_code == 1 and "kafka:" in no_broker.output, no_broker.output
    # captures stopped: their slots go inactive, the status says so (last: it ends the captures)
    for svc in p.captures.values():
        svc.stop()
    for th in p.threads:
        th.join(30)
    down = runner.invoke(cli, args)
    assert down.exit_code == 1 and "inactive (capture down)" in down.output, down.output
    print(down.output)
