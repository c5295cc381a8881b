"""Placement by --gpu-mem in the policy, shared with slices and whole GPUs (issue 14)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpulane.broker.gpu_memory import Held, free_memory, offered
from gpulane.broker.policy import (
    Active,
    Assignment,
    Pending,
    PolicyConfig,
    State,
    decide,
    explain,
    gpu_share,
    never_runs,
)

GiB = 1024**3
NOW = 50_000.0


def pending(job_id: int, *, gpu_mem: int | None = None, slices: int = 0, gpus: int = 1) -> Pending:
    return Pending(job_id, f"u{job_id}", gpus, slices, 600, NOW - 100 + job_id, gpu_mem)


def test_gpu_mem_jobs_share_a_gpu_while_their_memory_fits() -> None:
    config = PolicyConfig(slices_per_gpu=1, gpu_mem_reserve=GiB)
    state = State(
        1, (pending(1, gpu_mem=10 * GiB), pending(2, gpu_mem=5 * GiB)), gpu_memory=16 * GiB
    )
    grants = decide(state, NOW, config)
    assert [(g.job_id, g.assignment) for g in grants] == [
        (1, Assignment((0,), 0, 10 * GiB)),
        (2, Assignment((0,), 0, 5 * GiB)),
    ]
    third = replace(state, queued=(pending(3, gpu_mem=GiB),))
    running = tuple(Active(g.job_id, "x", g.assignment, NOW, 600) for g in grants)
    # 15 GiB offered, 15 GiB declared: one more byte waits for a holder to end.
    assert decide(replace(third, running=running), NOW, config) == []
    assert explain(replace(third, running=running), NOW, config)[3].eta == NOW + 600


def test_a_whole_gpu_waits_for_memory_holders_and_slices_see_their_memory() -> None:
    config = PolicyConfig(slices_per_gpu=4)
    mem = Active(1, "ann", Assignment((0,), 0, 9 * GiB), NOW, 600)
    state = State(
        2,
        (pending(2), pending(3, slices=2), pending(4, slices=1)),
        (mem,),
        gpu_memory=16 * GiB,
    )
    grants = {g.job_id: g.assignment for g in decide(state, NOW, config)}
    assert grants[2] == Assignment((1,), 4)  # the whole GPU nobody holds
    # GPU 0 has 7 GiB left: two slices (8 GiB) do not fit there, one (4 GiB) does.
    assert 3 not in grants
    assert grants[4] == Assignment((0,), 1)


def test_a_request_that_can_never_fit_names_the_card() -> None:
    config = PolicyConfig(gpu_mem_reserve=GiB)
    state = State(2, gpu_memory=24 * GiB)
    reason = never_runs(pending(1, gpu_mem=40 * GiB), state, config)
    assert reason is not None and "24.0 GiB" in reason and "23.0 GiB" in reason
    assert never_runs(pending(1, gpu_mem=23 * GiB), state, config) is None
    unknown = never_runs(pending(1, gpu_mem=GiB), State(1), config)
    assert unknown is not None and "--slices" in unknown
    plan_reason = explain(replace(state, queued=(pending(1, gpu_mem=40 * GiB),)), NOW, config)
    assert plan_reason[1].reason == "never_fits" and plan_reason[1].eta is None


def test_fair_share_counts_gpu_mem_as_its_part_of_the_gpu() -> None:
    assert gpu_share(Assignment((0,), 0, 6 * GiB), 1, 24 * GiB) == 0.25
    assert gpu_share(Assignment((0,), 0, 6 * GiB), 1, 0) == 1.0


@st.composite
def arrivals(draw: st.DrawFn) -> tuple[int, int, int, int, list[tuple[str, int]]]:
    gpus = draw(st.integers(1, 3))
    spg = draw(st.integers(1, 4))
    total = draw(st.integers(1, 32)) * GiB
    reserve = draw(st.sampled_from([0, GiB // 2, GiB]))
    kinds = st.one_of(
        st.tuples(st.just("mem"), st.integers(1, 32 * GiB)),
        st.tuples(st.just("slices"), st.integers(1, spg)),
        st.tuples(st.just("whole"), st.integers(1, gpus)),
        st.tuples(st.just("end"), st.integers(0, 5)),
    )
    return gpus, spg, total, reserve, draw(st.lists(kinds, min_size=1, max_size=25))


@settings(max_examples=80, deadline=None)
@given(arrivals())
def test_declared_memory_on_a_gpu_never_exceeds_what_it_offers(
    case: tuple[int, int, int, int, list[tuple[str, int]]],
) -> None:
    gpu_count, spg, total, reserve, events = case
    config = PolicyConfig(slices_per_gpu=spg, gpu_mem_reserve=reserve, starvation_after=0.0)
    state = State(gpu_count, gpu_memory=total)
    offer = offered(total, reserve)
    clock = NOW
    for step, (kind, value) in enumerate(events, start=1):
        clock += 1.0
        if kind == "end":
            if state.running:
                gone = state.running[value % len(state.running)]
                state = replace(state, running=tuple(j for j in state.running if j is not gone))
        else:
            job = Pending(
                step,
                f"u{step % 3}",
                value if kind == "whole" else 1,
                value if kind == "slices" else 0,
                600,
                clock,
                value if kind == "mem" else None,
            )
            if never_runs(job, state, config) is None:
                state = replace(state, queued=(*state.queued, job))
            else:
                assert kind == "mem" and value > offer
        grants = decide(state, clock, config)
        by_id = {j.id: j for j in state.queued}
        started = tuple(
            Active(g.job_id, by_id[g.job_id].user, g.assignment, clock, 600) for g in grants
        )
        granted = {g.job_id for g in grants}
        state = replace(
            state,
            queued=tuple(j for j in state.queued if j.id not in granted),
            running=(*state.running, *started),
        )
        holders = [
            Held(gpu, a.slices if a.gpu_mem is None and a.slices < spg else 0, a.gpu_mem)
            for a in (j.assignment for j in state.running)
            for gpu in a.gpus
        ]
        assert all(room >= 0 for room in free_memory([offer] * gpu_count, holders, spg))
        for gpu in range(gpu_count):
            on_it = [j.assignment for j in state.running if gpu in j.assignment.gpus]
            assert sum(a.slices for a in on_it) <= spg
            if any(a.slices == spg for a in on_it):
                assert len(on_it) == 1, "a whole GPU is shared"
        explain(state, clock, config)  # the replay places the same way and never fails


def test_the_broker_reads_its_gpu_memory_reserve() -> None:
    from gpulane.broker.app import BrokerApp
    from gpulane.errors import OptionError

    app = BrokerApp()
    app.initialize(["--gpu-mem-reserve", "1G"])
    assert app.gpu_mem_reserve == GiB
    assert BrokerApp().gpu_mem_reserve == 0  # nothing kept back unless asked
    with pytest.raises(OptionError, match="--gpu-mem-reserve 'lots' is not a size"):
        BrokerApp().initialize(["--gpu-mem-reserve", "lots"])


def test_the_usage_report_counts_gpu_mem_as_its_part_of_the_gpu() -> None:
    from gpulane.broker.store import JobRecord
    from gpulane.broker.usage import gpu_seconds_by_user

    record = JobRecord(
        uid=1000,
        user="ann",
        name="j",
        gpus=1,
        slices=0,
        time_limit=600,
        mem=None,
        command=[],
        submitted_at=NOW - 200,
        started_at=NOW - 100,
        assigned_gpus=[0],
        assigned_slices=0,
        gpu_mem=6 * GiB,
    )
    assert gpu_seconds_by_user([record], NOW - 100, NOW, 1, 24 * GiB) == {"ann": 25.0}
