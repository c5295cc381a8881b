"""Nodes vs. time-slicing: the broker's one line (pure) and --apply's diagnosis per node."""

from __future__ import annotations

from typing import Any

import pytest

from gpulane.admin.k8s_time_slicing import K8sError, TimeSlicing, apply
from gpulane.broker.k8s_capacity import capacity, node_gpus, slicing_mismatch


def gfd_node(
    name: str, allocatable: dict[str, int], count: int | None, replicas: int | None
) -> Any:
    labels = {}
    if count is not None:
        labels["nvidia.com/gpu.count"] = str(count)
    if replicas is not None:
        labels["nvidia.com/gpu.replicas"] = str(replicas)
    return {
        "metadata": {"name": name, "labels": labels},
        "status": {
            "allocatable": {k: str(v) for k, v in allocatable.items()},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }


def line(nodes: list[Any], slices: int, resource: str = "nvidia.com/gpu") -> str | None:
    return slicing_mismatch(capacity(nodes, [], resource).gpu_nodes, slices)


def test_nodes_that_agree_say_nothing() -> None:
    assert line([gfd_node("a", {"nvidia.com/gpu": 8}, 2, 4)], 4) is None
    assert line([gfd_node("a", {"nvidia.com/gpu": 2}, 2, 1)], 1) is None
    # Without GFD's labels nothing can be compared: no line rather than a guess.
    assert line([gfd_node("a", {"nvidia.com/gpu": 3}, None, None)], 4) is None
    assert line([gfd_node("cpu", {}, None, None)], 4) is None


def test_a_device_plugin_not_restarted_is_one_line_with_the_restart() -> None:
    text = line([gfd_node("gpu-1", {"nvidia.com/gpu": 2}, 2, 4)], 4)
    assert text == (
        "node gpu-1 advertises 2 nvidia.com/gpu, but GPU feature discovery says 2 GPU(s) x 4 "
        "replicas = 8: the device plugin has not applied its time-slicing config; restart it "
        "(kubectl -n gpu-operator rollout restart daemonset/nvidia-device-plugin-daemonset)"
    )
    # Renamed slices not advertised yet: the shared resource is still 0.
    shared = line([gfd_node("s", {"nvidia.com/gpu": 1}, 1, 4)], 4, "nvidia.com/gpu.shared")
    assert shared is not None and "advertises 0 nvidia.com/gpu.shared" in shared


def test_time_slicing_turned_off_but_still_advertised() -> None:
    # GFD says whole GPUs again; the old plugin still advertises the slices.
    text = line([gfd_node("gpu-1", {"nvidia.com/gpu": 8}, 2, 1)], 1)
    assert text is not None and "2 GPU(s) x 1 replicas = 2" in text


def test_replicas_other_than_the_brokers_slices() -> None:
    text = line([gfd_node("gpu-1", {"nvidia.com/gpu": 8}, 2, 4)], 2)
    assert text is not None and "slices each GPU 4 way(s) but the broker counts 2" in text
    # A whole-GPU node under --rename-shared advertises no slices: not the broker's.
    whole = gfd_node("w", {"nvidia.com/gpu": 2}, 2, 1)
    assert line([whole], 4, "nvidia.com/gpu.shared") is None


def test_several_nodes_are_still_one_line() -> None:
    nodes = [gfd_node(f"g{i}", {"nvidia.com/gpu": 1}, 1, 4) for i in range(3)]
    text = line(nodes, 4)
    assert (
        text is not None and text.startswith("node g0 ") and text.endswith("(and 2 more node(s))")
    )
    assert "\n" not in text


def test_node_gpus_reads_allocatable_and_the_labels() -> None:
    seen = node_gpus(gfd_node("a", {"nvidia.com/gpu": 8}, 2, 4))
    assert (seen.allocatable, seen.physical, seen.replicas, seen.expected) == (8, 2, 4, 8)
    assert node_gpus(gfd_node("a", {"nvidia.com/gpu": 8}, None, 4)).expected is None


class StuckPlugin:
    """GFD has taken the new replicas; the device plugin still advertises whole GPUs."""

    def nodes(self) -> list[dict[str, Any]]:
        return [gfd_node("gpu-1", {"nvidia.com/gpu": 2}, 2, 4)]

    def put_configmap(self, manifest: dict[str, Any]) -> None:
        pass

    def delete_configmap(self, namespace: str, name: str) -> None:
        pass

    def cluster_policies(self) -> list[str]:
        return ["cluster-policy"]

    def patch_cluster_policy(self, name: str, patch: dict[str, Any]) -> None:
        pass

    def restart_device_plugin(self, namespace: str) -> int:
        return 0


def test_apply_tells_a_stuck_device_plugin_to_restart() -> None:
    said: list[str] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(K8sError) as error:
        apply(
            TimeSlicing(replicas=4), StuckPlugin(), wait=10, poll=5, say=said.append,
            sleep=sleep, clock=lambda: now[0],
        )  # fmt: skip
    assert said[-1] == "gpu-1: allocatable 2 nvidia.com/gpu, expected 8 (2 GPU(s) x 4)"
    assert "after 10 s 1 node(s)" in str(error.value)
    assert (
        "the device plugin has not restarted: kubectl -n gpu-operator rollout restart "
        "daemonset/nvidia-device-plugin-daemonset" in str(error.value)
    )
