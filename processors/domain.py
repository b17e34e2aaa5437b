"""Accounting-archive domain rules: retention periods, expiry dates and archival codes.

Retention (会计档案管理办法 2015, see /work/shared/domain.md) is a code ``Y<n>`` (n years) or
``PERMANENT``. Periods are counted from the day after the fiscal year end; fiscal years are
calendar years, so an item of fiscal year ``FY`` kept ``n`` years is kept up to and including
31 December of ``FY + n`` (FY 2026, 30 years: counting starts 2027-01-01, expires 2056-12-31).

Fixed-asset cards (``FIXED_ASSET_CARD``) are kept 5 years *after the asset's disposal*: for them
the year passed to :func:`expiry_date` must be the fiscal year of the disposal, not of the card.

``OTHER`` (other accounting material not named by the regulation, e.g. a contract attached to
an approval) is given 30 years: the longest finite period, so nothing is destroyed too early.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any

PERMANENT = "PERMANENT"

#: category (arc_item.category) → retention code
RETENTION: dict[str, str] = {
    "VOUCHER": "Y30",
    "LEDGER": "Y30",
    "FIXED_ASSET_CARD": "Y5",  # counted after the asset's disposal
    "REPORT_MONTHLY": "Y10",
    "REPORT_QUARTERLY": "Y10",
    "REPORT_HALF_YEAR": "Y10",
    "REPORT_ANNUAL": PERMANENT,
    "BANK_RECONCILIATION": "Y10",
    "BANK_STATEMENT": "Y10",
    "TAX_RETURN": "Y10",
    "TRANSFER_REGISTER": "Y30",
    "CUSTODY_REGISTER": PERMANENT,
    "DESTRUCTION_REGISTER": PERMANENT,
    "APPRAISAL_OPINION": PERMANENT,
    "OTHER": "Y30",
}

RETENTION_CODE = re.compile(r"^(Y[0-9]{1,3}|PERMANENT)$")
CODE_PART = re.compile(r"^[A-Za-z0-9_]+$")
ARCHIVE_CODE = re.compile(
    r"^(?:(?P<fonds>[A-Za-z0-9_]+)-)?(?P<klass>[A-Za-z0-9_]+(?:·[A-Za-z0-9_]+)*)"
    r"-(?P<volume>[0-9]{4})-(?P<item>[0-9]{4})$"
)


class DomainError(ValueError):
    """A value does not fit the archive domain (unknown category, bad code part...)."""


def retention_code(category: str) -> str:
    """The retention code of an item category (``VOUCHER`` → ``Y30``)."""
    try:
        return RETENTION[str(category).upper()]
    except KeyError:
        raise DomainError(f"unknown archive category {category!r} (known: {', '.join(RETENTION)})") from None


def retention_years(code: str) -> int | None:
    """Years of a retention code; None for ``PERMANENT``."""
    if not RETENTION_CODE.match(code):
        raise DomainError(f"not a retention code: {code!r} (Y<n> or PERMANENT)")
    return None if code == PERMANENT else int(code[1:])


def to_year(value: Any) -> int:
    """The fiscal year of an int, date, datetime or ISO date/timestamp string."""
    if isinstance(value, bool):
        raise DomainError(f"not a year: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, (date, datetime)):
        return value.year
    if isinstance(value, str) and re.match(r"^\d{4}$", value):
        return int(value)
    return _parse_date(value).year


def to_month(value: Any) -> int:
    """The month (1-12) of a date, datetime or ISO date/timestamp string."""
    if isinstance(value, (date, datetime)):
        return value.month
    return _parse_date(value).month


def _parse_date(value: Any) -> date:
    if not isinstance(value, str) or len(value) < 10:
        raise DomainError(f"not a date: {value!r}")
    try:
        return date.fromisoformat(value[:10])
    except ValueError:
        raise DomainError(f"not a date: {value!r}") from None


def expiry_date(category_or_code: str, fiscal_year: Any) -> date | None:
    """Last day an item must be kept: 31 Dec of ``fiscal_year + n``; None when permanent.

    Accepts a category (``VOUCHER``) or a retention code (``Y30``). For ``FIXED_ASSET_CARD``
    ``fiscal_year`` is the year of the asset's disposal.
    """
    text = str(category_or_code)
    code = text if RETENTION_CODE.match(text) else retention_code(text)
    years = retention_years(code)
    if years is None:
        return None
    year = to_year(fiscal_year)
    if not 1900 <= year <= 9999 - years:
        raise DomainError(f"fiscal year out of range: {year}")
    return date(year + years, 12, 31)


#: the highest volume and item number of an archival code (4 digits each)
MAX_CODE_NUMBER = 9999


def archive_code_prefix(fonds: str | None, class_levels: list[str]) -> str:
    """An archival code up to its volume number, ``[fonds-]class·levels-`` (not checked: the
    applier writes what the topology names, see :func:`format_archive_code` for the checks)."""
    head = f"{fonds}-" if fonds else ""
    return f"{head}{'·'.join(str(level) for level in class_levels)}-"


def format_archive_code(fonds: str | None, class_levels: list[str], volume: int, item: int) -> str:
    """``[fonds-]class-volume-item``: class levels joined by ``·``, volume/item 4-digit zero-padded.

    >>> format_archive_code("F001", ["KJ", "2026", "Y30"], 1, 7)
    'F001-KJ·2026·Y30-0001-0007'
    """
    if not class_levels:
        raise DomainError("an archival code needs at least one class level")
    parts = [str(level) for level in class_levels]
    for part in [*parts, *([str(fonds)] if fonds else [])]:
        if not CODE_PART.match(part):
            raise DomainError(f"archival code part {part!r} must be letters, digits or _")
    for name, number in (("volume", volume), ("item", item)):
        if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_CODE_NUMBER:
            raise DomainError(f"archival code {name} must be 1..{MAX_CODE_NUMBER}, got {number!r}")
    return f"{archive_code_prefix(fonds, parts)}{volume:04d}-{item:04d}"


def parse_archive_code(code: str) -> tuple[str | None, list[str], int, int]:
    """The inverse of :func:`format_archive_code`; DomainError when malformed."""
    m = ARCHIVE_CODE.match(code)
    if not m:
        raise DomainError(f"malformed archival code {code!r} (expected [fonds-]class-volume-item)")
    return m["fonds"], m["klass"].split("·"), int(m["volume"]), int(m["item"])
