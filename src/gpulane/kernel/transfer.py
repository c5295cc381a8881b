"""How a cell's variables travel to the GPU worker and back.

Each variable is pickled on its own with cloudpickle (so one unpicklable value is
skipped with a reason instead of failing the whole cell), using pickle protocol 5:
large out-of-band buffers (numpy arrays, CPU tensors, anything that exports a
``PickleBuffer``) are written once to a private spill folder and mapped on the other
side, so a big array crosses with one copy: never into the message, never again on load.

The receiver maps a spill file shared and writable, then unlinks it: the mapping is then
the only reference, so the array is writable, private to its process, freed with its last
view, and stays valid whoever removes the folder (an unlinked file lives on while mapped).
Writing into it costs no copy-on-write. The one difference from an ordinary array: a child
that the cell *forks* shares those pages, so its writes to such an array show in the
parent (an ordinary array would be copied on write).

The kernel writes its large inputs into files of its :mod:`~gpulane.kernel.spillpool` where
one of the size is free (memory already allocated: the write is a copy, not an allocation);
the receiver gets a name of its own for the file and treats it as any spill file.

Where the two sides share no folder (a worker on another machine) the same buffers follow
their message on the channel (:mod:`gpulane.kernel.channel`), read into ordinary memory.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import mmap
import os
import pickle
import stat
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from gpulane.kernel.spillpool import SpillPool

# pathlib, secrets, shutil, tempfile and gpulane.jobs are imported where they are used: a cold worker
# unpacks its inputs before the cell's first line, and needs none of them until it returns
# names (~5 ms of imports).


class TransferTooLarge(Exception):
    """The variables to move add up to more than the allowed transfer size."""

    def __init__(self, total: int, limit: int, sizes: Mapping[str, int]) -> None:
        super().__init__(total, limit, dict(sizes))
        self.total = total
        self.limit = limit
        self.sizes = dict(sizes)

    def __str__(self) -> str:
        from gpulane.jobs import format_bytes

        biggest = sorted(self.sizes.items(), key=lambda item: item[1], reverse=True)[:3]
        named = ", ".join(f"{name} ({format_bytes(size)})" for name, size in biggest)
        return (
            f"{format_bytes(self.total)} of variables is over the {format_bytes(self.limit)} "
            f"transfer limit (biggest: {named}); raise it with --max-transfer SIZE "
            f"or GPULANE_MAX_TRANSFER, or move fewer or smaller variables"
        )


@dataclass
class BufferRef:
    """One out-of-band buffer of a pickled value: inline, a spill file, or following on the
    channel (docstrings here and on Packed spare @dataclass its inspect.signature)."""

    size: int
    inline: bytes | None = None  # small buffers travel inside the message
    path: str | None = None  # large ones: a file, mode 0600, inside a private (0700) folder
    follows: bool = False  # or their bytes follow the message on the channel (no shared folder)
    # Never pickled: a following buffer's bytes, to send (a view) or as received (a bytearray).
    data: memoryview | bytearray | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "data": None}  # the bytes go beside the message, not in it


@dataclass
class Packed:
    """A set of variables, each pickled on its own, with their buffers."""

    blobs: dict[str, bytes]  # name -> cloudpickle bytes, protocol 5, out-of-band buffers removed
    buffers: dict[str, list[BufferRef]]  # name -> its out-of-band buffers, in order
    skipped: dict[str, str]  # name -> one-line reason it could not be pickled
    total_bytes: int  # blobs + buffers
    seconds: float = 0.0  # spent moving it: the sender's pickling and writing, any streaming

    def spilled_bytes(self) -> int:
        """The bytes that went out of band (spill files or the channel), not inline."""
        return sum(ref.size for refs in self.buffers.values() for ref in refs if not ref.inline)


SHOW_TRANSFER_AFTER = 1.0  # seconds: a transfer slower than this is reported on the card


def transfer_line(packed: Packed | None, verb: str) -> str | None:
    """``"sent 1.0 GiB in 1.4 s"`` (``verb`` "sent" or "brought back") for the card, when the
    transfer took longer than :data:`SHOW_TRANSFER_AFTER`; None when it was quick."""
    if packed is None or packed.seconds <= SHOW_TRANSFER_AFTER:
        return None
    from gpulane.jobs import format_bytes

    return f"{verb} {format_bytes(packed.total_bytes)} in {packed.seconds:.1f} s"


def transfer_lines(sent: Packed | None, returned: Packed | None) -> list[str]:
    """The card's lines for a cell's slow transfers: its inputs (the kernel's packing, and the
    channel's time for a worker elsewhere) and its returns (the worker's packing and any time
    on the channel); empty when both took at most a second."""
    lines = (transfer_line(sent, "sent"), transfer_line(returned, "brought back"))
    return [line for line in lines if line is not None]


def _summarize_error(error: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@functools.cache
def _pickler() -> type[pickle.Pickler]:
    """cloudpickle, imported where values are pickled, not where they are loaded: a cold
    worker loads its inputs before the cell's first line, and needs no pickler until it
    returns names (the import is ~8 ms)."""
    import cloudpickle  # type: ignore[import-untyped]

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        """cloudpickle, plus plain CPU tensors as numpy arrays so their data goes out of
        band, and large strided arrays out of band too (numpy pickles those in band)."""

        def reducer_override(self, obj: Any) -> Any:
            torch = sys.modules.get("torch")
            if torch is not None and type(obj) in (torch.Tensor, torch.nn.Parameter):
                reduced = _reduce_tensor(obj, torch)
                if reduced is not None:
                    return reduced
            numpy = sys.modules.get("numpy")
            if numpy is not None and type(obj) is numpy.ndarray:
                reduced = _reduce_strided(obj)
                if reduced is not None:
                    return reduced
            return super().reducer_override(obj)

    return Pickler


OUT_OF_BAND_FROM = 1 << 20  # bytes: a strided array or bytes this big go out of band


def _reduce_strided(array: Any) -> tuple[Any, ...] | None:
    flags = array.flags
    if flags.c_contiguous or flags.f_contiguous or array.dtype.hasobject:
        return None  # numpy's own reduction already sends these out of band (or must pickle)
    if array.nbytes < OUT_OF_BAND_FROM:
        return None
    # numpy would copy a view's elements into the pickle stream (in band, through the message);
    # one contiguous copy here sends them out of band instead. The copy arrives contiguous.
    return _same, (array.copy(order="K"),)


def _same(value: Any) -> Any:
    return value


def _bytes_from(buffer: Any, mutable: bool) -> bytes | bytearray:
    # bytes and bytearray own their memory: one copy out of the mapping (none for a bytearray
    # that was received over the channel: it is one already).
    if mutable:
        return buffer if type(buffer) is bytearray else bytearray(buffer)
    return bytes(buffer)


# torch pickles a tensor's whole storage in band (a 10-element view of a 1 GB tensor costs 1 GB);
# dtypes numpy lacks travel as a same-width integer view.
_TENSOR_VIEW_AS = {"bfloat16": "int16", "float8_e4m3fn": "uint8", "float8_e5m2": "uint8"}


def _reduce_tensor(tensor: Any, torch: Any) -> tuple[Any, ...] | None:
    if (
        tensor.device.type != "cpu"
        or tensor.layout != torch.strided
        or tensor.is_quantized
        or tensor.is_conj()
        or tensor.is_neg()
    ):
        return None  # unusual tensors keep torch's own pickling
    dtype = str(tensor.dtype).removeprefix("torch.")
    data = tensor.detach()
    if dtype in _TENSOR_VIEW_AS:
        data = data.view(getattr(torch, _TENSOR_VIEW_AS[dtype]))
    try:
        array = data.numpy()
    except (TypeError, RuntimeError):
        return None
    parameter = isinstance(tensor, torch.nn.Parameter)
    return _tensor_from_array, (array, dtype, tensor.requires_grad, parameter)


def _tensor_from_array(array: Any, dtype: str, requires_grad: bool, parameter: bool) -> Any:
    import torch

    tensor = torch.from_numpy(array)  # shares memory with the (mapped) buffer: no copy
    if str(tensor.dtype).removeprefix("torch.") != dtype:
        tensor = tensor.view(getattr(torch, dtype))
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad)


class _BytesValue:
    """A variable that is one large ``bytes`` or ``bytearray``: pickle never asks
    reducer_override about those, so the variable is wrapped to go out of band (bytes
    nested in a container still go in band, inside the message)."""

    def __init__(self, data: bytes | bytearray) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        mutable = type(self.data) is bytearray
        return _bytes_from, (pickle.PickleBuffer(self.data), mutable)


def _dumps(value: Any) -> tuple[bytes, list[memoryview]]:
    views: list[memoryview] = []
    if type(value) in (bytes, bytearray) and len(value) >= OUT_OF_BAND_FROM:
        value = _BytesValue(value)

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            views.append(buffer.raw())  # a flat view of the memory itself, not a copy
        except BufferError:
            return True  # not contiguous: let pickle copy it in band
        return False

    stream = io.BytesIO()
    _pickler()(stream, protocol=5, buffer_callback=out_of_band).dump(value)
    return stream.getvalue(), views


def pack(
    values: Mapping[str, Any],
    spill_dir: Path | None,
    max_bytes: int,
    inline_limit: int = 1 << 20,
    pool: SpillPool | None = None,
) -> Packed:
    """Pickle each value on its own; big buffers go to files in spill_dir, small ones inline.

    With no spill_dir (:func:`shared_spill_dir`: a worker on another machine) big buffers are
    kept, to follow the message on the channel (:mod:`gpulane.kernel.channel`). With a pool
    (the kernel's :class:`~gpulane.kernel.spillpool.SpillPool`) a large buffer is written into
    a pooled file whose memory is already allocated, where one of its size is free.
    """
    started = time.perf_counter()
    blobs: dict[str, bytes] = {}
    views: dict[str, list[memoryview]] = {}
    skipped: dict[str, str] = {}
    for name, value in values.items():
        try:
            blobs[name], views[name] = _dumps(value)
        except Exception as error:  # any value may refuse pickling in its own way
            skipped[name] = _summarize_error(error)
    sizes = {name: len(blobs[name]) + sum(v.nbytes for v in views[name]) for name in blobs}
    total = sum(sizes.values())
    if total > max_bytes:
        raise TransferTooLarge(total, max_bytes, sizes)  # checked before any file exists
    packed = Packed(blobs=blobs, buffers={}, skipped=skipped, total_bytes=total)
    try:
        for name, name_views in views.items():
            refs = packed.buffers[name] = []
            for view in name_views:
                refs.append(_store_buffer(view, spill_dir, inline_limit, pool))
    except BaseException:
        cleanup(packed)  # a full disk or an interrupt must not leave half a transfer behind
        raise
    packed.seconds = time.perf_counter() - started
    return packed


def shared_spill_dir(spill_dir: str) -> Path | None:
    """The kernel's spill folder, on the worker's side: where it is this user's private folder
    on this machine (not a link, ours, no access for others); None where it is not there (a
    worker on another machine), so the worker's values follow on the channel instead."""
    try:
        info = os.lstat(spill_dir)
    except OSError:
        return None
    private = stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
    from pathlib import Path

    return Path(spill_dir) if private and stat.S_IMODE(info.st_mode) & 0o077 == 0 else None


def _store_buffer(
    view: memoryview, spill_dir: Path | None, inline_limit: int, pool: SpillPool | None
) -> BufferRef:
    if view.nbytes < inline_limit or view.nbytes == 0:
        return BufferRef(size=view.nbytes, inline=view.tobytes())
    if spill_dir is None:
        return BufferRef(size=view.nbytes, follows=True, data=view)  # sent beside the message
    lent = pool.store(view) if pool is not None else None
    if lent is not None:
        return BufferRef(size=view.nbytes, path=lent)  # a name of its own, as any spill file
    import secrets

    path = spill_dir / f"{secrets.token_hex(12)}.buf"
    # O_EXCL: never follow a planted symlink or reuse someone's file; 0600: only we can read it.
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, view)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return BufferRef(size=view.nbytes, path=str(path))


