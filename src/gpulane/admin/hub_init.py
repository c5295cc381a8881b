"""``gpulane hub init``: a production JupyterHub with gpulane on this machine, in one command.

Run as root on a fresh machine, it writes and says what it wrote:

- ``jupyterhub_config.py`` (PAM logins, LocalProcessSpawner, gpulane configured with
  Unix GPU and admin groups, servers kept across hub restarts);
- the hub's state folder (0700): cookie secret (0600), database, proxy pid;
- the proxy (configurable-http-proxy, installed with npm where it is missing);
- the kernel extension, and ``gpulane`` on the PATH of every server, terminal and shell;
- the GPU and admin groups (Unix groups: the broker reads them for hub tokens and the
  socket alike);
- a systemd unit for the hub (which runs the broker itself: no separate broker unit).
  Where systemd is not running it prints the exact command that the unit runs.

Idempotent: a file that is already as it would be written is left alone; one that an
admin edited is kept, the new version written beside it (``--force`` replaces it and
keeps a ``.bak``). ``--dry-run`` prints every file and command instead.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from gpulane import __version__
from gpulane.errors import GpulaneError

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STANDALONE_BROKER_UNIT = "gpulane-broker.service"


@dataclass(frozen=True)
class InitOptions:
    port: int = 8000
    ip: str = "127.0.0.1"
    hub_port: int = 8081
    proxy_api_port: int = 8001
    dashboard_port: int = 9873
    config_dir: Path = Path("/etc/jupyterhub")
    state_dir: Path = Path("/var/lib/jupyterhub")
    broker_state_dir: Path = Path("/var/lib/gpulane")
    socket: Path = Path("/run/gpulane/broker.sock")
    bin_dir: Path = Path("/usr/local/bin")
    unit_dir: Path = Path("/etc/systemd/system")
    unit_name: str = "jupyterhub"
    simulate_gpus: int | None = None  # None: read the GPUs through NVML
    slices: int = 1
    gpu_group: str = "gpu"
    admin_group: str = "gpu-admin"
    admins: tuple[str, ...] = ()
    idle_timeout: int = 3600
    ssl_cert: str = ""
    ssl_key: str = ""
    force: bool = False
    dry_run: bool = False
    python: str = field(default_factory=lambda: sys.executable)

    @property
    def env_bin(self) -> Path:
        return Path(self.python).parent

    @property
    def config_file(self) -> Path:
        return self.config_dir / "jupyterhub_config.py"

    @property
    def unit_file(self) -> Path:
        return self.unit_dir / f"{self.unit_name}.service"

    @property
    def path(self) -> str:
        return f"{self.env_bin}:{SYSTEM_PATH}"

    def hub_argv(self) -> list[str]:
        return [str(self.env_bin / "jupyterhub"), "-f", str(self.config_file)]

    def hub_command(self) -> str:
        """The command the unit runs, as one shell line (for machines without systemd)."""
        return (
            f"cd {shlex.quote(str(self.state_dir))} && PATH={shlex.quote(self.path)} "
            f"exec {shlex.join(self.hub_argv())}"
        )


CONFIG_TEMPLATE = """\
# jupyterhub_config.py, written by `gpulane hub init` (gpulane {version}).
# Rerun `gpulane hub init` with other options to rewrite it (an edited file is kept and
# the new one written beside it). Every line is explained in docs/admin-hub.md.
from gpulane.hub import configure

# Where the hub listens. Keep 127.0.0.1 behind a TLS-terminating proxy, or set
# ssl_cert and ssl_key to serve HTTPS here: PAM passwords must not cross a network in clear.
c.JupyterHub.ip = {ip!r}
c.JupyterHub.port = {port}
{ssl}c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.command = [{proxy!r}]
c.ConfigurableHTTPProxy.pid_file = "{state}/proxy.pid"

# The hub's state, in a folder only root reads: database and cookie secret.
c.JupyterHub.db_url = "sqlite:///{state}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{state}/jupyterhub_cookie_secret"

# Logins: this machine's accounts and passwords (PAM), every account but root.
# Hub admins (who manage every user's server) are listed by name in admin_users;
# gpulane admins (who cancel anyone's GPU job) are the group {admin_group!r} below.
c.JupyterHub.authenticator_class = "jupyterhub.auth.PAMAuthenticator"
c.Authenticator.allow_all = True
c.Authenticator.blocked_users = {{"root"}}
c.Authenticator.admin_users = set()

# Each server runs as its user, in their home folder, with this environment's Python;
# gpulane and this environment's commands are on the PATH of every server and terminal.
c.JupyterHub.spawner_class = "jupyterhub.spawner.LocalProcessSpawner"
c.Spawner.cmd = [{singleuser!r}]
c.Spawner.default_url = "/lab"
c.Spawner.notebook_dir = "~"
c.Spawner.environment = {{"PATH": {path!r}}}

