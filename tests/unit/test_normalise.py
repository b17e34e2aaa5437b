from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from processors.model import ApplyCommand, Change, command_id
from processors.normalise import normalise
from schemas.codec import UNCHANGED


def event(op: str = "u") -> dict:
    return {
        "event_id": "oa:00000000000000FF:2",
        "op": op,
        "before": {"id": 7, "status": "SUBMITTED", "amount": Decimal("10.50"), "big": "x"},
        "after": {"id": 7, "status": "APPROVED", "amount": Decimal("10.50"), "big": UNCHANGED},
        "source": {
            "system": "oa",
            "database": "oa",
            "schema": "public",
            "table": "oa_form",
            "lsn": 1,
            "commit_lsn": 255,
            "xid": 9,
            "commit_ts": datetime(2026, 1, 2, tzinfo=UTC),
            "origin": None,
            "snapshot": False,
        },
        "txn": {"id": "9:FF", "order": 2, "total": 3},
        "ts_ms": 0,
        "key_columns": ["id"],
        "unknown_types": {},
    }


def test_normalise_keeps_exact_values_and_marks_unchanged_toast() -> None:
    change = normalise(event())
    assert change.table == "public.oa_form" and change.key == {"id": 7}
    assert change.after == {"id": 7, "status": "APPROVED", "amount": "10.50"}
    assert change.unchanged == ["big"]
    assert change.commit_ts_ms == 1767312000000
    assert change.changed("status") and not change.changed("amount")
    assert Change.from_json(change.to_json()) == change


def test_positions_order_changes() -> None:
    a = normalise(event())
    b = normalise({**event(), "txn": {"id": "9:FF", "order": 3, "total": 3}})
    assert a.position < b.position


def test_command_ids_are_deterministic() -> None:
    assert command_id("e", "f", "t", {"a": 1, "b": 2}) == command_id("e", "f", "t", {"b": 2, "a": 1})
    cmd = ApplyCommand(
        "id", "f", "archive", "public.arc_item", "upsert", {"a": 1}, {"b": "1.0"}, "oa", "e", 1, 1, None, "k"
    )
    assert ApplyCommand.from_json(cmd.to_json()) == cmd
