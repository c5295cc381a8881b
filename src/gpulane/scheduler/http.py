"""A small JSON-over-HTTP client for a Unix socket, on the standard library's http.client."""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpulane.scheduler.base import SchedulerError, SchedulerUnavailable


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixJSONClient:
    """One keep-alive connection per thread; every error becomes a one-line SchedulerError."""

    def __init__(self, path: Path, timeout: float = 30.0, token: str | None = None) -> None:
        self.path = path
        self.timeout = timeout
        self._local = threading.local()
        # Inside a JupyterHub server: its API token names the hub user to the broker.
        self._auth = {"Authorization": f"token {token}"} if token else {}

    def _unavailable(self, error: OSError) -> SchedulerUnavailable:
        return SchedulerUnavailable(
            f"no gpulane broker answers at {self.path} ({error.strerror or error}); "
            "start one with 'gpulane broker', or point GPULANE_SOCKET at it"
        )

    def request(self, method: str, path: str, body: Any = None) -> Any:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        headers.update(self._auth)
        for attempt in (1, 2):  # a kept-alive connection the server closed: retry once, fresh
            conn = getattr(self._local, "conn", None)
            fresh = conn is None
            if conn is None:
                conn = self._local.conn = _UnixConnection(self.path, self.timeout)
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as error:
                conn.close()
                self._local.conn = None
                if fresh or attempt == 2:
                    raise self._unavailable(error) from None
            except OSError as error:
                conn.close()
                self._local.conn = None
                raise self._unavailable(error) from None
        return _decode(response.status, data)

    def stream(self, path: str) -> Iterator[Any]:
        """Yield each JSON line of a streamed response; raise SchedulerUnavailable if cut."""
        conn = _UnixConnection(self.path, None)
        try:
            try:
                conn.request("GET", path, headers=self._auth)
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
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _decode(status: int, data: bytes) -> Any:
    try:
        document = json.loads(data) if data else {}
    except ValueError:
        document = {"error": data.decode(errors="replace")[:200]}
    if status >= 400:
        message = document.get("error") if isinstance(document, dict) else None
        raise SchedulerError(message or f"the broker answered HTTP {status}")
    return document
