"""The whole pipeline, both directions, on the real services: capture → worker → the other database."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from archsync.settings import Settings

from .pipeline_kit import Pipeline


@pytest.fixture
def pipeline(settings: Settings, unique: str, tmp_path: Path) -> Iterator[Pipeline]:
    p = Pipeline(settings, unique, tmp_path)
    try:
        yield p.start()
    finally:
        p.cleanup()


def new_form(
    p: Pipeline, form_no: str, fonds: str, form_type: str = "EXPENSE", amount: str = "1234.56", attachments: int = 2
) -> int:
    rows = p.sql(
        "oa",
        "INSERT INTO oa_form (form_no, form_type, status, amount, fonds_code, applicant, title,"
        " fiscal_year, fiscal_month) VALUES (%s, %s, 'SUBMITTED', %s, %s, 'tester', %s, 2026, 11)"
        " RETURNING id",
        (form_no, form_type, amount, fonds, f"claim {form_no}"),
    )
    form_id = rows[0][0]
    for n in range(attachments):
        content = f"{form_no}-{n}".encode()
        p.sql(
            "oa",
            "INSERT INTO oa_attachment (form_id, kind, file_name, size_bytes, sha256) VALUES"
            " (%s, 'EINVOICE_XML', %s, %s, %s)",
            (form_id, f"inv-{n}.xml", len(content), hashlib.sha256(content).hexdigest()),
        )
    p.sql(
        "oa",
        "INSERT INTO oa_approval_record (form_id, approver, node, action) VALUES (%s, 'tester', 'start', 'SUBMIT')",
        (form_id,),
    )
    return form_id


def approve(p: Pipeline, form_id: int) -> None:
    p.sql(
        "oa",
        "INSERT INTO oa_approval_record (form_id, approver, node, action) VALUES (%s, 'boss', 'finance', 'APPROVE')",
        (form_id,),
    )
    p.sql("oa", "UPDATE oa_form SET status = 'APPROVED', approved_at = now() WHERE id = %s", (form_id,))


def item_of(p: Pipeline, form_no: str) -> dict | None:
    rows = p.sql(
        "archive",
        "SELECT id, archive_code, status, amount::text, retention_code, expire_date::text,"
        " fonds_code FROM arc_item WHERE source_system = 'oa' AND source_ref = %s",
        (form_no,),
    )
    if not rows:
        return None
    keys = ("id", "archive_code", "status", "amount", "retention_code", "expire_date", "fonds_code")
    return dict(zip(keys, rows[0], strict=True))


def test_approved_form_is_archived_and_the_code_flows_back(pipeline: Pipeline, unique: str) -> None:
    p = pipeline
    form_no, fonds = f"T-{unique}", f"T{unique[:5]}"
    form_id = new_form(p, form_no, fonds)
    approve(p, form_id)
    item = p.wait_for(lambda: item_of(p, form_no), 60, "the archive item")
    assert item["amount"] == "1234.56" and item["status"] == "RECEIVED"
    assert item["archive_code"] and item["archive_code"].endswith("-0001")
    assert item["retention_code"] == "Y30"
    files = p.wait_for(
        lambda: (
            (r := p.sql("archive", "SELECT sha256 FROM arc_file WHERE item_id = %s", (item["id"],)))
            and len(r) == 2
            and r
        ),
        30,
        "both files",
    )
    expected = {hashlib.sha256(f"{form_no}-{n}".encode()).hexdigest() for n in range(2)}
    assert {r[0] for r in files} == expected
    # an archive clerk files the item: status and code flow back onto the OA form
    p.sql("archive", "UPDATE arc_item SET status = 'FILED', filed_at = now() WHERE id = %s", (item["id"],))
    back = p.wait_for(
        lambda: (
            (r := p.sql("oa", "SELECT archive_code, archive_status FROM oa_form WHERE id = %s", (form_id,)))
            and r[0][1] == "FILED"
            and r[0]
        ),
        60,
        "the write-back",
    )
    assert back[0] == item["archive_code"]
    # no loop: the write-back is not captured again, nothing else changes afterwards
    version = p.sql("oa", "SELECT row_version FROM oa_form WHERE id = %s", (form_id,))[0][0]
    updated = p.sql("archive", "SELECT updated_at FROM arc_item WHERE id = %s", (item["id"],))[0][0]
    import time

    time.sleep(4)
    assert p.sql("oa", "SELECT row_version FROM oa_form WHERE id = %s", (form_id,))[0][0] == version
    assert p.sql("archive", "SELECT updated_at FROM arc_item WHERE id = %s", (item["id"],))[0][0] == updated
