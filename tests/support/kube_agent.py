"""A test-side node agent for the loopback Kubernetes API: it runs the pods that are created.

For each single-user pod that appears in the emulator's store it starts the pod's
container command as a local process, as the Unix user the pod is for (its
``JUPYTERHUB_USER``), with the pod's environment, listening on a loopback address of
its own (127.0.0.N: each pod has its own IP, as on a cluster); it reports the pod
Running with that ``podIP`` once the process started, Failed if the process exits by
itself, and stops the process when the pod is deleted. Tests only: it trusts the pod.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse, urlunparse

from tests.support.kube_api import Store

KEPT = ("PATH", "LANG")


class NodeAgent:
    def __init__(self, store: Store, selector: str = "component=singleuser-server") -> None:
        self.store = store
        self.selector = selector
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # pod name -> its process
        self.created: list[str] = []  # pod names in the order they appeared
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
                elif event == "DELETED":
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

    def _kill(self, name: str) -> None:
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
                for namespace in {k[1] for k in self.store.objects if k[2] == name}:
                    self.store.patch("pods", namespace, name, {"status": {"phase": "Failed"}})

    # ------------------------------------------------------------------ life

    def __enter__(self) -> NodeAgent:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for name in list(self.procs):
            self._kill(name)


@contextlib.contextmanager
def node_agent(store: Store) -> Iterator[NodeAgent]:
    with NodeAgent(store) as agent:
        yield agent
