"""A broker stopped with SIGTERM finishes what is open and logs no errors (issue 11, 7)."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.users import wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"
ERRORS = re.compile(r" ERROR |Traceback|Cannot send error response")


def status(broker) -> dict:
    return json.loads(broker.call(None, "status", "--json").stdout)


def test_a_stop_with_watched_jobs_logs_no_error_and_loses_nothing(make_broker):
    broker = make_broker("--simulate-gpus", "1")
    # A running job and a queued one, each with its client streaming events and beating.
    holder = broker.spawn(ALICE, "run", "--name", "held", "--", "sleep", "8")
    wait_for(lambda: [j["name"] for j in status(broker)["running"]] == ["held"], what="a holder")
    waiter = broker.spawn(BOB, "run", "--name", "waits", "--", "true")
    wait_for(lambda: [j["name"] for j in status(broker)["queue"]] == ["waits"], what="a waiter")

    broker.stop()  # SIGTERM, then wait for the process
    assert broker.proc is not None and broker.proc.returncode == 0, broker.log_text()
    errors = [line for line in broker.log_text().splitlines() if ERRORS.search(line)]
    assert errors == [], errors

    # The clients reconnect to the next start: both jobs end as they would have.
    broker.start()
    _, holder_err = holder.communicate(timeout=60)
    _, waiter_err = waiter.communicate(timeout=60)
    assert holder.returncode == 0, holder_err
    assert waiter.returncode == 0, waiter_err
    errors = [line for line in broker.log_text().splitlines() if ERRORS.search(line)]
    assert errors == [], errors
