"""The worker's Link against the kernel's real multiprocessing.connection end."""

from __future__ import annotations

import socket
import threading
from multiprocessing.connection import Connection, Listener

import pytest

from gpulane.kernel.link import AuthenticationError, Link, connect

KEY = b"k" * 32


def test_messages_both_ways_with_multiprocessing_framing() -> None:
    ours, theirs = socket.socketpair()
    link, kernel = Link(ours.detach()), Connection(theirs.detach())
    big = {"op": "run", "code": "x" * 100_000}  # over the one-write size: header apart
    kernel.send(big)
    assert link.recv() == big
    link.send({"op": "ready", "pid": 1})
    link.send(b"y" * 50_000)
    assert kernel.recv() == {"op": "ready", "pid": 1}
    assert kernel.recv() == b"y" * 50_000
    kernel.close()
    with pytest.raises(EOFError):
        link.recv()
    link.close()


def test_connect_passes_the_kernels_key_check() -> None:
    with Listener(("127.0.0.1", 0), authkey=KEY) as listener:
        accepted: list[Connection] = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()))
        thread.start()
        link = connect(listener.address, KEY)
        thread.join(10)
        accepted[0].send({"op": "stop"})
        assert link.recv() == {"op": "stop"}
        link.close()
        accepted[0].close()


def test_a_wrong_key_is_refused_and_nothing_is_received() -> None:
    with Listener(("127.0.0.1", 0), authkey=KEY) as listener:
        refused: list[BaseException] = []

        def accept() -> None:
            try:
                listener.accept()
            except Exception as error:
                refused.append(error)

        thread = threading.Thread(target=accept)
        thread.start()
        with pytest.raises(AuthenticationError):
            connect(listener.address, b"not the key")
        thread.join(10)
        assert refused and type(refused[0]).__name__ == "AuthenticationError"


@pytest.mark.parametrize("key", [b"", b"k" * 32, b"x" * 64, bytes(range(200))])
def test_hmac_md5_is_the_hmac_modules(key: bytes) -> None:
    import hmac

    from gpulane.kernel.link import hmac_md5

    for message in (b"", b"#CHALLENGE#" + bytes(range(20)), b"y" * 1000):
        assert hmac_md5(key, message) == hmac.new(key, message, "md5").digest()
