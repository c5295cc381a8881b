"""Which Kubernetes GPU server's lease outlives a hub pod restart (broker/pod_leases.py's pure part)."""

from __future__ import annotations

from typing import Any

from gpulane.broker.k8s_capacity import LEASE_LABEL
from gpulane.broker.pod_leases import End, Follow, PodRef, decide, pod_command, pod_of
from gpulane.broker.store import JobRecord
from gpulane.jobs import JobState

HUB = "jhub"


def job(command: tuple[str, ...], detached: bool = True, state: JobState = JobState.RUNNING) -> Any:
    record = JobRecord(7, "ada", "server-gpu", 1, 0, 3600, None, list(command), 0.0, state=state)
    record.detached, record.id = detached, 7
    return record


def pod(job_id: str = "7", phase: str = "Running", uid: str = "u-1") -> dict[str, Any]:
    labels = {LEASE_LABEL: job_id} if job_id else {}
    return {"metadata": {"name": "jupyter-ada", "uid": uid, "labels": labels},
            "status": {"phase": phase}}  # fmt: skip


def test_only_a_running_detached_pod_command_names_a_pod() -> None:
    assert pod_of(job(pod_command(HUB, "jupyter-ada"))) == PodRef(HUB, "jupyter-ada")
    assert pod_of(job(pod_command(HUB, "jupyter-ada"), detached=False)) is None
    assert pod_of(job(pod_command(HUB, "jupyter-ada"), state=JobState.QUEUED)) is None
    for command in [("sleep", "jhub/x"), ("kubernetes-pod", "jhub"), ("kubernetes-pod", "/x"),
                    ("kubernetes-pod", "a/b/c"), ("kubernetes-pod", "jhub/x", "more")]:  # fmt: skip
        assert pod_of(job(command)) is None, command


def test_a_running_pod_labelled_with_this_lease_in_the_hubs_namespace_is_followed() -> None:
    assert decide(7, PodRef(HUB, "jupyter-ada"), pod(), HUB) == Follow("u-1")
    # Pending (rescheduled) and Unknown (node unreachable) pods still hold their GPU.
    assert decide(7, PodRef(HUB, "jupyter-ada"), pod(phase="Pending"), HUB) == Follow("u-1")
    assert decide(7, PodRef(HUB, "jupyter-ada"), pod(phase="Unknown"), HUB) == Follow("u-1")


def test_a_pod_gone_finished_or_not_this_leases_ends_it() -> None:
    ref = PodRef(HUB, "jupyter-ada")
    gone = decide(7, ref, None, HUB)
    assert gone == End("its pod jhub/jupyter-ada was gone while the broker was down")
    for phase in ("Succeeded", "Failed"):
        ended = decide(7, ref, pod(phase=phase), HUB)
        assert isinstance(ended, End) and phase in ended.why
    # A successor pod of the same name for another lease, or one without the label.
    for other in (pod(job_id="8"), pod(job_id="")):
        verdict = decide(7, ref, other, HUB)
        assert isinstance(verdict, End) and "is not this lease's" in verdict.why


def test_a_pod_outside_the_hubs_namespace_never_keeps_a_lease() -> None:
    # A user who may create pods in their own namespace could label one with any lease.
    verdict = decide(7, PodRef("ada-ns", "jupyter-ada"), pod(), HUB)
    assert isinstance(verdict, End) and "outside the hub's namespace" in verdict.why
