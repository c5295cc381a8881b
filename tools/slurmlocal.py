#!/usr/bin/env python3
"""Bring up a real one-node Slurm cluster with simulated GPUs, for tests and benchmarks.

Uses Debian's slurm-wlm (22.05) and munge. Everything Slurm writes (state, spool,
logs, pid files, config) lives under one directory, so several test runs can use
separate directories and ``stop`` only touches the daemons started for its directory.

CLI::

    python3 tools/slurmlocal.py start  --dir DIR [--gpus 2] [--shards-per-gpu 0] [--users a,b]
    python3 tools/slurmlocal.py stop   --dir DIR
    python3 tools/slurmlocal.py status --dir DIR

Library::

    env = start_cluster(Path(d), gpus=2, users=["alice"])   # {"SLURM_CONF": ...}
    stop_cluster(Path(d))
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

MUNGE_RUN = Path("/run/munge")
MUNGE_DIRS = (MUNGE_RUN, Path("/var/log/munge"), Path("/var/lib/munge"), Path("/etc/munge"))
MUNGE_KEY = Path("/etc/munge/munge.key")
DEFAULT_PORT = 6817  # slurmctld; slurmd uses port + 1
IDLE_TIMEOUT_S = 30.0

# Scheduler knobs, measured with benchmarks/slurm_baseline.py on a 2-core VM (handoff =
# gap between a job ending and the next job, pending on the same GPU, starting):
# - Epilog=/bin/true is the big one: handoff median ~400 ms (1 s periodic passes) or
#   ~1.6 s (default intervals) -> ~65-75 ms. Without an Epilog, slurmd just acks the
#   terminate RPC and slurmctld logs no scheduling pass until the next periodic one;
#   with it, slurmd sends MESSAGE_EPILOG_COMPLETE and slurmctld schedules on receipt.
#   Side effect: the node is COMPLETING for ~20 ms after each job, so an srun issued
#   in that window prints "queued and waiting for resources" and pends that long.
# - sched_interval=1 / bf_interval=1: backstop periodic passes (defaults 60 s / 30 s;
#   without the Epilog these alone gave ~400 ms median / ~830 ms max handoff).
# - batch_sched_delay=0: sbatch jobs are scheduled at submit, not up to 3 s later.
# - CompleteWait=0 (default, explicit): non-zero would block scheduling while any job
#   is COMPLETING; measured no gain from changing it.
# - KillWait=2: SIGTERM->SIGKILL grace on scancel/time limit (default 30 s), so a
#   cancelled job frees its GPU fast.
# - MinJobAge=60 keeps finished jobs visible to squeue/scontrol a while (no sacct here).
# MessageTimeout stays at its 10 s default: a shorter one gains nothing measurable and
# risks spurious RPC timeouts on a loaded CI box. SchedulerTimeSlice only matters for
# gang scheduling, which is off.
SCHED_SETTINGS = {
    "SchedulerType": "sched/backfill",
    "SchedulerParameters": "sched_interval=1,bf_interval=1,batch_sched_delay=0",
    "Epilog": "/bin/true",
    "CompleteWait": "0",
    "KillWait": "2",
    "MinJobAge": "60",
    "InactiveLimit": "0",
    "SlurmdTimeout": "300",
}


def log(msg: str) -> None:
    # stdout is reserved for the "export SLURM_CONF=..." line, so chatter goes to stderr.
    print(f"slurmlocal: {msg}", file=sys.stderr, flush=True)


def run(
    argv: list[str], env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    # One place for subprocess calls: text mode, captured output, argv lists only.
    return subprocess.run(argv, env=env, check=check, text=True, capture_output=True)


# --------------------------------------------------------------------------- packages


def ensure_packages() -> None:
    # Installing is slow and needs the network, so only do it when a daemon is missing.
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sinfo")):
        return
    log("installing slurm-wlm and munge with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(["apt-get", "update", "-qq"], env=env)
    run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"],
        env=env,
    )


# --------------------------------------------------------------------------- munge


def munge_works() -> bool:
    # Encoding a credential only succeeds when munged is up and reachable.
    if not shutil.which("munge"):
        return False
    return run(["munge", "-n"], check=False).returncode == 0


def ensure_munge_dirs() -> None:
    # munged refuses to start unless its dirs exist and belong to the munge user.
    munge = pwd.getpwnam("munge")
    for d in MUNGE_DIRS:
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    os.chmod(MUNGE_RUN, 0o755)  # clients (job users) must reach the socket


def ensure_munge_key() -> None:
    # The Debian postinst usually creates the key; containers built without it may not.
    if not MUNGE_KEY.exists():
        if shutil.which("mungekey"):
            run(["mungekey", "--create", "--keyfile", str(MUNGE_KEY)])
        else:
            run(["create-munge-key", "-f"])
    munge = pwd.getpwnam("munge")
    os.chown(MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    os.chmod(MUNGE_KEY, 0o400)


def start_munge() -> None:
    # Slurm authenticates every RPC through munge, so it must be running first.
    if munge_works():
        return
    ensure_munge_dirs()
    ensure_munge_key()
    log("starting munged")
    run(["runuser", "-u", "munge", "--", "munged"])
    deadline = time.monotonic() + 10
    while not munge_works():
        if time.monotonic() > deadline:
            raise RuntimeError("munged did not come up (see /var/log/munge/munged.log)")
        time.sleep(0.1)


# --------------------------------------------------------------------------- config


def node_name() -> str:
    # slurmd finds its NodeName from the short hostname, so the config must use it.
    return socket.gethostname().split(".")[0]


def node_hardware() -> str:
    """CPU topology and RealMemory for the NodeName line, as slurmd itself sees them."""
    # Taking slurmd -C's own view avoids an INVALID_REG node from a topology or memory
    # mismatch; RealMemory goes 10% under physical so registration never falls short.
    res = run(["slurmd", "-C"], check=False)
    fields = dict(kv.split("=", 1) for kv in res.stdout.split() if "=" in kv)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    if res.returncode != 0 or not all(k in fields for k in (*keys, "RealMemory")):
        return f"CPUs={os.cpu_count() or 1} RealMemory=1024"
    mem = int(fields["RealMemory"]) * 9 // 10
    return " ".join(f"{k}={fields[k]}" for k in keys) + f" RealMemory={mem}"


def paths(d: Path) -> dict[str, Path]:
    # The single source of truth for where things go under DIR.
    return {
        "conf": d / "slurm.conf",
        "gres": d / "gres.conf",
        "cgroup": d / "cgroup.conf",
        "state": d / "state",
        "spool": d / "spool",
        "log": d / "log",
        "run": d / "run",
        "ctld_pid": d / "run" / "slurmctld.pid",
        "slurmd_pid": d / "run" / "slurmd.pid",
        "ctld_log": d / "log" / "slurmctld.log",
        "slurmd_log": d / "log" / "slurmd.log",
    }


def gpu_range(d: Path, gpus: int) -> str:
    # Hostlist-style range keeps gres.conf one line whatever the GPU count.
    return str(d / "fakegpu0") if gpus == 1 else f"{d}/fakegpu[0-{gpus - 1}]"


def slurm_conf_text(d: Path, gpus: int, shards_per_gpu: int, port: int) -> str:
    # root runs everything; no cgroups/accounting so it works inside containers.
    p = paths(d)
    node = node_name()
    gres_types = "gpu,shard" if shards_per_gpu > 0 else "gpu"
    gres = f"gpu:{gpus}" + (f",shard:{gpus * shards_per_gpu}" if shards_per_gpu > 0 else "")
    settings = {
        "ClusterName": "slurmlocal",
        # The address in parentheses avoids depending on the hostname resolving.
        "SlurmctldHost": f"{node}(127.0.0.1)",
        "SlurmctldPort": str(port),
        "SlurmdPort": str(port + 1),
        "SlurmUser": "root",
        "SlurmdUser": "root",
        "AuthType": "auth/munge",
        "CredType": "cred/munge",
        "StateSaveLocation": str(p["state"]),
        "SlurmdSpoolDir": str(p["spool"]),
        "SlurmctldPidFile": str(p["ctld_pid"]),
        "SlurmdPidFile": str(p["slurmd_pid"]),
        "SlurmctldLogFile": str(p["ctld_log"]),
        "SlurmdLogFile": str(p["slurmd_log"]),
        "SlurmctldDebug": "info",
        "SlurmdDebug": "info",
        "ProctrackType": "proctrack/linuxproc",
        "TaskPlugin": "task/none",
        "SelectType": "select/cons_tres",
        "SelectTypeParameters": "CR_Core",
        "GresTypes": gres_types,
        "MpiDefault": "none",
        "JobAcctGatherType": "jobacct_gather/none",
        "AccountingStorageType": "accounting_storage/none",
        "JobCompType": "jobcomp/none",
        "ReturnToService": "2",
        "MailProg": "/bin/true",  # silences "Configured MailProg is invalid"
        **SCHED_SETTINGS,
    }
    lines = [f"{k}={v}" for k, v in settings.items()]
    lines.append(f"NodeName={node} NodeAddr=127.0.0.1 {node_hardware()} Gres={gres} State=UNKNOWN")
    lines.append(f"PartitionName=gpu Nodes={node} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def gres_conf_text(d: Path, gpus: int, shards_per_gpu: int) -> str:
    # AutoDetect=off: there is no NVML; the files are fake character devices.
    node = node_name()
    files = gpu_range(d, gpus)
    lines = ["AutoDetect=off", f"NodeName={node} Name=gpu File={files}"]
    if shards_per_gpu > 0:
        lines.append(f"NodeName={node} Name=shard Count={gpus * shards_per_gpu} File={files}")
    return "\n".join(lines) + "\n"


def cgroup_conf_text() -> str:
    # Nothing is constrained (task/none, proctrack/linuxproc); keep slurmd from probing.
    return "CgroupPlugin=autodetect\nIgnoreSystemd=yes\nConstrainDevices=no\nConstrainCores=no\n"


def make_fake_gpus(d: Path, gpus: int) -> None:
    # slurmd rejects regular files as GRES devices (node -> INVALID_REG); /dev/null's
    # major/minor (1,3) gives harmless character devices.
    for i in range(gpus):
        dev = d / f"fakegpu{i}"
        if dev.exists() or dev.is_symlink():
            if stat.S_ISCHR(dev.lstat().st_mode):
                continue
            dev.unlink()
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))


def write_config(d: Path, gpus: int, shards_per_gpu: int, port: int) -> bool:
    """Write the config files; return True when any of them changed."""
    p = paths(d)
    for key in ("state", "spool", "log", "run"):
        p[key].mkdir(parents=True, exist_ok=True)
    # Job users (not root) must read slurm.conf, so DIR must be traversable.
    os.chmod(d, 0o755)
    make_fake_gpus(d, gpus)
    wanted = {
        p["conf"]: slurm_conf_text(d, gpus, shards_per_gpu, port),
        p["gres"]: gres_conf_text(d, gpus, shards_per_gpu),
        p["cgroup"]: cgroup_conf_text(),
    }
    changed = False
    for path, text in wanted.items():
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            path.chmod(0o644)
            changed = True
    return changed


# --------------------------------------------------------------------------- daemons


def read_pid(pid_file: Path, name: str) -> int | None:
    # A pid file alone can be stale; check the process is alive and is the daemon.
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if name.encode() in cmdline else None


def daemons_running(d: Path) -> bool:
    p = paths(d)
    return (
        read_pid(p["ctld_pid"], "slurmctld") is not None
        and read_pid(p["slurmd_pid"], "slurmd") is not None
    )


def slurm_env(d: Path) -> dict[str, str]:
    # Every Slurm command and daemon finds this cluster only through SLURM_CONF.
    return dict(os.environ, SLURM_CONF=str(paths(d)["conf"]))


def kill_pid(pid: int, timeout: float = 10.0) -> None:
    # SIGTERM first so slurmctld saves state; SIGKILL only if it hangs.
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)


def stop_daemons(d: Path) -> None:
    p = paths(d)
    for key, name in (("slurmd_pid", "slurmd"), ("ctld_pid", "slurmctld")):
        pid = read_pid(p[key], name)
        if pid is not None:
            log(f"stopping {name} (pid {pid})")
            kill_pid(pid)
        p[key].unlink(missing_ok=True)


def start_daemons(d: Path) -> None:
    # -c: start from a clean state so jobs left over from an earlier run never hold GPUs.
    env = slurm_env(d)
    log("starting slurmctld and slurmd")
    run(["slurmctld", "-c"], env=env)
    run(["slurmd"], env=env)


def tail(path: Path, n: int = 30) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return "(missing)\n"


def node_state(d: Path) -> str:
    res = run(["sinfo", "-h", "-N", "-n", node_name(), "-o", "%T"], env=slurm_env(d), check=False)
    return res.stdout.strip() if res.returncode == 0 else ""


def wait_idle(d: Path, timeout: float = IDLE_TIMEOUT_S) -> None:
    # The node is usable once slurmd has registered and it shows idle.
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = node_state(d)
        if state == "idle":
            return
        if state.startswith("inval"):
            break  # INVALID_REG is final (config vs hardware mismatch): report it now
        time.sleep(0.2)
    p = paths(d)
    reason = run(["scontrol", "show", "node", node_name()], env=slurm_env(d), check=False).stdout
    raise RuntimeError(
        f"node not idle (state={state!r}, timeout {timeout:.0f}s)\n{reason}\n"
        f"--- {p['ctld_log']}\n{tail(p['ctld_log'])}--- {p['slurmd_log']}\n{tail(p['slurmd_log'])}"
    )


# --------------------------------------------------------------------------- users


def ensure_users(users: list[str]) -> None:
    # Jobs run as real Unix users, so each test user needs an account (and a home).
    for user in users:
        try:
            pwd.getpwnam(user)
        except KeyError:
            log(f"creating user {user}")
            run(["useradd", "-m", "-s", "/bin/bash", user])


# --------------------------------------------------------------------------- API


def start_cluster(
    dir: Path,
    gpus: int = 2,
    shards_per_gpu: int = 0,
    users: list[str] | None = None,
    port: int = DEFAULT_PORT,
) -> dict[str, str]:
    """Start (or reuse) the cluster for ``dir``; return env vars for Slurm clients."""
    if gpus < 1:
        raise ValueError("gpus must be >= 1")
    d = Path(dir).resolve()
    d.mkdir(parents=True, exist_ok=True)
    ensure_packages()
    start_munge()
    ensure_users(list(users or []))
    changed = write_config(d, gpus, shards_per_gpu, port)
    # Idempotent: same config and live daemons -> reuse them; a config change (e.g. a
    # new GresTypes) needs a slurmctld restart, so restart both.
    if changed or not daemons_running(d):
        stop_daemons(d)
        start_daemons(d)
    wait_idle(d)
    return {"SLURM_CONF": str(paths(d)["conf"])}


def stop_cluster(dir: Path) -> None:
    """Stop slurmd/slurmctld started for ``dir`` (munged is left running)."""
    stop_daemons(Path(dir).resolve())


def status_text(dir: Path) -> str:
    d = Path(dir).resolve()
    env = slurm_env(d)
    out = []
    for argv in (["sinfo"], ["scontrol", "show", "node"], ["squeue"]):
        res = run(argv, env=env, check=False)
        out.append(f"$ {' '.join(argv)}\n{res.stdout}{res.stderr}")
    return "\n".join(out)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("start", "stop", "status"):
        sp = sub.add_parser(name)
        sp.add_argument("--dir", type=Path, required=True)
        if name == "start":
            sp.add_argument("--gpus", type=int, default=2)
            sp.add_argument("--shards-per-gpu", type=int, default=0)
            sp.add_argument("--users", default="", help="comma-separated Unix users to create")
            sp.add_argument(
                "--port", type=int, default=DEFAULT_PORT, help="slurmctld port; slurmd uses +1"
            )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.cmd == "start":
            users = [u for u in args.users.split(",") if u]
            env = start_cluster(args.dir, args.gpus, args.shards_per_gpu, users, args.port)
            print(f"export SLURM_CONF={env['SLURM_CONF']}")
        elif args.cmd == "stop":
            stop_cluster(args.dir)
        else:
            print(status_text(args.dir), end="")
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        log(f"error: {exc}\n{detail}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
