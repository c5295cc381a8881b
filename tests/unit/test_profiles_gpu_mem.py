"""A GPU profile that asks for GPU memory (gpu_mem), as --gpu-mem does (issue 14)."""

from __future__ import annotations

from typing import Any

import pytest

from gpulane.hub.kube import check_for_kubernetes
from gpulane.profiles import describe_profile, gpu_environment, load_profiles
from gpulane.profiles.model import ProfileError

GiB = 1024**3


def data(**profile: Any) -> dict[str, Any]:
    return {
        "gpu": {"memory": "24G"},
        "profile": [{"slug": "mem", "display_name": "Part of a GPU", **profile}],
    }


def test_a_profile_carries_gpu_mem_and_its_caps() -> None:
    pset = load_profiles(data(gpu_mem="6G"))
    profile = pset.profiles[0]
    assert profile.gpu_mem == 6 * GiB and profile.uses_gpu
    assert describe_profile(profile, pset) == "6 GiB of a GPU's memory"
    env = gpu_environment(profile, pset)
    assert env["GPULANE_GPU_MEMORY_LIMIT"] == str(6 * GiB)
    assert env["GPULANE_GPU_MEMORY_FRACTION"] == env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.2500"


@pytest.mark.parametrize(
    ("profile", "gpu", "message"),
    [
        ({"gpu_mem": "6G", "gpus": 1}, {"memory": "24G"}, "leave out gpus and slices"),
        ({"gpu_mem": "6G"}, {}, "gpu_mem needs [gpu] memory"),
        ({"gpu_mem": "32G"}, {"memory": "24G"}, "gpu_mem 32G is more than a GPU has"),
        ({"gpu_mem": "lots"}, {"memory": "24G"}, "gpu_mem"),
    ],
)
def test_bad_gpu_mem_profiles_are_one_line(
    profile: dict[str, Any], gpu: dict[str, Any], message: str
) -> None:
    raw = data(**profile)
    raw["gpu"] = gpu
    with pytest.raises(ProfileError) as refused:
        load_profiles(raw)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_kubernetes_refuses_gpu_mem_profiles() -> None:
    with pytest.raises(ProfileError, match="only gpulane's broker on one machine places"):
        check_for_kubernetes(load_profiles(data(gpu_mem="6G")))


def test_a_gpu_mem_profiles_server_asks_the_broker_for_that_memory() -> None:
    from gpulane.hub.gpu_lease import server_request

    profile = load_profiles(data(gpu_mem="6G")).profiles[0]
    request = server_request(profile, "8h", ("jupyterhub-singleuser",))
    assert (request.gpu_mem, request.gpus, request.slices) == (6 * GiB, 1, 0)
    assert request.to_json()["gpu_mem"] == 6 * GiB
