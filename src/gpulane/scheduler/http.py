"""JSON over HTTP/1.1 on the broker's Unix socket, through the standard library's http.client.

Why http.client and not httpx (whose Unix-socket transport would also do): every
``gpulane run`` pays this import before its job is queued, and the command's whole
start is budgeted at 60 ms. Measured on the 2-core development VM, under load,
``python -X importtime -c "import httpx"``: 110 ms; ``import http.client``: 44 ms
(about 19 ms of it inside a ``gpulane run``, where ``socket`` and ``re`` are loaded
anyway). http.client already parses responses and chunked bodies; all this module
adds is a connection that dials a Unix socket, keep-alive per thread, and every
failure as a one-line :class:`SchedulerError`.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpulane.errors import SchedulerError, SchedulerUnavailable

# A kept-alive connection the broker closed (idle, or it restarted) fails with one of
# these when reused; the request is then sent once more on a fresh connection.
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class UnixHTTPConnection(http.client.HTTPConnection):
    """An http.client connection to a Unix socket instead of a TCP port."""

    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)  # the Host header only
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.socket_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixJSONClient:
    """Requests to the broker: one keep-alive connection per thread (the lease's
    heartbeat thread and the main thread talk at the same time); every failure is a
    one-line :class:`SchedulerError`, :class:`SchedulerUnavailable` when no broker answers."""

    def __init__(self, path: Path, timeout: float = 30.0, token: str | None = None) -> None:
        self.path = path
        self.where = str(path)  # the broker's address, for messages
        self.timeout = timeout
        self._local = threading.local()
        # Inside a JupyterHub server: its API token names the hub user to the broker.
        self._auth = {"Authorization": f"token {token}"} if token else {}

    def request(self, method: str, path: str, body: Any = None, connect_wait: float = 0.0) -> Any:
        """The decoded JSON answer; an error status raises SchedulerError with its message.

        ``connect_wait``: for how many seconds to keep dialling a socket that refuses or is
        missing (the broker restarts); only the connection is retried, never a request sent."""
        headers = dict(self._auth)
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._local.conn = self._dial(connect_wait)
                conn.request(method, self.base + path, body=payload, headers=headers)
                response = conn.getresponse()
                return _decode(response.status, response.read())
            except _STALE_CONNECTION as error:
                self.close()
                if not reused or attempt == 2:
                    raise self._unavailable(error) from None
            except OSError as error:
                self.close()
                raise self._unavailable(error) from None
            except BaseException:
                # Ctrl-C between sending and reading the answer: the connection is mid-request,
                # and reusing it would raise CannotSendRequest on the next call (the client's
                # own finish after the interrupt); close it so that call dials afresh.
                self.close()
                raise
        raise AssertionError("unreachable: the second attempt returns or raises")

    base = ""  # what the API's paths are under (a service's prefix over TCP)

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        return UnixHTTPConnection(self.path, timeout)

    def _dial(self, wait: float) -> http.client.HTTPConnection:
        """A connected connection; a refused or missing socket is dialled again for ``wait`` s."""
        conn = self._connection(self.timeout)
        deadline: float | None = None
        while True:
            try:
                conn.connect()
                return conn
            except (ConnectionRefusedError, FileNotFoundError):
                now = time.monotonic()
                if deadline is None and wait > 0:
                    deadline = now + wait
                    sys.stderr.write(
                        f"[gpulane] the broker at {self.where} is not answering; "
                        f"retrying for up to {wait:.0f} s\n"
                    )
                    sys.stderr.flush()
                if deadline is None or now >= deadline:
                    raise
                time.sleep(0.2)

    def stream(self, path: str) -> Iterator[Any]:
        """Each JSON line of a streamed (NDJSON) answer, as it comes; no timeout, since
        a queued job may wait for hours. Raises SchedulerUnavailable if the feed is cut."""
        conn = self._connection(None)  # its own: the feed holds it open
        try:
            try:
                conn.request("GET", self.base + path, headers=self._auth)
                response = conn.getresponse()
            except OSError as error:
                raise self._unavailable(error) from None
            if response.status != 200:
                _decode(response.status, response.read())
            while True:
                try:
                    line = response.readline()
                except OSError as error:
                    raise self._unavailable(error) from None
                if not line:
                    return
                yield json.loads(line)
        finally:
            conn.close()

    def close(self) -> None:
        """Close this thread's kept-alive connection (the next request opens a new one)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _unavailable(self, error: OSError) -> SchedulerUnavailable:
        return SchedulerUnavailable(
            f"no gpulane broker answers at {self.where} ({error.strerror or error}); "
            "start one with 'gpulane broker', or point GPULANE_SOCKET at it"
        )


class ServiceJSONClient(UnixJSONClient):
    """The same API over TCP (the broker's ``--api-port``, ``http://HOST:PORT/``, a path prefix
    kept): for a kernel in another pod, which only its hub token names."""

    def __init__(self, url: str, token: str | None, timeout: float = 30.0) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        try:
            port = parts.port or 80
        except ValueError:  # a port out of range or not a number
            port = 0
        if parts.scheme != "http" or not parts.hostname or not port:
            raise SchedulerError(f"{url!r}: the broker's URL must be http://HOST:PORT/PREFIX/")
        if not token:
            raise SchedulerError(f"the broker at {url} needs this server's JupyterHub token")
        super().__init__(Path(parts.path), timeout, token)
        self.where = url
        self.host, self.port = parts.hostname, port
        self.base = parts.path.rstrip("/")

    def _unavailable(self, error: OSError) -> SchedulerUnavailable:
        return SchedulerUnavailable(
            f"no gpulane broker answers at {self.where} ({error.strerror or error}); "
            "check GPULANE_BROKER_URL (the broker's --api-port, open to this pod)"
        )

    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)


def _decode(status: int, data: bytes) -> Any:
    """The JSON document of an answer; an error status raises its ``error`` message."""
    try:
        document = json.loads(data) if data else {}
    except ValueError:
        document = {"error": data.decode(errors="replace")[:200]}
    if status >= 400:
        message = document.get("error") if isinstance(document, dict) else None
        text = message or f"the broker answered HTTP {status}"
        # 503: the broker cannot save now (its state folder is full); callers that must
        # get through (a finish) retry it as they retry a broker that is restarting.
        raise SchedulerUnavailable(text) if status == 503 else SchedulerError(text)
    return document
