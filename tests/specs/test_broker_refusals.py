"""What the broker refuses, and with which kind of refusal (the server picks the HTTP status)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from gpulane.broker.identity import NO_UID
from gpulane.broker.policy import PolicyConfig
from gpulane.errors import Conflict, Forbidden, InvalidRequest, LimitReached, NotFound
from gpulane.jobs import Request
from tests.support.inprocess_broker import BrokerHouse, person

ALICE, BOB = person("alice"), person("bob")
CAROL = person("carol", admin=True)

House = Callable[..., BrokerHouse]


def submit(house: BrokerHouse, who: Any, **request: Any) -> dict[str, Any]:
    return dict(house.call(house.broker.submit, who, Request(**request)))


def test_only_gpu_groups_may_submit_where_some_are_set(broker_house: House) -> None:
    house = broker_house(gpus=2, policy=PolicyConfig(gpu_groups=frozenset({"gpu"})))
    with pytest.raises(Forbidden) as refused:
        submit(house, ALICE)
    assert str(refused.value) == (
        "alice may not use GPUs here: not in the GPU group gpu; "
        "an admin adds them with: usermod -a -G gpu alice"
    )
    assert submit(house, person("bob", "gpu"))["state"] == "running"
    assert submit(house, CAROL)["state"] == "running"  # admins need no GPU group
    assert house.call(house.broker.status, CAROL)["queue"] == []


def test_the_queued_bound_is_per_user(broker_house: House) -> None:
    house = broker_house(gpus=1, max_queued_per_user=2)
    submit(house, ALICE)  # running: not counted
    first = submit(house, ALICE)
    submit(house, ALICE)
    with pytest.raises(LimitReached) as refused:
        submit(house, ALICE)
    assert str(refused.value) == (
        "alice already has 2 queued jobs, the most allowed; wait or cancel some"
    )
    assert submit(house, BOB)["state"] == "queued"  # others are not held back by alice
    house.call(house.broker.cancel, ALICE, first["id"])
    assert submit(house, ALICE)["state"] == "queued"


def test_requests_that_can_never_run_are_refused(broker_house: House) -> None:
    house = broker_house(gpus=1, policy=PolicyConfig(max_time=3600))
    with pytest.raises(InvalidRequest, match=r"^--time 1:00:01 is over this broker's maximum"):
        submit(house, ALICE, time_limit=3601)
    with pytest.raises(InvalidRequest, match=r"^this request can never run here: "):
        submit(house, ALICE, gpus=2)
    assert house.call(house.broker.status, ALICE)["queue"] == []


def test_another_users_job_is_not_found_for_them(broker_house: House) -> None:
    house = broker_house(gpus=1)
    job = submit(house, ALICE, command=("python", "secret.py"))
    job_id = job["id"]
    # Unseen is not found, for every call: bob cannot even tell that the job exists.
    for act, args in (
        (house.broker.heartbeat, ()),
        (house.broker.finish, (0,)),
        (house.broker.started, (12345,)),
        (house.broker.cancel, ()),
        (house.broker.lookup, ()),
        (house.broker.watch, (lambda event: None,)),
    ):
        with pytest.raises(NotFound) as refused:
            house.call(act, BOB, job_id, *args)
        assert str(refused.value) == f"no job {job_id}"
    # An admin may look it up, but only its owner sees what it runs.
    seen = house.call(house.broker.lookup, CAROL, job_id)
    assert seen["state"] == "running" and "command" not in seen
    assert house.call(house.broker.lookup, ALICE, job_id)["command"] == ["python", "secret.py"]


def test_a_job_answers_only_to_its_source_and_uid(broker_house: House) -> None:
    house = broker_house(gpus=1)
    # Taken through a hub token by a root client (the GPU-profile spawner in the hub).
    hub_alice = replace(ALICE, uid=0, source="hub")
    job_id = submit(house, hub_alice)["id"]
    for impostor in (
        ALICE,  # the same name over the plain socket
        replace(ALICE, uid=0),  # and from the same uid, but not through the hub
        replace(ALICE, uid=4321, source="hub"),  # the hub name from another uid
    ):
        for act, args in (
            (house.broker.heartbeat, ()),
            (house.broker.finish, (0,)),
            (house.broker.started, (12345,)),
        ):
            with pytest.raises(NotFound):
                house.call(act, impostor, job_id, *args)
        assert "command" not in house.call(house.broker.status, impostor)["running"][0]
    assert house.state(hub_alice, job_id) == "running"
    assert house.call(house.broker.heartbeat, hub_alice, job_id)["state"] == "running"
    # The dashboard's hub login (no process) may see and cancel it, not drive its lease.
    browser = replace(ALICE, uid=NO_UID, pid=None, source="hub")
    with pytest.raises(NotFound):
        house.call(house.broker.heartbeat, browser, job_id)
    assert house.call(house.broker.cancel, browser, job_id)["ending"] == "cancelled"


def test_a_job_that_does_not_exist_is_not_found(broker_house: House) -> None:
    house = broker_house()
    with pytest.raises(NotFound, match=r"^no job 42$"):
        house.call(house.broker.lookup, ALICE, 42)
    with pytest.raises(NotFound, match=r"^no job 42$"):
        house.call(house.broker.cancel, ALICE, 42)


def test_a_queued_job_cannot_have_started(broker_house: House) -> None:
    house = broker_house(gpus=1)
    submit(house, ALICE)
    queued = submit(house, BOB)
    with pytest.raises(Conflict, match=f"^job {queued['id']} is queued, not running$"):
        house.call(house.broker.started, BOB, queued["id"], 12345)
