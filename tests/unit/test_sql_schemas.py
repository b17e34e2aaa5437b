"""Static checks of the reference SQL schemas (no database needed).

The files are split into statements the way PostgreSQL reads them (``;`` outside quotes,
comments and dollar-quoted bodies), the CREATE TABLE statements are parsed into column
definitions, and the required tables/columns and a few design rules are checked.
Real-database checks of the same files live in the integration tests.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OA_SQL = ROOT / "schemas" / "sql" / "oa" / "001_reference.sql"
ARCHIVE_SQL = ROOT / "schemas" / "sql" / "archive" / "001_reference.sql"

REQUIRED: dict[Path, dict[str, set[str]]] = {
    OA_SQL: {
        "oa_form": {
            "id",
            "form_no",
            "form_type",
            "status",
            "amount",
            "archive_code",
            "archive_status",
            "fonds_code",
            "currency",
            "row_version",
            "created_at",
            "updated_at",
        },
        "oa_form_line": {"id", "form_id", "line_no", "amount", "invoice_code", "invoice_no"},
        "oa_approval_record": {"id", "form_id", "approver", "node", "action", "acted_at"},
        "oa_attachment": {"id", "form_id", "kind", "file_name", "size_bytes", "sha256", "storage_uri"},
        "oa_einvoice": {"id", "form_id", "invoice_code", "invoice_no", "amount", "tax_amount"},
        "oa_task": {"id", "task_type", "assignee", "ref_system", "ref_id", "status", "updated_at"},
    },
    ARCHIVE_SQL: {
        "arc_item": {
            "id",
            "archive_code",
            "source_system",
            "source_ref",
            "status",
            "retention_code",
            "expire_date",
            "hold",
            "fonds_code",
            "class_code",
            "item_no",
            "metadata",
            "amount",
        },
        "arc_file": {"id", "item_id", "seq", "sha256", "size_bytes"},
        "arc_business_event": {"id", "item_id", "event_type", "detail", "occurred_at"},
        "arc_borrow_request": {"id", "item_id", "requester", "status", "due_date", "decided_at"},
        "arc_appraisal": {"id", "item_id", "status"},
        "arc_destruction": {"id", "item_id", "status", "decided_by", "decided_at"},
        "arc_check_result": {
            "id",
            "item_id",
            "stage",
            "authenticity",
            "integrity",
            "usability",
            "security",
            "fault_code",
            "checked_at",
        },
        "arc_code_sequence": {"fonds_code", "class_code", "fiscal_year", "next_item_no"},
    },
}
MONEY_COLUMNS = {"amount", "tax_amount"}
FLOAT_TYPE_RE = re.compile(r"\b(float[48]?|real|double\s+precision|money)\b", re.IGNORECASE)
TABLE_CONSTRAINT_WORDS = {"constraint", "primary", "unique", "check", "foreign", "exclude", "like"}
DOLLAR_TAG_RE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")


def split_statements(sql: str) -> list[str]:
    """Split SQL on ``;`` that are outside quotes, comments and dollar-quoted bodies.

    Comments are dropped from the returned statements; empty statements are skipped.
    """
    statements: list[str] = []
    current: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end
        elif sql.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            if depth:
                raise ValueError("unterminated block comment")
        elif ch in ("'", '"'):
            end = i + 1
            while True:
                end = sql.find(ch, end)
                if end < 0:
                    raise ValueError(f"unterminated {ch} quote")
                if sql.startswith(ch * 2, end):
                    end += 2
                    continue
                break
            current.append(sql[i : end + 1])
            i = end + 1
        elif ch == "$" and (match := DOLLAR_TAG_RE.match(sql, i)) and not (i and sql[i - 1].isalnum()):
            tag = match.group(0)
            end = sql.find(tag, match.end())
            if end < 0:
                raise ValueError(f"unterminated dollar quote {tag}")
            current.append(sql[i : end + len(tag)])
            i = end + len(tag)
        elif ch == ";":
            statement = "".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
            i += 1
        else:
            current.append(ch)
            i += 1
    if "".join(current).strip():
        raise ValueError(f"statement without a terminating ';': {''.join(current).strip()[:80]!r}")
    return statements


def _split_top_level(body: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for pos, ch in enumerate(body):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(body[start:pos].strip())
            start = pos + 1
    parts.append(body[start:].strip())
    return [p for p in parts if p]


class Table:
    def __init__(self, name: str, columns: dict[str, str], constraints: list[str]) -> None:
        self.name = name
        self.columns = columns  # column name -> rest of its definition
        self.constraints = constraints  # table-level constraints


def parse_tables(statements: list[str]) -> dict[str, Table]:
    tables: dict[str, Table] = {}
    for statement in statements:
        match = re.match(r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)\s*\(", statement, re.IGNORECASE)
        if not match:
            continue
        body = statement[match.end() : statement.rindex(")")]
        columns: dict[str, str] = {}
        constraints: list[str] = []
        for item in _split_top_level(body):
            first, _, rest = item.partition(" ")
            if first.lower() in TABLE_CONSTRAINT_WORDS:
                constraints.append(item)
            else:
                columns[first.strip('"').lower()] = rest.strip()
        tables[match.group(1).lower()] = Table(match.group(1).lower(), columns, constraints)
    return tables


def _statements(path: Path) -> list[str]:
    assert path.is_file(), f"{path.relative_to(ROOT)} is missing"
    return split_statements(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=[OA_SQL, ARCHIVE_SQL], ids=["oa", "archive"])
def schema(request: pytest.FixtureRequest) -> tuple[Path, list[str], dict[str, Table]]:
    statements = _statements(request.param)
    return request.param, statements, parse_tables(statements)


def test_splitter_respects_dollar_quotes_and_comments() -> None:
    sql = """
    -- a comment; with a semicolon
    CREATE TABLE t (a text DEFAULT ';');
    /* block; /* nested; */ still comment */
    CREATE FUNCTION f() RETURNS trigger LANGUAGE plpgsql AS $fn$
    BEGIN RAISE EXCEPTION 'x;y'; RETURN NULL; END; $fn$;
    SELECT $$;$$, 'it''s;';
    """
    statements = split_statements(sql)
    assert len(statements) == 3
    assert statements[1].endswith("$fn$")
    assert statements[2] == "SELECT $$;$$, 'it''s;'"
    with pytest.raises(ValueError):
        split_statements("SELECT 1")


def test_files_parse_into_statements(schema: tuple[Path, list[str], dict[str, Table]]) -> None:
    path, statements, tables = schema
    assert len(statements) >= len(REQUIRED[path])
    for statement in statements:
        keyword = statement.split(None, 1)[0].upper()
        assert keyword in {"CREATE", "ALTER", "COMMENT"}, f"unexpected statement: {statement[:60]!r}"
    # Applied by the migration runner inside its own transaction handling.
    assert not any(re.match(r"(BEGIN|COMMIT|START\s+TRANSACTION|ROLLBACK)\b", s, re.I) for s in statements)
    assert tables


def test_required_tables_and_columns(schema: tuple[Path, list[str], dict[str, Table]]) -> None:
    path, _, tables = schema
    for table, columns in REQUIRED[path].items():
        assert table in tables, f"{path.name}: table {table} missing"
        missing = columns - set(tables[table].columns)
        assert not missing, f"{table}: missing columns {sorted(missing)}"


def test_every_table_has_a_primary_key_and_a_comment(
    schema: tuple[Path, list[str], dict[str, Table]],
) -> None:
    _, statements, tables = schema
    commented = {
        m.group(1).lower()
        for s in statements
        if (m := re.match(r"COMMENT\s+ON\s+TABLE\s+(\w+)\s+IS", s, re.IGNORECASE))
    }
    for table in tables.values():
        has_pk = any("primary key" in d.lower() for d in table.columns.values()) or any(
            c.lower().startswith("primary key") for c in table.constraints
        )
        assert has_pk, f"{table.name} has no primary key"
        assert table.name in commented, f"{table.name} has no COMMENT ON TABLE"


def _without_literals(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


def test_no_floating_point_money(schema: tuple[Path, list[str], dict[str, Table]]) -> None:
    _, statements, tables = schema
    for table in tables.values():
        for column, definition in table.columns.items():
            assert not FLOAT_TYPE_RE.search(_without_literals(definition)), f"{table.name}.{column} is a float"
            if column in MONEY_COLUMNS:
                assert definition.lower().startswith("numeric"), f"{table.name}.{column} must be numeric"
    for statement in statements:
        if not statement.upper().startswith("COMMENT"):
            assert not FLOAT_TYPE_RE.search(_without_literals(statement)), statement[:80]


def test_sha256_columns_are_checked_lowercase_hex(schema: tuple[Path, list[str], dict[str, Table]]) -> None:
    _, _, tables = schema
    found = 0
    for table in tables.values():
        if "sha256" in table.columns:
            found += 1
            definition = table.columns["sha256"]
            assert "[0-9a-f]{64}" in definition and "CHECK" in definition.upper(), table.name
    assert found >= 1


def test_mutable_tables_have_updated_at(schema: tuple[Path, list[str], dict[str, Table]]) -> None:
    path, statements, tables = schema
    touched = {
        m.group(1).lower() for s in statements if (m := re.search(r"BEFORE\s+UPDATE\s+ON\s+(\w+)", s, re.IGNORECASE))
    }
    for table in tables.values():
        if "updated_at" in table.columns:
            assert table.columns["updated_at"].lower().startswith("timestamptz"), table.name
            assert table.name in touched, f"{table.name}.updated_at is never maintained"
    for table in ("oa_form", "oa_task", "arc_item", "arc_borrow_request", "arc_destruction", "arc_file"):
        if table in REQUIRED[path]:
            assert "updated_at" in tables[table].columns, table


def test_foreign_keys_are_indexed(schema: tuple[Path, list[str], dict[str, Table]]) -> None:
    _, statements, tables = schema
    leading: dict[str, set[str]] = {name: set() for name in tables}
    for s in statements:
        m = re.match(r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?\w+\s+ON\s+(\w+)\s*\(\s*(\w+)", s, re.I)
        if m:
            leading[m.group(1).lower()].add(m.group(2).lower())
    for table in tables.values():
        for constraint in table.constraints:
            m = re.search(r"(?:PRIMARY\s+KEY|UNIQUE(?:\s+NULLS\s+NOT\s+DISTINCT)?)\s*\(\s*(\w+)", constraint, re.I)
            if m:
                leading[table.name].add(m.group(1).lower())
        for column, definition in table.columns.items():
            if "references" in definition.lower():
                assert column in leading[table.name], f"{table.name}.{column} (FK) has no index"


def test_oa_form_contract() -> None:
    tables = parse_tables(_statements(OA_SQL))
    form = tables["oa_form"].columns
    assert re.match(r"bigint\s+GENERATED\s+BY\s+DEFAULT\s+AS\s+IDENTITY", form["id"], re.I)
    assert re.match(r"numeric\(18,\s*2\)\s+NOT\s+NULL", form["amount"], re.I)
    assert "unique" in form["form_no"].lower() and "not null" in form["form_no"].lower()
    for status in (
        "DRAFT",
        "SUBMITTED",
        "IN_APPROVAL",
        "APPROVED",
        "REJECTED",
        "WITHDRAWN",
        "PAID",
        "ARCHIVE_PENDING",
        "ARCHIVED",
        "ARCHIVE_REJECTED",
    ):
        assert f"'{status}'" in form["status"], status
    for form_type in ("EXPENSE", "PAYMENT", "CONTRACT"):
        assert f"'{form_type}'" in form["form_type"]
    # An insert giving only id, form_no, form_type, status, amount must succeed.
    given = {"id", "form_no", "form_type", "status", "amount"}
    for column, definition in form.items():
        d = definition.lower()
        if column not in given and "not null" in d:
            assert "default" in d, f"oa_form.{column} is NOT NULL without a default"
    assert "'CNY'" in form["currency"]
    for action in ("SUBMIT", "APPROVE", "REJECT", "RETURN", "REVOKE"):
        assert f"'{action}'" in tables["oa_approval_record"].columns["action"]
    einvoice = " ".join(tables["oa_einvoice"].constraints)
    assert re.search(r"UNIQUE\b[^(]*\(\s*invoice_code\s*,\s*invoice_no\s*\)", einvoice, re.I)


def test_replica_identity_full() -> None:
    statements = _statements(OA_SQL)
    full = {
        m.group(1).lower()
        for s in statements
        if (m := re.match(r"ALTER\s+TABLE\s+(\w+)\s+REPLICA\s+IDENTITY\s+FULL", s, re.I))
    }
    assert {"oa_form", "oa_task"} <= full


def test_arc_item_contract() -> None:
    statements = _statements(ARCHIVE_SQL)
    tables = parse_tables(statements)
    item = tables["arc_item"]
    cols = item.columns
    assert "unique" in cols["archive_code"].lower() and "not null" not in cols["archive_code"].lower()
    assert "not null" in cols["source_system"].lower() and "not null" in cols["source_ref"].lower()
    assert any(re.search(r"UNIQUE\s*\(\s*source_system\s*,\s*source_ref\s*\)", c, re.I) for c in item.constraints)
    for status in (
        "RECEIVED",
        "CHECKED",
        "CHECK_FAILED",
        "FILED",
        "TRANSFERRED",
        "APPRAISAL_DUE",
        "RETAINED",
        "HELD",
        "DESTROY_APPROVED",
        "DESTROYED",
    ):
        assert f"'{status}'" in cols["status"], status
    assert cols["expire_date"].lower().startswith("date")
    assert "numeric" in cols["amount"].lower()
    assert "jsonb" in cols["metadata"].lower()
    assert any(re.search(r"UNIQUE\s*\(\s*item_id\s*,\s*seq\s*\)", c, re.I) for c in tables["arc_file"].constraints)
    sequence_pk = [c for c in tables["arc_code_sequence"].constraints if c.upper().startswith("PRIMARY KEY")]
    assert sequence_pk and re.search(r"fonds_code\s*,\s*class_code\s*,\s*fiscal_year", sequence_pk[0])
    for stage in ("FILING", "TRANSFER", "PRESERVATION"):
        assert f"'{stage}'" in tables["arc_check_result"].columns["stage"]


def test_business_events_are_append_only() -> None:
    statements = _statements(ARCHIVE_SQL)
    triggers = [
        s
        for s in statements
        if re.match(r"CREATE\s+(OR\s+REPLACE\s+)?TRIGGER", s, re.I) and re.search(r"\bON\s+arc_business_event\b", s)
    ]
    assert triggers, "arc_business_event needs an append-only trigger"
    spec = " ".join(triggers).upper()
    assert "UPDATE" in spec and "DELETE" in spec
    function = re.search(r"EXECUTE\s+FUNCTION\s+(\w+)", triggers[0], re.I)
    assert function
    body = next(s for s in statements if re.search(rf"FUNCTION\s+{function.group(1)}\s*\(", s) and "$" in s)
    assert "RAISE EXCEPTION" in body.upper()


def test_archive_items_are_numbered_per_volume() -> None:
    text = (ROOT / "schemas" / "sql" / "archive" / "002_volumes.sql").read_text(encoding="utf-8")
    statements = split_statements(text)
    index = next(s for s in statements if "arc_item_volume_item_key" in s and "CREATE" in s)
    assert re.search(r"fiscal_year\s*,\s*coalesce\(volume_no, 1\)\s*,\s*item_no", index)
    assert any(re.fullmatch(r"DROP INDEX IF EXISTS arc_item_number_key;?", s.strip()) for s in statements)
    assert any("FUNCTION arc_next_volume_item" in s for s in statements)


def test_a_volume_closed_by_hand_is_recorded_and_never_skips_a_number() -> None:
    text = (ROOT / "schemas" / "sql" / "archive" / "003_close_volume.sql").read_text(encoding="utf-8")
    statements = split_statements(text)
    assert any("CREATE TABLE IF NOT EXISTS arc_volume_closure" in s for s in statements)
    body = next(s for s in statements if "FUNCTION arc_close_volume" in s)
    assert "FOR UPDATE" in body  # the sequence's row lock, like arc_next_volume_item
    assert re.search(r"items\s*<\s*1", body)  # an empty volume is not closed
    assert "INSERT INTO arc_volume_closure" in body
