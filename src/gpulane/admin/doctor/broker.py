"""``gpulane doctor`` on a machine with the embedded broker (a hub's, or a standalone one).

What it looks at comes from the hub's ``jupyterhub_config.py`` where there is one (loaded
as the hub loads it, so the broker's options are those ``configure`` writes), else from
the broker's defaults and ``$GPULANE_SOCKET``. Each check returns one Finding with its fix.
"""

from __future__ import annotations

import glob
import grp
import itertools
import json
import os
import re
import stat
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpulane import config
from gpulane.admin.doctor.context import Finding, run_each

DEFAULT_HUB_CONFIG = Path("/etc/jupyterhub/jupyterhub_config.py")


@dataclass
class BrokerSite:
    """The broker's and the hub's settings on this machine."""

    socket: Path
    state_dir: Path
    simulated: int = 0
    gpu_groups: tuple[str, ...] = ()
    admin_groups: tuple[str, ...] = ()
    group_source: str = "unix"
    hub_config: Path | None = None
    hub_url: str = ""
    hub_state: Path | None = None
    cookie_secret: Path | None = None
    server_python: Path | None = None
    unit: str = "gpulane-broker"
    cache: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def discover(cls, hub_config: Path | None = None) -> BrokerSite:
        path = hub_config or (DEFAULT_HUB_CONFIG if DEFAULT_HUB_CONFIG.exists() else None)
        if path is None:
            return cls(socket=config.socket_path(), state_dir=config.default_state_dir())
        return cls.from_hub_config(path)

    @classmethod
    def from_hub_config(cls, path: Path) -> BrokerSite:
        from traitlets.config.loader import PyFileConfigLoader

        c: Any = PyFileConfigLoader(path.name, path=str(path.parent)).load_config()
        services = c.JupyterHub.get("services", [])
        command = next((s["command"] for s in services if s.get("name") == "gpulane"), None)
        if command is None:
            raise FileNotFoundError(f"{path} registers no gpulane service (configure(c, ...))")
        options = _options(command)
        ip = c.JupyterHub.get("ip", "127.0.0.1") or "127.0.0.1"
        scheme = "https" if c.JupyterHub.get("ssl_cert") else "http"
        secret = c.JupyterHub.get("cookie_secret_file", "")
        db_url = str(c.JupyterHub.get("db_url", ""))
        cmd = c.Spawner.get("cmd", [])
        return cls(
            socket=Path(options.get("--socket", str(config.DEFAULT_SOCKET))),
            state_dir=Path(options.get("--state-dir", "/var/lib/gpulane")),
            simulated=int(options.get("--simulate-gpus", "0")),
            gpu_groups=_names(options.get("--gpu-groups", "")),
            admin_groups=_names(options.get("--admin-groups", "")),
            group_source=options.get("--group-source", "unix"),
            hub_config=path,
            hub_url=f"{scheme}://{'127.0.0.1' if ip in ('0.0.0.0', '') else ip}:{c.JupyterHub.get('port', 8000)}",
            hub_state=Path(db_url.removeprefix("sqlite:///")).parent
            if db_url.startswith("sqlite:///")
            else None,
            cookie_secret=Path(secret) if secret else None,
            server_python=Path(cmd[0]).parent / "python" if cmd else None,
            unit="jupyterhub",
        )

    @property
    def restart(self) -> str:
        return f"systemctl restart {self.unit}"


def _options(command: list[str]) -> dict[str, str]:
    found = {}
    for flag, value in itertools.pairwise(command):
        if flag.startswith("--"):
            found[flag] = value
    return found


def _names(text: str) -> tuple[str, ...]:
    return tuple(name for name in text.split(",") if name)


