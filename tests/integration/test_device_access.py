"""GPU device files open only during a grant (issue 14, part 1), as real Unix users.

The GPUs' "device files" are character devices made with mknod in a test folder
(1,3: /dev/null's numbers, so opening one is harmless) and handed to a root broker
with --gpu-device-files; they start open to everyone (0666), as the NVIDIA driver
makes them by default.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.users import as_user, need, user_env, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB, CAROL = "gpl-alice", "gpl-bob", "gpl-carol"


@pytest.fixture
def nodes() -> Iterator[Path]:
    need(shutil.which("setfacl") is not None, "setfacl is missing (apt-get install acl)")
    folder = Path(tempfile.mkdtemp(prefix="gpulane-dev-"))
    folder.chmod(0o755)
    for i in range(2):
        os.mknod(folder / f"nvidia{i}", 0o666 | 0o020000, os.makedev(1, 3))
        (folder / f"nvidia{i}").chmod(0o666)  # as the driver leaves them, umask aside
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def can_open(user: str, path: Path) -> bool:
    probe = [sys.executable, "-c", f"import os; os.close(os.open({str(path)!r}, os.O_RDWR))"]
    done = subprocess.run(
        as_user(user, probe), env=user_env(user, None), capture_output=True, timeout=60
    )
    return done.returncode == 0


def files_option(folder: Path, count: int) -> list[str]:
    return ["--gpu-device-files", ",".join(f"{i}={folder / f'nvidia{i}'}" for i in range(count))]


def running(broker) -> list[dict]:
    return json.loads(broker.call(None, "status", "--json").stdout)["running"]


def hold(broker, user: str, folder: Path, name: str, *extra: str) -> subprocess.Popen[str]:
    """A job that holds its GPU until ``folder/go-NAME`` exists, and leaves behind a process
    in its own session (outside the job's process group) that keeps the GPU's file open."""
    pidfile, go = folder / f"pid-{name}", folder / f"go-{name}"
    keeper = f"exec 3<>{folder}/nvidia$CUDA_VISIBLE_DEVICES; echo $$ > {pidfile}; exec sleep 600"
    # Its output goes nowhere: a keeper holding the client's pipes would keep it from ending.
    script = f"setsid sh -c '{keeper}' </dev/null >/dev/null 2>&1 & "
    script += f"until [ -e {go} ]; do sleep 0.05; done"
    proc = broker.spawn(user, "run", "--name", name, *extra, "--", "sh", "-c", script)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what=f"{name}'s keeper")
    return proc


def keeper_pid(folder: Path, name: str) -> int:
    return int((folder / f"pid-{name}").read_text())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def shared(nodes: Path) -> Path:
    nodes.chmod(0o777)  # the jobs write their keeper's PID here
    return nodes


def test_only_a_holder_opens_its_gpu_and_a_kept_open_file_dies_at_release(make_broker, shared):
    node = shared / "nvidia0"
    assert can_open(BOB, node)  # open to all, as the driver made it
    broker = make_broker("--simulate-gpus", "1", *files_option(shared, 1))
    assert not can_open(ALICE, node) and not can_open(BOB, node)  # closed at start
    assert "GPU device access: enforced" in broker.call(BOB, "status").stdout
    proc = hold(broker, ALICE, shared, "a")
    assert can_open(ALICE, node) and not can_open(BOB, node)
    keeper = keeper_pid(shared, "a")
    assert os.getsid(keeper) != os.getpgid(proc.pid)  # not in the job's group
    (shared / "go-a").touch()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    wait_for(lambda: not alive(keeper), timeout=30, what="the kept-open file's process to end")
    assert not can_open(ALICE, node)
    assert "held GPU 0 without a grant" in broker.log_text()


def test_slice_holders_each_open_the_gpu(make_broker, shared):
    node = shared / "nvidia0"
    broker = make_broker("--simulate-gpus", "1", "--slices", "2", *files_option(shared, 1))
    alice = hold(broker, ALICE, shared, "a", "--slices", "1")
    carol = hold(broker, CAROL, shared, "c", "--slices", "1")
    assert can_open(ALICE, node) and can_open(CAROL, node) and not can_open(BOB, node)
    (shared / "go-a").touch()
    alice.communicate(timeout=60)
    wait_for(lambda: not can_open(ALICE, node), timeout=30, what="alice's entry to go")
    assert can_open(CAROL, node)  # the other holder keeps hers, and her keeper lives
    assert alive(keeper_pid(shared, "c"))
    (shared / "go-c").touch()
    carol.communicate(timeout=60)


def test_a_broker_killed_and_restarted_leaves_no_access_behind(make_broker, shared):
    broker = make_broker("--simulate-gpus", "2", "--kill-grace", "1s", *files_option(shared, 2))
    alice = hold(broker, ALICE, shared, "a")
    carol = hold(broker, CAROL, shared, "c")
    gpu = {j["user"]: j["assigned_gpus"][0] for j in running(broker)}
    a_node, c_node = shared / f"nvidia{gpu[ALICE]}", shared / f"nvidia{gpu[CAROL]}"
    broker.kill9()
    # While the broker is down, carol's job dies with its client; her ACL entry and a
    # process of hers that keeps the GPU open are left behind.
    carol.send_signal(signal.SIGKILL)
    carol.communicate(timeout=30)
    assert can_open(CAROL, c_node)
    broker.start()
    assert not can_open(CAROL, c_node) and not can_open(BOB, c_node)
    wait_for(lambda: not alive(keeper_pid(shared, "c")), timeout=30, what="carol's keeper to end")
    # Alice's job was reattached: her GPU is hers again, her keeper untouched.
    assert can_open(ALICE, a_node) and not can_open(BOB, a_node)
    assert alive(keeper_pid(shared, "a"))
    (shared / "go-a").touch()
    alice.communicate(timeout=60)
    wait_for(lambda: not can_open(ALICE, a_node), timeout=30, what="alice's entry to go")


def test_enforcement_refused_where_it_cannot_hold_and_off_is_said(make_broker, nodes):
    folder = Path(tempfile.mkdtemp(prefix="gpulane-dev-sock-"))
    folder.chmod(0o777)
    try:
        argv = [sys.executable, "-m", "gpulane", "broker", "--socket", str(folder / "s")]
        argv += ["--state-dir", str(folder / "state"), "--simulate-gpus", "1"]
        argv += [*files_option(nodes, 1), "--enforce-devices", "on"]
        done = subprocess.run(
            as_user(BOB, argv), env=user_env(BOB, None), capture_output=True, text=True, timeout=60
        )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a broker running as root" in lines[0], done.stderr
    assert "--no-enforce-devices" in lines[0]
    broker = make_broker("--simulate-gpus", "1", *files_option(nodes, 1), "--no-enforce-devices")
    assert can_open(BOB, nodes / "nvidia0")  # left as it was
    text = broker.call(BOB, "status").stdout
    assert "GPU device access is not enforced (--no-enforce-devices)" in text
