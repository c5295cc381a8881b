"""The broker's socket client against a real HTTP server on a Unix socket, in this process.

No root and no broker: a small http.server on a socket in a temporary folder answers
the way the broker does (JSON bodies, error documents, an NDJSON event feed).
"""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulane.errors import SchedulerError, SchedulerUnavailable
from gpulane.scheduler.http import UnixJSONClient


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    connections = 0
    feed_gate: threading.Event


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the broker's tornado server does
    server: _UnixHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def log_message(self, format: str, *args: object) -> None:  # a Unix peer has no address
        pass

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        sent = json.loads(self.rfile.read(length)) if length else None
        if self.path == "/echo":
            echo = {
                "method": self.command,
                "body": sent,
                "auth": self.headers.get("Authorization"),
                "type": self.headers.get("Content-Type"),
            }
            self._answer(200, json.dumps(echo).encode())
        elif self.path == "/missing":
            self._answer(404, b'{"error": "no job 7"}')
        elif self.path == "/not-json":
            self._answer(500, b"Traceback: boom")
        elif self.path == "/empty-error":
            self._answer(503, b"")
        elif self.path == "/then-close":
            # Answers as if the connection stays open, then closes it: what a kept-alive
            # connection looks like after the broker restarted or dropped it idle.
            self._answer(200, b'{"ok": true}')
            self.close_connection = True
        elif self.path == "/hang-up":
            self.close_connection = True  # no answer at all
        elif self.path == "/events":
            self._feed()
        else:
            self._answer(404, b'{"error": "no route"}')

    def _feed(self) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for n, line in enumerate([b'{"n": 1}\n', b'{"n": 2}\n']):
            if n == 1:
                self.server.feed_gate.wait(10)  # the client must have the first line by now
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_DELETE = _route


@pytest.fixture
def server(tmp_path: Path) -> Iterator[_UnixHTTPServer]:
    httpd = _UnixHTTPServer(str(tmp_path / "b.sock"), _Handler)
    httpd.feed_gate = threading.Event()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def client_of(server: _UnixHTTPServer, token: str | None = None) -> UnixJSONClient:
    return UnixJSONClient(Path(server.server_address), timeout=5, token=token)  # type: ignore[arg-type]


def test_a_request_sends_json_and_decodes_the_answer(server: _UnixHTTPServer) -> None:
    client = client_of(server, token="abc")
    answer = client.request("POST", "/echo", {"gpus": 2})
    assert answer == {
        "method": "POST",
        "body": {"gpus": 2},
        "auth": "token abc",
        "type": "application/json",
    }
    assert client.request("DELETE", "/echo")["body"] is None
    assert server.connections == 1  # kept alive
    client.close()


def test_each_thread_has_its_own_connection(server: _UnixHTTPServer) -> None:
    client = client_of(server)
    client.request("GET", "/echo")

    def from_another_thread() -> None:
        client.request("GET", "/echo")
        client.close()  # closes that thread's connection only

    other = threading.Thread(target=from_another_thread)
    other.start()
    other.join()
    client.request("GET", "/echo")
    assert server.connections == 2
    client.close()


def test_an_error_answer_is_a_scheduler_error_with_its_message(server: _UnixHTTPServer) -> None:
    client = client_of(server)
    with pytest.raises(SchedulerError, match=r"^no job 7$") as error:
        client.request("GET", "/missing")
    assert not isinstance(error.value, SchedulerUnavailable)
    with pytest.raises(SchedulerError, match=r"^Traceback: boom$"):
        client.request("GET", "/not-json")
    with pytest.raises(SchedulerError, match=r"^the broker answered HTTP 503$"):
        client.request("GET", "/empty-error")
    assert client.request("GET", "/echo")["method"] == "GET"  # the connection still serves
    client.close()


def test_a_kept_alive_connection_the_server_closed_is_retried_once(
    server: _UnixHTTPServer,
) -> None:
    client = client_of(server)
    assert client.request("GET", "/then-close") == {"ok": True}
    assert client.request("POST", "/echo", {"again": 1})["body"] == {"again": 1}
    assert server.connections == 2
    client.close()


def test_a_fresh_connection_that_gets_no_answer_is_not_retried(server: _UnixHTTPServer) -> None:
    client = client_of(server)
    with pytest.raises(SchedulerUnavailable, match="no gpulane broker answers at"):
        client.request("GET", "/hang-up")
    assert server.connections == 1


def test_no_server_is_scheduler_unavailable_in_one_line(tmp_path: Path) -> None:
    socket = tmp_path / "nobody.sock"
    with pytest.raises(SchedulerUnavailable) as error:
        UnixJSONClient(socket).request("GET", "/v1/status")
    message = str(error.value)
    assert message.startswith(f"no gpulane broker answers at {socket} (")
    assert "GPULANE_SOCKET" in message and "\n" not in message
    with pytest.raises(SchedulerUnavailable, match="no gpulane broker answers at"):
        next(UnixJSONClient(socket).stream("/v1/jobs/1/events"))


def test_the_event_feed_yields_each_line_as_it_comes(server: _UnixHTTPServer) -> None:
    feed = client_of(server).stream("/events")
    assert next(feed) == {"n": 1}  # before the server has written the second line
    server.feed_gate.set()
    assert list(feed) == [{"n": 2}]


def test_an_error_answer_to_the_feed_raises(server: _UnixHTTPServer) -> None:
    with pytest.raises(SchedulerError, match=r"^no route$"):
        next(client_of(server).stream("/nowhere"))


def test_a_request_interrupted_before_its_answer_leaves_no_half_used_connection(
    server: _UnixHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C on `gpulane run` during a call: the finish it sends next must not fail with
    # http.client.CannotSendRequest on the connection left mid-request.
    import http.client

    client = client_of(server)
    client.request("GET", "/echo")
    real = http.client.HTTPConnection.getresponse

    def interrupted(self: http.client.HTTPConnection) -> http.client.HTTPResponse:
        monkeypatch.setattr(http.client.HTTPConnection, "getresponse", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(http.client.HTTPConnection, "getresponse", interrupted)
    with pytest.raises(KeyboardInterrupt):
        client.request("POST", "/echo", {"first": 1})
    assert client.request("POST", "/echo", {"then": 2})["body"] == {"then": 2}
    client.close()
