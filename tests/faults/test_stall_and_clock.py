"""Faults of time on a real broker: a stall past the lease TTL (SIGSTOP/SIGCONT), and a step
of the broker's wall clock (Debian's libfaketime on the broker process alone)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.broker import BrokerProcess
from tests.support.users import need, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"
LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")


def status(broker: BrokerProcess) -> dict:
    result = broker.call(None, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def names(broker: BrokerProcess) -> tuple[list[str], list[str]]:
    now = status(broker)
    return [j["name"] for j in now["running"]], [j["name"] for j in now["queue"]]


def stall(broker: BrokerProcess, seconds: float) -> None:
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)
    time.sleep(seconds)
    broker.proc.send_signal(signal.SIGCONT)


def test_a_broker_stopped_past_the_lease_ttl_kills_no_live_client(make_broker):
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "4s")
    held = broker.spawn(ALICE, "run", "--name", "held", "--", "sleep", "30")
    wait_for(lambda: names(broker)[0] == ["held"], what="held running")
    waiting = broker.spawn(BOB, "run", "--name", "waiting", "--", "sleep", "30")
    wait_for(lambda: names(broker)[1] == ["waiting"], what="waiting queued")

    stall(broker, 4 + 3)
    time.sleep(2)  # a few sweeps after the stall
    assert names(broker) == (["held"], ["waiting"]), broker.log_text()
    assert held.poll() is None and waiting.poll() is None
    assert "no heartbeat" not in broker.log_text()


def test_a_client_that_died_during_the_stall_is_freed_after_it(make_broker):
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "4s")
    doomed = broker.spawn(ALICE, "run", "--name", "doomed", "--", "sleep", "30")
    wait_for(lambda: names(broker)[0] == ["doomed"], what="doomed running")
    waiting = broker.spawn(BOB, "run", "--name", "waiting", "--", "true")
    wait_for(lambda: names(broker)[1] == ["waiting"], what="waiting queued")

    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)
    doomed.kill()
    doomed.wait()
    time.sleep(7)
    broker.proc.send_signal(signal.SIGCONT)
    code = waiting.wait(15)
    assert code == 0, waiting.stderr.read() if waiting.stderr else ""
    assert "exited; the GPU was freed" in broker.log_text()


# ------------------------------------------------------------------- clock steps


@pytest.fixture
def faketime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file holding the broker's wall-clock offset ("+60", "-3600"); the monotonic clock
    is left alone. The broker inherits the test's environment; clients get a clean one."""
    if not LIBFAKETIME.exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "faketime"],
            env=env,
            check=False,
        )
    need(LIBFAKETIME.exists(), "Debian's faketime is not installed (apt-get install faketime)")
    offset = tmp_path / "faketime"
    offset.write_text("+0\n")
    offset.chmod(0o644)
    monkeypatch.setenv("LD_PRELOAD", str(LIBFAKETIME))
    monkeypatch.setenv("FAKETIME_TIMESTAMP_FILE", str(offset))
    monkeypatch.setenv("FAKETIME_NO_CACHE", "1")
    monkeypatch.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    return offset


def test_a_wall_clock_step_forward_expires_no_lease(make_broker, faketime: Path):
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "4s")
    held = broker.spawn(ALICE, "run", "--name", "held", "--", "sleep", "30")
    wait_for(lambda: names(broker)[0] == ["held"], what="held running")
    waiting = broker.spawn(BOB, "run", "--name", "waiting", "--", "sleep", "30")
    wait_for(lambda: names(broker)[1] == ["waiting"], what="waiting queued")
    before = status(broker)["running"][0]["started_at"]

    faketime.write_text("+60\n")
    time.sleep(4)  # several sweeps, on the stepped clock
    assert names(broker) == (["held"], ["waiting"]), broker.log_text()
    assert held.poll() is None and waiting.poll() is None
    assert "no heartbeat" not in broker.log_text()
    # The step is real in the broker: what it reports in wall time moved.
    assert status(broker)["running"][0]["started_at"] == before


def test_a_clock_stepped_back_and_a_restart_do_not_stretch_a_time_limit(
    make_broker, faketime: Path
):
    broker = make_broker("--simulate-gpus", "1", "--kill-grace", "1s")
    held = broker.spawn(ALICE, "run", "--name", "held", "--time", "30s", "--", "sleep", "300")
    wait_for(lambda: names(broker)[0] == ["held"], what="held running")
    started = time.monotonic()

    broker.kill9()
    faketime.write_text("-3600\n")
    broker.start()
    assert names(broker)[0] == ["held"]
    code = held.wait(45)  # 30 s from its start, not 3,630 s
    took = time.monotonic() - started
    assert took < 40, f"the job ran {took:.0f} s under a 30 s limit"
    assert code != 0
    assert "time limit 00:30 reached" in broker.log_text() or "00:30" in held.stderr.read()


def test_a_live_client_whose_heartbeats_stop_keeps_its_lease(make_broker):
    # The broker watches the client's process through its pidfd: while that process lives,
    # silence alone (a frozen client, a stall between them) is no proof that it is gone.
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "4s")
    held = broker.spawn(ALICE, "run", "--name", "held", "--", "sleep", "30")
    wait_for(lambda: names(broker)[0] == ["held"], what="held running")
    held.send_signal(signal.SIGSTOP)
    time.sleep(4 + 3)
    held.send_signal(signal.SIGCONT)
    assert names(broker)[0] == ["held"], broker.log_text()
    assert "no heartbeat" not in broker.log_text()
