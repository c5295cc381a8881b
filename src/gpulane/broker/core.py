"""The embedded broker: owns one machine's GPUs, grants them in policy order, and takes them back.

It runs on one asyncio loop. Every change is saved to the store first, then the
policy is asked who starts next (at once: no polling interval between a job's
end and the next grant), then watchers are told.

It knows nothing of HTTP: a refusal is one of :mod:`gpulane.errors`' kinds
(the server picks the status), and what a client sees of a job is built by
:mod:`gpulane.broker.views`. Leases (pidfds and heartbeats) live in
:mod:`gpulane.broker.leases`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from gpulane.broker import (
    access,
    admission,
    gpu_memory,
    memory_watch,
    pod_leases,
    policy,
    procs,
    shares,
    views,
)
from gpulane.broker.devices import DeviceGuard
from gpulane.broker.explain import QueueExplainer, loop_time, policy_state
from gpulane.broker.gpus import Inventory
from gpulane.broker.groups import GroupReader
from gpulane.broker.hub_auth import HubTokenError
from gpulane.broker.identity import Identity
from gpulane.broker.leases import Leases
from gpulane.broker.metrics import BrokerMetrics
from gpulane.broker.mps_daemons import CHECK_INTERVAL as MPS_CHECK_INTERVAL
from gpulane.broker.mps_daemons import MpsDaemons
from gpulane.broker.quotas import Pruner, SubmitRate
from gpulane.broker.settings import BrokerSettings
from gpulane.broker.store import JobRecord, Store
from gpulane.broker.timers import STORE_RETRY, JobTimers
from gpulane.broker.watchers import Watcher, Watchers
from gpulane.errors import (
    Conflict,
    InvalidRequest,
    NotFound,
    StateFolderFull,
)
from gpulane.jobs import JobState, Request, format_duration
from gpulane.views import Holder, JobEvent, JobView, Snapshot, UsageReport

if TYPE_CHECKING:
    from gpulane.broker.worker_jobs import WorkerJobs

log = logging.getLogger("gpulane.broker")


class Broker:
    def __init__(
        self,
        settings: BrokerSettings,
        inventory: Inventory,
        store: Store,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.config = settings.policy
        # Users' groups, from one source for every way in (serve() gives it the hub).
        self.groups = GroupReader(settings.group_source)
        self.inventory = inventory
        self.store = store
        self.clock = clock
        self.jobs: dict[int, JobRecord] = {}  # queued and running only
        self.usage: dict[str, policy.Usage] = {}
        self.watchers = Watchers()
        self.metrics = BrokerMetrics()
        self.leases = Leases(settings.lease_ttl, loop_time, self._client_gone)
        self.timers = JobTimers(lambda job_id: job_id in self.jobs)
        # Kubernetes GPU servers' pods, followed again after a hub pod restart (app.py sets it).
        self.pods: pod_leases.PodLeases | None = None
        # %%gpu cells' worker pods on Kubernetes (app.py sets it; broker/worker_jobs.py).
        self.workers: WorkerJobs | None = None
        self._publish_handle: asyncio.TimerHandle | None = None
        self._last_publish = 0.0
        # The explanation and the queue's order, kept per state version (every change of
        # jobs or usage passes through _schedule, which bumps it).
        self.explainer = QueueExplainer()
        self.submit_rate = SubmitRate(settings.max_submits_per_minute)
        self.pruner = Pruner(
            store, settings.retention, settings.max_ended_per_user, settings.prune_batch
        )
        self._prune_handle: asyncio.TimerHandle | None = None
        self._schedule_retry: asyncio.TimerHandle | None = None
        self._gone_why: dict[int, str] = {}  # clients gone whose job's end is not saved yet
        self.can_kill_any = os.geteuid() == 0
        # GPU device files open only to holders; app.py closed them all before start().
        self.devices = DeviceGuard(settings.devices)
        # CUDA MPS daemons, one per GPU, where MPS is on; app.py started them before start().
        self.mps = MpsDaemons(settings.mps)
        self._mps_handle: asyncio.TimerHandle | None = None
        # The GPU memory watchdog, where per-process readings exist (NVML or a file).
        reader = memory_watch.reader_for(settings.memory_watch, inventory)
        self.memory = None
        if reader is not None:
            self.memory = memory_watch.MemoryWatch(
                reader,
                settings.memory_watch,
                self.jobs.values,
                self._memory_given,
                self._over_memory,
                lambda job_ids: self._publish(urgent=job_ids),
                lambda: self.devices.enforcing,
            )

    # ----------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Reload state (reattaching live jobs), then schedule. Call inside the running loop."""
        now = self.clock()
        self.usage = {u: policy.Usage(v, at) for u, (v, at) in self.store.usage().items()}
        self.pruner.load()
        for job in self.store.active():
            self.jobs[job.id] = job
            self.leases.beat(job.id)
            client_alive = procs.is_alive(job.client_pid, job.client_start)
            command_alive = procs.is_alive(job.cmd_pid, job.cmd_start)
            if job.state is JobState.QUEUED:
                if job.client_pid and not client_alive:
                    self._finalize(
                        job, JobState.CANCELLED, "its client ended while the broker was down"
                    )
                    continue
            elif not (client_alive or command_alive) and (gone := self._orphan_ends(job)):
                self._finalize(job, JobState.FAILED, gone)
                continue
            elif job.ending_state is not None:
                # Being stopped when the broker died: only the rest of its grace period is left.
                grace = self.settings.kill_grace
                left = (job.ending_at or now) + grace - now
                self.timers.arm(job.id, min(grace, max(0.0, left)), self._force_end)
            else:
                # Stored times are wall time, which may have been stepped back while the
                # broker was down: what is left is never more than the whole limit.
                assert job.started_at is not None
                left = job.started_at + job.time_limit - now
                limit = job.time_limit
                self.timers.arm(job.id, min(limit, max(0.0, left)), self._time_limit_reached)
            if client_alive and job.client_pid:
                self.leases.watch_client(job.client_pid, job.id)
            elif job.state is JobState.RUNNING:
                self._command_keeps_lease(job)
            log.info("reattached job %d (%s, %s)", job.id, job.user, job.state.value)
        self.leases.start()
        if self.memory is not None:
            self.memory.start()
        self.mps.adopt(self.jobs.values(), self._memory_given)  # reattached jobs' MPS clients
        self._schedule()  # opens the GPUs to the reattached jobs' users
        self._check_mps()
        self.devices.sweep()
        self._prune()

    def stop(self) -> None:
        self.leases.stop()
        if self._mps_handle is not None:
            self._mps_handle.cancel()
        self.mps.stop()
        if self.memory is not None:
            self.memory.stop()
        if self._prune_handle is not None:
            self._prune_handle.cancel()
        if self._schedule_retry is not None:
            self._schedule_retry.cancel()
        self.timers.cancel_all()
        self.store.close()

    def capacity_changed(self) -> None:
        """The inventory's count changed (nodes came or went): grant what now fits."""
        self._schedule()

    # ----------------------------------------------------------------- requests

    def submit(self, who: Identity, request: Request) -> JobView:
        time_limit = admission.admit(
            who,
            request,
            admin=self._is_admin(who),
            settings=self.settings,
            inventory=self.inventory,
            groups=self.groups,
            jobs=self.jobs.values(),
        )
        now = self.clock()
        self.submit_rate.check(who.user, now)
        job = JobRecord(
            uid=who.uid,
            user=who.user,
            name=request.name,
            gpus=request.gpus,
            slices=request.slices,
            time_limit=time_limit,
            mem=request.mem,
            gpu_mem=request.gpu_mem,
            command=list(request.command),
            submitted_at=now,
            client_pid=who.pid,
            client_start=procs.start_time(who.pid) if who.pid else None,
            source=who.source,
            detached=request.detached,
        )
        self.store.insert(job)
        self.learn_share_group(who.user, who.groups)
        self.submit_rate.accepted(who.user, now)
        self.jobs[job.id] = job
        self.leases.beat(job.id)
        self.metrics.submitted()
        if who.pid:
            self.leases.watch_client(who.pid, job.id)
        log.info("job %d submitted by %s: %s", job.id, who.user, request.describe())
        self._schedule()
        return self.view(job, who)

    def learn_share_group(self, user: str, groups: Iterable[str]) -> None:
        """Where share groups are the hub's, ``user``'s from the hub groups they came with
        (the hub says who is in a group only when asked about a user)."""
        cfg = self.config
        if not (cfg.group_shares and self.groups.from_hub()):
            return
        group = shares.share_group(groups, cfg.group_shares)
        mapping = shares.with_share_group(cfg.user_groups, user, group)
        if mapping is not None:
            self.config = replace(cfg, user_groups=mapping)
            log.info("%s's share group is now %s", user, group or "none")

    def use_hub_share_groups(self) -> list[str]:
        """Where share groups are the hub's, drop the Unix ones read at start; the users with
        jobs now, whose hub groups to ask for (:meth:`learn_hub_share_groups`)."""
        if not (self.config.group_shares and self.groups.from_hub()):
            return []
        self.config = replace(self.config, user_groups={})
        return sorted({job.user for job in self.jobs.values()})

    async def learn_hub_share_groups(self, users: Iterable[str]) -> None:
        """Ask the hub for each of ``users``' groups (after a restart, for the jobs still
        queued or running); one the hub cannot answer for is learned at their next submit."""
        for user in users:
            try:
                groups = await self.groups.groups_of(user)
            except HubTokenError:
                continue  # logged by hub_auth
            self.learn_share_group(user, groups)
        self._schedule()

    def cancel(self, who: Identity, job_id: int) -> JobView:
        job = self._own_job(who, job_id, admin_ok=True)
        if job.state is JobState.QUEUED:
            self._finalize(job, JobState.CANCELLED, f"cancelled by {who.user}")
        elif job.state is JobState.RUNNING:
            self._revoke(job, JobState.CANCELLED, f"cancelled by {who.user}")
        self.metrics.cancelled()
        return self.view(job, who)

    def heartbeat(self, who: Identity, job_id: int) -> JobView:
        job = self._own_job(who, job_id)
        if job.id in self.jobs:
            self.leases.beat(job.id)
        return self.view(job, who)

    def started(self, who: Identity, job_id: int, pid: int) -> JobView:
        """The client started the job's command as process group ``pid``; the broker may kill it."""
        job = self._own_job(who, job_id)
        if job.state is not JobState.RUNNING:
            raise Conflict(f"job {job_id} is {job.state.value}, not running")
        # Never trust a client-supplied PID blindly: a root broker kills this group later.
        # Only the client's own command qualifies: a group leader below the process that
        # submitted the job (a root client, such as the hub, may start it as any user).
        owner = None if job.uid == 0 else job.uid
        if not job.client_pid or not procs.is_command_of(
            pid, job.client_pid, job.client_start, owner
        ):
            raise InvalidRequest(
                f"process {pid} is not a command of this job's client: it must lead its own "
                "process group, descend from the process that submitted the job"
                + ("" if owner is None else f" and belong to {job.user}")
            )
        cmd_start = procs.start_time(pid)
        # Revoked before its client could register the command (a cancel racing a restart):
        # if that command has ended by itself meanwhile, the revoke never reached it.
        ended_first = job.ending_state is not None and self._command_already_ended(
            job, pid, cmd_start
        )
        self._save_changes(
            job,
            cmd_pid=pid,
            cmd_start=cmd_start,
            ended_before_revoke=job.ended_before_revoke or ended_first,
        )
        if job.ending_state is not None and not ended_first:
            self._signal_job(job, signal.SIGTERM)
        return self.view(job, who)

    def finish(self, who: Identity, job_id: int, exit_status: int) -> JobView:
        job = self._own_job(who, job_id)
        if job.state is JobState.QUEUED:
            self._finalize(job, JobState.CANCELLED, "withdrawn by its client")
        elif job.state is JobState.RUNNING:
            if job.ending_state is not None and not (exit_status == 0 and job.ended_before_revoke):
                self._finalize(job, job.ending_state, job.message, exit_status)
            elif exit_status == 0:
                self._finalize(job, JobState.COMPLETED, "", exit_status)
            else:
                self._finalize(job, JobState.FAILED, views.exit_text(exit_status), exit_status)
        return self.view(job, who)

    def lookup(self, who: Identity, job_id: int) -> JobView:
        return self.view(self._own_job(who, job_id, admin_ok=True), who)

    def watch(self, who: Identity, job_id: int, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher`` with the job's view now and at every change; returns the unsubscribe."""
        job = self._own_job(who, job_id, admin_ok=True)
        watcher(self._event(job, who))
        if job.state.finished:
            return lambda: None
        return self.watchers.add(job_id, watcher, who)

    # ----------------------------------------------------------------- views

    def status(self, who: Identity, offset: int = 0, limit: int | None = None) -> Snapshot:
        """GPUs, running jobs and one page of the queue (``limit`` entries from ``offset``).

        Pages keep an answer's size bounded whatever the queue's length.
        """
        page = self.settings.status_page if limit is None else limit
        if not 0 <= page <= self.settings.max_status_page:
            raise InvalidRequest(
                f"limit must be from 0 to {self.settings.max_status_page}; page through with offset"
            )
        if offset < 0:
            raise InvalidRequest("offset must be 0 or more")
        now = self.clock()
        waiting = self._explain(now)
        holders = self.holders(now)
        spg = self.config.slices_per_gpu
        queue = self.explainer.order(self.jobs.values(), waiting)
        snapshot = views.snapshot(
            now=now,
            user=who.user,
            is_admin=self._is_admin(who),
            slices_per_gpu=spg,
            gpus=[views.gpu_row(r, spg, holders) for r in self.inventory.read()],
            running=[
                self.view(j, who, now) for j in self.jobs.values() if j.state is JobState.RUNNING
            ],
            queue_page=[
                self.view(j, who, now, waiting.get(j.id)) for j in queue[offset : offset + page]
            ],
            queue_total=len(queue),
            queue_offset=offset,
            device_access="enforced" if self.devices.enforcing else self.devices.settings.why_off,
        )
        if self.memory is not None:
            snapshot["strays"] = self.memory.stray_views()
        snapshot["mps"] = self.mps.settings.line()
        return snapshot

    def holders(self, now: float) -> list[Holder]:
        used = self.memory.used if self.memory is not None else None
        return views.holders(self.jobs.values(), now, self.config, self.inventory.memory, used)

    def view(
        self,
        job: JobRecord,
        who: Identity,
        now: float | None = None,
        waiting: policy.Waiting | None = None,
    ) -> JobView:
        view = views.job_view(
            job,
            # Only the owner (the same name from the same source) sees what the job runs.
            viewer=who.user if access.owns(who, job) else "",
            now=self.clock() if now is None else now,
            config=self.config,
            gpu_memory=self.inventory.memory,
            waiting=waiting,
            memory=None if self.memory is None else self.memory.of(job.id),
            mps_env=self.mps.env_for(job.id),
        )
        if self.workers is not None:
            self.workers.annotate(job.id, view)
        return view

    def _event(
        self, job: JobRecord, who: Identity, waiting: policy.Waiting | None = None
    ) -> JobEvent:
        now = self.clock()
        if waiting is None and job.state is JobState.QUEUED:
            waiting = self._explain(now).get(job.id)
        return {"job": self.view(job, who, now, waiting), "holders": self.holders(now), "now": now}

    # ----------------------------------------------------------------- reports

    def usage_report(self, now: float | None = None) -> UsageReport:
        """GPU-seconds per user since local midnight, and GPU use per minute over the last hour."""
        now = self.clock() if now is None else now
        records = {j.id: j for j in self.store.ended_since(views.usage_since(now))}
        records.update(self.jobs)  # the running ones, as they are now
        return views.usage_report(
            records.values(),
            now,
            self.config.slices_per_gpu,
            self.inventory.count,
            gpu_memory.offered(self.inventory.memory, self.config.gpu_mem_reserve),
        )

    def render_metrics(self) -> bytes:
        """Prometheus text for a scrape (``metrics.CONTENT_TYPE``): gauges refreshed from state."""
        running = [j for j in self.jobs.values() if j.state is JobState.RUNNING]
        self.metrics.set_state(
            queue_length=sum(1 for j in self.jobs.values() if j.state is JobState.QUEUED),
            running_jobs=len(running),
            slices_in_use=sum(len(j.assigned_gpus) * (j.assigned_slices or 0) for j in running),
        )
        return self.metrics.render()

    # ----------------------------------------------------------------- scheduling

    def _policy_state(self) -> policy.State:
        return policy_state(
            self.jobs.values(), self.inventory.count, self.usage, self.inventory.memory
        )

    def _explain(self, now: float) -> dict[int, policy.Waiting]:
        """Every queued job's position, reason and estimate (see broker/explain.py)."""
        return self.explainer.explain(self._policy_state, now, self.config, self._publish)

    def _schedule(self) -> None:
        self.explainer.changed()  # every change of jobs or usage ends here
        now = self.clock()
        grants: list[policy.Grant] = []
        # Cheap test first: with every slice taken, a submission or a cancel changes nothing.
        used = sum(
            len(j.assigned_gpus) * (j.assigned_slices or 0)
            for j in self.jobs.values()
            if j.state is JobState.RUNNING
        )
        if used < self.inventory.count * self.config.slices_per_gpu:
            state = self._policy_state()
            if state.queued:
                grants = policy.decide(state, now, self.config)
        granted: set[int] = set()
        for grant in grants:
            job = self.jobs[grant.job_id]
            try:
                self._save_changes(
                    job,
                    state=JobState.RUNNING,
                    started_at=now,
                    assigned_gpus=list(grant.assignment.gpus),
                    assigned_slices=grant.assignment.slices,
                )
            except StateFolderFull:
                # The job stays queued; grants are decided afresh once a save lands.
                if self._schedule_retry is None:
                    self._schedule_retry = asyncio.get_running_loop().call_later(
                        STORE_RETRY, self._retry_schedule
                    )
                break
            granted.add(job.id)
            self.metrics.granted(now - job.submitted_at)
            self.timers.arm(job.id, job.time_limit, self._time_limit_reached)
            log.info("job %d granted to %s on GPU %s", job.id, job.user, job.assigned_gpus)
        # Every grant and every end passes here (_finalize schedules): device access follows.
        self.devices.sync(self.jobs.values())
        self.mps.sync(self.jobs.values(), self._memory_given)  # before the grant is published
        self._publish(urgent=granted)

    def _retry_schedule(self) -> None:
        self._schedule_retry = None
        self._schedule()

    def _publish(self, urgent: set[int] | None = None) -> None:
        """Tell watchers what changed: their own grant or end at once, positions at most every 100 ms."""
        for job_id in urgent or ():
            self._notify(job_id)
        if self._publish_handle is None and self.watchers:
            loop = asyncio.get_running_loop()
            # Replaying a long queue costs time: never spend more than a fifth of it there.
            interval = max(self.settings.publish_interval, 5 * self.explainer.cost)
            wait = max(0.0, self._last_publish + interval - loop.time())
            self._publish_handle = loop.call_later(wait, self._publish_all)

    def _publish_all(self) -> None:
        loop = asyncio.get_running_loop()
        self._publish_handle = None
        self._last_publish = loop.time()
        waiting: dict[int, policy.Waiting] = {}
        watched = list(self.watchers.by_job)
        if any(self.jobs.get(i) and self.jobs[i].state is JobState.QUEUED for i in watched):
            waiting = self._explain(self.clock())
        for job_id in watched:
            self._notify(job_id, waiting)

    def _notify(self, job_id: int, waiting: dict[int, policy.Waiting] | None = None) -> None:
        job = self.jobs.get(job_id) or self.store.get(job_id)
        if job is None:
            return
        waited = (waiting or {}).get(job_id)
        self.watchers.deliver(
            job_id, lambda who: self._event(job, who, waited), finished=job.state.finished
        )

    # ----------------------------------------------------------------- endings

    def _revoke(self, job: JobRecord, state: JobState, message: str) -> None:
        """Take a running job's GPU back: its client is told, its processes get SIGTERM, then SIGKILL."""
        if job.ending_state is not None:
            return
        # Its command may have ended by itself just before the revoke came: a success its
        # client is about to report then stays a success (finish); anything else ends as
        # revoked. Saved with the revoke, so a broker restart in between keeps it.
        ended_first = self._command_already_ended(job, job.cmd_pid, job.cmd_start)
        self._save_changes(
            job,
            ending_state=state,
            message=message,
            ending_at=self.clock(),
            ended_before_revoke=ended_first,
        )
        log.info("job %d of %s revoked: %s", job.id, job.user, message)
        self._signal_job(job, signal.SIGTERM)
        self.timers.arm(job.id, self.settings.kill_grace, self._force_end)
        self._publish(urgent={job.id})

    def _command_already_ended(self, job: JobRecord, pid: int | None, started: str | None) -> bool:
        # Judged only where the broker could have stopped the command itself.
        return bool(pid) and self._may_signal(job) and not procs.is_alive(pid, started)

    def _force_end(self, job_id: int) -> None:
        """The grace period is over: kill what is left and free the GPU, reported or not."""
        job = self.jobs.get(job_id)
        if job is None or job.ending_state is None:
            return
        self._signal_job(job, signal.SIGKILL)
        self._finalize(job, job.ending_state, job.message)

    def _memory_given(self, job: JobRecord) -> int | None:
        return views.memory_limit(job, self.config, self.inventory.memory)

    def _check_mps(self) -> None:
        """Start again any MPS daemon that died, every few seconds while MPS is on."""
        if not self.mps.enabled:
            return
        self.mps.check()
        self._mps_handle = asyncio.get_running_loop().call_later(
            MPS_CHECK_INTERVAL, self._check_mps
        )

    def _over_memory(self, job_id: int, message: str) -> None:
        """The watchdog's end: over its GPU memory for longer than the grace."""
        job = self.jobs.get(job_id)
        if job is not None and job.state is JobState.RUNNING:
            self._revoke(job, JobState.FAILED, message)

    def _time_limit_reached(self, job_id: int) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.state is not JobState.RUNNING:
            return
        self.metrics.timed_out()
        limit = format_duration(job.time_limit)
        self._revoke(
            job, JobState.TIMEOUT, f"GPU time limit {limit} reached; ask for more with --time"
        )

    def _client_gone(self, job_id: int, why: str) -> None:
        job = self.jobs.get(job_id)
        if job is not None and self._command_keeps_lease(job):
            return
        if job is not None and self.workers is not None and job_id in self.workers.keepers:
            # A %%gpu cell's kernel is gone: its worker pod is deleted (SIGTERM to its keeper,
            # which a SIGKILL would leave running), then the end follows the keeper's exit.
            self._revoke(job, JobState.FAILED, why)
            return
        # The first reason is kept while the end cannot be saved: a lease that runs out
        # meanwhile must not reword a client's exit.
        why = self._gone_why.setdefault(job_id, why)
        try:
            self._end_for_client(job_id, why)
        except StateFolderFull:
            # The job stays as saved; a pidfd fires once, so try again on a timer.
            self.timers.arm(job_id, STORE_RETRY, lambda j: self._client_gone(j, why))
            return
        self._gone_why.pop(job_id, None)

    def _command_keeps_lease(self, job: JobRecord) -> bool:
        """A detached job's lease passes to its command when its client is gone (a hub
        restarting under a GPU-profile server): True if the broker now watches the command."""
        if not (job.detached and job.state is JobState.RUNNING and job.ending_state is None):
            return False
        if not job.cmd_pid or not procs.is_alive(job.cmd_pid, job.cmd_start):
            return False
        if not self.leases.watch_command(job.cmd_pid, job.id):
            return False  # not visible to the broker: its client's lease rules still apply
        log.info(
            "job %d: its client is gone; its command (process %d) holds the GPU now",
            job.id,
            job.cmd_pid,
        )
        return True

    def _orphan_ends(self, job: JobRecord) -> str:
        """Why a job whose processes all ended while the broker was down ends; "" if it goes
        on: a Kubernetes GPU server whose keeper died with the hub pod, its pod still
        running, gets a new keeper (broker/pod_leases.py) and the normal path applies again."""
        adopted = None if self.pods is None else self.pods.adopt(job)
        if isinstance(adopted, pod_leases.End):
            return adopted.why
        if adopted is None:
            return "its processes ended while the broker was down"
        self._save_changes(job, cmd_pid=adopted[0], cmd_start=adopted[1])
        if job.ending_state is not None:
            self._signal_job(job, signal.SIGTERM)  # revoked before: the keeper deletes the pod
        return ""

    def _end_for_client(self, job_id: int, why: str) -> None:
        job = self.jobs.get(job_id)
        if job is None:
            return
        if job.state is JobState.QUEUED:
            self._finalize(job, JobState.CANCELLED, why)
        elif (
            job.detached
            and job.ending_state is None
            and job.cmd_pid
            and not procs.is_alive(job.cmd_pid, job.cmd_start)
        ):
            # Its command ended after its client had left: its normal end, status unknown.
            self._signal_job(job, signal.SIGKILL)  # what it left behind in its group
            self._finalize(
                job,
                JobState.COMPLETED,
                "its command ended after its client had gone (exit status unknown)",
            )
        else:
            # Nobody is left to clean up or to be told: end the command at once.
            self._signal_job(job, signal.SIGKILL)
            self._finalize(job, job.ending_state or JobState.FAILED, job.message or why)

    def _finalize(
        self, job: JobRecord, state: JobState, message: str, exit_status: int | None = None
    ) -> None:
        now = self.clock()
        used: policy.Usage | None = None
        gpu_seconds = 0.0
        if job.state is JobState.RUNNING and job.started_at is not None:
            share = policy.gpu_share(
                policy.Assignment(tuple(job.assigned_gpus), job.assigned_slices or 0, job.gpu_mem),
                self.config.slices_per_gpu,
                gpu_memory.offered(self.inventory.memory, self.config.gpu_mem_reserve),
            )
            gpu_seconds = share * max(0.0, now - job.started_at)
            half_life = self.config.half_life
            used = self.usage.get(job.user, policy.Usage()).add(
                policy.run_usage(share, now - job.started_at, half_life), now, half_life
            )
        changes: dict[str, Any] = {
            "state": state,
            "message": message,
            "ended_at": now,
            "exit_status": exit_status,
            "ending_state": None,
        }
        # The usage and the end in one transaction, saved before either is applied here:
        # a failure (an integer SQLite cannot hold) leaves the job running, its lease and
        # timer in place, instead of half-finished.
        # Applied only after COMMIT: inside the transaction a save only reaches SQLite's cache,
        # and the COMMIT is what fails on a full disk.
        with self.store.transaction():
            if used is not None:
                self.store.save_usage(job.user, used.value, used.at)
            self.store.save(replace(job, **changes))
        for name, value in changes.items():
            setattr(job, name, value)
        if used is not None:
            self.usage[job.user] = used
            self.metrics.used(job.user, gpu_seconds)
        self.jobs.pop(job.id, None)
        self.pruner.job_ended(job.user)
        self.leases.end(job.id, job.client_pid, job.cmd_pid)
        self.timers.cancel(job.id)
        log.info("job %d of %s ended: %s %s", job.id, job.user, state.value, message)
        self._schedule()
        self._publish(urgent={job.id})

    def _signal_job(self, job: JobRecord, sig: signal.Signals) -> None:
        if self.workers is not None and self.workers.signal(job.id, sig):
            return  # a worker pod's keeper is the broker's own child, whoever the job's user
        if job.cmd_pid and self._may_signal(job):
            procs.signal_group(job.cmd_pid, job.cmd_start, sig)

    def _may_signal(self, job: JobRecord) -> bool:
        # Only where the broker may: as root, or when the job runs as the broker's own user.
        return self.can_kill_any or job.uid == os.geteuid()

    # ----------------------------------------------------------------- retention

    def _prune(self) -> None:
        """Delete a batch of ended jobs; a full batch asks for another step soon, so a
        backlog drains without one long delete holding up leases or requests."""
        backlog = False
        try:
            backlog = self.pruner.step(self.clock())
        except StateFolderFull:
            pass  # the store logged it; the next step tries again
        except Exception:
            log.exception("pruning ended jobs failed; trying again later")
        again = 1.0 if backlog else self.settings.prune_interval
        self._prune_handle = asyncio.get_running_loop().call_later(again, self._prune)

    # ----------------------------------------------------------------- helpers

    def _save_changes(self, job: JobRecord, **changes: Any) -> None:
        """Save ``job`` with ``changes``, then apply them: a failed save leaves it as it was."""
        self.store.save(replace(job, **changes))
        for name, value in changes.items():
            setattr(job, name, value)

    def _is_admin(self, who: Identity) -> bool:
        return access.is_admin(who, self.config, self.settings.admin_users)

    def _own_job(self, who: Identity, job_id: int, admin_ok: bool = False) -> JobRecord:
        """The job, if ``who`` drives it (or, where ``admin_ok``, owns it or is an admin).

        Anything else reads as no job at all: another user's jobs are unseen, not forbidden.
        """
        job = self.jobs.get(job_id) or self.store.get(job_id)
        if job is not None and access.owns(who, job, lease=not admin_ok):
            return job
        if job is not None and admin_ok and self._is_admin(who):
            return job
        raise NotFound(f"no job {job_id}")
