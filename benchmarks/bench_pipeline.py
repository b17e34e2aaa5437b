"""End-to-end pipeline benchmark: OA commit → archive commit latency at a steady rate, and the
highest sustained rate, on the full pipeline (both captures, dedupe, transform, apply both ways).

Workload unit: one OA form lifecycle = 4 row changes (form insert, attachment, approval record,
status → APPROVED), which the pipeline turns into an archive item and its file.

1. steady: ``BENCH_RATE`` row changes/s (default 1,000) for ``BENCH_SECONDS`` (default 30);
   latency per form = arc_item.created_at − the OA approval's commit (both on this machine's clock).
2. capacity: ``BENCH_BURST`` forms (default 5,000) written at once; the rate at which the
   pipeline drains them is the highest sustained rate (beyond it lag grows).
Peak RSS of the worker process from /proc. Results: benchmarks/results/pipeline.json.
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

from archsync.logs import configure_logging
from archsync.settings import load_settings
from tests.integration.pipeline_kit import Pipeline

RESULTS = Path(__file__).resolve().parent / "results"
CHANGES_PER_FORM = 4


def progress(msg: str) -> None:
    print(f"[bench pipeline] {msg}", file=sys.stderr, flush=True)


def write_forms(p: Pipeline, tag: str, start: int, count: int) -> None:
    """``count`` form lifecycles in two transactions (submit with attachment and trail; approve)."""
    nos = [f"B-{tag}-{i:07d}" for i in range(start, start + count)]
    p.sql(
        "oa",
        "WITH f AS (INSERT INTO oa_form (form_no, form_type, status, amount, fonds_code, title, fiscal_year,"
        " fiscal_month) SELECT n, 'EXPENSE', 'SUBMITTED', 100.25, %s, 'bench', 2026, 11 FROM unnest(%s::text[]) n"
        " RETURNING id, form_no), a AS (INSERT INTO oa_attachment (form_id, kind, file_name, size_bytes, sha256)"
        " SELECT id, 'EINVOICE_XML', 'inv.xml', 64, encode(sha256(form_no::bytea), 'hex') FROM f)"
        " INSERT INTO oa_approval_record (form_id, approver, node, action) SELECT id, 'bench', 'x', 'APPROVE' FROM f",
        (f"BF{tag[:4]}", nos),
    )
    p.sql(
        "oa", "UPDATE oa_form SET status = 'APPROVED', approved_at = clock_timestamp() WHERE form_no = ANY(%s)", (nos,)
    )


def items_done(p: Pipeline, tag: str) -> int:
    return int(p.sql("archive", "SELECT count(*) FROM arc_item WHERE source_ref LIKE %s", (f"B-{tag}-%",))[0][0])


def rss_peak(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc; 0 when unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def main() -> dict[str, object]:
    configure_logging("WARNING")
    rate = int(os.environ.get("BENCH_RATE", "1000"))
    seconds = float(os.environ.get("BENCH_SECONDS", "30"))
    burst = int(os.environ.get("BENCH_BURST", "5000"))
    settings = load_settings()
    unique = uuid.uuid4().hex[:8]
    p = Pipeline(settings, unique, Path(tempfile.mkdtemp()))
    tag = unique
    result: dict[str, object] = {}
    try:
        progress("starting captures and a worker")
        p.start()
        from processors.app import READY_LINE

        p.wait_for(lambda: READY_LINE in p.log.read_text(errors="replace"), 120, "worker ready")
        forms_per_tick = max(1, rate // CHANGES_PER_FORM // 10)
        progress(f"steady phase: {rate} row changes/s ({forms_per_tick} forms every 100 ms) for {seconds:.0f} s")
        written = 0
        stop_at = time.monotonic() + seconds
        next_tick = time.monotonic()
        while time.monotonic() < stop_at:
            write_forms(p, tag, written, forms_per_tick)
            written += forms_per_tick
            next_tick += 0.1
            time.sleep(max(0.0, next_tick - time.monotonic()))
        actual_rate = written * CHANGES_PER_FORM / seconds
        p.wait_for(lambda: items_done(p, tag) >= written, 300, "the steady phase to drain")
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

        progress(f"steady: p50 {pct(50)} ms, p95 {pct(95)} ms, p99 {pct(99)} ms over {len(latencies)} forms")
        assert p.worker is not None
        progress(f"capacity phase: {burst} forms ({burst * CHANGES_PER_FORM} row changes) at once")
        base = items_done(p, tag)
        burst_tag_start = written
        worker_cpu0, own_cpu0 = cpu_seconds(p.worker.pid), cpu_seconds(os.getpid())
        started = time.monotonic()
        chunk = 500
        for i in range(0, burst, chunk):
            write_forms(p, tag, burst_tag_start + i, min(chunk, burst - i))
        done_writing = time.monotonic() - started
        last = time.monotonic()
        while items_done(p, tag) < base + burst:
            if time.monotonic() - last > 5:
                last = time.monotonic()
                progress(f"... {items_done(p, tag) - base}/{burst} applied")
            if time.monotonic() - started > 600:
                raise RuntimeError("the capacity phase did not drain within 10 minutes")
            time.sleep(0.2)
        drain = time.monotonic() - started
        worker_cpu = cpu_seconds(p.worker.pid) - worker_cpu0
        capture_cpu = cpu_seconds(os.getpid()) - own_cpu0  # both captures run in this process
        capacity = burst * CHANGES_PER_FORM / drain
        progress(f"capacity: {capacity:,.0f} row changes/s (written in {done_writing:.1f} s, drained in {drain:.1f} s)")
        progress(f"CPU: worker {worker_cpu:.1f} s, captures + writer {capture_cpu:.1f} s")
        worker_rss = rss_peak(p.worker.pid)
        result = {
            "benchmark": "pipeline",
            "steady_target_rate": rate,
            "steady_actual_rate": round(actual_rate),
            "steady_forms": len(latencies),
            "latency_ms": {"p50": pct(50), "p95": pct(95), "p99": pct(99), "max": round(latencies[-1] * 1000, 1)},
            "capacity_row_changes_per_second": round(capacity),
            "capacity_forms": burst,
            "capacity_drain_seconds": round(drain, 2),
            "worker_peak_rss_mib": round(worker_rss / 2**20, 1),
            # CPU per row change: what bounds the rate on a machine whose cores are all busy
            "worker_cpu_ms_per_row_change": round(worker_cpu * 1000 / (burst * CHANGES_PER_FORM), 3),
            "capture_cpu_ms_per_row_change": round(capture_cpu * 1000 / (burst * CHANGES_PER_FORM), 3),
            "note": "row change = OA row change that flows; each form also produces 2 archive writes",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return result
    finally:
        p.cleanup()
        p.sql("oa", "DELETE FROM oa_form WHERE form_no LIKE %s", (f"B-{tag}-%",))
        p.sql("archive", "DELETE FROM arc_file WHERE item_id IN (SELECT id FROM arc_item WHERE source_ref LIKE %s)",
              (f"B-{tag}-%",))
        p.sql("archive", "DELETE FROM arc_item WHERE source_ref LIKE %s", (f"B-{tag}-%",))


if __name__ == "__main__":
    main()
