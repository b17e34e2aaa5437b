"""Micro benchmark: Avro encode + decode of a change event with a ~1 KB row of 12 mixed columns.

    .venv/bin/python benchmarks/bench_codec.py [-n 100000] [--rounds 3] [--engine builtin|fastavro]

One core, one thread. Prints rows/s for encode, decode and encode+decode; each is the best of
``--rounds`` rounds of N rows (the other rounds are shown too: shared machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from schemas.codec import ChangeEventCodec, event_id, key_bytes


def sample_row(i: int = 1) -> dict[str, Any]:
    return {
        "id": 1_000_000 + i,
        "doc_uuid": uuid.UUID("6f1c7a2e-3b7d-4c1e-9a55-2f0b8c4d1e90"),
        "title": "Purchase request for office equipment, 3rd floor " * 2,
        "body": "Approval workflow note. " * 24,
        "amount": Decimal("1234567.89"),
        "submitted_at": datetime(2024, 5, 1, 12, 30, 15, 123456, tzinfo=UTC),
        "updated_at": datetime(2024, 5, 2, 9, 0, 0),
        "due_date": date(2024, 6, 30),
        "approved": True,
        "attrs": {"dept": "finance", "level": 3, "cc": ["a@example.com", "b@example.com"]},
        "tags": ["urgent", "capex", "q2"],
        "score": 0.875,
    }


def sample_event(i: int = 1) -> dict[str, Any]:
    return {
        "event_id": event_id("oa", 0x1A2B3C4D5E, i),
        "op": "u",
        "before": {"id": 1_000_000 + i},
        "after": sample_row(i),
        "source": {
            "system": "oa",
            "database": "oa",
            "schema": "public",
            "table": "approval_request",
            "lsn": 0x1A2B3C4D00 + i,
            "commit_lsn": 0x1A2B3C4D5E,
            "xid": 987654,
            "commit_ts": 1714566615123456,
            "origin": None,
            "snapshot": False,
        },
        "txn": {"id": "987654:112394027870", "order": i, "total": None},
        "ts_ms": 1714566615200,
        "key_columns": ["id"],
    }


def rate(fn: Callable[[], object], n: int, rounds: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rates.append(n / (time.perf_counter() - t0))
    return max(rates), rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--engine", default="builtin", choices=["builtin", "fastavro"])
    args = ap.parse_args()
    codec = ChangeEventCodec(engine=args.engine)
    event = sample_event()
    data = codec.encode(event)
    assert codec.decode(data)["after"] == event["after"]
    row_bytes = len(data) - len(codec.encode({**event, "after": None}))
    print(
        f"engine={args.engine}: message {len(data)} bytes (row {row_bytes} bytes, 12 columns), "
        f"N={args.n}, best of {args.rounds}"
    )

    encode, decode = codec.encode, codec.decode
    results = {
        "encode": rate(lambda: encode(event), args.n, args.rounds),
        "decode": rate(lambda: decode(data), args.n, args.rounds),
        "encode+decode": rate(lambda: decode(encode(event)), args.n, args.rounds),
        "encode+key_bytes": rate(
            lambda: (encode(event), key_bytes("oa", "public", "approval_request", {"id": 1_000_001})),
            args.n,
            args.rounds,
        ),
    }
    for name, (best, rates) in results.items():
        print(
            f"{name:17s} {best:>9,.0f} rows/s  ({1e6 / best:6.2f} us/row)   "
            f"rounds: {', '.join(f'{r:,.0f}' for r in rates)}  median {statistics.median(rates):,.0f}"
        )


if __name__ == "__main__":
    main()
