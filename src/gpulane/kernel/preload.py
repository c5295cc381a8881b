"""What the fork server imports ahead of the cells: the settings, and which modules qualify.

A kernel's ``sys.modules`` holds its own machinery (ipykernel, zmq, tornado, the
standard library) beside what the notebook imported. What the notebook imported is
what was not there when ``%load_ext gpulane`` ran, plus the imports of ``%%gpu``
cells; only top-level packages count (``torch``, not ``torch.nn``: importing the
package is what costs seconds).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gpulane.config import (
    FORKSERVER_ENV,
    FORKSERVER_IDLE_ENV,
    PRELOAD_ENV,
    PRELOAD_LIMIT_ENV,
    PRELOAD_MEMORY_ENV,
)
from gpulane.jobs import OptionError, parse_count, parse_duration, parse_memory

DEFAULT_LIMIT = 40  # top-level packages
DEFAULT_MEMORY = 4 * 1024**3  # the fork server's PSS after which it preloads nothing more
DEFAULT_IDLE = 30 * 60  # seconds without a cell after which the fork server exits
# Never preloaded: gpulane and the kernel's own machinery, whatever the baseline says.
NEVER = frozenset({"gpulane", "ipykernel", "ipykernel_launcher", "zmq", "tornado", "__main__"})


@dataclass(frozen=True)
class PreloadSettings:
    """How the kernel's fork server behaves (``GPULANE_FORKSERVER``, ``GPULANE_PRELOAD*``)."""

    enabled: bool = True  # False: every worker is a fresh Python, as before the fork server
    auto: bool = True  # follow the notebook's imports
    modules: tuple[str, ...] = ()  # always preloaded (GPULANE_PRELOAD=a,b,c), in this order
    limit: int = DEFAULT_LIMIT
    memory: int = DEFAULT_MEMORY
    idle: float = DEFAULT_IDLE

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> PreloadSettings:
        """The settings the environment asks for; a malformed value is an OptionError naming it."""
        mode = env.get(PRELOAD_ENV, "").strip() or "auto"
        words = [w.strip() for w in mode.split(",") if w.strip()]
        auto = mode == "auto"
        modules: tuple[str, ...] = ()
        if mode not in ("auto", "none"):
            bad = [w for w in words if not all(part.isidentifier() for part in w.split("."))]
            if bad:
                raise OptionError(
                    f"{PRELOAD_ENV}={mode!r}: {bad[0]!r} is not a module name; "
                    "use auto, none or a comma-separated list such as torch,numpy"
                )
            modules = tuple(words)
        return cls(
            enabled=env.get(FORKSERVER_ENV, "1").strip() != "0",
            auto=auto,
            modules=modules,
            limit=_read(
                env, PRELOAD_LIMIT_ENV, DEFAULT_LIMIT, lambda t: parse_count(t, "", 10_000)
            ),
            memory=_read(env, PRELOAD_MEMORY_ENV, DEFAULT_MEMORY, lambda t: parse_memory(t, "")),
            idle=_read(env, FORKSERVER_IDLE_ENV, DEFAULT_IDLE, lambda t: parse_duration(t, "")),
        )


def _read(env: Mapping[str, str], name: str, default: int, parse: Callable[[str], int]) -> int:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = parse(text)
    except OptionError as error:
        raise OptionError(f"{name}={text!r}: {str(error).split(': ', 1)[-1]}") from None
    return value


def top_level(names: Iterable[str]) -> set[str]:
    """The top-level packages among module names, without private and standard-library ones."""
    found = set()
    for name in names:
        head = name.partition(".")[0]
        if head and not head.startswith("_") and head not in sys.stdlib_module_names:
            found.add(head)
    return found - NEVER


def cell_imports(code: str) -> list[str]:
    """Top-level packages a cell imports (``import torch.nn``, ``from numpy import ...``), in
    order; nothing for a cell that is not plain Python (its magics are not parsed here)."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    wanted = top_level(names)
    return list(dict.fromkeys(n.partition(".")[0] for n in names if n.partition(".")[0] in wanted))


class ImportWatch:
    """The notebook's imports: top-level packages the kernel gained since it loaded gpulane."""

    def __init__(self, settings: PreloadSettings, baseline: Iterable[str]) -> None:
        self.settings = settings
        self._baseline = top_level(baseline)
        self._cells: list[str] = []  # imports of %%gpu cells, oldest first

    def add_cell(self, code: str) -> None:
        if self.settings.auto:
            self._cells += [n for n in cell_imports(code) if n not in self._cells]

    def wanted(self, modules: Iterable[str]) -> list[str]:
        """What the fork server should hold, given the kernel's ``sys.modules`` keys now: the
        configured list first, then the notebook's imports (unbounded here: the server stops at
        its limit and says so)."""
        wanted = list(self.settings.modules)
        if self.settings.auto:
            wanted += sorted(top_level(modules) - self._baseline)
            wanted += self._cells
        return list(dict.fromkeys(wanted))
