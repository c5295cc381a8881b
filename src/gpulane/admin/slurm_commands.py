"""Admin commands for a Slurm back end: ``gpulane slurm config`` and ``gpulane doctor``.

``cli.py`` lists :data:`COMMANDS` (name, help, the function that defines its options and
names the function that runs it). Importing this module is cheap: the work is imported
only when a command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from gpulane.config import DOCTOR_PYTHON_PREFIXES_ENV
from gpulane.errors import GpulaneError

PYTHON_PREFIXES_ENV = DOCTOR_PYTHON_PREFIXES_ENV


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _port(text: str) -> int:
    value = _non_negative(text)
    if not 1 <= value <= 65534:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65534, got {value}")
    return value


def _name(text: str) -> str:
    if not text or any(c.isspace() or c in "=#,()" for c in text):
        raise argparse.ArgumentTypeError(f"not a usable Slurm name: {text!r}")
    return text


def define_slurm(slurm: argparse.ArgumentParser) -> None:
    """``gpulane slurm config``'s options."""
    slurm_sub = slurm.add_subparsers(dest="slurm_command", required=True, parser_class=type(slurm))
    config = slurm_sub.add_parser(
        "config",
        help="write slurm.conf, gres.conf and cgroup.conf for this machine",
        description="Write slurm.conf, gres.conf and cgroup.conf for this one machine "
        "(controller and GPU node). Without --out they are printed.",
    )
    config.set_defaults(func=slurm_config_command)
    config.add_argument("--out", metavar="DIR", help="write the files into DIR (e.g. /etc/slurm)")
    config.add_argument(
        "--shards-per-gpu",
        metavar="K",
        type=_non_negative,
        default=0,
        help="also offer each GPU as K time-sliced shards (default 0: whole GPUs only)",
    )
    config.add_argument("--cluster-name", metavar="NAME", type=_name, default="gpulane")
    config.add_argument("--partition", metavar="NAME", type=_name, default="gpu")
    config.add_argument(
        "--gpu-devices",
        metavar="/dev/nvidia0,...",
        help="GPU device files, one per GPU (default: from NVML, else /dev/nvidia[0-9]*)",
    )
    config.add_argument(
        "--wsl", action="store_true", help="WSL2 layout (detected from /proc/version anyway)"
    )
    config.add_argument(
        "--port", type=_port, default=6817, help="slurmctld port; slurmd uses PORT+1 (default 6817)"
    )
    config.add_argument(
        "--state-dir",
        metavar="DIR",
        help="state, spool and pid files under DIR (default: /var/lib/slurm/..., /run/*.pid)",
    )
    config.add_argument(
        "--log-dir", metavar="DIR", help="daemon logs in DIR (default /var/log/slurm)"
    )
    config.add_argument(
        "--slurm-user",
        metavar="USER",
        type=_name,
        default="slurm",
        help="user slurmctld runs as (default slurm, as Debian's packages create)",
    )
    config.add_argument(
        "--munge-socket",
        metavar="PATH",
        help="munged's socket, where not the default /run/munge/munge.socket.2",
    )


DOCTOR_BACKENDS = ("auto", "broker", "slurm")


