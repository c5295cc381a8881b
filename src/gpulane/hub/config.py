"""What a ``jupyterhub_config.py`` calls to set up gpulane, with options in JupyterHub's style.

    # jupyterhub_config.py
    from gpulane.hub import configure
    configure(c, admin_users={"alice"}, simulate_gpus=0)

or, as any traitlets option, ``c.GpulaneHub.slices = 2``, before or after ``configure(c)``:
inside the hub the settings are applied when the hub starts, after the whole file ran
(:func:`configure`), so the last assignment of an option wins wherever it stands.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, Float, Integer, List, Set, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from gpulane import config
from gpulane.broker.hub_auth import ADMIN_SCOPE
from gpulane.errors import OptionError
from gpulane.jobs import parse_count, parse_duration

SERVICE_NAME = "gpulane"
GROUP_SOURCES = ("unix", "hub")

# The broker's policy options a hub admin sets, with `gpulane broker`'s defaults; each is
# passed on the service's command line only where it differs.
BROKER_DURATIONS = {
    "default_time": "1h",
    "max_time": "24h",
    "half_life": "10m",
    "starvation_after": "1h",
    "lease_ttl": "10s",
    "kill_grace": "10s",
}


class GpulaneHub(LoggingConfigurable):
    """gpulane inside JupyterHub: the broker as a managed service, the magic in every kernel."""

    broker_socket = Unicode(
        str(config.DEFAULT_SOCKET),
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

    gpu_source = Unicode(
        "nvml",
        help="Where the broker's GPUs come from: 'nvml' (this machine) or 'k8s' (the "
        "cluster's allocatable GPUs, read with the hub pod's service account; set slices to "
        "the time-slicing replicas).",
    ).tag(config=True)

    gpu_resource = Unicode(
        "nvidia.com/gpu",
        help="With gpu_source 'k8s': the node resource the broker counts (nvidia.com/gpu.shared "
        "after time-slicing --rename-shared).",
    ).tag(config=True)

    k8s_namespace = Unicode(
        "",
        help="With gpu_source 'k8s': the hub's namespace, whose GPU servers keep their leases "
        "across a hub pod restart (default: the hub pod's service account's).",
    ).tag(config=True)

    slices = Integer(1, help="Cut each GPU into this many time-sliced slices.").tag(config=True)

    max_running_per_user = Integer(
        0, help="Cap on running jobs per user (0: none); `gpulane broker --max-running-per-user`."
    ).tag(config=True)

    default_time = Unicode(
        BROKER_DURATIONS["default_time"], help="Time limit of a job that gives none, e.g. 1h."
    ).tag(config=True)

    max_time = Unicode(
        BROKER_DURATIONS["max_time"], help="Longest time limit a job may ask for, e.g. 8h."
    ).tag(config=True)

    half_life = Unicode(BROKER_DURATIONS["half_life"], help="Fair-share usage half-life.").tag(
        config=True
    )

    starvation_after = Unicode(
        BROKER_DURATIONS["starvation_after"],
        help="A job waiting this long goes first and reserves GPUs.",
    ).tag(config=True)

    lease_ttl = Unicode(
        BROKER_DURATIONS["lease_ttl"],
        help="Free a GPU whose kernel sent no heartbeat this long.",
    ).tag(config=True)

    kill_grace = Unicode(
        BROKER_DURATIONS["kill_grace"], help="SIGTERM to SIGKILL grace for revoked jobs."
    ).tag(config=True)

    user_shares = Dict(
        value_trait=Float(),
        help="Fair-share weights per user, e.g. {'alice': 2}; unlisted users weigh 1.",
    ).tag(config=True)

    group_shares = Dict(
        value_trait=Float(),
        help="Fair-share weights per group (of group_source), e.g. {'physics': 3, 'chem': 1}; "
        "a group's share is split among its members with jobs.",
    ).tag(config=True)

    gpu_groups = Set(
        Unicode(),
        help="Groups (of group_source) allowed to use GPUs; empty: everyone.",
    ).tag(config=True)

    group_source = Unicode(
        "hub",
        help="Where the broker reads every user's groups (GPU and admin groups), for hub "
        "tokens and the Unix socket alike: 'unix' (the system's groups, as PAM logins have; "
        "usermod -a -G) or 'hub' (the hub's groups, as OIDC logins have).",
    ).tag(config=True)

    broker_args = List(
        Unicode(),
        help="Deprecated: more raw `gpulane broker` options; set the typed options instead "
        "(max_running_per_user, max_time, gpu_groups, ...).",
    ).tag(config=True)

    dashboard_port = Integer(
        9873,
        help="Loopback port of the broker's dashboard, served by the hub's proxy under /services/gpulane/.",
    ).tag(config=True)

    dashboard_ip = Unicode(
        "127.0.0.1",
        help="Address the dashboard listens on: loopback where the hub's proxy runs beside "
        "the hub; 0.0.0.0 in a hub pod on Kubernetes, whose proxy runs in its own pod and "
        "reaches the dashboard through the hub's Service (dashboard_url).",
    ).tag(config=True)

    api_port = Integer(
        0,
        help="With gpu_source 'k8s': the TCP port of the broker's API for kernels in user "
        "pods, named by their server's hub token only (0: none; zero-to-jupyterhub: 9874, "
        "`gpulane k8s hub-values` sets it and opens it to user pods only).",
    ).tag(config=True)

    api_ip = Unicode(
        "0.0.0.0",
        help="With api_port: the address the broker's API listens on in the hub pod.",
    ).tag(config=True)

    api_url = Unicode(
        "",
        help="With api_port: where kernels in user pods reach the broker's API, given them "
        "as GPULANE_BROKER_URL (default http://hub:<api_port>, the hub's Service).",
    ).tag(config=True)

    dashboard_url = Unicode(
        "",
        help="The gpulane service's URL, where the hub's proxy sends /services/gpulane/ "
        "(default http://127.0.0.1:<dashboard_port>; on zero-to-jupyterhub "
        "http://hub:<dashboard_port>, the hub's Service).",
    ).tag(config=True)

    admin_users = Set(
        Unicode(),
        help="Hub users who are gpulane admins (cancel any job); they get the custom:gpulane:admin scope.",
    ).tag(config=True)

    admin_groups = Set(
        Unicode(), help="Groups (of group_source) whose members are gpulane admins."
    ).tag(config=True)

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

    @validate("slices", "simulate_gpus", "dashboard_port", "idle_timeout", "api_port")
    def _non_negative(self, proposal: dict[str, Any]) -> int:
        value = int(proposal["value"])
        if proposal["trait"].name == "api_port" and value > 65535:
            raise ValueError(f"GpulaneHub.api_port must be a port up to 65535, not {value}")
        if value < 0 or (proposal["trait"].name == "slices" and value < 1):
            raise ValueError(f"GpulaneHub.{proposal['trait'].name} must be positive, not {value}")
        return value

    @validate("dashboard_ip", "api_ip")
    def _dashboard_ip(self, proposal: dict[str, Any]) -> str:
        import ipaddress

        value = str(proposal["value"])
        try:
            ipaddress.ip_address(value)
        except ValueError:
            name = proposal["trait"].name
            raise TraitError(
                f"GpulaneHub.{name} {value!r} must be an IP address, e.g. 0.0.0.0"
            ) from None
        return value

    @validate("api_url")
    def _api_url(self, proposal: dict[str, Any]) -> str:
        from urllib.parse import urlsplit

        value = str(proposal["value"])
        if value and (urlsplit(value).scheme != "http" or not urlsplit(value).hostname):
            raise TraitError(
                f"GpulaneHub.api_url {value!r} must be an http:// URL, e.g. http://hub:9874"
            )
        return value

    @validate("dashboard_url")
    def _dashboard_url(self, proposal: dict[str, Any]) -> str:
        from urllib.parse import urlsplit

        value = str(proposal["value"])
        parts = urlsplit(value)
        if value and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise TraitError(
                f"GpulaneHub.dashboard_url {value!r} must be an http(s):// URL, e.g. http://hub:9873"
            )
        return value

    @validate("gpu_source")
    def _gpu_source(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if value not in ("nvml", "k8s"):
            raise TraitError(f"GpulaneHub.gpu_source {value!r} must be 'nvml' or 'k8s'")
        return value

    @validate("group_source")
    def _group_source(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        if value not in GROUP_SOURCES:
            raise TraitError(f"GpulaneHub.group_source {value!r} must be 'unix' or 'hub'")
        return value

    @validate("max_running_per_user")
    def _cap(self, proposal: dict[str, Any]) -> int:
        value = proposal["value"]
        if value != 0:
            try:
                parse_count(str(value), "", maximum=10_000)
            except OptionError:
                raise TraitError(
                    f"GpulaneHub.max_running_per_user {value!r} must be 0 (no cap) "
                    "or a whole number from 1 to 10000"
                ) from None
        return int(value)

    @validate(*BROKER_DURATIONS)
    def _duration(self, proposal: dict[str, Any]) -> str:
        value = str(proposal["value"])
        try:
            parse_duration(value, f"GpulaneHub.{proposal['trait'].name}")
        except OptionError as error:
            raise TraitError(str(error)) from None
        return value

    @validate("broker_args")
    def _deprecated_broker_args(self, proposal: dict[str, Any]) -> list[str]:
        args = list(proposal["value"])
        if args:
            self.log.warning(
                "GpulaneHub.broker_args is deprecated: %s", "; ".join(_typed_options(args))
            )
        return args

    def broker_command(self) -> list[str]:
        command = [
            self.python, "-m", "gpulane", "broker",
            "--socket", self.broker_socket,
            "--state-dir", self.state_dir,
            "--slices", str(self.slices),
            "--dashboard-port", str(self.dashboard_port),
        ]  # fmt: skip
        if self.dashboard_ip != "127.0.0.1":
            command += ["--dashboard-ip", self.dashboard_ip]
        if self.simulate_gpus:
            command += ["--simulate-gpus", str(self.simulate_gpus), "--gpu-memory", self.gpu_memory]
        elif self.gpu_source == "k8s":
            command += ["--gpu-source", "k8s", "--gpu-resource", self.gpu_resource]
            if self.k8s_namespace:
                command += ["--k8s-namespace", self.k8s_namespace]
            if self.api_port:  # for kernels in user pods, which cannot reach the socket
                command += ["--api-ip", self.api_ip, "--api-port", str(self.api_port)]
        if self.max_running_per_user:
            command += ["--max-running-per-user", str(self.max_running_per_user)]
        for name, broker_default in BROKER_DURATIONS.items():
            value = getattr(self, name)
            if value != broker_default:
                command += [f"--{name.replace('_', '-')}", value]
        if self.gpu_groups:
            command += ["--gpu-groups", ",".join(sorted(self.gpu_groups))]
        for option, shares in (
            ("--user-shares", self.user_shares),
            ("--group-shares", self.group_shares),
        ):
            if shares:
                command += [option, ",".join(f"{k}={v:g}" for k, v in sorted(shares.items()))]
        # The same admins over a hub token and over the Unix socket (broker/access.py).
        if self.admin_users:
            command += ["--admin-users", ",".join(sorted(self.admin_users))]
        if self.admin_groups:
            command += ["--admin-groups", ",".join(sorted(self.admin_groups))]
        command += ["--group-source", self.group_source]
        return command + list(self.broker_args)

    def broker_environment(self) -> dict[str, str]:
        """What the managed broker needs of the hub's environment beyond JupyterHub's few
        kept variables: on Kubernetes, where the API is (the service account's host and
        port in the hub pod, or a kubeconfig elsewhere)."""
        if self.gpu_source != "k8s":
            return {}
        names = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "KUBECONFIG")
        return {name: os.environ[name] for name in names if name in os.environ}

    def apply(self, c: Any) -> None:
        """Write the settings into JupyterHub's config object ``c``."""
        services = list(_existing(c.JupyterHub, "services", []))
        services.append(
            {
                "name": SERVICE_NAME,
                "command": self.broker_command(),
                "url": self.dashboard_url or f"http://127.0.0.1:{self.dashboard_port}",
                "oauth_no_confirm": True,
                "display": True,
                "info": {"description": "GPU queue and usage"},
                "environment": self.broker_environment(),
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
                # Hub groups only where the hub's groups are the ones that count; with
                # Unix groups the broker reads the admin groups itself.
                "groups": sorted(self.admin_groups) if self.group_source == "hub" else [],
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
                    # Not `-m jupyterhub_idle_culler`: that one ignores the hub's SIGINT
                    # where the hub inherited SIGINT ignored, and each stop waited 30 s.
                    "command": [
                        self.python,
                        "-m",
                        "gpulane.hub.culler",
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
        environment[config.SOCKET_ENV] = self.broker_socket
        if self.gpu_source == "k8s" and self.api_port:
            # User pods have no broker socket: their kernels reach its API over TCP, and
            # %%gpu cells run in worker pods the broker creates (scheduler/kube.py).
            environment.pop(config.SOCKET_ENV)
            url = self.api_url or f"http://hub:{self.api_port}"
            environment[config.BROKER_URL_ENV] = url
            environment.setdefault(config.BACKEND_ENV, "kubernetes")
            # zero-to-jupyterhub sets c.KubeSpawner.environment (singleuser.extraEnv), which
            # shadows c.Spawner.environment for its pods: merge these into it too.
            if "environment" in c.KubeSpawner:
                pods = {**environment, **c.KubeSpawner.environment}
                pods.pop(config.SOCKET_ENV, None)
                pods[config.BROKER_URL_ENV] = url
                c.KubeSpawner.environment = pods
        if self.idle_culler:
            # Kernels with GPU work queued or running report activity this often, so the
            # culler never takes a server mid-job (src/gpulane/kernel/activity.py).
            environment[config.ACTIVITY_INTERVAL_ENV] = str(activity_interval(self.idle_timeout))
        c.Spawner.environment = environment
        # The server's token names its user to the broker; with the groups and the admin
        # scope on it, the broker applies GPU groups and admin rights to hub users.
        scopes = set(_existing(c.Spawner, "server_token_scopes", [])) or {
            "access:servers!server",
            "users:activity!user",
        }
        # The broker accepts only tokens meant for it (access to the gpulane service); the
        # hub keeps each scope only where the server's owner holds it (the user role does).
        scopes |= {
            "read:users:groups!user",
            "read:users:name!user",
            f"access:services!service={SERVICE_NAME}",
            ADMIN_SCOPE,
        }
        c.Spawner.server_token_scopes = sorted(scopes)
        # A hub restart is routine (an upgrade, a config change): servers, their kernels,
        # running %%gpu cells and GPU-profile leases live through it. JupyterHub's default
        # stops every server on shutdown.
        if "cleanup_servers" not in c.JupyterHub:
            c.JupyterHub.cleanup_servers = False
        # Safe defaults: loopback unless the admin says otherwise, no shared admin rights.
        if "ip" not in c.JupyterHub and "bind_url" not in c.JupyterHub:
            c.JupyterHub.ip = "127.0.0.1"


def activity_interval(idle_timeout: int) -> int:
    """Seconds between a busy kernel's activity reports: a quarter of the culler's timeout,
    at least 5 s (the hub's load) and at most 300 s (jupyterhub-singleuser's own interval)."""
    return max(5, min(300, idle_timeout // 4))


def _typed_options(args: list[str]) -> list[str]:
    """For each ``--option`` in ``broker_args``, the typed GpulaneHub trait that replaces it."""
    typed = {
        "--admin-groups": "admin_groups (hub groups)",
        "--socket": "broker_socket",
        **{f"--{name.replace('_', '-')}": name for name in GpulaneHub.class_own_traits()},
    }
    hints = []
    for arg in args:
        option = arg.split("=", 1)[0]
        if option.startswith("--") and option != "--broker-args":
            replacement = typed.get(option)
            hints.append(
                f"use GpulaneHub.{replacement} instead of {option}"
                if replacement
                else f"{option} has no typed option yet"
            )
    return hints or ["set the typed GpulaneHub options instead"]


def _existing(section: Any, name: str, default: Any) -> Any:
    """A value the config already holds (unset keys of traitlets' Config are lazy placeholders)."""
    return section.get(name, default)


def configure(c: Any, **options: Any) -> GpulaneHub:
    """Configure gpulane in a jupyterhub_config.py.

    Keyword options are written into ``c.GpulaneHub`` where the call stands. Inside the
    hub (``jupyterhub -f ...``), the settings are applied when the hub starts, once the
    whole file has run: ``c.GpulaneHub.x = ...`` (and ``c.Spawner.environment``, ...) set
    after this call count too, and a bad value set anywhere stops the hub at start with
    one line, exit status 2. Elsewhere (a test, a script) they are applied at once.
    """
    for name in options:
        if not GpulaneHub.class_traits(config=True).get(name):
            raise TypeError(f"GpulaneHub has no option {name!r}; see `gpulane hub --help-options`")
    hub = _validated(c, options)
    for name, value in options.items():
        c.GpulaneHub[name] = value
    app = _starting_hub()
    if app is None:
        hub.apply(c)
    elif not getattr(app, "_gpulane_deferred", False):
        app._gpulane_deferred = True  # once per hub, even where configure runs twice
        original = app.init_logging

        def apply_at_start() -> None:
            # JupyterHub calls init_logging right after loading the config file, whose
            # values its own traits already hold: the completed config is loaded again.
            app.init_logging = original
            patch = copy.deepcopy(app.config)
            _validated(patch, {}).apply(patch)
            app.update_config(patch)
            original()

        app.init_logging = apply_at_start
    return hub


def _validated(c: Any, options: dict[str, Any]) -> GpulaneHub:
    try:
        hub = GpulaneHub(config=c)
        for name, value in options.items():
            setattr(hub, name, value)
    except (TraitError, ValueError) as error:
        # jupyterhub_config.py is loaded by the hub, which would print the whole traceback;
        # a bad value is a usage error: one line naming the option, exit status 2.
        print(f"gpulane: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    return hub


def _starting_hub() -> Any:
    """The JupyterHub application loading this config file, if one is (never imported here)."""
    module = sys.modules.get("jupyterhub.app")
    hub_class = getattr(module, "JupyterHub", None)
    if hub_class is None or not hub_class.initialized():
        return None
    return hub_class.instance()


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
