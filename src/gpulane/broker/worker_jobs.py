"""``%%gpu`` cells on Kubernetes: on a grant the broker starts the cell's worker pod itself.

The kernel (in a CPU-only user pod) queues its cell as on one machine; once the job runs
it asks ``POST /v1/jobs/ID/worker`` with two things only: the address its kernel listens
on for the worker and the one-time key the worker must prove (never shown, logged or put
in argv or environment). The broker then:

1. looks up the caller's own running server pod (by the name the hub or the socket
   vouched for, :func:`~gpulane.broker.worker_pods.users_server`) and refuses an address
   that is not on that pod;
2. creates the worker pod (:mod:`gpulane.broker.worker_pods`: the server's image and
   claims, the admin's GPU resource and node selector) and the key's Secret, owned by
   the pod;
3. starts a pod keeper (:mod:`gpulane.hub.pod_keeper` with ``--worker-secret``) as the
   job's command: it reports the pod's phases (shown on the job's view as ``pod``), and
   its exit, the container's status, ends the job; a revoke (cancel, the time limit, the
   kernel gone) sends it SIGTERM, and it deletes the pod and the Secret.

A user may ask for nothing else: no image, no volume, no namespace, no other job's pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import IO, TYPE_CHECKING, Any

from gpulane.broker import procs, worker_pods
from gpulane.broker.identity import Identity
from gpulane.broker.pod_leases import keeper_env
from gpulane.errors import Conflict, InvalidRequest, Unavailable
from gpulane.jobs import JobState
from gpulane.views import JobView

if TYPE_CHECKING:
    from gpulane.broker.core import Broker
    from gpulane.broker.store import JobRecord

log = logging.getLogger("gpulane.broker")

MAX_PHASE_LINE = 4096  # a keeper's line longer than this is not a phase (cut, not kept)
_STARTED = ("running", "succeeded", "failed")  # phases (worker_pods.phase_text) past the start


class WorkerLauncher:
    """The API side: find the user's server, create the worker pod and its Secret."""

    def __init__(
        self, core: Any, serialize: Any, settings: worker_pods.WorkerPodSettings, kubeconfig: str
    ) -> None:
        self._core = core
        self._serialize = serialize
        self.settings = settings
        self._env = keeper_env(kubeconfig)

    def create(self, job: JobRecord, env: dict[str, str], connect: object, key: bytes) -> str:
        """Create the pod and the Secret (blocking: call in a thread); the pod's uid."""
        namespace = self.settings.namespace
        listed = self._core.list_namespaced_pod(
            namespace, label_selector=worker_pods.server_selector(job.user), _request_timeout=30
        )
        server = worker_pods.users_server(self._serialize(listed).get("items") or [], job.user)
        if server is None:
            raise InvalidRequest(
                f"no running server of {job.user} in namespace {namespace}: a %%gpu worker "
                "connects back only to your own server"
            )
        spec = worker_pods.WorkerJob(
            job_id=job.id,
            user=job.user,
            gpus=job.gpus,
            slices=job.slices,
            time_limit=job.time_limit,
            env=env,
            connect=worker_pods.check_connect(connect, server),
        )
        made = self._serialize(
            self._core.create_namespaced_pod(
                namespace, worker_pods.worker_pod(spec, server, self.settings), _request_timeout=30
            )
        )
        uid = str(made["metadata"]["uid"])
        try:
            self._core.create_namespaced_secret(
                namespace, worker_pods.worker_secret(spec, key, uid, namespace), _request_timeout=30
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self._core.delete_namespaced_pod(
                    worker_pods.pod_name(job.id), namespace, _request_timeout=30
                )
            raise
        log.info("job %d: worker pod %s/%s created", job.id, namespace, made["metadata"]["name"])
        return uid

    def delete(self, job_id: int) -> None:
        """Delete the worker pod and its Secret (blocking): where its keeper could not."""
        namespace = self.settings.namespace
        for call, name in (
            (self._core.delete_namespaced_pod, worker_pods.pod_name(job_id)),
            (self._core.delete_namespaced_secret, worker_pods.secret_name(job_id)),
        ):
            try:
                call(name, namespace, _request_timeout=30)
            except Exception as error:
                if getattr(error, "status", None) != 404:
                    log.warning("job %d: %s/%s not deleted: %s", job_id, namespace, name, error)

    def keeper(self, job_id: int, uid: str) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-m", "gpulane.hub.pod_keeper",
                "--namespace", self.settings.namespace, "--pod", worker_pods.pod_name(job_id),
                "--uid", uid, "--worker-secret", worker_pods.secret_name(job_id)]  # fmt: skip
        return subprocess.Popen(
            argv,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            process_group=0,  # the broker signals the group; no death signal: it cleans up
        )


