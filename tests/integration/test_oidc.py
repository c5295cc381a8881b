"""OIDC login end to end: a real OpenID Connect provider, a real JupyterHub, the real OAuth flow.

The provider is oidc-provider-mock (discovery, an authorize page with a login form,
a token endpoint issuing signed ID tokens, userinfo with our claims), run as its own
process on a free loopback port. The hub is configured by ``configure(c, ...)`` and
``configure_oidc(c, ...)`` exactly as an admin's jupyterhub_config.py would; no
single-user server is spawned. ``requests`` plays the browser: hub login, the
provider's form, the hub's callback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from gpulane.scheduler.base import SchedulerError
from gpulane.scheduler.http import UnixJSONClient
from tests.support.hubclient import HubUser
from tests.support.hubs import free_port, launch_hub, stop_hub
from tests.support.users import need, need_module

# sub (the provider's subject) differs from preferred_username: the hub must use the latter.
PEOPLE: dict[str, dict[str, Any]] = {
    "sub-ada": {"preferred_username": "ada", "groups": ["jupyter-users", "gpu-users"]},
    "sub-ben": {"preferred_username": "ben", "groups": ["jupyter-users"]},
    "sub-fay": {"preferred_username": "fay", "groups": ["jupyter-users", "gpu-users"]},
    "sub-eve": {"preferred_username": "eve", "groups": ["students"]},
    "sub-carl": {"preferred_username": "carl", "groups": ["jupyter-admins"]},
    "sub-hal": {"preferred_username": "hal", "groups": ["jupyter-users", "gpu-users", "optics"]},
}
ALLOWED, ADMINS, GPU = "jupyter-users", "jupyter-admins", "gpu-users"

CONFIG = """# A hub as an admin would configure it, with OIDC login.
from gpulane.hub import configure
from gpulane.hub.oidc import configure_oidc

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/jupyterhub_cookie_secret"
c.JupyterHub.spawner_class = "jupyterhub.spawner.SimpleLocalProcessSpawner"
c.JupyterHub.redirect_to_server = False  # land on /hub/home: these tests spawn nothing
c.JupyterHub.services = [{{"name": "oidc-test", "api_token": {service_token!r}}}]
c.JupyterHub.load_roles = [
    {{"name": "oidc-test", "scopes": ["read:users", "read:groups"], "services": ["oidc-test"]}}
]
configure_oidc(
    c,
    issuer={issuer!r},
    client_id={client_id!r},
    client_secret_file={secret_file!r},
    allowed_groups={{{allowed!r}}},
    admin_groups={{{admins!r}}},
    callback_url={callback!r},
)
configure(
    c,
    broker_socket="{state}/run/broker.sock",
    state_dir="{state}/broker",
    simulate_gpus=1,
    dashboard_port={dashboard_port},
    idle_culler=False,
    broker_args=["--gpu-groups", {gpu!r}, "--group-shares", "optics=3"],
)
"""


@dataclass
class Provider:
    url: str

    def set_claims(self, sub: str, claims: dict[str, Any]) -> None:
        requests.put(f"{self.url}/users/{sub}", json=claims, timeout=10).raise_for_status()


@dataclass
class OIDCHub:
    url: str
    state: Path
    config: Path
    secret: str
    service_token: str
    provider: Provider
    proc: subprocess.Popen[bytes]

    def log_text(self) -> str:
        return (self.state / "jupyterhub.log").read_text(errors="replace")

    def user_model(self, name: str) -> requests.Response:
        return requests.get(
            f"{self.url}/hub/api/users/{name}",
            headers={"Authorization": f"token {self.service_token}"},
            timeout=30,
        )

    def login(self, sub: str) -> tuple[HubUser, requests.Response]:
        """The browser's way in: hub → provider's login form (posted) → hub's callback."""
        user = HubUser(self.url, str(PEOPLE[sub]["preferred_username"]))
        form = user.session.get(f"{self.url}/hub/oauth_login?next=", timeout=30)
        assert form.status_code == 200, form.text[:500]
        assert form.url.startswith(f"{self.provider.url}/oauth2/authorize?"), form.url
        assert 'name="sub"' in form.text  # the provider's login form
        # The form posts back to the authorize URL itself (no action attribute).
        done = user.session.post(form.url, data={"sub": sub}, timeout=30)
        hops = [r.url.split("?")[0] for r in done.history]
        assert f"{self.url}/hub/oauth_callback" in [*hops, done.url.split("?")[0]], hops
        return user, done


