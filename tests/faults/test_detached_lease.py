"""A detached lease (a GPU-profile server's) passes to its command when its client goes.

The hub submits a GPU-profile server's job and starts the server; when the hub stops
for a restart, the GPU must stay with the running server and go to nobody else, and
be freed when the server ends. Here the "hub" is a real client process (a Unix user's
Python using gpulane's own client) killed with SIGKILL, on a real broker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.users import as_user, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"

# A client that submits one job, starts its command in its own process group (a
# detached one outlives it, as a spawner's server outlives the hub), writes the
# command's pid, and holds the lease until it is killed.
CLIENT = """
import sys
from pathlib import Path
from gpulane.jobs import Request
from gpulane.scheduler.embedded import BrokerScheduler

socket, pidfile, detached = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "detached"
request = Request(name="server", command=("sleep", "300"), detached=detached, time_limit=600)
import gpulane.scheduler.embedded as embedded

real_start = embedded._Lease._start

def _start(self, command, job):
    real_start(self, command, job)
    pidfile.write_text(str(self.proc.pid))

embedded._Lease._start = _start
BrokerScheduler(socket).run(request)
"""


def job_states(broker) -> dict[str, tuple[str, str]]:
    """name -> (state, message) of every job the broker has saved, ended ones included."""
    with contextlib.closing(sqlite3.connect(broker.folder / "state" / "broker.sqlite3")) as db:
        rows = db.execute("SELECT name, state, message FROM jobs ORDER BY id").fetchall()
    return {name: (state, message) for name, state, message in rows}


def start_client(broker, shared_dir: Path, detached: bool) -> tuple[subprocess.Popen[str], int]:
    pidfile = shared_dir / f"cmd-{'detached' if detached else 'attached'}.pid"
    client = subprocess.Popen(
        as_user(
            ALICE,
            [
                sys.executable,
                "-c",
                CLIENT,
                str(broker.socket),
                str(pidfile),
                "detached" if detached else "attached",
            ],
        ),
        env=broker.env(ALICE),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    broker.clients.append(client)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the command")
    return client, int(pidfile.read_text())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_detached_command_keeps_its_gpu_when_its_client_dies_and_frees_it_at_its_end(
    make_broker, shared_dir
):
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "3s")
    client, command = start_client(broker, shared_dir, detached=True)
    waiter = broker.spawn(BOB, "run", "--name", "next", "--", "true")
    wait_for(lambda: job_states(broker).get("next", ("",))[0] == "queued", what="bob queued")

    client.send_signal(signal.SIGKILL)  # the hub goes away, the server does not
    client.wait()
    time.sleep(5)  # past the lease's time to live: no heartbeat reaches the broker
    assert alive(command), "the broker ended the detached command with its client"
    states = job_states(broker)
    assert states["server"][0] == "running", states
    assert states["next"][0] == "queued", f"the GPU was given to bob meanwhile: {states}"
    assert "its command (process" in broker.log_text()

    os.kill(command, signal.SIGTERM)  # the server stops: the GPU goes to bob at once
    waiter.communicate(timeout=15)
    assert waiter.returncode == 0
    state, message = job_states(broker)["server"]
    assert state == "completed" and "after its client had gone" in message, (state, message)


def test_a_detached_command_is_reattached_by_its_own_process_after_a_broker_restart(
    make_broker, shared_dir
):
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "3s")
    client, command = start_client(broker, shared_dir, detached=True)
    broker.kill9()
    client.send_signal(signal.SIGKILL)  # the hub and its managed broker both go down
    client.wait()
    broker.start()
    waiter = broker.spawn(BOB, "run", "--name", "next", "--", "true")
    time.sleep(5)
    assert alive(command)
    states = job_states(broker)
    assert (states["server"][0], states["next"][0]) == ("running", "queued"), states

    os.kill(command, signal.SIGKILL)
    waiter.communicate(timeout=15)
    assert waiter.returncode == 0


def test_an_attached_command_still_ends_with_its_client(make_broker, shared_dir):
    broker = make_broker("--simulate-gpus", "1")
    client, command = start_client(broker, shared_dir, detached=False)
    client.send_signal(signal.SIGKILL)
    client.wait()
    wait_for(lambda: not alive(command), timeout=10, what="the command to be ended")
    wait_for(lambda: job_states(broker)["server"][0] != "running", what="the job's end saved")
    state, message = job_states(broker)["server"]
    assert state == "failed" and "its client (process" in message, (state, message)
