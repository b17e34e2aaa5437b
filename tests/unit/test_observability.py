"""Pure parts of the observability: lag arithmetic, health assessment, dashboard queries, lock keys."""

from __future__ import annotations

import re

from archsync.dashboards import has_data, load_dashboard, panel_queries, substitute
from archsync.observability import PartitionLag, worker_group_id
from archsync.status import SourceStatus, StatusReport, Thresholds, TopicStatus, assess
from topology.model import load_topology


def test_partition_lag_counts_from_the_committed_offset_or_the_retained_start() -> None:
    assert PartitionLag("t", 0, low=0, high=10, committed=7).lag == 3
    assert PartitionLag("t", 0, low=5, high=10, committed=None).lag == 5  # never committed: all retained
    assert PartitionLag("t", 0, low=8, high=10, committed=3).lag == 2  # committed before the retention start
    assert PartitionLag("t", 0, low=0, high=10, committed=10).lag == 0


def healthy_report() -> StatusReport:
    r = StatusReport("ref", "k:9092", "g")
    r.sources = [SourceStatus("oa", "db", slot="s_oa", slot_exists=True, active=True, lag_bytes=10)]
    r.topics = [TopicStatus("t", 2, 100, 5, False)]
    r.workers = [{"client_id": "w", "host": "h", "partitions": [("t", 0)]}]
    r.dead_letters = {"apply": 2}
    return r


def test_assess_names_each_unhealthy_condition() -> None:
    assert assess(healthy_report(), Thresholds()) == []
    r = healthy_report()
    r.sources[0].active = False
    r.sources[0].lag_bytes = 2 << 30
    r.workers = []
    problems = assess(r, Thresholds(max_consumer_lag=1, fail_on_dead_letters=True))
    assert any("inactive" in p for p in problems)
    assert any("slot lag" in p for p in problems)
    assert any("consumer lag 5 > 1" in p for p in problems)
    assert any("no worker" in p for p in problems)
    assert any("2 dead letter(s)" in p for p in problems)
    r = healthy_report()
    r.kafka_error = "no broker"
    r.sources.append(SourceStatus("archive", "db", error="cannot connect"))
    assert assess(r, Thresholds()) == ["source archive: cannot connect", "kafka: no broker"]


def exposed_names() -> set[str]:
    """Every sample name archsync/metrics.py's metrics can expose."""
    from prometheus_client import REGISTRY

    import archsync.metrics  # noqa: F401 - registers them

    names: set[str] = set()
    for family in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def test_dashboard_queries_use_defined_metrics_and_substitute_grafana_variables() -> None:
    queries = list(panel_queries(load_dashboard()))
    assert len(queries) >= 30
    known = exposed_names()
    unknown = set()
    for q in queries:
        expr = substitute(q.expr)
        assert "$" not in expr, expr
        unknown |= {n for n in re.findall(r"\b(archsync_[a-z_]+)", expr) if n not in known}
    assert not unknown, f"dashboard metrics not defined in archsync/metrics.py: {sorted(unknown)}"
    assert substitute("rate(x[$__rate_interval])", rate_interval="1m") == "rate(x[1m])"
    assert has_data([{"values": [[1, "NaN"], [2, "3"]]}])
    assert not has_data([{"values": [[1, "NaN"]]}, {"values": []}])


def test_worker_group_is_the_faust_app_id() -> None:
    from archsync.settings import Settings
    from processors.app import create_app

    topology = load_topology(None)
    assert create_app(topology, Settings()).conf.id == worker_group_id(topology)


def test_capture_lock_differs_per_slot() -> None:
    topology = load_topology(None)
    ids = {s.lock_id for s in topology.sources.values()}
    assert len(ids) == len(topology.sources)
    assert all(-(2**63) <= i < 2**63 for i in ids)
