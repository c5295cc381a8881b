"""``gpulane slurm config``: slurm.conf, gres.conf and cgroup.conf for this one machine.

:func:`gather_facts` reads the machine (NVML or device files, CPU topology, memory,
cgroups, WSL); :func:`render_config` turns those facts into file texts without looking
at the machine, so every branch is unit-testable with fixed :class:`MachineFacts`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import socket
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

# The machine or the options do not allow a config: one line, as every ConfigError.
from gpulane.errors import ConfigError

# Scheduler knobs that keep an interactive wait short; same values and reasons as
# tools/slurmlocal.py (measured there with benchmarks/slurm_baseline.py, 2-core VM).
SCHED_SETTINGS: tuple[tuple[str, str, str], ...] = (
    (
        "SchedulerType",
        "sched/backfill",
        "",
    ),
    (
        "SchedulerParameters",
        "sched_interval=1,bf_interval=1,batch_sched_delay=0",
        "Periodic scheduling passes every second (defaults 60 s / 30 s) as a backstop, and\n"
        "sbatch jobs scheduled at submit instead of up to 3 s later.",
    ),
    (
        "Epilog",
        "/bin/true",
        "The setting that matters most for handing a GPU over: with an Epilog, slurmd sends\n"
        "EPILOG_COMPLETE when a job ends and slurmctld schedules the next job on receipt\n"
        "(measured handoff ~70 ms); without one, the next job waits for a periodic pass\n"
        "(~0.4-1.6 s). Replace /bin/true with a real epilog if you have one; keep one set.",
    ),
    (
        "CompleteWait",
        "0",
        "Do not hold scheduling while a job is COMPLETING (the default, made explicit).",
    ),
    (
        "KillWait",
        "2",
        "SIGTERM-to-SIGKILL grace on scancel or time limit (default 30 s): a cancelled\n"
        "job frees its GPU within seconds.",
    ),
    (
        "MinJobAge",
        "60",
        "Finished jobs stay visible to squeue/scontrol for a minute (no accounting here).",
    ),
    ("InactiveLimit", "0", ""),
    ("SlurmdTimeout", "300", ""),
)

DEBIAN_STATE = Path("/var/lib/slurm")  # owned by the slurm user in Debian's packages
DEBIAN_LOG = Path("/var/log/slurm")
DEBIAN_RUN = Path("/run")  # Debian's systemd units expect /run/slurmctld.pid, /run/slurmd.pid
WSL_LIB = "/usr/lib/wsl/lib"


@dataclass(frozen=True)
class MachineFacts:
    """What the config depends on, read once from the machine by :func:`gather_facts`."""

    hostname: str  # short name: slurmd finds its NodeName from it
    cpus: int  # online logical CPUs
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    memory_mb: int  # MemTotal in MiB, what ``slurmd -C`` reports as RealMemory
    gpu_files: tuple[str, ...]  # one device file per GPU, in index order
    gpu_names: tuple[str, ...] = ()  # from NVML where it answered
    gpu_source: str = "nvml"  # "nvml", "--gpu-devices" or "/dev"
    wsl: bool = False
    cgroup2_controllers: tuple[str, ...] | None = None  # None: no unified v2 hierarchy
    bpf: bool = False  # kernel has the bpf syscall (cgroup v2 device control is eBPF)
    systemd: bool = False  # systemd is PID 1 (slurmd's cgroup/v2 then talks to it)


@dataclass(frozen=True)
class ConfigOptions:
    cluster_name: str = "gpulane"
    partition: str = "gpu"
    shards_per_gpu: int = 0
    port: int = 6817  # slurmctld; slurmd listens on port + 1
    state_dir: str | None = None  # state, spool and pid files; None: Debian's places
    log_dir: str | None = None
    slurm_user: str = "slurm"
    munge_socket: str | None = None  # None: munge's default socket
    wsl: bool = False  # force the WSL2 layout even where /proc/version does not say so
    extra_comments: tuple[str, ...] = field(default=())


# --------------------------------------------------------------------------- rendering


def cgroup_devices_usable(facts: MachineFacts) -> tuple[bool, str]:
    """Whether ConstrainDevices=yes can work here, and why not where it cannot."""
    if facts.wsl:
        return False, (
            "WSL2: every GPU is reached through the one /dev/dxg device, and the /dev/nvidiaN "
            "files are placeholders, so there is no per-GPU device file to fence off"
        )
    if facts.cgroup2_controllers is None:
        return False, (
            "/sys/fs/cgroup is not a unified cgroup v2 hierarchy (cgroup v1 or hybrid "
            "mount); gpulane enables device confinement only on cgroup v2"
        )
    if not facts.bpf:
        return False, (
            "the kernel has no bpf syscall, and cgroup v2 device control is done with eBPF programs"
        )
    return True, ""


def _comment(text: str) -> list[str]:
    return [f"# {line}" if line else "#" for line in text.splitlines()]


def _paths(options: ConfigOptions) -> dict[str, str]:
    if options.state_dir:
        state = Path(options.state_dir)
        places = {
            "StateSaveLocation": state / "slurmctld",
            "SlurmdSpoolDir": state / "slurmd",
            "SlurmctldPidFile": state / "slurmctld.pid",
            "SlurmdPidFile": state / "slurmd.pid",
        }
    else:
        places = {
            "StateSaveLocation": DEBIAN_STATE / "slurmctld",
            "SlurmdSpoolDir": DEBIAN_STATE / "slurmd",
            "SlurmctldPidFile": DEBIAN_RUN / "slurmctld.pid",
            "SlurmdPidFile": DEBIAN_RUN / "slurmd.pid",
        }
    log = Path(options.log_dir) if options.log_dir else DEBIAN_LOG
    places["SlurmctldLogFile"] = log / "slurmctld.log"
    places["SlurmdLogFile"] = log / "slurmd.log"
    return {k: str(v) for k, v in places.items()}


def gres_spec(gpus: int, shards_per_gpu: int) -> str:
    """The node's Gres= value: gpu:N, plus shard:N*K where GPUs are time-sliced."""
    return f"gpu:{gpus}" + (f",shard:{gpus * shards_per_gpu}" if shards_per_gpu > 0 else "")


