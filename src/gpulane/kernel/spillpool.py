"""Spill files whose memory is already allocated, kept by the kernel and reused across cells.

Writing a large buffer into a *fresh* ``/dev/shm`` file allocates (and zeroes) every page as it
goes; on a VM that returns freed memory to its host, that costs 0.5-1 s a GiB, where copying
into pages already allocated costs 0.15-0.35 s. So the kernel keeps the spill files of its
large inputs (:data:`POOL_FROM` and up) after their cells, up to :attr:`SpillPool.limit`
bytes in all and for :attr:`SpillPool.idle` seconds after their last use, and writes the next
input of the same size into one of them.

The receiver's side is unchanged: each cell gets a fresh name (a hard link to the pooled file,
in the same private folder, mode 0600), which it maps and unlinks as any spill file. A pooled
file is written again only when nothing else can see it: its lent name is gone (the cell has
taken it, or never will: :func:`~gpulane.kernel.transfer.cleanup` removed it) and Linux grants
the kernel a write lease on it, which it refuses while any other process has the file open or
mapped (a worker that still holds the last cell's array, a session, a process the cell started).

The trade: up to ``limit`` bytes of memory (``GPULANE_SPILL_POOL``) stay allocated for ``idle``
seconds (``GPULANE_SPILL_POOL_IDLE``) after a kernel's last large transfer; ``0`` turns it off.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import secrets
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gpulane.config import SPILL_POOL_ENV, SPILL_POOL_IDLE_ENV
from gpulane.jobs import OptionError, parse_duration, parse_memory

POOL_FROM = 16 << 20  # bytes: smaller buffers are quick to write fresh
DEFAULT_LIMIT = 2 << 30  # bytes of pooled files per kernel (the default --max-transfer)
DEFAULT_IDLE = 120  # seconds after its last use that a pooled file is freed


@dataclass
class _Entry:
    fd: int  # open for reading and writing: the pool's own handle on the file
    path: Path  # the pool's own name for it (never lent)
    size: int
    used: float  # time.monotonic() of its last write
    mapping: mmap.mmap | None = None  # kept after the first reuse: later copies fault nothing


class SpillPool:
    """A kernel's pooled spill files in its private spill folder; see the module docstring."""

    def __init__(
        self, folder: Path, limit: int = DEFAULT_LIMIT, idle: float = DEFAULT_IDLE
    ) -> None:
        self.folder = folder
        self.limit = limit
        self.idle = idle
        self._entries: list[_Entry] = []  # least recently used first
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    @classmethod
    def from_environment(cls, folder: Path, env: Mapping[str, str]) -> SpillPool:
        """The pool ``GPULANE_SPILL_POOL`` (a size, ``0``: off) and ``GPULANE_SPILL_POOL_IDLE``
        ask for; a malformed value is said in one line on stderr and its default used (as the
        fork server's settings are)."""
        limit, idle = DEFAULT_LIMIT, float(DEFAULT_IDLE)
        text = env.get(SPILL_POOL_ENV, "").strip()
        try:
            if text:
                limit = 0 if text == "0" else parse_memory(text, SPILL_POOL_ENV)
        except OptionError as error:
            sys.stderr.write(f"gpulane: {error}; using the default, 2G\n")
        text = env.get(SPILL_POOL_IDLE_ENV, "").strip()
        try:
            if text:
                idle = parse_duration(text, SPILL_POOL_IDLE_ENV)
        except OptionError as error:
            sys.stderr.write(f"gpulane: {error}; using the default, 2m\n")
        return cls(folder, limit, idle)

    @property
    def held(self) -> int:
        """Bytes of pooled files the pool holds now."""
        return sum(entry.size for entry in self._entries)

    def store(self, view: memoryview) -> str | None:
        """Write ``view`` into a pooled file and return a fresh name for it, for one receiver;
        None where the pool does not take it (too small, over the limit, pool off)."""
        size = view.nbytes
        if size < POOL_FROM or size > self.limit:
            return None
        with self._lock:
            entry = next((e for e in self._entries if e.size == size and _unused(e)), None)
            if entry is None:
                self._make_room(size)
                entry = self._new_entry(view)
            else:
                self._entries.remove(entry)
                try:
                    _copy_into(entry, view)
                except BaseException:
                    _drop(entry)
                    raise
            entry.used = time.monotonic()
            self._entries.append(entry)
            lent = self.folder / f"{secrets.token_hex(12)}.buf"
            os.link(entry.path, lent)  # fails if the name exists: never someone's planted file
            self._schedule_trim()
        return str(lent)

    def trim(self) -> int:
        """Free the pooled files unused for ``idle`` seconds; the bytes freed."""
        now = time.monotonic()
        with self._lock:
            old = [entry for entry in self._entries if now - entry.used >= self.idle]
            for entry in old:
                self._entries.remove(entry)
                _drop(entry)
            if self._entries:
                self._schedule_trim()
        return sum(entry.size for entry in old)

    def close(self) -> None:
        """Free every pooled file (a receiver that maps one keeps its pages until it lets go)."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            for entry in self._entries:
                _drop(entry)
            self._entries = []

    def _make_room(self, size: int) -> None:
        # Dropping a file is always safe: a receiver that maps it, or a lent name, keeps it.
        while self._entries and self.held + size > self.limit:
            _drop(self._entries.pop(0))

    def _new_entry(self, view: memoryview) -> _Entry:
        from gpulane.kernel.transfer import write_all

        path = self.folder / f"pool-{secrets.token_hex(12)}.buf"
        # O_EXCL: never follow a planted symlink or reuse someone's file; 0600: only we read it.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
        entry = _Entry(fd=fd, path=path, size=view.nbytes, used=time.monotonic())
        try:
            write_all(fd, view)
        except BaseException:
            _drop(entry)
            raise
        return entry

    def _schedule_trim(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.idle, self.trim)
        self._timer.daemon = True
        self._timer.name = "gpulane-spill-pool"
        self._timer.start()


def _unused(entry: _Entry) -> bool:
    """Whether no one but the pool can see the file: its lent name is gone, and no other
    process has it open or mapped (Linux grants a write lease only then). Only the pool knows
    its own name, so no open can race the lease (which would signal this process)."""
    if os.fstat(entry.fd).st_nlink != 1:
        return False  # a lent name is still there: its cell has not mapped it yet
    try:
        fcntl.fcntl(entry.fd, fcntl.F_SETLEASE, fcntl.F_WRLCK)
    except OSError:
        return False  # held elsewhere (or leases are off here: then it is never reused)
    fcntl.fcntl(entry.fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return True


def _copy_into(entry: _Entry, view: memoryview) -> None:
    if entry.mapping is None:
        # The pool's own handle: the mapping adds no opener, so the lease test still holds.
        entry.mapping = mmap.mmap(entry.fd, entry.size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    entry.mapping[:] = view  # one copy into memory that is already allocated


def _drop(entry: _Entry) -> None:
    if entry.mapping is not None:
        entry.mapping.close()
    with contextlib.suppress(OSError):
        os.close(entry.fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(entry.path)
