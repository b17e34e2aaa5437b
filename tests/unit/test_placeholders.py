"""connectors.postgres.numbered_placeholders: psycopg's %s form to PostgreSQL's $n form."""

from __future__ import annotations

import pytest

from connectors.postgres import numbered_placeholders


def test_positional_placeholders_are_numbered_in_order() -> None:
    query = b"UPDATE t SET a = %s::int, b = %s WHERE k = %s AND v IS DISTINCT FROM %s"
    assert numbered_placeholders(query) == b"UPDATE t SET a = $1::int, b = $2 WHERE k = $3 AND v IS DISTINCT FROM $4"


def test_a_doubled_percent_is_a_literal_percent() -> None:
    assert (
        numbered_placeholders(b"SELECT %s WHERE x LIKE 'a%%' AND y = %s") == b"SELECT $1 WHERE x LIKE 'a%' AND y = $2"
    )
    assert numbered_placeholders(b"SELECT 1") == b"SELECT 1"


@pytest.mark.parametrize("query", [b"SELECT %(name)s", b"SELECT %b", b"SELECT %d"])
def test_other_placeholders_are_refused(query: bytes) -> None:
    with pytest.raises(ValueError, match="unsupported placeholder"):
        numbered_placeholders(query)