class WorkerJobs:
    """The broker's side: which jobs have a worker pod, its phase, and its end."""

    def __init__(
        self, broker: Broker, launcher: WorkerLauncher, start_timeout: float = 600.0
    ) -> None:
        self.broker = broker
        self.launcher = launcher
        # A pod not running this long after its creation ends its job (an image that cannot
        # be pulled, no node that fits): the GPU is not held for a pod that never starts.
        self.start_timeout = start_timeout
        self._deadlines: dict[int, asyncio.TimerHandle] = {}
        self.phases: dict[int, str] = {}
        self.keepers: dict[int, subprocess.Popen[bytes]] = {}
        self._starting: set[int] = set()
        # A keeper takes signals once it said its first line (before, one would kill it
        # before it could delete the pod): what is sent earlier waits here.
        self._ready: set[int] = set()
        self._held: dict[int, signal.Signals] = {}

    async def start(self, who: Identity, job_id: int, connect: object, key: object) -> JobView:
        broker = self.broker
        job = broker._own_job(who, job_id)  # the job's own client only
        secret = worker_pods.check_key(key)
        if job.detached:
            raise InvalidRequest(f"job {job_id} is detached: a worker pod is for a %%gpu cell")
        if job.state is not JobState.RUNNING or job.ending_state is not None:
            raise Conflict(f"job {job_id} is {job.state.value}, not running")
        if job.cmd_pid or job_id in self._starting or job_id in self.keepers:
            raise Conflict(f"job {job_id} has its worker pod already")
        from gpulane.scheduler.embedded import job_environment

        env = job_environment(broker.view(job, who))
        self._starting.add(job_id)
        self.phases[job_id] = "creating its pod"
        try:
            uid = await asyncio.to_thread(self.launcher.create, job, env, connect, secret)
            keeper = self.launcher.keeper(job_id, uid)
        except Exception as error:
            self.phases.pop(job_id, None)
            if isinstance(error, InvalidRequest | Conflict):
                raise
            log.warning("job %d: the worker pod was not created: %s", job_id, error)
            raise Unavailable(f"the worker pod was not created: {_short(error)}") from None
        finally:
            self._starting.discard(job_id)
        self.keepers[job_id] = keeper
        loop = asyncio.get_running_loop()
        assert keeper.stdout is not None
        threading.Thread(
            target=self._follow, args=(loop, job_id, keeper, keeper.stdout), daemon=True,
            name=f"worker-keeper-{job_id}",
        ).start()  # fmt: skip
        self._deadlines[job_id] = loop.call_later(self.start_timeout, self._not_started, job_id)
        live = broker.jobs.get(job_id)
        if live is None or live.ending_state is not None:
            self.signal(job_id, signal.SIGTERM)  # revoked while its pod was made
        else:
            broker._save_changes(live, cmd_pid=keeper.pid, cmd_start=procs.start_time(keeper.pid))
        broker._publish(urgent={job_id})
        return broker.view(live or job, who)

    def _follow(
        self,
        loop: asyncio.AbstractEventLoop,
        job_id: int,
        keeper: subprocess.Popen[bytes],
        out: IO[bytes],
    ) -> None:
        """The keeper's phase lines, then its exit, handed to the broker's loop."""
        for line in iter(lambda: out.readline(MAX_PHASE_LINE), b""):
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                text = str(json.loads(line)["phase"])[:300]
                loop.call_soon_threadsafe(self._phase, job_id, text)
        out.close()
        status = keeper.wait()
        loop.call_soon_threadsafe(self._ended, job_id, keeper, status)

    def _phase(self, job_id: int, text: str) -> None:
        if job_id not in self.keepers:
            return
        if job_id not in self._ready:
            self._ready.add(job_id)
            held = self._held.pop(job_id, None)
            if held is not None:
                self.signal(job_id, held)
        self.phases[job_id] = text
        if text.startswith(_STARTED):
            self._cancel_deadline(job_id)
        self.broker._publish(urgent={job_id})

    def _not_started(self, job_id: int) -> None:
        self._deadlines.pop(job_id, None)
        job = self.broker.jobs.get(job_id)
        if job is None or job.state is not JobState.RUNNING or job.ending_state is not None:
            return
        from gpulane.jobs import format_duration

        phase = self.phases.get(job_id, "")
        self.broker._revoke(
            job,
            JobState.FAILED,
            f"its worker pod did not start within {format_duration(self.start_timeout)}"
            + (f" ({phase})" if phase else ""),
        )

    def _cancel_deadline(self, job_id: int) -> None:
        handle = self._deadlines.pop(job_id, None)
        if handle is not None:
            handle.cancel()

    def _ended(self, job_id: int, keeper: subprocess.Popen[bytes], status: int) -> None:
        if self.keepers.get(job_id) is not keeper:
            return
        del self.keepers[job_id]
        self._cancel_deadline(job_id)
        self._ready.discard(job_id)
        self._held.pop(job_id, None)
        why = self.phases.pop(job_id, "")
        job = self.broker.jobs.get(job_id)
        if job is None or job.state is not JobState.RUNNING:
            return
        log.info("job %d: its worker pod ended (%s), exit status %d", job_id, why, status)
        # As its client would report it (the client is told by the job's end).
        owner = Identity(job.uid, job.user, frozenset(), None, source=job.source or "peercred")
        self.broker.finish(owner, job_id, status)

    def signal(self, job_id: int, sig: signal.Signals) -> bool:
        """Signal the job's keeper (SIGTERM: it deletes the pod); False if it has none."""
        keeper = self.keepers.get(job_id)
        if keeper is None:
            return False
        if job_id not in self._ready and sig != signal.SIGKILL:
            self._held[job_id] = sig
            return True
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(keeper.pid, sig)
        if sig == signal.SIGKILL:  # the keeper deletes nothing now: the broker does
            threading.Thread(target=self.launcher.delete, args=(job_id,), daemon=True).start()
        return True

    def annotate(self, job_id: int, view: JobView) -> None:
        """The worker pod's phase on the job's view ("pulling image on node gpu-2")."""
        if job_id in self.phases:
            view["pod"] = self.phases[job_id]


def _short(error: BaseException) -> str:
    reason = getattr(error, "reason", None)
    status = getattr(error, "status", None)
    if status is not None:
        return f"the API answered {status} {reason or ''}".strip()
    return str(error).splitlines()[0][:200] if str(error) else type(error).__name__
