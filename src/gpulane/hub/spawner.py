"""Local servers with profiles: a GPU profile holds a whole-session lease from the broker.

For LocalProcessSpawner-style hubs (one machine, the demo). The spawn form lists
only the profiles the user's hub groups allow, and the posted form is checked on
the server. A GPU profile waits in the broker's queue like any GPU job: the
spawn page shows the place in the queue and the start estimate, and the server
starts when its turn comes. Its GPU is freed when the server stops, which is
what culling an idle server does.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

from jupyterhub.spawner import LocalProcessSpawner
from tornado import web

from gpulane.hub.accounts import AccountRefused, check_unix_account
from gpulane.hub.forms import options_form_html
from gpulane.hub.gpu_lease import (
    LeaseSettings,
    server_request,
)
from gpulane.profiles import (
    Profile,
    ProfileError,
    gpu_environment,
    resolve_form,
    visible_custom,
    visible_profiles,
)
from gpulane.scheduler.embedded import BrokerScheduler


class GpulaneSpawner(LeaseSettings, LocalProcessSpawner):  # type: ignore[misc]
    # ------------------------------------------------------------------ the form

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
        self.prepare_lease()  # before JupyterHub starts its clock: a GPU profile may queue
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
        lease = self._lease
        if lease is None or not profile.uses_gpu:
            return await super().start()

        async def start_server(grant_env: dict[str, str]) -> Any:
            self._job_id = lease.job_id
            self._grant_env.update(grant_env)
            return await LocalProcessSpawner.start(self)

        request = server_request(profile, self.session_time, ("jupyterhub-singleuser",))
        # The server's own hub token names the user to the broker (the hub runs as root).
        scheduler = BrokerScheduler(self.broker_socket, token=self.api_token)
        # The started server is the job's command: the lease passes to it if the hub goes.
        return await lease.hold(
            scheduler, request, start_server, lambda: self.proc, 60, self.user.name
        )

    async def progress(self) -> AsyncIterator[dict[str, Any]]:
        if self._lease is not None:
            async for event in self._lease.progress():
                yield event
