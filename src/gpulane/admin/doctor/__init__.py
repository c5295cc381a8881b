"""``gpulane doctor``: is this machine ready to run GPU jobs through Slurm?

Each check is a small function of a :class:`Context` that returns a :class:`Finding`:
a status (ok, warn, fail), a one-line finding, and the command that fixes it. Every
subprocess call takes an argv list and a timeout; ``SLURM_CONF`` is respected.

The checks live by topic: :mod:`~gpulane.admin.doctor.context` (what they look at),
:mod:`~gpulane.admin.doctor.slurm` (munge, daemons, node, GRES) and
:mod:`~gpulane.admin.doctor.gpus` (devices, NVML, CUDA libraries). This module runs
them in order and writes the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from gpulane.admin.doctor.context import (
    DEFAULT_MUNGE_SOCKET,
    DEFAULT_SLURM_CONF,
    GENERATED_WITH,
    TIMEOUT_S,
    Context,
    Finding,
    Result,
    SlurmConf,
    expand_hostlist,
    run,
)
from gpulane.admin.doctor.gpus import (
    CUDA_LIBS,
    LD_CONF_FILE,
    WSL_LIB,
    check_cuda_libs,
    check_gpu_devices,
    check_nvml,
    default_python_prefixes,
    loader_names,
    nvml_count,
    pip_nvidia_lib_dirs,
)
from gpulane.admin.doctor.slurm import (
    BAD_STATES,
    TRANSIENT_STATES,
    GresLine,
    check_daemon,
    check_gres,
    check_munge,
    check_munged,
    check_node,
    check_ping,
    check_slurm_conf,
    check_slurmctld,
    check_slurmd,
    gpu_count,
    gres_conf_gpu_lines,
    last_fatal,
    munge_roundtrip,
    node_finding,
    parse_scontrol_oneliner,
    processes,
)

__all__ = [
    "BAD_STATES",
    "CHECKS",
    "CUDA_LIBS",
    "DEFAULT_MUNGE_SOCKET",
    "DEFAULT_SLURM_CONF",
    "GENERATED_WITH",
    "LD_CONF_FILE",
    "SLURM_CHECKS",
    "TIMEOUT_S",
    "TRANSIENT_STATES",
    "WSL_LIB",
    "Context",
    "Finding",
    "GresLine",
    "Result",
    "SlurmConf",
    "check_cuda_libs",
    "check_daemon",
    "check_gpu_devices",
    "check_gres",
    "check_munge",
    "check_munged",
    "check_node",
    "check_nvml",
    "check_ping",
    "check_slurm_conf",
    "check_slurmctld",
    "check_slurmd",
    "default_python_prefixes",
    "expand_hostlist",
    "gpu_count",
    "gres_conf_gpu_lines",
    "last_fatal",
    "loader_names",
    "munge_roundtrip",
    "node_finding",
    "nvml_count",
    "parse_scontrol_oneliner",
    "pip_nvidia_lib_dirs",
    "processes",
    "report",
    "run",
    "run_checks",
]

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
    noted = sum(f.status == "info" for f in findings)  # said, not checked
    ok = len(findings) - failed - warned - noted
    lines.append(
        f"{failed} failed, {warned} warning(s), {ok} ok" + (f", {noted} noted" if noted else "")
    )
    return "\n".join(lines)
