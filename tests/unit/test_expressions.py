from __future__ import annotations

from typing import Any

import pytest

from topology.expressions import ExpressionError, compile_expression
from topology.model import TopologyError

CTX: dict[str, Any] = {
    "root": {
        "id": 7,
        "status": "APPROVED",
        "form_type": "EXPENSE",
        "amount": "12.50",
        "created_at": "2026-03-05T08:00:00Z",
    },
    "before": {"id": 7, "status": "IN_APPROVAL", "form_type": "EXPENSE"},
    "row": {"id": 3, "file_name": "inv.pdf"},
    "change": {"op": "u", "table": "public.oa_form", "system": "oa"},
    "members": {"public.oa_attachment": [{"id": 3}, {"id": 4}]},
    "parent": None,
    "vars": {"fy": 2026},
}


def ev(text: str, ctx: dict[str, Any] | None = None) -> Any:
    return compile_expression(text, "flows.0.when")(CTX if ctx is None else ctx)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("root.status == 'APPROVED' and root.form_type in ('EXPENSE', 'PAYMENT')", True),
        ("root.missing", None),
        ("before.status != root.status", True),
        ("root.form_type not in ['CONTRACT']", True),
        ("not (root.id > 10)", True),
        ("root.id * 2 + 1 - 3 / 3", 14.0),
        ("'big' if root.id > 5 else 'small'", "big"),
        ("root['status']", "APPROVED"),
        ("members.get('public.oa_attachment', [])[1].id", 4),
        ("members.get('public.nothing', [])", []),
        ("len(members.get('public.oa_attachment'))", 2),
        ("parent.item_id", None),
        ("root.x is None", True),
        ("changed('status')", True),
        ("changed('form_type')", False),
        ("year(root.created_at)", 2026),
        ("month(root.created_at)", 3),
        ("retention('VOUCHER')", "Y30"),
        ("expiry('VOUCHER', vars.fy)", "2056-12-31"),
        ("expiry('REPORT_ANNUAL', 2026)", None),
        ("concat('oa:', root.id, None)", "oa:7"),
        ("coalesce(root.nope, None, 'x')", "x"),
        ("upper('a') + lower('B')", "Ab"),
        ("map(root.form_type, {'EXPENSE': 'VOUCHER'})", "VOUCHER"),
        ("map('X', {'EXPENSE': 'VOUCHER'}, 'OTHER')", "OTHER"),
        ("int(strip_prefix('borrow:12', 'borrow:'))", 12),
        ("file_format(row.file_name)", "PDF"),
        ("file_format('noext', 'SCAN')", "SCAN"),
        ("str(decimal(root.amount) * 2)", "25.00"),
        ("one_of('A', 'B')", {"$in": ["A", "B"]}),
        (
            "lookup('public.arc_item', 'id', source_system='oa', source_ref=root.id)",
            {
                "$lookup": {
                    "table": "public.arc_item",
                    "column": "id",
                    "where": {"source_system": "oa", "source_ref": 7},
                }
            },
        ),
        (
            "allocate_code('F001', 'KJ', '2026-05-01', 'Y30')",
            {"$allocate": {"fonds": "F001", "class": "KJ", "year": 2026, "retention": "Y30"}},
        ),
        (
            "allocate_code('F001', 'KJ', 2026, 'Y30', 200)",
            {"$allocate": {"fonds": "F001", "class": "KJ", "year": 2026, "retention": "Y30", "items_per_volume": 200}},
        ),
        ("{'a': root.id, 'b': [1, 2]}", {"a": 7, "b": [1, 2]}),
    ],
)
def test_evaluates(text: str, expected: Any) -> None:
    assert ev(text) == expected


@pytest.mark.parametrize("size", ["0", "10000", "'200'", "2.5", "True"])
def test_allocate_code_refuses_a_volume_size_that_is_not_1_to_9999(size: str) -> None:
    with pytest.raises(ExpressionError, match="items_per_volume must be an integer from 1 to 9999"):
        ev(f"allocate_code('F001', 'KJ', 2026, 'Y30', {size})")


def test_changed_is_true_without_before_and_false_without_root() -> None:
    assert ev("changed('status')", {**CTX, "before": None}) is True
    assert ev("changed('status')", {**CTX, "root": None}) is False


def test_now_iso() -> None:
    assert ev("now_iso()").startswith("20")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("__import__('os')", "unknown function '__import__'"),
        ("open('x')", "unknown function 'open'"),
        ("root.__class__", "attribute '__class__' not allowed"),
        ("os.system", "unknown name 'os'"),
        ("[x for x in members]", "ListComp is not allowed"),
        ("lambda: 1", "Lambda is not allowed"),
        ("root.status.upper()", "only the listed functions"),
        ("root.items()", "only the listed functions"),
        ("root[1:2]", "slices are not allowed"),
        ("root ** 2", "operator Pow not allowed"),
        ("root.status == ", "syntax error"),
        ("", "empty expression"),
        ("x := 1", "syntax error"),
        ("changed('a', 'b')", "changed() takes one column name"),
        ("concat(x='1')", "concat() takes no keyword arguments"),
        ("f'{root}'", "JoinedStr is not allowed"),
        ("b'x'", "literal b'x' not allowed"),
    ],
)
def test_rejects_disallowed_syntax(text: str, needle: str) -> None:
    with pytest.raises(TopologyError) as info:
        compile_expression(text, "flows[0].when")
    assert str(info.value).startswith("flows[0].when: ")
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("map(root.status, {'X': 'Y'})", "unknown value 'APPROVED'"),
        ("year('soon')", "not a date"),
        ("root.id / 0", "ZeroDivisionError"),
        ("retention('NOPE')", "unknown archive category"),
        ("lookup('public.arc_item', 'id', source_ref=root.nope)", "'source_ref' is null"),
        ("int('x')", "not an integer"),
        ("strip_prefix('x:1', 'borrow:')", "does not start with"),
        ("row.file_name.x", "cannot read 'x' of a str"),
    ],
)
def test_runtime_errors_name_where(text: str, needle: str) -> None:
    with pytest.raises(ExpressionError) as info:
        ev(text)
    assert str(info.value).startswith("flows.0.when: ")
    assert needle in str(info.value)
