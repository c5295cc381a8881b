"""KubeSpawner whose GPU profiles wait in the broker's queue, not in ``Pending``.

``c.JupyterHub.spawner_class = "gpulane.hub.kube_spawner.GpulaneKubeSpawner"`` (with
``configure_kubespawner`` for the profile list and the broker on the cluster's GPUs,
``GpulaneHub.gpu_source = "k8s"``). A CPU profile is plain KubeSpawner. A GPU profile:

1. takes a lease from the broker for the profile's GPUs or slices before any pod
   exists; while it waits, the spawn page shows its place, the start estimate and
   who holds the GPUs, in the words of the local GPU-profile spawner;
2. on the grant creates the pod, labelled with the lease (``gpulane.io/lease``: the
   broker's capacity reader does not count it as someone else's GPU pod), and once
   the pod runs starts :mod:`gpulane.hub.pod_keeper` as the lease's command;
3. the lease ends when the pod ends: the server stopped, culled, failed or deleted
   by hand; the keeper outlives the hub process, so a hub restart keeps the lease.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import AsyncIterator
from typing import Any

from kubespawner import KubeSpawner

from gpulane.broker.k8s_capacity import LEASE_LABEL
from gpulane.broker.pod_leases import KEEPER_ENV, keeper_argv, pod_command
from gpulane.config import JOB_ID_ENV
from gpulane.hub.gpu_lease import (
    LeaseSettings,
    ServerLease,
    restored_lease_ended,
    server_request,
)
from gpulane.hub.kube import check_user_options, user_groups
from gpulane.profiles import Profile
from gpulane.scheduler.base import CommandProcess
from gpulane.scheduler.embedded import BrokerScheduler
from gpulane.scheduler.spawn import spawn_command


def lease_labels(job_id: int | None) -> dict[str, str]:
    """The labels a GPU server's pod carries: its lease, which the broker's capacity skips."""
    return {} if job_id is None else {LEASE_LABEL: str(job_id)}


class GpulaneKubeSpawner(LeaseSettings, KubeSpawner):  # type: ignore[misc]
    def chosen_profile(self) -> Profile:
        """The profile of this spawn, checked again against the user's groups."""
        return check_user_options(self.profile_set(), user_groups(self), self.user_options)

    # ------------------------------------------------------------------ start and stop

    async def run_pre_spawn_hook(self) -> None:
        hooked = super().run_pre_spawn_hook()  # configure_kubespawner's checks first
        if inspect.isawaitable(hooked):
            await hooked
        self.prepare_lease()

    def start(self) -> Any:
        lease = self._lease
        if lease is None:
            return super().start()  # a CPU profile: KubeSpawner as it is
        return asyncio.ensure_future(self._start_in_turn(lease))

    async def _start_in_turn(self, lease: ServerLease) -> Any:
        profile = self.chosen_profile()

        async def start_server(grant_env: dict[str, str]) -> Any:
            self._job_id = lease.job_id
            # The pod's own time to run, not the queue's: a pod stuck Pending gives up.
            self.start_timeout = self._own_start_timeout
            return await KubeSpawner.start(self)

        def keeper() -> CommandProcess:
            env = {k: os.environ[k] for k in KEEPER_ENV if k in os.environ}
            argv = keeper_argv(self.namespace, self.pod_name, str(self.pod_id or ""))
            # Not killed with the hub: the broker follows it once the hub is gone.
            return spawn_command(argv, env, death_signal=None)

        request = server_request(
            profile, self.session_time, pod_command(self.namespace, self.pod_name)
        )
        # The server's own hub token names the user to the broker.
        scheduler = BrokerScheduler(self.broker_socket, token=self.api_token)
        return await lease.hold(
            scheduler, request, start_server, keeper, self._own_start_timeout + 60, self.user.name
        )

    async def poll(self) -> int | None:
        status: int | None = await super().poll()
        if status is not None or self._lease is not None or self._job_id is None:
            return status
        # Found running after a hub restart: its lease is the broker's to keep (a keeper,
        # or a new one after a hub pod restart). A pod whose lease has ended must not keep
        # a GPU the broker offers again: the hub stops the server, which deletes the pod.
        ended = await asyncio.to_thread(
            restored_lease_ended, self.broker_socket, self._job_id, self.log
        )
        if ended is None:
            return None
        self.log.warning("gpulane: %s's GPU lease %s; stopping the server", self.user.name, ended)
        # The hub stops only servers its poll finds running: delete the pod here.
        await KubeSpawner.stop(self, now=True)
        self._job_id = None
        return 1

    async def get_pod_manifest(self) -> Any:
        pod = await super().get_pod_manifest()
        if self._lease is not None and self._job_id is not None:
            from kubernetes_asyncio.client import V1EnvVar

            pod.metadata.labels = {**(pod.metadata.labels or {}), **lease_labels(self._job_id)}
            for container in pod.spec.containers[:1]:
                container.env = [*(container.env or []), V1EnvVar(JOB_ID_ENV, str(self._job_id))]
        return pod

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        lease = self._lease
        if lease is not None:
            async for event in lease.progress():
                yield event
            if lease.started.done():
                return
        async for event in super().progress():  # the pod's own events
            yield event
