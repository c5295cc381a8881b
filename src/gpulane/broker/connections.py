"""The broker's door: who may connect, how many at once, how fast, and who is cut off.

One user's connections and requests must not use up what everyone shares: the
broker's file descriptors, its memory and its one event loop.

- :class:`Acceptor` accepts on the Unix socket itself (instead of tornado's accept
  handler) because that is where the peer's uid is cheapest to read and where a
  failed ``accept`` must be handled: out of descriptors, it stops accepting for a
  moment and logs the condition once a minute, never once per attempt. Each uid
  (but root) holds at most ``max_per_user`` connections; past that a connection is
  answered with one line and closed. A connection whose peer stops reading while
  an answer is being written is closed after ``write_timeout`` seconds.
- :class:`RequestRates` is a token bucket per identity for requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
import time
from collections.abc import Callable, Hashable
from typing import Any

from tornado.httpserver import HTTPServer
from tornado.iostream import IOStream

from gpulane.broker.identity import peer_credentials
from gpulane.errors import LimitReached

log = logging.getLogger("gpulane.broker")

ACCEPT_BATCH = 128  # connections accepted per wake-up, so one burst cannot hog the loop
BACKOFF_FIRST, BACKOFF_MOST = 0.05, 1.0  # seconds accept pauses when out of descriptors
LOG_EVERY = 60.0  # seconds between two log lines about the same condition
MAX_WRITE_BUFFER = 8 * 1024 * 1024  # bytes one connection may have waiting to be sent
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def refusal(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP answer with a one-line JSON error, sent where no handler runs."""
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class _CountedStream(IOStream):
    """An IOStream that gives its uid's connection slot back when it closes."""

    def __init__(
        self,
        sock: socket.socket,
        acceptor: Acceptor,
        peer: tuple[int, int] | None,
        key: Hashable = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(sock, **kwargs)
        self.acceptor = acceptor
        # The peer's (pid, uid), read once at accept: by the time a request is handled the
        # client may have hung up, and a closed stream has no socket left to ask. None on
        # TCP (broker/tcp_api.py), where only a hub token names the caller.
        self.peer = peer
        # Whose connection slot this is: the uid on the socket, the client's address on TCP.
        self.uid: Hashable = peer[1] if peer is not None else key
        self.label = f"uid {self.uid}" if peer is not None else f"address {key}"
        self.stalled: tuple[int, float] | None = None  # (bytes written, since when) while writing

    def close_fd(self) -> None:
        try:
            super().close_fd()
        finally:
            self.acceptor.released(self)


class Acceptor:
    """Accepts connections on ``sock`` for ``server``; see the module's docstring."""

    def __init__(
        self,
        server: HTTPServer,
        sock: socket.socket,
        max_per_user: int,
        write_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.server, self.sock = server, sock
        self.max_per_user = max_per_user  # 0: no cap
        self.write_timeout = write_timeout
        self.clock = clock
        self.counts: dict[Hashable, int] = {}
        self.streams: set[_CountedStream] = set()
        self._backoff = 0.0
        self._paused: asyncio.TimerHandle | None = None
        self._logged: dict[Hashable, float] = {}
        self._refused: dict[Hashable, int] = {}
        self._reaper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.sock.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._accept)
        self._reaper = loop.create_task(self._reap_stalled())

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._paused is not None:
            self._paused.cancel()
        else:
            loop.remove_reader(self.sock.fileno())
        if self._reaper is not None:
            self._reaper.cancel()

    # ------------------------------------------------------------------ accepting

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                if error.errno in _OUT_OF_DESCRIPTORS:
                    self._pause(error)
                    return
                raise
            if self._backoff:
                self._note("fds", "accepting connections again")
                self._backoff = 0.0
            self._admit(conn)

    def _pause(self, error: OSError) -> None:
        # The connection waits in the listen backlog; trying again at once would spin.
        self._backoff = min(BACKOFF_MOST, max(BACKOFF_FIRST, 2 * self._backoff))
        self._note("fds", f"cannot accept connections: {error.strerror}; pausing accept")
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.sock.fileno())
        self._paused = loop.call_later(self._backoff, self._resume)

    def _resume(self) -> None:
        self._paused = None
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._accept)
        self._accept()

    def _admit(self, conn: socket.socket) -> None:
        try:
            peer = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        uid = peer[1]
        held = self.counts.get(uid, 0)
        # Root is exempt: it is the hub's spawner and the admin, and owns the broker anyway.
        if self.max_per_user and uid != 0 and held >= self.max_per_user:
            self._refuse(conn, uid)
            return
        self.counts[uid] = held + 1
        try:
            stream = _CountedStream(
                conn,
                self,
                peer,
                max_buffer_size=self.server.max_buffer_size,
                read_chunk_size=self.server.read_chunk_size,
                max_write_buffer_size=MAX_WRITE_BUFFER,
            )
        except Exception:
            self.counts[uid] -= 1
            conn.close()
            raise
        self.streams.add(stream)
        self.server.handle_stream(stream, ())  # a Unix socket has no peer address

    def _refuse(self, conn: socket.socket, uid: int) -> None:
        message = (
            f"uid {uid} already holds {self.max_per_user} connections to the broker, "
            "the most allowed; close some"
        )
        with contextlib.suppress(OSError):
            conn.send(refusal(503, "Service Unavailable", message), socket.MSG_DONTWAIT)
        conn.close()
        self._refused[uid] = self._refused.get(uid, 0) + 1
        if self._note(("cap", uid), f"{message} (refused {self._refused[uid]} so far)"):
            self._refused[uid] = 0

    def released(self, stream: _CountedStream) -> None:
        if stream in self.streams:
            self.streams.discard(stream)
            left = self.counts.get(stream.uid, 1) - 1
            if left > 0:
                self.counts[stream.uid] = left
            else:
                self.counts.pop(stream.uid, None)

    def _note(self, key: Hashable, message: str) -> bool:
        """Log ``message`` unless the same condition was logged within LOG_EVERY seconds."""
        now = self.clock()
        if now - self._logged.get(key, -LOG_EVERY) < LOG_EVERY:
            return False
        self._logged[key] = now
        log.warning("%s", message)
        return True

    # ------------------------------------------------------------------ readers that stop

    async def _reap_stalled(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.write_timeout / 4))
            self.reap_stalled()

    def reap_stalled(self) -> None:
        """Close connections whose answer has made no progress for ``write_timeout`` seconds."""
        now = self.clock()
        for stream in list(self.streams):
            if not stream.writing():
                stream.stalled = None
                continue
            written = stream._total_write_done_index
            if stream.stalled is None or stream.stalled[0] != written:
                stream.stalled = (written, now)
            elif now - stream.stalled[1] > self.write_timeout:
                self._note(
                    ("stalled", stream.uid),
                    f"closed a connection of {stream.label}: its answer went unread "
                    f"for {self.write_timeout:.0f} s",
                )
                stream.close()


