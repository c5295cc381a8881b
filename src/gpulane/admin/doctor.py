"""``gpulane doctor``: is this machine ready to run GPU jobs through Slurm?

Each check is a small function of a :class:`Context` that returns a :class:`Finding`:
a status (ok, warn, fail), a one-line finding, and the command that fixes it. Every
subprocess call takes an argv list and a timeout; ``SLURM_CONF`` is respected.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shlex
import site
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_SLURM_CONF = Path("/etc/slurm/slurm.conf")
DEFAULT_MUNGE_SOCKET = "/run/munge/munge.socket.2"
TIMEOUT_S = 10.0
GENERATED_WITH = "# Generated with: "  # the comment `gpulane slurm config` leaves in slurm.conf
CUDA_LIBS = ("libcudnn.so", "libnccl.so", "libcublas.so", "libcudart.so")
LD_CONF_FILE = "/etc/ld.so.conf.d/gpulane-pip-nvidia.conf"
WSL_LIB = "/usr/lib/wsl/lib"
# Node state words that make a node unusable until someone acts, and ones that pass.
BAD_STATES = {
    "DOWN",
    "DRAIN",
    "DRAINED",
    "DRAINING",
    "FAIL",
    "FAILING",
    "INVAL",
    "INVALID",
    "INVALID_REG",
    "NOT_RESPONDING",
    "NO_RESPOND",
}
TRANSIENT_STATES = {"UNKNOWN", "FUTURE", "POWERED_DOWN", "POWERING_UP", "REBOOT_REQUESTED"}


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # "ok", "warn" or "fail"
    message: str  # one line
    fix: str = ""  # the command that fixes it; empty when ok

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


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
                fields = dict(_kv(token) for token in line.split() if "=" in token)
                if fields.get("nodename", "").upper() != "DEFAULT":
                    nodes.append(fields)
            elif not line.lower().startswith("partitionname="):
                key, value = _kv(line)
                settings.setdefault(key, value)
        return cls(path, settings, nodes, generated_with)

    def get(self, key: str, default: str = "") -> str:
        return self.settings.get(key.lower(), default)

    def node(self, hostname: str) -> dict[str, str] | None:
        for fields in self.nodes:
            if hostname in expand_hostlist(fields.get("nodename", "")):
                return fields
        return self.nodes[0] if len(self.nodes) == 1 else None


def _kv(text: str) -> tuple[str, str]:
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
    _cache: dict[str, object] = field(default_factory=dict)

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
        return self._cache.get("munge_ok") is False

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


# --------------------------------------------------------------------------- munge


def munge_roundtrip(socket_path: str, timeout: float) -> tuple[bool, str]:
    """``munge -n | unmunge`` as two processes joined by a pipe; (worked, detail)."""
    args = ["--socket", socket_path]
    try:
        encode = subprocess.Popen(
            ["munge", "-n", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    except FileNotFoundError:
        return False, "munge is not installed"
    assert encode.stdout is not None and encode.stderr is not None
    try:
        decode = subprocess.Popen(
            ["unmunge", *args],
            stdin=encode.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        encode.kill()
        encode.communicate()
        return False, "unmunge is not installed"
    encode.stdout.close()  # unmunge holds the read end now
    try:
        out, err = decode.communicate(timeout=timeout)
        encode.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc in (encode, decode):
            proc.kill()
            proc.wait()
        return False, f"munge -n | unmunge timed out after {timeout:.0f} s"
    encode_err = encode.stderr.read().decode(errors="replace").strip()
    encode.stderr.close()
    if encode.returncode != 0:
        return False, encode_err.splitlines()[-1] if encode_err else "munge -n failed"
    if decode.returncode != 0:
        text = err.decode(errors="replace").strip()
        return False, text.splitlines()[-1] if text else "unmunge failed"
    status = re.search(r"STATUS:\s+(.*)", out.decode(errors="replace"))
    return True, status.group(1).strip() if status else "Success"


def check_munge(ctx: Context) -> Finding:
    worked, detail = munge_roundtrip(ctx.munge_socket, ctx.timeout)
    ctx._cache["munge_ok"] = worked
    if worked:
        return Finding("munge", "ok", f"munge -n | unmunge round-trips a credential ({detail})")
    if "not installed" in detail:
        return Finding("munge", "fail", detail, "apt-get install munge")
    return Finding(
        "munge",
        "fail",
        f"munge -n | unmunge fails on {ctx.munge_socket}: {detail}",
        ctx.start_command("munged"),
    )


# --------------------------------------------------------------------------- daemons


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def processes(name: str) -> list[int]:
    """PIDs whose command name is ``name`` (from /proc, like pgrep -x)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _comm(int(entry.name)) == name:
            pids.append(int(entry.name))
    return sorted(pids)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def check_munged(ctx: Context) -> Finding:
    pids = processes("munged")
    if ctx.munge_socket != DEFAULT_MUNGE_SOCKET:  # a private munged: match its socket
        pids = [p for p in pids if any(ctx.munge_socket in a for a in _cmdline(p))]
    if pids:
        return Finding("munged", "ok", f"munged is running (pid {pids[0]})")
    return Finding(
        "munged",
        "fail",
        f"no munged is running for {ctx.munge_socket}",
        ctx.start_command("munged"),
    )