def _doctor_backend(text: str) -> str:
    """``--backend`` names what runs GPU jobs on this machine; a cluster is ``--k8s``."""
    if text in ("k8s", "kubernetes"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a --backend here (it names what runs GPU jobs on this machine: "
            "the broker or Slurm); check a Kubernetes cluster with gpulane doctor --k8s"
        )
    if text not in DOCTOR_BACKENDS:
        raise argparse.ArgumentTypeError(
            f"invalid choice: {text!r} (choose from {', '.join(DOCTOR_BACKENDS)})"
        )
    return text


def define_doctor(doctor: argparse.ArgumentParser) -> None:
    """``gpulane doctor``'s options."""
    doctor.set_defaults(func=doctor_command)
    doctor.add_argument("--json", action="store_true", help="print the findings as JSON")
    doctor.add_argument(
        "--backend",
        type=_doctor_backend,
        metavar="{auto,broker,slurm}",
        default="auto",
        help="what to check (default: Slurm where $SLURM_CONF or /etc/slurm/slurm.conf is, "
        "else the embedded broker and its hub)",
    )
    doctor.add_argument(
        "--hub-config",
        metavar="FILE",
        help="the hub's jupyterhub_config.py (default /etc/jupyterhub/jupyterhub_config.py)",
    )
    k8s = doctor.add_argument_group("Kubernetes (--k8s)")
    k8s.add_argument(
        "--k8s",
        action="store_true",
        help="check the cluster of the current kubeconfig (or this pod's service account): "
        "API, the hub's RBAC, GPU nodes vs. time-slicing, the GPU Operator",
    )
    k8s.add_argument("--kubeconfig", metavar="FILE", help="the kubeconfig (default: $KUBECONFIG)")
    k8s.add_argument("--context", help="the kubeconfig context (default: current)")
    k8s.add_argument(
        "--gpu-operator-namespace", default="gpu-operator", help="the GPU Operator's namespace"
    )
    k8s.add_argument(
        "--configmap", default="time-slicing-config", help="the time-slicing ConfigMap's name"
    )
    k8s.add_argument("--hub-namespace", default="jhub", help="the hub's namespace")
    k8s.add_argument(
        "--hub-service-account", default="hub", help="the hub's service account (the chart's)"
    )
    k8s.add_argument(
        "--profiles",
        metavar="FILE",
        help="the profile file: its slices_per_gpu and slice resource are checked too",
    )
    doctor.add_argument(
        "--python-prefix",
        metavar="DIR",
        action="append",
        help="a Python environment (or site-packages) whose pip nvidia-* libraries to check; "
        f"repeatable (default: ${PYTHON_PREFIXES_ENV}, colon-separated, else this Python's)",
    )


def slurm_config_command(args: argparse.Namespace) -> int:
    from gpulane.admin.slurm_config import (
        ConfigOptions,
        gather_facts,
        render_config,
    )

    devices = [d.strip() for d in (args.gpu_devices or "").split(",") if d.strip()]
    options = ConfigOptions(
        cluster_name=args.cluster_name,
        partition=args.partition,
        shards_per_gpu=args.shards_per_gpu,
        port=args.port,
        state_dir=_absolute(args.state_dir),
        log_dir=_absolute(args.log_dir),
        slurm_user=args.slurm_user,
        munge_socket=_absolute(args.munge_socket),
        wsl=args.wsl,
        extra_comments=(f"Generated with: {_command_line(args)}",),
    )
    # A ConfigError here (no GPUs found, a bad device file) is one line and exit status 1.
    facts = gather_facts([_absolute(d) or d for d in devices] or None, wsl=args.wsl)
    files = render_config(facts, options)
    if not args.out:
        for name, text in files.items():
            sys.stdout.write(f"# ===== {name} =====\n{text}\n")
        return 0
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            path = out / name
            path.write_text(text)
            path.chmod(0o644)  # job users' srun/sbatch read slurm.conf
        _make_dirs(options)
    except OSError as error:
        raise GpulaneError(f"cannot write to {out}: {error}") from None
    print(
        f"wrote {', '.join(str(out / n) for n in files)} "
        f"({len(facts.gpu_files)} GPU(s) from {facts.gpu_source}, {facts.cpus} CPUs)",
        file=sys.stderr,
    )
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command that regenerates these files (doctor's fixes quote it), with --out."""
    import shlex

    argv = ["gpulane", "slurm", "config", "--out", _absolute(args.out) or "/etc/slurm"]
    defaults: dict[str, object] = {
        "shards_per_gpu": 0,
        "cluster_name": "gpulane",
        "partition": "gpu",
        "port": 6817,
        "slurm_user": "slurm",
    }
    for key in (
        "shards_per_gpu",
        "cluster_name",
        "partition",
        "port",
        "gpu_devices",
        "state_dir",
        "log_dir",
        "slurm_user",
        "munge_socket",
    ):
        value = getattr(args, key)
        if value is not None and value != defaults.get(key):
            if key in ("state_dir", "log_dir", "munge_socket"):
                value = _absolute(value)
            elif key == "gpu_devices":
                value = ",".join(os.path.abspath(d.strip()) for d in value.split(",") if d.strip())
            argv += [f"--{key.replace('_', '-')}", str(value)]
    if args.wsl:
        argv.append("--wsl")
    return shlex.join(argv)


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def _make_dirs(options: Any) -> None:
    """Create the --state-dir/--log-dir folders, owned by the slurm user when run as root."""
    import pwd

    dirs = []
    if options.state_dir:
        dirs += [Path(options.state_dir) / "slurmctld", Path(options.state_dir) / "slurmd"]
    if options.log_dir:
        dirs.append(Path(options.log_dir))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and d.name != "slurmd":  # slurmd itself runs as root
            try:
                user = pwd.getpwnam(options.slurm_user)
            except KeyError:
                continue
            os.chown(d, user.pw_uid, user.pw_gid)


def doctor_command(args: argparse.Namespace) -> int:
    import json

    from gpulane.admin import doctor

    prefixes = args.python_prefix
    if not prefixes and os.environ.get(PYTHON_PREFIXES_ENV):
        prefixes = [p for p in os.environ[PYTHON_PREFIXES_ENV].split(":") if p]
    backend = "k8s" if args.k8s else args.backend
    if backend == "auto":
        slurm = os.environ.get("SLURM_CONF") or Path("/etc/slurm/slurm.conf").exists()
        backend = "slurm" if slurm else "broker"
    if backend == "k8s":
        findings = _k8s_findings(args)
    elif backend == "broker":
        from gpulane.admin.doctor.broker import BrokerSite, run_broker_checks

        try:
            site = BrokerSite.discover(Path(args.hub_config) if args.hub_config else None)
        except (OSError, SyntaxError) as error:
            raise GpulaneError(f"cannot read the hub's config: {error}") from None
        findings = run_broker_checks(site)
    else:
        context = doctor.Context.from_environment(
            python_prefixes=[Path(p) for p in prefixes] if prefixes else None
        )
        findings = doctor.run_checks(context)
    failed = any(f.status == "fail" for f in findings)
    if args.json:
        print(json.dumps({"ok": not failed, "findings": [f.as_dict() for f in findings]}, indent=2))
    else:
        print(doctor.report(findings))
    return 1 if failed else 0


def _k8s_findings(args: argparse.Namespace) -> list[Any]:
    from gpulane.admin.doctor.k8s import KubeSite, run_k8s_checks
    from gpulane.profiles import ProfileError, load_profiles_file

    site = KubeSite(
        kubeconfig=args.kubeconfig,
        context=args.context,
        operator_namespace=args.gpu_operator_namespace,
        configmap=args.configmap,
        hub_namespace=args.hub_namespace,
        hub_service_account=args.hub_service_account,
    )
    if args.profiles:
        try:
            pset = load_profiles_file(args.profiles)
        except ProfileError as error:
            raise GpulaneError(str(error)) from None
        site.slices, site.resource = pset.slices_per_gpu, pset.slice_resource
    return run_k8s_checks(site)


COMMANDS = (
    ("slurm", "set up Slurm on this machine", define_slurm),
    (
        "doctor",
        "check this machine's back end (the broker and its hub, or Slurm), GPUs and "
        "libraries; print a fix for each problem",
        define_doctor,
    ),
)
