"""connectors.apply_sql: the pieces of the applier's statements (pure, no database)."""

from __future__ import annotations

from psycopg import sql

from connectors import apply_sql as q
from processors.domain import format_archive_code

ITEM = q.TargetTable(
    "public.arc_item",
    sql.Identifier("public", "arc_item"),
    {"id": "bigint", "title": "text", "amount": "numeric(18,2)", "metadata": "json"},
    ("id",),
)


def text(piece: sql.Composable) -> str:
    return piece.as_string(None)


def test_a_value_is_a_parameter_cast_to_its_column_type_or_its_computation() -> None:
    assert text(q.value_sql(ITEM, "amount", "1.00")) == "%s::numeric(18,2)"
    looked_up = q.Computed(("lookup", 1), sql.SQL("archsync_one(x, %s::text)"), ("what",))
    assert text(q.value_sql(ITEM, "id", looked_up)) == "archsync_one(x, %s::text)"
    assert q.value_params(["a", looked_up, None]) == ["a", "what", None]


def test_json_is_compared_as_jsonb_other_types_as_they_are() -> None:
    assert text(q.differs(ITEM, "metadata", {"a": 1})) == '"metadata"::jsonb IS DISTINCT FROM (%s::json)::jsonb'
    assert text(q.differs(ITEM, "title", "t")) == '"title" IS DISTINCT FROM %s::text'


def test_statement_shapes_tell_apart_what_changes_the_sql_text_only() -> None:
    assert q.shape({"k": 1}) == q.shape({"k": 2})
    assert q.shape({"k": None}) != q.shape({"k": 2})  # IS NULL instead of = %s
    assert q.shape({"k": q.InList((1, 2))}) == q.shape({"k": q.InList((3, 4))})
    assert q.shape({"k": q.InList((1, 2))}) != q.shape({"k": q.InList((1, 2, 3))})
    assert q.value_shape({"a": 1, "b": "x"}) == q.value_shape({"a": 2, "b": "y"})


def test_computed_values_read_their_from_items_once_each() -> None:
    number = q.NextItemNo("next_archive_code", ("F1", "KJ", 2026, 9999))
    code = q.Computed(("code",), sql.SQL("n"), (), number)
    item_no = q.Computed(("no",), sql.SQL("n"), (), number)
    assert q.sources([code, "plain", item_no]) == [number]
    assert text(q.from_clause([number])) == (
        ' FROM (SELECT arc_next_volume_item(%s::text, %s::text, %s::integer, %s::integer) AS n) "next_archive_code"'
    )
    assert text(q.from_clause([])) == ""


def test_a_number_drawn_on_a_condition_calls_the_function_in_the_select_list() -> None:
    # in FROM, the function would run (and use up a number) before the WHERE clause is checked
    number = q.NextItemNo("next_code", ("F1", "KJ", 2026, 10))
    assert text(number.from_item(sql.SQL("false"))) == (
        '(SELECT arc_next_volume_item(%s::text, %s::text, %s::integer, %s::integer) AS n WHERE false) "next_code"'
    )
    assert text(number.volume()) == '"next_code".n[1]'
    assert text(number.item()) == '"next_code".n[2]'


def test_the_allocated_code_is_the_domain_format() -> None:
    # the target appends the 4-digit volume and item to this prefix (CODE_SQL)
    assert q.archival_code_prefix("F001", "KJ", 2026, "Y30") == "F001-KJ·2026·Y30-"
    assert q.archival_code_prefix("F001", "KJ", 2026, "Y30") + "0001-0007" == format_archive_code(
        "F001", ["KJ", "2026", "Y30"], 1, 7
    )
    assert q.archival_code_prefix(None, "KJ", 2026, "Y10") == "KJ·2026·Y10-"
