"""`%gpu wait` and `%gpu result` on a `%%gpu --bg` job that failed are an error to Jupyter
(issue 11): the cell's exception, a killed worker, the time limit and a cancel each raise,
under the same name as the foreground cell would, so Run All, nbconvert and papermill stop
at the wait instead of carrying on as if the GPU work had been done."""

from __future__ import annotations

import json

import pytest

from tests.support.users import wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE = "gpl-alice"


def running(broker) -> list[dict]:
    return json.loads(broker.call(None, "status", "--json").stdout)["running"]


@pytest.fixture
def broker(make_broker):
    return make_broker("--simulate-gpus", "1", "--kill-grace", "1s")


def assert_raises(cell, ename: str, evalue_part: str) -> None:
    assert cell.status == "error", cell.messages
    assert cell.reply["ename"] == ename, cell.reply
    assert evalue_part in cell.reply["evalue"], cell.reply
    error = cell.error()
    assert error is not None and error["ename"] == ename
    assert "gpulane/kernel" not in "\n".join(error["traceback"])  # what happened, not the magic


@pytest.mark.parametrize(
    ("code", "ename", "evalue_part"),
    [
        ("%%gpu --bg\nraise ValueError('bad input')", "ValueError", "bad input"),
        ("%%gpu --bg\nimport os\nos.kill(os.getpid(), 9)", "WorkerKilled", "SIGKILL"),
        ("%%gpu --bg --time 2s\nimport time\ntime.sleep(30)", "GPUTimeLimit", "00:02"),
    ],
    ids=["exception", "killed", "time-limit"],
)
def test_wait_and_result_on_a_failed_background_job_raise(
    broker, kernels, code, ename, evalue_part
):
    k = kernels(ALICE, broker)
    started = k.execute(code)
    assert started.status == "ok", started.messages  # --bg returns at once
    waited = k.execute("%gpu wait", timeout=60)
    assert_raises(waited, ename, evalue_part)
    # By its number too, and again: the job stays failed.
    assert_raises(k.execute("%gpu result 1"), ename, evalue_part)
    assert_raises(k.execute("%gpu wait 1"), ename, evalue_part)
    wait_for(lambda: running(broker) == [], what="the GPU to be freed")
    assert k.execute("print('still usable')").stream().strip() == "still usable"


def test_wait_on_a_cancelled_background_job_raises(broker, kernels):
    k = kernels(ALICE, broker)
    started = k.execute("%%gpu --bg --name longjob\nimport time\ntime.sleep(60)")
    assert started.status == "ok", started.messages
    wait_for(lambda: [j["name"] for j in running(broker)] == ["longjob"], what="the bg job to run")
    assert k.execute("%gpu cancel").status == "ok"
    assert_raises(k.execute("%gpu wait", timeout=60), "GPUJobCancelled", "cancelled by gpl-alice")


def test_wait_on_a_background_job_that_finished_is_fine(broker, kernels):
    k = kernels(ALICE, broker)
    assert k.execute("%%gpu --bg\nanswer = 6 * 7").status == "ok"
    waited = k.execute("%gpu result")
    assert waited.status == "ok", waited.messages
    assert k.execute("print(answer)").stream().strip() == "42"


def test_a_foreground_exception_names_the_users_class_in_the_reply(broker, kernels):
    # nbconvert's CellExecutionError is built from the execute reply: it must say ValueError.
    k = kernels(ALICE, broker)
    assert_raises(k.execute("%%gpu\nraise ValueError('bad input')"), "ValueError", "bad input")
