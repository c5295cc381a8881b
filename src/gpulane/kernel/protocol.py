"""The messages between the kernel (``kernel/worker.py``) and its GPU worker (``kernel/runner.py``).

They travel over a ``multiprocessing.connection`` channel as plain dicts with an
``op`` key; both ends are the same install, so the format is only versioned by
:data:`PROTOCOL`, which the worker reports in its ``ready``. Each side builds the
dataclasses below and calls :func:`encode`; the receiving side calls
:func:`decode`, which refuses an unknown ``op``, a missing or extra field, or a
field of the wrong type with one :class:`ProtocolError` line.

To the worker (:data:`ToWorker`):

- ``run`` (:class:`RunCell`): the cell's code, its input variables, which names to
  return, the grant's environment (applied on the first cell only), and whether the
  worker ends after it (``once``; a session's worker stays).
- ``interrupt`` (:class:`Interrupt`): raise ``KeyboardInterrupt`` in the running cell
  (sent where no signal reaches the worker: one that a cluster started elsewhere).
- ``stop`` (:class:`Stop`): end the worker between cells.

From the worker (:data:`FromWorker`):

- ``ready`` (:class:`Ready`): the worker's pid and protocol, once its channel is up (a
  worker forked with IPython has built its shell; a cold one may run its first cell first).
- ``stream`` (:class:`Stream`): stdout or stderr text, only where the worker has no
  pipes to the kernel (a worker on another machine).
- ``display`` (:class:`Display`), ``result`` (:class:`Result`),
  ``clear_output`` (:class:`ClearOutput`): IPython's rich output, for the notebook.
- ``error`` (:class:`CellError`): the cell raised; its traceback, and a hint (GPU out
  of memory under a slice's cap).
- ``warning`` (:class:`CellWarning`): a one-line note (a memory cap applied, a variable
  that could not be restored).
- ``done`` (:class:`Done`): the cell ended; ``ok`` and the names it returns, with its
  last expression's value among them under ``gpulane.kernel.returns.RESULT``.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeAlias, TypeVar

from gpulane.errors import GpulaneError
from gpulane.kernel.transfer import Packed

PROTOCOL = 1
Wire: TypeAlias = dict[str, Any]


class ProtocolError(GpulaneError):
    """A message on the worker channel that this install's protocol does not know."""


# --------------------------------------------------------------------------- to the worker
# Every message class has a docstring: @dataclass makes one for a class without, from
# inspect.signature (~0.5 ms a class before a cold worker's first line).


@dataclass(frozen=True)
class RunCell:
    """Run this cell (the grant's environment is applied on the first cell only)."""

    op: ClassVar[str] = "run"
    code: str
    inputs: Packed
    returns: tuple[str, ...] | None  # None: the names the cell assigns
    execution_count: int
    spill_dir: str
    max_transfer: int
    once: bool
    env: dict[str, str] = field(default_factory=dict)  # the grant's environment


@dataclass(frozen=True)
class Interrupt:
    """Raise KeyboardInterrupt in the running cell (where no signal reaches the worker)."""

    op: ClassVar[str] = "interrupt"


@dataclass(frozen=True)
class Stop:
    """End the worker between cells."""

    op: ClassVar[str] = "stop"


# --------------------------------------------------------------------------- from the worker


@dataclass(frozen=True)
class Ready:
    """The worker's channel is up: its pid and protocol."""

    op: ClassVar[str] = "ready"
    pid: int
    protocol: int


@dataclass(frozen=True)
class Stream:
    """stdout or stderr text, where the worker has no pipes to the kernel."""

    op: ClassVar[str] = "stream"
    name: str  # "stdout" or "stderr"
    text: str


@dataclass(frozen=True)
class Display:
    """IPython rich output for the notebook (``display``, or its update)."""

    op: ClassVar[str] = "display"
    data: dict[str, Any]
    metadata: dict[str, Any]
    transient: dict[str, Any]
    update: bool


@dataclass(frozen=True)
class Result:
    """The value of the cell's last expression (``Out``), shown like a display."""

    op: ClassVar[str] = "result"
    data: dict[str, Any]
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ClearOutput:
    """IPython's ``clear_output``."""

    op: ClassVar[str] = "clear_output"
    wait: bool


