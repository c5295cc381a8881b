"""The ``gpulane`` command: run, status, cancel, broker, demo, hub and the admin commands.

Every subcommand names its function with ``set_defaults(func=...)``; :func:`main` calls
it inside the one error handler. ``gpulane run`` is on a user's critical path (it sits
in front of every GPU job typed in a terminal), so this module imports only small
modules at the top: each command imports what it uses when it runs, and only the
chosen command's options are defined (argparse spends ~0.05 ms an option).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn

from gpulane import __version__
from gpulane.admin import k8s_commands, slurm_commands
from gpulane.errors import GpulaneError, OptionError

if TYPE_CHECKING:
    from gpulane.scheduler.base import JobUpdate

EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130

Define = Callable[[argparse.ArgumentParser], None]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _fail(message: object, status: int = 1) -> int:
    """The one way a command reports failure: one line on stderr; returns the exit status."""
    print(f"gpulane: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["broker"]:
        return cmd_broker(argparse.Namespace(options=words[1:]))
    return dispatch(build_parser(only=_command_word(words)).parse_args(words))


def dispatch(args: argparse.Namespace) -> int:
    """Run the parsed command; a usage error is exit status 2, any other refusal 1."""
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except OptionError as error:
        return _fail(error, EXIT_USAGE)
    except GpulaneError as error:
        return _fail(error)


def _command_word(words: Sequence[str]) -> str | None:
    """The subcommand's name: the first word that is not an option (the top level has
    only --help and --version, which take no value)."""
    return next((word for word in words if not word.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the other commands are listed but their
    options left undefined, since that parse cannot reach them."""
    parser = _Parser(
        prog="gpulane", description="Share GPUs fairly: queue GPU work only while it runs."
    )
    parser.add_argument("--version", action="version", version=f"gpulane {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text, define in _commands():
        command = sub.add_parser(name, help=help_text)
        if only is None or only == name:
            define(command)
    return parser


def _commands() -> list[tuple[str, str, Define]]:
    return [
        ("broker", "run the embedded GPU broker for this machine", _define_broker),
        ("run", "run a command on a GPU once it is your turn", _define_run),
        ("status", "GPUs, who holds them, and the queue", _define_status),
        ("cancel", "cancel a job of yours (admins: any job)", _define_cancel),
        (
            "demo",
            "hub: a shared-GPU JupyterHub on http://127.0.0.1:8000 (default); "
            "queue: two users queueing with gpulane run",
            _define_demo,
        ),
        ("hub", "JupyterHub helpers", _define_hub),
        *slurm_commands.COMMANDS,
        *k8s_commands.COMMANDS,
    ]


# ------------------------------------------------------------------ gpulane broker


def _define_broker(broker: argparse.ArgumentParser) -> None:
    # The options are BrokerApp's traits (gpulane.broker.app): main() hands them over
    # unparsed, so `gpulane broker --help` is the app's own help.
    broker.set_defaults(func=cmd_broker)
    broker.add_argument("options", nargs=argparse.REMAINDER, help="see gpulane broker --help")


def cmd_broker(args: argparse.Namespace) -> int:
    from gpulane.broker import app  # traitlets is imported here only, never on the run path

    return app.main(args.options)


# ------------------------------------------------------------------ gpulane run, status, cancel


def _define_run(run: argparse.ArgumentParser) -> None:
    run.usage = (
        "gpulane run [--gpus N | --slices K | --gpu-mem M] [--time T] [--mem M] [--name NAME] "
        "-- CMD [ARGS...]"
    )
    run.set_defaults(func=cmd_run)
    run.add_argument("--gpus", metavar="N", help="whole GPUs (default 1)")
    run.add_argument(
        "--slices", metavar="K", help="K time-sliced slices of one GPU instead of whole GPUs"
    )
    run.add_argument("--gpu-mem", metavar="M", help="this much memory of one GPU, such as 10G")
    run.add_argument("--time", metavar="T", help="time limit: HH:MM:SS, MM:SS, 90m, 2h")
    run.add_argument("--mem", metavar="M", help="host memory, such as 8G or 512M")
    run.add_argument("--name", metavar="NAME", help="a name shown in the queue")
    run.add_argument("--socket", help="the broker's socket")
    run.add_argument("--quiet", action="store_true", help="print nothing but the command's output")
    run.add_argument(
        "cmd", nargs=argparse.REMAINDER, help="the command and its arguments, after --"
    )


def _define_status(status: argparse.ArgumentParser) -> None:
    status.set_defaults(func=cmd_status)
    status.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    status.add_argument("--socket", help="the broker's socket")


def _define_cancel(cancel: argparse.ArgumentParser) -> None:
    cancel.set_defaults(func=cmd_cancel)
    cancel.add_argument("job", help="the job's number")
    cancel.add_argument("--socket", help="the broker's socket")


class _Progress:
    """The waiting line: rewritten in place on a terminal, one line per change otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = ""
        self.announced_run = False

    def __call__(self, update: JobUpdate) -> None:
        from gpulane.display import wait_line

        if self.quiet:
            return
        if update.state == "running" and not update.job.get("ending"):
            # Said once, and again for each GPU memory warning (the line then changes).
            if not self.announced_run or update.job.get("gpu_mem_warning"):
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
    from gpulane.jobs import NAME_RE, build_request
    from gpulane.scheduler import connect

    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise OptionError(
            "gpulane run needs a command after --, e.g. gpulane run --gpus 1 -- python train.py"
        )
    program = os.path.basename(command[0])[:64]
    request = build_request(
        gpus=args.gpus,
        slices=args.slices,
        gpu_mem=args.gpu_mem,
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
        from gpulane.display import final_words

        sys.stderr.write(f"[gpulane] job {job.get('id')} {final_words(job)}\n")
    if job.get("state") == "timeout":
        return EXIT_TIMEOUT
    return outcome.exit_status


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from gpulane.display import status_table
    from gpulane.scheduler import connect

    snapshot = connect(args.socket).snapshot()
    print(json.dumps(snapshot, indent=2) if args.json else status_table(snapshot))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from gpulane.display import final_words
    from gpulane.jobs import parse_count
    from gpulane.scheduler import connect

    job_id = parse_count(args.job, "JOB", maximum=2**62)
    view = connect(args.socket).cancel(job_id)
    print(
        f"job {job_id} ({view.get('user')}): {final_words(view) if view['state'] != 'running' else 'being stopped'}"
    )
    return 0


# ------------------------------------------------------------------ gpulane demo, hub


def _define_demo(demo: argparse.ArgumentParser) -> None:
    demo.set_defaults(func=cmd_demo)
    demo.add_argument("what", nargs="?", choices=["hub", "queue"], default="hub")
    demo.add_argument("--port", default="8000", help="the hub's port (default 8000)")
    demo.add_argument("--state-dir", help="where the demo keeps its state (printed at start)")
    demo.add_argument(
        "--seconds", default="3", help="queue demo: how long each job runs (default 3)"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpulane.jobs import parse_count, parse_duration

    if args.what == "queue":
        from gpulane.demo.queue import run_demo

        return run_demo(seconds=float(parse_duration(args.seconds + "s", "--seconds")))
    try:
        from gpulane.demo.hub import run_demo_hub
    except ImportError as error:
        raise GpulaneError(
            f"the hub demo needs JupyterHub: pip install 'gpulane[hub]' ({error})"
        ) from None
    port = parse_count(args.port, "--port", 65535)
    return run_demo_hub(Path(args.state_dir) if args.state_dir else None, port)


def _define_hub(hub: argparse.ArgumentParser) -> None:
    actions = hub.add_subparsers(dest="action", required=True, parser_class=_Parser)
    extension = actions.add_parser(
        "install-kernel-extension", help="load %%%%gpu in every kernel of this Python environment"
    )
    extension.set_defaults(func=cmd_hub)
    init = actions.add_parser(
        "init",
        help="set up a production JupyterHub with gpulane on this machine (as root)",
        description="Set up a production JupyterHub with gpulane on this machine: config, "
        "state folder, proxy, kernel extension, PATH, GPU and admin groups, systemd unit "
        "(docs/admin-hub.md). Idempotent; --dry-run prints every file and command.",
    )
    init.set_defaults(func=cmd_hub_init)
    init.add_argument("--dry-run", action="store_true", help="print what it would write and run")
    init.add_argument("--force", action="store_true", help="replace edited files (keeps .bak)")
    for flag, default, help_text in _HUB_INIT_OPTIONS:
        init.add_argument(flag, default=default, help=help_text)
    init.add_argument(
        "--admin", action="append", default=[], metavar="USER", help="add USER to the admin group"
    )


# gpulane hub init's valued options: (flag, default, help); folders and ports of its own
# let a test or a cautious admin run a second hub beside another.
_HUB_INIT_OPTIONS = (
    ("--port", "8000", "the hub's public port (default 8000)"),
    ("--ip", "127.0.0.1", "the hub's address (default 127.0.0.1)"),
    ("--hub-port", "8081", "the hub's internal API port (8081)"),
    ("--proxy-api-port", "8001", "the proxy's API port (8001)"),
    ("--dashboard-port", "9873", "the broker's dashboard port (9873)"),
    ("--config-dir", "/etc/jupyterhub", "for jupyterhub_config.py"),
    ("--state-dir", "/var/lib/jupyterhub", "the hub's database and cookie secret"),
    ("--broker-state-dir", "/var/lib/gpulane", "the broker's database"),
    ("--socket", "/run/gpulane/broker.sock", "the broker's socket"),
    ("--bin-dir", "/usr/local/bin", "where to link gpulane"),
    ("--unit-dir", "/etc/systemd/system", "for the systemd unit"),
    ("--unit-name", "jupyterhub", "the unit's name (jupyterhub)"),
    ("--simulate-gpus", None, "simulate N GPUs (default: NVML's GPUs)"),
    ("--slices", "1", "time-sliced slices per GPU (default 1)"),
    ("--gpu-group", "gpu", "the Unix group that may use GPUs (gpu)"),
    ("--admin-group", "gpu-admin", "the Unix group of gpulane admins (gpu-admin)"),
    ("--idle-timeout", "3600", "seconds before an idle server is stopped (3600)"),
    ("--ssl-cert", "", "serve HTTPS with this certificate"),
    ("--ssl-key", "", "and this key"),
)


def cmd_hub(args: argparse.Namespace) -> int:
    from gpulane.hub.config import install_kernel_extension

    print(f"%%gpu is loaded in every kernel through {install_kernel_extension()}")
    return 0


def cmd_hub_init(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gpulane.admin.hub_init import InitOptions, init_hub
    from gpulane.jobs import parse_count

    def port(name: str) -> int:
        return parse_count(getattr(args, name), f"--{name.replace('_', '-')}", 65535)

    def folder(name: str) -> Path:
        return Path(getattr(args, name)).absolute()

    options = InitOptions(
        port=port("port"),
        ip=args.ip,
        hub_port=port("hub_port"),
        proxy_api_port=port("proxy_api_port"),
        dashboard_port=port("dashboard_port"),
        config_dir=folder("config_dir"),
        state_dir=folder("state_dir"),
        broker_state_dir=folder("broker_state_dir"),
        socket=folder("socket"),
        bin_dir=folder("bin_dir"),
        unit_dir=folder("unit_dir"),
        unit_name=args.unit_name,
        simulate_gpus=(
            None
            if args.simulate_gpus is None
            else parse_count(args.simulate_gpus, "--simulate-gpus", 64)
        ),
        slices=parse_count(args.slices, "--slices", 64),
        gpu_group=args.gpu_group,
        admin_group=args.admin_group,
        admins=tuple(args.admin),
        idle_timeout=parse_count(args.idle_timeout, "--idle-timeout", 10**7),
        ssl_cert=args.ssl_cert,
        ssl_key=args.ssl_key,
        force=args.force,
        dry_run=args.dry_run,
    )
    return init_hub(options)


if __name__ == "__main__":
    sys.exit(main())
