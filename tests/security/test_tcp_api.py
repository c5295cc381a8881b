"""The broker's API on TCP (``--api-ip``/``--api-port``), as kernels in user pods reach it.

A real broker process, run as a JupyterHub service of a real hub that issues the
tokens; clients connect over loopback TCP, where there are no peer credentials, so a
hub token alone names them. A user's token submits, streams, heartbeats and runs a
job (``gpulane run`` at ``GPULANE_BROKER_URL``); the attacks: no token, a forged token,
a token for another audience, another user's job cancelled with my token, a hub user
named root, a connection flood past the caps, and slow clients holding connections.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security.test_identity import ALICE, BOB, _hub_config, _server_token_scopes
from tests.support.hubs import free_port, launch_hub, stop_hub
from tests.support.users import as_user, need, user_env, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

PER_ADDRESS, TOTAL = 6, 10


class TcpApi:
    """The broker's TCP API at ``port``, its socket, and a way to get users' tokens."""

    def __init__(self, broker: Any, port: int, token: Any) -> None:
        self.broker, self.port, self.token = broker, port, token

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        source: str = "127.0.0.1",
        first_line: bool = False,
    ) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=30, source_address=(source, 0)
        )
        headers = {"Authorization": f"token {token}"} if token else {}
        payload = None if body is None else json.dumps(body).encode()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            data = response.readline() if first_line else response.read()
            return response.status, json.loads(data)
        finally:
            conn.close()


@pytest.fixture
def tcp_api(make_broker: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[TcpApi]:
    """A real JupyterHub (gpl-alice, gpl-bob, and a hub user named root) and a broker that
    serves its API on loopback TCP besides its socket."""
    import requests

    need(os.path.exists("/usr/bin/configurable-http-proxy"), "configurable-http-proxy is missing")
    state = Path(tempfile.mkdtemp(prefix="gpulane-tcphub-"))
    port = free_port()
    broker_token, tester_token = secrets.token_hex(16), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    hub = launch_hub(_hub_config(state, port, broker_token, tester_token), state, url, broker=False)
    api = requests.Session()
    api.headers["Authorization"] = f"token {tester_token}"

    def token(user: str, scopes: list[str] | None = None) -> str:
        answer = api.post(
            f"{url}/hub/api/users/{user}/tokens",
            json={
                "note": "gpulane tcp test",
                "expires_in": 600,
                "scopes": _server_token_scopes() if scopes is None else scopes,
            },
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["token"])

    try:
        for user in (ALICE, BOB, "root"):
            api.post(f"{url}/hub/api/users/{user}", timeout=30)
        monkeypatch.setenv("JUPYTERHUB_API_URL", f"{url}/hub/api")
        monkeypatch.setenv("JUPYTERHUB_API_TOKEN", broker_token)
        api_port = free_port()
        broker = make_broker(
            "--simulate-gpus", "1", "--lease-ttl", "3s", "--idle-timeout", "2s",
            "--api-ip", "127.0.0.1", "--api-port", str(api_port),
            "--max-api-connections", str(TOTAL),
            "--max-api-connections-per-address", str(PER_ADDRESS),
        )  # fmt: skip
        monkeypatch.delenv("JUPYTERHUB_API_TOKEN")
        # The socket answers first (make_broker waits for it); the TCP port opens just after.
        wait_for(lambda: _connects(api_port), what=f"the broker's API on port {api_port}")
        yield TcpApi(broker, api_port, token)
    finally:
        stop_hub(hub)
        api.close()
        subprocess.run(["rm", "-rf", str(state)], check=False)


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


def _socket_health(api: TcpApi) -> int:
    """The broker's answer on its Unix socket (as root), to show it still serves."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(api.broker.socket))
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: broker\r\nConnection: close\r\n\r\n")
        head = sock.recv(64).decode()
    return int(head.split()[1])


def _job(api: TcpApi, number: int, token: str) -> dict[str, Any]:
    status, job = api.call("GET", f"/v1/jobs/{number}", token=token)
    assert status == 200, job
    return dict(job)


