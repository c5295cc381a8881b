"""Jobs that ask for GPU memory (--gpu-mem): placed while the card's memory fits, refused
at submit where it never can, kept across a restart (issue 14)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from gpulane.broker.policy import PolicyConfig
from gpulane.errors import InvalidRequest
from gpulane.jobs import Request
from tests.support.inprocess_broker import BrokerHouse, person

ALICE, BOB = person("alice"), person("bob")
GiB = 1024**3

House = Callable[..., BrokerHouse]


def submit(house: BrokerHouse, who: Any, **request: Any) -> dict[str, Any]:
    return dict(house.call(house.broker.submit, who, Request(**request)))


def test_gpu_mem_jobs_share_a_card_while_their_memory_fits(broker_house: House) -> None:
    house = broker_house(gpus=1, memory=16 * GiB, policy=PolicyConfig(gpu_mem_reserve=GiB))
    first = submit(house, ALICE, gpu_mem=10 * GiB)
    second = submit(house, BOB, gpu_mem=5 * GiB)
    third = submit(house, BOB, gpu_mem=2 * GiB)
    assert (first["state"], second["state"], third["state"]) == ("running", "running", "queued")
    assert first["assigned_gpus"] == second["assigned_gpus"] == [0]
    # What the grant's environment caps the frameworks to (scheduler/embedded.py).
    assert first["gpu_mem"] == first["gpu_memory_limit"] == 10 * GiB
    assert first["gpu_memory_fraction"] == pytest.approx(10 / 16)
    whole = submit(house, ALICE, gpus=1)
    assert whole["state"] == "queued"  # a whole GPU waits until no one holds it
    house.call(house.broker.finish, ALICE, first["id"], 0)
    assert house.state(BOB, third["id"]) == "running"
    assert house.state(ALICE, whole["id"]) == "queued"
    status = house.call(house.broker.status, ALICE)
    assert {h["job"]: h["gpu_mem"] for h in status["gpus"][0]["holders"]} == {
        second["id"]: 5 * GiB,
        third["id"]: 2 * GiB,
    }


def test_a_request_larger_than_the_card_is_refused_with_its_size(broker_house: House) -> None:
    house = broker_house(gpus=2, memory=24 * GiB, policy=PolicyConfig(gpu_mem_reserve=GiB))
    with pytest.raises(InvalidRequest) as refused:
        submit(house, ALICE, gpu_mem=24 * GiB)
    assert str(refused.value) == (
        "this request can never run here: it asks for --gpu-mem 24.0 GiB but the largest GPU "
        "here has 24.0 GiB, of which 23.0 GiB is offered to jobs (1.0 GiB is kept for CUDA "
        "contexts)"
    )
    status = house.call(house.broker.status, ALICE)
    assert status["running"] == [] and status["queue"] == []
    assert submit(house, ALICE, gpu_mem=23 * GiB)["state"] == "running"


def test_slices_and_gpu_mem_share_a_card_by_declared_memory(broker_house: House) -> None:
    house = broker_house(gpus=1, memory=16 * GiB, policy=PolicyConfig(slices_per_gpu=4))
    slice_job = submit(house, ALICE, slices=2)  # declares 8 GiB
    assert slice_job["gpu_memory_limit"] == 8 * GiB
    fits = submit(house, BOB, gpu_mem=6 * GiB)
    too_big = submit(house, BOB, gpu_mem=3 * GiB)
    one_slice = submit(house, ALICE, slices=1)  # 4 GiB: only 2 GiB are left
    assert [house.state(BOB, fits["id"]), house.state(BOB, too_big["id"])] == [
        "running",
        "queued",
    ]
    assert house.state(ALICE, one_slice["id"]) == "queued"


def test_a_gpu_mem_job_keeps_its_grant_across_a_restart(broker_house: House) -> None:
    alice = person("alice", pid=os.getpid())  # a live client: this very process
    house = broker_house(gpus=1, memory=16 * GiB)
    job = submit(house, alice, gpu_mem=12 * GiB)
    house.restart()
    again = house.call(house.broker.lookup, alice, job["id"])
    assert (again["state"], again["gpu_mem"], again["gpu_memory_limit"]) == (
        "running",
        12 * GiB,
        12 * GiB,
    )
    assert submit(house, BOB, gpu_mem=5 * GiB)["state"] == "queued"
