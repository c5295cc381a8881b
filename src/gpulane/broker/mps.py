"""CUDA MPS as a hard GPU memory cap: the pure decisions (issue 14). No I/O here.

Where MPS is on, the broker runs one ``nvidia-cuda-mps-control -d`` per GPU (the process
side is broker/mps_daemons.py), each with its own pipe and log folder and
``CUDA_VISIBLE_DEVICES`` set to that GPU's UUID. A job on a shared GPU (a slice, or
``--gpu-mem``) that is admitted as an MPS client gets, besides its usual environment:

- ``CUDA_VISIBLE_DEVICES`` = the GPU's UUID (NVIDIA's docs: indices are remapped by an MPS
  server started with ``CUDA_VISIBLE_DEVICES``; a UUID means the same GPU to both);
- ``CUDA_MPS_PIPE_DIRECTORY`` and ``CUDA_MPS_LOG_DIRECTORY``, that GPU's daemon's folders;
- ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` = ``0=<MiB>M``: the memory it was given, which the
  driver enforces on the client (an allocation past it fails with out of memory). Device
  0 is the client's first visible device, that UUID.

Jobs on whole GPUs without a memory request get none of this (no MPS, no limit).

One MPS server serves one Linux user at a time: NVIDIA's ``nvidia-cuda-mps-control(1)``
says a client of another uid waits until every client of the running server has exited
(the daemon then starts a server for the new uid). So a job becomes an MPS client only
where every MPS client already on its GPU is its own user's (:func:`admits`); another
user's job there runs without MPS (framework caps and the watchdog still apply), rather
than hanging at CUDA start-up until the first user's jobs end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gpulane.errors import GpulaneError

CONTROL = "nvidia-cuda-mps-control"
PID_FILE = "nvidia-cuda-mps-control.pid"  # what the daemon writes in its pipe folder
DEFAULT_DIR = "/run/gpulane/mps"
# root-owned; others may pass through (clients reach the daemon's sockets by name) but
# neither list nor create anything: no user can plant or swap a socket or a pid file.
BASE_MODE = 0o711
PIPE_MODE = 0o711
LOG_MODE = 0o700  # control.log and server.log: for the administrator only
OFF_FLAG = "--mps off"
MiB = 1024**2


class MpsError(GpulaneError):
    """``--mps on`` where MPS cannot run; one line with the way out."""


@dataclass(frozen=True)
class MpsSettings:
    """The GPUs that get an MPS daemon (index -> UUID), where their folders live, and
    the line ``gpulane status`` shows."""

    gpus: Mapping[int, str] = field(default_factory=dict)
    base: str = DEFAULT_DIR
    control: str = CONTROL  # the executable, as found on PATH
    why_off: str = "MPS: off"

    @property
    def enabled(self) -> bool:
        return bool(self.gpus)

    def line(self) -> str:
        """``gpulane status``'s and ``gpulane doctor``'s line."""
        if not self.enabled:
            return self.why_off
        listed = ", ".join(str(g) for g in sorted(self.gpus))
        return (
            f"MPS: on for GPU {listed} (a shared GPU's jobs get a pinned memory limit "
            "the driver enforces)"
        )


def plan(
    mode: str,
    *,
    control: str | None,
    uuids: Mapping[int, str],
    mig: Mapping[int, bool],
    is_root: bool,
    base: str = DEFAULT_DIR,
) -> MpsSettings:
    """Whether MPS runs, and on which GPUs (``mode``: auto, on, off).

    auto: on where ``nvidia-cuda-mps-control`` is found, the broker is root and a GPU is
    not in MIG mode (only those GPUs); off otherwise, with the reason. on: the same, but
    an error where it cannot run at all. ``uuids`` empty: no real GPU (simulated, or no
    driver): never a daemon.
    """

    def off(why: str) -> MpsSettings:
        if mode == "on":
            raise MpsError(f"--mps on: {why}; or start with {OFF_FLAG}")
        return MpsSettings(base=base, why_off=f"MPS: off ({why})")

    if mode == "off":
        return MpsSettings(base=base, why_off=f"MPS: off ({OFF_FLAG})")
    if not uuids:
        return off("no NVIDIA GPU here")
    if control is None:
        return off(f"{CONTROL} not found")
    if not is_root:
        return off("the broker is not root")
    gpus = {index: uuid for index, uuid in uuids.items() if uuid and not mig.get(index)}
    if not gpus:
        return off("every GPU is in MIG mode" if any(mig.values()) else "no GPU UUID read")
    return MpsSettings(gpus=dict(gpus), base=base, control=control)


def folders(base: str, gpu: int) -> tuple[Path, Path]:
    """GPU ``gpu``'s daemon's (pipe folder, log folder)."""
    root = Path(base) / f"gpu{gpu}"
    return root / "pipe", root / "log"


def pinned_limit(limit: int) -> str:
    """The driver's syntax for ``limit`` bytes on the client's device 0: ``0=<MiB>M``,
    rounded down to whole MiB (never above what was given), at least 1 MiB."""
    return f"0={max(1, limit // MiB)}M"


def daemon_env(base_env: Mapping[str, str], uuid: str, pipe: Path, log: Path) -> dict[str, str]:
    """The control daemon's environment: that GPU alone, by UUID, and its own folders."""
    env = {k: v for k, v in base_env.items() if not k.startswith("CUDA_MPS_")}
    env.update(
        {
            "CUDA_VISIBLE_DEVICES": uuid,
            "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
            "CUDA_MPS_LOG_DIRECTORY": str(log),
        }
    )
    return env


def control_env(base_env: Mapping[str, str], pipe: Path) -> dict[str, str]:
    """The environment of ``nvidia-cuda-mps-control`` run as a client (``quit``)."""
    env = {k: v for k, v in base_env.items() if not k.startswith("CUDA_MPS_")}
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(pipe)
    return env


def shared_gpu(assigned: list[int], limit: int | None) -> int | None:
    """The GPU a job may use MPS on: exactly one GPU, with a memory limit (a slice or
    ``--gpu-mem``); None for whole GPUs without a memory request (no pinned limit)."""
    if limit is None or len(assigned) != 1:
        return None
    return assigned[0]


def admits(clients: Mapping[int, int], uid: int) -> bool:
    """May a job of ``uid`` join a GPU whose MPS clients are ``clients`` (job -> uid)?
    Only where all are ``uid``'s: one MPS server serves one user at a time."""
    return all(other == uid for other in clients.values())


def client_env(settings: MpsSettings, gpu: int, limit: int) -> dict[str, str]:
    """What an admitted job on ``gpu`` is told, besides its usual environment."""
    pipe, log = folders(settings.base, gpu)
    return {
        "CUDA_VISIBLE_DEVICES": settings.gpus[gpu],
        "CUDA_MPS_PIPE_DIRECTORY": str(pipe),
        "CUDA_MPS_LOG_DIRECTORY": str(log),
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": pinned_limit(limit),
    }


def private_dir_problem(mode: int, uid: int, is_dir: bool, is_link: bool, wanted: int) -> str:
    """Why an existing folder cannot be used as a private MPS folder ("" where it can):
    it must be a real folder (no link), owned by root, writable by nobody else."""
    if is_link or not is_dir:
        return "is not a folder (a link, or a file)"
    if uid != 0:
        return f"is owned by uid {uid}, not root"
    if mode & 0o022:
        return f"is mode {mode:o}: others could write in it (wanted {wanted:o})"
    return ""
