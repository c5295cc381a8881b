"""The kernel-worker channel: a message, and the buffers that follow it.

A worker on another machine shares no spill folder with the kernel, so the out-of-band
buffers of a :class:`~gpulane.kernel.transfer.Packed` (``BufferRef.follows``) travel on
the channel itself: the message first (pickled by ``multiprocessing.connection``, with
only each buffer's size), then each buffer's raw bytes, in order, written straight from
the sender's memory and read straight into the receiver's (no pickling, no copy of a
1 GiB array into a message). On one machine nothing follows and these are plain
``send`` and ``recv``.

The sender must hold the channel's send lock across :func:`send_message`, so that no other
message lands between a message and its bytes; the receiver reads with one thread.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

from gpulane.kernel.transfer import BufferRef, Packed


class Channel(Protocol):
    """Either end: the kernel's ``multiprocessing.connection.Connection``, or the worker's
    :class:`~gpulane.kernel.link.Link` (the same wire, without importing multiprocessing)."""

    def send(self, obj: Any) -> None: ...
    def recv(self) -> Any: ...
    def fileno(self) -> int: ...


def send_message(channel: Channel, wire: dict[str, object]) -> None:
    """Send a message (an encoded protocol dict), then the bytes of its following buffers."""
    following = _following(wire)
    channel.send(wire)
    if not following:
        return
    started = time.perf_counter()
    fd = channel.fileno()
    for _, ref in following:
        if ref.data is None:
            raise ValueError("a following buffer has no data to send")
        view = memoryview(ref.data).cast("B")
        written = 0
        while written < view.nbytes:  # a socket takes part of a large write at a time
            written += os.write(fd, view[written:])
        ref.data = None  # sent: let its memory go
    _account(following, time.perf_counter() - started)


def receive_message(channel: Channel) -> object:
    """Receive a message, then read its following buffers' bytes into fresh writable memory."""
    wire = channel.recv()
    following = _following(wire)
    if not following:
        return wire
    started = time.perf_counter()
    fd = channel.fileno()
    for _, ref in following:
        data = bytearray(ref.size)
        view = memoryview(data)
        got = 0
        while got < ref.size:
            count = os.readv(fd, [view[got:]])
            if count == 0:
                raise EOFError("the channel closed in the middle of a buffer")
            got += count
        ref.data = data
    _account(following, time.perf_counter() - started)
    return wire


def _following(wire: object) -> list[tuple[Packed, BufferRef]]:
    """The buffers of the Packed values of a message that follow it, in sending order."""
    if not isinstance(wire, dict):
        return []
    found: list[tuple[Packed, BufferRef]] = []
    for value in wire.values():
        if isinstance(value, Packed):
            for refs in value.buffers.values():
                found += [(value, ref) for ref in refs if ref.follows]
    return found


def _account(following: list[tuple[Packed, BufferRef]], seconds: float) -> None:
    for packed in {id(packed): packed for packed, _ in following}.values():
        packed.seconds += seconds  # the card's figure counts the time on the wire
