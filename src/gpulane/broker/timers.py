"""One timer per job (its time limit, or the end of its kill grace), on the broker's loop.

An action the store cannot save now (a full state folder: the state was left as
it was) is tried again soon instead of being lost with its timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gpulane.errors import StateFolderFull

STORE_RETRY = 1.0  # seconds before an action the store could not save is tried again


class JobTimers:
    def __init__(self, still_active: Callable[[int], bool]) -> None:
        self._still_active = still_active  # a job whose action failed is retried only while active
        self._handles: dict[int, asyncio.TimerHandle] = {}

    def arm(self, job_id: int, delay: float, action: Callable[[int], None]) -> None:
        """Run ``action(job_id)`` after ``delay`` seconds, in place of the job's timer."""
        self.cancel(job_id)
        self._handles[job_id] = asyncio.get_running_loop().call_later(
            delay, self._fire, job_id, action
        )

    def cancel(self, job_id: int) -> None:
        handle = self._handles.pop(job_id, None)
        if handle:
            handle.cancel()

    def cancel_all(self) -> None:
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()

    def _fire(self, job_id: int, action: Callable[[int], None]) -> None:
        self._handles.pop(job_id, None)
        try:
            action(job_id)
        except StateFolderFull:
            if self._still_active(job_id):
                self.arm(job_id, STORE_RETRY, action)
