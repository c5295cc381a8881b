"""Reading Slurm's own commands' output (squeue, scontrol, sacct) into gpulane's views.

Pure functions of text, so they are unit-tested with recorded output.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Unpack

from gpulane.views import Holder, JobDetails, JobView

JOB_NAME_PREFIX = "gpulane:"  # on every job gpulane submits; the user's name follows

# One squeue call per refresh: every job of the partition, highest priority first.
SQUEUE_FIELDS = ("%i", "%T", "%u", "%Q", "%b", "%M", "%L", "%l", "%S", "%r", "%N", "%P", "%k", "%j")
SQUEUE_FORMAT = "|".join(SQUEUE_FIELDS)  # %j last: only a job name could hold the separator

_STATES = {
    "PENDING": "queued",
    "CONFIGURING": "queued",
    "REQUEUED": "queued",
    "RUNNING": "running",
    "COMPLETING": "running",
    "SUSPENDED": "running",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "OUT_OF_MEMORY": "failed",
    "NODE_FAIL": "failed",
    "BOOT_FAIL": "failed",
    "DEADLINE": "timeout",
    "PREEMPTED": "cancelled",
    "CANCELLED": "cancelled",
    "REVOKED": "cancelled",
    "TIMEOUT": "timeout",
}

_FINAL_WORDS = {
    "TIMEOUT": "GPU time limit {limit} reached; ask for more with --time",
    "OUT_OF_MEMORY": "ran out of host memory; ask for more with --mem",
    "NODE_FAIL": "the node running it failed; run the cell again",
    "BOOT_FAIL": "the node could not boot; run the cell again",
    "PREEMPTED": "preempted by higher-priority work",
    "DEADLINE": "its deadline passed",
}

REASONS = {
    "None": "",
    "Resources": "waiting for GPUs to free up",
    "Priority": "jobs with higher priority are ahead (fair share)",
    "QOSMaxGRESPerUser": "you already use the most GPUs your QOS allows per user",
    "QOSMaxJobsPerUserLimit": "you already run the most jobs your QOS allows",
    "QOSMaxWallDurationPerJobLimit": "--time is over your QOS's maximum; ask for less",
    "AssocGrpGRES": "your group's GPU limit is reached",
    "AssocMaxJobsLimit": "your account already runs the most jobs it may",
    "PartitionTimeLimit": "--time is over the partition's maximum; ask for less",
    "ReqNodeNotAvail": "the GPU node is not available (drained or down); ask an admin",
    "PartitionDown": "the partition is down; ask an admin",
    "PartitionNodeLimit": "the request is larger than the partition allows",
    "BeginTime": "its start time has not come yet",
    "Dependency": "it waits for another job",
    "JobHeldUser": "held by you (scontrol release JOB)",
    "JobHeldAdmin": "held by an admin",
    "Reservation": "waiting for a reservation",
}


@dataclass(frozen=True)
class SqueueRow:
    job_id: int
    state: str  # Slurm's word: PENDING, RUNNING, ...
    user: str
    priority: int
    tres: str  # %b: "gres/gpu:1", "gres:gpu:1", "gres/shard:2", "N/A"
    elapsed: float | None
    remaining: float | None
    time_limit: float | None
    start: float | None  # epoch seconds: expected (pending, from backfill) or actual
    reason: str
    nodes: str
    partition: str
    comment: str
    name: str

    @property
    def gpu_request(self) -> tuple[str, int] | None:
        """("gpu", N) or ("shard", K) from the job's TRES, or None if it asks for no GPU."""
        match = re.search(r"gres[/:](gpu|shard)(?::[^:,]+)?:(\d+)", self.tres)
        if match:
            return match.group(1), int(match.group(2))
        match = re.search(r"gres[/:](gpu|shard)(?:,|$)", self.tres)
        return (match.group(1), 1) if match else None


