"""The broker's GPUs on Kubernetes: the cluster's allocatable GPUs, less what others use.

``gpulane broker --gpu-source k8s`` (``GpulaneHub.gpu_source = "k8s"``) reads, with the
real ``kubernetes`` client (the hub pod's service account in the cluster, a kubeconfig
elsewhere):

- every Ready, schedulable node's *allocatable* GPU resource (``nvidia.com/gpu``, or
  ``nvidia.com/gpu.shared`` after ``time-slicing --rename-shared``). With time-slicing
  the device plugin already advertises each physical GPU ``replicas`` times, so one
  unit is one slice: the broker's ``--slices`` must equal those replicas, and the
  broker's GPU count is the slices divided by it;
- the GPU requests of pods on those nodes that gpulane did not lease (no
  :data:`LEASE_LABEL`): a GPU another tool took is not the broker's to give.

The list is read again every ``interval`` seconds, so nodes that join or leave (an
autoscaler, a drained node) change the capacity the queue plans with. A failed read
keeps the last known capacity and logs one line (the API server may be restarting).

Each reading also says whether the nodes agree with time-slicing (:func:`slicing_mismatch`),
where GPU Feature Discovery's labels let it know: a node advertising other than its
physical GPUs x replicas (the device plugin not restarted), or slicing GPUs other than
``--slices`` ways. ``gpulane k8s time-slicing --apply`` and ``gpulane doctor --k8s`` read
the nodes with :func:`node_gpus` too, so all three judge the same fields.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gpulane.broker.gpus import Inventory

log = logging.getLogger(__name__)

GPU_RESOURCE = "nvidia.com/gpu"
# Set by GPU Feature Discovery: the node's physical GPUs, and the replicas of each that
# the device plugin's configuration asks for (1 without time-slicing).
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
REPLICAS_LABEL = "nvidia.com/gpu.replicas"
DEVICE_PLUGIN_DAEMONSET = "nvidia-device-plugin-daemonset"  # the GPU Operator's name for it
# Pods a gpulane lease created carry this label (its value: the broker's job id).
LEASE_LABEL = "gpulane.io/lease"
# Phases in which a pod holds the GPUs it requested on its node.
HOLDING_PHASES = frozenset({"Pending", "Running", "Unknown"})


@dataclass(frozen=True)
class NodeGpus:
    """One node's GPUs as the API shows them: what it advertises and what GFD says it has."""

    name: str
    resource: str
    allocatable: int  # units of ``resource`` (slices where time-sliced)
    physical: int | None  # GFD's nvidia.com/gpu.count; None without GFD
    replicas: int | None  # GFD's nvidia.com/gpu.replicas; None without GFD
    schedulable: bool

    @property
    def expected(self) -> int | None:
        """What the node should advertise by GFD's labels (None: they do not say)."""
        if self.physical is None or self.replicas is None:
            return None
        return self.physical * self.replicas


@dataclass(frozen=True)
class Capacity:
    """What the cluster offers: slices in all, slices others hold, and the nodes counted."""

    slices: int
    foreign: int
    nodes: tuple[str, ...]
    gpu_nodes: tuple[NodeGpus, ...] = ()  # every node with GPUs, counted or not

    def gpus(self, slices_per_gpu: int) -> int:
        """Whole broker GPUs (each ``slices_per_gpu`` slices) free for gpulane."""
        return max(0, self.slices - self.foreign) // max(1, slices_per_gpu)


def _units(value: Any) -> int:
    try:
        return max(0, int(str(value)))
    except (TypeError, ValueError):
        return 0


def _schedulable(node: Mapping[str, Any]) -> bool:
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _label_int(labels: Mapping[str, Any], key: str) -> int | None:
    try:
        return int(str(labels[key]))
    except (KeyError, TypeError, ValueError):
        return None


def node_gpus(node: Mapping[str, Any], resource: str = GPU_RESOURCE) -> NodeGpus:
    """The one reading of a node's GPUs (API object as a dict)."""
    metadata = node.get("metadata") or {}
    labels = metadata.get("labels") or {}
    return NodeGpus(
        name=str(metadata.get("name", "")),
        resource=resource,
        allocatable=_units(((node.get("status") or {}).get("allocatable") or {}).get(resource)),
        physical=_label_int(labels, GPU_COUNT_LABEL),
        replicas=_label_int(labels, REPLICAS_LABEL),
        schedulable=_schedulable(node),
    )


def restart_command(namespace: str = "gpu-operator") -> str:
    """What makes the device plugin read its configuration again."""
    return f"kubectl -n {namespace} rollout restart daemonset/{DEVICE_PLUGIN_DAEMONSET}"


def node_mismatch(node: NodeGpus, slices_per_gpu: int | None) -> str | None:
    """Why this node's capacity disagrees with time-slicing, or None (also where unknowable).

    ``slices_per_gpu`` is the broker's ``--slices``; None compares the node with itself only.
    """
    if node.physical is None and node.allocatable == 0:
        return None  # not a GPU node, or one GFD has not labelled: nothing to compare
    expected = node.expected
    # A whole-GPU node under --rename-shared advertises no slices and is not ours to judge.
    ours = node.allocatable > 0 or (node.replicas or 1) > 1
    if expected is not None and node.allocatable != expected and ours:
        return (
            f"node {node.name} advertises {node.allocatable} {node.resource}, but GPU feature "
            f"discovery says {node.physical} GPU(s) x {node.replicas} replicas = {expected}: "
            "the device plugin has not applied its time-slicing config; restart it "
            f"({restart_command()})"
        )
    if slices_per_gpu is None:
        return None
    if node.allocatable and node.replicas is not None and node.replicas != slices_per_gpu:
        return (
            f"node {node.name} slices each GPU {node.replicas} way(s) but the broker counts "
            f"{slices_per_gpu} slice(s) per GPU: make them agree (gpulane k8s time-slicing "
            f"--replicas N --apply, and the broker's --slices / the profiles' slices_per_gpu)"
        )
    return None


