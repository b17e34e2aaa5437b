from __future__ import annotations

from datetime import date

import pytest

from processors.domain import (
    RETENTION,
    DomainError,
    expiry_date,
    format_archive_code,
    parse_archive_code,
    retention_code,
    retention_years,
    to_month,
    to_year,
)


@pytest.mark.parametrize(
    ("category", "code"),
    [
        ("VOUCHER", "Y30"),
        ("LEDGER", "Y30"),
        ("REPORT_MONTHLY", "Y10"),
        ("REPORT_QUARTERLY", "Y10"),
        ("REPORT_HALF_YEAR", "Y10"),
        ("REPORT_ANNUAL", "PERMANENT"),
        ("BANK_RECONCILIATION", "Y10"),
        ("BANK_STATEMENT", "Y10"),
        ("TAX_RETURN", "Y10"),
        ("TRANSFER_REGISTER", "Y30"),
        ("CUSTODY_REGISTER", "PERMANENT"),
        ("DESTRUCTION_REGISTER", "PERMANENT"),
        ("APPRAISAL_OPINION", "PERMANENT"),
        ("FIXED_ASSET_CARD", "Y5"),
        ("voucher", "Y30"),
    ],
)
def test_retention(category: str, code: str) -> None:
    assert retention_code(category) == code


def test_every_archive_category_has_a_retention() -> None:
    # arc_item_category_check of schemas/sql/archive/001_reference.sql
    assert set(RETENTION) == {
        "VOUCHER",
        "LEDGER",
        "FIXED_ASSET_CARD",
        "REPORT_MONTHLY",
        "REPORT_QUARTERLY",
        "REPORT_HALF_YEAR",
        "REPORT_ANNUAL",
        "BANK_RECONCILIATION",
        "BANK_STATEMENT",
        "TAX_RETURN",
        "TRANSFER_REGISTER",
        "CUSTODY_REGISTER",
        "DESTRUCTION_REGISTER",
        "APPRAISAL_OPINION",
        "OTHER",
    }


def test_unknown_category() -> None:
    with pytest.raises(DomainError, match="unknown archive category 'RECEIPT'"):
        retention_code("RECEIPT")


def test_expiry_counts_from_day_after_fiscal_year_end() -> None:
    assert expiry_date("VOUCHER", 2026) == date(2056, 12, 31)
    assert expiry_date("Y10", "2026-03-05") == date(2036, 12, 31)
    assert expiry_date("BANK_STATEMENT", "2020-07-01T10:00:00+08:00") == date(2030, 12, 31)
    assert expiry_date("FIXED_ASSET_CARD", 2030) == date(2035, 12, 31)  # year of disposal
    assert expiry_date("REPORT_ANNUAL", 2026) is None
    assert expiry_date("PERMANENT", 2026) is None


def test_retention_years_and_bad_codes() -> None:
    assert retention_years("Y30") == 30
    assert retention_years("PERMANENT") is None
    with pytest.raises(DomainError):
        retention_years("30Y")
    with pytest.raises(DomainError, match="not a date"):
        expiry_date("VOUCHER", "soon")


def test_year_and_month() -> None:
    assert to_year(date(2024, 2, 29)) == 2024
    assert to_year("2024") == 2024
    assert to_month("2024-02-29T23:00:00Z") == 2


def test_archive_code_format() -> None:
    assert format_archive_code("F001", ["KJ", "2026", "Y30"], 1, 7) == "F001-KJ·2026·Y30-0001-0007"
    assert format_archive_code(None, ["KJ"], 12, 345) == "KJ-0012-0345"
    assert parse_archive_code("F001-KJ·2026·Y30-0001-0007") == ("F001", ["KJ", "2026", "Y30"], 1, 7)
    assert parse_archive_code("KJ-0012-0345") == (None, ["KJ"], 12, 345)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("F001", [], 1, 1), "at least one class level"),
        (("F001", ["KJ"], 0, 1), "volume must be 1..9999"),
        (("F001", ["KJ"], 1, 10000), "item must be 1..9999"),
        (("F-1", ["KJ"], 1, 1), "'F-1'"),
        (("F001", ["K J"], 1, 1), "'K J'"),
    ],
)
def test_archive_code_errors(args: tuple, needle: str) -> None:
    with pytest.raises(DomainError, match=needle):
        format_archive_code(*args)


def test_malformed_archive_code() -> None:
    with pytest.raises(DomainError, match="malformed"):
        parse_archive_code("F001-KJ-1-7")
