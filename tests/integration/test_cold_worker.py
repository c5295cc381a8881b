"""A cold worker (no fork server, no warm spare: what a Slurm node starts) runs its first cell
before IPython is imported (kernel/plain.py); what the notebook sees must be what a worker
with its IPython shell built shows.

Real ipykernel kernels as a real user against a real broker: one kernel whose workers start
cold, one with the default fork server (its workers have the shell), the same `%%gpu` cells
in both; outputs, results, `Out[n]`, `_`, returned names and tracebacks compared.
"""

from __future__ import annotations

import re
import time

import pytest

from gpulane.kernel import runner
from gpulane.kernel.protocol import CellError, RunCell
from gpulane.kernel.transfer import pack
from gpulane.kernel.worker import LocalWorker
from tests.integration.test_output_order import joined, outputs
from tests.support.kernels import CellResult

ALICE = "gpl-alice"
COLD = {"GPULANE_FORKSERVER": "0", "GPULANE_WARM_WORKER": "0"}

CELLS = [
    "print('x')",  # one line: the plain path
    "a = 6\nb = a * 7\nprint('b is', b)\nb",  # names and a last expression
    "print('only a statement');",
    "for i in range(3):\n    print(i)\ni + 0.5",
    # A module imports IPython inside the cell: the shell is built then, and displays show.
    "from IPython.display import display as show\nprint('before')\nshow('shown')\nprint('after')",
    "display('a display')\nprint('then')",  # a shell name: the shell is built first
    "pwd",  # automagic: not plain Python in IPython's eyes
    "def f():\n    return 1 / 0\n\nprint('runs first')\nf()",  # a traceback through a function
    "raise SystemExit(3)",
    "import warnings\nwarnings.warn('careful', DeprecationWarning)\nprint('warned')",
    "x = 1\nexec('x + 41', None, None)",  # nothing shown: exec's own display is not a result
]


def seen(cell: CellResult) -> list[tuple[str, ...]]:
    """Outputs, the cell's result and its error, in order (the card left out).

    stderr is compared as its own sequence: stdout and stderr are two descriptors, and
    which of two writes a few microseconds apart goes first across them is not kept (in
    a plain ipykernel either: each stream has its own buffer). Everything else keeps its
    order against stdout.
    """
    result = [(c["data"].get("text/plain", ""),) for c in cell.of_type("execute_result")]
    error = cell.error()
    failure = [(error["ename"], error["evalue"], *error["traceback"])] if error else []
    shown = outputs(cell)
    stderr = [o for o in shown if o[:2] == ("stream", "stderr")]
    rest = joined([o for o in shown if o[:2] != ("stream", "stderr")])
    return [*rest, *joined(stderr), *result, *failure]  # type: ignore[list-item]


@pytest.fixture
def broker(make_broker):
    return make_broker("--simulate-gpus", "1", "--kill-grace", "1s")


@pytest.mark.usefixtures("unix_users")
def test_a_cold_workers_cells_show_what_a_worker_with_its_shell_shows(broker, kernels):
    cold = kernels(ALICE, broker, COLD)
    warm = kernels(ALICE, broker)
    for code in CELLS:
        got = cold.execute("%%gpu\n" + code, timeout=120)
        want = warm.execute("%%gpu\n" + code, timeout=120)
        assert got.status == want.status, (code, got.messages)
        assert seen(got) == seen(want), code
    # The last expression is the kernel's Out[n] and _, and assigned names came back.
    cell = cold.execute("%%gpu\na = 6\nb = a * 7\nb")
    number = cell.reply["execution_count"]
    check = cold.execute(f"print(_, Out[{number}], a, b)")
    assert check.stream() == "42 42 6 42\n", check.messages