def check_slurm_conf(ctx: Context) -> Finding:
    if ctx.conf is None:
        return Finding(
            "slurm.conf",
            "fail",
            f"cannot read {ctx.slurm_conf_path} ({ctx.conf_error})",
            ctx.regenerate_command(),
        )
    nodes = ", ".join(n.get("nodename", "?") for n in ctx.conf.nodes) or "none"
    if ctx.conf.node(ctx.hostname) is None:
        return Finding(
            "slurm.conf",
            "fail",
            f"{ctx.slurm_conf_path} defines no node named {ctx.hostname} (nodes: {nodes})",
            ctx.regenerate_command(),
        )
    return Finding("slurm.conf", "ok", f"{ctx.slurm_conf_path} defines node(s) {nodes}")


def _daemon_pid(ctx: Context, name: str) -> tuple[int | None, str]:
    key = "SlurmctldPidFile" if name == "slurmctld" else "SlurmdPidFile"
    pid_file = ctx.conf.get(key) if ctx.conf else ""
    pid_file = pid_file or f"/run/{name}.pid"
    try:
        pid = int(Path(pid_file).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None, pid_file
    return (pid if _comm(pid) == name else None), pid_file


def check_daemon(ctx: Context, name: str) -> Finding:
    pid, pid_file = _daemon_pid(ctx, name)
    if pid is not None:
        return Finding(name, "ok", f"{name} is running (pid {pid}, from {pid_file})")
    others = processes(name)
    if others:
        return Finding(
            name,
            "warn",
            f"{pid_file} names no live {name}, but {name} pid {others[0]} runs "
            "(another cluster's, or started with another slurm.conf?)",
            ctx.start_command(name),
        )
    fatal = last_fatal(ctx.log_file(name))
    said = f"{name} is not running ({pid_file})" + (
        f"; its log ends with: {fatal}" if fatal else ""
    )
    return Finding(name, "fail", said, ctx.start_command(name))


def last_fatal(log: Path, tail_bytes: int = 65536) -> str:
    """The last ``fatal:`` line of a daemon's log (without its timestamp), or ""."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines[-50:]):
        if "fatal:" in line:
            return line[line.index("fatal:") :].strip()
    return ""


def check_slurmctld(ctx: Context) -> Finding:
    return check_daemon(ctx, "slurmctld")


def check_slurmd(ctx: Context) -> Finding:
    return check_daemon(ctx, "slurmd")


def _no_conf(ctx: Context, name: str) -> Finding:
    # Without a readable slurm.conf every Slurm command fails after its timeout; say so once.
    return Finding(
        name, "fail", f"skipped: no readable {ctx.slurm_conf_path}", ctx.regenerate_command()
    )


def check_ping(ctx: Context) -> Finding:
    if ctx.conf is None:
        return _no_conf(ctx, "scontrol ping")
    result = run(["scontrol", "ping"], ctx)
    if result.rc == 127:
        return Finding(
            "scontrol ping", "fail", "Slurm is not installed", "apt-get install slurm-wlm"
        )
    text = result.out.strip().splitlines()[0] if result.out.strip() else result.detail
    if result.rc == 0 and "is UP" in text:
        return Finding("scontrol ping", "ok", text)
    if ctx.munge_broken():
        return Finding(
            "scontrol ping",
            "fail",
            f"{text} (munge does not work, so no Slurm RPC authenticates)",
            ctx.start_command("munged"),
        )
    return Finding(
        "scontrol ping",
        "fail",
        f"slurmctld does not answer: {text}",
        ctx.start_command("slurmctld"),
    )


# --------------------------------------------------------------------------- node and GRES


def parse_scontrol_oneliner(line: str) -> dict[str, str]:
    """One ``scontrol show node -o`` line -> fields; values may contain spaces (Reason, OS)."""
    starts = [m for m in re.finditer(r"(?:^|\s)([A-Za-z_]+)=", line)]
    fields = {}
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(line)
        fields[match.group(1)] = line[match.end() : end].strip()
    return fields


def node_finding(ctx: Context, fields: dict[str, str]) -> Finding:
    """A finding for one node from its scontrol fields (pure: unit-testable)."""
    name = fields.get("NodeName", "?")
    state = fields.get("State", "?")
    words = set(state.replace("*", "").split("+"))
    reason = fields.get("Reason", "")
    said = f"node {name} is {state}" + (f", Reason={reason}" if reason else "")
    resume = f"scontrol update nodename={name} state=resume"
    bad = words & BAD_STATES
    if not bad:
        if words & TRANSIENT_STATES:
            return Finding(
                "node", "warn", said + " (not registered yet?)", ctx.start_command("slurmd")
            )
        return Finding("node", "ok", said)
    if words & {"INVALID_REG", "INVAL", "INVALID"}:
        return Finding(
            "node",
            "fail",
            said + " (INVALID_REG: what slurmd found differs from slurm.conf)",
            f"{ctx.regenerate_command()} && {ctx.restart_slurm_command()} && {resume}",
        )
    if "NOT_RESPONDING" in words or "not responding" in reason.lower():
        return Finding("node", "fail", said, f"{ctx.start_command('slurmd')} && {resume}")
    if re.search(r"gres/|count reported lower|Low RealMemory|Low socket|Low CPUs", reason):
        # The mismatch was found at an earlier registration; the node registers fine now.
        said += " (left from an earlier registration that did not match slurm.conf)"
    return Finding("node", "fail", said, resume)


def check_node(ctx: Context) -> Finding:
    if ctx.conf is None:
        return _no_conf(ctx, "node")
    result = run(["scontrol", "show", "node", "-o"], ctx)
    if result.rc != 0:
        fix = ctx.start_command("munged" if ctx.munge_broken() else "slurmctld")
        return Finding("node", "fail", f"scontrol show node -o: {result.detail}", fix)
    nodes = [parse_scontrol_oneliner(line) for line in result.out.splitlines() if line.strip()]
    if not nodes:
        return Finding("node", "fail", "slurmctld knows no nodes", ctx.regenerate_command())
    mine = [n for n in nodes if n.get("NodeName") == ctx.hostname] or nodes
    findings = [node_finding(ctx, n) for n in mine]
    worst = max(findings, key=lambda f: ("ok", "warn", "fail").index(f.status))
    return worst


def gpu_count(gres: str) -> int:
    """``gpu:2,shard:8`` or ``gpu:a100:2(S:0)`` -> 2."""
    total = 0
    for item in gres.split(","):
        parts = re.sub(r"\(.*?\)", "", item).split(":")
        if parts[0] == "gpu":
            total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


@dataclass(frozen=True)
class GresLine:
    """One ``Name=gpu`` line of gres.conf for this host."""

    files: tuple[str, ...]
    count: int | None  # Count= where given

    @property
    def gpus(self) -> int:
        return len(self.files) if self.files else (self.count or 1)


def gres_conf_gpu_lines(text: str, hostname: str) -> list[GresLine]:
    found = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        fields = dict(_kv(token) for token in line.split() if "=" in token)
        if fields.get("name") != "gpu":
            continue
        if "nodename" in fields and hostname not in expand_hostlist(fields["nodename"]):
            continue
        files = [f for item in fields.get("file", "").split(",") for f in expand_hostlist(item)]
        count = int(fields["count"]) if fields.get("count", "").isdigit() else None
        found.append(GresLine(tuple(files), count))
    return found


def _is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def check_gres(ctx: Context) -> Finding:
    """slurm.conf's Gres=gpu:N against gres.conf's lines and the device files they name."""
    if ctx.conf is None:
        return Finding("gres", "fail", "no slurm.conf to read Gres= from", ctx.regenerate_command())
    node = ctx.conf.node(ctx.hostname) or {}
    configured = gpu_count(node.get("gres", ""))
    gres_path = ctx.conf_dir / "gres.conf"
    try:
        lines = gres_conf_gpu_lines(gres_path.read_text(), ctx.hostname)
    except OSError:
        lines = []
    fix = f"{ctx.regenerate_command()} && {ctx.restart_slurm_command()}"
    resume = f"scontrol update nodename={node.get('nodename', ctx.hostname)} state=resume"
    if configured == 0:
        return Finding("gres", "fail", f"slurm.conf gives node {ctx.hostname} no Gres=gpu:N", fix)
    for line in lines:
        if line.files and line.count is not None and line.count != len(line.files):
            return Finding(
                "gres",
                "fail",
                f"{gres_path}: Count={line.count} but File= names {len(line.files)}: slurmd "
                "exits (fatal: Invalid GRES record for gpu, count does not match File value)",
                fix,
            )
    files = [f for line in lines for f in line.files]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        return Finding(
            "gres",
            "fail",
            f"gres.conf lists {', '.join(missing)}, which does not exist: slurmd waits ~20 s "
            "for it, then exits (fatal: can't stat gres.conf file)",
            fix,
        )
    listed = sum(line.gpus for line in lines)
    if listed < configured:
        return Finding(
            "gres",
            "fail",
            f"slurm.conf configures gpu:{configured} but {gres_path} lists {listed}: the node "
            f"registers INVALID_REG (gres/gpu count reported lower than configured)",
            f"{fix} && {resume}",
        )
    if listed > configured:
        return Finding(
            "gres",
            "warn",
            f"{gres_path} lists {listed} GPUs but slurm.conf configures gpu:{configured}: "
            "only those are scheduled",
            fix,
        )
    odd = [f for f in files if not _is_char_device(f)]
    if odd:
        return Finding(
            "gres",
            "warn",
            f"{', '.join(odd)} in gres.conf is not a character device, so not a GPU "
            "(slurmd logs an error but counts it)",
            fix,
        )
    nvml = _nvml_count(ctx)
    if nvml is not None and not ctx.wsl and nvml != configured:
        return Finding(
            "gres",
            "warn",
            f"gpu:{configured} configured and in gres.conf, but NVML sees {nvml} GPU(s)",
            fix,
        )
    return Finding(
        "gres", "ok", f"gpu:{configured} configured, {listed} in gres.conf, device files present"
    )


# --------------------------------------------------------------------------- GPUs


def check_gpu_devices(ctx: Context) -> Finding:
    if ctx.wsl:
        if Path("/dev/dxg").exists():
            return Finding("gpu devices", "ok", "WSL2: GPUs are reached through /dev/dxg")
        return Finding(
            "gpu devices",
            "fail",
            "WSL2 without /dev/dxg: no GPU is passed through",
            "wsl --update  # in Windows, with the NVIDIA Windows driver installed",
        )
    files = sorted(p for p in glob.glob("/dev/nvidia[0-9]*") if re.fullmatch(r"/dev/nvidia\d+", p))
    if files:
        return Finding("gpu devices", "ok", f"{len(files)} GPU device file(s): {', '.join(files)}")
    return Finding(
        "gpu devices",
        "fail",
        "no /dev/nvidia[0-9]* device files (is the NVIDIA driver installed and loaded?)",
        "modprobe nvidia && nvidia-smi",
    )


def _nvml(ctx: Context) -> tuple[int | None, str]:
    """(GPU count, detail) from NVML; count None where NVML cannot be read."""
    cached = ctx._cache.get("nvml")
    if isinstance(cached, tuple):
        return cached
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as error:  # pynvml's own NVMLError types, or ImportError
        value: tuple[int | None, str] = (None, str(error) or type(error).__name__)
    else:
        try:
            count = int(pynvml.nvmlDeviceGetCount())
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else str(driver)
            value = (count, f"driver {driver}")
        except Exception as error:
            value = (None, str(error) or type(error).__name__)
        finally:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
    ctx._cache["nvml"] = value
    return value


def _nvml_count(ctx: Context) -> int | None:
    return _nvml(ctx)[0]


def check_nvml(ctx: Context) -> Finding:
    count, detail = _nvml(ctx)
    if count:
        return Finding("nvml", "ok", f"NVML reads {count} GPU(s), {detail}")
    if count == 0:
        return Finding("nvml", "fail", f"NVML works but reports no GPUs ({detail})", "nvidia-smi")
    if ctx.wsl:
        fix = (
            f"echo {WSL_LIB} > /etc/ld.so.conf.d/ld.wsl.conf && ldconfig"
            if "Library Not Found" in detail
            else "wsl --shutdown  # in Windows, then reopen WSL"
        )
    elif "Library Not Found" in detail:
        fix = "apt-get install nvidia-driver && reboot"
    elif "Driver Not Loaded" in detail:
        fix = "modprobe nvidia"
    else:
        fix = "nvidia-smi  # shows what the driver reports"
    return Finding("nvml", "fail", f"NVML cannot be read: {detail}", fix)


# --------------------------------------------------------------------------- CUDA libraries


def default_python_prefixes() -> list[Path]:
    places = [*site.getsitepackages(), site.getusersitepackages(), sys.prefix]
    return [Path(p) for p in dict.fromkeys(places) if os.path.isdir(p)]


def pip_nvidia_lib_dirs(prefixes: Iterable[Path]) -> list[Path]:
    """``nvidia/*/lib`` folders of pip's nvidia-* wheels under each prefix or site-packages."""
    patterns = (
        "nvidia/*/lib",
        "lib/python3*/site-packages/nvidia/*/lib",
        "lib64/python3*/site-packages/nvidia/*/lib",
        "lib/python3*/dist-packages/nvidia/*/lib",
    )
    found: dict[Path, None] = {}
    for prefix in prefixes:
        for pattern in patterns:
            for match in sorted(glob.glob(str(prefix / pattern))):
                found[Path(match).resolve()] = None
    return list(found)


