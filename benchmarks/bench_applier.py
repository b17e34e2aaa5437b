"""Apply-stage benchmark: the applier alone on the real archive database, no Kafka, no Faust.

Commands are made by the reference topology's transform from synthetic approved forms with one
attachment each (an ``arc_item`` upsert with an allocated archival code and an ``arc_file`` upsert
whose parent id is a ``$lookup``), then applied in batches of ``BENCH_APPLY_BATCH`` (default 500)
by one :class:`Applier`, as an apply agent does. A second pass replays every batch (all skipped).

Results: benchmarks/results/applier.json (commands/s, first pass and replay).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from archsync.logs import configure_logging
from archsync.settings import load_settings
from connectors.applier import Applier
from connectors.postgres import connect
from processors.model import ApplyCommand, Change
from processors.transform import new_state, transform
from topology.model import load_topology

RESULTS = Path(__file__).resolve().parent / "results"
BASE_TS = 1_767_225_600_000


def progress(msg: str) -> None:
    print(f"[bench applier] {msg}", file=sys.stderr, flush=True)


def form_commands(topology: Any, tag: str, n: int) -> list[ApplyCommand]:
    """The commands of one approved form with one attachment (as the transform makes them)."""
    state = new_state()
    lsn = 10_000 + n * 10
    form = {
        "id": n,
        "form_no": f"BA-{tag}-{n:07d}",
        "form_type": "EXPENSE",
        "status": "SUBMITTED",
        "fiscal_year": 2026,
        "fiscal_month": 11,
        "created_at": "2026-11-01T07:00:00+00:00",
        "fonds_code": f"BA{tag}",  # the whole tag: an earlier run's numbering is never shared
        "title": "bench",
        "applicant": "ann",
        "amount": "100.25",
        "currency": "CNY",
        "row_version": 1,
    }
    attachment = {
        "id": n,
        "form_id": n,
        "kind": "EINVOICE_XML",
        "file_name": "inv.xml",
        "size_bytes": 64,
        "sha256": "ab" * 32,
    }
    commands: list[ApplyCommand] = []
    for order, (table, op, key, before, after) in enumerate(
        [
            ("public.oa_form", "c", {"id": n}, None, form),
            ("public.oa_attachment", "c", {"id": n}, None, attachment),
            ("public.oa_form", "u", {"id": n}, form, {**form, "status": "APPROVED", "row_version": 2}),
        ]
    ):
        change = Change(f"oa:{lsn}:{order}", "oa", table, op, key, before, after, lsn, order, BASE_TS + n)
        commands += transform(topology, state, change).commands
    return commands


def main() -> dict[str, object]:
    configure_logging("WARNING")
    forms = int(os.environ.get("BENCH_APPLY_FORMS", "5000"))
    batch = int(os.environ.get("BENCH_APPLY_BATCH", "500"))
    settings = load_settings()
    topology = load_topology()
    tag = uuid.uuid4().hex[:8]
    progress(f"building the commands of {forms} approved forms")
    commands = [c for n in range(1, forms + 1) for c in form_commands(topology, tag, n)]
    batches = [commands[i : i + batch] for i in range(0, len(commands), batch)]
    origin = f"archsync_bench_{tag}"
    applier = Applier.for_topology(topology, settings, "archive", origin)
    try:
        timings: dict[str, float] = {}
        for phase in ("apply", "replay"):
            started = time.perf_counter()
            for i, b in enumerate(batches):
                result = applier.apply_batch(b)
                assert not result.failed, result.failed[:1]
                if i % 10 == 0:
                    progress(f"{phase}: {i * batch}/{len(commands)} commands")
            timings[phase] = time.perf_counter() - started
            progress(f"{phase}: {len(commands) / timings[phase]:,.0f} commands/s")
        result_doc: dict[str, object] = {
            "benchmark": "applier",
            "forms": forms,
            "commands": len(commands),
            "batch": batch,
            "apply_commands_per_second": round(len(commands) / timings["apply"]),
            "replay_commands_per_second": round(len(commands) / timings["replay"]),
            "note": "each form: arc_item upsert with $allocate + arc_file upsert with $lookup parent",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "applier.json").write_text(json.dumps(result_doc, indent=2) + "\n")
        print(json.dumps(result_doc, indent=2))
        return result_doc
    finally:
        applier.close()
        with connect(settings.archive_dsn, "ARCHSYNC_ARCHIVE_DSN", autocommit=True) as conn:
            like = f"BA-{tag}-%"
            conn.execute(
                "DELETE FROM arc_file WHERE item_id IN (SELECT id FROM arc_item WHERE source_ref LIKE %s)", (like,)
            )
            conn.execute("DELETE FROM arc_item WHERE source_ref LIKE %s", (like,))
            conn.execute("DELETE FROM arc_code_sequence WHERE fonds_code = %s", (f"BA{tag}",))
            conn.execute("DELETE FROM archsync_apply_guard WHERE target_key LIKE %s", (f"%{tag}%",))
            conn.execute("SELECT pg_replication_origin_drop(%s)", (origin,))


if __name__ == "__main__":
    main()
