"""The worker's end of its channel to the kernel, without ``multiprocessing``.

The kernel's end is a ``multiprocessing.connection.Connection`` (``kernel/worker.py``,
``kernel/forkclient.py``); :class:`Link` speaks the same wire: each message is a 4-byte
big-endian signed length (or -1, then an 8-byte length, past 2 GiB) and then its pickle,
and :func:`connect` answers and delivers the same HMAC challenge as
``multiprocessing.connection.Client`` with an ``authkey``. Why not that module itself:
importing it costs a cold worker ~15 ms (its context, reduction and util modules pull in
tempfile, shutil and subprocess) before the cell's first line, and the worker uses only
``send``, ``recv`` and ``fileno``. For the same reason it dials with ``_socket`` (``socket``
builds its enums and imports ``selectors``) and computes the challenge's HMAC-MD5 on the
built-in ``_md5`` (``hmac`` and ``hashlib`` load OpenSSL's ``_hashlib``), each with the
plain module as a fallback where the built-in one is missing.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

# multiprocessing.connection's handshake (Python 3.11's; later Pythons still accept it).
CHALLENGE = b"#CHALLENGE#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"
_CHALLENGE_BYTES = 20
_HANDSHAKE_MAX = 256  # bytes: a longer handshake message is refused, as multiprocessing does
_SMALL = 16384  # a message up to this size goes in one write with its header (Nagle)


class AuthenticationError(Exception):
    """The kernel refused this worker's key, or asked for it wrongly."""


class Link:
    """A channel on a connected socket's file descriptor: ``send``/``recv`` of pickled
    objects, framed as ``multiprocessing.connection.Connection`` frames them."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def send(self, obj: Any) -> None:
        self.send_bytes(pickle.dumps(obj))

    def recv(self) -> Any:
        return pickle.loads(self.recv_bytes())

    def send_bytes(self, data: bytes) -> None:
        size = len(data)
        if size > 0x7FFFFFFF:
            header = (-1).to_bytes(4, "big", signed=True) + size.to_bytes(8, "big")
        else:
            header = size.to_bytes(4, "big", signed=True)
        if size > _SMALL:
            self._write(header)
            self._write(data)
        else:
            self._write(header + data)

    def recv_bytes(self, maxlength: int | None = None) -> bytes | bytearray:
        size = int.from_bytes(self._read(4, first=True), "big", signed=True)
        if size == -1:
            size = int.from_bytes(self._read(8), "big")
        if maxlength is not None and size > maxlength:
            raise OSError("bad message length")
        return self._read(size)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _read(self, size: int, first: bool = False) -> bytearray:
        data = bytearray(size)
        view = memoryview(data)
        got = 0
        while got < size:
            count = os.readv(self._fd, [view[got:]])
            if count == 0:
                if first and got == 0:
                    raise EOFError  # the kernel closed the channel between messages
                raise OSError("got end of file during message")
            got += count
        return data


def connect(target: tuple[str, int] | str, key: bytes) -> Link:
    """Dial the kernel (TCP for a (host, port), else a Unix socket path) and pass its key
    check both ways, as ``multiprocessing.connection.Client(target, authkey=key)`` does."""
    import _socket

    family = _socket.AF_INET if isinstance(target, tuple) else _socket.AF_UNIX
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    try:
        sock.setblocking(True)
        sock.connect(target)
    except BaseException:
        sock.close()
        raise
    link = Link(sock.detach())
    try:
        _answer_challenge(link, key)
        _deliver_challenge(link, key)
    except BaseException:
        link.close()
        raise
    return link


def _answer_challenge(link: Link, key: bytes) -> None:
    message = bytes(link.recv_bytes(_HANDSHAKE_MAX))
    if not message.startswith(CHALLENGE):
        raise AuthenticationError("the kernel sent no challenge")
    link.send_bytes(hmac_md5(key, message[len(CHALLENGE) :]))
    if bytes(link.recv_bytes(_HANDSHAKE_MAX)) != WELCOME:
        raise AuthenticationError("the kernel refused this worker's key")


def _deliver_challenge(link: Link, key: bytes) -> None:
    from _operator import _compare_digest  # hmac.compare_digest where OpenSSL's is absent

    message = os.urandom(_CHALLENGE_BYTES)
    link.send_bytes(CHALLENGE + message)
    expected = hmac_md5(key, message)
    if _compare_digest(bytes(link.recv_bytes(_HANDSHAKE_MAX)), expected):
        link.send_bytes(WELCOME)
    else:
        link.send_bytes(FAILURE)
        raise AuthenticationError("the kernel did not prove it holds the key")


_BLOCK = 64  # MD5's block size in bytes
_INNER = bytes(x ^ 0x36 for x in range(256))
_OUTER = bytes(x ^ 0x5C for x in range(256))


def hmac_md5(key: bytes, message: bytes) -> bytes:
    """``hmac.new(key, message, "md5").digest()`` (RFC 2104) on the built-in ``_md5``."""
    try:
        from _md5 import md5  # type: ignore[import-not-found]  # built in, without a stub
    except ImportError:  # a Python built without it: OpenSSL's, through hmac
        import hmac

        return hmac.new(key, message, "md5").digest()
    if len(key) > _BLOCK:
        key = md5(key).digest()
    key = key.ljust(_BLOCK, b"\0")
    inner = md5(key.translate(_INNER) + message).digest()
    return bytes(md5(key.translate(_OUTER) + inner).digest())
