"""What the broker keeps, and that a failed save changes nothing: in process, on a virtual clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

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
