"""Prometheus metrics of archsync processes (named by Prometheus conventions, base units)."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, remembered. prometheus-client looks a child up under a lock and
    checks the labels on every call (~2 µs); the worker counts several times per event. The label
    values here are few (tables, flows, kinds) and no child is ever removed."""
    key = (id(metric), values)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*values)
    return found


CAPTURED_EVENTS = Counter(
    "archsync_captured_events_total", "Row changes captured and produced to Kafka", ["source", "table", "op"]
)
CAPTURE_ERRORS = Counter("archsync_capture_errors_total", "Errors in the capture, by kind", ["source", "kind"])
OWN_ORIGIN_SKIPPED = Counter(
    "archsync_own_origin_skipped_total",
    "Transactions skipped because archsync's own applier wrote them",
    ["source", "origin"],
)
DEAD_LETTERS = Counter("archsync_dead_letters_total", "Records sent to a dead-letter topic", ["stage", "reason"])
SNAPSHOT_ROWS = Counter(
    "archsync_snapshot_rows_total", "Rows read by initial or added-table snapshots", ["source", "table"]
)
PRODUCE_LATENCY = Histogram(
    "archsync_capture_produce_latency_seconds",
    "From handing a transaction to the producer to the broker's ack",
    ["source"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "archsync_capture_batch_size",
    "Records produced per transaction batch",
    ["source"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 1000, 2500, 10000),
)
SLOT_LAG = Gauge(
    "archsync_slot_lag_bytes",
    "WAL bytes between the server's current position and the slot's confirmed flush",
    ["source", "slot"],
)
CONFIRMED_LSN = Gauge(
    "archsync_capture_confirmed_lsn",
    "Last WAL position confirmed to PostgreSQL (all before it is in Kafka)",
    ["source"],
)
CAPTURE_ACTIVE = Gauge(
    "archsync_capture_active", "1 when this process holds the source's capture lock and streams", ["source"]
)
PARTITION_STALLED = Gauge(
    "archsync_partition_stalled",
    "1 while an assigned partition has records waiting and the worker has read none for a while",
    ["topic", "partition"],
)
WORKER_REBALANCING = Gauge(
    "archsync_worker_rebalancing",
    "1 from the start of a rebalance until the worker's partitions are assigned and its tables recovered",
)
HEARTBEATS = Counter("archsync_heartbeats_total", "Heartbeats that went around the source", ["source"])


# -- worker (processors) --------------------------------------------------------------
NORMALISED = Counter("archsync_normalised_events_total", "Captured events normalised", ["system", "table"])
DEDUPE_HITS = Counter("archsync_dedupe_hits_total", "Duplicate events dropped", ["stage"])
TRANSFORMED = Counter("archsync_transform_commands_total", "Apply commands produced by flows", ["flow"])
TRANSFORM_LATENCY = Histogram(
    "archsync_transform_latency_seconds",
    "Time to transform one change",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
APPLIED = Counter("archsync_applied_commands_total", "Apply commands by outcome", ["target", "outcome"])
APPLY_LATENCY = Histogram(
    "archsync_apply_batch_seconds",
    "Time to apply one batch",
    ["target"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
END_TO_END = Histogram(
    "archsync_end_to_end_latency_seconds",
    "Source commit to target commit",
    ["target"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
APPLY_RETRIES = Counter(
    "archsync_apply_retries_total",
    "Apply batches tried again after a failure that passes (connection lost, database unreachable,"
    " deadlock, serialization failure, applier process died), by error type",
    ["target", "error"],
)
APPLY_RETRYING = Gauge(
    "archsync_apply_retrying",
    "1 while the applier of a target retries a batch it could not apply (the target database is"
    " unreachable or refuses the transaction); 0 once a batch went through",
    ["target"],
)
APPLY_ISOLATED = Counter(
    "archsync_apply_isolated_batches_total",
    "Apply batches re-run group by group because a command of theirs could not be applied",
    ["target"],
)
CONFLICTS = Counter("archsync_conflicts_total", "Conflicts recorded", ["table", "decision"])


# -- process health and lag (archsync/observability.py keeps them current) --------------
PROCESS_UP = Gauge("archsync_process_up", "1 while this archsync process runs", ["role"])
PROCESS_START = Gauge("archsync_process_start_time_seconds", "Unix time this archsync process started", ["role"])
LAST_PROGRESS = Gauge(
    "archsync_last_progress_timestamp_seconds",
    "Unix time of the process's last progress (capture: a confirmed position or heartbeat; "
    "worker: committed offsets moved, or nothing left to consume)",
    ["role"],
)
CONSUMER_LAG = Gauge(
    "archsync_consumer_lag",
    "Messages of a partition not yet committed by the consumer group (high watermark - committed offset)",
    ["group", "topic", "partition"],
)
DLQ_MESSAGES = Gauge(
    "archsync_dlq_messages", "Dead letters in a stage's dead-letter topic not re-driven yet", ["stage"]
)
LAG_POLL_ERRORS = Counter("archsync_lag_poll_errors_total", "Failed polls of the consumer lag and DLQ sizes")
FLOW_LATENCY = Histogram(
    "archsync_flow_latency_seconds",
    "Source commit to target commit, per flow",
    ["flow", "target"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


# -- reconciliation, sync modes, notifications ----------------------------------------------
RECONCILE_DRIFT = Gauge(
    "archsync_reconcile_drift_aggregates",
    "Aggregates whose target rows differ from what the source says, at the last reconciliation",
    ["source", "target"],
)
RECONCILE_LAST_RUN = Gauge(
    "archsync_reconcile_last_run_timestamp_seconds", "Unix time the last reconciliation finished"
)
RECONCILE_RUNS = Counter("archsync_reconcile_runs_total", "Reconciliation runs by result", ["result"])
NOTIFICATIONS = Counter("archsync_notifications_total", "Notifications raised", ["kind"])
HELD_COMMANDS = Counter("archsync_held_commands_total", "Apply commands held for a scheduled/triggered flow", ["flow"])
RELEASED_COMMANDS = Counter(
    "archsync_released_commands_total", "Held apply commands released to the apply topic", ["flow"]
)


# -- audit log (issue 5) ----------------------------------------------------------------
AUDIT_EVENTS = Counter("archsync_audit_events_total", "Audit events chained and written to the audit log", ["kind"])
AUDIT_CHAINS = Gauge("archsync_audit_chains", "Aggregate hash chains held by this worker")
AUDIT_CHAIN_LENGTH = Gauge("archsync_audit_chain_length", "Events in the hash chains held by this worker")
AUDIT_CHAIN_BREAKS = Counter("archsync_audit_chain_breaks_total", "Breaks found by audit verify (tampering, loss)")
FIXITY_CHECKED = Counter("archsync_fixity_checked_files_total", "Archived files re-hashed by the fixity check")
FIXITY_VIOLATIONS = Counter(
    "archsync_fixity_violations_total", "Archived files whose bytes no longer match their recorded sha256"
)


def serve_metrics(port: int) -> None:
    """Serve /metrics on ``port`` (0: do not serve)."""
    if port:
        start_http_server(port)
        log.info("metrics served", extra={"port": port})
