"""One place for where things are: the site file, the socket, and every ``GPULANE_*`` variable.

Each environment variable is named once here, with its default and its purpose, in
:data:`ENVIRONMENT`; readers use the constants, and docs/reference.md lists the
same table (a unit test keeps the two equal).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpulane.errors import ConfigError

# What a cold GPU worker reads is named where importing it costs nothing (re-exported).
from gpulane.worker_env import GPU_MEMORY_FRACTION_ENV as GPU_MEMORY_FRACTION_ENV
from gpulane.worker_env import GPU_MEMORY_LIMIT_ENV as GPU_MEMORY_LIMIT_ENV
from gpulane.worker_env import RUNNER_ADDRESS_ENV as RUNNER_ADDRESS_ENV
from gpulane.worker_env import RUNNER_FD_ENV as RUNNER_FD_ENV
from gpulane.worker_env import RUNNER_KEYFILE_ENV as RUNNER_KEYFILE_ENV


@dataclass(frozen=True)
class EnvVar:
    """One ``GPULANE_*`` variable: its name, its default ("" where unset means off or derived),
    who sets it, and what it is for."""

    name: str
    default: str
    set_by: str
    meaning: str


DEFAULT_SOCKET = Path("/run/gpulane/broker.sock")
DEFAULT_CONFIG = Path("/etc/gpulane/gpulane.toml")
BACKENDS = ("auto", "broker", "slurm", "kubernetes")

SOCKET_ENV = "GPULANE_SOCKET"
CONFIG_ENV = "GPULANE_CONFIG"
BACKEND_ENV = "GPULANE_BACKEND"
MAX_TRANSFER_ENV = "GPULANE_MAX_TRANSFER"
WARM_WORKER_ENV = "GPULANE_WARM_WORKER"
CALLBACK_HOST_ENV = "GPULANE_CALLBACK_HOST"
BROKER_URL_ENV = "GPULANE_BROKER_URL"
KEY_DIR_ENV = "GPULANE_KEY_DIR"
JOB_ID_ENV = "GPULANE_JOB_ID"
SLICES_ENV = "GPULANE_SLICES"
PROFILE_ENV = "GPULANE_PROFILE"
USER_DIR_ENV = "GPULANE_USER_DIR"
DOCTOR_PYTHON_PREFIXES_ENV = "GPULANE_DOCTOR_PYTHON_PREFIXES"
ACTIVITY_INTERVAL_ENV = "GPULANE_ACTIVITY_INTERVAL"
FORKSERVER_ENV = "GPULANE_FORKSERVER"
FORKSERVER_IDLE_ENV = "GPULANE_FORKSERVER_IDLE"
FORKSERVER_FD_ENV = "GPULANE_FORKSERVER_FD"
PRELOAD_ENV = "GPULANE_PRELOAD"
PRELOAD_LIMIT_ENV = "GPULANE_PRELOAD_LIMIT"
PRELOAD_MEMORY_ENV = "GPULANE_PRELOAD_MEMORY"
SPILL_POOL_ENV = "GPULANE_SPILL_POOL"
SPILL_POOL_IDLE_ENV = "GPULANE_SPILL_POOL_IDLE"

ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar(SOCKET_ENV, str(DEFAULT_SOCKET), "you / the admin / the hub", "the broker's socket"),
    EnvVar(CONFIG_ENV, str(DEFAULT_CONFIG), "you / the admin", "the site configuration file"),
    EnvVar(
        BACKEND_ENV,
        "auto",
        "you / the admin / BatchSpawner",
        "`auto`, `broker`, `slurm` or `kubernetes`",
    ),
    EnvVar(MAX_TRANSFER_ENV, "2G", "you", "default `--max-transfer` of `%%gpu`"),
    EnvVar(
        WARM_WORKER_ENV,
        "1",
        "you",
        "`0` stops the kernel keeping a pre-started GPU worker "
        "(saves ~60 MB per kernel; cells start ~170 ms slower)",
    ),
    EnvVar(
        FORKSERVER_ENV,
        "1",
        "you",
        "`0`: no fork server; each worker is a fresh Python that imports what its cell needs",
    ),
    EnvVar(
        PRELOAD_ENV,
        "auto",
        "you",
        "what the fork server imports ahead of the cells: `auto` (the notebook's imports), "
        "`none`, or a list such as `torch,numpy` (always, and nothing else)",
    ),
    EnvVar(
        PRELOAD_LIMIT_ENV,
        "40",
        "you",
        "the most top-level packages the fork server preloads",
    ),
    EnvVar(
        PRELOAD_MEMORY_ENV,
        "4G",
        "you",
        "the fork server preloads nothing more once its memory (PSS) passes this",
    ),
    EnvVar(
        FORKSERVER_IDLE_ENV,
        "30m",
        "you",
        "the fork server exits after this long without a cell (and comes back for the next)",
    ),
    EnvVar(
        SPILL_POOL_ENV,
        "2G",
        "you / the admin",
        "memory a kernel keeps allocated for its large inputs' spill files after their cells "
        "(reused for the next input of the same size: ~2x faster; `0`: off)",
    ),
    EnvVar(
        SPILL_POOL_IDLE_ENV,
        "2m",
        "you / the admin",
        "a kept spill file is freed after this long without use",
    ),
    EnvVar(
        BROKER_URL_ENV,
        "",
        "the hub on Kubernetes (`GpulaneHub.api_port`; `gpulane k8s hub-values` sets it)",
        "the broker's API over TCP (its `--api-port`, `http://HOST:PORT/`), with the server's "
        "hub token: for a kernel in a pod without the broker's socket",
    ),
    EnvVar(
        CALLBACK_HOST_ENV,
        "this host's address",
        "you / the admin",
        "address a Slurm-started worker connects back to",
    ),
    EnvVar(KEY_DIR_ENV, "~/.gpulane/keys", "you", "where the one-time worker keys go (mode 0700)"),
    EnvVar(
        ACTIVITY_INTERVAL_ENV,
        "60",
        "the hub (a quarter of `idle_timeout`, 5 to 300 s)",
        "seconds between a kernel's activity reports to the hub while it has GPU work queued "
        "or running (so the idle culler leaves its server alone)",
    ),
    EnvVar(JOB_ID_ENV, "", "gpulane, for the command", "the job's number"),
    EnvVar(SLICES_ENV, "", "gpulane, for the command", "slices granted, for slice jobs"),
    EnvVar(
        GPU_MEMORY_LIMIT_ENV,
        "",
        "gpulane / the profile",
        "bytes of GPU memory this job may use (a slice's part, or its `--gpu-mem`)",
    ),
    EnvVar(
        GPU_MEMORY_FRACTION_ENV,
        "",
        "gpulane / the profile",
        "the same limit as a fraction of the GPU's memory",
    ),
    EnvVar(PROFILE_ENV, "", "the Kubernetes spawner", "the slug of the server's profile"),
    EnvVar(
        USER_DIR_ENV,
        "",
        "the Kubernetes hub values",
        "the user's folder on the persistent volume (`{username}`)",
    ),
    EnvVar(
        DOCTOR_PYTHON_PREFIXES_ENV,
        "this Python's",
        "the admin",
        "colon-separated Python environments whose nvidia-* libraries `gpulane doctor` checks",
    ),
    EnvVar(
        RUNNER_FD_ENV, "", "the kernel, for its worker", "the worker's inherited socket (internal)"
    ),
    EnvVar(
        FORKSERVER_FD_ENV,
        "",
        "the kernel, for its fork server",
        "the fork server's inherited control socket (internal)",
    ),
    EnvVar(
        RUNNER_ADDRESS_ENV,
        "",
        "the kernel, for a Slurm-started worker",
        "where the worker connects back to (internal)",
    ),
    EnvVar(
        RUNNER_KEYFILE_ENV,
        "",
        "the kernel, for a Slurm-started worker",
        "the one-time key of that connection (internal)",
    ),
)


def environment_rows() -> list[str]:
    """docs/reference.md's rows for :data:`ENVIRONMENT`, in its order."""
    return [
        f"| `{var.name}` | {_default_cell(var.default)} | {var.set_by} | {var.meaning} |"
        for var in ENVIRONMENT
    ]


