"""End-to-end pipeline benchmark: OA commit → archive commit latency at a steady rate, and the
highest sustained rate, on the full pipeline (both captures, dedupe, transform, apply both ways).

Workload unit: one OA form lifecycle = 4 row changes (form insert, attachment, approval record,
status → APPROVED), which the pipeline turns into an archive item and its file.

1. steady: ``BENCH_RATE`` row changes/s (default 1,000) for ``BENCH_SECONDS`` (default 30);
   latency per form = arc_item.created_at − the OA approval's commit (both on this machine's clock).
2. capacity: ``BENCH_BURST`` forms (default 5,000) written at once; the rate at which the
   pipeline drains them is the highest sustained rate (beyond it lag grows).
3. the capacity phase again with the audit agent in a worker of its own (``--role audit``), and
   with the audit switched off: the audit's cost on throughput, measured in the same run; and with
   two workers sharing the partitions (``BENCH_TWO_WORKERS=0`` skips it). The modes take turns for
   ``BENCH_REPEAT`` rounds (default 3) and the cost is averaged over the rounds (this VM's speed
   drifts by ±30% within minutes).
4. sweep: steady phases of ``BENCH_SWEEP_SECONDS`` (default 20) at each of ``BENCH_SWEEP_RATES``
   (default 200,400,600,800,900,1000,1100,1200,1300 row changes/s; audit in the worker, a fresh
   pipeline each): the latency percentiles per rate and the highest rate whose p99 stays under
   500 ms.
Peak RSS of the worker process and CPU seconds per row change from /proc; the PSS of the worker
with its child processes (shared library pages counted once) after the first burst. Each phase
also records the machine's steal time (/proc/stat): the share of the CPU the hypervisor gave to
other guests, which makes this VM's runs differ by up to 2x with the same code.
Results: benchmarks/results/pipeline.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import yaml

from archsync.logs import configure_logging
from archsync.settings import load_settings
from benchmarks.cpu_budget import CpuBudget, ceiling, find_process, machine_ticks, parent_of
from connectors.postgres import connect
from tests.integration.pipeline_kit import REPO, Pipeline, worker_children

RESULTS = Path(__file__).resolve().parent / "results"
CHANGES_PER_FORM = 4


def progress(msg: str) -> None:
    print(f"[bench pipeline] {msg}", file=sys.stderr, flush=True)


def write_forms(p: Pipeline, tag: str, start: int, count: int) -> None:
    """``count`` form lifecycles in two transactions (submit with attachment and trail; approve).
    Each block of 9,000 forms has a fonds of its own: item numbers have four digits per
    fonds/class/year (more would be refused by the archive, rightly). The fonds carries the whole
    run tag: with only its first 4 hex digits, a run shared the numbering of an earlier run with
    the same digits (their numbers are never given back) and ran past 9,999 (seen twice in 28 runs)."""
    nos = [f"B-{tag}-{i:07d}" for i in range(start, start + count)]
    oa = p.session("oa")  # the OA application's connection (one, kept: not one per statement)
    oa.execute(
        "WITH f AS (INSERT INTO oa_form (form_no, form_type, status, amount, fonds_code, title, fiscal_year,"
        " fiscal_month) SELECT n, 'EXPENSE', 'SUBMITTED', 100.25, %s, 'bench', 2026, 11 FROM unnest(%s::text[]) n"
        " RETURNING id, form_no), a AS (INSERT INTO oa_attachment (form_id, kind, file_name, size_bytes, sha256)"
        " SELECT id, 'EINVOICE_XML', 'inv.xml', 64, encode(sha256(form_no::bytea), 'hex') FROM f)"
        " INSERT INTO oa_approval_record (form_id, approver, node, action) SELECT id, 'bench', 'x', 'APPROVE' FROM f",
        (f"BF{tag}-{start // 9000}", nos),
    )
    oa.execute(
        "UPDATE oa_form SET status = 'APPROVED', approved_at = clock_timestamp() WHERE form_no = ANY(%s)", (nos,)
    )


def items_done(p: Pipeline, tag: str) -> int:
    """Archive items of the run so far (polled 5 times a second: on a kept connection)."""
    row = p.session("archive").execute("SELECT count(*) FROM arc_item WHERE source_ref LIKE %s", (f"B-{tag}-%",))
    return int(row.fetchone()[0])


def rss_peak(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def pss_now(pid: int) -> int:
    """A process's proportional set size in bytes (0 when unknown): its private pages plus its
    share of the pages it shares, such as the libraries the worker and its applier processes all
    map (RSS counts those in full in each of them)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def steal_percent(before: list[int], after: list[int]) -> float:
    """The share of the machine's time its hypervisor gave to other guests between two
    :func:`machine_ticks` (this VM's speed changes with it: the same code ran at half speed with 50%)."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta)
    return round(100 * delta[7] / total, 1) if total > 0 else 0.0


AUDIT_MODES = ("in-worker", "separate", "off")
TWO_WORKERS = "in-worker, two workers"


def start_pipeline(settings: Any, unique: str, audit: str, workers: int | None = None) -> Pipeline:
    """Both captures and ``workers`` workers (``BENCH_WORKERS``, 1) on the reference topology,
    ready. ``audit``: the audit agent in the worker, in a worker of its own (``--role audit``), or
    switched off."""
    tmp = Path(tempfile.mkdtemp())
    base = None
    if audit == "off":
        data = yaml.safe_load((REPO / "topology" / "reference.yaml").read_text())
        data["audit"] = {**(data.get("audit") or {}), "enabled": False}
        base = tmp / "no_audit.yaml"
        base.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    p = Pipeline(settings, unique, tmp, base=base)
    if audit == "separate":
        p.worker_role = "pipeline"
    p.start()
    if audit == "separate":
        p.start_audit_worker()
    from processors.app import READY_LINE

    p.wait_for(lambda: READY_LINE in p.log.read_text(errors="replace"), 120, "worker ready")
    if workers is None:
        workers = int(os.environ.get("BENCH_WORKERS", "1"))
    for _ in range(workers - 1):  # more workers in the group share the partitions
        p.start_worker(extra=True)
    # each worker says so at the end of each rebalance: the first one once per worker joining
    p.wait_for(lambda: p.log.read_text(errors="replace").count(READY_LINE) >= 2 * workers - 1, 120, "workers ready")
    return p


def steady_phase(p: Pipeline, tag: str, rate: int, seconds: float) -> dict[str, object]:
    """``rate`` row changes/s for ``seconds``: OA approval → archive item latency percentiles."""
    forms_per_tick = rate / CHANGES_PER_FORM / 10  # a fraction is carried to the next tick
    progress(f"steady phase: {rate} row changes/s ({forms_per_tick:g} forms every 100 ms) for {seconds:.0f} s")
    written = 0
    owed = 0.0
    # CPU per row change by process: at a steady rate batches are small and cost more per row than
    # in a burst; a client that connects per statement shows here (2026-12-02: the writer did)
    budget = CpuBudget(cpu_groups(p))
    budget.start()
    machine0 = machine_ticks()
    stop_at = time.monotonic() + seconds
    next_tick = time.monotonic()
    while time.monotonic() < stop_at:
        owed += forms_per_tick
        due = int(owed)
        if due:
            write_forms(p, tag, written, due)
            written += due
            owed -= due
        next_tick += 0.1
        time.sleep(max(0.0, next_tick - time.monotonic()))
    actual_rate = written * CHANGES_PER_FORM / seconds
    p.wait_for(lambda: items_done(p, tag) >= written, 600, "the steady phase to drain")
    steal = steal_percent(machine0, machine_ticks())
    per_row = budget.stop(written * CHANGES_PER_FORM)
    lat = [
        float(r[0])
        for r in p.sql(
            "archive",
            "SELECT extract(epoch FROM i.created_at) FROM arc_item i WHERE source_ref LIKE %s ORDER BY source_ref",
            (f"B-{tag}-%",),
        )
    ]
    appr = [
        float(r[0])
        for r in p.sql(
            "oa",
            "SELECT extract(epoch FROM approved_at) FROM oa_form WHERE form_no LIKE %s ORDER BY form_no",
            (f"B-{tag}-%",),
        )
    ]
    latencies = sorted(a - b for a, b in zip(lat, appr, strict=True))

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, round(q / 100 * (len(latencies) - 1)))] * 1000, 1)

    progress(
        f"steady: p50 {pct(50)} ms, p95 {pct(95)} ms, p99 {pct(99)} ms over {len(latencies)} forms (steal {steal}%)"
    )
    progress("CPU ms per row change: " + ", ".join(f"{k} {v}" for k, v in per_row.items()))
    return {
        "steady_target_rate": rate,
        "steady_actual_rate": round(actual_rate),
        "steady_forms": len(latencies),
        "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": round(latencies[-1] * 1000, 1)},
        "steal_percent": steal,
        "cpu_ms_per_row_change_by_process": per_row,
    }


# the machine's CPU by part of the pipeline (benchmarks/cpu_budget.py); the services' groups
SERVICE_GROUPS = ("kafka", "postgres_oa", "postgres_archive")
PIPELINE_GROUPS = ("workers", "appliers", "captures_and_writer", *SERVICE_GROUPS)


def cpu_groups(p: Pipeline) -> dict[str, tuple[int, ...]]:
    """The process groups of a running pipeline: the workers (the audit worker too), their applier processes, this
    process (both captures and the OA writer run here), the broker, each PostgreSQL cluster."""
    workers = tuple(w.pid for w in (p.worker, *p.extra_workers, p.audit_worker) if w is not None)
    groups = {
        "workers": workers,
        "appliers": tuple(c for pid in workers for c in worker_children(pid)),
        "captures_and_writer": (os.getpid(),),
    }
    broker = find_process("kafka.Kafka")
    if broker is not None:
        groups["kafka"] = (broker,)
    for system in ("oa", "archive"):
        source = p.topology.source(system)
        with connect(source.dsn(p.settings), source.dsn_env, autocommit=True) as conn:
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            postmaster = parent_of(int(row[0])) if row else None  # while the backend lives
        if postmaster is not None:
            groups[f"postgres_{system}"] = (postmaster,)
    return groups


def capacity_phase(p: Pipeline, tag: str, start: int, burst: int) -> dict[str, Any]:
    """``burst`` forms written at once; the rate at which the pipeline drains them."""
    assert p.worker is not None
    progress(f"capacity phase: {burst} forms ({burst * CHANGES_PER_FORM} row changes) at once")
    base = items_done(p, tag)
    budget = CpuBudget(cpu_groups(p))
    budget.start()
    machine0 = machine_ticks()
    started = time.monotonic()
    chunk = 500
    for i in range(0, burst, chunk):
        write_forms(p, tag, start + i, min(chunk, burst - i))
    done_writing = time.monotonic() - started
    last = time.monotonic()
    while items_done(p, tag) < base + burst:
        if time.monotonic() - last > 5:
            last = time.monotonic()
            progress(f"... {items_done(p, tag) - base}/{burst} applied")
        if time.monotonic() - started > 900:
            raise RuntimeError("the capacity phase did not drain within 15 minutes")
        time.sleep(0.2)
    drain = time.monotonic() - started
    capacity = burst * CHANGES_PER_FORM / drain
    steal = steal_percent(machine0, machine_ticks())
    per_row = budget.stop(burst * CHANGES_PER_FORM)
    progress(
        f"capacity: {capacity:,.0f} row changes/s (written in {done_writing:.1f} s, drained in {drain:.1f} s;"
        f" steal {steal}%)"
    )
    progress("CPU ms per row change: " + ", ".join(f"{k} {v}" for k, v in per_row.items()))
    return {
        "capacity": capacity,
        "drain": drain,
        # CPU per row change: what bounds the rate on a machine whose cores are all busy
        # the workers (the audit worker too, when apart) with their applier processes; both captures
        # and the OA writer (they run in this process)
        "worker_cpu_ms": per_row["workers"] + per_row["appliers"],
        "capture_cpu_ms": per_row["captures_and_writer"],
        "steal_percent": steal,
        "cpu_ms_per_row_change_by_process": per_row,
    }


P99_TARGET_MS = 500.0


def sweep(settings: Any) -> dict[str, object]:
    """Steady phases at rising rates (audit in the worker): where the latency target holds."""
    default = "200,400,600,800,900,1000,1100,1200,1300"  # past the cliff on a fast day (1,200/s on 12-03)
    rates = [int(r) for r in os.environ.get("BENCH_SWEEP_RATES", default).split(",") if r.strip()]
    seconds = float(os.environ.get("BENCH_SWEEP_SECONDS", "20"))
    by_rate: dict[str, object] = {}
    best = 0
    for rate in rates:
        unique = uuid.uuid4().hex[:8]
        progress(f"sweep: {rate} row changes/s for {seconds:.0f} s")
        p = start_pipeline(settings, unique, "in-worker")
        try:
            steady = steady_phase(p, unique, rate, seconds)
        finally:
            cleanup(p, unique)
        latency = steady["latency_ms"]
        assert isinstance(latency, dict)
        by_rate[str(rate)] = {
            "actual_rate": steady["steady_actual_rate"],
            **latency,
            "steal_percent": steady["steal_percent"],
            "cpu_ms_per_row_change_by_process": steady["cpu_ms_per_row_change_by_process"],
        }
        if latency["p99"] < P99_TARGET_MS:
            best = max(best, int(steady["steady_actual_rate"]))  # type: ignore[call-overload]
    return {"sweep_latency_ms_by_rate": by_rate, "highest_rate_with_p99_under_500ms": best}


def cleanup(p: Pipeline, tag: str) -> None:
    p.cleanup()
    p.sql("oa", "DELETE FROM oa_form WHERE form_no LIKE %s", (f"B-{tag}-%",))
    p.sql(
        "archive",
        "DELETE FROM arc_file WHERE item_id IN (SELECT id FROM arc_item WHERE source_ref LIKE %s)",
        (f"B-{tag}-%",),
    )
    p.sql("archive", "DELETE FROM arc_item WHERE source_ref LIKE %s", (f"B-{tag}-%",))
    p.sql("archive", "DELETE FROM arc_code_sequence WHERE fonds_code LIKE %s", (f"BF{tag}-%",))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def cpu_by_process(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """The rounds' CPU ms per row change by process group, averaged."""
    names = {k for r in rounds for k in r["cpu_ms_per_row_change_by_process"]}
    return {
        k: round(mean([r["cpu_ms_per_row_change_by_process"].get(k, 0.0) for r in rounds]), 3) for k in sorted(names)
    }