def write_all(fd: int, view: memoryview) -> None:
    """Write all of ``view`` to ``fd``."""
    # os.write may write less than asked (Linux caps one call near 2 GiB); slicing a memoryview is free.
    written = 0
    while written < view.nbytes:
        written += os.write(fd, view[written:])


def unpack(packed: Packed) -> tuple[dict[str, Any], dict[str, str]]:
    """Values that could be rebuilt, and a one-line reason for each one that could not."""
    values: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for name, blob in packed.blobs.items():
        refs = packed.buffers.get(name, [])
        try:
            buffers = [_load_buffer(ref) for ref in refs]
            values[name] = pickle.loads(blob, buffers=buffers)
        except Exception as error:  # a missing module or class on this side fails one name only
            failures[name] = _summarize_error(error)
        finally:
            _remove_files(refs)
            for ref in refs:
                ref.data = None  # the values hold what they use; the message holds nothing
    return values, failures


def follow_channel(packed: Packed) -> None:
    """Make a Packed's spill files follow its message on the channel instead (for a worker
    that cannot see this machine's folder): each file is mapped, unlinked, and read as sent."""
    for refs in packed.buffers.values():
        for ref in refs:
            if ref.path is not None:
                ref.data = memoryview(map_spill_file(ref.path, ref.size))
                ref.path, ref.follows = None, True


