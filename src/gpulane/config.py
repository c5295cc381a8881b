"""Where clients find the scheduler: one place for defaults and environment variables."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from gpulane.errors import ConfigError

DEFAULT_SOCKET = Path("/run/gpulane/broker.sock")
SOCKET_ENV = "GPULANE_SOCKET"


def socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The broker's socket: the explicit path, else ``$GPULANE_SOCKET``, else the default."""
    if explicit:
        return Path(explicit)
    from_env = os.environ.get(SOCKET_ENV)
    return Path(from_env) if from_env else DEFAULT_SOCKET


def default_state_dir() -> Path:
    """Where the broker keeps its database: /var/lib/gpulane as root, else the user's state dir."""
    if os.geteuid() == 0:
        return Path("/var/lib/gpulane")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "gpulane"


CONFIG_ENV = "GPULANE_CONFIG"
DEFAULT_CONFIG = Path("/etc/gpulane/gpulane.toml")
BACKEND_ENV = "GPULANE_BACKEND"
BACKENDS = ("auto", "broker", "slurm")


def load_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The site configuration (TOML), one file for every back end; empty where there is none.

    ``backend = "auto" | "broker" | "slurm"``; ``[broker] socket``;
    ``[slurm] partition, account, qos, job_dir``.
    """
    chosen = Path(path or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        with open(chosen, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        if path or os.environ.get(CONFIG_ENV):
            raise ConfigError(f"configuration file {chosen} does not exist") from None
        return {}
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{chosen}: {error}") from None
    backend = data.get("backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError(f"{chosen}: backend = {backend!r}; use one of {', '.join(BACKENDS)}")
    unknown = sorted(set(data) - {"backend", "broker", "slurm"})
    if unknown:
        raise ConfigError(f"{chosen}: unknown setting(s) {', '.join(unknown)}")
    return data
