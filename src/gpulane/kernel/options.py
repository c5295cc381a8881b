"""Options of ``%%gpu`` and ``%gpu session start``, through IPython's ``magic_arguments``.

:func:`gpu_arguments` puts every option on the magic, so ``%%gpu?`` (and ``%gpu?``)
lists them with their help. The seed's ``key=value`` form (``%%gpu time=02:00:00
mem=8G``) is accepted too: each such word becomes ``--key value`` before parsing.
A bad option raises :class:`~gpulane.errors.OptionError` with one line; the
magic shows it as IPython's ``UsageError``.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from IPython.core.error import UsageError
from IPython.core.magic_arguments import ArgDecorator, argument, magic_arguments

from gpulane.config import MAX_TRANSFER_ENV
from gpulane.jobs import OptionError, Request, build_request, parse_duration, parse_memory

DEFAULT_MAX_TRANSFER = 2 * 1024**3
DEFAULT_SESSION_IDLE = 15 * 60.0
_KEY_VALUE = re.compile(r"^([a-z][a-z_-]*)=(.*)$")
_KEYS = {"gpus", "slices", "gpu-mem", "gpu_mem", "time", "mem", "name", "return"} | {
    "max-transfer",
    "max_transfer",
}
_ALL = "*"  # a bare --no-return: no names at all

_Func = TypeVar("_Func", bound=Callable[..., Any])


@dataclass(frozen=True)
class CellOptions:
    request: Request
    background: bool
    returns: tuple[str, ...] | None  # None: the names the cell assigns or changes
    session: bool
    max_transfer: int
    no_return: tuple[str, ...] = ()  # names that stay as they are in the notebook
    no_session: bool = False  # queue on its own even while a GPU session is open


@dataclass(frozen=True)
class SessionOptions:
    cell: CellOptions  # what the session's job asks for
    idle: float  # seconds unused before the GPU is given back


class exclusive(ArgDecorator):
    """Options of which one at most may be given (magic_arguments has no decorator for this)."""

    def __init__(self, *arguments: argument) -> None:
        self.arguments = arguments

    def add_to_parser(self, parser: argparse.ArgumentParser, group: Any) -> None:
        choice = parser.add_mutually_exclusive_group()
        for option in self.arguments:
            choice.add_argument(*option.args, **option.kwds)


def _option(*flags: str, **settings: Any) -> argument:
    return argument(*flags, **settings)  # type: ignore[no-untyped-call]


_ARGUMENTS: tuple[ArgDecorator, ...] = (
    exclusive(
        _option("--gpus", metavar="N", help="whole GPUs (default 1)"),
        _option("--slices", metavar="K", help="K time-sliced slices of one GPU"),
        _option("--gpu-mem", metavar="M", help="this much memory of one GPU: 10G, 512M"),
    ),
    _option("--time", metavar="T", help="time limit: HH:MM:SS, MM:SS, 90m, 2h"),
    _option("--mem", metavar="M", help="host memory: 8G, 512M"),
    _option("--name", metavar="NAME", help="the name the queue shows (default cell-N)"),
    _option("--bg", action="store_true", help="return at once; the job runs in the background"),
    exclusive(
        _option(
            "--return",
            dest="returns",
            metavar="NAMES",
            help="only these names come back (comma-separated)",
        ),
        _option(
            "--no-return",
            metavar="NAME",
            nargs="?",
            action="append",
            const=_ALL,
            help="NAME (repeatable or comma-separated) stays as it is in the notebook; "
            "alone: no names come back",
        ),
    ),
    exclusive(
        _option(
            "--session",
            action="store_true",
            help="run in the GPU session (%%gpu session start); the default while one is open",
        ),
        _option(
            "--no-session",
            action="store_true",
            help="queue on its own even while a GPU session is open",
        ),
    ),
    _option(
        "--max-transfer",
        metavar="SIZE",
        help="largest total of variables sent or returned (default 2G; or GPULANE_MAX_TRANSFER)",
    ),
    _option(
        "--idle",
        metavar="T",
        help="%%gpu session start only: give the GPU back after this long unused (default 15m)",
    ),
)


def gpu_arguments(func: _Func) -> _Func:
    """Give ``func`` the options' parser (``func.parser``) and a docstring that lists them."""
    # magic_arguments builds the parser from the decorators in source order: apply them last first.
    for decorate in reversed(_ARGUMENTS):
        func = decorate(func)
    build = magic_arguments(name="gpu")  # type: ignore[no-untyped-call]
    return build(func)  # type: ignore[no-any-return]