configure(
    c,
    # One set of groups for every way in (a notebook's token, a terminal, ssh): Unix
    # groups. Add a user with: usermod -a -G {gpu_group} USER
    group_source="unix",
    gpu_groups={{{gpu_group!r}}},
    admin_groups={{{admin_group!r}}},
    simulate_gpus={simulate},
    slices={slices},
    idle_timeout={idle_timeout},
    broker_socket={socket!r},
    state_dir={broker_state!r},
    dashboard_port={dashboard_port},
)
"""

UNIT_TEMPLATE = """\
# Written by `gpulane hub init` (gpulane {version}). The hub starts gpulane's broker and
# the idle culler itself, as managed services: do not also run gpulane-broker.service.
[Unit]
Description=JupyterHub with gpulane (shared GPUs)
After=network-online.target nvidia-persistenced.service
Wants=network-online.target

[Service]
User=root
WorkingDirectory={state}
Environment=PATH={path}
ExecStart={command}
Restart=always
RestartSec=2
# Only the hub is stopped: users' servers (and their running cells) outlive a restart,
# as configure's cleanup_servers = False intends; the hub stops its own services.
KillMode=process
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""


class Steps:
    """What init did (or, with --dry-run, would do), one line each."""

    def __init__(self, dry_run: bool, say: Callable[[str], None] = print) -> None:
        self.dry_run = dry_run
        self.say = say

    def run(self, argv: list[str], why: str) -> None:
        if self.dry_run:
            self.say(f"would run: {shlex.join(argv)}  # {why}")
            return
        result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            raise GpulaneError(f"{shlex.join(argv)} failed ({why}): {detail[0]}")
        self.say(f"ran: {shlex.join(argv)}  # {why}")

    def folder(self, path: Path, mode: int, why: str) -> None:
        if self.dry_run:
            self.say(f"would make folder {path} (mode {mode:o})  # {why}")
            return
        existed = path.is_dir()
        path.mkdir(parents=True, exist_ok=True, mode=mode)
        path.chmod(mode)
        self.say(f"{'kept' if existed else 'made'} folder {path} (mode {mode:o})  # {why}")

    def file(
        self, path: Path, text: str, mode: int, why: str, force: bool, show: bool = True
    ) -> None:
        if self.dry_run:
            self.say(f"would write {path} (mode {mode:o})  # {why}")
            if show:
                self.say("".join(f"    {line}\n" for line in text.splitlines()).rstrip("\n"))
            return
        if path.exists() and path.read_text() == text:
            path.chmod(mode)
            self.say(f"unchanged {path}  # {why}")
            return
        if path.exists() and not force:
            new = path.with_name(path.name + ".new")
            _write(new, text, mode)
            self.say(
                f"kept {path}: it differs from what init writes (edited?); the new version is "
                f"{new} (diff them, or rerun with --force to replace it, keeping a .bak)"
            )
            return
        if path.exists():
            shutil.copy2(path, path.with_name(path.name + ".bak"))
        _write(path, text, mode)
        self.say(f"wrote {path} (mode {mode:o})  # {why}")


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def _nvml_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no driver, no GPU
        return 0


def find_proxy() -> str | None:
    return shutil.which("configurable-http-proxy") or shutil.which(
        "configurable-http-proxy", path=SYSTEM_PATH
    )


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def render_config(options: InitOptions, proxy: str, simulate: int) -> str:
    ssl = ""
    if options.ssl_cert:
        ssl = (
            f"c.JupyterHub.ssl_cert = {options.ssl_cert!r}\n"
            f"c.JupyterHub.ssl_key = {options.ssl_key!r}\n"
        )
    return CONFIG_TEMPLATE.format(
        version=__version__,
        ip=options.ip,
        port=options.port,
        ssl=ssl,
        hub_port=options.hub_port,
        proxy_api_port=options.proxy_api_port,
        proxy=proxy,
        state=options.state_dir,
        singleuser=str(options.env_bin / "jupyterhub-singleuser"),
        path=options.path,
        gpu_group=options.gpu_group,
        admin_group=options.admin_group,
        simulate=simulate,
        slices=options.slices,
        idle_timeout=options.idle_timeout,
        socket=str(options.socket),
        broker_state=str(options.broker_state_dir),
        dashboard_port=options.dashboard_port,
    )


def render_unit(options: InitOptions) -> str:
    return UNIT_TEMPLATE.format(
        version=__version__,
        state=options.state_dir,
        path=options.path,
        command=shlex.join(options.hub_argv()),
    )


def systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def init_hub(options: InitOptions, say: Callable[[str], None] = print) -> int:
    """Set up the hub; returns the exit status (0: done, or printed with --dry-run)."""
    if not options.dry_run and os.geteuid() != 0:
        raise GpulaneError("gpulane hub init sets up users' servers and groups: run it as root")
    if (options.ssl_cert == "") != (options.ssl_key == ""):
        raise GpulaneError("give both --ssl-cert and --ssl-key, or neither")
    for needed in ("jupyterhub", "jupyterhub-singleuser"):
        if not (options.env_bin / needed).exists():
            raise GpulaneError(
                f"{options.env_bin / needed} is missing: install the hub in this environment "
                f"first: {options.env_bin / 'pip'} install 'gpulane[hub]'"
            )
    steps = Steps(options.dry_run, say)
    say(f"gpulane hub init{' --dry-run' if options.dry_run else ''}: a JupyterHub with gpulane")

    # GPUs: NVML's, unless simulated.
    simulate = options.simulate_gpus
    if simulate is None:
        if not _nvml_gpus():
            raise GpulaneError(
                "NVML finds no GPU on this machine (is the NVIDIA driver loaded? try "
                "nvidia-smi); to try gpulane without one: gpulane hub init --simulate-gpus 1"
            )
        simulate = 0
    say(f"GPUs: {'simulated, ' + str(simulate) if simulate else 'read through NVML'}; "
        f"{options.slices} slice(s) per GPU")  # fmt: skip

    # The proxy.
    proxy = find_proxy()
    if proxy is None:
        if shutil.which("npm") is None:
            steps.run(["apt-get", "install", "-y", "nodejs", "npm"], "npm, for the proxy")
        steps.run(["npm", "install", "-g", "configurable-http-proxy"], "JupyterHub's proxy")
        proxy = find_proxy() or "/usr/local/bin/configurable-http-proxy"
    else:
        say(f"proxy: {proxy}")

    # Groups, in one place that the hub token and the socket both read: Unix groups.
    for group, why in (
        (options.gpu_group, "may use GPUs"),
        (options.admin_group, "gpulane admins: may cancel anyone's GPU job"),
    ):
        if _group_exists(group):
            say(f"group {group} exists  # {why}")
        else:
            steps.run(["groupadd", "--system", group], why)
    for user in options.admins:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise GpulaneError(f"--admin {user}: no such user on this machine") from None
        steps.run(["usermod", "-a", "-G", options.admin_group, user], "a gpulane admin")

    # Folders and files.
    steps.folder(options.config_dir, 0o755, "the hub's configuration")
    steps.folder(options.state_dir, 0o700, "the hub's database and cookie secret: root only")
    steps.folder(options.broker_state_dir, 0o700, "the broker's database: root only")
    secret = options.state_dir / "jupyterhub_cookie_secret"
    if options.dry_run:
        say(f"would write {secret} (mode 600, 32 random bytes in hex)  # signs login cookies")
    elif secret.exists():
        secret.chmod(0o600)
        say(f"kept {secret} (mode 600)  # signs login cookies; kept, so logins survive")
    else:
        _write(secret, secrets.token_hex(32) + "\n", 0o600)
        say(f"wrote {secret} (mode 600)  # signs login cookies")
    steps.file(
        options.config_file,
        render_config(options, proxy, simulate),
        0o644,
        "the hub's configuration (no secrets in it)",
        options.force,
    )
    steps.file(options.unit_file, render_unit(options), 0o644, "the hub's unit", options.force)
    standalone = options.unit_dir / STANDALONE_BROKER_UNIT
    if standalone.exists():
        say(
            f"warning: {standalone} exists; the hub runs its own broker, and two brokers "
            f"cannot share the GPUs: systemctl disable --now {STANDALONE_BROKER_UNIT}"
        )

    # %%gpu in every kernel; gpulane on everyone's PATH.
    if options.dry_run:
        say(f"would add the %%gpu extension to {_kernel_config()}")
    else:
        from gpulane.hub.config import install_kernel_extension

        say(f"kernel extension: {install_kernel_extension()}  # %%gpu in every kernel")
    link = options.bin_dir / "gpulane"
    target = options.env_bin / "gpulane"
    if options.dry_run:
        say(f"would link {link} -> {target}  # gpulane on every login shell's PATH")
    elif link.is_symlink() and os.readlink(link) == str(target):
        say(f"unchanged {link} -> {target}")
    elif link.exists() and not link.is_symlink():
        say(f"kept {link}: not a link (another gpulane?); the servers' PATH has {target}")
    else:
        options.bin_dir.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()
        link.symlink_to(target)
        say(f"linked {link} -> {target}  # gpulane on every login shell's PATH")

    # Start it.
    if systemd_running() and options.unit_dir == InitOptions.unit_dir:
        steps.run(["systemctl", "daemon-reload"], "read the new unit")
        steps.run(
            ["systemctl", "enable", "--now", options.unit_name], "start the hub at boot and now"
        )
        say(f"after a change to the config: systemctl restart {options.unit_name}")
    else:
        say("systemd is not running here (or the unit is not in /etc/systemd/system); "
            "start the hub with the command the unit runs:")  # fmt: skip
        say(f"  {options.hub_command()}")
    scheme = "https" if options.ssl_cert else "http"
    say(f"the hub: {scheme}://{options.ip}:{options.port}/   dashboard: /services/gpulane/")
    say(f"let a user use GPUs: usermod -a -G {options.gpu_group} USER   "
        f"(admins: usermod -a -G {options.admin_group} USER); then: gpulane doctor")  # fmt: skip
    return 0


def _kernel_config() -> Path:
    from gpulane.hub.config import kernel_config_path

    return kernel_config_path()