def _load_buffer(ref: BufferRef) -> bytearray | memoryview:
    if ref.follows:
        if not isinstance(ref.data, bytearray):
            raise OSError(
                "a buffer that should have followed its message on the channel is missing"
            )
        return ref.data  # received into ordinary, writable memory
    if ref.path is None:
        return bytearray(ref.inline or b"")  # writable, so numpy arrays come back writable
    return memoryview(map_spill_file(ref.path, ref.size))


def map_spill_file(path: str, size: int) -> mmap.mmap:
    """Map a spill file, read lazily with nothing copied up front, and unlink it.

    Shared and writable: once unlinked no one else can reach the file, so writes are private
    to this process's mapping, without a copy-on-write per page (ACCESS_COPY costs one fault
    and a page copy on each first write, and a second copy of the memory).
    """
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise OSError(f"spill file {path} has {actual} bytes, expected {size}")
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
    finally:
        os.close(fd)
    os.unlink(path)  # the mapping outlives the name; the memory is freed with the last view
    return mapped


def _remove_files(refs: list[BufferRef]) -> None:
    for ref in refs:
        if ref.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ref.path)


def cleanup(packed: Packed) -> None:
    """Remove the spill files of a Packed that will never be unpacked."""
    for refs in packed.buffers.values():
        _remove_files(refs)


