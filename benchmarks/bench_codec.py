"""Micro benchmark: encode + decode of a change event with a ~1 KB row of 12 mixed columns.

    .venv/bin/python benchmarks/bench_codec.py [-n 100000] [--engine builtin|fastavro]

Prints rows/s for encode, decode and encode+decode (one core, one thread).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.codec import ChangeEventCodec, event_id  # noqa: E402


def sample_event(i: int = 1) -> dict:
    row = {
        "id": 1_000_000 + i,
        "doc_uuid": uuid.UUID("6f1c7a2e-3b7d-4c1e-9a55-2f0b8c4d1e90"),
        "title": "Purchase request for office equipment, 3rd floor " * 2,
        "body": "Approval workflow note. " * 24,
        "amount": Decimal("1234567.89"),
        "submitted_at": datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=timezone.utc),
        "updated_at": datetime(2024, 5, 2, 9, 0, 0),
        "due_date": date(2024, 6, 30),
        "approved": True,
        "attrs": {"dept": "finance", "level": 3, "cc": ["a@example.com", "b@example.com"]},
        "tags": ["urgent", "capex", "q2"],
        "score": 0.875,
    }
    return {
        "event_id": event_id("oa", 0x1A2B3C4D5E, i),
        "op": "u",
        "before": {"id": 1_000_000 + i},
        "after": row,
        "source": {"system": "oa", "database": "oa", "schema": "public", "table": "approval_request",
                   "lsn": 0x1A2B3C4D00 + i, "commit_lsn": 0x1A2B3C4D5E, "xid": 987654,
                   "commit_ts": 1714566615123456, "origin": None, "snapshot": False},
        "txn": {"id": "987654:112394027870", "order": i, "total": None},
        "ts_ms": 1714566615200,
        "key_columns": ["id"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--engine", default="builtin", choices=["builtin", "fastavro"])
    args = ap.parse_args()
    codec = ChangeEventCodec(engine=args.engine)
    event = sample_event()
    n = args.n
    data = codec.encode(event)
    assert codec.decode(data)["after"] == event["after"]
    print(f"engine={args.engine} message={len(data)} bytes, row={len(data) - 150:.0f}~ bytes, N={n}")

    t0 = time.perf_counter()
    for _ in range(n):
        codec.encode(event)
    t1 = time.perf_counter()
    for _ in range(n):
        codec.decode(data)
    t2 = time.perf_counter()
    for _ in range(n):
        codec.decode(codec.encode(event))
    t3 = time.perf_counter()
    print(f"encode        {n / (t1 - t0):>10,.0f} rows/s  ({(t1 - t0) / n * 1e6:.2f} us/row)")
    print(f"decode        {n / (t2 - t1):>10,.0f} rows/s  ({(t2 - t1) / n * 1e6:.2f} us/row)")
    print(f"encode+decode {n / (t3 - t2):>10,.0f} rows/s  ({(t3 - t2) / n * 1e6:.2f} us/row)")


if __name__ == "__main__":
    main()
