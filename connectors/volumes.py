"""Archive volumes (案卷) of the reference archive schema: a clerk closes the current volume of a
fonds/class/year by hand, and the next item filed opens the next volume as its item 1
(``arc_close_volume``, schemas/sql/archive/003_close_volume.sql)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg


@dataclass(frozen=True)
class VolumeClosed:
    """A volume closed by hand: which, how many items it holds, who closed it."""

    fonds_code: str
    class_code: str
    fiscal_year: int
    volume_no: int
    item_count: int
    closed_by: str

    @property
    def next_volume_no(self) -> int:
        return self.volume_no + 1


def close_volume(
    conn: psycopg.Connection[Any], fonds_code: str, class_code: str, fiscal_year: int, closed_by: str
) -> VolumeClosed | None:
    """Close the current volume of ``fonds_code``/``class_code``/``fiscal_year`` (``""``: no fonds
    prefix) in one transaction; None when there is none with an item to close."""
    with conn.transaction():
        row = conn.execute(
            "SELECT arc_close_volume(%s::text, %s::text, %s::integer, %s::text)",
            (fonds_code, class_code, fiscal_year, closed_by),
        ).fetchone()
        if row is None or row[0] is None:
            return None
        closure = conn.execute(
            "SELECT volume_no, item_count, closed_by FROM arc_volume_closure"
            " WHERE fonds_code = %s AND class_code = %s AND fiscal_year = %s AND volume_no = %s",
            (fonds_code, class_code, fiscal_year, row[0]),
        ).fetchone()
    assert closure is not None  # written by arc_close_volume in the same transaction
    return VolumeClosed(fonds_code, class_code, fiscal_year, int(closure[0]), int(closure[1]), str(closure[2]))