class TooFast(LimitReached):
    """A sender is over its request rate (429); ``key`` names the sender's bucket."""

    def __init__(self, key: tuple[str, int, str], message: str) -> None:
        super().__init__(message)
        self.key = key


class RequestRates:
    """A token bucket per identity: ``rate`` requests a second, up to ``burst`` at once."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, as of)
        self._logged: dict[Hashable, float] = {}

    def should_log(self, key: Hashable) -> bool:
        """Whether a refusal of ``key`` is worth a log line (at most one a minute each)."""
        now = self.clock()
        if now - self._logged.get(key, -LOG_EVERY) < LOG_EVERY:
            return False
        if len(self._logged) > 10_000:
            self._logged.clear()
        self._logged[key] = now
        return True

    def admit(self, key: Hashable) -> bool:
        """Take a token for ``key``; False when it has none left (0 rate: always True)."""
        if self.rate <= 0:
            return True
        now = self.clock()
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - at) * self.rate)
        if len(self._buckets) > 10_000:
            self._forget_full(now)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True

    def _forget_full(self, now: float) -> None:
        # A full bucket is the same as none: keep the table bounded by the active keys.
        for key, (tokens, at) in list(self._buckets.items()):
            if tokens + (now - at) * self.rate >= self.burst:
                del self._buckets[key]
