"""A tiny, safe expression language for topology flows, parsed with :mod:`ast` and interpreted.

Nothing is ever passed to ``eval``: the text is parsed, every node is checked against a
whitelist at compile time, and the tree is walked by :class:`Expression` at run time.

Allowed: literals (str, number, True/False/None, tuples, lists, dicts), the context names
(:data:`NAMES`), attribute access and subscripts on mappings (``root.status`` reads the key,
a missing key or a None object gives None), comparisons (``== != < <= > >= in not in is
is not``), ``and or not``, ``a if cond else b``, ``+ - * / %`` and unary ``-``, calls of the
functions in :data:`FUNCTIONS` and the one method ``mapping.get(key[, default])``.

Context names: ``root`` (aggregate root row after the change), ``before`` (root row before the
change, None on insert/snapshot), ``row`` (the changed row, or the member row in ``for_each``),
``change`` (op, table, system, snapshot, commit_ts_ms), ``members`` (member table → list of
rows ordered by key), ``parent`` (a child command's parent match), ``vars`` (the flow's named
values), ``index`` (1-based position in ``for_each``).
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from archsync.errors import ArchsyncError
from processors import domain
from topology.model import TopologyError

NAMES = frozenset({"root", "before", "row", "change", "members", "parent", "vars", "index"})


class ExpressionSyntaxError(TopologyError):
    """An expression uses syntax or names outside the language; names ``where``."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class ExpressionError(ArchsyncError):
    """An expression failed while evaluated (unknown mapped value, bad date...)."""


# ---------------------------------------------------------------------------------------------
# functions
# ---------------------------------------------------------------------------------------------


def _changed(ctx: Mapping[str, Any], column: str) -> bool:
    root = ctx.get("root")
    if root is None:
        return False
    before = ctx.get("before")
    if before is None:
        return True
    return bool(before.get(column) != root.get(column))


def _year(value: Any) -> int | None:
    return None if value is None else domain.to_year(value)


def _month(value: Any) -> int | None:
    return None if value is None else domain.to_month(value)


def _expiry(category: Any, fiscal_year: Any) -> str | None:
    if category is None or fiscal_year is None:
        return None
    d = domain.expiry_date(str(category), fiscal_year)
    return None if d is None else d.isoformat()


def _lookup(table: str, column: str, **where: Any) -> dict[str, Any]:
    if not where:
        raise ExpressionError("lookup() needs at least one column=value condition")
    missing = [k for k, v in where.items() if v is None]
    if missing:
        raise ExpressionError(f"lookup({table!r}): the value of {missing[0]!r} is null")
    return {"$lookup": {"table": table, "column": column, "where": where}}


def _allocate(fonds: Any, klass: Any, year: Any, retention: Any, items_per_volume: Any = None) -> dict[str, Any]:
    spec = {"fonds": fonds, "class": klass, "year": _year(year), "retention": retention}
    if items_per_volume is not None:
        if type(items_per_volume) is not int or not 1 <= items_per_volume <= domain.MAX_CODE_NUMBER:
            raise ExpressionError(
                f"allocate_code(): items_per_volume must be an integer from 1 to {domain.MAX_CODE_NUMBER},"
                f" got {items_per_volume!r}"
            )
        spec["items_per_volume"] = items_per_volume
    return {"$allocate": spec}


def _concat(*parts: Any) -> str:
    return "".join("" if p is None else str(p) for p in parts)


def _coalesce(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _map(value: Any, table: Mapping[Any, Any], *default: Any) -> Any:
    if value in table:
        return table[value]
    if default:
        return default[0]
    raise ExpressionError(f"unknown value {value!r} (mapped: {', '.join(map(repr, table))})")


def _decimal(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        raise ExpressionError(f"not a decimal: {value!r}") from None


def _strip_prefix(value: Any, prefix: str) -> str | None:
    if value is None:
        return None
    text = str(value)
    if not text.startswith(prefix):
        raise ExpressionError(f"{text!r} does not start with {prefix!r}")
    return text[len(prefix) :]


def _file_format(file_name: Any, default: Any = None) -> Any:
    """Upper-case extension of a file name (``a.pdf`` → ``PDF``), else ``default``."""
    if not file_name or "." not in str(file_name):
        return default
    ext = str(file_name).rsplit(".", 1)[1].strip().upper()
    return ext or default


def _one_of(*values: Any) -> dict[str, Any]:
    return {"$in": list(values)}


def _int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ExpressionError(f"not an integer: {value!r}") from None


def _upper(value: Any) -> str | None:
    return None if value is None else str(value).upper()


def _lower(value: Any) -> str | None:
    return None if value is None else str(value).lower()


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "year": _year,
    "month": _month,
    "retention": lambda category: None if category is None else domain.retention_code(category),
    "expiry": _expiry,
    "lookup": _lookup,
    "allocate_code": _allocate,
    "concat": _concat,
    "coalesce": _coalesce,
    "upper": _upper,
    "lower": _lower,
    "now_iso": _now_iso,
    "map": _map,
    "decimal": _decimal,
    "int": _int,
    "str": lambda v: None if v is None else str(v),
    "len": lambda v: 0 if v is None else len(v),
    "strip_prefix": _strip_prefix,
    "file_format": _file_format,
    "one_of": _one_of,
}
#: functions that receive the evaluation context as first argument
CONTEXT_FUNCTIONS: dict[str, Callable[..., Any]] = {"changed": _changed}

_BINOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
}
_CMPOPS: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos}


