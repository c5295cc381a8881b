"""Back ends behind one interface; :func:`connect` picks the configured one."""

from __future__ import annotations

import os
from pathlib import Path

from gpulane import config as site
from gpulane.errors import ConfigError
from gpulane.scheduler.base import Scheduler, SchedulerError, SchedulerUnavailable

__all__ = ["Scheduler", "SchedulerError", "SchedulerUnavailable", "connect"]


def connect(socket: str | os.PathLike[str] | None = None) -> Scheduler:
    """The scheduler this client should use, and why (``scheduler.reason``).

    Order: ``kubernetes`` (the variable or the file) means the broker, whose grants run in
    worker pods; then an explicit socket or ``$GPULANE_SOCKET`` means the broker, and
    then ``$GPULANE_BROKER_URL`` the broker over TCP (a pod without its socket);
    ``$GPULANE_BACKEND`` or the configuration file's ``backend`` next; with
    ``auto``, a listening broker socket wins, then a Slurm whose controller
    answers, else the broker (whose absence is then reported plainly).
    """
    from gpulane.scheduler.embedded import BrokerScheduler

    try:
        config = site.load_config()
    except ConfigError as error:
        raise SchedulerError(str(error)) from None
    broker_socket = (
        socket or os.environ.get(site.SOCKET_ENV) or config.get("broker", {}).get("socket")
    )
    backend = os.environ.get(site.BACKEND_ENV) or config.get("backend", "auto")
    if backend not in site.BACKENDS:
        raise SchedulerError(
            f"{site.BACKEND_ENV}={backend!r}; use one of {', '.join(site.BACKENDS)}"
        )
    if backend == "kubernetes":
        from gpulane.scheduler.kube import KubeCellScheduler

        # The broker in the hub pod; %%gpu cells run in worker pods it creates (scheduler/kube.py).
        return _broker(KubeCellScheduler(broker_socket), "configured: backend = kubernetes")
    if socket or os.environ.get(site.SOCKET_ENV):
        return _broker(BrokerScheduler(broker_socket), "GPULANE_SOCKET or --socket names a broker")
    if os.environ.get(site.BROKER_URL_ENV):
        return _broker(BrokerScheduler(), "GPULANE_BROKER_URL names a broker (over TCP)")
    if backend == "broker":
        return _broker(BrokerScheduler(broker_socket), "configured: backend = broker")
    if backend == "slurm":
        return _slurm(config, "configured: backend = slurm")
    default = site.socket_path(broker_socket)
    if Path(default).exists():
        return _broker(BrokerScheduler(default), f"auto: a broker listens at {default}")
    from gpulane.scheduler.slurm import slurm_reachable

    if slurm_reachable():
        return _slurm(config, "auto: no broker here, and Slurm's controller answers")
    return _broker(BrokerScheduler(default), "auto: no Slurm reachable, so the embedded broker")


def _broker(scheduler: Scheduler, reason: str) -> Scheduler:
    scheduler.reason = reason
    return scheduler


def _slurm(config: dict[str, object], reason: str) -> Scheduler:
    from gpulane.scheduler.slurm import SlurmScheduler, SlurmSettings

    section = config.get("slurm") or {}
    assert isinstance(section, dict)
    known = {"partition", "account", "qos", "job_dir"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise SchedulerError(f"[slurm] has unknown setting(s): {', '.join(unknown)}")
    options: dict[str, object] = {k: section[k] for k in known - {"job_dir"} if k in section}
    if "job_dir" in section:
        options["job_dir"] = Path(str(section["job_dir"])).expanduser()
    scheduler = SlurmScheduler(SlurmSettings(**options))  # type: ignore[arg-type]
    scheduler.reason = reason
    return scheduler