def loader_names(ctx: Context) -> tuple[set[str], list[Path]]:
    """Library names the dynamic loader resolves: ldconfig's cache and LD_LIBRARY_PATH."""
    result = run(["ldconfig", "-p"], ctx)
    if result.rc == 127:
        result = run(["/sbin/ldconfig", "-p"], ctx)
    names = {
        line.split()[0] for line in result.out.splitlines()[1:] if line.strip() and "=>" in line
    }
    dirs = [Path(d) for d in ctx.env.get("LD_LIBRARY_PATH", "").split(":") if d]
    return names, dirs


def check_cuda_libs(ctx: Context) -> Finding:
    prefixes = ctx.python_prefixes or default_python_prefixes()
    lib_dirs = pip_nvidia_lib_dirs(prefixes)
    libs = [
        (d, f.name) for d in lib_dirs for f in sorted(d.iterdir()) if f.name.startswith(CUDA_LIBS)
    ]
    where = ", ".join(str(p) for p in prefixes)
    if not libs:
        return Finding("cuda libs", "ok", f"no pip nvidia-* CUDA libraries under {where}")
    names, ld_dirs = loader_names(ctx)
    resolved_dirs = {d.resolve() for d in ld_dirs if d.exists()}
    unseen = [
        (d, name)
        for d, name in libs
        if name not in names
        and d not in resolved_dirs
        and not any((ld / name).exists() for ld in ld_dirs)
    ]
    if not unseen:
        return Finding(
            "cuda libs",
            "ok",
            f"{len(libs)} pip CUDA libraries, all on the loader path",
        )
    dirs = list(dict.fromkeys(d for d, _ in unseen))
    shown = ", ".join(dict.fromkeys(name for _, name in unseen))
    return Finding(
        "cuda libs",
        "warn",
        f"{shown} from pip's nvidia-* packages ({', '.join(map(str, dirs))}) are not on the "
        "loader path (ldconfig -p, LD_LIBRARY_PATH): programs that load them by name fail",
        f"printf '%s\\n' {' '.join(shlex.quote(str(d)) for d in dirs)} > {LD_CONF_FILE} && ldconfig",
    )


