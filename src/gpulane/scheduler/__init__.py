"""Back ends behind one interface; :func:`connect` picks the configured one."""

from __future__ import annotations

import os

from gpulane.scheduler.base import Scheduler, SchedulerError, SchedulerUnavailable

__all__ = ["Scheduler", "SchedulerError", "SchedulerUnavailable", "connect"]


def connect(socket: str | os.PathLike[str] | None = None) -> Scheduler:
    """The scheduler this client should use (today: the embedded broker)."""
    from gpulane.scheduler.broker import BrokerScheduler

    return BrokerScheduler(socket)
