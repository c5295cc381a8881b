"""What the broker shows of its state: pure functions from job records and settings to views.

The state machine (:mod:`gpulane.broker.core`) decides; these only describe, so
the wire format (:mod:`gpulane.views`) is built in one place and tested alone.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable, Mapping

from gpulane.broker.gpu_memory import offered
from gpulane.broker.gpus import GpuReading
from gpulane.broker.policy import PolicyConfig, Waiting
from gpulane.broker.store import JobRecord
from gpulane.broker.usage import busy_per_minute, gpu_seconds_by_user, local_midnight
from gpulane.jobs import JobState, format_duration
from gpulane.views import GpuRow, Holder, JobView, Snapshot, UsageReport


def memory_limit(job: JobRecord, config: PolicyConfig, gpu_memory: int) -> int | None:
    """The bytes of GPU memory a job may use on a shared GPU: its ``--gpu-mem``, or for
    slices what they declare (the GPU's offer, its total less the reserve, times s/K:
    gpu_memory.py); None for whole GPUs (no cap)."""
    if job.gpu_mem is not None:
        return job.gpu_mem
    if not job.slices or config.slices_per_gpu <= 1 or not gpu_memory:
        return None
    return offered(gpu_memory, config.gpu_mem_reserve) * job.slices // config.slices_per_gpu


def memory_fraction(job: JobRecord, config: PolicyConfig, gpu_memory: int) -> float | None:
    """The limit as a fraction of the card's total, which PyTorch and XLA are told."""
    limit = memory_limit(job, config, gpu_memory)
    if limit is None or gpu_memory <= 0:
        return None
    if job.gpu_mem is None:
        share = job.slices / config.slices_per_gpu
        offer = offered(gpu_memory, config.gpu_mem_reserve)
        return share if offer == gpu_memory else share * offer / gpu_memory
    return min(1.0, limit / gpu_memory)


def reason_text(reason: str, config: PolicyConfig) -> str:
    """A waiting reason (policy's word) in the user's words; an unknown word as it is."""
    return {
        "resources": "waiting for a GPU to free up",
        "priority": "jobs submitted earlier are ahead",
        "fair_share": "fair share: users with less recent GPU time go first",
        "user_cap": f"per-user cap: you already run {config.max_running_per_user} job(s)",
        "held": "this job has waited longest: the GPUs it needs are held for it",
        "reserved": (
            "GPUs are held for a job that has waited over "
            f"{format_duration(config.starvation_after)}"
        ),
        "over_share": (
            "you already hold your part of the GPUs while other users wait: "
            "users below their part start first"
        ),
        "draining": (
            "GPUs are freeing up for a user below their part of the machine: "
            "this job fits now but would still be running when they are due"
        ),
        "never_fits": "this request is larger than any free GPU set here",
    }.get(reason, reason)


def gpu_hours(seconds: float | None) -> str:
    return f"{(seconds or 0.0) / 3600:.1f}"


def _used(usage: float | None, share: float | None, shares_differ: bool) -> str:
    text = gpu_hours(usage)
    return f"{text} on a share of {share:g}" if shares_differ and share is not None else text


def waiting_text(waiting: Waiting, config: PolicyConfig, owner: str, you: bool, now: float) -> str:
    """Why the job waits, with its fair-share standing, as its owner (``you``) or another
    user reads it: "alice has used 3.2 GPU-hours recently, you 0.4: you go first"."""
    me = "you" if you else owner
    base = reason_text(waiting.reason, config)
    other = waiting.other_user
    differ = waiting.share != waiting.other_share
    mine = _used(waiting.usage, waiting.share, differ)
    theirs = _used(waiting.other_usage, waiting.other_share, differ).replace(
        " on", " GPU-hours on", 1
    )
    theirs = theirs if differ else f"{theirs} GPU-hours"
    if waiting.reason == "fair_share" and other:
        verb = "go" if you else "goes"
        return (
            f"fair share: {other} has used {theirs} recently, {me} {mine}: "
            f"{other} goes first (GPU-hours halve every {format_duration(config.half_life)}); "
            f"{me} {verb} up as {other} uses more"
        )
    if waiting.reason == "held" and waiting.held_since is not None:
        until = waiting.held_until
        when = f", free in {format_duration(max(0.0, until - now))} at the latest" if until else ""
        return (
            f"waited {format_duration(now - waiting.held_since)} without a start, the longest: "
            f"the GPUs it needs are held for it{when}; other jobs start only where they do not "
            "delay it"
        )
    if waiting.reason == "reserved" and waiting.held_job is not None:
        waited = format_duration(now - (waiting.held_since or now))
        return (
            f"reserved for job {waiting.held_job}, which has waited {waited} without a start: "
            "it fits now but would still be running when that job's GPUs are due"
        )
    if waiting.reason == "resources" and other and waiting.position == 1:
        verb = "go" if you else "goes"
        return f"{base}; {other} has used {theirs} recently, {me} {mine}: {me} {verb} first"
    return base


