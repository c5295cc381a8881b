"""The broker's life cycle in process on a virtual clock: grant, finish, cancel, revoke,
time limit, lease expiry, restart and reattach. No root, no socket, no child process."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from gpulane.jobs import Request
from tests.support.inprocess_broker import BrokerHouse, person

ALICE, BOB = person("alice"), person("bob")
CAROL = person("carol", admin=True)

House = Callable[..., BrokerHouse]


def submit(house: BrokerHouse, who: Any, **request: Any) -> dict[str, Any]:
    return dict(house.call(house.broker.submit, who, Request(**request)))


def watch(house: BrokerHouse, who: Any, job_id: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    house.call(house.broker.watch, who, job_id, events.append)
    return events


# ---------------------------------------------------------------------- grants


def test_a_free_gpu_is_granted_at_once(broker_house: House) -> None:
    house = broker_house(gpus=2)
    first = submit(house, ALICE, command=("python", "train.py"))
    second = submit(house, BOB)
    assert (first["state"], first["assigned_gpus"]) == ("running", [0])
    assert (second["state"], second["assigned_gpus"]) == ("running", [1])
    assert first["started_at"] == first["submitted_at"] == house.now()
    assert first["command"] == ["python", "train.py"]


def test_a_queued_job_starts_the_moment_the_gpu_frees(broker_house: House) -> None:
    house = broker_house(gpus=1)
    running = submit(house, ALICE)
    queued = submit(house, BOB)
    assert queued["state"] == "queued"
    events = watch(house, BOB, queued["id"])
    status = house.call(house.broker.status, BOB)
    assert [j["id"] for j in status["running"]] == [running["id"]]
    assert [(j["id"], j["position"]) for j in status["queue"]] == [(queued["id"], 1)]
    assert status["queue"][0]["reason_text"]  # the user is told why they wait

    house.advance(30)
    done = house.call(house.broker.finish, ALICE, running["id"], 0)
    assert (done["state"], done["exit_status"], done["elapsed"]) == ("completed", 0, 30)
    granted = house.call(house.broker.lookup, BOB, queued["id"])
    assert (granted["state"], granted["started_at"]) == ("running", house.now())
    assert events[-1]["job"]["state"] == "running"  # the watcher heard at once, no tick needed


def test_a_command_that_fails_or_is_killed_is_reported_so(broker_house: House) -> None:
    house = broker_house(gpus=2)
    failed = submit(house, ALICE)
    killed = submit(house, ALICE)
    failed = house.call(house.broker.finish, ALICE, failed["id"], 3)
    killed = house.call(house.broker.finish, ALICE, killed["id"], -9)
    assert (failed["state"], failed["message"]) == ("failed", "exited with status 3")
    assert (killed["state"], killed["message"]) == ("failed", "killed by SIGKILL")


# ---------------------------------------------------------------------- cancel and revoke


def test_cancelling_a_queued_job_ends_it_and_takes_it_off_the_queue(broker_house: House) -> None:
    house = broker_house(gpus=1)
    submit(house, ALICE)
    queued = submit(house, BOB)
    cancelled = house.call(house.broker.cancel, BOB, queued["id"])
    assert (cancelled["state"], cancelled["message"]) == ("cancelled", "cancelled by bob")
    assert house.call(house.broker.status, BOB)["queue"] == []


def test_cancelling_a_running_job_revokes_it_and_frees_the_gpu_after_the_grace(
    broker_house: House,
) -> None:
    house = broker_house(gpus=1, kill_grace=10.0)
    running = submit(house, ALICE)
    queued = submit(house, BOB)
    events = watch(house, ALICE, running["id"])

    ending = house.call(house.broker.cancel, ALICE, running["id"])
    # Revoked, not yet ended: the client is told and has the grace period to stop its command.
    assert (ending["state"], ending["ending"]) == ("running", "cancelled")
    assert events[-1]["job"]["ending"] == "cancelled"
    house.advance(9.5)
    assert house.state(BOB, queued["id"]) == "queued"
    house.advance(1)
    assert house.state(ALICE, running["id"]) == "cancelled"
    assert house.state(BOB, queued["id"]) == "running"
    assert events[-1]["job"]["state"] == "cancelled"


def test_a_revoked_job_whose_client_reports_in_time_keeps_the_revoked_state(
    broker_house: House,
) -> None:
    house = broker_house(gpus=1, kill_grace=10.0)
    running = submit(house, ALICE)
    house.call(house.broker.cancel, ALICE, running["id"])
    house.advance(2)
    ended = house.call(house.broker.finish, ALICE, running["id"], -15)
    assert (ended["state"], ended["exit_status"]) == ("cancelled", -15)
    assert ended["message"] == "cancelled by alice"
    house.advance(20)  # the grace timer was disarmed: nothing changes when it would have fired
    assert house.call(house.broker.lookup, ALICE, running["id"])["ended_at"] == ended["ended_at"]


def test_a_cancel_that_comes_after_the_command_ended_leaves_its_success(
    broker_house: House,
) -> None:
    # The race CI met: the command exits 0, and a cancel lands before its client reports.
    house = broker_house(gpus=3, kill_grace=10.0)
    me = person("alice", pid=os.getpid())
    done, failed, silent = (submit(house, me)["id"] for _ in range(3))
    for job_id in (done, failed, silent):
        command = subprocess.Popen(["true"], start_new_session=True)
        house.call(house.broker.started, me, job_id, command.pid)
        command.wait()
        told = house.call(house.broker.cancel, me, job_id)
        assert (told["state"], told["ending"]) == ("running", "cancelled")
    # A success reported after it stays a success.
    ended = house.call(house.broker.finish, me, done, 0)
    assert (ended["state"], ended["exit_status"], ended["message"]) == ("completed", 0, "")
    # Any other end is the cancel's (an interrupted cell exits 1 before its kernel cancels).
    ended = house.call(house.broker.finish, me, failed, 1)
    assert (ended["state"], ended["message"]) == ("cancelled", "cancelled by alice")
    # With no report, the cancel ends it after the grace period.
    house.advance(9.5)
    assert house.state(me, silent) == "running"
    house.advance(1)
    final = house.call(house.broker.lookup, me, silent)
    assert (final["state"], final["message"]) == ("cancelled", "cancelled by alice")


def test_a_late_cancel_keeps_the_success_across_a_broker_restart(broker_house: House) -> None:
    # The broker is killed between the cancel and the client's report of exit 0.
    house = broker_house(gpus=1, kill_grace=10.0)
    me = person("alice", pid=os.getpid())
    job_id = submit(house, me)["id"]
    command = subprocess.Popen(["true"], start_new_session=True)
    house.call(house.broker.started, me, job_id, command.pid)
    command.wait()
    house.call(house.broker.cancel, me, job_id)
    house.restart(down_for=1)
    ended = house.call(house.broker.finish, me, job_id, 0)
    assert (ended["state"], ended["message"]) == ("completed", "")


def test_a_cancel_before_the_command_is_registered_keeps_its_success(
    broker_house: House,
) -> None:
    # The cancel lands first; the client registers a command that has already ended (exit 0,
    # not yet reaped), then reports it. A command still running when registered is stopped.
    house = broker_house(gpus=2, kill_grace=10.0)
    me = person("alice", pid=os.getpid())
    ended_first, still_running = (submit(house, me)["id"] for _ in range(2))
    for job_id in (ended_first, still_running):
        house.call(house.broker.cancel, me, job_id)
    done = subprocess.Popen(["true"], start_new_session=True)
    while not _is_zombie(done.pid):
        time.sleep(0.01)
    house.call(house.broker.started, me, ended_first, done.pid)
    done.wait()
    ended = house.call(house.broker.finish, me, ended_first, 0)
    assert (ended["state"], ended["message"]) == ("completed", "")
    sleeper = subprocess.Popen(["sleep", "30"], start_new_session=True)
    house.call(house.broker.started, me, still_running, sleeper.pid)
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    ended = house.call(house.broker.finish, me, still_running, 0)  # it says 0: it was stopped
    assert (ended["state"], ended["message"]) == ("cancelled", "cancelled by alice")


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    return data[data.rfind(b")") + 2 :].split()[0] == b"Z"


def test_an_admin_revokes_another_users_running_job(broker_house: House) -> None:
    house = broker_house(gpus=1, kill_grace=5.0)
    running = submit(house, ALICE)
    events = watch(house, ALICE, running["id"])
    house.call(house.broker.cancel, CAROL, running["id"])
    assert events[-1]["job"]["ending"] == "cancelled"
    assert events[-1]["job"]["message"] == "cancelled by carol"
    house.advance(6)
    assert house.state(ALICE, running["id"]) == "cancelled"


# ---------------------------------------------------------------------- time limit


def test_the_time_limit_revokes_the_job_then_the_grace_ends_it(broker_house: House) -> None:
    house = broker_house(gpus=1, kill_grace=10.0)
    running = submit(house, ALICE, time_limit=60)
    queued = submit(house, BOB)
    house.advance(59.5)
    view = house.call(house.broker.lookup, ALICE, running["id"])
    assert (view["state"], view["ending"], view["remaining"]) == ("running", None, 0.5)
    house.advance(1)
    view = house.call(house.broker.lookup, ALICE, running["id"])
    assert (view["state"], view["ending"]) == ("running", "timeout")
    assert view["message"] == "GPU time limit 01:00 reached; ask for more with --time"
    house.advance(10)
    assert house.state(ALICE, running["id"]) == "timeout"
    assert house.state(BOB, queued["id"]) == "running"


def test_without_a_time_limit_the_default_applies(broker_house: House) -> None:
    from gpulane.broker.policy import PolicyConfig

    house = broker_house(gpus=1, kill_grace=10.0, policy=PolicyConfig(default_time=120))
    running = submit(house, ALICE)
    assert running["time_limit"] == 120
    house.advance(121)
    assert house.call(house.broker.lookup, ALICE, running["id"])["ending"] == "timeout"


# ---------------------------------------------------------------------- leases


def test_heartbeats_keep_a_lease_and_silence_ends_it(broker_house: House) -> None:
    house = broker_house(gpus=1, lease_ttl=10.0)
    running = submit(house, ALICE)  # no pid: the broker cannot watch the client's process
    queued = submit(house, BOB)
    for _ in range(3):  # 18 s in all, never 10 s without a heartbeat
        house.advance(6)
        house.call(house.broker.heartbeat, ALICE, running["id"])
        house.call(house.broker.heartbeat, BOB, queued["id"])
    assert house.state(ALICE, running["id"]) == "running"

    house.advance(6)
    house.call(house.broker.heartbeat, BOB, queued["id"])
    house.advance(6)  # alice silent for 12 s; the sweep runs every second
    gone = house.call(house.broker.lookup, ALICE, running["id"])
    assert gone["state"] == "failed"
    assert gone["message"] == "its client sent no heartbeat for 00:10; the GPU was freed"
    assert house.state(BOB, queued["id"]) == "running"


def test_a_silent_queued_job_is_cancelled(broker_house: House) -> None:
    house = broker_house(gpus=1, lease_ttl=4.0)
    running = submit(house, ALICE)
    queued = submit(house, BOB)
    for _ in range(3):
        house.advance(3)
        house.call(house.broker.heartbeat, ALICE, running["id"])
    assert house.state(BOB, queued["id"]) == "cancelled"
    assert house.state(ALICE, running["id"]) == "running"


def test_a_busy_broker_does_not_expire_the_leases_it_could_not_read(
    broker_house: House,
) -> None:
    house = broker_house(gpus=1, lease_ttl=10.0)
    running = submit(house, ALICE)
    house.advance(2)
    house.call(house.broker.heartbeat, ALICE, running["id"])
    house.loop.stall(30)  # one long callback: heartbeats sent meanwhile wait unread
    house.advance(0.5)  # the late sweep runs before the waiting heartbeat is read
    assert house.state(ALICE, running["id"]) == "running"
    house.call(house.broker.heartbeat, ALICE, running["id"])
    house.advance(6)
    assert house.state(ALICE, running["id"]) == "running"
    house.advance(6)  # silent for 12 s of the broker's own attention: the lease ends
    assert house.state(ALICE, running["id"]) == "failed"


# ---------------------------------------------------------------------- restart


def test_a_restarted_broker_reattaches_jobs_whose_client_lives(broker_house: House) -> None:
    me = os.getpid()  # a live client: this very process
    alice, bob = person("alice", pid=me), person("bob", pid=me)
    house = broker_house(gpus=1, kill_grace=5.0)
    running = submit(house, alice, time_limit=120)
    queued = submit(house, bob)
    house.advance(30)

    house.restart(down_for=20)
    again = house.call(house.broker.lookup, alice, running["id"])
    assert (again["state"], again["started_at"]) == ("running", running["started_at"])
    assert house.state(bob, queued["id"]) == "queued"
    # The time limit still counts from the original start: 70 s are left, not 120.
    house.advance(69)
    assert house.call(house.broker.lookup, alice, running["id"])["ending"] is None
    house.advance(2)
    assert house.call(house.broker.lookup, alice, running["id"])["ending"] == "timeout"
    house.advance(5)
    assert house.state(bob, queued["id"]) == "running"


def test_a_restarted_broker_ends_jobs_whose_processes_died_meanwhile(
    broker_house: House,
) -> None:
    with open("/proc/sys/kernel/pid_max") as handle:
        no_such_pid = int(handle.read())  # PIDs stay below pid_max: no process has this one
    alice, bob = person("alice", pid=no_such_pid), person("bob", pid=no_such_pid)
    house = broker_house(gpus=1)
    running = submit(house, alice)
    queued = submit(house, bob)
    house.restart(down_for=5)
    failed = house.call(house.broker.lookup, alice, running["id"])
    cancelled = house.call(house.broker.lookup, bob, queued["id"])
    assert (failed["state"], failed["message"]) == (
        "failed",
        "its processes ended while the broker was down",
    )
    assert (cancelled["state"], cancelled["message"]) == (
        "cancelled",
        "its client ended while the broker was down",
    )


def test_a_job_being_revoked_keeps_only_the_rest_of_its_grace_after_a_restart(
    broker_house: House,
) -> None:
    alice = person("alice", pid=os.getpid())
    house = broker_house(gpus=1, kill_grace=10.0)
    running = submit(house, alice)
    house.call(house.broker.cancel, alice, running["id"])
    house.advance(3)
    house.restart(down_for=4)  # 7 s of the 10 s grace are gone
    assert house.call(house.broker.lookup, alice, running["id"])["ending"] == "cancelled"
    house.advance(2.5)
    assert house.state(alice, running["id"]) == "running"
    house.advance(1)
    assert house.state(alice, running["id"]) == "cancelled"


def test_usage_survives_a_restart_and_orders_the_queue(broker_house: House) -> None:
    house = broker_house(gpus=1)
    first = submit(house, ALICE)
    house.advance(600)
    house.call(house.broker.finish, ALICE, first["id"], 0)  # alice has used the GPU for 10 min
    carol = person("carol", pid=os.getpid(), admin=True)  # a live client: it outlasts the restart
    blocker = submit(house, carol)
    house.restart(down_for=1)
    # Queued in this order, but bob, with no recent GPU time, goes before alice.
    from_alice = submit(house, ALICE)
    from_bob = submit(house, BOB)
    house.call(house.broker.finish, carol, blocker["id"], 0)
    assert house.state(BOB, from_bob["id"]) == "running"
    assert house.state(ALICE, from_alice["id"]) == "queued"


def test_a_client_alive_to_its_pidfd_is_not_expired_by_silence(broker_house: House) -> None:
    alive = person("alice", pid=os.getpid())  # watched through a pidfd: this very process
    house = broker_house(gpus=1, lease_ttl=4.0)
    running = submit(house, alive)
    house.advance(30)  # no heartbeat at all
    assert house.state(alive, running["id"]) == "running"


def test_a_clock_stepped_back_across_a_restart_leaves_no_more_than_the_limit(
    broker_house: House,
) -> None:
    import sqlite3

    me = person("alice", pid=os.getpid())
    house = broker_house(gpus=1, kill_grace=5.0)
    running = submit(house, me, time_limit=30)
    house.advance(5)
    house.shut()
    # The wall clock goes an hour back while the broker is down: its start is now "future".
    with sqlite3.connect(house.db) as db:
        db.execute("UPDATE jobs SET started_at = started_at + 3600 WHERE id = ?", (running["id"],))
    house.broker = house._start()
    house.advance(29)
    assert house.call(house.broker.lookup, me, running["id"])["ending"] is None
    house.advance(2)  # 30 s, the whole limit, and not 3,625 s
    assert house.call(house.broker.lookup, me, running["id"])["ending"] == "timeout"
