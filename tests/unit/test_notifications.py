"""The notification record API (processors/notifications.py) and its Avro schema."""

from __future__ import annotations

from datetime import date

import pytest

from processors.notifications import (
    KINDS,
    NotificationError,
    build_notification,
    decode_notification,
    notification_id,
    notification_message,
    notifications_topic,
)
from schemas import registry


def test_schema_is_registered_and_checked() -> None:
    assert "notification.v1" in registry.schema_keys()
    assert registry.check_all() == []
    kinds = next(f for f in registry.schema_dict("notification")["fields"] if f["name"] == "kind")
    assert set(KINDS) <= set(kinds["type"]["symbols"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_round_trips(kind: str) -> None:
    record = build_notification(
        kind,
        subject_system="archive",
        subject_table="public.arc_item",
        subject_id=42,
        subject_ref="F001-KJ·2026·Y30-0001-0001",
        subject=f"{kind} on item 42",
        recipient="clerk",
        due_date="2026-12-31",
        detail={"amount": "12.50"},
        rule="r1",
    )
    key, value = notification_message(record)
    assert key == record["notification_id"].encode()
    back = decode_notification(value)
    assert back == {**record, "due_date": date(2026, 12, 31)}
    assert back["kind"] == kind and back["detail_json"] == '{"amount":"12.50"}'


def test_ids_are_deterministic_per_subject_kind_due_date() -> None:
    a = notification_id("borrowing_due", "archive", "public.arc_borrow_request", "7", "2026-05-01")
    assert a == notification_id("borrowing_due", "archive", "public.arc_borrow_request", "7", date(2026, 5, 1))
    assert a.startswith("borrowing_due:")
    assert a != notification_id("borrowing_due", "archive", "public.arc_borrow_request", "7", "2026-05-02")
    assert a != notification_id("borrowing_overdue", "archive", "public.arc_borrow_request", "7", "2026-05-01")
    assert a != notification_id("borrowing_due", "archive", "public.arc_borrow_request", "7", "2026-05-01", "x")


def test_defaults_and_errors() -> None:
    r = build_notification("fixity_violation", subject_system="archive", subject_id="9", subject="")
    assert r["severity"] == "critical" and r["subject"] == "fixity violation: 9"
    assert notifications_topic("p") == "p.notifications"
    with pytest.raises(NotificationError, match="unknown notification kind"):
        build_notification("nope", subject_system="archive", subject_id=1, subject="x")
    with pytest.raises(NotificationError, match="subject_id"):
        build_notification("archive_filed", subject_system="archive", subject_id=None, subject="x")
    with pytest.raises(NotificationError, match="not a date"):
        build_notification("borrowing_due", subject_system="archive", subject_id=1, subject="x", due_date="soon")
