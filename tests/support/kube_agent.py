"""A test-side node agent for the loopback Kubernetes API: it runs the pods that are created.

For each single-user pod that appears in the emulator's store it starts the pod's
container command as a local process, as the Unix user the pod is for (its
``JUPYTERHUB_USER``), with the pod's environment, listening on a loopback address of
its own (127.0.0.N: each pod has its own IP, as on a cluster); it reports the pod
Running with that ``podIP`` once the process started, Failed if the process exits by
itself, and stops the process when the pod is deleted. Tests only: it trusts the pod.

It also runs ``%%gpu`` worker pods (``app.kubernetes.io/component: gpulane-worker``), as
the user their ``hub.jupyter.org/username`` annotation names: Pending with
``ContainerCreating`` on node ``gpu-1`` until their Secret volumes exist (as a kubelet
waits to mount them), each Secret's keys then written as private files (0400 in a 0700
folder of that user) where the container's environment points into the mount path;
``ErrImagePull`` for an image named ``.../missing:...``; Running while the command runs;
Succeeded or Failed with the container's exit code; the process stopped when the pod is
deleted.
"""

from __future__ import annotations

import base64
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse, urlunparse

from tests.support.kube_api import Store

KEPT = ("PATH", "LANG")
WORKER = ("app.kubernetes.io/component", "gpulane-worker")
MISSING_IMAGE = "/missing:"  # an image name with this in it cannot be pulled


