"""A small client for tests: log in to a real JupyterHub, start a server, run cells over its websocket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import requests
from tornado.websocket import websocket_connect


@dataclass
class CellRun:
    messages: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    reply: dict[str, Any] = field(default_factory=dict)

    def stream(self, name: str = "stdout") -> str:
        return "".join(
            c["text"] for _, t, c in self.messages if t == "stream" and c["name"] == name
        )

    def texts(self) -> list[str]:
        return [
            c["data"].get("text/plain", "")
            for _, t, c in self.messages
            if t in ("display_data", "update_display_data", "execute_result")
        ]


class HubUser:
    """One browser-less user of a hub: a logged-in session, a token, a server, kernels."""

    def __init__(self, base_url: str, name: str) -> None:
        self.base = base_url.rstrip("/")
        self.name = name
        self.session = requests.Session()
        self.token = ""

    def close(self) -> None:
        self.session.close()

    def _xsrf(self) -> dict[str, str]:
        return {"X-XSRFToken": self.session.cookies.get("_xsrf", path="/hub/") or ""}

    def login(self, password: str) -> requests.Response:
        self.session.get(f"{self.base}/hub/login", timeout=30)
        xsrf = self.session.cookies.get("_xsrf", path="/hub/") or ""
        return self.session.post(
            f"{self.base}/hub/login?next=",
            data={"username": self.name, "password": password, "_xsrf": xsrf},
            allow_redirects=False,
            timeout=30,
        )

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        headers = {"Authorization": f"token {self.token}"} if self.token else self._xsrf()
        return self.session.request(
            method, f"{self.base}/hub/api{path}", headers=headers, timeout=60, **kwargs
        )

    def make_token(self) -> str:
        response = self.api(
            "POST", f"/users/{self.name}/tokens", json={"note": "gpulane tests", "expires_in": 3600}
        )
        response.raise_for_status()
        self.token = response.json()["token"]
        return self.token

    def start_server(self, timeout: float = 90) -> None:
        response = self.api("POST", f"/users/{self.name}/server")
        if response.status_code not in (201, 202, 400):  # 400: already running
            response.raise_for_status()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/users/{self.name}").json()
            server = (model.get("servers") or {}).get("", {})
            if server.get("ready"):
                return
            time.sleep(0.5)
        raise AssertionError(f"{self.name}'s server did not become ready in {timeout} s")

    def server_api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(
            method,
            f"{self.base}/user/{self.name}/api{path}",
            headers={"Authorization": f"token {self.token}"},
            timeout=60,
            **kwargs,
        )

    def new_kernel(self) -> str:
        response = self.server_api("POST", "/kernels", json={"name": "python3"})
        response.raise_for_status()
        return str(response.json()["id"])

    def run(self, kernel_id: str, code: str, timeout: float = 120) -> CellRun:
        return asyncio.run(self._run(kernel_id, code, timeout))

    def send_cell(self, kernel_id: str, code: str, session_id: str) -> str:
        """Send a cell and hang up once it runs, as a closed browser tab does; the server
        keeps its output for ``session_id`` (read it with :meth:`collect_cell`)."""
        return asyncio.run(self._send_cell(kernel_id, code, session_id))

    def collect_cell(
        self, kernel_id: str, msg_id: str, session_id: str, timeout: float = 120
    ) -> CellRun:
        """Reconnect as ``session_id`` and read the cell's output to its end, replayed first."""
        return asyncio.run(self._collect_cell(kernel_id, msg_id, session_id, timeout))

    async def _connect(self, kernel_id: str, session_id: str) -> Any:
        url = (
            self.base.replace("http", "ws", 1)
            + f"/user/{self.name}/api/kernels/{kernel_id}/channels?session_id={session_id}"
        )
        return await websocket_connect(_request(url, self.token))

    async def _send(self, conn: Any, code: str, session_id: str) -> str:
        msg_id = uuid.uuid4().hex
        await conn.write_message(json.dumps({
            "header": {"msg_id": msg_id, "username": self.name, "session": session_id,
                       "msg_type": "execute_request", "version": "5.3", "date": ""},
            "parent_header": {}, "metadata": {}, "channel": "shell",
            "content": {"code": code, "silent": False, "store_history": True,
                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
        }))  # fmt: skip
        return msg_id

    async def _run(self, kernel_id: str, code: str, timeout: float) -> CellRun:
        session_id = uuid.uuid4().hex
        conn = await self._connect(kernel_id, session_id)
        msg_id = await self._send(conn, code, session_id)
        result = await _read_cell(conn, msg_id, timeout)
        await _hang_up(conn)
        return result

    async def _send_cell(self, kernel_id: str, code: str, session_id: str) -> str:
        conn = await self._connect(kernel_id, session_id)
        msg_id = await self._send(conn, code, session_id)
        while True:  # until the kernel has taken it up
            raw = await asyncio.wait_for(conn.read_message(), 60)
            msg = json.loads(raw) if raw else {}
            if msg.get("parent_header", {}).get("msg_id") == msg_id and msg["msg_type"] in (
                "execute_input",
                "stream",
            ):
                break
        await _hang_up(conn)
        return msg_id

    async def _collect_cell(
        self, kernel_id: str, msg_id: str, session_id: str, timeout: float
    ) -> CellRun:
        conn = await self._connect(kernel_id, session_id)
        result = await _read_cell(conn, msg_id, timeout)
        await _hang_up(conn)
        return result


async def _hang_up(conn: Any) -> None:
    """Close the websocket and its socket before the loop ends: a busy server may take longer
    than a fixed pause to answer the close, and a socket left open warns (an error here)."""
    conn.close()
    with contextlib.suppress(TimeoutError):
        while await asyncio.wait_for(conn.read_message(), 5) is not None:
            pass  # what was still in flight
    stream = getattr(getattr(conn, "protocol", None), "stream", None)
    if stream is not None and not stream.closed():
        stream.close()


async def _read_cell(conn: Any, msg_id: str, timeout: float) -> CellRun:
    """The messages of cell ``msg_id`` until its reply and the kernel's idle."""
    result = CellRun()
    started = time.monotonic()
    idle = False
    while not (idle and result.reply):
        remaining = timeout - (time.monotonic() - started)
        if remaining <= 0:
            raise AssertionError(f"cell did not finish in {timeout} s: {result.messages}")
        raw = await asyncio.wait_for(conn.read_message(), remaining)
        if raw is None:
            raise AssertionError("the kernel websocket closed")
        msg = json.loads(raw)
        if msg.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "execute_reply":
            result.reply = msg["content"]
        elif kind == "status":
            idle = msg["content"]["execution_state"] == "idle"
        else:
            result.messages.append((time.monotonic() - started, kind, msg["content"]))
    return result


def logged_in(url: str, passwords: dict[str, str], name: str) -> HubUser:
    """A user logged in with the demo password, with an API token."""
    user = HubUser(url, name)
    assert user.login(passwords[name]).status_code == 302
    user.make_token()
    return user


def server_ready(user: HubUser) -> bool:
    model = user.api("GET", f"/users/{user.name}").json()
    return bool((model.get("servers") or {}).get("", {}).get("ready"))


def _request(url: str, token: str) -> Any:
    from tornado.httpclient import HTTPRequest

    return HTTPRequest(url, headers={"Authorization": f"token {token}"}, connect_timeout=30)