def main() -> dict[str, object]:
    configure_logging("WARNING")
    rate = int(os.environ.get("BENCH_RATE", "1000"))
    seconds = float(os.environ.get("BENCH_SECONDS", "30"))
    burst = int(os.environ.get("BENCH_BURST", "5000"))
    # the VM's speed drifts by ±30% within minutes: the modes take turns, BENCH_REPEAT rounds
    repeat = int(os.environ.get("BENCH_REPEAT", "3"))
    settings = load_settings()
    result: dict[str, object] = {"benchmark": "pipeline"}
    runs: dict[str, list[dict[str, Any]]] = {}
    worker_rss = 0
    apply_rss: list[int] = []
    tree_pss = 0
    modes = [m for m in os.environ.get("BENCH_AUDIT_MODES", ",".join(AUDIT_MODES)).split(",") if m in AUDIT_MODES]
    if "in-worker" not in modes:
        raise SystemExit("BENCH_AUDIT_MODES must include in-worker (the steady phase runs there)")
    # the default mode again with a second worker in the group (scaling out on the same two cores)
    if os.environ.get("BENCH_TWO_WORKERS", "1") != "0":
        modes.append(TWO_WORKERS)
    for round_no in range(repeat):
        for mode in modes:
            audit, workers = ("in-worker", 2) if mode == TWO_WORKERS else (mode, None)
            unique = uuid.uuid4().hex[:8]
            progress(f"round {round_no + 1}/{repeat}: starting captures and {workers or 1} worker(s) (audit: {audit})")
            p = start_pipeline(settings, unique, audit, workers)
            try:
                start = 0
                steady = mode == "in-worker" and round_no == 0
                if steady:
                    first = steady_phase(p, unique, rate, seconds)
                    first["steady_steal_percent"] = first.pop("steal_percent")
                    result.update(first)
                    start = int(result["steady_forms"])  # type: ignore[call-overload]
                runs.setdefault(mode, []).append(capacity_phase(p, unique, start, burst))
                if steady:
                    assert p.worker is not None
                    worker_rss = rss_peak(p.worker.pid)
                    children = worker_children(p.worker.pid)  # the applier processes, the resource tracker
                    apply_rss = [rss_peak(pid) for pid in children]
                    tree_pss = sum(pss_now(pid) for pid in [p.worker.pid, *children])
            finally:
                cleanup(p, unique)
    result.update(sweep(settings))
    if not set(AUDIT_MODES) <= runs.keys():  # a partial run (BENCH_AUDIT_MODES): print, keep the results file
        print(json.dumps({**result, "runs": runs, "worker_peak_rss_mib": round(worker_rss / 2**20, 1)}, indent=2))
        return result

    def avg(mode: str, field: str) -> float:
        return mean([r[field] for r in runs[mode]])

    def cost(mode: str) -> float:  # per round (the modes of a round ran minutes apart), then averaged
        return 100 * mean([1 - a["capacity"] / b["capacity"] for a, b in zip(runs[mode], runs["off"], strict=True)])

    result.update(
        {
            "rounds": repeat,
            "capacity_row_changes_per_second": round(avg("in-worker", "capacity")),
            "capacity_forms": burst,
            "capacity_drain_seconds": round(avg("in-worker", "drain"), 2),
            "capacity_without_audit_row_changes_per_second": round(avg("off", "capacity")),
            "audit_cost_percent": round(cost("in-worker"), 1),
            "capacity_audit_worker_apart_row_changes_per_second": round(avg("separate", "capacity")),
            "audit_cost_percent_audit_worker_apart": round(cost("separate"), 1),
            "capacity_per_round": {m: [round(r["capacity"]) for r in rs] for m, rs in runs.items()},
            # the default mode with two workers sharing the partitions (0 when BENCH_TWO_WORKERS=0)
            "capacity_two_workers_row_changes_per_second": round(avg(TWO_WORKERS, "capacity"))
            if TWO_WORKERS in runs
            else 0,
            # the hypervisor's share of the machine during each round: the runs' noise
            "steal_percent_per_round": {m: [r["steal_percent"] for r in rs] for m, rs in runs.items()},
            "worker_cpu_ms_per_row_change_audit_worker_apart": round(avg("separate", "worker_cpu_ms"), 3),
            "worker_cpu_ms_per_row_change": round(avg("in-worker", "worker_cpu_ms"), 3),
            "worker_cpu_ms_per_row_change_without_audit": round(avg("off", "worker_cpu_ms"), 3),
            "capture_cpu_ms_per_row_change": round(avg("in-worker", "capture_cpu_ms"), 3),
            # where the machine's CPU went per OA row change (each mode's rounds averaged), and the
            # rate its cores could carry at best: with this CPU per row change, with no idle time
            "cpu_ms_per_row_change_by_process": {m: cpu_by_process(rs) for m, rs in runs.items()},
            "ceiling_row_changes_per_second": {
                m: {
                    "whole_pipeline": ceiling(cpu_by_process(rs), PIPELINE_GROUPS),
                    "services_and_captures_alone": ceiling(
                        cpu_by_process(rs), (*SERVICE_GROUPS, "captures_and_writer")
                    ),
                }
                for m, rs in runs.items()
            },
            "worker_peak_rss_mib": round(worker_rss / 2**20, 1),
            "applier_processes_peak_rss_mib": [round(r / 2**20, 1) for r in apply_rss],
            # after the burst (PSS has no peak); the worker's RSS stays near its peak by then
            "worker_and_children_pss_mib": round(tree_pss / 2**20, 1),
            "note": "row change = OA row change that flows; each form also produces archive and OA write-backs;"
            " worker CPU includes its applier processes",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
