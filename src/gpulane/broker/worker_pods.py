"""The pod and the Secret of a ``%%gpu`` cell's GPU worker on Kubernetes. Pure: dicts in, dicts out.

On a grant the broker (in the hub pod) creates a worker pod for the cell. Nothing of the
pod comes from the kernel but its connect-back address (checked first, see
:func:`check_connect`): the image, the security context, the storage and the pull secrets
are those of the user's own server pod, looked up by the broker for the identity the hub
vouched for; the GPU request, the node selection and the namespace are the admin's
(:class:`WorkerPodSettings`); the time limit is the broker's. The worker listens on
nothing: it dials the kernel and proves itself with a one-time key, mounted from a Secret
(never argv or environment) that is owned by the pod and deleted with it.

Labels (the network policy of ``gpulane k8s hub-values`` selects on them):
``app.kubernetes.io/component: gpulane-worker``, ``app.kubernetes.io/managed-by: gpulane``,
``hub.jupyter.org/network-access-singleuser: "true"`` (z2jh lets it reach user pods),
``gpulane.io/job``, ``gpulane.io/user`` (the user's name as KubeSpawner escapes it), and
``gpulane.io/lease`` (the broker's capacity reader does not count a leased GPU twice).
"""

from __future__ import annotations

import base64
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpulane.broker.k8s_capacity import LEASE_LABEL
from gpulane.errors import InvalidRequest
from gpulane.worker_env import RUNNER_ADDRESS_ENV, RUNNER_KEYFILE_ENV

COMPONENT = "gpulane-worker"
JOB_LABEL = "gpulane.io/job"
USER_LABEL = "gpulane.io/user"
USERNAME_ANNOTATION = "hub.jupyter.org/username"  # KubeSpawner's: the name unescaped
KEY_DIR = "/var/run/gpulane"
KEY_FILE = "key"
KEY_VOLUME = "gpulane-key"
KEY_BYTES = 32
DEADLINE_GRACE_S = 60  # activeDeadlineSeconds past the GPU time limit: the broker ends it first
# The grant's variables a pod must not get: device numbers are the broker's inventory's,
# not the node's (the device plugin gives the pod its own GPUs).
_NOT_IN_POD = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"})


@dataclass(frozen=True)
class WorkerPodSettings:
    """The admin's part of every worker pod."""

    namespace: str
    gpu_resource: str = "nvidia.com/gpu"  # whole GPUs
    slice_resource: str = "nvidia.com/gpu"  # one slice of a time-sliced GPU
    node_selector: Mapping[str, str] = field(default_factory=dict)
    python: str = "python3"  # the worker's interpreter in the user's image


@dataclass(frozen=True)
class WorkerJob:
    """The broker's part: the job as granted, for the user the hub named."""

    job_id: int
    user: str
    gpus: int
    slices: int
    time_limit: float
    env: Mapping[str, str]  # the grant's environment (job id, memory caps, slices)
    connect: str  # host:port of the kernel, as check_connect returned it


def pod_name(job_id: int) -> str:
    return f"gpulane-worker-{job_id}"


def secret_name(job_id: int) -> str:
    return f"gpulane-worker-{job_id}-key"


def user_label(user: str) -> str:
    """The user's name as a label value, escaped exactly as KubeSpawner escapes it."""
    from kubespawner.slugs import is_valid_label, safe_slug

    value: str = safe_slug(user, is_valid=is_valid_label)
    return value


def labels(job: WorkerJob) -> dict[str, str]:
    return {
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/managed-by": "gpulane",
        "hub.jupyter.org/network-access-singleuser": "true",
        JOB_LABEL: str(job.job_id),
        USER_LABEL: user_label(job.user),
        LEASE_LABEL: str(job.job_id),
    }


def server_selector(user: str) -> str:
    """The label selector of a user's server pods, as KubeSpawner labels them."""
    return f"component=singleuser-server,hub.jupyter.org/username={user_label(user)}"