class NodeAgent:
    def __init__(self, store: Store, selector: str = "component=singleuser-server") -> None:
        self.store = store
        self.selector = selector
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # pod name -> its process
        self.created: list[str] = []  # pod names in the order they appeared
        self.workers: list[str] = []  # worker pod names in the order they appeared
        self.waiting: dict[str, dict[str, Any]] = {}  # worker pods waiting for their Secrets
        self.folders: dict[str, str] = {}  # worker pod name -> its mounted Secrets' folder
        self._next_ip = 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="node-agent")

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        seen = 0
        while not self._stop.is_set():
            with self.store.changed:
                fresh = [e for e in self.store.events if e[0] > seen]
                if not fresh:
                    self.store.changed.wait(0.2)
            self._reap()
            for pod in list(self.waiting.values()):
                self._start_worker(pod)
            if not fresh:
                continue
            seen = fresh[-1][0]
            for _, event, kind, obj in fresh:
                if kind != "pods":
                    continue
                name = obj["metadata"]["name"]
                if event == "ADDED" and self._ours(obj):
                    self.created.append(name)
                    self._start(obj)
                elif event == "ADDED" and _labels(obj).get(WORKER[0]) == WORKER[1]:
                    self.workers.append(name)
                    self._start_worker(obj)
                elif event == "DELETED":
                    self.waiting.pop(name, None)
                    self._kill(name)

    def _ours(self, pod: dict[str, Any]) -> bool:
        labels = pod["metadata"].get("labels") or {}
        key, _, value = self.selector.partition("=")
        return labels.get(key) == value

    def _start(self, pod: dict[str, Any]) -> None:
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        container = pod["spec"]["containers"][0]
        env = {e["name"]: str(e.get("value", "")) for e in container.get("env") or []}
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        port = int((container.get("ports") or [{}])[0].get("containerPort", 8888))
        # The server listens where the pod's IP would be.
        service = urlparse(env.get("JUPYTERHUB_SERVICE_URL", f"http://0.0.0.0:{port}/"))
        env["JUPYTERHUB_SERVICE_URL"] = urlunparse(service._replace(netloc=f"{ip}:{port}"))
        account = pwd.getpwnam(env["JUPYTERHUB_USER"])
        env.update({k: os.environ[k] for k in KEPT if k in os.environ})
        env.update(HOME=account.pw_dir, USER=account.pw_name, SHELL="/bin/sh")
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        self.procs[name] = subprocess.Popen(
            argv,
            env=env,
            cwd=account.pw_dir,
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.store.patch(
            "pods",
            namespace,
            name,
            {
                "spec": {"nodeName": "gpu-1"},
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "containerStatuses": [
                        {
                            "name": "notebook",
                            "ready": True,
                            "started": True,
                            "image": container.get("image", ""),
                            "imageID": "",
                            "restartCount": 0,
                            "state": {"running": {}},
                        }
                    ],
                },
            },
        )

    def _start_worker(self, pod: dict[str, Any]) -> None:
        """Run a worker pod's container once its Secrets exist (Pending until then)."""
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        container = pod["spec"]["containers"][0]
        first = name not in self.waiting
        self.waiting[name] = pod
        if MISSING_IMAGE in str(container.get("image", "")):
            if first:
                self._waiting(namespace, name, "ErrImagePull", "image not found")
            return
        secrets = {}
        for volume in pod["spec"].get("volumes") or []:
            if "secret" in volume:
                found = self.store.select("secrets", namespace, "")
                hit = [s for s in found if s["metadata"]["name"] == volume["secret"]["secretName"]]
                if not hit:
                    if first:
                        self._waiting(namespace, name, "ContainerCreating", "")
                    return
                secrets[volume["name"]] = hit[0].get("data") or {}
        del self.waiting[name]
        account = pwd.getpwnam(pod["metadata"]["annotations"]["hub.jupyter.org/username"])
        folder = tempfile.mkdtemp(prefix=f"{name}-")
        os.chown(folder, account.pw_uid, account.pw_gid)  # mkdtemp made it 0700
        self.folders[name] = folder
        env = {e["name"]: str(e.get("value", "")) for e in container.get("env") or []}
        for mount in container.get("volumeMounts") or []:
            data = secrets.get(mount["name"])
            if data is None:
                continue
            for key, value in data.items():
                path = os.path.join(folder, key)
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
                with os.fdopen(descriptor, "wb") as handle:
                    handle.write(base64.b64decode(value))
                os.chown(path, account.pw_uid, account.pw_gid)
            prefix = mount["mountPath"].rstrip("/") + "/"
            for variable, value in env.items():
                if value.startswith(prefix):
                    env[variable] = os.path.join(folder, value[len(prefix) :])
        home = account.pw_dir if os.path.isdir(account.pw_dir) else folder
        env.update({k: os.environ[k] for k in KEPT if k in os.environ})
        env.update(HOME=home, USER=account.pw_name, SHELL="/bin/sh")
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        self.procs[name] = subprocess.Popen(
            argv,
            env=env,
            cwd=home,
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.store.patch(
            "pods",
            namespace,
            name,
            {"status": {"phase": "Running", "containerStatuses": [_container({"running": {}})]}},
        )

    def _waiting(self, namespace: str, name: str, reason: str, message: str) -> None:
        waiting = {"reason": reason, **({"message": message} if message else {})}
        self.store.patch(
            "pods",
            namespace,
            name,
            {
                "spec": {"nodeName": "gpu-1"},
                "status": {
                    "phase": "Pending",
                    "containerStatuses": [_container({"waiting": waiting})],
                },
            },
        )

    def _kill(self, name: str) -> None:
        folder = self.folders.pop(name, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        proc = self.procs.pop(name, None)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def _reap(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                del self.procs[name]
                folder = self.folders.pop(name, None)
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
                    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
                    status = {
                        "phase": "Succeeded" if code == 0 else "Failed",
                        "containerStatuses": [_container({"terminated": {"exitCode": code}})],
                    }
                else:
                    status = {"phase": "Failed"}
                for namespace in {k[1] for k in self.store.objects if k[2] == name}:
                    self.store.patch("pods", namespace, name, {"status": status})

    # ------------------------------------------------------------------ life

    def __enter__(self) -> NodeAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for name in list(self.procs):
            self._kill(name)


def _labels(pod: dict[str, Any]) -> dict[str, str]:
    return pod["metadata"].get("labels") or {}


def _container(state: dict[str, Any]) -> dict[str, Any]:
    return {"name": "worker", "ready": "running" in state, "image": "", "imageID": "",
            "restartCount": 0, "state": state}  # fmt: skip


@contextlib.contextmanager
def node_agent(store: Store) -> Iterator[NodeAgent]:
    with NodeAgent(store) as agent:
        yield agent
