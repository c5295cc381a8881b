"""What the broker keeps, and that a failed save changes nothing: in process, on a virtual clock."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from gpulane.errors import LimitReached, NotFound
from gpulane.jobs import Request
from tests.support.inprocess_broker import BrokerHouse, person

ALICE, BOB = person("alice"), person("bob")

House = Callable[..., BrokerHouse]


def submit(house: BrokerHouse, who: Any, **request: Any) -> dict[str, Any]:
    return dict(house.call(house.broker.submit, who, Request(**request)))


def test_a_failed_save_leaves_the_job_running_with_its_lease_and_time_limit(
    broker_house: House,
) -> None:
    # The server refuses such a status; the core must not half-apply one that gets past it.
    house = broker_house(gpus=1, kill_grace=1.0)
    job = submit(house, ALICE, time_limit=60)
    waiting = submit(house, BOB)
    with pytest.raises(OverflowError):
        house.call(house.broker.finish, ALICE, job["id"], 2**64)
    assert house.state(ALICE, job["id"]) == "running"
    assert [h["job"] for h in house.call(house.broker.holders, house.now())] == [job["id"]]
    assert house.state(BOB, waiting["id"]) == "queued"  # its GPU was not handed on
    assert house.broker.usage == {}  # nor its GPU time counted
    house.advance(61)
    assert house.state(ALICE, job["id"]) == "timeout"
    assert house.state(BOB, waiting["id"]) == "running"


def test_one_users_submissions_are_capped_per_minute(broker_house: House) -> None:
    house = broker_house(gpus=1, max_submits_per_minute=3)
    first = submit(house, ALICE)
    for _ in range(2):
        queued = submit(house, ALICE)
        house.call(house.broker.cancel, ALICE, queued["id"])  # a cancel gives nothing back
    house.advance(20)
    with pytest.raises(LimitReached) as refused:
        submit(house, ALICE)
    assert str(refused.value) == (
        "alice submitted 3 jobs in the last minute, the most allowed; try again in 40 s"
    )
    assert submit(house, BOB)["state"] == "queued"  # others keep their own allowance
    assert [j["id"] for j in house.call(house.broker.status, ALICE)["running"]] == [first["id"]]
    house.advance(40)
    assert submit(house, ALICE)["state"] == "queued"


def test_ended_jobs_are_pruned_after_the_retention_and_usage_survives(
    broker_house: House,
) -> None:
    day = 86400.0
    house = broker_house(gpus=1, retention=2 * day)
    ran = submit(house, ALICE)
    house.advance(600)
    house.call(house.broker.finish, ALICE, ran["id"], 0)
    used = house.broker.usage["alice"].value
    assert used > 0
    house.advance(1.5 * day)
    late = submit(house, BOB)
    house.call(house.broker.cancel, BOB, late["id"])
    assert house.state(ALICE, ran["id"]) == "completed"  # inside the retention: kept
    house.advance(0.5 * day + 120)  # past it, and a prune or two
    with pytest.raises(NotFound):
        house.call(house.broker.lookup, ALICE, ran["id"])
    assert house.state(BOB, late["id"]) == "cancelled"  # ended later: still kept
    assert "alice" in house.broker.usage and "alice" in house.broker.store.usage()
    house.restart()
    assert house.broker.usage["alice"].value == pytest.approx(used)  # the fair-share memory


def test_a_users_ended_jobs_beyond_the_cap_go_oldest_first(broker_house: House) -> None:
    house = broker_house(gpus=1, max_ended_per_user=3, prune_batch=2)
    holder = submit(house, BOB)
    ended = []
    for _ in range(5):
        job = submit(house, ALICE)
        house.call(house.broker.cancel, ALICE, job["id"])
        ended.append(job["id"])
    house.advance(61)  # one prune of two rows, then another a second later
    house.advance(2)
    kept = []
    for job_id in ended:
        with contextlib.suppress(NotFound):
            kept.append(house.call(house.broker.lookup, ALICE, job_id)["id"])
    assert kept == ended[-3:]
    assert house.state(BOB, holder["id"]) == "running"  # active jobs are never pruned
    house.restart()  # the count is read back from the store, not lost
    assert house.broker.pruner.ended["alice"] == 3
