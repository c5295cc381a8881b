"""Local servers with profiles: a GPU profile holds a whole-session lease from the broker.

For LocalProcessSpawner-style hubs (one machine, the demo). The spawn form lists
only the profiles the user's hub groups allow, and the posted form is checked on
the server. A GPU profile waits in the broker's queue like any GPU job: the
spawn page shows the place in the queue and the start estimate, and the server
starts when its turn comes. Its GPU is freed when the server stops, which is
what culling an idle server does.
"""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import threading
from collections.abc import AsyncIterator
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner
from tornado import web
from traitlets import Integer, Unicode

from gpulane.config import DEFAULT_SOCKET
from gpulane.display import describe_eta, describe_holders
from gpulane.hub.accounts import AccountRefused, check_unix_account
from gpulane.hub.forms import options_form_html
from gpulane.jobs import Request, parse_duration
from gpulane.profiles import (
    Profile,
    ProfileError,
    ProfileSet,
    gpu_environment,
    load_profiles_file,
    resolve_form,
    visible_custom,
    visible_profiles,
)
from gpulane.scheduler.base import JobUpdate, SchedulerError
from gpulane.scheduler.embedded import BrokerScheduler


class GpulaneSpawner(LocalProcessSpawner):  # type: ignore[misc]
    profiles_file = Unicode(
        "/etc/gpulane/profiles.toml", help="The profile file shared with the KubeSpawner set-up."
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
    _job_id: int | None = None  # the GPU lease's job, kept in the spawner's state
    _lease: threading.Thread | None = None  # the thread that holds it (none after a restart)
    _events: asyncio.Queue[dict[str, Any]]
    _started: asyncio.Future[Any]

    # ------------------------------------------------------------------ the form

    def profile_set(self) -> ProfileSet:
        if self._profiles is None:
            self._profiles = load_profiles_file(self.profiles_file)
        return self._profiles

    def user_groups(self) -> list[str]:
        return [group.name for group in self.user.groups]

    def _options_form_default(self) -> Any:
        def form(spawner: GpulaneSpawner) -> str:
            pset = spawner.profile_set()
            groups = spawner.user_groups()
            custom = visible_custom(pset, groups)
            return str(options_form_html(visible_profiles(pset, groups), custom, pset))

        return form

    def options_from_form(self, formdata: dict[str, list[str]]) -> dict[str, Any]:
        # The form is user input: re-check it against what this user's groups allow.
        profile = resolve_form(self.profile_set(), self.user_groups(), formdata)
        return {"profile": profile.slug, "form": formdata}

    def chosen_profile(self) -> Profile:
        pset = self.profile_set()
        form = self.user_options.get("form")
        if not form and self.user_options:
            # Options posted to the REST API: the same check as a posted form.
            form = {k: v if isinstance(v, list) else [str(v)] for k, v in self.user_options.items()}
        if form:
            return resolve_form(pset, self.user_groups(), form)
        visible = visible_profiles(pset, self.user_groups())
        if not visible:
            raise ProfileError(f"no profile is open to {self.user.name}; ask an admin")
        return visible[0]

    def get_env(self) -> dict[str, str]:
        env: dict[str, str] = super().get_env()
        env.update(getattr(self, "_grant_env", {}))
        return env

    # ------------------------------------------------------------------ start and stop

    async def run_pre_spawn_hook(self) -> None:
        # Runs before JupyterHub starts its start_timeout clock: a GPU profile may queue.
        try:
            profile = self.chosen_profile()
        except ProfileError as error:
            raise web.HTTPError(400, str(error)) from None
        self._events = asyncio.Queue()
        self._started = asyncio.get_running_loop().create_future()
        if profile.uses_gpu:
            self.start_timeout = max(int(getattr(self, "start_timeout", 60)), self.queue_timeout)
        hooked = super().run_pre_spawn_hook()
        if inspect.isawaitable(hooked):
            await hooked

    async def start(self) -> Any:
        # LocalProcessSpawner becomes the Unix user of the hub user's name: never root.
        try:
            check_unix_account(self.user.name)
        except AccountRefused as error:
            raise web.HTTPError(403, str(error)) from None
        profile = self.chosen_profile()
        self._grant_env = dict(gpu_environment(profile, self.profile_set()))
        if not profile.uses_gpu:
            return await super().start()
        loop = asyncio.get_running_loop()
        request = Request(
            gpus=profile.gpus or 1,
            slices=profile.slices,
            time_limit=parse_duration(self.session_time, "GpulaneSpawner.session_time"),
            name=f"server-{profile.slug}"[:64],
            command=("jupyterhub-singleuser",),
            detached=True,  # the server keeps its GPU while the hub restarts
        )
        # The server's own hub token names the user to the broker (the hub runs as root).
        scheduler = BrokerScheduler(self.broker_socket, token=self.api_token)

        def on_update(update: JobUpdate) -> None:
            self._job_id = int(update.job["id"])
            loop.call_soon_threadsafe(self._events.put_nowait, _progress_event(update))

        def launch(grant_env: dict[str, str]) -> subprocess.Popen[bytes]:
            self._grant_env.update(grant_env)
            future = asyncio.run_coroutine_threadsafe(LocalProcessSpawner.start(self), loop)
            address = future.result(60)
            loop.call_soon_threadsafe(_resolve, self._started, address)
            proc: subprocess.Popen[bytes] = self.proc
            return proc

        def hold_lease() -> None:
            try:
                outcome = scheduler.run(request, on_update=on_update, launcher=launch)
                self.log.info(
                    "gpulane lease of %s ended: %s", self.user.name, outcome.job.get("state")
                )
            except (SchedulerError, KeyboardInterrupt) as error:
                loop.call_soon_threadsafe(_fail, self._started, error)
            finally:
                loop.call_soon_threadsafe(_fail, self._started, RuntimeError("the GPU lease ended"))

        self._lease = threading.Thread(
            target=hold_lease, daemon=True, name=f"gpulane-lease-{self.user.name}"
        )
        self._lease.start()
        self._scheduler = scheduler
        return await self._started

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        events = getattr(self, "_events", None)
        if events is None:
            return
        while not self._started.done():
            try:
                yield await asyncio.wait_for(events.get(), timeout=1.0)
            except TimeoutError:
                continue

    async def stop(self, now: bool = False) -> None:
        started = getattr(self, "_started", None)
        job_id = self._job_id
        if started is not None and not started.done() and job_id is not None:
            # Still queued: withdraw the job.
            await asyncio.to_thread(self._scheduler.cancel, job_id)
        await super().stop(now=now)
        if job_id is not None and self._lease is None:
            # A server this hub found running after a restart: no thread of ours holds
            # its lease. The broker sees the server end through its pidfd; saying so
            # here as well covers a broker that cannot see the process.
            await asyncio.to_thread(self._release_restored_lease, job_id)
        self._job_id = None

    def _release_restored_lease(self, job_id: int) -> None:
        # The hub runs as root, a broker admin: it may end the lease it started without
        # the old server token (which it never keeps).
        scheduler = BrokerScheduler(self.broker_socket)
        try:
            if scheduler.job(job_id)["state"] == "running":
                scheduler.cancel(job_id)
        except SchedulerError as error:
            self.log.warning("gpulane: could not end the lease of job %d: %s", job_id, error)

    # ------------------------------------------------------------------ hub restarts

    def get_state(self) -> dict[str, Any]:
        state: dict[str, Any] = super().get_state()
        if self._job_id is not None:
            state["gpulane_job"] = self._job_id
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        job_id = state.get("gpulane_job")
        if isinstance(job_id, int):
            self._job_id = job_id

    def clear_state(self) -> None:
        super().clear_state()
        self._job_id = None


def _progress_event(update: JobUpdate) -> dict[str, Any]:
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
