"""jupyterhub-idle-culler through a real hub: a server whose kernel has GPU work is never idle.

The hub is the demo's configuration with ``c.GpulaneHub.idle_timeout = 15`` set before its
``configure(c)`` call, as an admin would: the culler stops servers idle for 15 s and looks
every 7 s (half the timeout, its default), and kernels with GPU work report every 5 s.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulane.scheduler.http import UnixJSONClient
from tests.support.hubclient import CellRun, HubUser
from tests.support.hubs import RunningHub, running_demo_hub

ADA, BEN = "gpl-demo-ada", "gpl-demo-ben"
TIMEOUT = 15  # the culler's --timeout, seconds
IDLE = "idle"  # ben's named server that does nothing


@pytest.fixture(scope="module")
def culling_hub(unix_users: tuple[str, ...]) -> Iterator[RunningHub]:
    def config(state: Path) -> str:
        path = state / "jupyterhub_config.py"
        text = path.read_text()
        assert "\nconfigure(\n" in text
        path.write_text(
            text.replace("\nconfigure(\n", f"\nc.GpulaneHub.idle_timeout = {TIMEOUT}\nconfigure(\n")
        )
        return "c.JupyterHub.allow_named_servers = True\n"

    with running_demo_hub("gpulane-culler-", config) as hub:
        yield hub


def logged_in(hub: RunningHub, name: str) -> HubUser:
    user = HubUser(hub.url, name)
    assert user.login(hub.passwords[name]).status_code == 302
    user.make_token()
    return user


def servers(user: HubUser) -> dict[str, dict]:
    """The user's active servers, by name ("" the default), as the hub (and its culler) sees them."""
    return dict(user.api("GET", f"/users/{user.name}").json().get("servers") or {})


def start_named(user: HubUser, server: str) -> HubUser:
    """Start ``user``'s named server; a HubUser whose paths (``/user/NAME/SERVER/...``) reach it."""
    response = user.api("POST", f"/users/{user.name}/servers/{server}")
    assert response.status_code in (201, 202), response.text
    deadline = time.monotonic() + 90
    while not servers(user).get(server, {}).get("ready"):
        assert time.monotonic() < deadline, f"{user.name}/{server} did not start"
        time.sleep(0.5)
    view = HubUser(user.base, f"{user.name}/{server}")
    view.session, view.token = user.session, user.token
    return view


def broker_status(hub: RunningHub, token: str) -> dict:
    client = UnixJSONClient(hub.state / "run" / "broker.sock", token=token)
    try:
        return dict(client.request("GET", "/v1/status"))
    finally:
        client.close()


def in_thread(user: HubUser, kernel: str, code: str, into: dict[str, CellRun]) -> threading.Thread:
    def run() -> None:
        # A server that went away ends the cell with an AssertionError: the test says why.
        with contextlib.suppress(AssertionError):
            into[user.name] = user.run(kernel, code, timeout=150)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_servers_with_running_or_queued_gpu_cells_are_not_culled_an_idle_one_is(culling_hub):
    hub = culling_hub
    ada, ben = logged_in(hub, ADA), logged_in(hub, BEN)
    try:
        # Each server gets its GPU work as soon as it is up: a server without any is idle
        # from its start, and on a slow machine setting up the next one can take longer
        # than the culler's short timeout.
        ada.start_server()
        ada_kernel = ada.new_kernel()
        gpus = len(broker_status(hub, ada.token)["gpus"])
        results: dict[str, CellRun] = {}
        # Ada's cell holds every GPU and prints nothing; ben's queues behind it.
        ada_cell = in_thread(
            ada, ada_kernel, f"%%gpu --gpus {gpus} --time 5m\nimport time\ntime.sleep(240)", results
        )
        deadline = time.monotonic() + 60
        while not broker_status(hub, ada.token)["running"]:
            assert time.monotonic() < deadline, "ada's cell never got the GPU"
            time.sleep(0.2)
        ben.start_server()
        ben_kernel = ben.new_kernel()
        ben_cell = in_thread(ben, ben_kernel, "%%gpu --time 1m\nprint('ben ran')", results)
        deadline = time.monotonic() + 60
        while not broker_status(hub, ben.token)["queue"]:
            assert time.monotonic() < deadline, "ben's cell never queued"
            time.sleep(0.2)
        idle = start_named(ben, IDLE)
        idle_kernel = idle.new_kernel()
        # gpulane is loaded in the idle server's kernel too; it ran a cell, and has no GPU work.
        assert idle.run(idle_kernel, "x = 1").reply["status"] == "ok"
        # Over twice the culler's timeout, and a look of the culler after it: the two
        # servers with GPU work stay; the idle one goes.
        watched = time.monotonic()
        idle_culled = None
        while time.monotonic() - watched < 2 * TIMEOUT + 10:
            assert "" in servers(ada), (
                f"ada's server, running a silent GPU cell, was culled\n{culler_log(hub)}"
            )
            bens = servers(ben)
            assert "" in bens, (
                f"ben's server, with a queued GPU cell, was culled\n{culler_log(hub)}"
            )
            if idle_culled is None and IDLE not in bens:
                idle_culled = time.monotonic() - watched
            time.sleep(1)
        assert idle_culled is not None, f"the idle server was not culled\n{culler_log(hub)}"
        assert f"Culling server {BEN}/{IDLE}" in culler_log(hub)
        assert broker_status(hub, ada.token)["running"], "ada's job did not keep the GPU"
        # The queued cell runs once ada's is interrupted; then nothing keeps ben's server busy.
        assert ada.server_api("POST", f"/kernels/{ada_kernel}/interrupt").status_code == 204
        ada_cell.join(60)
        ben_cell.join(60)
        assert results[ADA].reply["status"] == "error"
        assert results[BEN].reply["status"] == "ok" and "ben ran" in results[BEN].stream()
        deadline = time.monotonic() + TIMEOUT + 25
        while "" in servers(ben):
            assert time.monotonic() < deadline, (
                f"ben's server, idle after its cell, was not culled\n{culler_log(hub)}"
            )
            time.sleep(1)
    finally:
        for user in (ada, ben):
            for name in servers(user):
                user.api("DELETE", f"/users/{user.name}/servers/{name}")
            user.close()


def culler_log(hub: RunningHub) -> str:
    """What the culler did, from the hub's log (its managed services log there)."""
    lines = [line for line in hub.log_text().splitlines() if "IdleCuller" in line]
    return "\n".join(lines[-20:])
