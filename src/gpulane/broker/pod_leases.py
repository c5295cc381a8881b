"""Kubernetes GPU servers whose lease outlived every process that carried it.

A GPU-profile server's lease is carried by a pod keeper (:mod:`gpulane.hub.pod_keeper`),
a process in the hub pod. When the hub *pod* restarts (``helm upgrade``) the keeper dies
with it, while the user's pod keeps running on its GPU. The restarting broker then finds
the job's client and command gone; before ending the lease it asks here whether the
job's pod still runs, and if so starts a new keeper for it: from then on the lease
follows the normal path (the keeper exits when the pod ends; a revoke's SIGTERM makes
it delete the pod), and it survives the next broker restart the same way.

Which pod a job stands for is never taken from a label alone: a user who may create
pods somewhere could label one. A job qualifies only if

- it is a detached, running job whose command is the spawner's ``kubernetes-pod NS/NAME``;
- ``NS`` is the hub's own namespace (``--k8s-namespace``, by default the service
  account's), where only the hub's service account creates pods on z2jh;
- that pod exists there, carries ``gpulane.io/lease=<this job's id>`` (set by the
  spawner on the pod it created for this very lease) and has not finished.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpulane.broker import procs
from gpulane.broker.k8s_capacity import LEASE_LABEL
from gpulane.broker.store import JobRecord
from gpulane.jobs import JobState

log = logging.getLogger("gpulane.broker")

POD_COMMAND = "kubernetes-pod"  # the first word of a Kubernetes GPU server's job command
FINISHED_PHASES = frozenset({"Succeeded", "Failed"})
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
# What a pod keeper needs of its starter's environment: how to reach the API, nothing more.
KEEPER_ENV = (
    "PATH",
    "PYTHONPATH",
    "LANG",
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
)


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str


@dataclass(frozen=True)
class Follow:
    """The pod runs: a keeper follows it (``uid``: never a successor of the same name)."""

    uid: str


@dataclass(frozen=True)
class End:
    """The lease ends; ``why`` is the job's message."""

    why: str


def pod_command(namespace: str, name: str) -> tuple[str, ...]:
    """The job command a Kubernetes GPU server's lease is submitted with."""
    return (POD_COMMAND, f"{namespace}/{name}")


def keeper_argv(namespace: str, pod: str, uid: str) -> list[str]:
    """The lease's command: a process that lives as long as the pod (see pod_keeper)."""
    return [sys.executable, "-m", "gpulane.hub.pod_keeper",
            "--namespace", namespace, "--pod", pod, "--uid", uid]  # fmt: skip


def keeper_env(kubeconfig: str = "") -> dict[str, str]:
    """A pod keeper's environment: this process's ways to the API (and ``kubeconfig``)."""
    env = {k: os.environ[k] for k in KEEPER_ENV if k in os.environ}
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    return env


def pod_of(job: JobRecord) -> PodRef | None:
    """The pod a running detached job stands for, by its command; None for any other job."""
    if not (job.detached and job.state is JobState.RUNNING) or len(job.command) != 2:
        return None
    word, where = job.command
    namespace, _, name = where.partition("/")
    if word != POD_COMMAND or not namespace or not name or "/" in name:
        return None
    return PodRef(namespace, name)


def decide(job_id: int, ref: PodRef, pod: Mapping[str, Any] | None, namespace: str) -> Follow | End:
    """Whether the lease of job ``job_id`` goes on following ``pod`` (read from the API, None:
    not found), the hub's namespace being ``namespace``. Pure."""
    down = "while the broker was down"
    if ref.namespace != namespace:
        return End(f"its processes ended {down} (its pod is outside the hub's namespace)")
    if pod is None:
        return End(f"its pod {ref.namespace}/{ref.name} was gone {down}")
    metadata = pod.get("metadata") or {}
    if str((metadata.get("labels") or {}).get(LEASE_LABEL, "")) != str(job_id):
        return End(f"its processes ended {down} (pod {ref.name} is not this lease's)")
    phase = (pod.get("status") or {}).get("phase")
    if phase in FINISHED_PHASES:
        return End(f"its pod {ref.namespace}/{ref.name} ended ({phase}) {down}")
    return Follow(str(metadata.get("uid") or ""))


def hub_namespace(option: str) -> str:
    """The namespace whose pods may carry leases: the option, else the service account's."""
    if option:
        return option
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        return ""


class PodLeases:
    """Starts pod keepers for the jobs whose pods outlived their keepers (at broker start)."""

    def __init__(self, core: Any, serialize: Any, namespace: str, kubeconfig: str = "") -> None:
        self._core = core
        self._serialize = serialize
        self.namespace = namespace
        self._env = keeper_env(kubeconfig)

    def read(self, ref: PodRef) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            pod = self._core.read_namespaced_pod(ref.name, ref.namespace, _request_timeout=30)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        found: dict[str, Any] = self._serialize(pod)
        return found

    def adopt(self, job: JobRecord) -> tuple[int, str | None] | End | None:
        """A new keeper's pid and start time if the job's pod runs, an End if its lease is
        over, None if the job is no Kubernetes server's (or the API could not say)."""
        ref = pod_of(job)
        if ref is None:
            return None
        try:
            pod = self.read(ref)
        except Exception as error:  # no answer is no evidence either way: the old rules apply
            log.warning("job %d: pod %s/%s not read: %s", job.id, ref.namespace, ref.name, error)
            return None
        verdict = decide(job.id, ref, pod, self.namespace)
        if isinstance(verdict, End):
            return verdict
        # Its own process group (the broker signals the group) and no death signal: it
        # outlives a broker restart as the hub's keeper outlives a hub restart.
        proc = subprocess.Popen(
            keeper_argv(ref.namespace, ref.name, verdict.uid),
            env=self._env,
            stdin=subprocess.DEVNULL,
            process_group=0,
        )
        # Reaped when it exits, so that it reads as ended (a zombie counts as gone).
        threading.Thread(target=proc.wait, daemon=True, name=f"keeper-{job.id}").start()
        log.info(
            "job %d: its pod %s/%s still runs; pod keeper %d follows it",
            job.id,
            ref.namespace,
            ref.name,
            proc.pid,
        )
        return proc.pid, procs.start_time(proc.pid)
