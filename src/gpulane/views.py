"""The shapes every back end builds and every reader uses: a job's view, a GPU holder, a snapshot.

They are JSON documents (the broker sends them as they are), typed here so that
``mypy --strict`` checks both ends. A job view always carries ``id`` and
``state`` (one of :class:`gpulane.jobs.JobState`'s values); the rest depends on
who built it and when:

- the broker sets every key of :class:`JobView` but the state- and owner-dependent
  ones: ``elapsed``/``remaining`` once started, ``position``/``eta``/``reason``/
  ``reason_text`` while queued, ``command`` for the owner only;
- Slurm knows less (no submission time, no memory share) and adds ``node``,
  ``slurm_state`` once ended, and ``job_dir`` for a detached submission.

Readers therefore index ``id`` and ``state`` and ``.get()`` the others.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

__all__ = [
    "GpuRow",
    "Holder",
    "JobDetails",
    "JobEvent",
    "JobView",
    "Snapshot",
    "Stray",
    "UsageReport",
]


class JobDetails(TypedDict, total=False):
    """What a job view may carry besides its id and state (see the module's docstring)."""

    user: str
    name: str
    gpus: int
    slices: int
    time_limit: float | None  # seconds
    mem: int | None  # host memory, bytes
    gpu_mem: int | None  # bytes of one GPU asked with --gpu-mem
    gpu_mem_used: int | None  # bytes its processes use on its fullest GPU (watchdog reading)
    gpu_mem_warning: str  # while it is over its GPU memory: what the watchdog told it
    submitted_at: float  # epoch seconds, as are the next two
    started_at: float | None
    ended_at: float | None
    exit_status: int | None
    message: str  # why it ended, or why it is being stopped
    assigned_gpus: list[int]
    assigned_slices: int | None
    gpu_memory_limit: int | None  # bytes given on a shared GPU (a slice's part, or --gpu-mem)
    gpu_memory_fraction: float | None
    # Running, for its owner, where the broker made it a CUDA MPS client (broker/mps.py):
    # CUDA_VISIBLE_DEVICES (the GPU's UUID), CUDA_MPS_PIPE_DIRECTORY, CUDA_MPS_LOG_DIRECTORY
    # and CUDA_MPS_PINNED_DEVICE_MEM_LIMIT, added to its command's environment.
    mps_env: dict[str, str]
    ending: str | None  # the state a job being stopped will end in
    # Once started:
    elapsed: float | None
    remaining: float | None
    # While queued:
    position: int | None
    eta: float | None  # epoch seconds, None when unknown
    reason: str
    reason_text: str
    # For its owner only:
    command: list[str]
    # Slurm only:
    node: str
    slurm_state: str
    job_dir: str
    # Kubernetes %%gpu cells only: the worker pod's phase ("pulling image on node gpu-2").
    pod: str


class JobView(JobDetails):
    """One job as a client sees it: always its id and state, then what the back end knows."""

    id: int
    state: str  # a JobState value


class Holder(TypedDict):
    """A running job as others see it: who holds which GPUs, for how long yet."""

    job: int
    user: str
    name: str
    gpus: list[int]  # empty on Slurm, which reports the node instead
    slices: int | None
    elapsed: float | None
    remaining: float | None
    node: NotRequired[str]  # Slurm only
    # Broker only: GPU memory given (a slice's part or --gpu-mem; None: the whole GPU) and
    # in use by its processes by the last watchdog reading (None: no reading).
    gpu_mem: NotRequired[int | None]
    gpu_mem_used: NotRequired[int | None]


class Stray(TypedDict):
    """A process using a GPU that belongs to no grant (the broker's watchdog saw it)."""

    gpu: int
    pid: int
    used: int  # bytes
    user: str
    ended: bool  # the broker ended it (stray processes are ended where enforced)


class GpuRow(TypedDict):
    """One GPU (on Slurm: one node) and who holds it."""

    index: int | str  # the card's index; Slurm's node name
    name: str
    memory_total: int | None
    memory_used: int | None
    utilization: int | None  # percent
    simulated: bool
    slices: int  # slices per GPU
    holders: list[Holder]
    uuid: NotRequired[str]  # broker only


class UsageReport(TypedDict):
    """GPU use for the dashboard: GPU-seconds per user today, GPU-equivalents per minute."""

    today: dict[str, float]
    last_hour: list[dict[str, Any]]  # {"t": minute start (epoch), "busy": GPU-equivalents}
    gpu_count: int


class Snapshot(TypedDict):
    """GPUs, holders and the queue in order, as ``gpulane status --json`` prints it."""

    backend: str
    backend_reason: str
    now: float
    user: str
    gpus: list[GpuRow]
    running: list[JobView]
    queue: list[JobView]
    is_admin: NotRequired[bool]  # broker only
    slices_per_gpu: NotRequired[int]  # broker only
    usage: NotRequired[UsageReport]  # the dashboard's state adds it
    queue_total: NotRequired[int]  # broker only: the whole queue's length (``queue`` is a page)
    queue_offset: NotRequired[int]  # broker only: the page's first place (0-based)
    # broker only: "enforced" (GPU device files open only to holders) or why it is not
    device_access: NotRequired[str]
    strays: NotRequired[list[Stray]]  # broker only, where its watchdog reads GPU memory
    mps: NotRequired[str]  # broker only: "MPS: on for GPU 0 (...)" or "MPS: off (why)"
    capacity_warning: NotRequired[str]  # broker only: nodes disagree with time-slicing (k8s)


class JobEvent(TypedDict):
    """One line of the broker's event stream for a job."""

    job: JobView
    holders: list[Holder]
    now: float
