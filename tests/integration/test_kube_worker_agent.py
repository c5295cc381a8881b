"""The test-side Kubernetes parts that %%gpu worker pods need, tested themselves.

The emulator's garbage collection (what an object owns is deleted with it) and DELETE
with DeleteOptions through the real client; the node agent's worker pods: Pending with
ContainerCreating until their Secret exists, the Secret's key as a private file of the
pod's user, Running, Succeeded or Failed with the exit code, ErrImagePull, and the
process stopped when the pod is deleted.
"""

from __future__ import annotations

import base64
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.kube_agent import NodeAgent
from tests.support.kube_api import Store, kube_api
from tests.support.users import need_module, wait_for

ALICE = "gpl-alice"
# The container: reports who it runs as, its key file's mode and owner, then waits or exits.
PROBE = """
import json, os, sys, time
path = os.environ["KEYFILE"]
info = os.stat(path)
folder = os.stat(os.path.dirname(path))
print(json.dumps({"uid": os.getuid(), "key": open(path, "rb").read().hex(),
                  "mode": oct(info.st_mode & 0o777), "owner": info.st_uid,
                  "folder": oct(folder.st_mode & 0o777)}), flush=True)
time.sleep(float(sys.argv[1]))
sys.exit(int(sys.argv[2]))
"""


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    need_module("kubernetes")
    with kube_api(tmp_path) as served:
        yield served


def worker(name: str, out: Path, sleep: float, code: int, image: str = "x.org/a/b:1") -> Any:
    # The probe's stdout goes to ``out`` (the agent keeps a worker's stdout as its own).
    argv = ["sh", "-c", f'exec "$0" "$@" > {out}', sys.executable, "-c", PROBE, str(sleep),
            str(code)]  # fmt: skip
    return {
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/component": "gpulane-worker"},
            "annotations": {"hub.jupyter.org/username": ALICE},
        },
        "spec": {
            "containers": [
                {
                    "name": "worker",
                    "image": image,
                    "command": argv,
                    "env": [{"name": "KEYFILE", "value": "/var/run/gpulane/key"}],
                    "volumeMounts": [{"name": "k", "mountPath": "/var/run/gpulane"}],
                }
            ],
            "volumes": [{"name": "k", "secret": {"secretName": f"{name}-key"}}],
        },
    }


def phase(store: Store, name: str) -> tuple[str, str]:
    [pod] = [p for p in store.select("pods", "jhub", "") if p["metadata"]["name"] == name]
    status = pod["status"]
    state = (status.get("containerStatuses") or [{}])[0].get("state") or {}
    detail = state.get("waiting", {}).get("reason") or str(
        state.get("terminated", {}).get("exitCode", "")
    )
    return status["phase"], detail


def test_delete_options_and_garbage_collection_through_the_real_client(
    api: tuple[Store, Path],
) -> None:
    from kubernetes import client, config

    store, kubeconfig = api
    core = client.CoreV1Api(config.new_client_from_config(config_file=str(kubeconfig)))
    owner = core.create_namespaced_pod(
        "jhub", {"metadata": {"name": "owner"}, "spec": {"containers": []}}
    )
    owned = {
        "metadata": {
            "name": "owned",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Pod", "name": "owner", "uid": owner.metadata.uid}
            ],
        },
        "data": {},
    }
    core.create_namespaced_secret("jhub", owned)
    core.create_namespaced_secret("jhub", {"metadata": {"name": "unowned"}, "data": {}})
    # A body (DeleteOptions) on a kept-alive connection, twice: the second must parse too.
    options = client.V1DeleteOptions(grace_period_seconds=1)
    core.delete_namespaced_pod("owner", "jhub", body=options)
    with pytest.raises(client.exceptions.ApiException) as gone:
        core.delete_namespaced_pod("owner", "jhub", body=options)
    assert gone.value.status == 404
    names = [s["metadata"]["name"] for s in store.select("secrets", "jhub", "")]
    assert names == ["unowned"]  # the owned Secret went with its pod


def test_the_agent_runs_a_worker_pod_with_its_key_as_a_private_file(
    api: tuple[Store, Path], unix_users: Any, shared_dir: Path
) -> None:
    import pwd

    store, _ = api
    out = shared_dir / "out"
    with NodeAgent(store, selector="gpulane.test/none=none") as agent:
        store.put("pods", "jhub", worker("w1", out, 0.0, 3))
        wait_for(lambda: phase(store, "w1") == ("Pending", "ContainerCreating"), 10)
        assert not agent.procs  # no Secret, no container
        key = bytes(range(32))
        secret = {"metadata": {"name": "w1-key"}, "data": {"key": base64.b64encode(key).decode()}}
        store.put("secrets", "jhub", secret)
        wait_for(lambda: phase(store, "w1") == ("Failed", "3"), 20, what="the exit code 3")
        seen = json.loads(out.read_text())
        uid = pwd.getpwnam(ALICE).pw_uid
        assert seen == {"uid": uid, "key": key.hex(), "mode": "0o400", "owner": uid,
                        "folder": "0o700"}  # fmt: skip
        out.unlink()
        store.put("pods", "jhub", worker("w2", out, 0.0, 0))
        store.put("secrets", "jhub", {**secret, "metadata": {"name": "w2-key"}})
        wait_for(lambda: phase(store, "w2") == ("Succeeded", "0"), 20, what="success")
        store.put("pods", "jhub", worker("w3", out, 300.0, 0))
        store.put("secrets", "jhub", {**secret, "metadata": {"name": "w3-key"}})
        wait_for(lambda: phase(store, "w3")[0] == "Running", 20, what="w3 to run")
        proc = agent.procs["w3"]
        store.delete("pods", "jhub", "w3")
        wait_for(lambda: proc.poll() is not None, 20, what="its process to stop")
        store.put("pods", "jhub", worker("w4", out, 0.0, 0, image="x.org/a/missing:1"))
        store.put("secrets", "jhub", {**secret, "metadata": {"name": "w4-key"}})
        wait_for(lambda: phase(store, "w4") == ("Pending", "ErrImagePull"), 10)
        assert "w4" not in agent.procs
        assert agent.workers == ["w1", "w2", "w3", "w4"]