@pytest.fixture(scope="module")
def provider() -> Iterator[Provider]:
    # Found, not imported: the provider runs in its own process (its imports warn).
    need(
        importlib.util.find_spec("oidc_provider_mock") is not None,
        "oidc-provider-mock is not installed (scripts/test.sh installs it)",
    )
    folder = Path(tempfile.mkdtemp(prefix="gpulane-oidc-provider-"))
    port = free_port()
    argv = [sys.executable, "-m", "oidc_provider_mock", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--require-registration"]  # only registered clients, so the secret is really checked
    for sub, claims in PEOPLE.items():
        argv += ["--user-claims", json.dumps({"sub": sub, **claims})]
    log_path = folder / "provider.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(f"{url}/.well-known/openid-configuration", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the OIDC provider did not start: {log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    yield Provider(url)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def oidc_hub(provider: Provider) -> Iterator[OIDCHub]:
    need_module("oauthenticator")
    need(
        shutil.which("configurable-http-proxy") is not None,
        "configurable-http-proxy is not installed",
    )
    state = Path(tempfile.mkdtemp(prefix="gpulane-oidc-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    callback = f"{url}/hub/oauth_callback"
    registered = requests.post(
        f"{provider.url}/oauth2/clients",
        json={"redirect_uris": [callback], "token_endpoint_auth_method": "client_secret_post"},
        timeout=10,
    )
    registered.raise_for_status()
    client = registered.json()
    secret_file = state / "oidc-client-secret"
    descriptor = os.open(secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(client["client_secret"] + "\n")
    service_token = secrets.token_hex(32)
    config = state / "jupyterhub_config.py"
    config.write_text(
        CONFIG.format(
            state=state,
            port=port,
            hub_port=free_port(),
            proxy_api_port=free_port(),
            dashboard_port=free_port(),
            service_token=service_token,
            issuer=provider.url,
            client_id=client["client_id"],
            secret_file=str(secret_file),
            allowed=ALLOWED,
            admins=ADMINS,
            callback=callback,
            gpu=GPU,
        )
    )
    proc = launch_hub(config, state, url)
    hub = OIDCHub(url, state, config, client["client_secret"], service_token, provider, proc)
    yield hub
    stop_hub(proc)
    shutil.rmtree(state, ignore_errors=True)


def test_a_user_in_the_allowed_group_logs_in_with_the_claims_groups(oidc_hub):
    user, done = oidc_hub.login("sub-ada")
    assert done.status_code == 200 and done.url == f"{oidc_hub.url}/hub/home"
    model = oidc_hub.user_model("ada").json()  # named by preferred_username, not by sub
    assert sorted(model["groups"]) == sorted(PEOPLE["sub-ada"]["groups"])
    assert model["admin"] is False
    assert oidc_hub.user_model("sub-ada").status_code == 404
    user.close()


def test_hub_groups_follow_the_provider_at_each_login(oidc_hub):
    user, _ = oidc_hub.login("sub-fay")
    user.close()
    assert sorted(oidc_hub.user_model("fay").json()["groups"]) == [GPU, ALLOWED]
    # The IdP's admin takes fay out of the GPU group and puts her in another.
    oidc_hub.provider.set_claims(
        "sub-fay", {"preferred_username": "fay", "groups": [ALLOWED, "physics"]}
    )
    user, done = oidc_hub.login("sub-fay")
    user.close()
    assert done.status_code == 200
    assert sorted(oidc_hub.user_model("fay").json()["groups"]) == [ALLOWED, "physics"]


def test_a_user_outside_the_allowed_groups_is_refused(oidc_hub):
    user, done = oidc_hub.login("sub-eve")
    user.close()
    assert done.status_code == 403
    assert done.url.startswith(f"{oidc_hub.url}/hub/oauth_callback?")
    assert "not currently authorized to use this hub" in done.text
    assert oidc_hub.user_model("eve").status_code == 404  # no hub user was made
    assert requests.get(f"{oidc_hub.url}/hub/home", timeout=30).url.startswith(
        f"{oidc_hub.url}/hub/login"
    )


def test_a_member_of_an_admin_group_is_hub_admin(oidc_hub):
    user, done = oidc_hub.login("sub-carl")
    assert done.status_code == 200  # admin groups may log in without being in allowed_groups
    model = oidc_hub.user_model("carl").json()
    assert model["admin"] is True and model["groups"] == [ADMINS]
    # The hub agrees: carl's own session may list every user.
    assert user.api("GET", "/users").status_code == 200
    user.close()


def test_gpu_groups_from_the_claim_decide_who_may_use_gpus(oidc_hub):
    ada, _ = oidc_hub.login("sub-ada")
    ben, _ = oidc_hub.login("sub-ben")
    try:
        ada.make_token()
        ben.make_token()
        socket = oidc_hub.state / "run" / "broker.sock"
        client = UnixJSONClient(socket, token=ben.token)
        with pytest.raises(SchedulerError) as refused:
            client.request("POST", "/v1/jobs", {"name": "oidc-check"})
        client.close()
        assert str(refused.value) == (
            f"ben may not use GPUs here: not in the GPU hub group {GPU}; "
            f"an admin adds them to the hub group {GPU} on the hub's Admin page"
        )
        client = UnixJSONClient(socket, token=ada.token)
        job = client.request("POST", "/v1/jobs", {"name": "oidc-check"})
        assert job["user"] == "ada"
        client.request("POST", f"/v1/jobs/{job['id']}/cancel")
        client.close()
    finally:
        ada.close()
        ben.close()


def test_hub_groups_are_share_groups_where_the_hubs_groups_count(oidc_hub):
    """--group-shares optics=3 with the hub's groups: hal, in the hub group optics (from the
    claim; no Unix group of that name exists), waits on a share of 3, ada on 1."""
    ada, _ = oidc_hub.login("sub-ada")
    hal, _ = oidc_hub.login("sub-hal")
    socket = oidc_hub.state / "run" / "broker.sock"
    clients: list[UnixJSONClient] = []
    jobs: list[tuple[UnixJSONClient, int]] = []
    try:
        ada.make_token()
        hal.make_token()
        as_ada = UnixJSONClient(socket, token=ada.token)
        as_hal = UnixJSONClient(socket, token=hal.token)
        clients += [as_ada, as_hal]
        for client, name in ((as_ada, "share-a1"), (as_hal, "share-h"), (as_ada, "share-a2")):
            jobs.append((client, client.request("POST", "/v1/jobs", {"name": name})["id"]))
        queue = as_hal.request("GET", "/v1/status")["queue"]  # as gpulane status shows it
        view = next(v for v in queue if v["id"] == jobs[1][1])
        assert view["state"] == "queued" and view["position"] == 1, view
        # Only the share group's weight makes the shares differ, and the text name them.
        assert "ada has used 0.0 GPU-hours on a share of 1" in view["reason_text"], view
        assert "you 0.0 on a share of 3: you go first" in view["reason_text"], view
    finally:
        for client, job_id in jobs:
            client.request("POST", f"/v1/jobs/{job_id}/cancel")
        for client in clients:
            client.close()
        ada.close()
        hal.close()


def test_the_client_secret_is_in_no_config_argv_or_log(oidc_hub):
    oidc_hub.login("sub-ada")[0].close()  # the secret has been used at least once
    assert oidc_hub.secret not in oidc_hub.config.read_text()
    assert oidc_hub.secret not in oidc_hub.log_text()
    cmdline = Path(f"/proc/{oidc_hub.proc.pid}/cmdline").read_bytes().decode(errors="replace")
    assert oidc_hub.secret not in cmdline


def test_configuration_errors_are_one_clear_line(provider, tmp_path):
    need_module("oauthenticator")
    from traitlets.config import Config

    from gpulane.hub.oidc import OIDCConfigError, configure_oidc

    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    nobody = f"http://127.0.0.1:{free_port()}"
    cases = {
        nobody: (str(secret), "cannot reach the OIDC provider at"),
        "http://idp.example.org/": (str(secret), "must use https"),
        provider.url + "/elsewhere": (str(secret), "answered HTTP 404"),
        provider.url: (str(tmp_path / "missing"), "cannot read the OIDC client secret file"),
    }
    for issuer, (secret_file, expected) in cases.items():
        c = Config()
        with pytest.raises(OIDCConfigError) as error:
            configure_oidc(c, issuer=issuer, client_id="hub", client_secret_file=secret_file)
        message = str(error.value)
        assert expected in message and "\n" not in message, message
        assert "authenticator_class" not in c.JupyterHub  # nothing half-configured
    # And the good case writes what the authenticator needs, the secret's path but not the secret.
    c = Config()
    document = configure_oidc(
        c, issuer=provider.url, client_id="hub", client_secret_file=str(secret)
    )
    section = c.GpulaneOIDCAuthenticator
    assert section.token_url == document["token_endpoint"]
    assert section.userdata_url == document["userinfo_endpoint"]
    assert section.authorize_url == document["authorization_endpoint"]
    assert section.username_claim == "preferred_username" and section.manage_groups is True
    assert section.auth_state_groups_key == "oauth_user.groups"
    assert "s3cret" not in repr(c)
