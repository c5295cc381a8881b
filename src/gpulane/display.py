"""Text renderings of queue state, shared by the CLI and (as text/plain) the notebook card."""

from __future__ import annotations

import time

from gpulane.jobs import format_bytes, format_duration
from gpulane.scheduler.base import Holder, JobUpdate, JobView, Snapshot


def describe_holder(holder: Holder) -> str:
    """``alice, running 12:03, 17:57 left``."""
    return (
        f"{holder['user']}, running {format_duration(holder['elapsed'])}, "
        f"{format_duration(holder['remaining'])} left"
    )


def describe_memory(holder: Holder) -> str:
    """`` · GPU memory 9.3 GiB of 8.0 GiB`` where the broker gave or read any, else ''."""
    given, used = holder.get("gpu_mem"), holder.get("gpu_mem_used")
    if given is None and used is None:
        return ""
    of = f" of {format_bytes(given)}" if given is not None else " (whole GPU)"
    return f" · GPU memory {format_bytes(used) if used is not None else '?'}{of}"


def describe_eta(eta: float | None, now: float) -> str:
    if eta is None:
        return "start time unknown"
    if eta <= now + 0.5:
        return "starting now"
    clock = time.strftime("%H:%M", time.localtime(eta))
    return f"starts by {clock} (in at most {format_duration(eta - now)})"


def describe_holders(holders: list[Holder], gpus: list[int] | None = None) -> str:
    relevant = [h for h in holders if gpus is None or set(h["gpus"]) & set(gpus)]
    if not relevant:
        return "no one holds a GPU"
    parts = []
    for h in relevant:
        where = ",".join(str(g) for g in h["gpus"])
        # Slurm reports the node, not the card: "node gpu01: alice, running ...".
        label = f"GPU {where}" if where else f"node {h.get('node') or '?'}"
        parts.append(f"{label}: {describe_holder(h)}")
    return "; ".join(parts)


def wait_line(update: JobUpdate) -> str:
    """One line for a job's current state, as a waiting client shows it."""
    job = update.job
    head = f"job {job['id']} ({job.get('name', 'job')})"
    state = update.state
    if state == "queued":
        position = job.get("position")
        where = f"position {position} in the queue" if position else "queued"
        parts = [f"{head} waits: {where}", describe_eta(job.get("eta"), update.now)]
        parts.append(describe_holders(update.holders))
        if job.get("reason_text"):
            parts.append(str(job["reason_text"]))
        return " · ".join(parts)
    if state == "running":
        gpus = ",".join(str(g) for g in job.get("assigned_gpus") or [])
        share = f"{job['slices']} slice(s) of GPU {gpus}" if job.get("slices") else f"GPU {gpus}"
        if job.get("gpu_mem") is not None:
            share = f"{format_bytes(job.get('gpu_mem'))} of GPU {gpus}"
        if job.get("ending"):
            return f"{head} is being stopped: {job.get('message', '')}"
        if job.get("gpu_mem_warning"):
            return f"{head} on {share}: {job['gpu_mem_warning']}"
        return f"{head} runs on {share}, time limit {format_duration(job.get('time_limit'))}"
    return f"{head} {final_words(job)}"


def final_words(job: JobView) -> str:
    state = job["state"]
    message = job.get("message") or ""
    if state == "completed":
        return f"completed in {format_duration(job.get('elapsed'))}"
    return f"{state}" + (f": {message}" if message else "")


def _device_access(snapshot: Snapshot) -> list[str]:
    """The broker's line on GPU device access (none from other back ends)."""
    access = snapshot.get("device_access")
    if not access:
        return []
    if access == "enforced":
        return ["GPU device access: enforced (a GPU opens only to its holders, by the queue)"]
    return [f"{access}: any user can reach the GPUs outside the queue"]


def status_table(snapshot: Snapshot) -> str:
    """``gpulane status``: the GPUs and their holders, then the queue in order."""
    now = snapshot["now"]
    lines = [
        f"back end: {snapshot['backend']} ({snapshot['backend_reason']})",
        *_device_access(snapshot),
        *([m] if (m := snapshot.get("mps")) else []),
        *([f"capacity: {w}"] if (w := snapshot.get("capacity_warning")) else []),
        "",
        f"{'GPU':<4} {'name':<22} {'memory':<22} {'util':>5}  holders",
    ]
    for gpu in snapshot["gpus"]:
        if gpu["memory_used"] is not None:
            memory = f"{format_bytes(gpu['memory_used'])} / {format_bytes(gpu['memory_total'])}"
        else:
            memory = format_bytes(gpu["memory_total"]) + (" (sim)" if gpu["simulated"] else "")
        util = f"{gpu['utilization']}%" if gpu["utilization"] is not None else "-"
        holders = gpu["holders"]
        slices = gpu["slices"]
        used = sum(slices if h["slices"] is None else h["slices"] for h in holders)
        free = f"[{used}/{slices} slices] " if slices > 1 else ""
        who = "; ".join(
            f"job {h['job']} {describe_holder(h)}"
            + (f" ({h['slices']} slice(s))" if slices > 1 and h["slices"] else "")
            + describe_memory(h)
            for h in holders
        )
        lines.append(
            f"{gpu['index']:<4} {gpu['name'][:22]:<22} {memory:<22} {util:>5}  {free}{who or 'free'}"
        )
    for stray in snapshot.get("strays", []):
        lines.append(
            f"GPU {stray['gpu']}: process {stray['pid']} of {stray['user']} uses "
            f"{format_bytes(stray['used'])} outside the queue"
            + (" (ended by the broker)" if stray["ended"] else "")
        )
    queue = snapshot["queue"]
    lines.append("")
    if not queue:
        lines.append("queue: empty")
        return "\n".join(lines)
    lines.append(f"{'pos':<4} {'job':<7} {'user':<12} {'asks':<12} {'limit':<9} {'ETA':<8} why")
    for job in queue:
        asks = f"{job['slices']} slice(s)" if job.get("slices") else f"{job['gpus']} GPU(s)"
        if job.get("gpu_mem") is not None:
            asks = format_bytes(job.get("gpu_mem"))
        eta = job.get("eta")
        eta_text = (
            "now"
            if eta is not None and eta <= now + 0.5
            else (time.strftime("%H:%M:%S", time.localtime(eta)) if eta is not None else "unknown")
        )
        lines.append(
            f"{job.get('position', '?')!s:<4} {job['id']!s:<7} {job['user'][:12]:<12} {asks:<12} "
            f"{format_duration(job.get('time_limit')):<9} {eta_text:<8} {job.get('reason_text', '')}"
        )
    return "\n".join(lines)
