"""A cold worker's first cell, run as IPython's shell runs it, before IPython is imported.

A worker that starts cold (inside a Slurm allocation, or with no fork server) would spend
~130 ms importing IPython and building its shell before the cell's first line. A cell that
is plain Python and touches nothing of IPython's runs the same without the shell:
:func:`plan` says whether a cell is one (conservatively: any doubt and it goes through the
shell), and :func:`run` runs it the way ``InteractiveShell.run_cell`` does:

- the same code name (``<ipython-input-N-HASH>``, the hash of the cell as IPython
  transforms it) with the cell's lines in :mod:`linecache`, so a traceback reads the same;
- each top-level statement compiled on its own with the shell's flags (top-level ``await``
  allowed: a cell that awaits goes through the shell), the last one in ``single`` mode if
  it is an expression, its value caught by ``sys.displayhook`` as the shell's display trap
  catches it (the cell's result: ``Out[n]`` and ``_`` in the kernel);
- in a ``__main__`` module like the shell's, which the shell adopts when it is built.

What the shell does around a cell that such a cell can see is done here too
(``__IPYTHON__``, the prompts in ``sys``, the DeprecationWarning filter of ``__main__``).
The shell is still built where the cell needs it: when anything imports IPython (a
``display``, matplotlib's inline backend), when the cell calls ``get_ipython()`` or
``display()`` through a name the code does not show, and to show a traceback.
"""

from __future__ import annotations

import ast
import builtins
import keyword
import linecache
import re
import sys
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The flags IPython's CachingCompiler compiles a cell's statements with.
_DONT_IMPLY_DEDENT = 0x200
_FLAGS = _DONT_IMPLY_DEDENT | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_CO_COROUTINE = 0x80

# Names whose meaning comes from the shell (its namespace, history, builtins, traps) or that
# list the namespace: a cell that uses one goes through the shell.
_SHELL_NAMES = frozenset(
    {
        "get_ipython", "display", "In", "Out", "exit", "quit", "__IPYTHON__",
        "dir", "globals", "locals", "vars", "excepthook", "displayhook",
    }
)  # fmt: skip
_HISTORY_NAME = re.compile(r"_i{0,3}\Z|_{2,3}\Z|_i?\d+\Z|_[iod]h\Z")
_PROMPT = re.compile(r"\s*(>>>|\.\.\.|In \[)")  # lines IPython's prompt strippers may change
_HEAD = re.compile(r"%{0,2}([\w.*]*)\s*(.*)")  # IPython's split of one line: ifun, the rest


@dataclass(frozen=True)
class Plan:
    """A cell that runs without the shell: its code name and its compiled statements."""

    name: str
    source: str  # the cell as IPython's transform_cell leaves it
    statements: tuple[types.CodeType, ...]  # the last in "single" mode if it is an expression


def plan(code: str, number: int, namespace: dict[str, Any]) -> Plan | None:
    """The cell's plan if it is plain Python the shell would run unchanged; None otherwise."""
    lines = code.splitlines()
    if not lines or not lines[0].strip() or lines[0][0] in " \t" or "PYTHON-MODE" in code:
        return None  # empty, leading blank lines or indent (the shell strips them), Emacs mode
    if any(_PROMPT.match(line) for line in lines[:2]):
        return None
    if len(lines) == 1:
        if not _plain_line(lines[0], namespace):
            return None
        source = lines[0] + "\n"  # the shell's one-line path (prefilter) ends it so
    else:
        source = code if code.endswith("\n") else code + "\n"
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, OverflowError, MemoryError):
        return None  # the shell says what is wrong, in its own words
    if not tree.body or not _plain_names(tree):
        return None
    name = _code_name(source, number)
    last = len(tree.body) - 1
    statements: list[types.CodeType] = []
    for index, node in enumerate(tree.body):
        single = index == last and isinstance(node, ast.Expr)
        module: ast.Interactive | ast.Module = (
            ast.Interactive([node]) if single else ast.Module([node], [])
        )
        try:
            compiled = compile(module, name, "single" if single else "exec", _FLAGS, True)
        except (SyntaxError, ValueError):
            return None  # the shell runs the statements before it, then shows this error
        if compiled.co_flags & _CO_COROUTINE:
            return None  # top-level await: the shell runs it in its event loop
        statements.append(compiled)
    return Plan(name, source, tuple(statements))


def _plain_line(line: str, namespace: dict[str, Any]) -> bool:
    """A one-line cell that IPython's prefilter leaves alone: its first name is a Python
    name (a keyword, a builtin, a variable) or it is assigned; an unknown name might be a
    magic called without its ``%`` (automagic)."""
    match = _HEAD.match(line)
    if match is None or line.startswith("%"):
        return False
    ifun, rest = match.groups()
    head = ifun.split(".", 1)[0]
    if not head or keyword.iskeyword(head) or hasattr(builtins, head) or head in namespace:
        return True
    return rest[:1] in ("=", ",")


def _plain_names(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and (node.id in _SHELL_NAMES or _HISTORY_NAME.match(node.id)):
            return False
        if isinstance(node, ast.Attribute) and node.attr in _SHELL_NAMES:
            return False
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            return False  # the shell keeps a cell's future flags for the cells after it
    return True


def _code_name(source: str, number: int) -> str:
    """IPython's name for a cell's code (``IPython.core.compilerop.code_name``)."""
    try:
        from _sha1 import sha1  # type: ignore[import-not-found]  # built in, no stub; hashlib loads OpenSSL
    except ImportError:
        from hashlib import sha1
    digest = sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
    return f"<ipython-input-{number}-{digest[:12]}>"


def main_module() -> types.ModuleType:
    """The cell's ``__main__``, as the shell makes it (the shell adopts it when built)."""
    module = types.ModuleType(
        "__main__", doc="Automatically created module for IPython interactive environment"
    )
    module.__dict__.setdefault("__builtin__", builtins)
    module.__dict__.setdefault("__builtins__", builtins)
    sys.modules["__main__"] = module
    # What the shell sets up that a cell can see: its flag, its prompts, __main__'s warnings.
    builtins.__IPYTHON__ = True  # type: ignore[attr-defined]
    sys.ps1, sys.ps2, sys.ps3 = "In : ", "...: ", "Out: "  # type: ignore[attr-defined]
    warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
    return module


@dataclass
class Outcome:
    """How a plain cell ended: ``error`` is what it raised, with ``sys.exc_info`` still
    describing it when :func:`run` hands it to ``on_error``."""

    value: Any = None  # the last expression's value (None: no value)
    error: BaseException | None = None


def run(
    cell: Plan, namespace: dict[str, Any], on_error: Callable[[BaseException], None]
) -> Outcome:
    """Run the cell's statements in ``namespace``; the first that raises ends it, and
    ``on_error`` is called inside the ``except`` (the error's traceback starts with this
    function's frame, then the cell's)."""
    linecache.cache[cell.name] = (
        len(cell.source),
        None,
        [line + "\n" for line in cell.source.splitlines()],
        cell.name,
    )
    outcome = Outcome()

    def catch(value: Any) -> None:
        if value is not None:
            outcome.value = value

    saved, sys.displayhook = sys.displayhook, catch
    try:
        for statement in cell.statements:
            try:
                exec(statement, namespace)
            except BaseException as error:
                outcome.error = error
                sys.displayhook = saved
                on_error(error)
                break
    finally:
        sys.displayhook = saved
    return outcome
