"""A table recovery that stops receiving changelog records is noticed and fetched again, on the real
services: the worker restarted here loses its first changelog records on their way to the recovery
(fault injected in the test's own copy of the worker's consumer), so its recovery waits for records
aiokafka has already passed; the recovery watch seeks them back, the worker becomes ready, and the
state it recovered carries the next change of an aggregate from before the restart."""

from __future__ import annotations

import subprocess

from processors.app import READY_LINE

from .pipeline_kit import REPO, Pipeline
from .test_pipeline import approve, item_of, new_form

# the worker with a consumer that drops every changelog record it fetches in the first 2 s after
# the first one (what a rebalance in the middle of a recovery did once in ~20 kill tests)
FAULTY_WORKER = """
import sys, time
from processors.worker_consumer import WorkerConsumer

original = WorkerConsumer.getmany
window = {}

async def getmany(self, timeout):
    async for tp, message in original(self, timeout):
        if self._is_changelog_tp(tp):
            now = time.monotonic()
            if now < window.setdefault("until", now + 2.0):
                print(f"TEST dropped {tp.topic}[{tp.partition}]@{message.offset}", file=sys.stderr, flush=True)
                continue
        yield tp, message

WorkerConsumer.getmany = getmany
from archsync.cli import main
main()
"""


def test_stalled_table_recovery_is_sought_back_and_the_state_restored(pipeline: Pipeline, unique: str) -> None:
    p = pipeline
    p.wait_for(lambda: READY_LINE in p.log.read_text(errors="replace"), 120, "the worker to be ready")
    form_no = f"RW-{unique}"
    form_id = new_form(p, form_no, f"R{unique}", attachments=1)
    approve(p, form_id)
    item = p.wait_for(lambda: item_of(p, form_no), 60, "the archive item")
    p.wait_for(
        lambda: p.sql("oa", "SELECT archive_code FROM oa_form WHERE id = %s", (form_id,))[0][0], 60, "the write-back"
    )
    assert p.worker is not None
    p.worker.terminate()
    p.worker.wait(60)

    log = p.log.parent / "faulty-worker.log"
    with log.open("ab") as handle:
        p.worker = subprocess.Popen(
            [
                str(REPO / ".venv" / "bin" / "python"),
                "-c",
                FAULTY_WORKER,
                *("--topology", str(p.file), "worker", "--loglevel", "info"),
            ],
            stdout=handle,
            stderr=handle,
            env={**p.env, "ARCHSYNC_RECOVERY_STALL_SECONDS": "3"},
            cwd=REPO,
        )

    def text() -> str:
        return log.read_text(errors="replace")

    p.wait_for(lambda: "TEST dropped" in text(), 120, "the fault: changelog records dropped")
    p.wait_for(lambda: "table recovery stalled" in text(), 60, "the stall to be noticed")
    p.wait_for(lambda: "seeking stalled changelog partition" in text(), 30, "the seek back")
    p.wait_for(lambda: READY_LINE in text(), 60, "the worker to be ready after the seek")
    # the recovered state knows the form is approved: an attachment added now becomes a file
    p.sql(
        "oa",
        "INSERT INTO oa_attachment (form_id, kind, file_name, size_bytes, sha256) VALUES"
        " (%s, 'EINVOICE_XML', 'late.xml', 4, %s)",
        (form_id, "ab" * 32),
    )
    p.wait_for(
        lambda: p.sql("archive", "SELECT count(*) FROM arc_file WHERE item_id = %s", (item["id"],))[0][0] == 2,
        60,
        "the late attachment's file (the form's state was recovered)",
    )