def real_memory(facts: MachineFacts) -> int:
    # 10% under physical: slurmd drains a node whose RealMemory is above what it finds,
    # and MemTotal shifts a little between kernels and boots.
    return max(1, facts.memory_mb * 9 // 10)


def render_slurm_conf(facts: MachineFacts, options: ConfigOptions) -> str:
    node = facts.hostname
    gpus = len(facts.gpu_files)
    devices_ok, _ = cgroup_devices_usable(facts)
    out = [
        f"# slurm.conf for {node}, one machine that is both controller and GPU node.",
        "# Written by `gpulane slurm config`; gres.conf and cgroup.conf must sit next to it.",
        *(f"# {c}" for c in options.extra_comments),
        "",
        f"ClusterName={options.cluster_name}",
        "# The address in parentheses: slurmctld and its clients need no name resolution.",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={options.port}",
        f"SlurmdPort={options.port + 1}",
        f"SlurmUser={options.slurm_user}",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
    ]
    if options.munge_socket:
        out.append(f"AuthInfo=socket={options.munge_socket}")
    out += ["", *(f"{k}={v}" for k, v in _paths(options).items())]
    out += ["SlurmctldDebug=info", "SlurmdDebug=info", ""]
    if devices_ok:
        out += _comment(
            "cgroup v2 with eBPF device control: a job can open only its own GPUs'\n"
            "device files (ConstrainDevices=yes in cgroup.conf)."
        )
        out += ["ProctrackType=proctrack/cgroup", "TaskPlugin=task/cgroup"]
    else:
        out += _comment(
            "No cgroup confinement here (see cgroup.conf for why): processes are tracked\n"
            "through /proc, and a job's GPUs are chosen by CUDA_VISIBLE_DEVICES only."
        )
        out += ["ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none"]
    out += [
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        f"GresTypes={'gpu,shard' if options.shards_per_gpu > 0 else 'gpu'}",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "# A node that was DOWN comes back by itself once slurmd registers with a valid config.",
        "ReturnToService=2",
        "MailProg=/bin/true",
        "",
        "# Scheduler settings that keep the wait for a GPU short once it is free.",
    ]
    for key, value, why in SCHED_SETTINGS:
        out += _comment(why)
        out.append(f"{key}={value}")
    hw = (
        f"CPUs={facts.cpus} Boards=1 SocketsPerBoard={facts.sockets} "
        f"CoresPerSocket={facts.cores_per_socket} ThreadsPerCore={facts.threads_per_core} "
        f"RealMemory={real_memory(facts)}"
    )
    out += [
        "",
        f"# RealMemory is 90% of the {facts.memory_mb} MiB found, so registration never falls short.",
        f"NodeName={node} NodeAddr=127.0.0.1 {hw} Gres={gres_spec(gpus, options.shards_per_gpu)} State=UNKNOWN",
        f"PartitionName={options.partition} Nodes={node} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(out) + "\n"


def render_gres_conf(facts: MachineFacts, options: ConfigOptions) -> str:
    node = facts.hostname
    source = {
        "nvml": "found through NVML",
        "--gpu-devices": "named with --gpu-devices",
        "/dev": "found as /dev/nvidia[0-9]* (NVML did not answer)",
    }.get(facts.gpu_source, facts.gpu_source)
    out = [f"# gres.conf for {node}: {len(facts.gpu_files)} GPU(s) {source}."]
    out += _comment(
        "AutoDetect=off with one explicit File= per GPU: Debian's slurm-wlm is built without\n"
        "the NVML plugin, and explicit files keep slurmd's count equal to slurm.conf's Gres=\n"
        "(a file that is missing or not a character device makes the node INVALID_REG)."
    )
    if facts.wsl:
        out += _comment(
            "WSL2: the GPUs are reached through /dev/dxg and there are no /dev/nvidiaN files;\n"
            "slurmd only needs each File= to be a character device, so create placeholders at\n"
            "every boot (e.g. in /etc/wsl.conf [boot] command=):\n"
            + "\n".join(
                f"  mknod -m 666 /dev/nvidia{i} c 195 {i}" for i in range(len(facts.gpu_files))
            )
            + f"\nCUDA and NVML libraries live in {WSL_LIB} (listed in /etc/ld.so.conf.d/ld.wsl.conf"
            "\nby WSL); jobs need that directory on the loader path."
        )
    out.append("AutoDetect=off")
    for i, path in enumerate(facts.gpu_files):
        if i < len(facts.gpu_names) and facts.gpu_names[i]:
            out.append(f"# GPU {i}: {facts.gpu_names[i]}")
        out.append(f"NodeName={node} Name=gpu File={path}")
    if options.shards_per_gpu > 0:
        out += _comment(
            f"Time-slicing: each GPU is also {options.shards_per_gpu} shards; a job asking\n"
            "--gres=shard:k shares the card with others (no memory isolation)."
        )
        for path in facts.gpu_files:
            out.append(f"NodeName={node} Name=shard Count={options.shards_per_gpu} File={path}")
    return "\n".join(out) + "\n"


def render_cgroup_conf(facts: MachineFacts, options: ConfigOptions) -> str:
    devices_ok, why_not = cgroup_devices_usable(facts)
    if devices_ok:
        out = [
            "# cgroup v2 with eBPF device control: each job sees only its GPUs' device files.",
            "CgroupPlugin=cgroup/v2",
        ]
        if not facts.systemd:
            out += [
                "# systemd is not PID 1 here: slurmd manages its cgroup subtree itself.",
                "IgnoreSystemd=yes",
            ]
        out += ["ConstrainDevices=yes", "ConstrainCores=no", "ConstrainRAMSpace=no"]
        return "\n".join(out) + "\n"
    out = _comment(
        f"ConstrainDevices is off: {why_not}.\n"
        "slurm.conf therefore uses ProctrackType=proctrack/linuxproc and TaskPlugin=task/none;\n"
        "a job is steered to its GPUs by CUDA_VISIBLE_DEVICES but could open the others."
    )
    out += [
        "CgroupPlugin=autodetect",
        "IgnoreSystemd=yes",
        "ConstrainDevices=no",
        "ConstrainCores=no",
    ]
    return "\n".join(out) + "\n"


def render_config(machine: MachineFacts, options: ConfigOptions) -> dict[str, str]:
    """File name -> text for slurm.conf, gres.conf and cgroup.conf."""
    if not machine.gpu_files:
        raise ConfigError("no GPUs to configure; name the device files with --gpu-devices")
    if options.shards_per_gpu < 0:
        raise ConfigError("--shards-per-gpu must be 0 or more")
    if options.wsl and not machine.wsl:
        machine = replace(machine, wsl=True)
    return {
        "slurm.conf": render_slurm_conf(machine, options),
        "gres.conf": render_gres_conf(machine, options),
        "cgroup.conf": render_cgroup_conf(machine, options),
    }


# --------------------------------------------------------------------------- facts


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def is_wsl(proc_version: str) -> bool:
    return "microsoft" in proc_version.lower()


def parse_cpu_list(text: str) -> list[int]:
    """``0-3,8,10-11`` (sysfs cpu lists) -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


def cpu_topology(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> tuple[int, int, int, int]:
    """(CPUs, sockets, cores per socket, threads per core) of the online CPUs."""
    try:
        online = parse_cpu_list((sys_cpu / "online").read_text())
        cores: set[tuple[int, int]] = set()
        packages: set[int] = set()
        for cpu in online:
            topo = sys_cpu / f"cpu{cpu}" / "topology"
            package = int((topo / "physical_package_id").read_text())
            core = int((topo / "core_id").read_text())
            packages.add(package)
            cores.add((package, core))
    except (OSError, ValueError):
        count = os.cpu_count() or 1
        return count, 1, count, 1
    cpus = len(online)
    sockets = max(1, len(packages))
    cores_per_socket = max(1, len(cores) // sockets)
    threads = max(1, cpus // (sockets * cores_per_socket))
    return cpus, sockets, cores_per_socket, threads


def memory_mb(meminfo: str) -> int:
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    if not match:
        raise ConfigError("cannot read MemTotal from /proc/meminfo")
    return int(match.group(1)) // 1024


def cgroup2_controllers(root: Path = Path("/sys/fs/cgroup")) -> tuple[str, ...] | None:
    """Controllers of a unified cgroup v2 hierarchy at ``root``; None where there is none."""
    try:
        return tuple((root / "cgroup.controllers").read_text().split())
    except OSError:
        return None


def is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def nvml_gpus(wsl: bool) -> tuple[list[str], list[str]]:
    """(device files, names) of the GPUs NVML sees; empty where NVML does not answer."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no library, no driver: pynvml raises its own error types
        return [], []
    try:
        files, names = [], []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            names.append(name.decode() if isinstance(name, bytes) else str(name))
            minor = i
            if not wsl:  # WSL2 has no device minors: placeholders follow the index
                try:
                    minor = int(pynvml.nvmlDeviceGetMinorNumber(handle))
                except Exception:
                    minor = i
            files.append(f"/dev/nvidia{minor}")
        return files, names
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def dev_nvidia_files() -> list[str]:
    found = [p for p in glob.glob("/dev/nvidia[0-9]*") if re.fullmatch(r"/dev/nvidia\d+", p)]
    return sorted(found, key=lambda p: int(p.removeprefix("/dev/nvidia")))


def gather_facts(gpu_devices: list[str] | None = None, wsl: bool = False) -> MachineFacts:
    """Read this machine. ``gpu_devices``, where given, wins over NVML and /dev."""
    try:
        proc_version = Path("/proc/version").read_text()
    except OSError:
        proc_version = ""
    wsl = wsl or is_wsl(proc_version)
    names: list[str] = []
    if gpu_devices:
        files, source = list(gpu_devices), "--gpu-devices"
        bad = [f for f in files if not is_char_device(f)]
        if bad and not wsl:
            raise ConfigError(
                f"--gpu-devices: {', '.join(bad)}: not a character device "
                "(a GPU's device file, like /dev/nvidia0, is one)"
            )
    else:
        files, names = nvml_gpus(wsl)
        source = "nvml"
        if not files:
            files, source = dev_nvidia_files(), "/dev"
    if not files:
        raise ConfigError(
            "no GPUs found: NVML answered with none and there is no /dev/nvidia[0-9]*; "
            "name the device files with --gpu-devices /dev/nvidia0,..."
        )
    cpus, sockets, cores, threads = cpu_topology()
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError as error:
        raise ConfigError(f"cannot read /proc/meminfo: {error}") from error
    return MachineFacts(
        hostname=short_hostname(),
        cpus=cpus,
        sockets=sockets,
        cores_per_socket=cores,
        threads_per_core=threads,
        memory_mb=memory_mb(meminfo),
        gpu_files=tuple(files),
        gpu_names=tuple(names),
        gpu_source=source,
        wsl=wsl,
        cgroup2_controllers=cgroup2_controllers(),
        bpf=Path("/proc/sys/kernel/unprivileged_bpf_disabled").exists(),
        systemd=Path("/run/systemd/system").is_dir(),
    )
