"""A real broker and real `gpulane run` clients as real Unix users."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.users import wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB, CAROL = "gpl-alice", "gpl-bob", "gpl-carol"


def status(broker, user: str | None = None) -> dict:
    result = broker.call(user, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def queued_names(broker) -> list[str]:
    return [job["name"] for job in status(broker)["queue"]]


def running_names(broker) -> list[str]:
    return [job["name"] for job in status(broker)["running"]]


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_run_passes_grant_streams_output_and_exit_status(make_broker):
    broker = make_broker("--simulate-gpus", "2")
    proc = broker.spawn(
        ALICE,
        "run",
        "--gpus",
        "2",
        "--",
        "sh",
        "-c",
        'echo "gpus=$CUDA_VISIBLE_DEVICES job=$GPULANE_JOB_ID user=$(id -un)"; sleep 1.5; echo late; exit 7',
    )
    # Output streams while the command runs, not at its end.
    first = proc.stdout.readline()
    assert first.startswith("gpus=0,1 job=") and first.strip().endswith(f"user={ALICE}")
    assert proc.poll() is None, "the first line arrived only after the command ended"
    code, out, err = finish(proc)
    assert code == 7
    assert out.strip() == "late"
    assert "exited with status 7" in err


def test_fifo_within_a_user_and_live_queue_position(make_broker, shared_dir):
    broker = make_broker("--simulate-gpus", "1")
    order = shared_dir / "order"
    go = shared_dir / "go"
    holder = broker.spawn(
        ALICE,
        "run",
        "--name",
        "hold",
        "--time",
        "1m",
        "--",
        "sh",
        "-c",
        f"until [ -e {go} ]; do sleep 0.05; done",
    )
    wait_for(lambda: running_names(broker) == ["hold"], what="alice to hold the GPU")
    waiters = []
    for name in ("first", "second", "third"):
        waiters.append(
            broker.spawn(
                ALICE, "run", "--name", name, "--", "sh", "-c", f"echo {name} >> {order}; sleep 0.5"
            )
        )
        wait_for(lambda n=name: n in queued_names(broker), what=f"{name} queued")
    assert queued_names(broker) == ["first", "second", "third"]
    go.touch()
    assert finish(holder)[0] == 0
    results = [finish(p) for p in waiters]
    assert [r[0] for r in results] == [0, 0, 0]
    assert order.read_text().split() == ["first", "second", "third"]
    # The third waiter was pushed each change of its place, with the holder and an ETA.
    third_err = results[2][2]
    assert "position 3 in the queue" in third_err and "position 1 in the queue" in third_err
    assert f"GPU 0: {ALICE}, running" in third_err
    assert "starts by" in third_err


def test_fair_share_lets_a_single_job_pass_five_queued(make_broker, shared_dir):
    broker = make_broker("--simulate-gpus", "1")
    order = shared_dir / "order"
    go = shared_dir / "go"
    holder = broker.spawn(
        ALICE, "run", "--name", "hold", "--", "sh", "-c", f"until [ -e {go} ]; do sleep 0.05; done"
    )
    wait_for(lambda: running_names(broker) == ["hold"], what="alice to hold the GPU")
    alices = []
    for i in range(5):  # one at a time, so their submission order is known
        alices.append(
            broker.spawn(ALICE, "run", "--name", f"a{i}", "--", "sh", "-c", f"echo a{i} >> {order}")
        )
        wait_for(lambda n=i: len(queued_names(broker)) == n + 1, what=f"a{i} queued")
    bob = broker.spawn(BOB, "run", "--name", "b0", "--", "sh", "-c", f"echo b0 >> {order}")
    wait_for(lambda: len(queued_names(broker)) == 6, what="bob's job queued")
    queue = status(broker, BOB)["queue"]
    assert queue[0]["name"] == "b0" and queue[0]["reason"] in ("resources", "fair_share")
    assert queue[1]["reason"] == "fair_share", queue[1]
    go.touch()
    for proc in [holder, *alices, bob]:
        assert finish(proc)[0] == 0
    assert order.read_text().split() == ["b0", "a0", "a1", "a2", "a3", "a4"]


def test_slices_share_one_gpu_with_a_memory_share(make_broker, shared_dir):
    broker = make_broker("--simulate-gpus", "1", "--gpu-memory", "16G", "--slices", "2")
    script = (
        'echo "$GPULANE_GPU_MEMORY_LIMIT" > {d}/$(id -un).mem; touch {d}/$(id -un).up; '
        "for i in $(seq 100); do [ -e {d}/{other}.up ] && exit 0; sleep 0.1; done; exit 9"
    )
    alice = broker.spawn(
        ALICE, "run", "--slices", "1", "--", "sh", "-c", script.format(d=shared_dir, other=BOB)
    )
    bob = broker.spawn(
        BOB, "run", "--slices", "1", "--", "sh", "-c", script.format(d=shared_dir, other=ALICE)
    )
    # Both run at the same time on GPU 0: each waits to see the other up.
    assert finish(alice)[0] == 0
    assert finish(bob)[0] == 0
    assert (shared_dir / f"{ALICE}.mem").read_text().strip() == str(8 * 1024**3)
    # A third slice job waits while two hold the GPU.
    holders = [
        broker.spawn(u, "run", "--slices", "1", "--name", "h", "--", "sleep", "2")
        for u in (ALICE, BOB)
    ]
    wait_for(lambda: len(running_names(broker)) == 2, what="two slice holders")
    third = broker.spawn(CAROL, "run", "--slices", "1", "--name", "third", "--", "true")
    wait_for(lambda: queued_names(broker) == ["third"], what="third slice job to queue")
    gpu = status(broker)["gpus"][0]
    assert sorted(h["user"] for h in gpu["holders"]) == [ALICE, BOB]
    for proc in [*holders, third]:
        assert finish(proc)[0] == 0


def test_time_limit_stops_the_job_and_frees_the_gpu(make_broker):
    broker = make_broker("--simulate-gpus", "1", "--kill-grace", "1s")
    # The command ignores SIGTERM, so only the SIGKILL after the grace period ends it.
    stubborn = broker.spawn(
        ALICE, "run", "--time", "2s", "--", "sh", "-c", "trap '' TERM; sleep 30 & wait; sleep 30"
    )
    wait_for(lambda: running_names(broker) == ["sh"], what="the job to run")
    nxt = broker.spawn(BOB, "run", "--name", "next", "--", "true")
    started = time.monotonic()
    code, _, err = finish(stubborn)
    assert code == 124
    assert "time limit 00:02 reached; ask for more with --time" in err
    assert time.monotonic() - started < 8
    assert finish(nxt)[0] == 0


def test_cancel_own_yes_others_no_admin_yes(make_broker):
    broker = make_broker("--simulate-gpus", "1", "--admin-groups", "gpl-admins")
    holder = broker.spawn(BOB, "run", "--name", "bobs", "--", "sleep", "60")
    wait_for(lambda: running_names(broker) == ["bobs"], what="bob to hold the GPU")
    waiting = broker.spawn(ALICE, "run", "--name", "alices", "--", "true")
    wait_for(lambda: queued_names(broker) == ["alices"], what="alice's job queued")
    bob_job = status(broker)["running"][0]["id"]
    alice_job = status(broker)["queue"][0]["id"]

    refused = broker.call(ALICE, "cancel", str(bob_job))
    assert refused.returncode == 1
    # Another user's job is unseen: the same answer as for a job that never existed.
    assert refused.stderr.strip() == f"gpulane: no job {bob_job}"
    assert running_names(broker) == ["bobs"]

    own = broker.call(ALICE, "cancel", str(alice_job))
    assert own.returncode == 0, own.stderr
    code, _, err = finish(waiting)
    assert code != 0 and f"cancelled by {ALICE}" in err

    admin = broker.call(CAROL, "cancel", str(bob_job))
    assert admin.returncode == 0, admin.stderr
    code, _, err = finish(holder)
    assert f"cancelled by {CAROL}" in err
    wait_for(lambda: running_names(broker) == [], what="the GPU to be freed")


def test_only_the_owner_sees_the_command(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    holder = broker.spawn(ALICE, "run", "--name", "secret", "--", "sleep", "30")
    wait_for(lambda: running_names(broker) == ["secret"], what="alice's job to run")
    mine = status(broker, ALICE)["running"][0]
    theirs = status(broker, BOB)["running"][0]
    assert mine["command"] == ["sleep", "30"]
    assert "command" not in theirs
    assert theirs["user"] == ALICE and theirs["state"] == "running" and theirs["remaining"] > 0
    holder.send_signal(signal.SIGINT)
    code, _, err = finish(holder)
    assert code == 130 and "interrupted" in err
    wait_for(lambda: running_names(broker) == [], what="the GPU to be freed after Ctrl-C")


def test_interrupt_while_queued_withdraws(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    holder = broker.spawn(ALICE, "run", "--name", "hold", "--", "sleep", "30")
    wait_for(lambda: running_names(broker) == ["hold"], what="hold")
    waiter = broker.spawn(BOB, "run", "--name", "wait", "--", "true")
    wait_for(lambda: queued_names(broker) == ["wait"], what="wait queued")
    waiter.send_signal(signal.SIGINT)
    assert finish(waiter)[0] == 130
    assert queued_names(broker) == []
    holder.send_signal(signal.SIGINT)
    finish(holder)


def test_gpu_groups_refuse_outsiders(make_broker):
    broker = make_broker("--simulate-gpus", "1", "--gpu-groups", "gpl-gpu")
    refused = broker.call(BOB, "run", "--", "true")
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"gpulane: {BOB} may not use GPUs here: not in the GPU group gpl-gpu; "
        f"an admin adds them with: usermod -a -G gpl-gpu {BOB}"
    )
    assert broker.call(ALICE, "run", "--", "true").returncode == 0


def test_killed_client_frees_the_gpu_and_its_command_ends(make_broker, shared_dir):
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "10s")
    pidfile = shared_dir / "pid"
    holder = broker.spawn(
        ALICE, "run", "--name", "hold", "--", "sh", "-c", f"echo $$ > {pidfile}; exec sleep 300"
    )
    wait_for(pidfile.exists, what="the command to start")
    wait_for(lambda: pidfile.read_text().strip() != "", what="the pid file")
    command_pid = int(pidfile.read_text())
    waiter = broker.spawn(BOB, "run", "--name", "next", "--", "true")
    wait_for(lambda: queued_names(broker) == ["next"], what="bob queued")
    killed_at = time.monotonic()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert finish(waiter)[0] == 0
    freed_after = time.monotonic() - killed_at
    assert freed_after < 10, f"GPU freed {freed_after:.1f} s after the client died"
    wait_for(
        lambda: not Path(f"/proc/{command_pid}").exists(), timeout=5, what="the command to end"
    )


def test_broker_killed_and_restarted_loses_nothing(make_broker, shared_dir):
    broker = make_broker("--simulate-gpus", "1")
    order, go = shared_dir / "order", shared_dir / "go"
    # The holder runs until the test lets it go (a fixed sleep ran out on a loaded machine
    # before the others had queued).
    holder = broker.spawn(
        ALICE,
        "run",
        "--name",
        "hold",
        "--",
        "sh",
        "-c",
        f"while [ ! -e {go} ]; do sleep 0.05; done; echo hold >> {order}",
    )
    wait_for(lambda: running_names(broker) == ["hold"], what="hold")
    second = broker.spawn(
        BOB, "run", "--name", "second", "--", "sh", "-c", f"echo second >> {order}"
    )
    wait_for(lambda: queued_names(broker) == ["second"], what="second queued")
    third = broker.spawn(
        CAROL, "run", "--name", "third", "--", "sh", "-c", f"echo third >> {order}"
    )
    wait_for(lambda: queued_names(broker) == ["second", "third"], what="third queued")
    doomed = broker.spawn(CAROL, "run", "--name", "doomed", "--", "true")
    wait_for(lambda: "doomed" in queued_names(broker), what="doomed queued")

    broker.kill9()
    doomed.kill()  # its client dies while the broker is down
    doomed.wait()
    broker.start()

    assert running_names(broker) == ["hold"]
    assert queued_names(broker) == ["second", "third"]
    go.touch()
    for proc in (holder, second, third):
        code, _, err = finish(proc)
        assert code == 0, err
    assert order.read_text().split() == ["hold", "second", "third"]
    assert "reattached job" in broker.log_text()


def test_bad_options_give_one_line_and_submit_nothing(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    cases = {
        ("--gpus", "x"): "--gpus 'x' must be a whole number from 1 to 64",
        ("--slices", "0"): "--slices '0' must be a whole number from 1 to 64",
        ("--time", "soon"): "--time 'soon' is not a time limit; use HH:MM:SS",
        ("--mem", "12X"): "--mem '12X' is not a size; use a size such as 512M",
        ("--name", "two words"): "--name 'two words' must be 1-64 letters",
        ("--gpus", "1", "--slices", "1"): "--gpus and --slices exclude each other",
        ("--time", "48h"): "--time 48:00:00 is over this broker's maximum 24:00:00",
    }
    for options, expected in cases.items():
        result = broker.call(ALICE, "run", *options, "--", "true")
        assert result.returncode == (1 if "maximum" in expected else 2), (options, result.stderr)
        assert expected in result.stderr, (options, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    missing = broker.call(ALICE, "run")
    assert missing.returncode == 2 and "needs a command" in missing.stderr
    assert status(broker)["queue"] == [] and status(broker)["running"] == []
    bad_broker = subprocess.run(
        broker.gpulane(None, "broker", "--slices", "many", "--simulate-gpus", "1"),
        capture_output=True,
        text=True,
        env=broker.env(None),
        timeout=30,
    )
    assert bad_broker.returncode == 2
    assert (
        bad_broker.stderr.strip() == "gpulane: --slices 'many' must be a whole number from 1 to 64"
    )


def test_malformed_traffic_on_the_socket_is_refused_and_the_broker_serves_on(make_broker):
    import socket

    broker = make_broker("--simulate-gpus", "1")

    def exchange(payload: bytes, close_after_send: bool = False) -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(15)
            sock.connect(str(broker.socket))
            sock.sendall(payload)
            if close_after_send:
                sock.shutdown(socket.SHUT_WR)
            chunks = []
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                    if b"\r\n\r\n" in b"".join(chunks) and b"}" in chunks[-1]:
                        break
            except (ConnectionResetError, TimeoutError):
                pass
            return b"".join(chunks)

    def post(body: bytes, length: int | None = None) -> bytes:
        head = f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n"
        return head.encode() + body

    for garbage in (os.urandom(256) + b"\r\n\r\n", b"\x00\xff garbage\r\n\r\n"):
        answer = exchange(garbage)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:80]
    assert b'"error": "the request body is not valid JSON"' in exchange(post(b"{not json"))
    assert b"unknown field(s) in request: evil" in exchange(
        post(b'{"evil": 1, "command": ["true"]}')
    )
    assert b"gpus must be an integer" in exchange(post(b'{"gpus": "1; rm -rf /"}'))
    huge = exchange(post(b"", length=50 * 1024 * 1024))
    assert b"413" in huge.split(b"\r\n")[0] and b"request body over" in huge
    exchange(
        post(b'{"command": ["tr', length=500), close_after_send=True
    )  # truncated, then hung up
    # After all that the broker still answers, and nothing was queued.
    assert status(broker)["queue"] == []
    assert broker.call(ALICE, "run", "--", "true").returncode == 0
    assert broker.proc.poll() is None
