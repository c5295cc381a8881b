"""Identity attacks on a real root broker: real Unix users, raw HTTP on its socket.

A job's identity is one source (the socket's peer credentials, or a hub token)
and one uid at every step; the process a root broker may signal is the job's own
(a group leader descended from the job's client); another user's job is unseen (404).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hubs import free_port, launch_hub, stop_hub
from tests.support.users import as_user, need, user_env, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB, CAROL = "gpl-alice", "gpl-bob", "gpl-carol"

# A client that stays alive (its pid is the job's client) and sends one raw HTTP request
# per line read from stdin; "child" starts a process group of its own (a legitimate command).
_CLIENT = textwrap.dedent(
    """
    import json, socket, subprocess, sys
    children = []
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "child":
            proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
            children.append(proc)
            print(json.dumps({"pid": proc.pid}), flush=True)
            continue
        body = b"" if req.get("body") is None else json.dumps(req["body"]).encode()
        head = (
            f"{req['method']} {req['path']} HTTP/1.1\\r\\nHost: broker\\r\\n"
            f"Connection: close\\r\\nContent-Length: {len(body)}\\r\\n"
        )
        if req.get("token"):
            head += f"Authorization: token {req['token']}\\r\\n"
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(10)
            conn.connect(sys.argv[1])
            conn.sendall(head.encode() + b"\\r\\n" + body)
            data = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
                if req.get("first_line") and b"\\n" in data.partition(b"\\r\\n\\r\\n")[2]:
                    break
        top, _, payload = data.partition(b"\\r\\n\\r\\n")
        status = int(top.split()[1]) if top else 0
        print(json.dumps({"status": status, "body": payload.decode(errors="replace")}), flush=True)
    """
)


class RawClient:
    """One long-lived process of ``user`` (None: root) speaking raw HTTP to the broker."""

    def __init__(self, sock: Path, user: str | None) -> None:
        argv = [sys.executable, "-c", _CLIENT, str(sock)]
        self.proc = subprocess.Popen(
            as_user(user, argv) if user else argv,
            env=user_env(user or "root", sock),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the raw client died"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        first_line: bool = False,
    ) -> tuple[int, Any]:
        answer = self._ask(
            {
                "op": "http",
                "method": method,
                "path": path,
                "body": body,
                "token": token,
                "first_line": first_line,
            }
        )
        text = answer["body"]
        if first_line:
            text = text.splitlines()[0] if text else ""
        try:
            return answer["status"], json.loads(text) if text else None
        except ValueError:
            return answer["status"], text

    def child(self) -> int:
        return int(self._ask({"op": "child"})["pid"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def raw_clients() -> Iterator[Any]:
    made: list[RawClient] = []

    def factory(sock: Path, user: str | None) -> RawClient:
        client = RawClient(sock, user)
        made.append(client)
        return client

    yield factory
    for client in made:
        client.close()


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A root-owned process group leader that is no job's command (``setsid sleep``)."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def _wait_running(client: RawClient, job: int, token: str | None = None) -> None:
    def running() -> bool:
        status, view = client.call("GET", f"/v1/jobs/{job}", token=token)
        return status == 200 and view["state"] == "running"

    wait_for(running, what=f"job {job} to run")


# ------------------------------------------------------------------ the plain socket


def test_a_root_client_cannot_have_an_unrelated_root_process_killed(
    make_broker, raw_clients, victim
):
    broker = make_broker("--simulate-gpus", "1", "--kill-grace", "1s")
    root = raw_clients(broker.socket, None)
    status, job = root.call("POST", "/v1/jobs", {"command": ["true"], "name": "held"})
    assert status == 201, job
    _wait_running(root, job["id"])
    # A group leader owned by the job's uid (0), but not the client's descendant: refused.
    status, answer = root.call("POST", f"/v1/jobs/{job['id']}/started", {"pid": victim.pid})
    assert status == 400, answer
    assert "not a command of this job's client" in answer["error"]
    # The client's own command is accepted, and a cancel stops it and only it.
    own = root.child()
    status, answer = root.call("POST", f"/v1/jobs/{job['id']}/started", {"pid": own})
    assert status == 200, answer
    assert root.call("DELETE", f"/v1/jobs/{job['id']}")[0] == 200
    wait_for(lambda: not os.path.exists(f"/proc/{own}") or _zombie(own), what="its command ends")
    time.sleep(1.5)  # past the kill grace: SIGKILL would have reached the victim by now
    assert _alive(victim), "the broker killed a root process that was no job's command"


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return True
    return data[data.rfind(b")") + 2 :].split()[0] == b"Z"


def test_a_users_client_cannot_offer_another_users_process(make_broker, raw_clients, shared_dir):
    broker = make_broker("--simulate-gpus", "1")
    alice = raw_clients(broker.socket, ALICE)
    bob_proc = subprocess.Popen(as_user(BOB, ["setsid", "sleep", "120"]), env=user_env(BOB, None))
    try:
        wait_for(lambda: _owner(bob_proc.pid) == BOB, what="bob's sleep")
        status, job = alice.call("POST", "/v1/jobs", {"command": ["true"]})
        assert status == 201, job
        _wait_running(alice, job["id"])
        status, answer = alice.call("POST", f"/v1/jobs/{job['id']}/started", {"pid": bob_proc.pid})
        assert status == 400, answer
    finally:
        bob_proc.kill()
        bob_proc.wait()


def _owner(pid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(os.stat(f"/proc/{pid}").st_uid).pw_name
    except (OSError, KeyError):
        return None


def test_another_users_job_is_unseen(make_broker, raw_clients):
    broker = make_broker("--simulate-gpus", "1", "--admin-groups", "gpl-admins")
    alice = raw_clients(broker.socket, ALICE)
    bob = raw_clients(broker.socket, BOB)
    carol = raw_clients(broker.socket, CAROL)
    status, job = alice.call("POST", "/v1/jobs", {"command": ["true"], "name": "thesis-draft"})
    assert status == 201, job
    number = job["id"]
    _wait_running(alice, number)
    for method, path, body in [
        ("GET", f"/v1/jobs/{number}", None),
        ("GET", f"/v1/jobs/{number}/events", None),
        ("DELETE", f"/v1/jobs/{number}", None),
        ("POST", f"/v1/jobs/{number}/cancel", None),
        ("POST", f"/v1/jobs/{number}/heartbeat", None),
        ("POST", f"/v1/jobs/{number}/started", {"pid": os.getpid()}),
        ("POST", f"/v1/jobs/{number}/finish", {"exit_status": 0}),
    ]:
        status, answer = bob.call(method, path, body, first_line=path.endswith("events"))
        assert status == 404, (method, path, answer)
        assert answer == {"error": f"no job {number}"}, (method, path, answer)
        assert "thesis-draft" not in json.dumps(answer) and ALICE not in json.dumps(answer)
    # A job that never existed reads the same, so bob learns nothing from the difference.
    assert bob.call("GET", f"/v1/jobs/{number + 1000}") == (
        404,
        {"error": f"no job {number + 1000}"},
    )
    # The owner and an admin still see it; it still runs.
    assert alice.call("GET", f"/v1/jobs/{number}")[1]["state"] == "running"
    status, seen = carol.call("GET", f"/v1/jobs/{number}")
    assert status == 200 and seen["name"] == "thesis-draft"
    assert alice.call("POST", f"/v1/jobs/{number}/finish", {"exit_status": 0})[0] == 200
    status, ended = bob.call("GET", f"/v1/jobs/{number}")
    assert status == 404, ended


# ------------------------------------------------------------------ hub tokens


def _hub_config(state: Path, port: int, broker_token: str, tester_token: str) -> Path:
    config = state / "jupyterhub_config.py"
    config.write_text(
        textwrap.dedent(
            f"""
            c.JupyterHub.bind_url = "http://127.0.0.1:{port}"
            c.JupyterHub.hub_bind_url = "http://127.0.0.1:{free_port()}"
            c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{free_port()}"
            c.JupyterHub.db_url = "sqlite:///{state}/hub.sqlite"
            c.JupyterHub.cookie_secret_file = "{state}/cookie_secret"
            c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"
            c.Authenticator.allowed_users = {{"{ALICE}", "{BOB}"}}
            c.JupyterHub.services = [
                {{"name": "gpulane", "api_token": "{broker_token}"}},
                {{"name": "tester", "api_token": "{tester_token}"}},
            ]
            c.JupyterHub.custom_scopes = {{
                "custom:gpulane:admin": {{"description": "gpulane admin"}}
            }}
            c.JupyterHub.load_roles = [
                {{"name": "user", "scopes": ["self", "access:services!service=gpulane"]}},
                {{"name": "gpulane-service", "services": ["gpulane"],
                  "scopes": ["read:users:name", "read:users:groups", "read:roles:users"]}},
                {{"name": "admin", "services": ["tester"]}},
            ]
            """
        )
    )
    config.chmod(0o600)
    return config


def _server_token_scopes() -> list[str]:
    """The scopes gpulane's hub configuration gives a single-user server's own token."""
    from traitlets.config import Config

    from gpulane.hub.config import GpulaneHub

    c = Config()
    GpulaneHub(config=c).apply(c)
    # The hub drops from a server's token what its owner lacks (here the admin scope);
    # the token API refuses such a request instead, so leave it out.
    return [s for s in c.Spawner.server_token_scopes if s != "custom:gpulane:admin"]


@pytest.fixture
def token_hub(make_broker: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real JupyterHub (users gpl-alice and gpl-bob) and a root broker that asks it about tokens."""
    import requests

    need(os.path.exists("/usr/bin/configurable-http-proxy"), "configurable-http-proxy is missing")
    state = Path(tempfile.mkdtemp(prefix="gpulane-idhub-"))
    port = free_port()
    broker_token, tester_token = secrets.token_hex(16), secrets.token_hex(16)
    url = f"http://127.0.0.1:{port}"
    hub = launch_hub(_hub_config(state, port, broker_token, tester_token), state, url, broker=False)
    api = requests.Session()
    api.headers["Authorization"] = f"token {tester_token}"

    def token(user: str, scopes: list[str]) -> str:
        answer = api.post(
            f"{url}/hub/api/users/{user}/tokens",
            json={"note": "gpulane identity test", "expires_in": 600, "scopes": scopes},
            timeout=30,
        )
        assert answer.status_code == 201, answer.text
        return str(answer.json()["token"])

    try:
        for user in (ALICE, BOB):
            api.post(f"{url}/hub/api/users/{user}", timeout=30)
        monkeypatch.setenv("JUPYTERHUB_API_URL", f"{url}/hub/api")
        monkeypatch.setenv("JUPYTERHUB_API_TOKEN", broker_token)
        broker = make_broker("--simulate-gpus", "1", "--kill-grace", "1s")
        monkeypatch.delenv("JUPYTERHUB_API_TOKEN")
        yield broker, token
    finally:
        stop_hub(hub)
        api.close()
        subprocess.run(["rm", "-rf", str(state)], check=False)