def parse_slurm_time(text: str) -> float | None:
    """Slurm's ``[D-]HH:MM:SS``, ``MM:SS``, ``UNLIMITED``, ``N/A``, ``INVALID``."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text)
    if not match:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def parse_timestamp(text: str) -> float | None:
    """``2026-11-24T04:30:00`` (local time, as Slurm prints it) to epoch seconds."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def parse_squeue(text: str) -> list[SqueueRow]:
    rows = []
    for line in text.splitlines():
        parts = line.split("|", len(SQUEUE_FIELDS) - 1)
        if len(parts) != len(SQUEUE_FIELDS) or not parts[0].strip().isdigit():
            continue  # array or het-job ids and noise are not ours
        (job_id, state, user, priority, tres, used, left, limit, start, reason, nodes, part,
         comment, name) = parts  # fmt: skip
        rows.append(
            SqueueRow(
                job_id=int(job_id),
                state=state.strip(),
                user=user.strip(),
                priority=int(priority) if priority.strip().isdigit() else 0,
                tres=tres.strip(),
                elapsed=parse_slurm_time(used),
                remaining=parse_slurm_time(left),
                time_limit=parse_slurm_time(limit),
                start=parse_timestamp(start),
                reason=reason.strip(),
                nodes=nodes.strip(),
                partition=part.strip(),
                comment=comment.strip(),
                name=name.strip(),
            )
        )
    return rows


def parse_key_values(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output: ``Key=Value`` words (values may hold spaces only at the end)."""
    result: dict[str, str] = {}
    for match in re.finditer(r"(\w[\w:/]*)=(\S*)", text):
        result.setdefault(match.group(1), match.group(2))
    return result


def parse_sacct(text: str) -> tuple[str, str] | None:
    """``sacct -X -n -P -o State,ExitCode``: (state word, exit code ``N:S``) of the first line."""
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2 and parts[0]:
            return parts[0].split()[0], parts[1]
    return None


def exit_status(exit_code: str) -> int:
    """``N:S`` (exit code : signal) as a shell reports it."""
    try:
        code, sig = (int(x) for x in exit_code.split(":"))
    except ValueError:
        return 1
    return 128 + sig if sig else code


def gpulane_state(slurm_state: str) -> str:
    return _STATES.get(slurm_state.split()[0].rstrip("+"), "failed")


def final_message(slurm_state: str, exit_code: str, limit_text: str) -> str:
    word = slurm_state.split()[0].rstrip("+")
    if word in _FINAL_WORDS:
        return _FINAL_WORDS[word].format(limit=limit_text)
    if word == "CANCELLED":
        who = slurm_state.split("by", 1)[1].strip() if " by " in slurm_state else ""
        return f"cancelled (scancel{' by uid ' + who if who else ''})"
    if word == "FAILED":
        return f"exited with status {exit_status(exit_code)}"
    return ""


def reason_text(reason: str) -> str:
    key = reason.strip("()").split(",")[0].strip()
    return REASONS.get(key, key)


def job_view(job_id: int, state: str, **known: Unpack[JobDetails]) -> JobView:
    """Every Slurm view is built here: what Slurm told us, with gpulane's prefix off the name.

    Only what is known is set (a bare submission knows its id, name and folder),
    so a view never claims a value Slurm did not give.
    """
    view: JobView = {"id": job_id, "state": state, **known}
    if "name" in known:
        view["name"] = known["name"].removeprefix(JOB_NAME_PREFIX)
    return view


def holder(row: SqueueRow) -> Holder:
    """A running job of the partition as others see it: Slurm reports its node, not its card."""
    kind, count = row.gpu_request or ("gpu", 0)
    return {
        "job": row.job_id,
        "user": row.user,
        "name": row.name.removeprefix(JOB_NAME_PREFIX),
        "gpus": [],
        "node": row.nodes,
        "slices": count if kind == "shard" else None,
        "elapsed": row.elapsed,
        "remaining": row.remaining,
    }
