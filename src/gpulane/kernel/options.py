"""Options of ``%%gpu``: argparse through IPython's magic_arguments (so ``%%gpu?`` shows help).

The seed's ``key=value`` form (``%%gpu time=02:00:00 mem=8G``) is accepted too:
each ``key=value`` word becomes ``--key value`` before parsing.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from dataclasses import dataclass

from gpulane.jobs import OptionError, Request, build_request, parse_memory

DEFAULT_MAX_TRANSFER = 2 * 1024**3
_KEY_VALUE = re.compile(r"^([a-z][a-z_-]*)=(.*)$")
_KEYS = {"gpus", "slices", "time", "mem", "name", "return", "max-transfer", "max_transfer"}


@dataclass(frozen=True)
class CellOptions:
    request: Request
    background: bool
    returns: tuple[str, ...] | None  # None: the names the cell assigns
    session: bool
    max_transfer: int


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise OptionError(f"%%gpu: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        raise OptionError(message or "%%gpu: see %%gpu? for the options")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="%%gpu", add_help=False, description="Run this cell on a GPU when it is your turn."
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gpus", metavar="N", help="whole GPUs (default 1)")
    group.add_argument("--slices", metavar="K", help="K time-sliced slices of one GPU")
    parser.add_argument("--time", metavar="T", help="time limit: HH:MM:SS, MM:SS, 90m, 2h")
    parser.add_argument("--mem", metavar="M", help="host memory: 8G, 512M")
    parser.add_argument("--name", metavar="NAME", help="the name the queue shows")
    parser.add_argument(
        "--bg", action="store_true", help="return at once; the job runs in the background"
    )
    returns = parser.add_mutually_exclusive_group()
    returns.add_argument(
        "--return",
        dest="returns",
        metavar="NAMES",
        help="only these names come back (comma-separated)",
    )
    returns.add_argument("--no-return", action="store_true", help="no names come back")
    parser.add_argument(
        "--session", action="store_true", help="run in the GPU session (%%gpu session start)"
    )
    parser.add_argument(
        "--max-transfer",
        metavar="SIZE",
        help="largest total of variables sent or returned (default 2G)",
    )
    return parser


def _normalise(words: list[str]) -> list[str]:
    out: list[str] = []
    for word in words:
        match = _KEY_VALUE.match(word)
        if match and match.group(1) in _KEYS:
            out += [f"--{match.group(1).replace('_', '-')}", match.group(2)]
        else:
            out.append(word)
    return out


def parse_cell_options(line: str, default_name: str = "gpu-cell") -> CellOptions:
    """Parse the ``%%gpu`` line; raises OptionError with a one-line message."""
    try:
        words = shlex.split(line)
    except ValueError as error:
        raise OptionError(f"%%gpu: cannot read the options: {error}") from None
    args = build_parser().parse_args(_normalise(words))
    if args.returns is not None:
        named = tuple(n.strip() for n in args.returns.split(",") if n.strip())
        bad = [n for n in named if not n.isidentifier()]
        if bad:
            raise OptionError(
                f"%%gpu: --return {args.returns!r}: {', '.join(bad)} is not a Python name"
            )
        returns: tuple[str, ...] | None = named
    else:
        returns = () if args.no_return else None
    request = build_request(
        gpus=args.gpus,
        slices=args.slices,
        time=args.time,
        mem=args.mem,
        name=args.name or default_name,
    )
    if args.max_transfer:
        max_transfer = parse_memory(args.max_transfer, "--max-transfer")
    elif os.environ.get("GPULANE_MAX_TRANSFER"):
        max_transfer = parse_memory(os.environ["GPULANE_MAX_TRANSFER"], "GPULANE_MAX_TRANSFER")
    else:
        max_transfer = DEFAULT_MAX_TRANSFER
    return CellOptions(request, args.bg, returns, args.session, max_transfer)


def help_text() -> str:
    return build_parser().format_help()