SPILL_PREFIX = "gpulane-"


def default_spill_dir() -> Path:
    """A fresh private (0700) folder, in memory (/dev/shm) when that is available.

    Its name says whose it is and which process made it (``gpulane-UID-PIDNS-PID-START-…``),
    so that the next kernel of the same user can remove the folders of kernels that were
    killed before they cleaned up (SIGKILL, OOM): a leftover in /dev/shm holds memory.
    """
    import tempfile
    from pathlib import Path

    shm = Path("/dev/shm")
    me = os.getpid()
    prefix = f"{SPILL_PREFIX}{os.getuid()}-{_pid_namespace()}-{me}-{_start_time(me) or 0}-"
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        remove_stale_spill_dirs(shm)
        with contextlib.suppress(OSError):
            return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))  # mkdtemp: 0700 at creation
    base = Path(tempfile.gettempdir())
    remove_stale_spill_dirs(base)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def remove_stale_spill_dirs(base: Path) -> list[Path]:
    """Remove this user's spill folders in ``base`` whose creating process is gone.

    Only folders that are ours by name and by owner, and not symlinks, are touched:
    /dev/shm is shared, and anyone may plant a name there.
    """
    import shutil
    from pathlib import Path

    uid, namespace = os.getuid(), _pid_namespace()
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        owner = _spill_owner(entry.name)
        # Another PID namespace (a container sharing /dev/shm) has PIDs we cannot check.
        if owner is None or owner[0] != uid or owner[1] != namespace:
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid:
            continue  # a symlink or another user's plant: never follow or remove it
        _, _, pid, started = owner
        if _start_time(pid) == started:
            continue  # its kernel still runs
        path = Path(entry.path)
        shutil.rmtree(path, ignore_errors=True)  # rmtree never follows links inside
        removed.append(path)
    return removed


def _spill_owner(name: str) -> tuple[int, int, int, str] | None:
    """(uid, PID namespace, pid, start time) from a spill folder's name, or None for any
    other name."""
    if not name.startswith(SPILL_PREFIX):
        return None
    parts = name[len(SPILL_PREFIX) :].split("-", 4)
    if len(parts) != 5 or not all(part.isdigit() and part.isascii() for part in parts[:4]):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2]), parts[3]


def _pid_namespace() -> int:
    """The inode of this process's PID namespace (0 where /proc does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone:
    with the PID it names one process for good (PIDs are reused, start times differ)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()  # the command name may hold ')' and spaces
    return fields[19].decode() if len(fields) > 19 else None


# --------------------------------------------------------------------------- results


def to_cpu(value: Any) -> Any:
    """Move torch tensors and modules to the CPU, also inside dicts, lists and tuples."""
    torch = sys.modules.get("torch")  # never import torch: a cell that did not use it has none
    if torch is None:
        return value
    return _to_cpu(value, torch, set())


def _to_cpu(value: Any, torch: Any, active: set[int]) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, torch.nn.Module):
        return value.cpu()
    if not isinstance(value, dict | list | tuple) or id(value) in active:
        return value  # a container seen on the way down is a cycle: leave it as it is
    active.add(id(value))
    try:
        return _rebuild(value, torch, active)
    finally:
        active.discard(id(value))


def _rebuild(
    value: dict[Any, Any] | list[Any] | tuple[Any, ...], torch: Any, active: set[int]
) -> Any:
    if isinstance(value, dict):
        items = {k: _to_cpu(v, torch, active) for k, v in value.items()}
        if all(items[k] is v for k, v in value.items()):
            return value  # nothing moved: keep the very same object
        if type(value) is dict:
            return items
        copied = copy.copy(value)  # keeps a subclass's type and extra state (defaultdict's factory)
        copied.update(items)
        return copied
    elements = [_to_cpu(v, torch, active) for v in value]
    if all(new is old for new, old in zip(elements, value, strict=True)):
        return value
    if isinstance(value, list):
        if type(value) is list:
            return elements
        copied_list = copy.copy(value)
        copied_list[:] = elements
        return copied_list
    if hasattr(value, "_fields"):
        return type(value)._make(elements)  # type: ignore[attr-defined]  # a namedtuple
    return tuple(elements) if type(value) is tuple else type(value)(elements)
