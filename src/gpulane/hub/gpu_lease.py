"""A GPU-profile server's lease from the broker, shared by the local and the Kubernetes spawner.

The hub holds the lease in one thread per server (``BrokerScheduler.run``): the job
waits in the broker's queue, each queue update becomes a spawn-page progress event,
and on the grant the spawner's own start runs on the hub's loop. The lease is
*detached*: when the hub goes away, it passes to the server's command (the local
server, or the process that follows a Kubernetes pod), so a hub restart keeps it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from tornado import web
from traitlets import Integer, Unicode
from traitlets.config import LoggingConfigurable

from gpulane.config import DEFAULT_SOCKET
from gpulane.display import describe_eta, describe_holders
from gpulane.jobs import Request, parse_duration
from gpulane.profiles import Profile, ProfileError, ProfileSet, load_profiles_file
from gpulane.scheduler.base import CommandProcess, JobUpdate, SchedulerError
from gpulane.scheduler.embedded import BrokerScheduler

STATE_KEY = "gpulane_job"  # the lease's job id in the spawner's state (kept by the hub's db)

StartServer = Callable[[dict[str, str]], Coroutine[Any, Any, Any]]


class LeaseSettings(LoggingConfigurable):
    """A spawner whose GPU profiles wait in the broker's queue: its options, and what it
    keeps of the lease across hub restarts. Mixed in before the spawner class."""

    _job_id: int | None = None  # the lease's job, kept in the spawner's state
    _lease: ServerLease | None = None  # this hub's hold on it (none after a restart)
    _own_start_timeout = 60  # the spawner's start_timeout before the queue's time was added

    profiles_file = Unicode(
        "/etc/gpulane/profiles.toml",
        help="The profile file (the same one configure_kubespawner reads on Kubernetes).",
    ).tag(config=True)

    broker_socket = Unicode(
        str(DEFAULT_SOCKET), help="The broker that leases GPUs to GPU profiles."
    ).tag(config=True)

    queue_timeout = Integer(
        24 * 3600, help="Seconds a GPU-profile spawn may wait in the queue before it gives up."
    ).tag(config=True)

    session_time = Unicode(
        "8h", help="Time limit of a GPU profile's lease (the server is stopped after it)."
    ).tag(config=True)

    _profiles: ProfileSet | None = None

    def profile_set(self) -> ProfileSet:
        if self._profiles is None:
            self._profiles = load_profiles_file(self.profiles_file)
        return self._profiles

    def chosen_profile(self) -> Profile:
        raise NotImplementedError  # each spawner reads its own form

    def prepare_lease(self) -> None:
        """In the pre-spawn hook, before JupyterHub starts the spawn's clock: a GPU profile
        gets its lease (so the spawn page's progress reads it) and the queue's time."""
        try:
            profile = self.chosen_profile()
        except ProfileError as error:
            raise web.HTTPError(400, str(error)) from None
        self._lease = None
        self._own_start_timeout = int(getattr(self, "start_timeout", 60))
        if profile.uses_gpu:
            self._lease = ServerLease(self.log)
            self.start_timeout = max(self._own_start_timeout, self.queue_timeout)

    async def stop(self, now: bool = False) -> None:
        lease, job_id = self._lease, self._job_id
        if lease is not None:
            job_id = job_id or lease.job_id
            await lease.withdraw()  # still queued: out of the queue, no server was started
        await super().stop(now=now)  # type: ignore[misc]
        if job_id is not None and lease is None:
            # Found running after a hub restart: the server's command holds the lease, and
            # the broker sees it end; ending the lease here covers a broker that cannot.
            await asyncio.to_thread(release_restored_lease, self.broker_socket, job_id, self.log)
        self._job_id = None
        self._lease = None

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()  # type: ignore[misc]
        if self._job_id is not None:
            state[STATE_KEY] = self._job_id
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)  # type: ignore[misc]
        self._job_id = saved_job(state)

    def clear_state(self) -> None:
        super().clear_state()  # type: ignore[misc]
        self._job_id = None


def server_request(profile: Profile, session_time: str, command: tuple[str, ...]) -> Request:
    """The broker request of a GPU profile's server: its GPUs, slices or GPU memory for
    the session."""
    return Request(
        gpus=profile.gpus or 1,
        slices=profile.slices,
        gpu_mem=profile.gpu_mem,
        time_limit=parse_duration(session_time, "session_time"),
        name=f"server-{profile.slug}"[:64],
        command=command,
        detached=True,  # the server keeps its GPU while the hub restarts
    )


class ServerLease:
    """One server's lease, held by a thread of the hub while the server lives."""

    def __init__(self, log: logging.Logger | Any) -> None:
        # Made before the spawn starts (its pre-spawn hook), so that the spawn page's
        # progress, which may be asked for first, reads this lease's queue.
        self.log = log
        self.scheduler: BrokerScheduler | None = None
        self.job_id: int | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.granted = asyncio.Event()
        self._thread: threading.Thread | None = None

    def hold(
        self,
        scheduler: BrokerScheduler,
        request: Request,
        start_server: StartServer,
        command: Callable[[], CommandProcess],
        start_timeout: float,
        owner: str,
    ) -> asyncio.Future[Any]:
        """Queue ``request``; on the grant run ``start_server(grant_env)`` on this loop, then
        hand the broker ``command()`` as the job's command. Returns the server's address."""
        loop = asyncio.get_running_loop()
        self.scheduler = scheduler

        def on_update(update: JobUpdate) -> None:
            self.job_id = int(update.job["id"])
            loop.call_soon_threadsafe(self.events.put_nowait, progress_event(update))
            if update.state == "running":
                loop.call_soon_threadsafe(self.granted.set)

        def launch(grant_env: dict[str, str]) -> CommandProcess:
            running = asyncio.run_coroutine_threadsafe(start_server(grant_env), loop)
            address: Any = running.result(start_timeout)
            proc = command()
            loop.call_soon_threadsafe(_resolve, self.started, address)
            return proc

        def hold_lease() -> None:
            try:
                outcome = scheduler.run(request, on_update=on_update, launcher=launch)
                self.log.info("gpulane lease of %s ended: %s", owner, outcome.job.get("state"))
            except (SchedulerError, KeyboardInterrupt) as error:
                loop.call_soon_threadsafe(_fail, self.started, error)
            except Exception as error:
                # The server did not start after the grant: give the GPU back at once.
                loop.call_soon_threadsafe(_fail, self.started, error)
                self._cancel_quietly()
            finally:
                loop.call_soon_threadsafe(_fail, self.started, RuntimeError("the GPU lease ended"))

        self._thread = threading.Thread(target=hold_lease, daemon=True, name=f"gpulane-{owner}")
        self._thread.start()
        return self.started

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        """Queue events for the spawn page, until the grant (or the end of the spawn)."""
        while not (self.started.done() or (self.granted.is_set() and self.events.empty())):
            try:
                yield await asyncio.wait_for(self.events.get(), timeout=1.0)
            except TimeoutError:
                continue

    async def withdraw(self) -> None:
        """A spawn stopped while still queued: take the job out of the queue."""
        if not self.started.done() and self.job_id is not None and not self.granted.is_set():
            await asyncio.to_thread(self._cancel_quietly)

    def _cancel_quietly(self) -> None:
        if self.job_id is None or self.scheduler is None:
            return
        try:
            self.scheduler.cancel(self.job_id)
        except SchedulerError as error:
            self.log.warning("gpulane: could not cancel job %d: %s", self.job_id, error)


def release_restored_lease(socket: str, job_id: int, log: logging.Logger | Any) -> None:
    """End the lease of a server this hub found running after a restart (no thread holds it).

    The broker also sees the server's command end; this covers one that cannot. The hub
    is a broker admin: it may end the lease without the old server token (never kept).
    """
    scheduler = BrokerScheduler(socket)
    try:
        if scheduler.job(job_id)["state"] == "running":
            scheduler.cancel(job_id)
    except SchedulerError as error:
        log.warning("gpulane: could not end the lease of job %d: %s", job_id, error)


def restored_lease_ended(socket: str, job_id: int, log: logging.Logger | Any) -> str | None:
    """Why the lease of a server found running after a hub restart is over, or None while
    it runs or the broker cannot say (a broker restarting must not stop servers)."""
    try:
        job = BrokerScheduler(socket).job(job_id)
    except SchedulerError as error:
        log.warning("gpulane: lease of job %d not read: %s", job_id, error)
        return None
    if job["state"] in ("queued", "running"):
        return None
    return f"{job['state']}: {job.get('message', '')}"


def saved_job(state: dict[str, Any]) -> int | None:
    """The lease's job id in a spawner's saved state, if any."""
    job_id = state.get(STATE_KEY)
    return job_id if isinstance(job_id, int) and not isinstance(job_id, bool) else None


def progress_event(update: JobUpdate) -> dict[str, Any]:
    """A queue update as one spawn-page progress event."""
    job = update.job
    if update.state == "queued":
        message = (
            f"Waiting for a GPU: position {job.get('position', '?')} in the queue, "
            f"{describe_eta(job.get('eta'), update.now)}; {describe_holders(update.holders)}"
        )
        if job.get("reason_text"):
            message += f" ({job['reason_text']})"
        return {"progress": 10, "message": message}
    if update.state == "running":
        return {
            "progress": 50,
            "message": f"GPU {job.get('assigned_gpus')} granted; starting your server",
        }
    return {
        "progress": 100,
        "failed": True,
        "message": f"GPU lease {update.state}: {job.get('message', '')}",
    }


def _resolve(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
