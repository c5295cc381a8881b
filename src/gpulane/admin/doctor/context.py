"""What ``gpulane doctor``'s checks look at: slurm.conf, this host, and a bounded ``run``.

:class:`Context` is built once (:meth:`Context.from_environment`); every check is a
function of it that returns one :class:`Finding`.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

Site = TypeVar("Site")

DEFAULT_SLURM_CONF = Path("/etc/slurm/slurm.conf")
DEFAULT_MUNGE_SOCKET = "/run/munge/munge.socket.2"
TIMEOUT_S = 10.0
GENERATED_WITH = "# Generated with: "  # the comment `gpulane slurm config` leaves in slurm.conf


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # "ok", "warn" or "fail"
    message: str  # one line
    fix: str = ""  # the command that fixes it; empty when ok

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def run_each(checks: Iterable[Callable[[Site], Finding]], site: Site) -> list[Finding]:
    """Every check's finding, in order; a check that crashes is a finding, not the end."""
    findings = []
    for check in checks:
        try:
            findings.append(check(site))
        except Exception as error:  # a broken check must not hide the others
            name = check.__name__.removeprefix("check_").replace("_", " ")
            findings.append(Finding(name, "fail", f"check crashed: {error!r}", ""))
    return findings


# --------------------------------------------------------------------------- context


@dataclass(frozen=True)
class SlurmConf:
    """The parts of slurm.conf the checks need (keys lower-cased; first value wins)."""

    path: Path
    settings: dict[str, str]
    nodes: list[dict[str, str]]
    generated_with: str = ""  # the `gpulane slurm config` command line that wrote it

    @classmethod
    def parse(cls, path: Path, text: str) -> SlurmConf:
        settings: dict[str, str] = {}
        nodes: list[dict[str, str]] = []
        generated_with = ""
        for raw in text.splitlines():
            if raw.startswith(GENERATED_WITH) and not generated_with:
                generated_with = raw.removeprefix(GENERATED_WITH).strip()
            line = raw.split("#", 1)[0].strip()
            if "=" not in line:
                continue
            if line.lower().startswith("nodename="):
                fields = dict(parse_key_value(token) for token in line.split() if "=" in token)
                if fields.get("nodename", "").upper() != "DEFAULT":
                    nodes.append(fields)
            elif not line.lower().startswith("partitionname="):
                key, value = parse_key_value(line)
                settings.setdefault(key, value)
        return cls(path, settings, nodes, generated_with)

    def get(self, key: str, default: str = "") -> str:
        return self.settings.get(key.lower(), default)

    def node(self, hostname: str) -> dict[str, str] | None:
        for fields in self.nodes:
            if hostname in expand_hostlist(fields.get("nodename", "")):
                return fields
        return self.nodes[0] if len(self.nodes) == 1 else None


def parse_key_value(text: str) -> tuple[str, str]:
    """``Key = value`` -> (``key``, ``value``): Slurm's keys are case-insensitive."""
    key, _, value = text.partition("=")
    return key.strip().lower(), value.strip()


def expand_hostlist(text: str) -> list[str]:
    """``/dev/nvidia[0-1,3]`` or ``node[1-2]`` -> each name (one bracket group)."""
    match = re.fullmatch(r"(.*)\[([0-9,\-]+)\](.*)", text)
    if not match:
        return [text] if text else []
    head, ranges, tail = match.groups()
    names = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        width = len(lo)
        for i in range(int(lo), int(hi or lo) + 1):
            names.append(f"{head}{i:0{width}d}{tail}")
    return names


@dataclass
class Context:
    """Where to look: slurm.conf, this host, and the Python environments to check."""

    slurm_conf_path: Path
    conf: SlurmConf | None
    conf_error: str
    hostname: str
    wsl: bool
    systemd: bool
    env: dict[str, str]
    python_prefixes: list[Path] | None = None
    timeout: float = TIMEOUT_S
    # What one check learnt that a later one reads (munge works, NVML's answer).
    cache: dict[str, object] = field(default_factory=dict)

    @classmethod
    def from_environment(
        cls, python_prefixes: list[Path] | None = None, env: dict[str, str] | None = None
    ) -> Context:
        env = dict(os.environ if env is None else env)
        path = Path(env.get("SLURM_CONF") or DEFAULT_SLURM_CONF)
        conf, error = None, ""
        try:
            conf = SlurmConf.parse(path, path.read_text())
        except OSError as exc:
            error = exc.strerror or str(exc)
        try:
            version = Path("/proc/version").read_text()
        except OSError:
            version = ""
        return cls(
            slurm_conf_path=path,
            conf=conf,
            conf_error=error,
            hostname=socket.gethostname().split(".")[0],
            wsl="microsoft" in version.lower(),
            systemd=Path("/run/systemd/system").is_dir(),
            env=env,
            python_prefixes=python_prefixes,
        )

    @property
    def conf_dir(self) -> Path:
        return self.slurm_conf_path.parent

    @property
    def munge_socket(self) -> str:
        info = self.conf.get("AuthInfo") if self.conf else ""
        match = re.search(r"socket=([^,\s]+)", info)
        return match.group(1) if match else DEFAULT_MUNGE_SOCKET

    def start_command(self, service: str) -> str:
        """How to (re)start a daemon here: systemd where it runs, else the daemon itself."""
        if self.systemd:
            return f"systemctl restart {'munge' if service == 'munged' else service}"
        if service == "munged":
            extra = (
                f" --socket={self.munge_socket}"
                if self.munge_socket != DEFAULT_MUNGE_SOCKET
                else ""
            )
            return f"runuser -u munge -- munged{extra}"
        return service

    def regenerate_command(self) -> str:
        """``gpulane slurm config`` with the options slurm.conf was generated with."""
        if self.conf and self.conf.generated_with.startswith("gpulane slurm config "):
            return self.conf.generated_with
        return f"gpulane slurm config --out {shlex.quote(str(self.conf_dir))}"

    def restart_slurm_command(self) -> str:
        """Restart both daemons: slurmctld takes new node Gres= only from a restart."""
        if self.systemd:
            return "systemctl restart slurmctld slurmd && sleep 3"
        return "scontrol shutdown && sleep 3 && slurmctld && slurmd && sleep 2"

    def munge_broken(self) -> bool:
        return self.cache.get("munge_ok") is False

    def log_file(self, daemon: str) -> Path:
        key = "SlurmctldLogFile" if daemon == "slurmctld" else "SlurmdLogFile"
        return Path((self.conf.get(key) if self.conf else "") or f"/var/log/slurm/{daemon}.log")


@dataclass(frozen=True)
class Result:
    rc: int  # 127: not installed, 124: timed out
    out: str
    err: str

    @property
    def detail(self) -> str:
        text = (self.err or self.out).strip()
        return text.splitlines()[-1] if text else f"exit status {self.rc}"


def run(argv: list[str], ctx: Context) -> Result:
    try:
        done = subprocess.run(
            argv, env=ctx.env, capture_output=True, text=True, timeout=ctx.timeout, check=False
        )
    except FileNotFoundError:
        return Result(127, "", f"{argv[0]}: command not found")
    except subprocess.TimeoutExpired:
        return Result(124, "", f"{shlex.join(argv)} timed out after {ctx.timeout:.0f} s")
    return Result(done.returncode, done.stdout, done.stderr)
