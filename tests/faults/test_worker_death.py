"""A `%%gpu` cell whose worker dies, or whose time runs out, is an error to Jupyter (issue 11, 5).

Run All, nbconvert and papermill stop at a cell whose execute reply says "error"; a card that
says "failed" under a reply of "ok" lets them carry on as if the GPU work had been done.
"""

from __future__ import annotations

import json
import os
import re
import signal

import pytest

from tests.support.users import wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE = "gpl-alice"


def running(broker) -> list[dict]:
    return json.loads(broker.call(None, "status", "--json").stdout)["running"]


@pytest.fixture
def broker(make_broker):
    return make_broker("--simulate-gpus", "1", "--kill-grace", "1s")


def assert_failed_then_usable(k, broker, cell, ename: str) -> None:
    assert cell.status == "error", cell.messages
    assert cell.reply["ename"] == ename, cell.reply
    error = cell.error()
    assert error is not None and error["ename"] == ename
    # A short traceback: what happened, not the magic's insides.
    assert "gpulane/kernel" not in "\n".join(error["traceback"])
    wait_for(lambda: running(broker) == [], what="the GPU to be freed")
    assert k.execute("print('still usable')").stream().strip() == "still usable"


def test_a_worker_that_exits_on_its_own_is_an_error(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu\nimport os\nprint('going', flush=True)\nos._exit(3)", timeout=60)
    assert "going" in cell.stream()
    assert_failed_then_usable(k, broker, cell, "WorkerExited")
    assert "exited with status 3" in cell.reply["evalue"]


def test_a_worker_killed_mid_cell_is_an_error(broker, kernels):
    k = kernels(ALICE, broker)
    msg_id = k.submit(
        "%%gpu\nimport os, time\nprint(f'pid {os.getpid()} ready', flush=True)\ntime.sleep(60)"
    )
    seen = k.wait_for_output(msg_id, "ready")
    text = "".join(c.get("text", "") for _, kind, c in seen if kind == "stream")
    found = re.search(r"pid (\d+)", text)
    assert found, text
    pid = int(found.group(1))  # the worker's, as the cell printed it
    os.kill(pid, signal.SIGKILL)
    cell = k.collect(msg_id, timeout=30)
    assert_failed_then_usable(k, broker, cell, "WorkerKilled")
    assert "SIGKILL" in cell.reply["evalue"]


def test_the_time_limit_is_an_error(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu --time 2s\nimport time\ntime.sleep(30)", timeout=40)
    assert_failed_then_usable(k, broker, cell, "GPUTimeLimit")
    assert "00:02" in cell.reply["evalue"]


def test_an_exception_in_the_cell_keeps_the_users_name(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu\nraise ValueError('bad input')")
    assert cell.status == "error"
    error = cell.error()
    assert error is not None and error["ename"] == "ValueError" and error["evalue"] == "bad input"
    assert k.execute("print('fine')").stream().strip() == "fine"
