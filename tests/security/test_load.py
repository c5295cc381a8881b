"""Load attacks on a real root broker: one user's floods must not hurt another user.

Each test starts a real ``gpulane broker`` as root, runs the attacker and the victim
as real Unix users speaking raw HTTP on the broker's socket, and stops by itself
(bounded loops, a deadline of seconds). The long queues are written to the broker's
store while it is stopped: that is the state a busy machine reaches, without
waiting for (and without being refused by) the per-user submission limits.
"""

from __future__ import annotations

import json
import os
import pwd
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpulane.broker.store import JobRecord, Store
from tests.support.broker import BrokerProcess
from tests.support.users import as_user, user_env, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"

# Raw HTTP on the Unix socket, shared by the scripts below (they run as the test users).
_HTTP = r"""
import json, socket, sys, threading, time
PATH = sys.argv[1]
def request(method, path, body=None, sock=None):
    data = b"" if body is None else json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: broker\r\nContent-Length: {len(data)}\r\n"
            "Connection: close\r\n\r\n").encode()
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(PATH)
        conn.sendall(head + data)
        reply = b""
        while b"\r\n\r\n" not in reply or not _complete(reply):
            chunk = conn.recv(1 << 16)
            if not chunk:
                break
            reply += chunk
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
    return status, reply.partition(b"\r\n\r\n")[2]
def _complete(reply):
    head, _, body = reply.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False
"""

# The victim: one queued job of its own, then heartbeats and submits, each timed.
_VICTIM = (
    _HTTP
    + r"""
seconds = float(sys.argv[2])
status, body = request("POST", "/v1/jobs", {"command": ["true"], "name": "victim"})
job = json.loads(body)["id"]
beats, submits, errors = [], [], []
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    start = time.monotonic()
    status, _ = request("POST", f"/v1/jobs/{job}/heartbeat")
    beats.append(time.monotonic() - start)
    if status != 200:
        errors.append(status)
    time.sleep(0.05)
status, body = request("GET", f"/v1/jobs/{job}")
print(json.dumps({"beats": beats, "errors": errors, "job": json.loads(body)}), flush=True)
"""
)

# The attacker: parallel connections asking for status and new event watches, for a while.
_FLOOD = (
    _HTTP
    + r"""
seconds, threads, job = float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
counts = {}
lock = threading.Lock()
def hammer(n):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if n % 2:
            status, _ = request("GET", "/v1/status")
        else:
            # A new watch answers its first event at once; the attacker leaves then.
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(30)
                conn.connect(PATH)
                conn.sendall(f"GET /v1/jobs/{job}/events HTTP/1.1\r\nHost: b\r\n\r\n".encode())
                reply = conn.recv(1 << 16)
                status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/") else 0
        with lock:
            counts[status] = counts.get(status, 0) + 1
workers = [threading.Thread(target=hammer, args=(n,)) for n in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps(counts), flush=True)
"""
)

# The attacker: connections that each ask for status and never read a byte of the answer.
_UNREAD = (
    _HTTP
    + r"""
count, hold = int(sys.argv[2]), float(sys.argv[3])
conns = []
for _ in range(count):
    conn = socket.socket(socket.AF_UNIX)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.connect(PATH)
    conn.sendall(b"GET /v1/status HTTP/1.1\r\nHost: b\r\n\r\n")
    conns.append(conn)
print("sent", flush=True)
time.sleep(hold)
"""
)

# The attacker: as many idle connections as it can get, up to a bound, held for a while.
_IDLE = (
    _HTTP
    + r"""
count, hold = int(sys.argv[2]), float(sys.argv[3])
conns, refused = [], 0
for _ in range(count):
    conn = socket.socket(socket.AF_UNIX)
    try:
        conn.connect(PATH)
    except OSError:
        refused += 1
        conn.close()
        continue
    conns.append(conn)
print(json.dumps({"open": len(conns), "refused": refused}), flush=True)
time.sleep(hold)
# Which of them the broker closed (a refusal line, or EOF) while we held them.
closed = 0
for conn in conns:
    conn.setblocking(False)
    try:
        data = conn.recv(4096)
        closed += data == b"" or data.startswith(b"HTTP/1.1 ")
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
print(json.dumps({"closed": closed}), flush=True)
"""
)


