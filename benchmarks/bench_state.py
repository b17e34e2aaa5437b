"""Benchmark: the worker's table state as the number of aggregates grows — memory store vs disk store.

    .venv/bin/python benchmarks/bench_state.py [--forms 20000 100000 300000] [--state-bytes 3000]

The ``aggregates`` table keeps every aggregate (form) for as long as it exists. For each store
(``ARCHSYNC_STATE_STORE``: Faust's ``memory`` store, archsync's ``disk`` store) and each number of
forms, a fresh process writes each form's state four times (a form's life: insert, attachment,
approval, write-back; the states of realistic size, written as the transform agent writes them,
through a Faust table's store), then reads every form once more in random order (a revoke years
later finds its state). Reported: the process's peak RSS, and µs per write and per cold read.
No services needed. Results go to benchmarks/results/state.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results" / "state.json"


def rss_mib() -> tuple[float, float]:
    """(current, peak) RSS of this process in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def state_of(form: int, version: int, size: int) -> bytes:
    """A form's aggregate state as the table holds it: JSON of about ``size`` bytes."""
    row = {"id": form, "form_no": f"EXP-2026-{form:08d}", "status": "APPROVED", "amount": f"{form % 99999}.00"}
    filler = "x" * max(0, size - 200)
    return json.dumps({"rows": {"oa_form": [row]}, "v": version, "note": filler}).encode()


def measure(store: str, forms: int, size: int) -> dict[str, Any]:
    """In this process: write ``forms`` states four times, read each once at random."""
    import faust

    from processors.state_store import STORE_KINDS

    with tempfile.TemporaryDirectory() as datadir:
        app = faust.App("bench-state", broker="kafka://localhost:1", store=STORE_KINDS[store], datadir=datadir)
        table = app.Table("aggregates", default=None, partitions=4, key_type=bytes, value_type=bytes)
        data = table.data
        before, _ = rss_mib()
        started = time.perf_counter()
        window = 500  # forms in flight at once: their four changes interleave
        for first in range(0, forms, window):
            batch = range(first, min(forms, first + window))
            for version in range(4):
                for form in batch:
                    key = b"form:%d" % form
                    data.get(key)  # the transform reads the state before it writes it
                    data[key] = state_of(form, version, size)
        write_us = (time.perf_counter() - started) * 1e6 / (forms * 4)
        order = list(range(forms))
        random.Random(7).shuffle(order)
        started = time.perf_counter()
        for form in order:
            assert data[b"form:%d" % form] is not None
        read_us = (time.perf_counter() - started) * 1e6 / forms
        now, peak = rss_mib()
    return {
        "store": store,
        "forms": forms,
        "rss_mib": round(now, 1),
        "peak_rss_mib": round(peak, 1),
        "rss_growth_mib": round(now - before, 1),
        "write_us": round(write_us, 2),
        "cold_read_us": round(read_us, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--forms", type=int, nargs="*", default=[20_000, 100_000, 300_000])
    ap.add_argument("--state-bytes", type=int, default=3000)
    ap.add_argument("--stores", nargs="*", default=["memory", "disk"])
    ap.add_argument("--child", nargs=2, metavar=("STORE", "FORMS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.state_bytes)))
        return {}
    runs = []
    for forms in args.forms:
        for store in args.stores:
            print(f"[bench state] {store} store, {forms:,} forms of {args.state_bytes} B ...", flush=True)
            out = subprocess.run(
                [sys.executable, __file__, "--child", store, str(forms), "--state-bytes", str(args.state_bytes)],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "ARCHSYNC_STATE_STORE": store},
            )
            run = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"[bench state]   RSS {run['rss_mib']:.0f} MiB (+{run['rss_growth_mib']:.0f}), "
                f"write {run['write_us']:.1f} µs, cold read {run['cold_read_us']:.1f} µs",
                flush=True,
            )
            runs.append(run)
    result = {
        "benchmark": "table state: memory store vs disk store",
        "state_bytes": args.state_bytes,
        "runs": runs,
        "machine": f"{platform.machine()} {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} cores",
        "note": (
            "one process per run; each form's state written 4 times (500 forms interleaved), then every form "
            "read once in random order; the disk store keeps ARCHSYNC_STATE_MEMORY_MB (32) of recent keys in "
            "memory and an 8 MiB SQLite page cache"
        ),
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