# --------------------------------------------------------------------------- all of it

CHECKS: tuple[Callable[[Context], Finding], ...] = (
    check_munge,
    check_munged,
    check_slurm_conf,
    check_slurmctld,
    check_slurmd,
    check_ping,
    check_node,
    check_gres,
    check_gpu_devices,
    check_nvml,
    check_cuda_libs,
)
SLURM_CHECKS = (
    "munge",
    "munged",
    "slurm.conf",
    "slurmctld",
    "slurmd",
    "scontrol ping",
    "node",
    "gres",
)


def run_checks(
    ctx: Context, checks: Iterable[Callable[[Context], Finding]] = CHECKS
) -> list[Finding]:
    findings = []
    for check in checks:
        try:
            findings.append(check(ctx))
        except Exception as error:  # a broken check must not hide the others
            name = check.__name__.removeprefix("check_")
            findings.append(Finding(name, "fail", f"check crashed: {error!r}", ""))
    return findings


def report(findings: list[Finding]) -> str:
    width = max(len(f.name) for f in findings)
    lines = []
    for f in findings:
        lines.append(
            f"{f.status.upper() if f.status != 'ok' else 'ok':<5} {f.name:<{width}}  {f.message}"
        )
        if f.fix:
            lines.append(f"{'':<5} {'':<{width}}  fix: {f.fix}")
    failed = sum(f.status == "fail" for f in findings)
    warned = sum(f.status == "warn" for f in findings)
    lines.append(f"{failed} failed, {warned} warning(s), {len(findings) - failed - warned} ok")
    return "\n".join(lines)
