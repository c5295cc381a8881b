"""``gpulane doctor``'s Slurm checks: munge, the daemons, slurm.conf, the node and its GRES."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from gpulane.admin.doctor.context import (
    DEFAULT_MUNGE_SOCKET,
    Context,
    Finding,
    expand_hostlist,
    parse_key_value,
    run,
)
from gpulane.admin.doctor.gpus import nvml_count

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
    ctx.cache["munge_ok"] = worked
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
        fields = dict(parse_key_value(token) for token in line.split() if "=" in token)
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
    nvml = nvml_count(ctx)
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
