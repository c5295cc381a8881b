"""The GPU worker's stdout and stderr, sent over its channel in the order the cell wrote them.

A cell's text and its displays must reach the notebook in the order the cell made
them, so they travel on one ordered path: the worker's channel. Inside the worker,
file descriptors 1 and 2 become pipes (so ``print``, ``os.write(1, ...)``, C
libraries and subprocesses such as ``!nvidia-smi`` all land there), and
:class:`OutputRelay` sends what they hold as ``stream`` messages:

- before every other message (a display, ``clear_output``, an error, ``done``),
  whatever was written before it is sent first (:meth:`OutputRelay.ordered`): the
  pipes are read to empty under the lock that also guards the channel, so nothing is
  polled and nothing written after the message can overtake it;
- between messages, a thread sends what has piled up a moment after the first
  byte arrives, so a burst of writes is one message, not one per ``write``; the
  kernel then hands the text to ipykernel's own streams, which batch it into
  iopub messages exactly as for a plain cell;
- ``sys.stdout.flush()`` (``print(..., flush=True)``) returns only once its text is
  on the channel, so a worker that dies right after still shows it.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import io
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

COALESCE_S = 0.002  # after the first byte, how long a burst of writes may pile up
PIPE_SIZE = 1 << 20  # a 100,000-line loop never waits on the relay (Linux's unprivileged max)
READ_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

SendStream = Callable[[str, str], None]


class _Pipe:
    """One redirected descriptor: the read end the relay empties, and what it replaced."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd, self.name = fd, name
        self.original = os.dup(fd)  # non-inheritable: subprocesses see only the pipe
        read_end, write_end = os.pipe()
        with contextlib.suppress(OSError):  # a smaller pipe only means the writer waits sooner
            fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(read_end, False)
        os.dup2(write_end, fd)
        os.close(write_end)
        self.read_end = read_end
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.open = True

    def take(self) -> str:
        """All that the pipe holds now, decoded (a split UTF-8 character waits for its rest)."""
        chunks: list[bytes] = []
        while self.open:
            try:
                chunk = os.read(self.read_end, READ_SIZE)
            except BlockingIOError:
                break
            if not chunk:
                self.open = False  # every writer is gone
                break
            chunks.append(chunk)
        return self.decoder.decode(b"".join(chunks), final=not self.open)

    def restore(self) -> None:
        os.dup2(self.original, self.fd)
        os.close(self.original)


class OutputRelay:
    """Sends the worker's fds 1 and 2 over the channel, ordered with its other messages.

    ``send_stream`` is called with the lock held; the caller sends its own messages inside
    :meth:`ordered`, under the same lock.
    """

    def __init__(self, send_stream: SendStream) -> None:
        self._send_stream = send_stream
        self._lock = threading.RLock()
        self._pipes: list[_Pipe] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake = (-1, -1)  # a pipe whose write ends the relay thread's poll at close

    def start(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()  # what was written before belongs to the old descriptors
        self._pipes = [_Pipe(1, "stdout"), _Pipe(2, "stderr")]
        sys.stdout = _text_stream(1, sys.stdout, self)
        sys.stderr = _text_stream(2, sys.stderr, self)
        self._wake = os.pipe()
        self._thread = threading.Thread(target=self._relay, daemon=True, name="gpulane-output")
        self._thread.start()

    @contextlib.contextmanager
    def ordered(self) -> Iterator[None]:
        """Send what was written so far; then the caller's message, before anything newer."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        with self._lock:
            self._pump()
            yield

    def pump(self) -> None:
        """Send what was written so far (``sys.stdout.flush()`` lands here). Once closed it
        does nothing and takes no lock: Python flushes ``sys.stdout`` as it exits, when a
        daemon thread frozen by the interpreter's finalization may hold any lock."""
        if self._closed:
            return
        with self._lock:
            self._pump()

    def close(self) -> None:
        """Send the last of it, end the relay thread and give fds 1 and 2 back: later output
        (an exit handler's) goes where the worker's own output went before the cell.

        The thread is woken and joined here, whoever still holds the pipes' write ends (a
        subprocess the cell left running): a relay thread still running as the worker exits
        could be frozen by the interpreter's finalization inside :meth:`pump`, holding the
        lock that the exit's flush of ``sys.stdout`` then waits for forever."""
        with self._lock:
            self._pump()
            self._closed = True
            for pipe in self._pipes:
                pipe.restore()
        thread, self._thread = self._thread, None
        if thread is not None:
            os.write(self._wake[1], b"x")
            thread.join()
            for fd in self._wake:
                os.close(fd)

    def _pump(self) -> None:
        if self._closed:
            return
        for pipe in self._pipes:
            text = pipe.take()
            if text:
                self._send_stream(pipe.name, text)

    def _relay(self) -> None:
        poller = select.poll()
        for pipe in self._pipes:
            poller.register(pipe.read_end, select.POLLIN)
        poller.register(self._wake[0], select.POLLIN)
        while not self._closed and any(pipe.open for pipe in self._pipes):
            poller.poll()
            if self._closed:
                return
            time.sleep(COALESCE_S)
            try:
                self.pump()
            except (OSError, ValueError):
                return  # the channel is gone, and with it the kernel
            for pipe in self._pipes:
                if not pipe.open:
                    with contextlib.suppress(KeyError):
                        poller.unregister(pipe.read_end)


class _SyncingText(io.TextIOWrapper):
    """A write-through text stream whose ``flush`` also sends its text over the channel."""

    relay: OutputRelay

    def flush(self) -> None:
        super().flush()
        self.relay.pump()


def _text_stream(fd: int, old: Any, relay: OutputRelay) -> _SyncingText:
    """The worker's ``sys.stdout``/``sys.stderr`` on ``fd``, unbuffered, so Python's text and a
    subprocess's bytes meet in one pipe in the order they were written."""
    stream = _SyncingText(
        io.FileIO(fd, "w", closefd=False),  # raw, as ``python -u`` does: nothing waits in a buffer
        encoding=getattr(old, "encoding", None) or "utf-8",
        errors=getattr(old, "errors", None) or "backslashreplace",
        write_through=True,
    )
    stream.relay = relay
    return stream