def users_server(pods: list[Mapping[str, Any]], user: str) -> Mapping[str, Any] | None:
    """The user's running server pod among ``pods`` (listed with :func:`server_selector`): its
    annotation must name exactly this user (an escaped label may be shared by two names)."""
    for pod in pods:
        metadata = pod.get("metadata") or {}
        if (metadata.get("annotations") or {}).get(USERNAME_ANNOTATION) != user:
            continue
        status = pod.get("status") or {}
        if status.get("phase") == "Running" and status.get("podIP"):
            return pod
    return None


def check_connect(connect: object, server: Mapping[str, Any]) -> str:
    """The kernel's connect-back address if it is ``IP:PORT`` on the user's own server pod;
    anything else is refused with one line (a user could otherwise point a worker, and its
    key, at another user's kernel)."""
    if not isinstance(connect, str) or len(connect) > 64:
        raise InvalidRequest("connect must be 'IP:PORT' of your server's kernel")
    host, _, port = connect.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise InvalidRequest(f"connect {connect!r}: the host must be an IP address") from None
    if not port.isdigit() or not 1024 <= int(port) <= 65535:
        raise InvalidRequest(f"connect {connect!r}: the port must be 1024 to 65535")
    own = {(server.get("status") or {}).get("podIP")} | {
        entry.get("ip") for entry in (server.get("status") or {}).get("podIPs") or []
    }
    if str(address) not in own:
        raise InvalidRequest(
            f"connect {connect!r}: a worker connects back only to your own server pod"
        )
    return f"{address}:{int(port)}" if address.version == 4 else f"[{address}]:{int(port)}"


def check_key(key: object) -> bytes:
    """The one-time key the kernel made (hex), as bytes; one line if it is not one."""
    if not isinstance(key, str) or len(key) != 2 * KEY_BYTES:
        raise InvalidRequest(f"key must be {2 * KEY_BYTES} hex digits")
    try:
        return bytes.fromhex(key)
    except ValueError:
        raise InvalidRequest(f"key must be {2 * KEY_BYTES} hex digits") from None