@gpu_arguments
def _options(line: str) -> None:
    """Run a cell on a GPU when it is your turn."""


def parse_cell_options(line: str, default_name: str = "gpu-cell") -> CellOptions:
    """Parse the ``%%gpu`` line; raises OptionError with a one-line message."""
    args = _parse(line, "%%gpu")
    if args.idle is not None:
        raise OptionError("%%gpu: --idle goes with %gpu session start, not a cell")
    return _cell_options(args, default_name, "%%gpu")


def parse_session_options(line: str) -> SessionOptions:
    """Parse what follows ``%gpu session start``; raises OptionError with a one-line message."""
    prog = "%gpu session start"
    args = _parse(line, prog)
    idle = DEFAULT_SESSION_IDLE
    if args.idle is not None:
        try:
            idle = float(parse_duration(args.idle, "--idle"))
        except OptionError as error:
            raise OptionError(f"{prog}: {error}") from None
    return SessionOptions(_cell_options(args, "gpu-session", prog), idle)


def help_text() -> str:
    return _options.__doc__ or ""


def _parse(line: str, prog: str) -> argparse.Namespace:
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise OptionError(f"{prog}: cannot read the options: {error}") from None
    parser: argparse.ArgumentParser = _options.parser  # type: ignore[attr-defined]
    try:
        return parser.parse_args(_normalise(words))
    except UsageError as error:  # argparse's complaint, already without a traceback
        raise OptionError(f"{prog}: {' '.join(str(error).split())}") from None


def _normalise(words: list[str]) -> list[str]:
    out: list[str] = []
    for word in words:
        match = _KEY_VALUE.match(word)
        if match and match.group(1) in _KEYS:
            out += [f"--{match.group(1).replace('_', '-')}", match.group(2)]
        else:
            out.append(word)
    return out


def _names(option: str, words: list[str], prog: str) -> tuple[str, ...]:
    named = tuple(n.strip() for word in words for n in word.split(",") if n.strip())
    bad = [n for n in named if not n.isidentifier()]
    if bad:
        raise OptionError(
            f"{prog}: {option} {','.join(words)!r}: {', '.join(bad)} is not a Python name"
        )
    return named


def _cell_options(args: argparse.Namespace, default_name: str, prog: str) -> CellOptions:
    left_out = args.no_return or []
    no_return: tuple[str, ...] = ()
    if args.returns is not None:
        returns: tuple[str, ...] | None = _names("--return", [args.returns], prog)
    elif _ALL in left_out:
        returns = ()
    else:
        returns, no_return = None, _names("--no-return", left_out, prog)
    try:
        request = build_request(
            gpus=args.gpus,
            slices=args.slices,
            gpu_mem=args.gpu_mem,
            time=args.time,
            mem=args.mem,
            name=args.name or default_name,
        )
        if args.max_transfer:
            max_transfer = parse_memory(args.max_transfer, "--max-transfer")
        elif os.environ.get(MAX_TRANSFER_ENV):
            max_transfer = parse_memory(os.environ[MAX_TRANSFER_ENV], MAX_TRANSFER_ENV)
        else:
            max_transfer = DEFAULT_MAX_TRANSFER
    except OptionError as error:
        raise OptionError(f"{prog}: {error}") from None
    return CellOptions(
        request, args.bg, returns, args.session, max_transfer, no_return, args.no_session
    )
