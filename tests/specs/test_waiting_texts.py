"""What `gpulane status` and a queued cell's card say about why a job waits, for each of the
policy's reasons, as the broker itself answers (issue 13): in process, on a virtual clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpulane.broker import policy
from gpulane.jobs import Request
from tests.support.inprocess_broker import BrokerHouse, person

ALICE, BOB, CAROL = person("alice"), person("bob"), person("carol")
House = Callable[..., BrokerHouse]
HOUR = 3600.0


def submit(house: BrokerHouse, who: Any, **request: Any) -> int:
    return int(house.call(house.broker.submit, who, Request(**request))["id"])


def reason(house: BrokerHouse, who: Any, job_id: int) -> tuple[str, str]:
    """The job's reason and text as its owner reads them in the status and on its card."""
    queue = house.call(house.broker.status, who)["queue"]
    (entry,) = [j for j in queue if j["id"] == job_id]
    events: list[dict[str, Any]] = []
    house.call(house.broker.watch, who, job_id, events.append)
    card = events[-1]["job"]
    assert card["reason_text"] == entry["reason_text"]  # one text, wherever it is read
    return entry["reason"], entry["reason_text"]


def test_fair_share_names_who_goes_first_and_both_users_standing(broker_house: House) -> None:
    config = policy.PolicyConfig(starvation_after=100 * HOUR, half_life=24 * HOUR)
    house = broker_house(gpus=1, policy=config)
    first = submit(house, ALICE, time_limit=3 * 3600)
    house.advance(HOUR)  # alice has used an hour of the GPU
    mine = submit(house, ALICE)
    theirs = submit(house, BOB)
    why, text = reason(house, ALICE, mine)
    assert why == "fair_share"
    assert text.startswith(
        "fair share: bob has used 0.0 GPU-hours recently, you 1.0: bob goes first"
    )
    assert "GPU-hours halve every 24:00:00" in text and text.endswith("you go up as bob uses more")
    # The head of the queue is told why it is first.
    why, text = reason(house, BOB, theirs)
    assert why == "resources"
    assert text == (
        "waiting for a GPU to free up; alice has used 1.0 GPU-hours recently, you 0.0: you go first"
    )
    assert house.call(house.broker.lookup, ALICE, first)["state"] == "running"


def test_a_held_job_says_how_long_it_waited_and_when_its_gpus_are_due(
    broker_house: House,
) -> None:
    house = broker_house(gpus=2, policy=policy.PolicyConfig(starvation_after=HOUR))
    submit(house, ALICE, time_limit=3 * 3600)  # one GPU, three hours at most
    whole = submit(house, BOB, gpus=2, time_limit=3600)
    house.advance(HOUR + 60)
    why, text = reason(house, BOB, whole)
    assert why == "held"
    assert text == (
        "waited 1:01:00 without a start, the longest: the GPUs it needs are held for it, free in "
        "1:59:00 at the latest; other jobs start only where they do not delay it"
    )


def test_a_job_that_would_delay_the_held_one_says_it_is_reserved(broker_house: House) -> None:
    house = broker_house(gpus=2, policy=policy.PolicyConfig(starvation_after=HOUR))
    submit(house, ALICE, time_limit=2 * 3600)
    held = submit(house, BOB, gpus=2, time_limit=3600)
    house.advance(HOUR + 60)
    # Carol holds nothing: her job fits on the free GPU now, but its 3 h would outlast the
    # held job's reservation.
    long = submit(house, CAROL, time_limit=3 * 3600)
    why, text = reason(house, CAROL, long)
    assert why == "reserved"
    assert text == (
        f"reserved for job {held}, which has waited 1:01:00 without a start: it fits now but "
        "would still be running when that job's GPUs are due"
    )
    # Alice already holds her part of the machine (a third of it: carol and bob wait too),
    # so even a short job of hers waits while theirs do.
    again = submit(house, ALICE, time_limit=600)
    assert reason(house, ALICE, again) == (
        "over_share",
        "you already hold your part of the GPUs while other users wait: "
        "users below their part start first",
    )
    # Carol's short one that ends before the reservation starts at once (backfill).
    short = submit(house, CAROL, time_limit=1800)
    assert house.call(house.broker.lookup, CAROL, short)["state"] == "running"


def test_a_user_at_the_per_user_cap_is_told_so(broker_house: House) -> None:
    house = broker_house(gpus=2, policy=policy.PolicyConfig(max_running_per_user=1))
    submit(house, ALICE)
    second = submit(house, ALICE)
    why, text = reason(house, ALICE, second)
    assert why == "user_cap"
    assert text == "per-user cap: you already run 1 job(s)"


def test_a_job_that_would_delay_a_light_users_job_says_the_machine_drains(
    broker_house: House,
) -> None:
    # Nobody has waited past starvation_after: the drain is for a user below their part.
    house = broker_house(gpus=2, policy=policy.PolicyConfig(starvation_after=100 * HOUR))
    submit(house, ALICE, time_limit=2 * 3600)
    whole = submit(house, BOB, gpus=2, time_limit=3600)
    long = submit(house, CAROL, time_limit=3 * 3600)
    assert reason(house, BOB, whole)[0] == "resources"
    why, text = reason(house, CAROL, long)
    assert why == "draining"
    assert text == (
        "GPUs are freeing up for a user below their part of the machine: "
        "this job fits now but would still be running when they are due"
    )
    # A short one that ends before the drain's time starts at once.
    short = submit(house, CAROL, time_limit=1800)
    assert house.call(house.broker.lookup, CAROL, short)["state"] == "running"