# Volume kinds a worker takes from its server: the user's storage, never the hub's config
# maps, host paths or the service-account token.
_STORAGE_KINDS = ("persistentVolumeClaim", "nfs")
_VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _storage(
    server: Mapping[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """The server's storage volumes (claims and NFS), their mounts in its first container, and
    the variables those mounts' ``subPathExpr`` name, copied from that container: without them
    the kubelet leaves ``$(GPULANE_USER_DIR)`` as literal text, and every user's worker would
    mount the same folder of the shared volume."""
    spec = server.get("spec") or {}
    volumes = [dict(v) for v in spec.get("volumes") or [] if any(k in v for k in _STORAGE_KINDS)]
    names = {v["name"] for v in volumes}
    container = (spec.get("containers") or [{}])[0]
    mounts = [dict(m) for m in container.get("volumeMounts") or [] if m.get("name") in names]
    server_env = {e.get("name"): e for e in container.get("env") or []}
    needed: dict[str, dict[str, Any]] = {}
    for mount in mounts:
        for name in _VARIABLE.findall(mount.get("subPathExpr") or ""):
            if name not in server_env:
                raise InvalidRequest(
                    f"your server's mount {mount.get('mountPath')!r} uses $({name}), which its "
                    "container does not set; ask your admin to check the storage settings"
                )
            needed[name] = dict(server_env[name])
    return volumes, mounts, list(needed.values())


def worker_pod(
    job: WorkerJob, server: Mapping[str, Any], settings: WorkerPodSettings
) -> dict[str, Any]:
    """The worker pod's manifest; ``server`` is the user's own server pod, read from the API."""
    spec = server.get("spec") or {}
    metadata = server.get("metadata") or {}
    container = (spec.get("containers") or [{}])[0]
    claims, mounts, mount_env = _storage(server)
    mount_names = {e["name"] for e in mount_env}  # the server's value wins: its mounts need it
    env = {k: v for k, v in job.env.items() if k not in _NOT_IN_POD}
    env.update(
        {
            RUNNER_ADDRESS_ENV: job.connect,
            RUNNER_KEYFILE_ENV: f"{KEY_DIR}/{KEY_FILE}",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if job.gpus:
        resources = {settings.gpu_resource: str(job.gpus)}
    else:
        resources = {settings.slice_resource: str(max(job.slices, 1))}
    worker: dict[str, Any] = {
        "name": "worker",
        "image": container.get("image"),
        "command": [settings.python, "-m", "gpulane.kernel.runner"],
        "env": [
            *mount_env,
            *({"name": k, "value": v} for k, v in sorted(env.items()) if k not in mount_names),
        ],
        "resources": {"limits": resources, "requests": dict(resources)},
        "volumeMounts": [
            *mounts,
            {"name": KEY_VOLUME, "mountPath": KEY_DIR, "readOnly": True},
        ],
    }
    for key in ("workingDir", "securityContext", "imagePullPolicy"):
        if container.get(key):
            worker[key] = container[key]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": math.ceil(job.time_limit) + DEADLINE_GRACE_S,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "containers": [worker],
        "volumes": [
            *claims,
            {
                "name": KEY_VOLUME,
                # 0440: the pod's fsGroup reads it (z2jh sets one); the volume is this pod's.
                "secret": {"secretName": secret_name(job.job_id), "defaultMode": 0o440},
            },
        ],
    }
    if settings.node_selector:
        pod_spec["nodeSelector"] = dict(settings.node_selector)
    for key in ("securityContext", "imagePullSecrets"):
        if spec.get(key):
            pod_spec[key] = spec[key]
    owner = {
        # Garbage-collected with the server: a worker never outlives its kernel's pod.
        "apiVersion": "v1",
        "kind": "Pod",
        "name": metadata.get("name"),
        "uid": metadata.get("uid"),
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(job.job_id),
            "namespace": settings.namespace,
            "labels": labels(job),
            "annotations": {USERNAME_ANNOTATION: job.user},
            "ownerReferences": [owner],
        },
        "spec": pod_spec,
    }


def worker_secret(job: WorkerJob, key: bytes, pod_uid: str, namespace: str) -> dict[str, Any]:
    """The Secret that carries the key; owned by the worker pod, so it goes with it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(job.job_id),
            "namespace": namespace,
            "labels": labels(job),
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": pod_name(job.job_id), "uid": pod_uid}
            ],
        },
        "data": {KEY_FILE: base64.b64encode(key).decode()},
    }


def phase_text(pod: Mapping[str, Any] | None) -> str:
    """The worker pod's state in the card's words: "pulling image", "scheduled on node gpu-2",
    "running on node gpu-2", or Kubernetes' reason when it refuses the pod."""
    if pod is None:
        return "its pod is gone"
    status = pod.get("status") or {}
    phase = status.get("phase") or "Pending"
    node = (pod.get("spec") or {}).get("nodeName")
    on = f" on node {node}" if node else ""
    for entry in status.get("containerStatuses") or []:
        waiting = (entry.get("state") or {}).get("waiting")
        if waiting and waiting.get("reason"):
            reason = str(waiting["reason"])
            text = _WAITING.get(reason, reason)
            message = str(waiting.get("message") or "")[:200]
            return f"{text}{on}" + (f": {message}" if message and reason in _REFUSALS else "")
    if phase == "Pending":
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                why = str(condition.get("message") or condition.get("reason") or "")[:200]
                return f"not scheduled: {why}" if why else "not scheduled yet"
        return f"scheduled{on}" if node else "waiting to be scheduled"
    if phase == "Running":
        return f"running{on}"
    reason = status.get("reason") or ""
    return f"{phase.lower()}{on}" + (f" ({reason})" if reason else "")


_WAITING = {
    "ContainerCreating": "pulling image",
    "PodInitializing": "starting",
    "ErrImagePull": "image pull failed",
    "ImagePullBackOff": "image pull failed",
    "CreateContainerConfigError": "refused",
    "InvalidImageName": "refused: invalid image name",
}
_REFUSALS = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "CreateContainerConfigError", "InvalidImageName"}
)
