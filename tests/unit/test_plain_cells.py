"""kernel/plain.py: which cells run without IPython's shell, under the shell's own code name."""

from __future__ import annotations

import pytest
from IPython.core.compilerop import code_name
from IPython.core.interactiveshell import InteractiveShell

from gpulane.kernel import plain

PLAIN = [
    "print('x')",
    "print('x')\n",
    "print('x')\n\n\n",
    "x = 1",
    "x, y = 1, 2",
    "a = 6\nb = a * 7\nb",
    "a = 6\nb = a * 7\nb\n\n",
    "import os\nos.getpid()",
    "for i in range(3):\n    print(i)",
    "def f():\n    return 1\nf()",
    "class A:\n    pass\nA()",
    "'a string'",
    "(1 +\n 2)",
    "d = {\n  1: 2}\nd",
    "model = fit(X)",  # X: an input below
    "X.sum()",
]
NOT_PLAIN = [
    "",
    "   ",
    "\nprint('x')",  # the shell strips leading blank lines
    "  print('x')",  # and a leading indent
    "%time x = 1",
    "%%time\nx = 1",
    "!ls",
    "x = !ls",
    "x?",
    "pwd",  # automagic: %pwd
    "cd",
    ">>> print('x')",
    "print('x')\n... ",
    "await something()",
    "import asyncio\nawait asyncio.sleep(0)",
    "from __future__ import annotations\nx: int = 1",
    "_",
    "print(_)",
    "for _ in range(3):\n    pass",
    "Out[1]",
    "_i1",
    "get_ipython().run_line_magic('time', 'x')",
    "display('x')\nprint(1)",
    "print(dir())",
    "import sys\nsys.displayhook(1)",
    "exit()",
    "return 1",  # a statement the shell compiles and reports itself
    "def f(:\n    pass",
    "x = 1  # PYTHON-MODE",
]


@pytest.fixture(scope="module")
def shell() -> InteractiveShell:
    return InteractiveShell.instance()


@pytest.mark.parametrize("code", PLAIN)
def test_a_plain_cell_gets_the_shells_own_source_and_code_name(shell, code):
    cell = plain.plan(code, 3, {"X": object()})
    assert cell is not None
    assert cell.source == shell.transform_cell(code)
    assert cell.name == code_name(shell.transform_cell(code), 3)


@pytest.mark.parametrize("code", NOT_PLAIN)
def test_a_cell_that_needs_the_shell_is_left_to_it(code):
    assert plain.plan(code, 1, {}) is None


def test_the_last_expression_is_the_result_and_statements_run_in_order():
    namespace = plain.main_module().__dict__
    cell = plain.plan("a = 6\nb = a * 7\nb", 1, namespace)
    assert cell is not None
    outcome = plain.run(cell, namespace, lambda error: None)
    assert (outcome.value, outcome.error, namespace["a"]) == (42, None, 6)
    none = plain.plan("print('x')", 1, namespace)
    assert none is not None and plain.run(none, namespace, lambda error: None).value is None


def test_the_first_error_ends_the_cell_and_is_handed_over_while_handled():
    namespace = plain.main_module().__dict__
    cell = plain.plan("a = 1\nb = 1 / 0\nc = 3", 1, namespace)
    assert cell is not None
    seen: list[BaseException] = []
    outcome = plain.run(cell, namespace, seen.append)
    assert isinstance(outcome.error, ZeroDivisionError) and seen == [outcome.error]
    assert "a" in namespace and "c" not in namespace
