"""What a ``jupyterhub_config.py`` calls to set up gpulane, with options in JupyterHub's style.

    # jupyterhub_config.py
    from gpulane.hub import configure
    configure(c, admin_users={"alice"}, simulate_gpus=0)

or, as any traitlets option, ``c.GpulaneHub.slices = 2`` before ``configure(c)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Integer, List, Set, Unicode, default, validate
from traitlets.config import Configurable

from gpulane.broker.hub_auth import ADMIN_SCOPE

SERVICE_NAME = "gpulane"


class GpulaneHub(Configurable):
    """gpulane inside JupyterHub: the broker as a managed service, the magic in every kernel."""

    broker_socket = Unicode(
        "/run/gpulane/broker.sock",
        help="Unix socket of the broker; every single-user server and kernel is told it.",
    ).tag(config=True)

    state_dir = Unicode(
        "/var/lib/gpulane",
        help="Folder for the broker's database (kept across restarts).",
    ).tag(config=True)

    simulate_gpus = Integer(
        0,
        help="Simulate this many GPUs (for a machine without any); 0 reads the GPUs through NVML.",
    ).tag(config=True)

    gpu_memory = Unicode("16G", help="Memory of each simulated GPU.").tag(config=True)

    slices = Integer(1, help="Cut each GPU into this many time-sliced slices.").tag(config=True)

    broker_args = List(
        Unicode(),
        help="More `gpulane broker` options, e.g. ['--max-running-per-user', '2', '--gpu-groups', 'gpu'].",
    ).tag(config=True)

    dashboard_port = Integer(
        9873,
        help="Loopback port of the broker's dashboard, served by the hub's proxy under /services/gpulane/.",
    ).tag(config=True)

    admin_users = Set(
        Unicode(),
        help="Hub users who are gpulane admins (cancel any job); they get the custom:gpulane:admin scope.",
    ).tag(config=True)

    admin_groups = Set(Unicode(), help="Hub groups whose members are gpulane admins.").tag(
        config=True
    )

    idle_culler = Bool(True, help="Run jupyterhub-idle-culler as a managed service.").tag(
        config=True
    )

    idle_timeout = Integer(
        3600, help="Seconds of inactivity after which the idle culler stops a user's server."
    ).tag(config=True)

    extra_environment = Dict(
        help="More variables for every single-user server (never secrets: users can read them).",
    ).tag(config=True)

    python = Unicode(help="The Python that runs the broker (default: the hub's own).").tag(
        config=True
    )

    @default("python")
    def _python_default(self) -> str:
        return sys.executable

    @validate("slices", "simulate_gpus", "dashboard_port", "idle_timeout")
    def _non_negative(self, proposal: dict[str, Any]) -> int:
        value = int(proposal["value"])
        if value < 0 or (proposal["trait"].name == "slices" and value < 1):
            raise ValueError(f"GpulaneHub.{proposal['trait'].name} must be positive, not {value}")
        return value

    def broker_command(self) -> list[str]:
        command = [
            self.python, "-m", "gpulane", "broker",
            "--socket", self.broker_socket,
            "--state-dir", self.state_dir,
            "--slices", str(self.slices),
            "--dashboard-port", str(self.dashboard_port),
        ]  # fmt: skip
        if self.simulate_gpus:
            command += ["--simulate-gpus", str(self.simulate_gpus), "--gpu-memory", self.gpu_memory]
        return command + list(self.broker_args)

    def apply(self, c: Any) -> None:
        """Write the settings into JupyterHub's config object ``c``."""
        services = list(_existing(c.JupyterHub, "services", []))
        services.append(
            {
                "name": SERVICE_NAME,
                "command": self.broker_command(),
                "url": f"http://127.0.0.1:{self.dashboard_port}",
                "oauth_no_confirm": True,
                "display": True,
                "info": {"description": "GPU queue and usage"},
            }
        )
        roles = list(_existing(c.JupyterHub, "load_roles", []))
        # Every user may open the dashboard; kernels' tokens may tell the broker their groups.
        roles.append(
            {
                "name": "user",
                "scopes": ["self", f"access:services!service={SERVICE_NAME}"],
            }
        )
        custom = dict(_existing(c.JupyterHub, "custom_scopes", {}))
        custom[ADMIN_SCOPE] = {
            "description": "Cancel anyone's GPU jobs and see every job in gpulane."
        }
        c.JupyterHub.custom_scopes = custom
        roles.append(
            {
                "name": "gpulane-admin",
                "scopes": [ADMIN_SCOPE],
                "users": sorted(self.admin_users),
                "groups": sorted(self.admin_groups),
            }
        )
        # The broker asks the hub about tokens: it needs to read names and groups.
        roles.append(
            {
                "name": "gpulane-service",
                "scopes": ["read:users:name", "read:users:groups", "read:roles:users"],
                "services": [SERVICE_NAME],
            }
        )
        if self.idle_culler:
            services.append(
                {
                    "name": "idle-culler",
                    "command": [
                        self.python,
                        "-m",
                        "jupyterhub_idle_culler",
                        f"--timeout={self.idle_timeout}",
                    ],
                }
            )
            roles.append(
                {
                    "name": "idle-culler",
                    "scopes": [
                        "list:users",
                        "read:users:activity",
                        "read:servers",
                        "delete:servers",
                    ],
                    "services": ["idle-culler"],
                }
            )
        c.JupyterHub.services = services
        c.JupyterHub.load_roles = roles
        environment = dict(_existing(c.Spawner, "environment", {}))
        environment.update(self.extra_environment)
        environment["GPULANE_SOCKET"] = self.broker_socket
        c.Spawner.environment = environment
        # The server's token names its user to the broker; with the groups and the admin
        # scope on it, the broker applies GPU groups and admin rights to hub users.
        scopes = set(_existing(c.Spawner, "server_token_scopes", [])) or {
            "access:servers!server",
            "users:activity!user",
        }
        scopes |= {"read:users:groups!user", "read:users:name!user", ADMIN_SCOPE}
        c.Spawner.server_token_scopes = sorted(scopes)
        # Safe defaults: loopback unless the admin says otherwise, no shared admin rights.
        if "ip" not in c.JupyterHub and "bind_url" not in c.JupyterHub:
            c.JupyterHub.ip = "127.0.0.1"


def _existing(section: Any, name: str, default: Any) -> Any:
    """A value the config already holds (unset keys of traitlets' Config are lazy placeholders)."""
    return section.get(name, default)


def configure(c: Any, **options: Any) -> GpulaneHub:
    """Configure gpulane in a jupyterhub_config.py; keyword options override ``c.GpulaneHub``."""
    hub = GpulaneHub(config=c)
    for name, value in options.items():
        if not hub.has_trait(name):
            raise TypeError(f"GpulaneHub has no option {name!r}; see `gpulane hub --help-options`")
        setattr(hub, name, value)
    hub.apply(c)
    return hub


def kernel_config_path(prefix: str | None = None) -> Path:
    """IPython reads this file for every kernel of this Python environment."""
    return Path(prefix or sys.prefix) / "etc" / "ipython" / "ipython_kernel_config.py"


KERNEL_CONFIG_LINE = "c.InteractiveShellApp.extensions.append('gpulane')  # added by gpulane\n"


def install_kernel_extension(prefix: str | None = None) -> Path:
    """Load ``%%gpu`` in every kernel of this environment, for every user, without per-user files."""
    path = kernel_config_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else ""
    if "'gpulane'" not in existing:
        with open(path, "a") as handle:
            handle.write(KERNEL_CONFIG_LINE)
    path.chmod(0o644)
    return path
