"""The GPU memory watchdog's pure decisions over per-process readings (issue 14)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gpulane.broker.watchdog import Holder, ProcessReading, decide

GiB = 1024**3


def _holder(job_id: int, pids: set[int], gpu: int = 0, granted: int = 8 * GiB) -> Holder:
    return Holder(job_id, frozenset(pids), frozenset({gpu}), granted)


def test_over_limit_is_warned_then_ended_after_the_grace() -> None:
    holders = [_holder(1, {100}), _holder(2, {200})]
    readings = [ProcessReading(0, 100, int(9.3 * GiB)), ProcessReading(0, 200, 2 * GiB)]
    first = decide(readings, holders, {}, now=10.0, grace=5.0, enforce=True)
    assert [w.job_id for w in first.warnings] == [1]
    assert "uses 9.3 GiB of the 8.0 GiB" in first.warnings[0].message
    assert "--gpu-mem" in first.warnings[0].message
    assert first.ends == () and first.over_since == {1: 10.0}
    during = decide(readings, holders, first.over_since, now=12.0, grace=5.0, enforce=True)
    assert during.warnings == () and during.ends == () and during.over_since == {1: 10.0}
    after = decide(readings, holders, during.over_since, now=15.0, grace=5.0, enforce=True)
    assert [e.job_id for e in after.ends] == [1]  # the neighbour, job 2, keeps running
    assert after.ends[0].message.startswith("ended by the GPU memory watchdog: your job uses 9.3")


def test_back_under_its_grant_starts_afresh() -> None:
    holders = [_holder(1, {100})]
    under = [ProcessReading(0, 100, 7 * GiB)]
    decision = decide(under, holders, {1: 0.0}, now=100.0, grace=5.0, enforce=True)
    assert decision.ends == () and decision.over_since == {}


def test_a_job_sums_its_processes_on_one_gpu() -> None:
    holders = [_holder(1, {100, 101})]
    readings = [ProcessReading(0, 100, 5 * GiB), ProcessReading(0, 101, 4 * GiB)]
    assert [w.job_id for w in decide(readings, holders, {}, 0.0, 5.0, True).warnings] == [1]


def test_process_without_a_grant_is_a_stray_ended_only_when_enforcing() -> None:
    holders = [_holder(1, {100})]
    readings = [ProcessReading(0, 999, GiB), ProcessReading(1, 100, GiB)]  # 100 on GPU 1
    enforcing = decide(readings, holders, {}, 0.0, 5.0, enforce=True)
    assert {(s.gpu, s.pid, s.end) for s in enforcing.strays} == {(0, 999, True), (1, 100, True)}
    advising = decide(readings, holders, {}, 0.0, 5.0, enforce=False)
    assert all(not s.end for s in advising.strays) and len(advising.strays) == 2


def test_process_gone_drops_the_job_from_over_since() -> None:
    decision = decide([], [_holder(1, {100})], {1: 0.0}, now=100.0, grace=5.0, enforce=True)
    assert decision == decision.__class__((), (), (), {})


@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 50), st.integers(0, 64 * GiB))),
    st.lists(st.tuples(st.integers(0, 3), st.integers(1, 32 * GiB)), max_size=4),
    st.floats(0, 1000),
)
def test_only_jobs_over_their_grant_are_warned_or_ended(
    raw: list[tuple[int, int, int]], grants: list[tuple[int, int]], now: float
) -> None:
    # Job i owns PIDs congruent to i mod 10 on its GPU.
    holders = [
        Holder(i, frozenset(range(i, 51, 10)), frozenset({gpu}), granted)
        for i, (gpu, granted) in enumerate(grants)
    ]
    readings = [ProcessReading(g, p, u) for g, p, u in raw]
    decision = decide(readings, holders, {}, now, 5.0, True)
    acted = {w.job_id for w in decision.warnings}
    assert decision.ends == ()  # nobody was over before: a warning always comes first
    for holder in holders:
        used: dict[int, int] = {}
        for r in readings:
            if r.pid in holder.pids and r.gpu in holder.gpus:
                used[r.gpu] = used.get(r.gpu, 0) + r.used
        assert (holder.job_id in acted) == (max(used.values(), default=0) > holder.granted)
    owned = {(g, p) for h in holders for p in h.pids for g in h.gpus}
    assert {(s.gpu, s.pid) for s in decision.strays} == {
        (r.gpu, r.pid) for r in readings if (r.gpu, r.pid) not in owned
    }


class _FakeNvml:
    """The two pynvml calls read_nvml makes, as pynvml returns them (parsing only)."""

    class _Process:
        def __init__(self, pid: int, used: int | None) -> None:
            self.pid, self.usedGpuMemory = pid, used

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_Process]:
        return [self._Process(10 + handle, GiB), self._Process(20 + handle, None)]


def test_read_nvml_maps_processes_and_unknown_memory_to_zero() -> None:
    from gpulane.broker.watchdog import read_nvml

    assert read_nvml(_FakeNvml(), 2) == [
        ProcessReading(0, 10, GiB),
        ProcessReading(0, 20, 0),
        ProcessReading(1, 11, GiB),
        ProcessReading(1, 21, 0),
    ]
