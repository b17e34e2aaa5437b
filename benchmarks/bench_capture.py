"""Capture throughput against the raw pgoutput ceiling, on the real services.

1. A fresh table and an archsync source over it; a first capture run creates the slot (empty
   snapshot) and stops. The slot is copied (``pg_copy_logical_replication_slot``) so the raw
   reader streams exactly the same WAL.
2. A mixed workload of N row changes (60% inserts, 30% updates, 10% deletes, ~1 KB rows).
3. Raw ceiling: ``pg_recvlogical`` streams the copy with pgoutput to /dev/null up to the end LSN.
4. archsync: ``archsync capture`` streams the original slot into Kafka; timed until the slot's
   confirmed position (only advanced after Kafka acknowledged everything) reaches the end LSN.
   Peak RSS of the capture process is read from /proc.

Writes benchmarks/results/capture.json and prints a summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from archsync.logs import configure_logging
from archsync.settings import load_settings
from connectors.catalog import drop_slot, forget_snapshots, list_slots
from connectors.kafka_admin import delete_topics
from connectors.postgres import connect
from topology.model import parse_topology

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def progress(msg: str) -> None:
    print(f"[bench capture] {msg}", file=sys.stderr, flush=True)


def pg_recvlogical() -> str:
    found = shutil.which("pg_recvlogical") or "/usr/lib/postgresql/15/bin/pg_recvlogical"
    return found


def main() -> dict[str, object]:
    configure_logging("WARNING")
    rows = int(os.environ.get("BENCH_ROWS", "1000000"))
    settings = load_settings()
    tag = f"bench{int(time.time())}"
    table, slot, raw_slot, pub = f"{tag}_rows", f"{tag}_slot", f"{tag}_raw", f"{tag}_pub"
    yaml = (
        f"version: 1\nname: bench\ntopics:\n  prefix: {tag}\n  partitions: 3\n"
        f"sources:\n  oa:\n    slot: {slot}\n    publication: {pub}\n    heartbeat_seconds: 5\n"
        f"    tables: [public.{table}]\n"
    )
    topo_file = Path(tempfile.mkdtemp()) / "bench.yaml"
    topo_file.write_text(yaml)
    topology = parse_topology(yaml)
    dsn = settings.oa_dsn
    env = {
        **os.environ,
        "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
        "ARCHSYNC_LOG_LEVEL": "WARNING",
    }
    prefix = os.environ.get("BENCH_CAPTURE_PREFIX", "").split()  # e.g. a profiler
    capture_cmd = [
        *prefix,
        str(REPO / ".venv" / "bin" / "archsync"),
        "--topology",
        str(topo_file),
        "capture",
        "--source",
        "oa",
    ]

    with connect(dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
        conn.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, v int NOT NULL, amount numeric(18,2),"
            " created_at timestamptz NOT NULL DEFAULT now(), status text, payload text)"
        )
    result: dict[str, object] = {}
    try:
        progress("creating the slot with a first capture run")
        proc = subprocess.Popen(capture_cmd, env=env)
        with connect(dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
            while not list_slots(conn, slot) or not list_slots(conn, slot)[0].active:
                time.sleep(0.2)
        proc.terminate()
        proc.wait(30)
        with connect(dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
            conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s)", (slot, raw_slot))
            progress(f"workload: {rows} row changes (60% insert, 30% update, 10% delete, ~1 KB rows)")
            inserts, updates, deletes = (
                int(rows * 0.6),
                int(rows * 0.3),
                rows - int(rows * 0.6) - int(rows * 0.3),
            )
            chunk = 1000
            started = time.monotonic()
            for start in range(0, inserts, chunk):
                end = min(start + chunk, inserts) - 1
                conn.execute(
                    f"INSERT INTO {table} (id, v, amount, status, payload) SELECT i, 0, i * 1.25, 'NEW',"
                    " repeat(md5(i::text), 28) FROM generate_series(%s::bigint, %s::bigint) i",
                    (start, end),
                )
            for start in range(0, updates, chunk):
                end = min(start + chunk, updates) - 1
                conn.execute(
                    f"UPDATE {table} SET v = v + 1, status = 'CHANGED' WHERE id BETWEEN %s AND %s",
                    (start, end),
                )
            for start in range(inserts - deletes, inserts, chunk):
                end = min(start + chunk, inserts) - 1
                conn.execute(f"DELETE FROM {table} WHERE id BETWEEN %s AND %s", (start, end))
            end_lsn = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]
            progress(f"workload written in {time.monotonic() - started:.1f} s, end LSN {end_lsn}")

        parts = urlsplit(dsn)
        progress("raw ceiling: pg_recvlogical to /dev/null")
        started = time.monotonic()
        subprocess.run(
            [
                pg_recvlogical(),
                "-h",
                parts.hostname or "127.0.0.1",
                "-p",
                str(parts.port or 5432),
                "-U",
                parts.username or "archsync",
                "-d",
                parts.path.strip("/"),
                "--slot",
                raw_slot,
                "--start",
                "-o",
                "proto_version=1",
                "-o",
                f"publication_names={pub}",
                "-E",
                end_lsn,
                "-f",
                "/dev/null",
                "--no-loop",
            ],
            env={**env, "PGPASSWORD": parts.password or ""},
            check=True,
        )
        raw_seconds = time.monotonic() - started
        progress(f"raw: {raw_seconds:.2f} s = {rows / raw_seconds:,.0f} rows/s")

        progress("archsync capture into Kafka")
        from connectors.pgoutput import str_to_lsn

        target = str_to_lsn(end_lsn)
        if os.environ.get("BENCH_PROFILE"):
            return profile_in_process(topology, settings, dsn, slot, target, rows)
        started = time.monotonic()
        proc = subprocess.Popen(capture_cmd, env=env)
        peak_rss = 0
        last_report = started
        with connect(dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
            while True:
                info = list_slots(conn, slot)[0]
                try:
                    status = Path(f"/proc/{proc.pid}/status").read_text()
                    peak_rss = max(
                        peak_rss,
                        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024,
                    )
                except (OSError, StopIteration):
                    pass
                if (info.confirmed_flush_lsn or 0) >= target:
                    break
                if proc.poll() is not None:
                    raise RuntimeError("capture exited during the benchmark")
                now = time.monotonic()
                if now - last_report > 5:
                    last_report = now
                    done = info.confirmed_flush_lsn or 0
                    progress(f"... confirmed {done:X} of {target:X}")
                time.sleep(0.05)
        archsync_seconds = time.monotonic() - started
        proc.terminate()
        proc.wait(30)
        progress(
            f"archsync: {archsync_seconds:.2f} s = {rows / archsync_seconds:,.0f} rows/s, "
            f"peak RSS {peak_rss / 2**20:.0f} MiB"
        )
        result = {
            "benchmark": "capture",
            "rows": rows,
            "mix": {"insert": inserts, "update": updates, "delete": deletes},
            "row_bytes_approx": 1000,
            "raw_pg_recvlogical_seconds": round(raw_seconds, 3),
            "raw_rows_per_second": round(rows / raw_seconds),
            "archsync_seconds_to_kafka_ack": round(archsync_seconds, 3),
            "archsync_rows_per_second": round(rows / archsync_seconds),
            "ratio_to_raw": round(raw_seconds / archsync_seconds, 3),
            "peak_rss_bytes": peak_rss,
            "peak_rss_mib": round(peak_rss / 2**20, 1),
            "note": "time includes process start-up; Kafka acks=all, idempotent, lz4, 3 partitions",
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "capture.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return result
    finally:
        with connect(dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
            for s in (slot, raw_slot):
                with contextlib.suppress(Exception):
                    drop_slot(conn, s, terminate=True)
            forget_snapshots(conn, slot)
            conn.execute(f"DROP PUBLICATION IF EXISTS {pub}")
            conn.execute(f"DROP TABLE IF EXISTS {table}")
        delete_topics(
            settings.kafka_bootstrap,
            [topology.topics.change_topic("oa", "public", table), f"{tag}.dlq.capture"],
        )


def profile_in_process(topology, settings, dsn, slot, target, rows):  # type: ignore[no-untyped-def]
    """BENCH_PROFILE=1: run the capture in this process under cProfile, print the top functions."""
    import cProfile
    import pstats
    import threading

    from connectors.capture import CaptureService

    service = CaptureService(topology, "oa", settings)

    def watch() -> None:
        with connect(dsn, "ARCHSYNC_OA_DSN", autocommit=True) as conn:
            while (list_slots(conn, slot)[0].confirmed_flush_lsn or 0) < target:
                time.sleep(0.1)
        service.stop()

    threading.Thread(target=watch, daemon=True).start()
    started = time.monotonic()
    profiler = cProfile.Profile()
    profiler.runcall(service.run)
    elapsed = time.monotonic() - started
    progress(f"profiled: {elapsed:.2f} s = {rows / elapsed:,.0f} rows/s")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    return {}


if __name__ == "__main__":
    main()