def test_a_users_token_submits_streams_heartbeats_and_runs_over_tcp(tcp_api: TcpApi) -> None:
    alice = tcp_api.token(ALICE)
    status, health = tcp_api.call("GET", "/v1/health", token=alice)
    assert status == 200 and health["user"] == ALICE, health
    status, job = tcp_api.call("POST", "/v1/jobs", {"command": ["true"], "gpus": 1}, token=alice)
    assert status == 201 and job["user"] == ALICE, job
    number = job["id"]
    # The event stream works on TCP: its first line is the job's whole state.
    status, event = tcp_api.call("GET", f"/v1/jobs/{number}/events", token=alice, first_line=True)
    assert status == 200 and event["job"]["id"] == number, event
    # The client's process cannot be watched over TCP: heartbeats alone keep the lease.
    for _ in range(5):  # 5 s, past the 3 s lease
        status, beat = tcp_api.call("POST", f"/v1/jobs/{number}/heartbeat", token=alice)
        assert status == 200 and beat["state"] == "running", beat
        time.sleep(1)
    # Unbeaten, the lease lapses and the GPU is freed.
    wait_for(
        lambda: _job(tcp_api, number, alice)["state"] != "running",
        timeout=15,
        what="the lease without heartbeats to lapse",
    )
    # `gpulane run` as the user, with no socket, only the URL and the server's token.
    env = user_env(ALICE, None)
    env.update(GPULANE_BROKER_URL=f"http://127.0.0.1:{tcp_api.port}", JUPYTERHUB_API_TOKEN=alice)
    argv = [sys.executable, "-m", "gpulane", "run", "--gpus", "1", "--", "sh", "-c",
            "sleep 4; echo ran on $GPULANE_JOB_ID"]  # fmt: skip
    done = subprocess.run(as_user(ALICE, argv), env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, (done.stdout, done.stderr, tcp_api.broker.log_text()[-3000:])
    assert "ran on" in done.stdout, done.stdout
    log = tcp_api.broker.log_text()
    assert alice not in done.stdout + done.stderr + log  # the token is never logged
    # The client does not offer its process to a broker that cannot see it.
    assert "/started" not in log, log


def test_tcp_clients_without_a_valid_token_for_us_are_refused(tcp_api: TcpApi) -> None:
    for token in (None, "forged" + secrets.token_hex(16)):
        for method, path in (("GET", "/v1/health"), ("POST", "/v1/jobs"), ("GET", "/v1/status")):
            body = {"command": ["true"]} if method == "POST" else None
            status, answer = tcp_api.call(method, path, body, token=token)
            assert status == 401, (token, path, answer)
            assert answer["error"] and "\n" not in answer["error"], answer
    other = tcp_api.token(ALICE, ["read:users:name!user"])  # valid, but for another audience
    status, answer = tcp_api.call("POST", "/v1/jobs", {"command": ["true"]}, token=other)
    assert status == 403 and "gpulane" in answer["error"], answer
    # Nothing was queued by any of them.
    status, snapshot = tcp_api.call("GET", "/v1/status", token=tcp_api.token(BOB))
    assert status == 200 and not snapshot.get("queue") and not snapshot.get("running"), snapshot


def test_a_token_acts_only_for_its_user_and_a_hub_root_is_not_root(tcp_api: TcpApi) -> None:
    alice, bob, root = tcp_api.token(ALICE), tcp_api.token(BOB), tcp_api.token("root")
    status, job = tcp_api.call("POST", "/v1/jobs", {"command": ["true"]}, token=alice)
    assert status == 201, job
    number = job["id"]
    # A body naming another user changes nothing: unknown fields are refused.
    status, answer = tcp_api.call(
        "POST", "/v1/jobs", {"command": ["true"], "user": ALICE}, token=bob
    )
    assert status == 400, answer
    for token in (bob, root):  # the hub user "root" is a hub user, not uid 0
        status, answer = tcp_api.call("GET", "/v1/health", token=token)
        assert status == 200, answer
        for method, path in (
            ("DELETE", f"/v1/jobs/{number}"),
            ("POST", f"/v1/jobs/{number}/cancel"),
            ("POST", f"/v1/jobs/{number}/heartbeat"),
            ("POST", f"/v1/jobs/{number}/finish"),
        ):
            body = {"exit_status": 0} if path.endswith("finish") else None
            status, answer = tcp_api.call(method, path, body, token=token)
            assert status == 404 and answer == {"error": f"no job {number}"}, (path, answer)
    assert _job(tcp_api, number, alice)["state"] == "running"
    status, answer = tcp_api.call("DELETE", f"/v1/jobs/{number}", token=alice)
    assert status == 200, answer


def _hold(count: int, port: int, source: str) -> list[socket.socket]:
    held = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        held.append(sock)
    return held


def _refused(port: int, source: str) -> str:
    """What a connection from ``source`` is answered before any request: the refusal."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        return s.recv(4096).decode(errors="replace")


def test_a_connection_flood_is_capped_and_others_are_still_answered(tcp_api: TcpApi) -> None:
    bob = tcp_api.token(BOB)
    flood = _hold(PER_ADDRESS, tcp_api.port, "127.0.0.2")
    try:
        time.sleep(0.5)
        answer = _refused(tcp_api.port, "127.0.0.2")
        assert answer.startswith("HTTP/1.1 503") and "127.0.0.2" in answer, answer
        # Another address, and the socket, are answered meanwhile.
        assert tcp_api.call("GET", "/v1/health", token=bob, source="127.0.0.3")[0] == 200
        assert _socket_health(tcp_api) == 200
        # Past the cap of all TCP connections, every address is turned away, the socket is not.
        flood += _hold(TOTAL - PER_ADDRESS, tcp_api.port, "127.0.0.4")
        time.sleep(0.5)
        answer = _refused(tcp_api.port, "127.0.0.5")
        assert answer.startswith("HTTP/1.1 503") and f"{TOTAL} open TCP" in answer, answer
        assert _socket_health(tcp_api) == 200
    finally:
        for sock in flood:
            sock.close()
    wait_for(
        lambda: tcp_api.call("GET", "/v1/health", token=bob, source="127.0.0.5")[0] == 200,
        what="the TCP API to answer once the flood closed",
    )


def test_slow_clients_holding_connections_are_closed_after_the_idle_timeout(
    tcp_api: TcpApi,
) -> None:
    silent = _hold(1, tcp_api.port, "127.0.0.6")[0]
    slow = _hold(1, tcp_api.port, "127.0.0.6")[0]
    slow.sendall(b"GET /v1/health HTTP/1.1\r\nHost: broker\r\n")  # and never the end
    started = time.monotonic()
    for sock in (silent, slow):
        sock.settimeout(15)
        assert sock.recv(4096) == b"", "the broker kept an idle connection open"
        sock.close()
    assert time.monotonic() - started < 12  # --idle-timeout 2s, with the reaper's slack
    # Their slots are free again: a full set of connections from that address is accepted.
    held = _hold(PER_ADDRESS, tcp_api.port, "127.0.0.6")
    try:
        time.sleep(0.3)
        for sock in held:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # no refusal waiting on any of them
    finally:
        for sock in held:
            sock.close()
