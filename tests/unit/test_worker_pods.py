"""The %%gpu worker pod and its key's Secret: schema-valid, built from the user's own server only."""

from __future__ import annotations

import base64
import copy
import importlib
import json
from typing import Any

import pytest

from gpulane.broker import worker_pods as wp
from gpulane.errors import InvalidRequest
from tests.support.users import IN_CI

try:
    kubernetes_validate: Any = importlib.import_module("kubernetes_validate")
except ImportError:
    if IN_CI:
        raise
    pytest.skip("kubernetes-validate is not installed", allow_module_level=True)

K8S_VERSION = "1.30"
SETTINGS = wp.WorkerPodSettings(namespace="jhub", node_selector={"nvidia.com/gpu.present": "true"})


def server_pod(user: str = "ada", ip: str = "10.1.2.3") -> dict[str, Any]:
    """A user's server pod as KubeSpawner makes it (the parts the broker reads)."""
    return {
        "metadata": {
            "name": f"jupyter-{user}",
            "uid": "0f6b6f1e-5d1c-4a57-9d4b-2b1f3c4d5e6f",
            "labels": {"component": "singleuser-server", "hub.jupyter.org/username": user},
            "annotations": {"hub.jupyter.org/username": user},
        },
        "spec": {
            "securityContext": {"fsGroup": 100},
            "imagePullSecrets": [{"name": "registry"}],
            "containers": [
                {
                    "name": "notebook",
                    "image": "quay.io/jupyter/pytorch-notebook:2024-12-02",
                    "workingDir": "/home/jovyan",
                    "securityContext": {"runAsUser": 1000, "runAsGroup": 100},
                    "volumeMounts": [
                        {"name": "volume-ada", "mountPath": "/home/jovyan"},
                        {"name": "kube-api-access", "mountPath": "/var/run/secrets/x"},
                    ],
                }
            ],
            "volumes": [
                {"name": "volume-ada", "persistentVolumeClaim": {"claimName": f"claim-{user}"}},
                {"name": "kube-api-access", "projected": {"sources": []}},
            ],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def job(**changes: Any) -> wp.WorkerJob:
    values: dict[str, Any] = {
        "job_id": 42,
        "user": "ada",
        "gpus": 0,
        "slices": 1,
        "time_limit": 3600.0,
        "env": {
            "GPULANE_JOB_ID": "42",
            "CUDA_VISIBLE_DEVICES": "0",
            "GPULANE_GPU_MEMORY_LIMIT": "8589934592",
        },
        "connect": "10.1.2.3:40000",
    }
    values.update(changes)
    return wp.WorkerJob(**values)


def test_the_pod_and_the_secret_are_valid_kubernetes_objects() -> None:
    pod = wp.worker_pod(job(), server_pod(), SETTINGS)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    secret = wp.worker_secret(job(), b"k" * 32, "uid-of-the-pod", "jhub")
    kubernetes_validate.validate(secret, K8S_VERSION, strict=True)
    whole = wp.worker_pod(job(gpus=2, slices=0), server_pod(), SETTINGS)
    kubernetes_validate.validate(whole, K8S_VERSION, strict=True)
    assert whole["spec"]["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}


def test_the_pod_carries_the_agreed_labels_the_deadline_and_the_server_as_owner() -> None:
    pod = wp.worker_pod(job(), server_pod(), SETTINGS)
    assert pod["metadata"]["labels"] == {
        "app.kubernetes.io/component": "gpulane-worker",
        "app.kubernetes.io/managed-by": "gpulane",
        "hub.jupyter.org/network-access-singleuser": "true",
        "gpulane.io/job": "42",
        "gpulane.io/user": "ada",
        "gpulane.io/lease": "42",
    }
    assert pod["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "jupyter-ada",
            "uid": "0f6b6f1e-5d1c-4a57-9d4b-2b1f3c4d5e6f",
        }
    ]
    spec = pod["spec"]
    assert spec["activeDeadlineSeconds"] == 3600 + wp.DEADLINE_GRACE_S
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert spec["securityContext"] == {"fsGroup": 100}


def test_the_pod_has_the_users_image_and_claim_and_nothing_else_of_the_server() -> None:
    pod = wp.worker_pod(job(), server_pod(), SETTINGS)
    container = pod["spec"]["containers"][0]
    assert container["image"] == "quay.io/jupyter/pytorch-notebook:2024-12-02"
    assert container["securityContext"] == {"runAsUser": 1000, "runAsGroup": 100}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(volumes) == {"volume-ada", wp.KEY_VOLUME}  # no API token volume
    assert volumes["volume-ada"]["persistentVolumeClaim"] == {"claimName": "claim-ada"}
    assert volumes[wp.KEY_VOLUME]["secret"]["secretName"] == "gpulane-worker-42-key"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"volume-ada": "/home/jovyan", wp.KEY_VOLUME: wp.KEY_DIR}


def test_the_key_is_in_the_secret_only_never_in_argv_or_env() -> None:
    key = bytes(range(32))
    pod = wp.worker_pod(job(), server_pod(), SETTINGS)
    secret = wp.worker_secret(job(), key, "pod-uid", "jhub")
    assert base64.b64decode(secret["data"]["key"]) == key
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "pod-uid"
    text = json.dumps(pod)
    assert key.hex() not in text and base64.b64encode(key).decode() not in text
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["GPULANE_RUNNER_KEYFILE"] == f"{wp.KEY_DIR}/{wp.KEY_FILE}"
    assert env["GPULANE_RUNNER_ADDRESS"] == "10.1.2.3:40000"
    assert env["GPULANE_GPU_MEMORY_LIMIT"] == "8589934592"  # the memory cap goes along
    assert "CUDA_VISIBLE_DEVICES" not in env  # the broker's numbering, not the node's


@pytest.mark.parametrize(
    ("name", "label"),
    [("ada", "ada"), ("Ben.Smith@example.org", None), ("a--b", None), ("x" * 80, None)],
)
def test_a_users_name_is_escaped_as_kubespawner_escapes_it(name: str, label: str | None) -> None:
    from kubespawner.slugs import is_valid_label, safe_slug

    expected = safe_slug(name, is_valid=is_valid_label)
    assert wp.user_label(name) == (label or expected)
    pod = wp.worker_pod(job(user=name), server_pod(), SETTINGS)
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert pod["metadata"]["annotations"]["hub.jupyter.org/username"] == name


@pytest.mark.parametrize(
    "connect",
    [
        "10.1.2.4:40000",  # another pod's IP: another user's kernel
        "10.1.2.3:22",  # a privileged port
        "10.1.2.3:99999",
        "hub:8081",  # a name, which DNS could point anywhere
        "10.1.2.3",
        12,
        "10.1.2.3:40000" + " " * 60,
    ],
)
def test_a_connect_back_not_on_the_users_own_server_is_refused(connect: object) -> None:
    with pytest.raises(InvalidRequest):
        wp.check_connect(connect, server_pod())


def test_a_connect_back_on_the_users_server_is_taken() -> None:
    assert wp.check_connect("10.1.2.3:40000", server_pod()) == "10.1.2.3:40000"


def test_the_server_is_the_one_annotated_with_the_users_exact_name() -> None:
    other = server_pod()
    other["metadata"]["annotations"]["hub.jupyter.org/username"] = "Ada"  # same label, not ada
    pending = server_pod()
    pending["status"]["phase"] = "Pending"
    assert wp.users_server([other, pending], "ada") is None
    assert wp.users_server([other, server_pod()], "ada") == server_pod()


def test_a_key_must_be_32_bytes_of_hex() -> None:
    assert wp.check_key("ab" * 32) == b"\xab" * 32
    for bad in ("ab" * 31, "zz" * 32, None, 5):
        with pytest.raises(InvalidRequest):
            wp.check_key(bad)


def test_phases_read_as_the_card_says_them() -> None:
    pod = wp.worker_pod(job(), server_pod(), SETTINGS)
    pending = copy.deepcopy(pod)
    pending["status"] = {"phase": "Pending"}
    assert wp.phase_text(pending) == "waiting to be scheduled"
    pending["spec"]["nodeName"] = "gpu-2"
    assert wp.phase_text(pending) == "scheduled on node gpu-2"
    pending["status"]["containerStatuses"] = [
        {"state": {"waiting": {"reason": "ContainerCreating"}}}
    ]
    assert wp.phase_text(pending) == "pulling image on node gpu-2"
    pending["status"]["containerStatuses"] = [
        {"state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}
    ]
    assert wp.phase_text(pending) == "image pull failed on node gpu-2: not found"
    unschedulable = {
        "status": {
            "phase": "Pending",
            "conditions": [
                {"type": "PodScheduled", "status": "False", "message": "0/3 nodes are available"}
            ],
        }
    }
    assert wp.phase_text(unschedulable) == "not scheduled: 0/3 nodes are available"
    assert wp.phase_text({"status": {"phase": "Running"}, "spec": {"nodeName": "g"}}) == (
        "running on node g"
    )
    assert wp.phase_text(None) == "its pod is gone"


def hub_values_server_pod(user: str, user_dir: str | None) -> dict[str, Any]:
    """A server pod with the storage `gpulane k8s hub-values --nfs-server` writes: an NFS
    `persist` volume shared by all users, each mounting their own folder through
    ``subPathExpr: $(GPULANE_USER_DIR)``, which KubeSpawner sets per user."""
    from gpulane.admin.k8s_hub_values import HubOptions, storage
    from gpulane.config import USER_DIR_ENV

    options = HubOptions(
        public_url="https://hub.example.org",
        authorize_url="https://idp/auth",
        token_url="https://idp/token",
        userdata_url="https://idp/userinfo",
        client_id="hub",
        nfs_server="nfs.example.org",
        home_export="/export/home",
        shared_export="/export/shared",
    )
    volumes, mounts = storage(options)
    pod = server_pod(user)
    container = pod["spec"]["containers"][0]
    container["volumeMounts"] = mounts
    container["env"] = [] if user_dir is None else [{"name": USER_DIR_ENV, "value": user_dir}]
    pod["spec"]["volumes"] = volumes
    return pod


def test_each_users_worker_mounts_that_users_folder_of_a_shared_volume() -> None:
    """The attack it stops: without the variable its mount names, the kubelet mounts the
    literal folder `$(GPULANE_USER_DIR)`, one folder for every user's worker."""
    pods = {
        user: wp.worker_pod(job(user=user), hub_values_server_pod(user, user), SETTINGS)
        for user in ("ada", "ben")
    }
    for user, pod in pods.items():
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
        container = pod["spec"]["containers"][0]
        persist = next(m for m in container["volumeMounts"] if m["name"] == "persist")
        assert persist["subPathExpr"] == "$(GPULANE_USER_DIR)"
        assert {"name": "GPULANE_USER_DIR", "value": user} in container["env"]
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["persist"]["nfs"]["server"] == "nfs.example.org"
        assert "home" not in volumes  # the server's scratch emptyDir is its own
    # A job environment cannot name another user's folder: the server's value wins.
    forged = wp.worker_pod(
        job(user="ben", env={"GPULANE_USER_DIR": "ada"}),
        hub_values_server_pod("ben", "ben"),
        SETTINGS,
    )
    env = forged["spec"]["containers"][0]["env"]
    assert [e for e in env if e["name"] == "GPULANE_USER_DIR"] == [
        {"name": "GPULANE_USER_DIR", "value": "ben"}
    ]


def test_a_mount_whose_variable_the_server_does_not_set_is_refused() -> None:
    with pytest.raises(InvalidRequest, match=r"uses \$\(GPULANE_USER_DIR\)"):
        wp.worker_pod(job(), hub_values_server_pod("ada", None), SETTINGS)