@dataclass(frozen=True)
class CellError:
    """The cell raised: its traceback, and a hint (out of memory under a slice's cap)."""

    op: ClassVar[str] = "error"
    ename: str
    evalue: str
    traceback: list[str]
    hint: str | None = None

    def traceback_with_hint(self) -> list[str]:
        return [*self.traceback, f"gpulane: {self.hint}"] if self.hint else list(self.traceback)


@dataclass(frozen=True)
class CellWarning:
    """A one-line note for the user (a cap applied, a variable not restored)."""

    op: ClassVar[str] = "warning"
    text: str


@dataclass(frozen=True)
class Done:
    """The cell ended: whether it succeeded, and the names it returns."""

    op: ClassVar[str] = "done"
    ok: bool
    outputs: Packed | None = None  # None: the cell failed, or its names could not be sent


ToWorker: TypeAlias = RunCell | Interrupt | Stop
CellOutput: TypeAlias = Display | Result | ClearOutput | CellError | CellWarning
FromWorker: TypeAlias = Ready | Stream | CellOutput | Done
Message: TypeAlias = ToWorker | FromWorker

_TO_WORKER: tuple[type[ToWorker], ...] = (RunCell, Interrupt, Stop)
_FROM_WORKER: tuple[type[FromWorker], ...] = (
    Ready,
    Stream,
    Display,
    Result,
    ClearOutput,
    CellError,
    CellWarning,
    Done,
)


def encode(message: Message) -> Wire:
    """The dict that goes on the channel (shallow: a Packed inside stays a Packed)."""
    wire: Wire = {"op": message.op}
    for item in fields(message):
        wire[item.name] = getattr(message, item.name)
    return wire


def decode_to_worker(wire: object) -> ToWorker:
    """A message the worker received; ProtocolError if it is not one this install sends."""
    return _decode(wire, {kind.op: kind for kind in _TO_WORKER}, "to the worker")


def decode_from_worker(wire: object) -> FromWorker:
    """A message the kernel received; ProtocolError if it is not one this install sends."""
    return _decode(wire, {kind.op: kind for kind in _FROM_WORKER}, "from the worker")


_Kind = TypeVar("_Kind", bound=Message)


def _decode(wire: object, kinds: dict[str, type[_Kind]], direction: str) -> _Kind:
    if not isinstance(wire, dict):
        raise ProtocolError(f"worker protocol: a message {direction} is a {type(wire).__name__}")
    op = wire.get("op")
    kind = kinds.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(
            f"worker protocol: unknown op {op!r} {direction}; known: {', '.join(sorted(kinds))}"
        )
    hints = _hints_of(kind)
    given = {key: value for key, value in wire.items() if key != "op"}
    extra = sorted(set(given) - set(hints))
    if extra:
        raise ProtocolError(f"worker protocol: {op!r} has unknown fields {', '.join(extra)}")
    required = [f.name for f in fields(kind) if _is_required(f)]
    missing = [name for name in required if name not in given]
    if missing:
        raise ProtocolError(f"worker protocol: {op!r} lacks {', '.join(missing)}")
    for name, value in given.items():
        if not _matches(value, hints[name]):
            raise ProtocolError(f"worker protocol: {op!r} field {name} is a {type(value).__name__}")
    return kind(**given)


def _is_required(item: Any) -> bool:
    return item.default is MISSING and item.default_factory is MISSING


def _field_hints(kind: type[Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(kind)
    return {f.name: hints[f.name] for f in fields(kind)}


def _matches(value: object, hint: Any) -> bool:
    """A shallow check of a value against a field's annotation (containers by their own type)."""
    if hint is Any:
        return True
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    origin = typing.get_origin(hint) or hint
    if origin is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin)


# Resolved once per kind, when a message of that kind first arrives: the annotations are
# strings (postponed evaluation), and resolving them all costs a cold worker ~5 ms at import.
_HINTS: dict[type[Any], dict[str, Any]] = {}


def _hints_of(kind: type[Any]) -> dict[str, Any]:
    hints = _HINTS.get(kind)
    if hints is None:
        hints = _HINTS[kind] = _field_hints(kind)
    return hints
