"""How the broker knows a job's client is still there: its process, and its heartbeats.

The client's process is watched through a pidfd, so its death is noticed at
once; heartbeats are the fallback where the broker cannot see the process
(another pid namespace) and after a broker restart. Either way the broker is
told through ``on_gone(job_id, why)``; what that means for the job is its business.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from gpulane.jobs import format_duration

ClientGone = Callable[[int, str], None]

log = logging.getLogger("gpulane.broker")


class Leases:
    """Heartbeats and pidfds of the clients of queued and running jobs. Lives on one loop."""

    def __init__(self, ttl: float, clock: Callable[[], float], on_gone: ClientGone) -> None:
        self.ttl = ttl  # seconds without a heartbeat before a lease is presumed dead
        self.clock = clock  # monotonic (the loop's): a wall-clock step must not age a lease
        self.on_gone = on_gone
        self._last_beat: dict[int, float] = {}
        # watched pid -> (pidfd, job ids, "client" or "command")
        self._pidfds: dict[int, tuple[int, set[int], str]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._last_error = ""  # the last failure of on_gone, logged once while it repeats

    def start(self) -> None:
        """Begin expiring silent leases. Call inside the running loop."""
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    def stop(self) -> None:
        if self._sweeper:
            self._sweeper.cancel()
        loop = asyncio.get_running_loop()
        for fd, _, _ in self._pidfds.values():
            loop.remove_reader(fd)
            os.close(fd)
        self._pidfds.clear()

    def beat(self, job_id: int) -> None:
        """The job's client is alive now (a submission, a heartbeat, a reattach)."""
        self._last_beat[job_id] = self.clock()

    def end(self, job_id: int, *pids: int | None) -> None:
        """The job is over: forget its heartbeats and stop watching its processes for it."""
        self._last_beat.pop(job_id, None)
        for pid in pids:
            self.unwatch(pid, job_id)

    def watch_client(self, pid: int, job_id: int) -> bool:
        """Watch the process that submitted the job; False if the broker cannot see it."""
        return self._watch(pid, job_id, "client")

    def watch_command(self, pid: int, job_id: int) -> bool:
        """Watch the job's command instead of its client (a detached job whose client left)."""
        return self._watch(pid, job_id, "command")

    def _watch(self, pid: int, job_id: int, role: str) -> bool:
        entry = self._pidfds.get(pid)
        if entry is None:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                return False  # not visible to us (another pid namespace): heartbeats alone keep it
            asyncio.get_running_loop().add_reader(fd, self._process_exited, pid)
            entry = self._pidfds[pid] = (fd, set(), role)
        entry[1].add(job_id)
        return True

    def unwatch(self, pid: int | None, job_id: int) -> None:
        entry = self._pidfds.get(pid or 0)
        if entry is None:
            return
        entry[1].discard(job_id)
        if not entry[1]:
            asyncio.get_running_loop().remove_reader(entry[0])
            os.close(entry[0])
            del self._pidfds[pid or 0]

    def _process_exited(self, pid: int) -> None:
        entry = self._pidfds.pop(pid, None)
        if entry is None:
            return
        fd, job_ids, role = entry
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        for job_id in sorted(job_ids):
            self._tell(job_id, f"its {role} (process {pid}) exited; the GPU was freed")

    def _tell(self, job_id: int, why: str) -> None:
        """``on_gone``, guarded: one failure must not skip the other leases nor end the sweeper."""
        try:
            self.on_gone(job_id, why)
        except Exception as error:
            if str(error) != self._last_error:
                log.exception("ending the lease of job %d failed; trying again", job_id)
            self._last_error = str(error)

    def expire(self) -> None:
        """End every lease whose client sent no heartbeat within the time to live."""
        now = self.clock()
        # A client watched through its pidfd is alive until that pidfd says otherwise
        # (``_process_exited``): silence then means a stall or a frozen client, not a death.
        watched = {job_id for _, job_ids, _ in self._pidfds.values() for job_id in job_ids}
        for job_id, last in list(self._last_beat.items()):
            if job_id not in watched and now - last > self.ttl:
                self._tell(
                    job_id,
                    f"its client sent no heartbeat for {format_duration(self.ttl)}; "
                    "the GPU was freed",
                )

    def forgive(self, seconds: float) -> None:
        """The broker could read no heartbeat for ``seconds`` (its loop was busy): every
        lease's silence is counted from after that stretch, not from before it."""
        now = self.clock()
        for job_id, last in self._last_beat.items():
            self._last_beat[job_id] = min(now, last + seconds)

    async def _sweep(self) -> None:
        interval = min(1.0, self.ttl / 4)
        last = self.clock()
        while True:
            await asyncio.sleep(interval)
            now = self.clock()
            # A sweep that comes late shows the loop was blocked: heartbeats sent meanwhile
            # are still unread, and a lease must not end because the broker itself was busy.
            lag = now - last - interval
            if lag > interval:
                self.forgive(lag)
            last = now
            self.expire()
