"""The pure decisions of GPU-profile leases on Kubernetes: when a pod's lease ends, what a
server asks the broker for, what its pod carries, and the spawn page's words."""

from __future__ import annotations

from typing import Any

import pytest

from gpulane.broker.k8s_capacity import LEASE_LABEL, capacity
from gpulane.hub.gpu_lease import STATE_KEY, progress_event, saved_job, server_request
from gpulane.hub.pod_keeper import event_ends, pod_ended
from gpulane.profiles import Profile
from gpulane.scheduler.base import JobUpdate
from gpulane.views import Holder


def pod(phase: str = "Running", uid: str = "u1", name: str = "jupyter-ada", **meta: Any) -> Any:
    return {"metadata": {"name": name, "uid": uid, **meta}, "status": {"phase": phase}}


@pytest.mark.parametrize(
    ("seen", "ended"),
    [
        (None, True),  # gone
        (pod("Pending"), False),
        (pod("Running"), False),
        (pod("Unknown"), False),  # a node out of touch: the GPU may still be in use
        (pod("Running", deletionTimestamp="2026-01-01T00:00:00Z"), False),  # still stopping
        (pod("Succeeded"), True),
        (pod("Failed"), True),
        (pod("Running", uid="u2"), True),  # a new pod of the same name is not this lease's
    ],
)
def test_a_pods_lease_ends_only_when_the_pod_is_over(seen: Any, ended: bool) -> None:
    assert pod_ended(seen, "u1") is ended


def test_watch_events_of_other_pods_never_end_the_lease() -> None:
    assert not event_ends("DELETED", pod(name="jupyter-ben", uid="u9"), "jupyter-ada", "u1")
    assert not event_ends("MODIFIED", pod("Failed", name="jupyter-ben"), "jupyter-ada", "u1")
    assert event_ends("DELETED", pod(), "jupyter-ada", "u1")
    assert not event_ends("DELETED", pod(uid="u0"), "jupyter-ada", "u1")  # an older pod's end
    assert event_ends("MODIFIED", pod("Succeeded"), "jupyter-ada", "u1")
    assert not event_ends("MODIFIED", pod("Running"), "jupyter-ada", "u1")


def test_the_servers_own_pod_is_not_counted_as_someone_elses_gpus() -> None:
    from gpulane.hub.kube_spawner import lease_labels
    from tests.support.kube_api import gpu_node

    ours = {
        "metadata": {"name": "jupyter-ada", "labels": {"app": "jupyterhub", **lease_labels(7)}},
        "spec": {"nodeName": "gpu-1", "containers": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}]},
        "status": {"phase": "Running"},
    }  # fmt: skip
    assert lease_labels(7) == {LEASE_LABEL: "7"} and lease_labels(None) == {}
    assert capacity([gpu_node("gpu-1", 2)], [ours]).foreign == 0
    ours["metadata"]["labels"].pop(LEASE_LABEL)
    assert capacity([gpu_node("gpu-1", 2)], [ours]).foreign == 1


def test_the_keepers_argv_names_the_pod_and_nothing_secret() -> None:
    from gpulane.broker.pod_leases import KEEPER_ENV, keeper_argv

    argv = keeper_argv("jhub", "jupyter-ada", "u1")
    assert argv[1:] == ["-m", "gpulane.hub.pod_keeper", "--namespace", "jhub",
                        "--pod", "jupyter-ada", "--uid", "u1"]  # fmt: skip
    assert not any("TOKEN" in name or "SECRET" in name for name in KEEPER_ENV)


def profile(gpus: int = 0, slices: int = 0) -> Profile:
    return Profile("gpu", "GPU", "", None, None, None, None, gpus, slices, None, frozenset())


def test_a_server_asks_for_its_profiles_gpus_for_the_session_detached() -> None:
    sliced = server_request(profile(slices=2), "8h", ("kubernetes-pod", "jhub/jupyter-ada"))
    assert (sliced.gpus, sliced.slices, sliced.time_limit) == (1, 2, 8 * 3600)
    assert sliced.detached and sliced.name == "server-gpu"
    whole = server_request(profile(gpus=2), "30m", ("jupyterhub-singleuser",))
    assert (whole.gpus, whole.slices, whole.time_limit) == (2, 0, 1800)


def test_only_a_job_number_is_restored_from_the_spawners_state() -> None:
    assert saved_job({STATE_KEY: 12}) == 12
    for bad in ({}, {STATE_KEY: "12"}, {STATE_KEY: True}, {STATE_KEY: None}):
        assert saved_job(bad) is None


def test_the_spawn_page_shows_the_place_the_holder_and_the_reason() -> None:
    holders: list[Holder] = [
        {"job": 3, "user": "ada", "name": "server-gpu", "gpus": [0], "slices": None,
         "elapsed": 60.0, "remaining": 3600.0}
    ]  # fmt: skip
    queued = JobUpdate(
        {"id": 4, "state": "queued", "position": 2, "eta": None, "reason_text": "fair share"},
        holders,
        1000.0,
    )
    event = progress_event(queued)
    assert event["progress"] == 10
    assert event["message"].startswith("Waiting for a GPU: position 2 in the queue, ")
    message = event["message"]
    assert "start time unknown; GPU 0: ada, running 01:00, 1:00:00 left" in message
    assert message.endswith("(fair share)")
    granted = progress_event(JobUpdate({"id": 4, "state": "running", "assigned_gpus": [0]}, [], 0))
    assert granted == {"progress": 50, "message": "GPU [0] granted; starting your server"}
    refused = progress_event(
        JobUpdate({"id": 4, "state": "cancelled", "message": "cancelled by ada"}, [], 0)
    )
    assert refused["failed"] and "cancelled by ada" in refused["message"]