def slicing_mismatch(nodes: Iterable[NodeGpus], slices_per_gpu: int | None) -> str | None:
    """One line for the dashboard and ``gpulane status`` when nodes and time-slicing disagree."""
    problems = [p for p in (node_mismatch(n, slices_per_gpu) for n in nodes) if p]
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more node(s))" if len(problems) > 1 else ""
    return problems[0] + more


def _pod_units(pod: Mapping[str, Any], resource: str) -> int:
    spec = pod.get("spec") or {}
    total = 0
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        limits = resources.get("limits") or {}
        requests = resources.get("requests") or {}
        # Extended resources: the limit is the request (Kubernetes refuses them unequal).
        total += _units(limits.get(resource, requests.get(resource)))
    return total


def capacity(
    nodes: Iterable[Mapping[str, Any]],
    pods: Iterable[Mapping[str, Any]],
    resource: str = GPU_RESOURCE,
) -> Capacity:
    """The capacity the broker may lease from these nodes and pods (API objects as dicts)."""
    counted: dict[str, int] = {}
    seen: list[NodeGpus] = []
    for node in nodes:
        gpus = node_gpus(node, resource)
        if gpus.allocatable or gpus.physical is not None:
            seen.append(gpus)
        if gpus.name and gpus.allocatable and gpus.schedulable:
            counted[gpus.name] = gpus.allocatable
    foreign = 0
    for pod in pods:
        metadata = pod.get("metadata") or {}
        if LEASE_LABEL in (metadata.get("labels") or {}):
            continue
        if (pod.get("status") or {}).get("phase") not in HOLDING_PHASES:
            continue
        where = str((pod.get("spec") or {}).get("nodeName") or "")
        if where in counted:
            foreign += _pod_units(pod, resource)
    total = sum(counted.values())
    return Capacity(total, min(foreign, total), tuple(counted), tuple(seen))


def core_api(kubeconfig: str | None = None, context: str | None = None) -> tuple[Any, Any]:
    """A ``CoreV1Api`` and its serializer: the service account in a pod, else a kubeconfig
    (``kubeconfig``, or ``$KUBECONFIG`` / ``~/.kube/config``)."""
    from kubernetes import client, config

    if kubeconfig:
        api_client = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context
        )
    else:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config(context=context)  # type: ignore[no-untyped-call]
        api_client = client.ApiClient()
    return client.CoreV1Api(api_client), api_client.sanitize_for_serialization


class KubeReader:
    """Lists nodes and pods with the ``kubernetes`` client."""

    def __init__(self, kubeconfig: str | None = None, context: str | None = None) -> None:
        self._api, self._serialize = core_api(kubeconfig, context)

    def read(self, resource: str) -> Capacity:
        nodes = self._api.list_node(_request_timeout=30).items
        pods = self._api.list_pod_for_all_namespaces(_request_timeout=30).items
        return capacity(
            (self._serialize(n) for n in nodes), (self._serialize(p) for p in pods), resource
        )


class KubeInventory(Inventory):
    """The broker's inventory on Kubernetes: ``count`` follows the cluster (see above)."""

    def __init__(
        self,
        reader: KubeReader,
        slices_per_gpu: int,
        memory: int,
        resource: str = GPU_RESOURCE,
        interval: float = 30.0,
    ) -> None:
        self._reader = reader
        self._resource = resource
        self._slices_per_gpu = slices_per_gpu
        self._interval = interval
        self._stop = threading.Event()
        self._on_change: Callable[[], None] | None = None
        self.notice: str | None = None  # nodes vs. time-slicing (slicing_mismatch), for admins
        first = reader.read(resource)  # an error here stops the broker, named
        super().__init__(0, memory, [], simulated=True)
        self.apply(first)
        self._thread = threading.Thread(target=self._follow, daemon=True, name="gpulane-k8s")
        self._thread.start()

    def apply(self, seen: Capacity) -> None:
        count = seen.gpus(self._slices_per_gpu)
        if count != self.count:
            log.info(
                "Kubernetes capacity: %d %s on %d node(s), %d held by other pods: %d GPU(s)",
                seen.slices,
                self._resource,
                len(seen.nodes),
                seen.foreign,
                count,
            )
        notice = slicing_mismatch(seen.gpu_nodes, self._slices_per_gpu)
        if notice != self.notice:
            log.warning("Kubernetes capacity: %s", notice or "nodes agree with time-slicing again")
        self.notice = notice
        # names first: readers index names by 0..count-1.
        changed = count != self.count
        self.names = [f"Kubernetes GPU {i}" for i in range(count)]
        self.count = count
        if changed and self._on_change is not None:
            self._on_change()

    def follow(self, on_change: Callable[[], None]) -> None:
        """Call ``on_change`` (from this inventory's thread) whenever the count changes."""
        self._on_change = on_change

    def _follow(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.apply(self._reader.read(self._resource))
            except Exception as error:  # the API server restarting must not stop the broker
                log.warning("Kubernetes capacity not read (keeping %d GPUs): %s", self.count, error)

    def close(self) -> None:
        self._stop.set()
