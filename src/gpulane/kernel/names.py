"""Which names a cell reads and binds: the kernel sends the first, the GPU worker returns the second.

Both are found from the cell's code as IPython transforms it (magics and ``!``
commands included), never by running it.
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Iterator
from typing import Any

_IPYTHON_NAMES = frozenset(
    {"In", "Out", "get_ipython", "exit", "quit", "_", "__", "___"}
    | {"_i", "_ii", "_iii", "_oh", "_dh", "_ih"}
)
_IPYTHON_NUMBERED = re.compile(r"_i?\d+")
# IPython expands $name and {expression} in ! commands and in most magic lines.
_DOLLAR_NAME = re.compile(r"(?<!\$)\$([A-Za-z_]\w*)")
_BRACED = re.compile(r"\{([^{}]+)\}")
# Magics that run their code in the user namespace, so what they assign is bound there.
# Magics whose argument is Python code: only their names are read (not `%%writefile data.py`'s).
_CODE_LINE_MAGICS = frozenset({"time", "timeit", "prun", "debug", "pinfo", "pinfo2", "psource"})
_CODE_CELL_MAGICS = frozenset({"time", "timeit", "prun", "debug", "capture"})
_BINDING_LINE_MAGICS = frozenset({"time"})
_BINDING_CELL_MAGICS = frozenset({"time", "capture"})


def _parse(code: str) -> ast.Module:
    # Lazy import: the GPU worker only unpacks and packs, it never needs the transformer.
    from IPython.core.inputtransformer2 import TransformerManager

    manager = TransformerManager()  # type: ignore[no-untyped-call]
    return ast.parse(manager.transform_cell(code))


def _is_ipython_internal(name: str) -> bool:
    return name in _IPYTHON_NAMES or _IPYTHON_NUMBERED.fullmatch(name) is not None


def names_used(code: str) -> set[str]:
    """Names the cell may read (a safe over-estimate); a SyntaxError propagates to the caller.

    Builtins stay in: a notebook variable named ``sum`` or ``input`` shadows the builtin
    and must travel; the caller ships only names its namespace really holds.
    """
    names = _names_read(_parse(code))
    return {n for n in names if not _is_ipython_internal(n)}


def _names_read(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load | ast.Del):
            names.add(node.id)
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)  # `x += 1` reads x first
        elif isinstance(node, ast.Call):
            names |= _names_in_magic_call(node)
    return names


def _magic_call(node: ast.Call) -> tuple[str, list[str]] | None:
    """('run_line_magic', ['time', 'x = f(y)']) for ``get_ipython().run_line_magic(...)`` calls."""
    func = node.func
    if not (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Call)
        and isinstance(func.value.func, ast.Name)
        and func.value.func.id == "get_ipython"
    ):
        return None
    args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return func.attr, args


def _names_in_magic_call(node: ast.Call) -> set[str]:
    # `%time y = f(x)` and `!ls {path}` hide names inside strings; the transformer leaves them there.
    call = _magic_call(node)
    if call is None:
        return set()
    method, args = call
    names: set[str] = set()
    for text in args[
        :2
    ]:  # IPython expands $x and {x} in ! commands and magic lines, not cell bodies
        names |= _expansion_names(text)
    if method == "run_line_magic" and len(args) == 2 and args[0] in _CODE_LINE_MAGICS:
        names |= _python_suffix_names(args[1])
    elif method == "run_cell_magic" and len(args) == 3 and args[0] in _CODE_CELL_MAGICS:
        names |= _python_suffix_names(args[1]) if args[0] == "timeit" else set()  # setup code
        with contextlib.suppress(SyntaxError):
            names |= _names_read(_parse(args[2]))
    return names


def _expansion_names(text: str) -> set[str]:
    names = set(_DOLLAR_NAME.findall(text))
    for expression in _BRACED.findall(text):
        with contextlib.suppress(SyntaxError):
            names |= _names_read(ast.parse(expression, mode="eval"))
    return names


def _python_suffix_names(line: str) -> set[str]:
    # A magic line is often options then code (`%timeit -n 10 f(x)`): read the longest suffix that parses.
    words = line.split()
    for start in range(min(len(words), 16)):  # options are few; do not parse a huge line n times
        with contextlib.suppress(SyntaxError):
            return _names_read(ast.parse(" ".join(words[start:])))
    return set()


def names_assigned(code: str, tree: ast.Module | None = None) -> list[str]:
    """Public names the cell binds at module level, in the order they are first bound
    (``tree``: the cell already parsed, where it is plain Python, as IPython leaves it)."""
    bound: dict[str, None] = {}  # an ordered set
    _bind_statements((tree or _parse(code)).body, bound)
    return [name for name in bound if not name.startswith("_")]


def _bind_statements(statements: list[ast.stmt], bound: dict[str, None]) -> None:
    for statement in statements:
        _bind_statement(statement, bound)


def _bind_statement(node: ast.stmt, bound: dict[str, None]) -> None:
    add = bound.setdefault
    match node:
        case ast.FunctionDef() | ast.AsyncFunctionDef() | ast.ClassDef():
            _bind_walrus(node.decorator_list, bound)
            add(node.name)
            for name in _global_names(node):
                add(name)  # `global g` inside a def binds g at module level when it runs
        case ast.Assign(targets=targets, value=value):
            _bind_walrus([value], bound)
            for target in targets:
                _bind_target(target, bound)
        case ast.AnnAssign(target=target, value=value) if value is not None:
            _bind_walrus([value], bound)  # `x: int` alone binds nothing
            _bind_target(target, bound)
        case ast.AugAssign(target=target, value=value):
            _bind_walrus([value], bound)
            _bind_target(target, bound)
        case ast.For(target=target, iter=iterable) | ast.AsyncFor(target=target, iter=iterable):
            _bind_walrus([iterable], bound)
            _bind_target(target, bound)
            _bind_statements(node.body + node.orelse, bound)
        case ast.While(test=test) | ast.If(test=test):
            _bind_walrus([test], bound)
            _bind_statements(node.body + node.orelse, bound)
        case ast.With(items=items) | ast.AsyncWith(items=items):
            for item in items:
                _bind_walrus([item.context_expr], bound)
                if item.optional_vars is not None:
                    _bind_target(item.optional_vars, bound)
            _bind_statements(node.body, bound)
        case ast.Try() | ast.TryStar():
            _bind_statements(node.body, bound)
            for handler in node.handlers:
                if handler.name:
                    add(handler.name)
                _bind_statements(handler.body, bound)
            _bind_statements(node.orelse + node.finalbody, bound)
        case ast.Match(subject=subject, cases=cases):
            _bind_walrus([subject], bound)
            for case in cases:
                _bind_pattern(case.pattern, bound)
                if case.guard is not None:
                    _bind_walrus([case.guard], bound)
                _bind_statements(case.body, bound)
        case ast.Import(names=aliases):
            for alias in aliases:
                add(alias.asname or alias.name.partition(".")[0])
        case ast.ImportFrom(names=aliases):
            for alias in aliases:
                if alias.name != "*":  # a star import binds names we cannot know
                    add(alias.asname or alias.name)
        case ast.Expr(value=ast.Call() as call) if _magic_call(call) is not None:
            _bind_magic(call, bound)
        case _:
            _bind_walrus([node], bound)


def _bind_target(target: ast.expr, bound: dict[str, None]) -> None:
    # Only bare names bind; `a.b = 1` and `a[0] = 1` change an object, not the namespace.
    match target:
        case ast.Name(id=name):
            bound.setdefault(name)
        case ast.Tuple(elts=elements) | ast.List(elts=elements):
            for element in elements:
                _bind_target(element, bound)
        case ast.Starred(value=value):
            _bind_target(value, bound)
        case _:
            _bind_walrus([target], bound)


def _bind_pattern(pattern: ast.AST, bound: dict[str, None]) -> None:
    # Sub-patterns first: `case {"k": v, **rest}` and `case P(x=a) as p` bind left to right.
    for child in ast.iter_child_nodes(pattern):
        _bind_pattern(child, bound)
    match pattern:
        case ast.MatchAs(name=str(name)) | ast.MatchStar(name=str(name)):
            bound.setdefault(name)
        case ast.MatchMapping(rest=str(name)):
            bound.setdefault(name)


def _bind_walrus(nodes: list[Any], bound: dict[str, None]) -> None:
    # `:=` binds in the enclosing function scope, even inside a comprehension, but not in a def/lambda.
    for node in nodes:
        for child in _walk_same_scope(node):
            if isinstance(child, ast.NamedExpr):
                _bind_target(child.target, bound)


def _walk_same_scope(node: ast.AST) -> Iterator[ast.AST]:
    """Nodes in source order, not entering the body of a def, lambda or class (its own scope)."""
    yield node
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk_same_scope(child)


def _global_names(node: ast.AST) -> list[str]:
    return [name for n in ast.walk(node) if isinstance(n, ast.Global) for name in n.names]


def _bind_magic(call: ast.Call, bound: dict[str, None]) -> None:
    # `%time x = f()` and `%%time` / `%%capture out` cells run their code in the user namespace.
    method, args = _magic_call(call) or ("", [])
    code = ""
    if method == "run_line_magic" and len(args) == 2 and args[0] in _BINDING_LINE_MAGICS:
        code = args[1]
    elif method == "run_cell_magic" and len(args) == 3 and args[0] in _BINDING_CELL_MAGICS:
        if args[0] == "capture" and args[1].split():
            bound.setdefault(args[1].split()[-1])
        code = args[2]
    with contextlib.suppress(SyntaxError):
        _bind_statements(_parse(code).body, bound)


# Marks a name whose attribute or item the cell assigns, deletes or augments (`cfg['lr'] = 0.1`),
# or on which it calls a method with ``inplace=True``: a change for sure, whatever its type.
CHANGED = "="


def names_mutated(code: str) -> dict[str, set[str]]:
    """Names whose object the cell may change in place, each with how: :data:`CHANGED`, and
    the methods called on it (``model.fit(X)`` gives ``{"model": {"fit"}}``).

    Found from the code alone, in every scope of the cell: a change through another name
    (an alias, or a function of another name that changes it) is not seen.
    """
    found: dict[str, set[str]] = {}
    for node in ast.walk(_parse(code)):
        if isinstance(node, ast.Attribute | ast.Subscript) and isinstance(
            node.ctx, ast.Store | ast.Del
        ):
            root = _root_name(node.value)
            if root is not None:
                found.setdefault(root, set()).add(CHANGED)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            root = _root_name(node.func.value)
            if root is not None:
                in_place = any(
                    k.arg == "inplace" and isinstance(k.value, ast.Constant) and k.value.value
                    for k in node.keywords
                )
                found.setdefault(root, set()).add(CHANGED if in_place else node.func.attr)
    return {name: how for name, how in found.items() if not _is_ipython_internal(name)}


def _root_name(node: ast.expr) -> str | None:
    """``a`` for ``a``, ``a.b``, ``a[0].c``; None when the chain starts elsewhere (a call)."""
    while isinstance(node, ast.Attribute | ast.Subscript):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None
