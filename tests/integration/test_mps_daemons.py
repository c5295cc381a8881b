"""The broker's MPS daemons (broker/mps_daemons.py): private folders, argv, start, restart,
stop, and which jobs become MPS clients.

NVIDIA's ``nvidia-cuda-mps-control`` needs a GPU, so here it is a STAND-IN: a small
Python script of that name on PATH (a mock of an external program, kept to what the
broker relies on: ``-d`` forks a daemon that writes its pid file in
CUDA_MPS_PIPE_DIRECTORY; ``quit`` on stdin ends it). What is real and tested: the
broker's folders and their modes as root, the argv and environment it starts the daemon
with (recorded by the stand-in), finding it by its pid file, starting it again after a
SIGKILL, ``quit`` at stop, and the one-user-per-server admission. The real daemon and a
real client past its pinned limit are tests/integration/test_mps_cuda.py's (GPU only).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpulane.broker import mps
from gpulane.broker.mps_daemons import MpsDaemons, daemon_pid, is_mps_server
from gpulane.broker.store import JobRecord
from gpulane.jobs import JobState

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the MPS folders are root's")

STAND_IN = """#!{python}
# Stand-in for nvidia-cuda-mps-control (tests only; see the test module's docstring).
import json, os, signal, sys, time
pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
pid_file = os.path.join(pipe, "nvidia-cuda-mps-control.pid")
if sys.argv[1:] == ["-d"]:
    if os.fork():
        sys.exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    record = {{"argv": sys.argv[1:], "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "log": os.environ.get("CUDA_MPS_LOG_DIRECTORY")}}
    with open(os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "control.log"), "a") as f:
        f.write(json.dumps(record) + "\\n")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    server = os.path.join(os.path.dirname(sys.argv[0]), "nvidia-cuda-mps-server")
    child = __import__("subprocess").Popen([server])  # what a client's connection starts
    with open(os.path.join(os.environ["CUDA_MPS_LOG_DIRECTORY"], "server.pid"), "w") as f:
        f.write(str(child.pid))
    with open(pid_file, "w") as f:
        f.write(str(os.getpid()))
    signal.signal(signal.SIGTERM, lambda *_: (child.kill(), os._exit(0)))
    while True:
        time.sleep(1)
for line in sys.stdin:
    if line.strip() == "quit":
        os.kill(int(open(pid_file).read()), signal.SIGTERM)
"""


@pytest.fixture
def daemons(tmp_path: Path):  # type: ignore[no-untyped-def]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    control = bin_dir / mps.CONTROL
    control.write_text(STAND_IN.format(python=sys.executable))
    control.chmod(0o755)
    server = bin_dir / "nvidia-cuda-mps-server"
    server.write_text(f"#!{sys.executable}\nimport time\nwhile True:\n    time.sleep(1)\n")
    server.chmod(0o755)
    settings = mps.MpsSettings(
        gpus={0: "GPU-aaaa", 1: "GPU-bbbb"}, base=str(tmp_path / "mps"), control=str(control)
    )
    made = MpsDaemons(settings, {"PATH": f"{bin_dir}:/usr/bin:/bin"})
    yield made
    made.clients.clear()
    made.stop()
    for pid_file in Path(settings.base).glob("gpu*/log/server.pid"):  # a SIGKILLed daemon's
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def _records(daemons: MpsDaemons, gpu: int) -> list[dict[str, object]]:
    log = mps.folders(daemons.settings.base, gpu)[1] / "control.log"
    return [json.loads(line) for line in log.read_text().splitlines()]


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def test_each_gpu_gets_a_daemon_with_its_uuid_in_private_folders(daemons: MpsDaemons) -> None:
    daemons.start()
    base = Path(daemons.settings.base)
    for gpu, uuid in ((0, "GPU-aaaa"), (1, "GPU-bbbb")):
        pipe, log = mps.folders(str(base), gpu)
        for path, mode in ((base, 0o711), (pipe.parent, 0o711), (pipe, 0o711), (log, 0o700)):
            info = os.lstat(path)
            assert stat.S_ISDIR(info.st_mode) and info.st_uid == 0
            assert stat.S_IMODE(info.st_mode) == mode, path
        assert daemons.alive(gpu)
        # The server it starts (as a client's user, on the real one) is no stray; this is.
        server = int((log / "server.pid").read_text())
        assert is_mps_server(server) and not is_mps_server(os.getpid())
        assert _records(daemons, gpu) == [{"argv": ["-d"], "visible": uuid, "log": str(log)}]


def test_a_running_daemon_is_kept_and_a_dead_one_started_again(daemons: MpsDaemons) -> None:
    daemons.start()
    pipe = mps.folders(daemons.settings.base, 0)[0]
    first = daemon_pid(pipe)
    assert first is not None
    again = MpsDaemons(daemons.settings, daemons.base_env)
    again.start()  # a new broker finds both daemons running: none is started twice
    assert len(_records(daemons, 0)) == 1 and daemon_pid(pipe) == first
    os.kill(first, signal.SIGKILL)
    os.kill(int((mps.folders(daemons.settings.base, 0)[1] / "server.pid").read_text()), 9)
    assert _wait_gone(first)
    assert not daemons.alive(0)
    assert daemons.check() == [0]
    second = daemon_pid(pipe)
    assert second is not None and second != first and daemons.restarts == 1
    assert daemons.check() == []  # both alive: nothing to do


def test_stop_quits_a_daemon_without_clients_and_leaves_one_serving_jobs(
    daemons: MpsDaemons,
) -> None:
    daemons.start()
    pids = [daemon_pid(mps.folders(daemons.settings.base, g)[0]) for g in (0, 1)]
    assert None not in pids
    daemons.clients[1] = {7: 1001}  # a running job's client on GPU 1
    daemons.stop()
    assert _wait_gone(pids[0] or 0)
    assert daemons.alive(1)


def test_a_folder_another_user_made_or_could_write_in_is_refused(
    daemons: MpsDaemons, tmp_path: Path
) -> None:
    base = Path(daemons.settings.base)
    base.mkdir(mode=0o711)
    (base / "gpu0").mkdir(mode=0o777)
    os.chmod(base / "gpu0", 0o777)
    with pytest.raises(mps.MpsError, match="others could write in it"):
        daemons.start()
    os.rmdir(base / "gpu0")
    (base / "gpu0").symlink_to(tmp_path)
    with pytest.raises(mps.MpsError, match="is not a folder"):
        daemons.start()
    os.unlink(base / "gpu0")
    (base / "gpu0").mkdir(mode=0o711)
    os.chown(base / "gpu0", 1001, 1001)
    with pytest.raises(mps.MpsError, match="owned by uid 1001"):
        daemons.start()
    assert not (base / "gpu0" / "pipe").exists()  # nothing made under it, nothing started


def test_no_gpu_no_daemon(tmp_path: Path, daemons: MpsDaemons) -> None:
    off = mps.plan("auto", control=daemons.settings.control, uuids={}, mig={}, is_root=True)
    idle = MpsDaemons(off, daemons.base_env)
    idle.start()
    assert not idle.enabled and not Path(off.base, "gpu0").exists()


def _running(job_id: int, uid: int, gpus: list[int]) -> JobRecord:
    job = JobRecord(
        uid=uid, user=str(uid), name="j", gpus=len(gpus), slices=1, time_limit=60,
        mem=None, command=["x"], submitted_at=0.0,
    )  # fmt: skip
    job.id, job.state, job.assigned_gpus = job_id, JobState.RUNNING, gpus
    return job


def test_one_user_per_server_and_the_limit_in_each_clients_env(daemons: MpsDaemons) -> None:
    daemons.start()
    limits = {1: 4 * 1024**3, 2: 4 * 1024**3, 3: 4 * 1024**3, 4: None}
    alice, bob = _running(1, 1001, [0]), _running(2, 1002, [0])
    whole = _running(4, 1003, [1])
    jobs = [alice, bob, whole]
    daemons.sync(jobs, lambda j: limits[j.id])
    env = daemons.env_for(1)
    assert env is not None and env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert daemons.env_for(2) is None  # bob's would wait on alice's server: no MPS for it
    assert daemons.env_for(4) is None  # a whole GPU without a memory request: no limit
    alice.state = JobState.COMPLETED
    later = _running(3, 1002, [0])
    daemons.sync([alice, bob, whole, later], lambda j: limits[j.id])
    assert daemons.env_for(3) is not None and daemons.clients[0] == {3: 1002}
    assert daemons.env_for(2) is None  # its environment was fixed when it started


def test_status_and_doctor_say_why_mps_is_off_and_on_refuses_in_one_line(make_broker) -> None:
    """A real broker on simulated GPUs: never a daemon; the line says why."""
    from gpulane.admin.doctor.broker import BrokerSite, check_mps

    broker = make_broker("--simulate-gpus", "1")
    assert "MPS: off (no NVIDIA GPU here)" in broker.call(None, "status").stdout.splitlines()
    site = BrokerSite(socket=broker.socket, state_dir=broker.folder / "state")
    finding = check_mps(site)
    assert (finding.name, finding.status, finding.message) == (
        "MPS",
        "ok",
        "off (no NVIDIA GPU here)",
    )
    for args, code, said in (
        (["--mps", "on"], 1, "gpulane: --mps on: no NVIDIA GPU here; or start with --mps off"),
        (["--mps", "sometimes"], 2, "gpulane: --mps 'sometimes' is not a choice; use auto"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "gpulane", "broker", "--simulate-gpus", "1", *args,
             "--socket", str(broker.folder / "other.sock"),
             "--state-dir", str(broker.folder / "other")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == code, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(said), done.stderr


def test_the_broker_gives_a_shared_gpus_job_its_mps_env_and_keeps_a_serving_daemon(
    daemons: MpsDaemons, broker_house
) -> None:
    """The wiring in the broker (core.py): a grant's view carries the env its command gets,
    another user's job on the same GPU gets none, a whole GPU none; at exit the daemon
    without clients is quit, the serving one kept and found by the next broker."""
    from gpulane.broker.identity import Identity
    from gpulane.broker.policy import PolicyConfig
    from gpulane.jobs import Request
    from gpulane.scheduler.embedded import job_environment

    daemons.start()
    house = broker_house(gpus=2, mps=daemons.settings, policy=PolicyConfig(slices_per_gpu=2))
    alice = Identity(uid=1001, user="alice", groups=frozenset(), pid=None)
    bob = Identity(uid=1002, user="bob", groups=frozenset(), pid=None)
    mine = house.call(house.broker.submit, alice, Request(gpu_mem=4 * 1024**3))
    theirs = house.call(house.broker.submit, bob, Request(gpu_mem=4 * 1024**3))
    whole = house.call(house.broker.submit, alice, Request(gpus=1))
    assert [v["assigned_gpus"] for v in (mine, theirs, whole)] == [[0], [0], [1]]
    env = job_environment(house.call(house.broker.lookup, alice, mine["id"]))
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa"
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(mps.folders(daemons.settings.base, 0)[0])
    assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=4096M"
    for who, view in ((bob, theirs), (alice, whole)):
        env = job_environment(house.call(house.broker.lookup, who, view["id"]))
        assert not any(key.startswith("CUDA_MPS_") for key in env), env
    status = house.call(house.broker.status, alice)
    assert status["mps"].startswith("MPS: on for GPU 0, 1 ")
    house.restart()  # the old broker quits GPU 1's daemon (no clients), keeps GPU 0's
    assert len(_records(daemons, 0)) == 1  # kept and adopted, never started again
    assert len(_records(daemons, 1)) == 2  # quit at exit, started again by the new broker


def test_a_restarted_broker_counts_every_reattached_shared_job_as_a_client(
    daemons: MpsDaemons,
) -> None:
    """Which reattached job is an MPS client the broker cannot know: all count, so a new
    job of either user waits for no server (it runs without MPS) rather than hanging."""
    limit = 4 * 1024**3
    alice, bob, whole = _running(1, 1001, [0]), _running(2, 1002, [0]), _running(3, 1003, [1])
    daemons.adopt([alice, bob, whole], lambda j: None if j.id == 3 else limit)
    assert daemons.clients == {0: {1: 1001, 2: 1002}}
    daemons.start()
    new = _running(4, 1001, [0])
    daemons.sync([alice, bob, whole, new], lambda j: None if j.id == 3 else limit)
    assert daemons.env_for(4) is None and daemons.env_for(1) is None