# ---------------------------------------------------------------------------------------------
# compile-time check
# ---------------------------------------------------------------------------------------------


def _check(node: ast.AST, where: str) -> None:
    def bad(problem: str) -> ExpressionSyntaxError:
        return ExpressionSyntaxError(where, f"{problem} (column {getattr(node, 'col_offset', 0) + 1})")

    if isinstance(node, ast.Constant):
        if not isinstance(node.value, (str, int, float, bool, type(None))):
            raise bad(f"literal {node.value!r} not allowed")
        return
    if isinstance(node, ast.Name):
        if node.id not in NAMES:
            raise bad(f"unknown name {node.id!r} (known: {', '.join(sorted(NAMES))})")
        return
    if isinstance(node, ast.Attribute):
        if node.attr.startswith("_"):
            raise bad(f"attribute {node.attr!r} not allowed")
        _check(node.value, where)
        return
    if isinstance(node, ast.Subscript):
        if isinstance(node.slice, ast.Slice):
            raise bad("slices are not allowed")
        _check(node.value, where)
        _check(node.slice, where)
        return
    if isinstance(node, ast.Call):
        for kw in node.keywords:
            if kw.arg is None:
                raise bad("**kwargs are not allowed")
            _check(kw.value, where)
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise bad("*args are not allowed")
            _check(arg, where)
        func = node.func
        if isinstance(func, ast.Name):
            if func.id not in FUNCTIONS and func.id not in CONTEXT_FUNCTIONS:
                known = ", ".join(sorted([*FUNCTIONS, *CONTEXT_FUNCTIONS]))
                raise bad(f"unknown function {func.id!r} (known: {known})")
            if func.id in CONTEXT_FUNCTIONS and (len(node.args) != 1 or node.keywords):
                raise bad(f"{func.id}() takes one column name")
            if func.id != "lookup" and node.keywords:
                raise bad(f"{func.id}() takes no keyword arguments")
            return
        if isinstance(func, ast.Attribute) and func.attr == "get":
            if node.keywords or not 1 <= len(node.args) <= 2:
                raise bad(".get() takes a key and an optional default")
            _check(func.value, where)
            return
        raise bad("only the listed functions and mapping.get() may be called")
    if isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _CMPOPS:
                raise bad(f"comparison {type(op).__name__} not allowed")
        for sub in (node.left, *node.comparators):
            _check(sub, where)
        return
    if isinstance(node, ast.BoolOp):
        for sub in node.values:
            _check(sub, where)
        return
    if isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise bad(f"operator {type(node.op).__name__} not allowed")
        _check(node.operand, where)
        return
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BINOPS:
            raise bad(f"operator {type(node.op).__name__} not allowed")
        _check(node.left, where)
        _check(node.right, where)
        return
    if isinstance(node, ast.IfExp):
        for sub in (node.test, node.body, node.orelse):
            _check(sub, where)
        return
    if isinstance(node, (ast.Tuple, ast.List)):
        for sub in node.elts:
            if isinstance(sub, ast.Starred):
                raise bad("* unpacking is not allowed")
            _check(sub, where)
        return
    if isinstance(node, ast.Dict):
        for key in node.keys:
            if key is None:
                raise bad("** unpacking is not allowed")
            _check(key, where)
        for value in node.values:
            _check(value, where)
        return
    raise bad(f"{type(node).__name__} is not allowed")


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------


def _item(obj: Any, key: Any) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(key)
    if isinstance(obj, (list, tuple, str)):
        try:
            return obj[key]
        except (IndexError, TypeError):
            raise ExpressionError(f"bad index {key!r}") from None
    raise ExpressionError(f"cannot read {key!r} of a {type(obj).__name__}")


Evaluator = Callable[[Mapping[str, Any]], Any]