def test_a_job_taken_with_a_hub_token_is_driven_only_by_that_source_and_uid(
    token_hub, raw_clients, victim
):
    broker, make_token = token_hub
    alice_token = make_token(ALICE, _server_token_scopes())
    # The hub (root) takes a lease with the user's server token, as GpulaneSpawner does.
    hub = raw_clients(broker.socket, None)
    status, job = hub.call(
        "POST", "/v1/jobs", {"command": ["jupyterhub-singleuser"]}, token=alice_token
    )
    assert status == 201, job
    number = job["id"]
    assert job["user"] == ALICE
    _wait_running(hub, number, alice_token)
    # Alice's own plain-socket connection names the same user but is another source and uid.
    alice = raw_clients(broker.socket, ALICE)
    plain_root = raw_clients(broker.socket, None)
    lease_calls = [
        ("POST", f"/v1/jobs/{number}/started", {"pid": victim.pid}),
        ("POST", f"/v1/jobs/{number}/heartbeat", None),
        ("POST", f"/v1/jobs/{number}/finish", {"exit_status": 0}),
    ]
    owner_calls = [
        ("GET", f"/v1/jobs/{number}", None),
        ("GET", f"/v1/jobs/{number}/events", None),
        ("DELETE", f"/v1/jobs/{number}", None),
    ]
    # Root without the token is root (an admin may watch and cancel), never the lease holder.
    for client, token, calls in [
        (alice, None, lease_calls + owner_calls),
        (alice, alice_token, lease_calls + owner_calls),
        (plain_root, None, lease_calls),
    ]:
        for method, path, body in calls:
            status, answer = client.call(
                method, path, body, token=token, first_line=path.endswith("events")
            )
            assert status == 404, (token is not None, method, path, answer)
            assert answer == {"error": f"no job {number}"}, answer
    # The lease holder itself may not name a root process that is not its own command.
    status, answer = hub.call(
        "POST", f"/v1/jobs/{number}/started", {"pid": victim.pid}, token=alice_token
    )
    assert status == 400, answer
    # Its own child (the server it spawned) is accepted, and the lease still runs.
    server = hub.child()
    status, answer = hub.call(
        "POST", f"/v1/jobs/{number}/started", {"pid": server}, token=alice_token
    )
    assert status == 200 and answer["state"] == "running", answer
    assert hub.call("DELETE", f"/v1/jobs/{number}", token=alice_token)[0] == 200
    wait_for(lambda: _zombie(server), what="the server's process to be stopped")
    time.sleep(1.5)
    assert _alive(victim), "a root process outside the job was signalled"


def test_hub_tokens_for_another_audience_are_refused(token_hub, raw_clients):
    broker, make_token = token_hub
    root = raw_clients(broker.socket, None)
    other = make_token(ALICE, ["read:users:name!user"])
    status, answer = root.call("GET", "/v1/health", token=other)
    assert status == 403, answer
    assert "gpulane" in answer["error"] and "\n" not in answer["error"]
    status, answer = root.call("POST", "/v1/jobs", {"command": ["true"]}, token=other)
    assert status == 403, answer
    # The server's own token, as gpulane's hub configuration scopes it, is accepted.
    server_token = make_token(ALICE, _server_token_scopes())
    status, answer = root.call("GET", "/v1/health", token=server_token)
    assert status == 200 and answer["user"] == ALICE, answer
