"""The pod keeper process, the lease's command for a Kubernetes GPU server, against the loopback API.

It must live exactly as long as its pod: exit when the pod is deleted or finishes (the
lease then ends), and delete the pod when the lease is revoked (SIGTERM from the broker).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.kube_api import Store, kube_api
from tests.support.users import need_module


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Store, Path]]:
    need_module("kubernetes")
    with kube_api(tmp_path) as served:
        yield served


def keeper(store: Store, kubeconfig: Path, name: str = "jupyter-ada") -> subprocess.Popen[str]:
    _, made = store.put("pods", "jhub", {"metadata": {"name": name}, "spec": {"containers": []}})
    store.patch("pods", "jhub", name, {"status": {"phase": "Running"}})
    argv = [sys.executable, "-m", "gpulane.hub.pod_keeper", "--namespace", "jhub",
            "--pod", name, "--uid", made["metadata"]["uid"]]  # fmt: skip
    env = {"PATH": os.environ["PATH"], "KUBECONFIG": str(kubeconfig)}
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # once it has read the pod, it watches it
    assert "following the pod for its GPU lease" in line, line + proc.communicate()[1]
    time.sleep(0.3)
    return proc


def ended(proc: subprocess.Popen[str]) -> str:
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return err


def test_the_keeper_ends_when_its_pod_is_deleted(api: tuple[Store, Path]) -> None:
    store, kubeconfig = api
    proc = keeper(store, kubeconfig)
    other = keeper(store, kubeconfig, "jupyter-ben")
    other.kill()
    other.communicate()
    store.delete("pods", "jhub", "jupyter-ben")
    time.sleep(0.5)
    assert proc.poll() is None
    store.delete("pods", "jhub", "jupyter-ada")
    assert "jhub/jupyter-ada: the pod was deleted; the GPU lease ends" in ended(proc)


def test_the_keeper_ends_when_its_pod_fails(api: tuple[Store, Path]) -> None:
    store, kubeconfig = api
    proc = keeper(store, kubeconfig)
    store.patch("pods", "jhub", "jupyter-ada", {"status": {"phase": "Failed"}})
    assert "the pod was modified; the GPU lease ends" in ended(proc)
    assert store.select("pods", "jhub", "")  # a failed pod is KubeSpawner's to clean up


def test_a_revoked_lease_deletes_the_pod(api: tuple[Store, Path]) -> None:
    store, kubeconfig = api
    proc = keeper(store, kubeconfig)
    proc.send_signal(signal.SIGTERM)  # what the broker sends at the lease's time limit
    assert "the GPU lease was revoked; deleting the pod" in ended(proc)
    assert store.select("pods", "jhub", "") == []


def test_a_pod_gone_before_the_keeper_starts_ends_it_at_once(api: tuple[Store, Path]) -> None:
    _, kubeconfig = api
    argv = [sys.executable, "-m", "gpulane.hub.pod_keeper", "--namespace", "jhub", "--pod", "x"]
    env = {"PATH": os.environ["PATH"], "KUBECONFIG": str(kubeconfig)}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "the pod is gone" in done.stderr
