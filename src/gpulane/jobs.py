"""The one job model: what a request asks for, and how its options are parsed.

Every front end (the CLI, the ``%%gpu`` magic, the hub) parses user input here,
so a malformed value gives the same one-line message everywhere.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from gpulane.errors import OptionError

__all__ = ["OptionError"]  # re-exported: front ends catch it from here


TIME_FORMS = "HH:MM:SS, MM:SS, a number of minutes, or 90s / 90m / 2h / 1d"
MEMORY_FORMS = "a size such as 512M, 8G or 1.5T (K, M, G, T; bytes without a suffix)"

_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The one unit table for every size gpulane reads (options, profile files): binary units.
_UNIT_BYTES = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtpb]?)(?:i?b)?")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")

MAX_TIME_SECONDS = 366 * 86400
MAX_COMMAND_ARGS = 4096
# A command's arguments, all together, in UTF-8: the broker stores each job's command, so
# this bounds what one submission may make it keep. Typical commands are a few hundred
# bytes (a script belongs in a file); 32 KiB is below Linux's 128 KiB for one argument
# (MAX_ARG_STRLEN), so it is also the bound on each argument, and any command accepted runs.
MAX_COMMAND_BYTES = 32 * 1024


def parse_duration(text: str, option: str = "--time") -> int:
    """Seconds from ``HH:MM:SS``, ``MM:SS``, ``M`` (minutes, as Slurm reads it) or ``90m``/``2h``."""
    value = str(text).strip().lower()
    seconds: float | None = None
    try:
        if re.fullmatch(r"\d+(:\d{1,2}){1,2}", value):
            parts = [int(p) for p in value.split(":")]
            if all(p < 60 for p in parts[1:]):
                while len(parts) < 3:
                    parts.insert(0, 0)
                seconds = parts[0] * 3600 + parts[1] * 60 + parts[2]
        elif re.fullmatch(r"\d+", value):
            seconds = int(value) * 60
        else:
            match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd])", value)
            if match:
                seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    except ValueError:  # more digits than int() will convert
        seconds = None
    # At least one whole second: "0.5s" would otherwise truncate to a limit of 0.
    if seconds is None or not 1 <= seconds <= MAX_TIME_SECONDS:
        raise OptionError(f"{option} {text!r} is not a time limit; use {TIME_FORMS}")
    return int(seconds)


def size_in_bytes(text: str) -> float | None:
    """The bytes ``512M``, ``8G``, ``1.5T`` or ``4096`` names, unbounded (it may be inf);
    None when it is not a size. Callers apply their own bounds and messages."""
    match = _SIZE_RE.fullmatch(str(text).strip().lower())
    return None if match is None else float(match.group(1)) * _UNIT_BYTES[match.group(2)]


def parse_memory(text: str, option: str = "--mem") -> int:
    """Bytes from ``512M``, ``8G``, ``1.5T`` (binary units, as Slurm reads them)."""
    size = size_in_bytes(text)  # may be inf: check the range before int()
    if size is None:
        raise OptionError(f"{option} {text!r} is not a size; use {MEMORY_FORMS}")
    if not 1 <= size <= 1024**5:
        raise OptionError(f"{option} {text!r} is out of range; use {MEMORY_FORMS}")
    return int(size)


def parse_count(text: str | int, option: str, maximum: int = 64) -> int:
    """A positive whole number no larger than ``maximum``."""
    value = str(text).strip()
    # Bound the digits before int(): it refuses more than 4300 with a plain ValueError.
    if not re.fullmatch(r"\d{1,20}", value) or not 1 <= int(value) <= maximum:
        raise OptionError(f"{option} {text!r} must be a whole number from 1 to {maximum}")
    return int(value)


def format_duration(seconds: float | None) -> str:
    """``12:03`` or ``1:02:03``; ``--:--`` for unknown."""
    if seconds is None:
        return "--:--"
    total = max(0, round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"

    @property
    def finished(self) -> bool:
        return is_finished(self)


def is_finished(state: str) -> bool:
    """True for a state a job ends in (completed, failed, ...): the one meaning of "finished"."""
    return state not in (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class Request:
    """What a user asks for. Validated on construction; immutable afterwards."""

    gpus: int = 1
    slices: int = 0
    time_limit: int | None = None  # seconds; None: the scheduler's default
    mem: int | None = None  # host memory, bytes
    # GPU memory asked of one GPU, bytes (None: whole GPUs or slices). Sent only when set,
    # so brokers that predate it keep taking requests from new clients.
    gpu_mem: int | None = None
    name: str = "job"
    command: tuple[str, ...] = field(default_factory=tuple)
    # The command may outlive its client: once started, the lease follows the command's
    # process (a GPU-profile server whose hub restarts keeps its GPU). Bounded by the limit.
    detached: bool = False

    def __post_init__(self) -> None:
        if self.slices and self.gpus != 1:
            raise OptionError(
                "--gpus and --slices exclude each other: ask for whole GPUs or slices"
            )
        if self.slices < 0 or not 1 <= self.gpus <= 64 or self.slices > 64:
            raise OptionError("--gpus and --slices must be whole numbers from 1 to 64")
        if self.time_limit is not None and not 0 < self.time_limit <= MAX_TIME_SECONDS:
            raise OptionError(f"--time must be positive and at most {MAX_TIME_SECONDS} s")
        if self.mem is not None and not 0 < self.mem <= 1024**5:
            raise OptionError("--mem must be positive and at most 1 PiB")
        if self.gpu_mem is not None:
            if not 0 < self.gpu_mem <= 1024**5:
                raise OptionError("--gpu-mem must be positive and at most 1 PiB")
            if self.slices or self.gpus != 1:
                raise OptionError(
                    "--gpu-mem asks for memory of one GPU: leave out --gpus and --slices"
                )
        if not NAME_RE.fullmatch(self.name):
            raise OptionError(
                f"--name {self.name!r} must be 1-64 letters, digits or _.:+- "
                "and start with a letter or digit"
            )
        if len(self.command) > MAX_COMMAND_ARGS or any(
            not isinstance(a, str) or "\x00" in a for a in self.command
        ):
            raise OptionError("the command must be a list of strings without NUL characters")
        try:
            size = sum(len(a.encode()) for a in self.command)
        except UnicodeEncodeError:  # lone surrogates, which JSON "\ud800" decodes to
            raise OptionError("the command must be valid UTF-8 text") from None
        if size > MAX_COMMAND_BYTES:
            raise OptionError(f"the command is longer than {MAX_COMMAND_BYTES} bytes")

    @property
    def whole_gpus(self) -> bool:
        return self.slices == 0

    def describe(self) -> str:
        if self.gpu_mem is not None:
            return f"{format_bytes(self.gpu_mem)} of one GPU"
        return f"{self.slices} slice(s)" if self.slices else f"{self.gpus} GPU(s)"

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["command"] = list(self.command)
        if not self.detached:
            del data["detached"]  # a broker that predates it refuses unknown fields
        if self.gpu_mem is None:
            del data["gpu_mem"]  # likewise
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Request:
        """Build from a posted document: a bounded schema, unknown keys refused."""
        if not isinstance(data, Mapping):
            raise OptionError("the request must be a JSON object")
        known = {"gpus", "slices", "time_limit", "mem", "gpu_mem", "name", "command", "detached"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise OptionError(f"unknown field(s) in request: {', '.join(unknown)}")
        for key in ("gpus", "slices", "time_limit", "mem", "gpu_mem"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise OptionError(f"{key} must be an integer")
        command = data.get("command", [])
        if not isinstance(command, list):
            raise OptionError("command must be a list of strings")
        name = data.get("name", "job")
        if not isinstance(name, str):
            raise OptionError("name must be a string")
        detached = data.get("detached", False)
        if not isinstance(detached, bool):
            raise OptionError("detached must be true or false")
        return cls(
            gpus=1 if data.get("gpus") is None else data["gpus"],  # 0 is refused, not 1
            slices=data.get("slices") or 0,
            time_limit=data.get("time_limit"),
            mem=data.get("mem"),
            gpu_mem=data.get("gpu_mem"),
            name=name,
            command=tuple(command),
            detached=detached,
        )


def build_request(
    *,
    gpus: str | int | None = None,
    slices: str | int | None = None,
    time: str | None = None,
    mem: str | None = None,
    name: str | None = None,
    command: Sequence[str] = (),
    gpu_mem: str | None = None,
) -> Request:
    """Parse the textual options every front end shares into a :class:`Request`."""
    if gpus is not None and slices is not None:
        raise OptionError("--gpus and --slices exclude each other: ask for whole GPUs or slices")
    return Request(
        gpus=parse_count(gpus, "--gpus") if gpus is not None else 1,
        slices=parse_count(slices, "--slices") if slices is not None else 0,
        time_limit=parse_duration(time) if time is not None else None,
        mem=parse_memory(mem) if mem is not None else None,
        gpu_mem=parse_memory(gpu_mem, "--gpu-mem") if gpu_mem is not None else None,
        name=name if name is not None else "job",
        command=tuple(command),
    )
