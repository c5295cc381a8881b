"""Clients started while the broker restarts wait for it instead of failing (issue 11, 6)."""

from __future__ import annotations

import json
import time

import pytest

from tests.support.users import wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"
RETRY_LINE = "is not answering; retrying for up to"


def running(broker) -> list[dict]:
    return json.loads(broker.call(None, "status", "--json").stdout)["running"]


def test_run_and_cancel_during_a_restart_wait_for_the_broker(make_broker):
    broker = make_broker("--simulate-gpus", "1", "--kill-grace", "1s")
    holder = broker.spawn(BOB, "run", "--name", "bobs", "--", "sleep", "60")
    wait_for(lambda: [j["name"] for j in running(broker)] == ["bobs"], what="bob holds the GPU")
    job_id = str(running(broker)[0]["id"])
    broker.stop()
    cancel = broker.spawn(BOB, "cancel", job_id)
    run = broker.spawn(ALICE, "run", "--", "true")
    time.sleep(1.5)
    assert cancel.poll() is None and run.poll() is None  # still waiting, not failed
    broker.start()
    _, cancel_err = cancel.communicate(timeout=60)
    _, run_err = run.communicate(timeout=60)
    assert cancel.returncode == 0, cancel_err
    assert run.returncode == 0, run_err
    assert cancel_err.count(RETRY_LINE) == 1, cancel_err
    assert run_err.count(RETRY_LINE) == 1, run_err
    holder.communicate(timeout=30)
    assert holder.returncode != 0  # the cancel really cancelled bob's job
    jobs = json.loads(broker.call(None, "status", "--json").stdout)
    assert jobs["running"] == [] and jobs["queue"] == []