def job_view(
    job: JobRecord,
    *,
    viewer: str,
    now: float,
    config: PolicyConfig,
    gpu_memory: int,
    waiting: Waiting | None = None,
    memory: tuple[int | None, str | None] | None = None,
    mps_env: dict[str, str] | None = None,
) -> JobView:
    """The job as ``viewer`` sees it at ``now``; ``waiting`` where it is queued and explained;
    ``mps_env`` where it is an MPS client (broker/mps.py), for its owner's command."""
    limit = memory_limit(job, config, gpu_memory)
    view: JobView = {
        "id": job.id,
        "user": job.user,
        "name": job.name,
        "state": job.state.value,
        "gpus": job.gpus,
        "slices": job.slices,
        "time_limit": job.time_limit,
        "mem": job.mem,
        "submitted_at": job.submitted_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
        "exit_status": job.exit_status,
        "message": job.message,
        "assigned_gpus": job.assigned_gpus,
        "assigned_slices": job.assigned_slices,
        "gpu_memory_limit": limit,
        "gpu_memory_fraction": memory_fraction(job, config, gpu_memory),
        "ending": job.ending_state.value if job.ending_state else None,
    }
    if job.gpu_mem is not None:  # only where asked, as on the wire of a request
        view["gpu_mem"] = job.gpu_mem
    used, warning = memory or (None, None)
    if job.state is JobState.RUNNING and used is not None:  # the watchdog's last reading
        view["gpu_mem_used"] = used
    if job.state is JobState.RUNNING and warning:
        view["gpu_mem_warning"] = warning
    if job.started_at is not None:
        elapsed = (job.ended_at if job.ended_at is not None else now) - job.started_at
        view["elapsed"] = elapsed
        view["remaining"] = max(0.0, job.time_limit - elapsed)
    if waiting is not None:
        view["position"] = waiting.position
        view["eta"] = waiting.eta
        view["reason"] = waiting.reason
        view["reason_text"] = waiting_text(waiting, config, job.user, viewer == job.user, now)
    if viewer == job.user:  # only the owner sees what the job runs
        view["command"] = job.command
        if mps_env and job.state is JobState.RUNNING:
            view["mps_env"] = dict(mps_env)
    return view


def holders(
    jobs: Iterable[JobRecord],
    now: float,
    config: PolicyConfig | None = None,
    gpu_memory: int = 0,
    used: Mapping[int, int] | None = None,
) -> list[Holder]:
    """Who holds GPUs now: every running job, as anyone may see it; with ``config``,
    the GPU memory each was given, and ``used``: job id -> bytes its processes use."""
    result: list[Holder] = []
    for job in jobs:
        if job.state is JobState.RUNNING and job.started_at is not None:
            elapsed = now - job.started_at
            holder: Holder = {
                "job": job.id,
                "user": job.user,
                "name": job.name,
                "gpus": job.assigned_gpus,
                "slices": job.assigned_slices,
                "elapsed": elapsed,
                "remaining": max(0.0, job.time_limit - elapsed),
            }
            if config is not None:
                holder["gpu_mem"] = memory_limit(job, config, gpu_memory)
                holder["gpu_mem_used"] = (used or {}).get(job.id)
            result.append(holder)
    return result


def gpu_row(reading: GpuReading, slices_per_gpu: int, holders: Iterable[Holder]) -> GpuRow:
    """One GPU's reading with the holders that use it."""
    return {
        "index": reading.index,
        "name": reading.name,
        "uuid": reading.uuid,
        "memory_total": reading.memory_total,
        "memory_used": reading.memory_used,
        "utilization": reading.utilization,
        "simulated": reading.simulated,
        "slices": slices_per_gpu,
        "holders": [h for h in holders if reading.index in h["gpus"]],
    }


def snapshot(
    *,
    now: float,
    user: str,
    is_admin: bool,
    slices_per_gpu: int,
    gpus: list[GpuRow],
    running: list[JobView],
    queue_page: list[JobView],
    queue_total: int,
    queue_offset: int,
    device_access: str = "",
) -> Snapshot:
    """The broker's answer to ``gpulane status``: GPUs, running jobs, one page of the queue.

    Queue entries carry no command (it can be large: a job's own view has it).
    """
    for entry in queue_page:
        entry.pop("command", None)
    return {
        "backend": "broker",
        "backend_reason": "embedded broker on this machine",
        "now": now,
        "user": user,
        "is_admin": is_admin,
        "slices_per_gpu": slices_per_gpu,
        "gpus": gpus,
        "running": running,
        "queue": queue_page,
        "queue_total": queue_total,
        "queue_offset": queue_offset,
        "device_access": device_access,
    }


def exit_text(status: int) -> str:
    """Why a command failed, from its exit status (negative: the signal that killed it)."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


def usage_since(now: float) -> float:
    """The earliest end time a job may have to count in :func:`usage_report` at ``now``."""
    return min(now - 3600, local_midnight(now))


def usage_report(
    jobs: Iterable[JobRecord], now: float, slices_per_gpu: int, gpu_count: int, offer: int = 0
) -> UsageReport:
    """GPU-seconds per user since local midnight, and GPU use per minute over the last hour
    (a ``--gpu-mem`` job counts as its part of ``offer``, what a GPU offers jobs)."""
    records = list(jobs)
    spg = slices_per_gpu
    return {
        "today": gpu_seconds_by_user(records, local_midnight(now), now, spg, offer),
        "last_hour": busy_per_minute(records, gpu_count, spg, now, minutes=60, offer=offer),
        "gpu_count": gpu_count,
    }
