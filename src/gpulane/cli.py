"""The ``gpulane`` command: broker, run, status, cancel, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from gpulane import __version__, config
from gpulane.admin import k8s_commands as k8s
from gpulane.admin import slurm_commands as deploy
from gpulane.display import final_words, status_table, wait_line
from gpulane.jobs import (
    NAME_RE,
    OptionError,
    build_request,
    parse_count,
    parse_duration,
    parse_memory,
)
from gpulane.scheduler.base import JobUpdate, SchedulerError

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _fail(message: str, status: int = 1) -> NoReturn:
    print(f"gpulane: {message}", file=sys.stderr)
    raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gpulane", description="Share GPUs fairly: queue GPU work only while it runs."
    )
    parser.add_argument("--version", action="version", version=f"gpulane {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    broker = sub.add_parser("broker", help="run the embedded GPU broker for this machine")
    broker.add_argument(
        "--socket",
        help=f"Unix socket to listen on (default ${config.SOCKET_ENV} or {config.DEFAULT_SOCKET})",
    )
    broker.add_argument(
        "--state-dir",
        help="folder for the broker's database (default /var/lib/gpulane as root, else ~/.local/state/gpulane)",
    )
    broker.add_argument(
        "--simulate-gpus", metavar="N", help="simulate N GPUs instead of reading NVML"
    )
    broker.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        default="16G",
        help="memory of each simulated GPU (default 16G)",
    )
    broker.add_argument(
        "--slices",
        metavar="K",
        default="1",
        help="cut each GPU into K time-sliced slices (default 1)",
    )
    broker.add_argument(
        "--max-running-per-user",
        metavar="N",
        default="0",
        help="cap on running jobs per user (default 0: none)",
    )
    broker.add_argument(
        "--default-time",
        metavar="T",
        default="1h",
        help="time limit of a job that gives none (default 1h)",
    )
    broker.add_argument(
        "--max-time",
        metavar="T",
        default="24h",
        help="longest time limit a job may ask for (default 24h)",
    )
    broker.add_argument(
        "--half-life", metavar="T", default="24h", help="fair-share usage half-life (default 24h)"
    )
    broker.add_argument(
        "--starvation-after",
        metavar="T",
        default="1h",
        help="a job waiting this long goes first and reserves GPUs (default 1h)",
    )
    broker.add_argument(
        "--gpu-groups",
        metavar="G1,G2",
        default="",
        help="Unix groups allowed to use GPUs (default: everyone)",
    )
    broker.add_argument(
        "--admin-groups",
        metavar="G1,G2",
        default="",
        help="Unix groups whose members may cancel any job (root always may)",
    )
    broker.add_argument(
        "--lease-ttl",
        metavar="T",
        default="10s",
        help="free a GPU whose client sent no heartbeat this long (default 10s)",
    )
    broker.add_argument(
        "--kill-grace",
        metavar="T",
        default="10s",
        help="SIGTERM to SIGKILL grace for revoked jobs (default 10s)",
    )
    broker.add_argument(
        "--dashboard-port",
        metavar="PORT",
        help="serve the JupyterHub dashboard on this loopback port (as a hub service)",
    )
    broker.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )

    run = sub.add_parser(
        "run",
        help="run a command on a GPU once it is your turn",
        usage="gpulane run [--gpus N | --slices K] [--time T] [--mem M] [--name NAME] -- CMD [ARGS...]",
    )
    _add_request_options(run)
    run.add_argument("--socket", help="the broker's socket")
    run.add_argument("--quiet", action="store_true", help="print nothing but the command's output")
    run.add_argument(
        "cmd", nargs=argparse.REMAINDER, help="the command and its arguments, after --"
    )

    status = sub.add_parser("status", help="GPUs, who holds them, and the queue")
    status.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    status.add_argument("--socket", help="the broker's socket")

    cancel = sub.add_parser("cancel", help="cancel a job of yours (admins: any job)")
    cancel.add_argument("job", help="the job's number")
    cancel.add_argument("--socket", help="the broker's socket")

    demo = sub.add_parser(
        "demo",
        help="hub: a shared-GPU JupyterHub on http://127.0.0.1:8000 (default); "
        "queue: two users queueing with gpulane run",
    )
    demo.add_argument("what", nargs="?", choices=["hub", "queue"], default="hub")
    demo.add_argument("--port", default="8000", help="the hub's port (default 8000)")
    demo.add_argument("--state-dir", help="where the demo keeps its state (printed at start)")
    demo.add_argument(
        "--seconds", default="3", help="queue demo: how long each job runs (default 3)"
    )
    hub = sub.add_parser("hub", help="JupyterHub helpers")
    hub.add_argument(
        "action",
        choices=["install-kernel-extension"],
        help="load %%%%gpu in every kernel of this Python environment",
    )
    deploy.add_commands(sub)
    k8s.add_commands(sub)
    return parser


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", metavar="N", help="whole GPUs (default 1)")
    parser.add_argument(
        "--slices", metavar="K", help="K time-sliced slices of one GPU instead of whole GPUs"
    )
    parser.add_argument("--time", metavar="T", help="time limit: HH:MM:SS, MM:SS, 90m, 2h")
    parser.add_argument("--mem", metavar="M", help="host memory, such as 8G or 512M")
    parser.add_argument("--name", metavar="NAME", help="a name shown in the queue")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "broker":
            return cmd_broker(args)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "cancel":
            return cmd_cancel(args)
        if args.command == "demo":
            return cmd_demo(args)
        if args.command in deploy.COMMANDS:
            return deploy.run_command(args)
        if args.command in k8s.COMMANDS:
            return k8s.run_command(args)
        if args.command == "hub":
            from gpulane.hub.config import install_kernel_extension

            print(f"%%gpu is loaded in every kernel through {install_kernel_extension()}")
            return 0
    except OptionError as error:
        _fail(str(error), EXIT_USAGE)
    except SchedulerError as error:
        _fail(str(error))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.what == "queue":
        from gpulane.demo.queue import run_demo

        return run_demo(seconds=float(parse_duration(args.seconds + "s", "--seconds")))
    try:
        from gpulane.demo.hub import run_demo_hub
    except ImportError as error:
        _fail(f"the hub demo needs JupyterHub: pip install 'gpulane[hub]' ({error})")
    port = parse_count(args.port, "--port", 65535)
    return run_demo_hub(Path(args.state_dir) if args.state_dir else None, port)


def cmd_broker(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from gpulane.broker import policy
    from gpulane.broker.core import Broker, BrokerSettings
    from gpulane.broker.gpus import Inventory
    from gpulane.broker.server import serve
    from gpulane.broker.store import Store

    logging.getLogger("tornado.access").setLevel(logging.WARNING)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    slices = parse_count(args.slices, "--slices")
    policy_config = policy.PolicyConfig(
        slices_per_gpu=slices,
        max_running_per_user=int(args.max_running_per_user)
        if args.max_running_per_user != "0"
        else 0,
        default_time=parse_duration(args.default_time, "--default-time"),
        max_time=parse_duration(args.max_time, "--max-time"),
        half_life=float(parse_duration(args.half_life, "--half-life")),
        starvation_after=float(parse_duration(args.starvation_after, "--starvation-after")),
        gpu_groups=_groups(args.gpu_groups),
        admin_groups=_groups(args.admin_groups),
    )
    if args.max_running_per_user != "0":
        parse_count(args.max_running_per_user, "--max-running-per-user", maximum=10_000)
    broker_settings = BrokerSettings(
        policy=policy_config,
        lease_ttl=float(parse_duration(args.lease_ttl, "--lease-ttl")),
        kill_grace=float(parse_duration(args.kill_grace, "--kill-grace")),
    )
    if args.simulate_gpus is not None:
        inventory = Inventory.simulate(
            parse_count(args.simulate_gpus, "--simulate-gpus"),
            parse_memory(args.gpu_memory, "--gpu-memory"),
        )
    else:
        try:
            inventory = Inventory.from_nvml()
        except RuntimeError as error:
            _fail(str(error))
    state_dir = Path(args.state_dir) if args.state_dir else config.default_state_dir()
    store = Store(state_dir / "broker.sqlite3")
    broker = Broker(broker_settings, inventory, store)
    dashboard = (
        parse_count(args.dashboard_port, "--dashboard-port", 65535) if args.dashboard_port else None
    )
    asyncio.run(serve(broker, config.socket_path(args.socket), dashboard))
    return 0


def _groups(text: str) -> frozenset[str]:
    return frozenset(g.strip() for g in text.split(",") if g.strip())


class _Progress:
    """The waiting line: rewritten in place on a terminal, one line per change otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.announced_run = False

    def __call__(self, update: JobUpdate) -> None:
        if self.quiet:
            return
        if update.state == "running" and not update.job.get("ending"):
            if not self.announced_run:
                self._line(wait_line(update), final=True)
                self.announced_run = True
            return
        if update.finished:
            return
        self._line(wait_line(update), final=update.job.get("ending") is not None)

    def _line(self, text: str, final: bool = False) -> None:
        if text == self.last:
            return
        self.last = text
        if self.tty:
            width = os.get_terminal_size(sys.stderr.fileno()).columns
            end = "\n" if final else ""
            sys.stderr.write(f"\r\x1b[K[gpulane] {text}"[: width + 4] + end)
        else:
            sys.stderr.write(f"[gpulane] {text}\n")
        sys.stderr.flush()


