"""An asyncio event loop on a virtual clock: timers fire in order, at once, when time is advanced.

``loop.time()`` is the virtual clock. Whenever the loop has nothing ready to run and would
wait for its next timer, it moves the clock to that timer instead of sleeping; file
descriptors (a broker's pidfds) are still polled, without blocking. So
``loop.advance(60)`` runs every ``call_later`` and ``asyncio.sleep`` due in the next 60
virtual seconds, in order, each at its own due time, in a few real milliseconds.
"""

from __future__ import annotations

import asyncio
import selectors
from typing import Any


class _NeverBlock(selectors.DefaultSelector):
    """Polls without waiting; a wait for a timer becomes a jump of the virtual clock."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise RuntimeError("the loop would wait forever: no timer is due and nothing is ready")
        self.now += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose ``time()`` is virtual and moves only while the loop waits."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._virtual = _NeverBlock()
        self._virtual.now = start
        super().__init__(self._virtual)
        # Timers due within a microsecond fire together. The loop's default, the monotonic
        # clock's nanosecond, is below a float's step at the size of epoch seconds: a timer
        # one step ahead would never come due, and the loop would spin.
        self._clock_resolution = 1e-6

    def time(self) -> float:
        return self._virtual.now

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass, running everything that falls due meanwhile."""
        self.run_until_complete(asyncio.sleep(seconds))

    def stall(self, seconds: float) -> None:
        """The loop is busy for ``seconds``: the clock moves and nothing runs meanwhile."""
        self._virtual.now += seconds

    def call(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` inside the running loop (as a request handler would) and return it."""

        async def inside() -> Any:
            return fn(*args)

        return self.run_until_complete(inside())
