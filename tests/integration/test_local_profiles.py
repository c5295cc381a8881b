"""GPU profiles for local servers through a real hub: queue, progress on the spawn page, refusals."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hubclient import HubUser, logged_in, server_ready
from tests.support.hubs import profile_spawner_config, running_demo_hub

ADA, BEN = "gpl-demo-ada", "gpl-demo-ben"

PROFILES = """
[gpu]
slices_per_gpu = 1
memory = "16G"

[[profile]]
slug = "cpu"
display_name = "CPU only"
description = "no GPU"
default = true

[[profile]]
slug = "gpu"
display_name = "One GPU"
description = "a whole GPU for the server's life"
gpus = 1
groups = ["gpu-users"]

[[profile]]
slug = "secret"
display_name = "Admins' GPU"
description = "not for everyone"
gpus = 1
groups = ["gpu-admins"]
"""


@pytest.fixture(scope="module")
def profile_hub(unix_users) -> Iterator[tuple[str, dict[str, str], Path]]:
    def spawner_config(state: Path) -> str:
        return (
            profile_spawner_config(state, PROFILES)
            + f"""
c.JupyterHub.load_groups = {{"gpu-users": {{"users": ["{ADA}", "{BEN}"]}}}}
"""
        )

    with running_demo_hub("gpulane-profiles-", spawner_config) as hub:
        yield hub.url, hub.passwords, hub.state


def hub_log(state: Path) -> str:
    return (state / "jupyterhub.log").read_text(errors="replace")[-4000:]


def progress_messages(user: HubUser, until: str, timeout: float = 30) -> list[str]:
    """Read the spawn page's progress stream (server-sent events) until a message contains ``until``."""
    seen: list[str] = []
    with user.session.get(
        f"{user.base}/hub/api/users/{user.name}/server/progress",
        headers={"Authorization": f"token {user.token}"},
        stream=True,
        timeout=timeout,
    ) as response:
        deadline = time.monotonic() + timeout
        for line in response.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                seen.append(json.loads(line[5:])["message"])
                if until in seen[-1]:
                    return seen
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"{until!r} never appeared in the spawn progress: {seen}")


def test_a_gpu_profile_spawn_queues_shows_its_place_and_starts_in_turn(profile_hub):
    url, passwords, state = profile_hub
    ada, ben = logged_in(url, passwords, ADA), logged_in(url, passwords, BEN)
    try:
        started = ada.api("POST", f"/users/{ADA}/server", json={"profile": "gpu"})
        assert started.status_code in (201, 202), hub_log(state)
        deadline = time.monotonic() + 90
        while not server_ready(ada):
            assert time.monotonic() < deadline, "ada's GPU server never started"
            time.sleep(0.5)
        # The hub (root, the lease's client) reported the server it started as the user:
        # the broker accepts it as the job's command (a descendant of its client).
        log = (state / "jupyterhub.log").read_text(errors="replace")
        assert f"granted to {ADA}" in log, hub_log(state)  # the broker logs here
        assert not re.search(r"refused POST /v1/jobs/\d+/started", log), hub_log(state)
        assert ben.api("POST", f"/users/{BEN}/server", json={"profile": "gpu"}).status_code == 202
        messages = progress_messages(ben, "position 1 in the queue")
        assert f"GPU 0: {ADA}, running" in messages[-1]
        assert not server_ready(ben)
        # Ada's server stops (as culling an idle server would): its GPU goes to ben.
        assert ada.api("DELETE", f"/users/{ADA}/server").status_code in (202, 204)
        deadline = time.monotonic() + 90
        while not server_ready(ben):
            assert time.monotonic() < deadline, "ben's GPU server did not start after ada's stopped"
            time.sleep(0.5)
        kernel = ben.new_kernel()
        cell = ben.run(
            kernel,
            "import os\nprint(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['GPULANE_JOB_ID'].isdigit())",
        )
        assert cell.stream().split() == ["0", "True"]
    finally:
        for user in (ada, ben):
            user.api("DELETE", f"/users/{user.name}/server")
            user.close()


def test_a_tampered_spawn_form_is_refused(profile_hub):
    url, passwords, _ = profile_hub
    ben = logged_in(url, passwords, BEN)
    try:
        form = ben.session.get(f"{url}/hub/spawn/{BEN}", timeout=30)
        assert (
            "One GPU" in form.text and "Admins' GPU" not in form.text
        )  # only what his groups allow
        xsrf = ben.session.cookies.get("_xsrf", path="/hub/") or ""
        posted = ben.session.post(
            f"{url}/hub/spawn/{BEN}", data={"profile": "secret", "_xsrf": xsrf}, timeout=60
        )
        assert (
            "no profile &#39;secret&#39; for you" in posted.text
            or "no profile 'secret' for you" in posted.text
        )
        api = ben.api("POST", f"/users/{BEN}/server", json={"profile": "secret"})
        assert api.status_code >= 400 and "no profile 'secret' for you" in api.text
        assert not server_ready(ben)
    finally:
        ben.api("DELETE", f"/users/{BEN}/server")
        ben.close()