def test_the_shell_built_after_a_plain_cell_keeps_its_names_and_numbers():
    # A worker that keeps running after a plain first cell (a session's, on a cluster node)
    # adopts that cell's __main__: the shell's cells see its names, tracebacks say In[1].
    worker = LocalWorker()  # a cold Python, as a Slurm node starts one
    sink = Collect()
    worker.attach(sink)
    try:
        for number, code in enumerate(
            ["kept = 41\ndef g():\n    return kept / 0\nprint('plain')", "%time kept += 1", "g()"],
            start=1,
        ):
            worker.run({}, RunCell(code, pack({}, None, 1 << 20), (), number, "/nonexistent",
                                   1 << 20, False))  # fmt: skip
            assert worker.done.wait(60), sink.items
        texts = "".join(text for kind, text in sink.items if kind == "stdout")
        assert texts.startswith("plain\n") and "CPU times" in texts, sink.items
        errors = [item for kind, item in sink.items if kind == "error"]
        assert len(errors) == 1 and errors[0].ename == "ZeroDivisionError", sink.items
        trace = strip_ansi("".join(errors[0].traceback))
        assert "Cell In[1], line 3" in trace and "return kept / 0" in trace, trace
    finally:
        worker.stop()


class Collect:
    def __init__(self) -> None:
        self.items: list[tuple[str, object]] = []

    def stream(self, name: str, text: str) -> None:
        self.items.append((name, text))

    def message(self, message: object) -> None:
        kind = "error" if isinstance(message, CellError) else type(message).__name__
        self.items.append((kind, message))

    def flush(self) -> None:
        pass


def strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# A thread that takes the output relay's lock once the relay is closed and keeps it, and an
# exit handler that lets the exit go on only once it does: at the exit's flush of
# sys.stdout the lock is held by a daemon thread that finalization has frozen, as a gdb stack
# of a cold worker that hung at exit showed (its relay thread had taken the lock).
HOLDS_THE_RELAY_LOCK = """\
import atexit, sys, threading, time
relay = sys.stdout.relay
held = threading.Event()
def hold():
    while not relay._closed:
        time.sleep(0.001)
    relay._lock.acquire()
    held.set()
    time.sleep(3600)
threading.Thread(target=hold, daemon=True).start()
atexit.register(held.wait, 10)
print('x')
"""

# An object whose __del__ never returns, in the cell's namespace: module teardown hangs.
STUCK_IN_TEARDOWN = """\
import os
class Stuck:
    def __del__(self, read=os.read, fd=os.pipe()[0]):
        read(fd, 1)  # its write end stays open: never returns
_stuck = Stuck()
print('x')
"""


def cold_cell(code: str) -> tuple[LocalWorker, Collect]:
    worker = LocalWorker()  # a cold Python, as a Slurm node starts one
    sink = Collect()
    worker.attach(sink)
    worker.run({}, RunCell(code, pack({}, None, 1 << 20), (), 1, "/nonexistent", 1 << 20, True))
    assert worker.done.wait(60), sink.items
    assert worker.result is not None and worker.result.ok, sink.items
    return worker, sink


def test_a_cold_worker_exits_while_a_daemon_thread_holds_its_output_lock():
    worker, sink = cold_cell(HOLDS_THE_RELAY_LOCK)
    try:
        assert worker.proc.wait(10) == 0, sink.items  # the cell's status, no watchdog
    finally:
        worker.stop()
    assert ("stdout", "x\n") in sink.items


def test_a_cold_worker_whose_teardown_hangs_is_ended_by_its_watchdog():
    worker, sink = cold_cell(STUCK_IN_TEARDOWN)
    started = time.monotonic()
    try:
        status = worker.proc.wait(runner.EXIT_LIMIT_S + 10)
    finally:
        worker.stop()
    took = time.monotonic() - started
    assert status == 1 and took < runner.EXIT_LIMIT_S + 5, (status, took)
    worker.wait_output()
    stderr = "".join(str(text) for kind, text in sink.items if kind == "stderr")
    assert "Timeout" in stderr and "__del__" in stderr, sink.items


def test_closing_a_worker_ends_its_channel_reader_before_its_descriptor_goes():
    # A reader left in recv on a closed descriptor reads whatever connection gets the number
    # next (another worker's key check, a stranger's bytes), and unpickles it.
    worker = LocalWorker()
    worker.attach(Collect())
    reader = worker._reader
    try:
        time.sleep(0.5)  # the worker waits for a cell; its reader waits in recv
        assert reader is not None and reader.is_alive()
        worker.close()
        assert not reader.is_alive()
    finally:
        worker.stop()
