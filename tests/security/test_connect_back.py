"""Finding 6: a local user who finds the kernel's connect-back port cannot stop or stall the worker.

The kernel (here: this test process) listens for a worker that a cluster starts elsewhere, as
``%%gpu`` does for Slurm (:func:`gpulane.kernel.worker.launch_for`). Before the real worker
dials in, gpl-bob finds the port and connects: closing at once, sending junk, or holding many
connections open without a word. The real worker, started the way Slurm starts it
(``python -m gpulane.kernel.runner`` with the address and key file in its environment), must
still get in at once and run the cell.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpulane.config import KEY_DIR_ENV
from gpulane.kernel.protocol import CellOutput, RunCell
from gpulane.kernel.transfer import pack, unpack
from gpulane.kernel.worker import CallbackWorker
from tests.support.users import as_user, user_env

BOB = "gpl-bob"

# Runs as gpl-bob: open COUNT connections to the kernel's port, in MODE, and report how many.
ATTACKER = r"""
import os, socket, sys, time
host, port, mode, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
held, opened, deadline = [], 0, time.monotonic() + 10
for _ in range(count):
    if time.monotonic() > deadline:
        break  # bounded: a listener that stopped accepting must not hold us here
    try:
        s = socket.create_connection((host, port), timeout=5)
    except OSError:
        continue
    opened += 1
    s.settimeout(1 if mode == "silent" else 5)
    try:
        s.recv(1)  # the kernel's challenge: it accepted us and now waits for an answer
    except OSError:
        pass
    if mode == "close":
        s.close()
    elif mode == "junk":
        s.sendall(b"\x00\x00\x00\x10" + os.urandom(16) + b"\xff" * 64)
        s.close()
    else:
        held.append(s)  # silent: never answer
print("ready", opened, flush=True)
sys.stdin.read()  # hold the silent ones until the test is done (or 60 s, below)
"""


class Collect:
    """A Sink that keeps what the worker sends."""

    def __init__(self) -> None:
        self.streams: list[tuple[str, str]] = []
        self.messages: list[CellOutput] = []
        self.lock = threading.Lock()

    def stream(self, name: str, text: str) -> None:
        with self.lock:
            self.streams.append((name, text))

    def message(self, message: CellOutput) -> None:
        self.messages.append(message)

    def flush(self) -> None:
        pass

    def text(self, name: str) -> str:
        with self.lock:
            return "".join(text for kind, text in self.streams if kind == name)


@pytest.fixture
def kernel_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[CallbackWorker, Collect]]:
    keys = tmp_path / "keys"
    monkeypatch.setenv(KEY_DIR_ENV, str(keys))
    spill = tmp_path / "spill"
    spill.mkdir(mode=0o700)
    message = RunCell(
        code="x = 6 * 7\nprint('hello from the worker')",
        inputs=pack({}, spill, 1 << 20),
        returns=None,
        execution_count=1,
        spill_dir=str(spill),
        max_transfer=1 << 20,
        once=True,
    )
    worker = CallbackWorker(message, host="127.0.0.1")
    sink = Collect()
    worker.attach(sink)
    yield worker, sink
    worker.close()


def attack(worker: CallbackWorker, mode: str, count: int) -> subprocess.Popen[str]:
    host, port = worker.job_env["GPULANE_RUNNER_ADDRESS"].rsplit(":", 1)
    proc = subprocess.Popen(
        as_user(BOB, [sys.executable, "-c", ATTACKER, host, port, mode, str(count)]),
        env=user_env(BOB, None),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the attacker stops opening after 10 s
    assert line.startswith("ready"), proc.stderr.read() if proc.stderr else line
    return proc


def real_worker(worker: CallbackWorker, tmp_path: Path) -> subprocess.Popen[str]:
    """The worker as Slurm starts it: the runner module, the address and key file in its env."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8", **worker.job_env}
    return subprocess.Popen(
        [sys.executable, "-m", "gpulane.kernel.runner"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_cell_ran(
    worker: CallbackWorker, sink: Collect, runner: subprocess.Popen[str], within: float
) -> None:
    start = time.monotonic()
    finished = worker.done.wait(within)
    elapsed = time.monotonic() - start
    if not finished or worker.result is None:
        runner.kill()
        _, err = runner.communicate()
        pytest.fail(
            f"the real worker did not run the cell within {within} s "
            f"(runner exit {runner.returncode}): {err.strip()[-600:]}"
        )
    assert worker.result.ok
    assert worker.result.outputs is not None
    values, failures = unpack(worker.result.outputs)
    assert (values, failures) == ({"x": 42}, {})
    _, err = runner.communicate(timeout=15)
    assert runner.returncode == 0, err
    worker.wait_output()
    assert "hello from the worker" in sink.text("stdout")
    assert not Path(worker.job_env["GPULANE_RUNNER_KEYFILE"]).exists()  # gone once it was in
    print(f"cell ran {elapsed:.2f} s after the real worker started")


@pytest.mark.parametrize("mode", ["close", "junk"])
def test_peers_that_fail_the_handshake_cost_the_worker_nothing(
    unix_users: tuple[str, ...],
    kernel_side: tuple[CallbackWorker, Collect],
    tmp_path: Path,
    mode: str,
) -> None:
    worker, sink = kernel_side
    attacker = attack(worker, mode, 200)
    attacker.communicate("", timeout=30)
    time.sleep(0.5)  # let the kernel finish reading the last of them
    runner = real_worker(worker, tmp_path)
    assert_cell_ran(worker, sink, runner, within=30)
    # Said once, however many strangers knocked: no log flood.
    assert sink.text("stderr").count("failed the key check") == 1, sink.text("stderr")


def test_silent_peers_do_not_stall_the_worker(
    unix_users: tuple[str, ...], kernel_side: tuple[CallbackWorker, Collect], tmp_path: Path
) -> None:
    worker, sink = kernel_side
    attacker = attack(worker, "silent", 100)  # more than the handshakes the kernel runs at once
    try:
        runner = real_worker(worker, tmp_path)
        # Held connections delay the real worker by about one handshake timeout (5 s) at most.
        assert_cell_ran(worker, sink, runner, within=25)
    finally:
        attacker.communicate("", timeout=30)