def cmd_run(args: argparse.Namespace) -> int:
    from gpulane.scheduler import connect

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        _fail(
            "gpulane run needs a command after --, e.g. gpulane run --gpus 1 -- python train.py",
            EXIT_USAGE,
        )
    program = Path(command[0]).name[:64]
    request = build_request(
        gpus=args.gpus,
        slices=args.slices,
        time=args.time,
        mem=args.mem,
        name=args.name or (program if NAME_RE.fullmatch(program) else "job"),
        command=command,
    )
    scheduler = connect(args.socket)
    progress = _Progress(args.quiet)
    try:
        outcome = scheduler.run(request, on_update=progress)
    except KeyboardInterrupt:
        if not args.quiet:
            sys.stderr.write("\n[gpulane] interrupted: job withdrawn or stopped, GPU freed\n")
        return EXIT_INTERRUPTED
    job = outcome.job
    if not args.quiet and job.get("state") != "completed":
        sys.stderr.write(f"[gpulane] job {job.get('id')} {final_words(job)}\n")
    if job.get("state") == "timeout":
        return EXIT_TIMEOUT
    return outcome.exit_status


def cmd_status(args: argparse.Namespace) -> int:
    from gpulane.scheduler import connect

    snapshot = connect(args.socket).snapshot()
    print(json.dumps(snapshot, indent=2) if args.json else status_table(snapshot))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from gpulane.scheduler import connect

    job_id = parse_count(args.job, "JOB", maximum=2**62)
    view = connect(args.socket).cancel(job_id)
    print(
        f"job {job_id} ({view.get('user')}): {final_words(view) if view['state'] != 'running' else 'being stopped'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