def _compile(node: ast.AST) -> Evaluator:
    """The checked tree as nested closures: evaluating walks no AST (what an AST walk per node and
    evaluation cost was most of the transform's time)."""
    if isinstance(node, ast.Constant):
        value = node.value
        return lambda ctx: value
    if isinstance(node, ast.Name):
        name = node.id
        return lambda ctx: ctx.get(name)
    if isinstance(node, ast.Attribute):
        of = _compile(node.value)
        attr = node.attr

        def attribute(ctx: Mapping[str, Any]) -> Any:
            obj = of(ctx)
            if obj is None:
                return None
            if not isinstance(obj, Mapping):
                raise ExpressionError(f"cannot read {attr!r} of a {type(obj).__name__}")
            return obj.get(attr)

        return attribute
    if isinstance(node, ast.Subscript):
        of, index = _compile(node.value), _compile(node.slice)
        return lambda ctx: _item(of(ctx), index(ctx))
    if isinstance(node, ast.BoolOp):
        subs = [_compile(sub) for sub in node.values]
        if isinstance(node.op, ast.And):

            def all_of(ctx: Mapping[str, Any]) -> Any:
                result: Any = None
                for sub in subs:
                    result = sub(ctx)
                    if not result:
                        return result
                return result

            return all_of

        def any_of(ctx: Mapping[str, Any]) -> Any:
            result: Any = None
            for sub in subs:
                result = sub(ctx)
                if result:
                    return result
            return result

        return any_of
    if isinstance(node, ast.Compare):
        first = _compile(node.left)
        steps = [(_CMPOPS[type(op)], _compile(comp)) for op, comp in zip(node.ops, node.comparators, strict=True)]
        if len(steps) == 1:
            ((compare, second),) = steps
            return lambda ctx: bool(compare(first(ctx), second(ctx)))

        def chain(ctx: Mapping[str, Any]) -> bool:
            left = first(ctx)
            for compare, comp in steps:
                right = comp(ctx)
                if not compare(left, right):
                    return False
                left = right
            return True

        return chain
    if isinstance(node, ast.UnaryOp):
        unary, operand = _UNARY[type(node.op)], _compile(node.operand)
        return lambda ctx: unary(operand(ctx))
    if isinstance(node, ast.BinOp):
        binop, left, right = _BINOPS[type(node.op)], _compile(node.left), _compile(node.right)
        return lambda ctx: binop(left(ctx), right(ctx))
    if isinstance(node, ast.IfExp):
        test, body, orelse = _compile(node.test), _compile(node.body), _compile(node.orelse)
        return lambda ctx: body(ctx) if test(ctx) else orelse(ctx)
    if isinstance(node, ast.Tuple):
        elts = [_compile(e) for e in node.elts]
        return lambda ctx: tuple(e(ctx) for e in elts)
    if isinstance(node, ast.List):
        elts = [_compile(e) for e in node.elts]
        return lambda ctx: [e(ctx) for e in elts]
    if isinstance(node, ast.Dict):
        pairs = [(_compile(k), _compile(v)) for k, v in zip(node.keys, node.values, strict=True) if k is not None]
        return lambda ctx: {k(ctx): v(ctx) for k, v in pairs}
    if isinstance(node, ast.Call):
        args = [_compile(a) for a in node.args]
        if isinstance(node.func, ast.Attribute):  # mapping.get(key[, default])
            of = _compile(node.func.value)

            def get(ctx: Mapping[str, Any]) -> Any:
                values = [a(ctx) for a in args]
                obj = of(ctx)
                if obj is None:
                    return values[1] if len(values) > 1 else None
                if not isinstance(obj, Mapping):
                    raise ExpressionError(f".get() on a {type(obj).__name__}")
                return obj.get(*values)

            return get
        assert isinstance(node.func, ast.Name)
        name = node.func.id
        if name in CONTEXT_FUNCTIONS:
            context_function = CONTEXT_FUNCTIONS[name]
            return lambda ctx: context_function(ctx, *[a(ctx) for a in args])
        function = FUNCTIONS[name]
        keywords = [(kw.arg, _compile(kw.value)) for kw in node.keywords if kw.arg is not None]
        if not keywords:
            if len(args) == 1:
                (only,) = args
                return lambda ctx: function(only(ctx))
            return lambda ctx: function(*[a(ctx) for a in args])
        return lambda ctx: function(*[a(ctx) for a in args], **{k: v(ctx) for k, v in keywords})
    raise ExpressionError(f"cannot evaluate {type(node).__name__}")  # unreachable after _check


class Expression:
    """A compiled expression: call it with the context mapping."""

    def __init__(self, text: str, where: str, tree: ast.Expression) -> None:
        self.text = text
        self.where = where
        self._tree = tree
        self._evaluate = _compile(tree.body)

    def __call__(self, ctx: Mapping[str, Any]) -> Any:
        """Evaluate; any failure is raised as :class:`ExpressionError` naming ``where``."""
        try:
            return self._evaluate(ctx)
        except ExpressionError as exc:
            raise ExpressionError(f"{self.where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - TypeError, DomainError, ZeroDivisionError...
            raise ExpressionError(f"{self.where}: {type(exc).__name__}: {exc} (in {self.text!r})") from None

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def constant(value: Any, where: str = "<constant>") -> Expression:
    """An expression that always yields ``value`` (YAML numbers, booleans, null)."""
    return Expression(repr(value), where, ast.Expression(body=ast.Constant(value=value)))


def compile_expression(text: str, where: str) -> Expression:
    """Parse and check ``text``; :class:`ExpressionSyntaxError` (a TopologyError) names ``where``."""
    if not isinstance(text, str):
        raise ExpressionSyntaxError(where, f"expected an expression string, got {type(text).__name__}")
    if not text.strip():
        raise ExpressionSyntaxError(where, "empty expression")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as exc:
        raise ExpressionSyntaxError(where, f"syntax error: {exc.msg} (column {exc.offset or 0})") from None
    _check(tree.body, where)
    return Expression(text, where, tree)
