"""A hub restart is routine: servers, GPU-profile leases and running ``%%gpu`` cells live
through it, nobody else is given a GPU in use meanwhile, and a server that ended while
the hub was down has its GPU freed.

A real JupyterHub with gpulane's own configuration (``configure``: the managed broker,
``cleanup_servers = False``), real Unix users, GpulaneSpawner's GPU profile, a broker
with two simulated GPUs. The hub is stopped with SIGTERM (its broker goes with it) and
started again from the same state.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.hubclient import HubUser, logged_in, server_ready
from tests.support.hubs import (
    RunningHub,
    launch_hub,
    profile_spawner_config,
    running_demo_hub,
    stop_hub,
)
from tests.support.users import wait_for

ADA, BEN = "gpl-demo-ada", "gpl-demo-ben"

PROFILES = """
[[profile]]
slug = "cpu"
display_name = "CPU only"
default = true

[[profile]]
slug = "gpu"
display_name = "One GPU"
gpus = 1
"""

# The cell a researcher leaves running: silent for a while, then it sets a name.
LONG_CELL = """%%gpu --time 5m --name long
import time
print('start', flush=True)
time.sleep(20)
trained = 'yes'
print('end')
"""


@pytest.fixture(scope="module")
def restart_hub(unix_users) -> Iterator[RunningHub]:
    def extra(state: Path) -> str:
        # Two simulated GPUs instead of the demo's one (applied when the hub starts).
        return profile_spawner_config(state, PROFILES) + "c.GpulaneHub.simulate_gpus = 2\n"

    with running_demo_hub("gpulane-restart-", extra) as hub:
        yield hub


def broker_status(hub: RunningHub) -> dict[str, Any]:
    """The broker's whole picture, read as root (an admin)."""
    result = subprocess.run(
        [sys.executable, "-m", "gpulane", "status", "--json", "--socket",
         str(hub.state / "run" / "broker.sock")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def jobs_by_name(hub: RunningHub, part: str) -> dict[str, dict[str, Any]]:
    status = broker_status(hub)
    return {job["name"]: job for job in status[part]}


def restart(hub: RunningHub, while_down: Any = None) -> None:
    stop_hub(hub.proc)
    if while_down is not None:
        while_down()
    time.sleep(1)
    hub.proc = launch_hub(hub.state / "jupyterhub_config.py", hub.state, hub.url)


def server_pid(hub: RunningHub, user: str) -> int:
    """The pid the hub keeps in the spawner's state (what it finds again after a restart)."""
    with contextlib.closing(sqlite3.connect(hub.state / "jupyterhub.sqlite")) as db:
        row = db.execute(
            "SELECT spawners.state FROM spawners JOIN users ON spawners.user_id = users.id"
            " WHERE users.name = ? AND spawners.name = ''",
            (user,),
        ).fetchone()
    state = json.loads(row[0]) if row and row[0] else {}
    assert state.get("pid"), f"no server of {user} in the hub's database: {state}"
    return int(state["pid"])


def wait_ready(user: HubUser, timeout: float = 90) -> None:
    wait_for(lambda: server_ready(user), timeout=timeout, what=f"{user.name}'s server")


def test_servers_leases_and_a_running_cell_live_through_hub_restarts(
    restart_hub: RunningHub,
) -> None:
    hub = restart_hub
    ada, ben = (logged_in(hub.url, hub.passwords, name) for name in (ADA, BEN))
    try:
        assert ada.api("POST", f"/users/{ADA}/server", json={"profile": "gpu"}).status_code in (
            201,
            202,
        )
        wait_ready(ada)
        server = jobs_by_name(hub, "running")["server-gpu"]
        ada_pid = server_pid(hub, ADA)

        ben.start_server()
        kernel = ben.new_kernel()
        cell_session = uuid.uuid4().hex
        long_cell = ben.send_cell(kernel, LONG_CELL, cell_session)
        wait_for(lambda: "long" in jobs_by_name(hub, "running"), what="ben's cell to run")
        # A second kernel of ben's asks for both GPUs: it must wait for ada's server.
        other = ben.new_kernel()
        both_session = uuid.uuid4().hex
        both = ben.send_cell(other, "%%gpu --gpus 2 --name both\nprint('both')", both_session)
        wait_for(lambda: "both" in jobs_by_name(hub, "queue"), what="the two-GPU cell queued")

        restart(hub)  # while ben's cell sleeps

        running = jobs_by_name(hub, "running")
        assert running["server-gpu"]["id"] == server["id"], "ada's lease was not kept"
        assert running["server-gpu"]["started_at"] == server["started_at"]
        assert "both" in jobs_by_name(hub, "queue"), "a GPU in use was given away"
        assert server_pid(hub, ADA) == ada_pid and server_ready(ada)
        assert "gpulane lease of" not in hub.log_text()  # the old hub's thread never ended it

        cell = ben.collect_cell(kernel, long_cell, cell_session, timeout=90)
        assert cell.reply["status"] == "ok", cell.reply
        assert cell.stream().split() == ["start", "end"], cell.messages
        assert ben.run(kernel, "print(trained)").stream().strip() == "yes"
        assert "both" in jobs_by_name(hub, "queue")  # ada's server still holds GPU 0

        # Ada's server dies while the hub (and its broker) are down: its GPU is freed.
        restart(hub, while_down=lambda: os.kill(ada_pid, signal.SIGTERM))
        cell = ben.collect_cell(other, both, both_session, timeout=90)
        assert cell.reply["status"] == "ok", cell.reply
        assert cell.stream().strip() == "both"
        wait_for(lambda: not server_ready(ada), timeout=60, what="the hub to see ada's server gone")
        assert "server-gpu" not in jobs_by_name(hub, "running")
    finally:
        for user in (ada, ben):
            user.api("DELETE", f"/users/{user.name}/server")
            user.close()