def script(user: str, code: str, broker: BrokerProcess, *args: object) -> subprocess.Popen[str]:
    """``code`` run by Python as ``user``, with the broker's socket and ``args`` as its argv."""
    return subprocess.Popen(
        as_user(user, [sys.executable, "-c", code, str(broker.socket), *map(str, args)]),
        env=user_env(user, broker.socket),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"script failed: {err[-2000:]}"
    return out


def queue_jobs(broker: BrokerProcess, user: str, count: int, command_bytes: int = 10) -> list[int]:
    """Write ``count`` queued jobs of ``user`` into the stopped broker's store; restart it."""
    broker.stop()
    store = Store(broker.folder / "state" / "broker.sqlite3")
    uid = pwd.getpwnam(user).pw_uid
    now = time.time()
    ids = []
    for n in range(count):
        job = JobRecord(
            uid=uid,
            user=user,
            name=f"queued-{n}",
            gpus=1,
            slices=0,
            time_limit=3600,
            mem=None,
            command=["echo", "x" * command_bytes],
            submitted_at=now + n * 1e-3,
        )
        store.insert(job)
        ids.append(job.id)
    store.close()
    broker.start()
    return ids


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def broker_pid(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return broker.proc.pid


def test_status_flood_does_not_delay_another_users_heartbeats(make_broker) -> None:
    """Finding 2: 1000 queued jobs, then status and new watches from many connections at once
    (each once replayed the whole queue on the broker's one loop). Another user's heartbeats
    must stay prompt, and the flood is answered 429 past its rate."""
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "1h")
    jobs = queue_jobs(broker, ALICE, 1000)
    victim = script(BOB, _VICTIM, broker, 12)
    time.sleep(1.0)  # the victim's job is queued and beating before the flood
    flood = script(ALICE, _FLOOD, broker, 10, 16, jobs[-1])
    counts = json.loads(finish(flood))
    result = json.loads(finish(victim))
    beats = result["beats"]
    assert not result["errors"], result["errors"]
    assert result["job"]["state"] == "queued", result["job"]
    assert statistics.median(beats) < 0.1, f"median heartbeat {statistics.median(beats):.3f} s"
    assert max(beats) < 2.0, f"slowest heartbeat {max(beats):.3f} s"
    assert counts.get("429", 0) > 0, f"the flood was never rate-limited: {counts}"
    log = broker.log_text()
    assert "Traceback" not in log
    assert log.count("refused requests of gpl-alice") <= 1, "refusals logged more than once"


def test_unread_status_answers_do_not_grow_broker_memory(make_broker) -> None:
    """Finding 4: a user with many queued jobs carrying big commands opens status requests
    and never reads them. The broker's memory stays bounded and it keeps serving others."""
    broker = make_broker("--simulate-gpus", "1", "--lease-ttl", "1h")
    queue_jobs(broker, ALICE, 300, command_bytes=100_000)
    pid = broker_pid(broker)
    # The broker listens before it has loaded its queue: measure from a served status on.
    assert broker.call(BOB, "status", timeout=30).returncode == 0
    before = rss_kib(pid)
    attacker = script(ALICE, _UNREAD, broker, 6, 8)
    assert attacker.stdout is not None
    assert attacker.stdout.readline().strip() == "sent"
    peak = before
    health = []
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        peak = max(peak, rss_kib(pid))
        start = time.monotonic()
        answer = broker.call(BOB, "status", timeout=30)
        health.append(time.monotonic() - start)
        assert answer.returncode == 0, answer.stderr
    finish(attacker)
    grown_mib = (peak - before) / 1024
    assert grown_mib < 25, f"broker memory grew {grown_mib:.0f} MiB for unread answers"
    assert max(health) < 5, f"another user's status took {max(health):.1f} s"


def test_idle_connections_of_one_user_leave_room_for_another(make_broker) -> None:
    """Finding 5: one user opens more idle connections than the broker has descriptors.
    The cap per user refuses the excess, the victim's ``gpulane run`` still runs, and the
    broker's log stays small (no "Too many open files" spin)."""
    broker = make_broker("--simulate-gpus", "1", "--max-connections-per-user", "40")
    # A small descriptor limit, as a busy broker meets it (the broker raised its own at start).
    subprocess.run(["prlimit", f"--pid={broker_pid(broker)}", "--nofile=128:128"], check=True)
    attacker = script(ALICE, _IDLE, broker, 300, 8)
    assert attacker.stdout is not None
    opened = json.loads(attacker.stdout.readline())
    start = time.monotonic()
    run = broker.call(BOB, "run", "--", "true", timeout=30)
    took = time.monotonic() - start
    closed = json.loads(finish(attacker))
    assert run.returncode == 0, run.stderr
    assert took < 10, f"the victim's gpulane run took {took:.1f} s"
    assert opened["open"] + opened["refused"] == 300
    assert closed["closed"] >= 300 - 40 - opened["refused"], (opened, closed)
    log = broker.log_text()
    assert len(log) < 20_000, f"broker log is {len(log)} bytes"
    assert "Traceback" not in log


def test_descriptor_exhaustion_is_logged_once_and_survived(make_broker) -> None:
    """Finding 5: with no per-user cap left to stop them, connections exhaust the broker's
    descriptors. Accept backs off and logs the condition once, not once per attempt,
    and the broker serves again once they are gone."""
    broker = make_broker("--simulate-gpus", "1", "--max-connections-per-user", "0")
    subprocess.run(["prlimit", f"--pid={broker_pid(broker)}", "--nofile=64:64"], check=True)
    attacker = script(ALICE, _IDLE, broker, 120, 4)
    finish(attacker)
    wait_for(
        lambda: broker.call(BOB, "run", "--", "true", timeout=30).returncode == 0,
        timeout=20,
        what="the broker to serve again",
    )
    log = broker.log_text()
    assert len(log) < 20_000, f"broker log is {len(log)} bytes"
    assert "Traceback" not in log
    assert log.count("Too many open files") <= 2, log[-2000:]
    assert os.path.exists(broker.socket)
