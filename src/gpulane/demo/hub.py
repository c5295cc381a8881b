"""``gpulane demo`` (``gpulane demo hub``): a working shared-GPU JupyterHub on http://127.0.0.1:8000.

Idempotent: state (hub database, broker database, passwords, logs) lives in one
folder and is reused on the next run. As root, the demo users are real Unix
users, each server runs as its user; otherwise every server runs as you and the
broker tells users apart by their hub tokens.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from gpulane.demo.users import ensure_user
from gpulane.hub.config import install_kernel_extension

DEMO_USERS = ("gpl-demo-ada", "gpl-demo-ben")

CONFIG_TEMPLATE = """# Written by `gpulane demo`; rerun it to regenerate. State: {state}
from gpulane.hub import configure
from gpulane.demo.auth import DemoAuthenticator

c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = {port}
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/jupyterhub_cookie_secret"
c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"
c.JupyterHub.authenticator_class = DemoAuthenticator
c.DemoAuthenticator.password_file = "{state}/passwords.json"
c.Authenticator.allowed_users = {users!r}
c.Authenticator.admin_users = {{{admin!r}}}
c.JupyterHub.spawner_class = {spawner!r}
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = {notebook_dir!r}
configure(
    c,
    broker_socket="{state}/run/broker.sock",
    state_dir="{state}/broker",
    simulate_gpus={simulate},
    admin_users={{{admin!r}}},
    dashboard_port={dashboard_port},
)
{cleanup}"""


def default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/gpulane-demo")
    return Path.home() / ".local" / "state" / "gpulane-demo"


def _nvml_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no driver, no GPU: the demo simulates one
        return 0


def _passwords(state: Path, users: tuple[str, ...]) -> dict[str, str]:
    """Generated once, kept (0600, owner only) so reruns print the same ones."""
    from gpulane.demo.auth import write_password_file

    plain = state / "passwords.txt"
    if plain.exists():
        known = json.loads(plain.read_text())
        if set(known) == set(users):
            return dict(known)
    passwords = {user: secrets.token_urlsafe(9) for user in users}
    descriptor = os.open(plain, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(passwords, handle)
    write_password_file(state / "passwords.json", passwords)
    return passwords


def prepare(
    state: Path,
    port: int = 8000,
    dashboard_port: int = 9873,
    hub_port: int = 8081,
    proxy_api_port: int = 8001,
    stop_servers_with_hub: bool = True,
) -> tuple[Path, dict[str, str]]:
    """Write the config and passwords; returns the config path and the passwords.

    ``configure`` keeps servers running across a hub restart, as a lab's hub should; the
    demo is stopped with Ctrl-C and then stops everything, unless told otherwise.
    """
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o755)  # users' kernels must reach the broker socket inside
    as_root = os.geteuid() == 0
    if as_root:
        for user in DEMO_USERS:
            ensure_user(user)
        users: tuple[str, ...] = DEMO_USERS
        spawner, notebook_dir = "jupyterhub.spawner.LocalProcessSpawner", "~"
    else:
        users = ("ada", "ben")
        spawner, notebook_dir = (
            "jupyterhub.spawner.SimpleLocalProcessSpawner",
            str(state / "notebooks"),
        )
        (state / "notebooks").mkdir(exist_ok=True)
    passwords = _passwords(state, users)
    simulate = 0 if _nvml_gpus() else 1
    singleuser = str(Path(sys.executable).parent / "jupyterhub-singleuser")
    config = state / "jupyterhub_config.py"
    config.write_text(
        CONFIG_TEMPLATE.format(
            state=state,
            port=port,
            users=set(users),
            admin=users[0],
            spawner=spawner,
            singleuser=singleuser,
            notebook_dir=notebook_dir,
            simulate=simulate,
            dashboard_port=dashboard_port,
            hub_port=hub_port,
            proxy_api_port=proxy_api_port,
            cleanup=(
                "c.JupyterHub.cleanup_servers = True  # the demo: Ctrl-C stops the servers too\n"
                if stop_servers_with_hub
                else ""
            ),
        )
    )
    install_kernel_extension()
    return config, passwords


def run_demo_hub(state: Path | None = None, port: int = 8000) -> int:
    state = state or default_state_dir()
    config, passwords = prepare(state, port)
    log = state / "jupyterhub.log"
    print(f"gpulane demo hub: http://127.0.0.1:{port}/")
    print(f"  state and config: {state}   log: {log}")
    for user, password in passwords.items():
        admin = "  (gpulane admin)" if user == sorted(passwords)[0] else ""
        print(f"  user {user:<14} password {password}{admin}")
    print(
        "  in a notebook:  %%gpu  then your code.   Dashboard: /services/gpulane/   Ctrl-C stops."
    )
    sys.stdout.flush()
    hub = shutil.which("jupyterhub", path=str(Path(sys.executable).parent)) or "jupyterhub"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [hub, "-f", str(config)], cwd=state, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            return proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait(30)
            return 0