def _default_cell(default: str) -> str:
    """A literal default in backticks; a description (with spaces) as it is; none as a dash."""
    if not default:
        return "-"
    return default if " " in default else f"`{default}`"


def env(name: str) -> str | None:
    """The variable's value; None where it is unset or empty (both mean "use the default")."""
    return os.environ.get(name) or None


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The broker's socket: the explicit path, else ``$GPULANE_SOCKET``, else the default."""
    if explicit:
        return Path(explicit)
    from_env = env(SOCKET_ENV)
    return Path(from_env) if from_env else DEFAULT_SOCKET


def default_state_dir() -> Path:
    """Where the broker keeps its database: /var/lib/gpulane as root, else the user's state dir."""
    if os.geteuid() == 0:
        return Path("/var/lib/gpulane")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpulane"


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The site file: the explicit path, else ``$GPULANE_CONFIG``, else the default."""
    return Path(path or env(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The site configuration (TOML), one file for every back end; empty where there is none.

    ``backend = "auto" | "broker" | "slurm"``; ``[broker]`` the options of
    ``gpulane broker`` (``socket`` also tells clients where it listens);
    ``[slurm] partition, account, qos, job_dir``.
    """
    chosen = config_path(path)
    try:
        handle = open(chosen, "rb")  # noqa: SIM115 (closed below, after the import)
    except FileNotFoundError:
        if path or env(CONFIG_ENV):
            raise ConfigError(f"configuration file {chosen} does not exist") from None
        return {}
    # Only where there is a file (~5 ms): `gpulane run` reads this on every start, and the
    # GPU worker and kernels import this module for its names only.
    import tomllib

    with handle:
        try:
            data = tomllib.load(handle)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{chosen}: {error}") from None
    backend = data.get("backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError(f"{chosen}: backend = {backend!r}; use one of {', '.join(BACKENDS)}")
    unknown = sorted(set(data) - {"backend", "broker", "slurm"})
    if unknown:
        raise ConfigError(f"{chosen}: unknown setting(s) {', '.join(unknown)}")
    return data
