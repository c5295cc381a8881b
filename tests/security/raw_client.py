"""Raw HTTP on the broker's Unix socket, sent by a long-lived process running as a test user.

The process stays alive between requests, so the broker's pidfd lease on a job it submitted
holds for as long as a test wants (its death would end the job). Each request goes on a fresh
connection, so a malformed one cannot poison the next.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.users import as_user, user_env

# Runs as the user: one JSON request a line on stdin, one JSON answer a line on stdout.
_CLIENT = r"""
import base64, http.client, json, socket, sys
path = sys.argv[1]
class Conn(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(path)
for line in sys.stdin:
    ask = json.loads(line)
    body = base64.b64decode(ask["body"]) if ask["body"] is not None else None
    conn = Conn("localhost", timeout=30)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(ask["method"], ask["path"], body=body, headers=headers)
        answer = conn.getresponse()
        text = answer.read().decode("utf-8", "replace")
        out = {"status": answer.status, "text": text}
    except Exception as error:
        out = {"status": 0, "text": repr(error)}
    finally:
        conn.close()
    print(json.dumps(out), flush=True)
"""


class RawClient:
    """``client.request("POST", "/v1/jobs", {...})`` -> (status, parsed body or text).

    Requests are paced at ``per_second`` (15), under the broker's per-user request rate
    (20 a second by default, its own tests' subject), so a test of another limit meets
    that limit and not this one.
    """

    def __init__(self, user: str, socket_path: Path, per_second: float = 15.0) -> None:
        self.user = user
        self.interval = 1.0 / per_second
        self._last = 0.0
        self.proc = subprocess.Popen(
            as_user(user, [sys.executable, "-c", _CLIENT, str(socket_path)]),
            env=user_env(user, socket_path),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        """Send ``body`` bytes exactly as given (malformed ones included)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        time.sleep(max(0.0, self._last + self.interval - time.monotonic()))
        self._last = time.monotonic()
        encoded = base64.b64encode(body).decode() if body is not None else None
        ask = {"method": method, "path": path, "body": encoded}
        self.proc.stdin.write(json.dumps(ask) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the raw client of {self.user} died"
        answer = json.loads(line)
        try:
            return answer["status"], json.loads(answer["text"])
        except ValueError:
            return answer["status"], answer["text"]

    def request(self, method: str, path: str, data: Any = None) -> tuple[int, Any]:
        body = None if data is None else json.dumps(data).encode()
        return self.send(method, path, body)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def one_line_error(answer: Any) -> bool:
    """A refusal as the broker gives one: ``{"error": "<one line>"}``."""
    return (
        isinstance(answer, dict)
        and set(answer) == {"error"}
        and isinstance(answer["error"], str)
        and bool(answer["error"].strip())
        and "\n" not in answer["error"]
    )