def _health(site: BrokerSite) -> dict[str, Any] | str:
    """The broker's /v1/health answer, or why there is none."""
    if "health" in site.cache:
        cached: dict[str, Any] | str = site.cache["health"]
        return cached
    import http.client
    import socket as sockets

    class _Unix(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(str(site.socket))

    answer: dict[str, Any] | str
    try:
        conn = _Unix("localhost", timeout=5)
        conn.request("GET", "/v1/status?limit=1")
        response = conn.getresponse()
        body = json.loads(response.read() or b"{}")
        answer = body if response.status == 200 else f"answered {response.status}: {body}"
        conn.close()
    except (OSError, ValueError) as error:
        answer = f"{type(error).__name__}: {error}"
    site.cache["health"] = answer
    return answer


def check_broker(site: BrokerSite) -> Finding:
    answer = _health(site)
    if isinstance(answer, str):
        how = (
            f"{site.restart}  # the hub runs the broker; its log: journalctl -u {site.unit}"
            if site.hub_config
            else f"systemctl start {site.unit}  # or: gpulane broker"
        )
        return Finding("broker", "fail", f"no answer on {site.socket} ({answer})", how)
    gpus = answer.get("gpus") or []
    return Finding("broker", "ok", f"answers on {site.socket}: {len(gpus)} GPU(s)")


def check_socket(site: BrokerSite) -> Finding:
    try:
        info = site.socket.lstat()
        folder = site.socket.parent.lstat()
    except OSError as error:
        return Finding("socket", "fail", f"{site.socket}: {error.strerror}", site.restart)
    if not stat.S_ISSOCK(info.st_mode):
        return Finding("socket", "fail", f"{site.socket} is not a socket", site.restart)
    if stat.S_IMODE(info.st_mode) & 0o666 != 0o666:
        return Finding(
            "socket",
            "fail",
            f"{site.socket} is mode {stat.S_IMODE(info.st_mode):o}: users cannot connect",
            site.restart + "  # the broker makes it 0666",
        )
    if folder.st_mode & 0o022 and not folder.st_mode & stat.S_ISVTX:
        return Finding(
            "socket", "fail", f"{site.socket.parent} is writable by others",
            f"chmod 755 {site.socket.parent}",
        )  # fmt: skip
    if folder.st_mode & 0o005 != 0o005:
        return Finding(
            "socket", "fail", f"{site.socket.parent} is closed to users' kernels",
            f"chmod 755 {site.socket.parent}",
        )  # fmt: skip
    return Finding("socket", "ok", f"{site.socket}: mode 666, its folder 755")


def check_state(site: BrokerSite) -> Finding:
    private: list[tuple[Path, int]] = [(site.state_dir, 0o700)]
    private += [(p, 0o600) for p in sorted(site.state_dir.glob("broker.sqlite3*"))]
    if site.hub_state is not None:
        private.append((site.hub_state, 0o700))
    if site.cookie_secret is not None:
        private.append((site.cookie_secret, 0o600))
    for path, mode in private:
        try:
            info = path.stat()
        except OSError as error:
            return Finding("state", "fail", f"{path}: {error.strerror}", site.restart)
        if info.st_mode & 0o077:
            return Finding(
                "state",
                "fail",
                f"{path} is mode {stat.S_IMODE(info.st_mode):o}: others can read it",
                f"chmod {mode:o} {path}",
            )
        if info.st_uid != os.geteuid():
            return Finding("state", "warn", f"{path} is owned by uid {info.st_uid}", "")
    names = ", ".join(str(p) for p, _ in private[:1] + private[-1:])
    return Finding("state", "ok", f"private (owner only): {names} and {len(private) - 2} more")


def check_gpus(site: BrokerSite) -> Finding:
    if site.simulated:
        return Finding("gpus", "ok", f"{site.simulated} simulated GPU(s): NVML is not needed")
    from gpulane.admin.doctor.gpus import _nvml

    count, detail = _nvml(site)  # type: ignore[arg-type]
    if not count:
        return Finding(
            "gpus", "fail", f"NVML cannot read a GPU ({detail})", "nvidia-smi  # the driver's view"
        )
    files = sorted(
        p for p in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia(\d+|ctl|-uvm)", p)
    )
    closed = [p for p in files if stat.S_IMODE(os.stat(p).st_mode) & 0o006 != 0o006]
    health = _health(site)
    if isinstance(health, dict) and health.get("device_access") == "enforced":
        # The broker opens /dev/nvidiaN to each holder; only the shared files must be open.
        closed = [p for p in closed if not re.fullmatch(r"/dev/nvidia\d+", p)]
    if closed:
        return Finding(
            "gpus",
            "fail",
            f"users cannot open {', '.join(closed)}: their jobs would see no GPU",
            f"chmod 666 {' '.join(closed)}  # or the driver's NVreg_DeviceFileMode=0666",
        )
    return Finding(
        "gpus", "ok", f"NVML reads {count} GPU(s) ({detail}); device files open to users"
    )


def check_device_driver(site: BrokerSite) -> Finding:
    """Does the NVIDIA driver leave the broker's device permissions alone (issue 14)?"""
    from gpulane.broker import nvidia_driver

    name = "device access"
    if site.simulated:
        return Finding(name, "ok", "simulated GPUs: no device files to guard")
    live = nvidia_driver.live_params()
    if live is None:
        return Finding(
            name, "warn", f"{nvidia_driver.PARAMS} is missing: no NVIDIA driver loaded",
            "modprobe nvidia && nvidia-smi",
        )  # fmt: skip
    why = nvidia_driver.resets_open(live)
    if not why:
        return Finding(name, "ok", "the NVIDIA driver keeps GPU device files closed to users")
    staged = nvidia_driver.modprobe_params()
    if staged is not None and not nvidia_driver.resets_open(staged):
        return Finding(
            name, "warn",
            f"{why}; {nvidia_driver.MODPROBE_DIR} fixes it once the module is loaded again",
            "update-initramfs -u && reboot  # or reload the nvidia module",
        )  # fmt: skip
    return Finding(name, "fail", f"{why}: the queue cannot be enforced", nvidia_driver.FIX_LINE)


def check_mps(site: BrokerSite) -> Finding:
    """CUDA MPS, the hard GPU memory cap (issue 14): the running broker's word, else what
    this machine offers (``MPS: off (nvidia-cuda-mps-control not found)``)."""
    import shutil

    from gpulane.broker import mps

    health = _health(site)
    line = health.get("mps") if isinstance(health, dict) else None
    if not isinstance(line, str) or not line:
        if site.simulated:
            line = "MPS: off (simulated GPUs)"
        elif shutil.which(mps.CONTROL) is None:
            line = f"MPS: off ({mps.CONTROL} not found)"
        else:
            return Finding("MPS", "warn", "the broker does not say whether MPS is on", site.restart)
    said = line.removeprefix("MPS: ")
    if said.startswith("on") or any(
        w in said for w in (mps.OFF_FLAG, "simulated", "no NVIDIA GPU")
    ):
        return Finding("MPS", "ok", said)
    fix = ""
    if mps.CONTROL in said:
        fix = (
            f"apt-get install nvidia-compute-utils-<driver branch>  # or start with {mps.OFF_FLAG}"
        )
    return Finding(
        "MPS", "warn", f"{said}: GPU memory past a grant is only watched, not capped", fix
    )


def check_kernel_extension(site: BrokerSite) -> Finding:
    from gpulane.hub.config import kernel_config_path

    python = site.server_python
    prefix = str(python.parent.parent) if python else None
    path = kernel_config_path(prefix)
    fix = f"{(python.parent if python else Path('/opt/gpulane/bin')) / 'gpulane'} hub install-kernel-extension"
    try:
        text = path.read_text()
    except OSError:
        return Finding("kernel extension", "fail", f"{path} is missing: no %%gpu in kernels", fix)
    if "'gpulane'" not in text:
        return Finding("kernel extension", "fail", f"{path} does not load gpulane", fix)
    return Finding(
        "kernel extension", "ok", f"every kernel of {prefix or 'this Python'} loads %%gpu"
    )


def check_hub(site: BrokerSite) -> Finding:
    if not site.hub_config:
        return Finding("hub", "ok", "no JupyterHub config here: a standalone broker")
    fix = f"{site.restart}  # its log: journalctl -u {site.unit}"
    for path, wanted in (("/hub/api/", (200,)), ("/services/gpulane/", (200, 302))):
        url = site.hub_url + path
        try:
            status = _get_status(url)
        except OSError as error:
            return Finding("hub", "fail", f"{url}: {error}", fix)
        if status not in wanted:
            what = "the proxy has no route to the dashboard" if "services" in path else "the hub"
            return Finding("hub", "fail", f"{url} answered {status} ({what})", fix)
    return Finding(
        "hub", "ok", f"the hub and its proxy answer at {site.hub_url}, dashboard included"
    )


def _get_status(url: str) -> int:
    class _NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def check_groups(site: BrokerSite) -> Finding:
    if not site.gpu_groups:
        return Finding("groups", "ok", "every user may use GPUs (no GPU group set)")
    if site.group_source == "hub":
        return Finding(
            "groups",
            "ok",
            f"GPU groups are hub groups ({', '.join(site.gpu_groups)}): the hub's Admin page",
        )
    missing = [g for g in site.gpu_groups + site.admin_groups if not _group(g)]
    if missing:
        return Finding(
            "groups",
            "fail",
            f"no Unix group {', '.join(missing)}: everyone is refused",
            " && ".join(f"groupadd --system {g}" for g in missing),
        )
    members = sorted({m for g in site.gpu_groups for m in _members(g)})
    if not members:
        group = site.gpu_groups[0]
        return Finding(
            "groups", "warn", f"no one is in {group} yet: GPU jobs are refused",
            f"usermod -a -G {group} USER",
        )  # fmt: skip
    shown = ", ".join(members[:5]) + (f" and {len(members) - 5} more" if len(members) > 5 else "")
    return Finding("groups", "ok", f"may use GPUs ({', '.join(site.gpu_groups)}): {shown}")


def _group(name: str) -> grp.struct_group | None:
    try:
        return grp.getgrnam(name)
    except KeyError:
        return None


def _members(name: str) -> list[str]:
    """Members of a group: listed ones and those whose primary group it is."""
    import pwd

    entry = _group(name)
    if entry is None:
        return []
    primary = [p.pw_name for p in pwd.getpwall() if p.pw_gid == entry.gr_gid]
    return [*entry.gr_mem, *primary]


BROKER_CHECKS: tuple[Callable[[BrokerSite], Finding], ...] = (
    check_broker,
    check_socket,
    check_state,
    check_gpus,
    check_device_driver,
    check_mps,
    check_kernel_extension,
    check_hub,
    check_groups,
)


def run_broker_checks(site: BrokerSite) -> list[Finding]:
    return run_each(BROKER_CHECKS, site)
