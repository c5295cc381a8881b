"""``gpulane broker``: the daemon's options as one traitlets Application.

Every option is a trait, read from the site file's ``[broker]`` table
(``/etc/gpulane/gpulane.toml`` or ``$GPULANE_CONFIG``) and then from the command
line, which wins. Values take the same forms in both places (``max_time = "2h"``,
``slices = 2``); a bad one, from either, is one line naming the option and its
accepted forms, exit status 2.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from traitlets import Enum, TraitError, TraitType, Unicode, default
from traitlets.config import Application, Config
from traitlets.config.loader import ArgumentError, KVArgParseConfigLoader, _KVArgParser

from gpulane import config
from gpulane.errors import ConfigError, GpulaneError, OptionError
from gpulane.jobs import MAX_TIME_SECONDS, TIME_FORMS, parse_count, parse_duration, parse_memory

if TYPE_CHECKING:
    from gpulane.broker.core import Broker
    from gpulane.broker.mps import MpsSettings
    from gpulane.broker.pod_leases import PodLeases
    from gpulane.broker.worker_jobs import WorkerJobs

EXIT_USAGE = 2
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _option(name: str) -> str:
    """How a user types a trait's option: ``max_time`` is ``--max-time``."""
    return "--" + name.replace("_", "-")


class _Typed(TraitType[Any, Any]):
    """A trait set from what a user types (parsed in :meth:`parse`) or from a typed value.

    Text from the command line or the TOML file reaches :meth:`validate` unconverted,
    so one parser gives one message for every source.
    """

    def parse(self, text: str, option: str) -> Any:
        raise NotImplementedError

    def check(self, value: Any, option: str) -> Any:
        """A value given already typed (from Python)."""
        return self.parse(str(value), option)

    def validate(self, obj: Any, value: Any) -> Any:
        if value is None and self.allow_none:
            return None
        option = _option(self.name or "")
        if isinstance(value, str):
            return self.parse(value, option)
        if isinstance(value, bool):  # a bool is an int to Python, never a count or a time
            raise OptionError(f"{option} {value!r} is not a value; use {self.info_text}")
        return self.check(value, option)

    def from_string(self, s: str) -> Any:
        return s


class Count(_Typed):
    """A whole number from 1 to ``maximum`` (or none, where ``allow_none``)."""

    def __init__(self, default_value: Any = None, maximum: int = 64, **kwargs: Any) -> None:
        self.maximum = maximum
        self.info_text = f"a whole number from 1 to {maximum}"
        super().__init__(default_value, **kwargs)

    def parse(self, text: str, option: str) -> int:
        return parse_count(text, option, self.maximum)


class Cap(_Typed):
    """A cap on a count: 0 means none, else a whole number from 1 to ``maximum``."""

    def __init__(self, default_value: Any = 0, maximum: int = 10_000, **kwargs: Any) -> None:
        self.maximum = maximum
        self.info_text = f"0 (no cap) or a whole number from 1 to {maximum}"
        super().__init__(default_value, **kwargs)

    def parse(self, text: str, option: str) -> int:
        if text.strip() == "0":
            return 0
        try:
            return parse_count(text, option, self.maximum)
        except OptionError:
            raise OptionError(f"{option} {text!r} must be {self.info_text}") from None


class Address(_Typed):
    """An IP address literal (what a listening socket binds to)."""

    info_text = "an IP address such as 127.0.0.1 or 0.0.0.0"

    def parse(self, text: str, option: str) -> str:
        import ipaddress

        try:
            return str(ipaddress.ip_address(text.strip()))
        except ValueError:
            raise OptionError(f"{option} {text!r} must be {self.info_text}") from None


class Duration(_Typed):
    """Seconds, typed as a time limit is (``90m``, ``2h``, ``HH:MM:SS``)."""

    info_text = TIME_FORMS

    def parse(self, text: str, option: str) -> int:
        return parse_duration(text, option)

    def check(self, value: Any, option: str) -> int:
        # From Python a number is seconds (the text "90" is minutes, as Slurm reads it).
        if isinstance(value, int | float) and 1 <= value <= MAX_TIME_SECONDS:
            return int(value)
        raise OptionError(f"{option} {value!r} is not a time limit; use {TIME_FORMS}")


class Retention(Duration):
    """How long ended jobs are kept: at least :data:`MIN_RETENTION`."""

    info_text = f"at least 2d, in the forms {TIME_FORMS}"

    def parse(self, text: str, option: str) -> int:
        return self._at_least(super().parse(text, option), text, option)

    def check(self, value: Any, option: str) -> int:
        return self._at_least(super().check(value, option), value, option)

    @staticmethod
    def _at_least(seconds: int, given: Any, option: str) -> int:
        # The usage report and the dashboard read ended jobs back to local midnight (up to
        # 25 hours on a clock change): a shorter retention would empty them.
        if seconds < MIN_RETENTION:
            raise OptionError(f"{option} {given!r} is too short: keep ended jobs at least 2d")
        return seconds


MIN_RETENTION = 2 * 86400


class Size(_Typed):
    """Bytes, typed as a size (``512M``, ``16G``)."""

    info_text = "a size such as 512M, 8G or 1.5T"

    def parse(self, text: str, option: str) -> int:
        return parse_memory(text, option)

    def check(self, value: Any, option: str) -> int:
        if isinstance(value, int) and 1 <= value <= 1024**5:
            return value
        return parse_memory(str(value), option)


class SizeOrZero(Size):
    """Bytes, or 0 for none."""

    info_text = "0 or a size such as 512M or 1G"

    def parse(self, text: str, option: str) -> int:
        return 0 if text.strip() == "0" else parse_memory(text, option)

    def check(self, value: Any, option: str) -> int:
        return 0 if value == 0 else super().check(value, option)


class Groups(_Typed):
    """Unix group names, typed as ``a,b`` (a list in TOML or Python); empty: none."""

    info_text = "group names separated by commas, such as gpu,staff"

    def parse(self, text: str, option: str) -> frozenset[str]:
        return frozenset(name.strip() for name in text.split(",") if name.strip())

    def check(self, value: Any, option: str) -> frozenset[str]:
        if isinstance(value, Iterable) and all(isinstance(name, str) for name in value):
            return self.parse(",".join(value), option)
        raise OptionError(f"{option} {value!r} is not a list of groups; use {self.info_text}")


class _Choice(_Typed):
    """One of a few words (``choices``); ``noun`` says what a refused word is not."""

    choices: tuple[str, ...] = ()
    noun = "a choice"

    def parse(self, text: str, option: str) -> str:
        if text.strip() not in self.choices:
            raise OptionError(f"{option} {text!r} is not {self.noun}; use {self.info_text}")
        return text.strip()


class GroupSource(_Choice):
    """Where users' groups are read: ``unix`` or ``hub`` (broker/groups.py)."""

    info_text = "unix (the system's groups) or hub (the JupyterHub's groups)"
    choices = ("unix", "hub")
    noun = "a group source"


class Shares(_Typed):
    """Fair-share weights, typed as ``alice=2,bob=1`` (a TOML table or a dict in Python)."""

    info_text = "NAME=WEIGHT pairs separated by commas, such as alice=2,bob=1"

    def parse(self, text: str, option: str) -> dict[str, float]:
        from gpulane.broker.shares import parse_shares

        return parse_shares(text, option)

    def check(self, value: Any, option: str) -> dict[str, float]:
        if isinstance(value, dict):
            return self.parse(",".join(f"{k}={v}" for k, v in value.items()), option)
        raise OptionError(f"{option} {value!r} is not a set of shares; use {self.info_text}")


class DeviceFiles(_Typed):
    """Each GPU's device files, typed as ``0=/dev/nvidia0,1=/dev/nvidia1``; empty: the
    machine's own (/dev/nvidiaN and MIG capability files)."""

    info_text = "GPU=FILE pairs separated by commas, such as 0=/dev/nvidia0,1=/dev/nvidia1"

    def parse(self, text: str, option: str) -> dict[int, tuple[str, ...]]:
        from gpulane.broker.devices import parse_device_files

        return parse_device_files(text, option)

    def check(self, value: Any, option: str) -> dict[int, tuple[str, ...]]:
        if isinstance(value, dict):  # parsed already, or {GPU: [files]} from Python
            pairs = [f"{gpu}={path}" for gpu, paths in value.items() for path in paths]
            return self.parse(",".join(pairs), option)
        raise OptionError(f"{option} {value!r} is not a set of device files; use {self.info_text}")


class Enforcement(_Choice):
    """Whether GPU device access is enforced: ``auto``, ``on`` or ``off``."""

    info_text = "auto (where root with device files), on or off"
    choices = ("auto", "on", "off")


class MpsChoice(_Choice):
    """Whether the broker runs CUDA MPS daemons: ``auto``, ``on`` or ``off``."""

    info_text = "auto (where nvidia-cuda-mps-control is found and the broker is root), on or off"
    choices = ("auto", "on", "off")


class StrayChoice(_Choice):
    """What the memory watchdog does with a process on a GPU outside any grant."""

    info_text = "auto (end it where device access is enforced), end or report"
    choices = ("auto", "end", "report")


class LogLevel(_Typed):
    """A logging level by name."""

    info_text = ", ".join(LOG_LEVELS)

    def parse(self, text: str, option: str) -> str:
        if text.strip().upper() not in LOG_LEVELS:
            raise OptionError(f"{option} {text!r} is not a level; use {self.info_text}")
        return text.strip().upper()


class _OneLineArgParser(_KVArgParser):
    """traitlets' parser, reporting a malformed command line as one line, not usage and help."""

    def error(self, message: str) -> NoReturn:
        # traitlets accepts any --name=value and so reads a lone unknown --name as an option
        # missing its value: name it as unknown, the way argparse would.
        match = re.fullmatch(r"argument --([\w.-]+): expected one argument", message)
        if match:
            name = match.group(1).removeprefix("BrokerApp.").replace("_", "-")
            known = name in BrokerApp.aliases
            message = f"--{name} needs a value" if known else f"unknown option --{name}"
        raise OptionError(f"{message} (see gpulane broker --help)")


class _Loader(KVArgParseConfigLoader):
    parser_class = _OneLineArgParser

    def _handle_unrecognized_alias(self, arg: str) -> None:
        # traitlets only warns; a mistyped option must not start a broker without it.
        raise OptionError(f"unknown option --{arg} (see gpulane broker --help)")

    def _convert_to_config(self) -> None:
        # As argparse did before: a repeated option's last value wins (the hub may pass
        # a typed option and the same one again in the deprecated broker_args).
        for key, value in vars(self.parsed_data).items():
            if key not in ("extra_args", "_flags") and isinstance(value, list) and value:
                setattr(self.parsed_data, key, value[-1])
        super()._convert_to_config()

    def load_config(self, *args: Any, **kwargs: Any) -> Config:
        loaded = super().load_config(*args, **kwargs)
        known = BrokerApp.class_own_traits(config=True)
        for section, values in loaded.items():
            for key in values:
                if section != "BrokerApp" or key not in known:
                    raise OptionError(
                        f"unknown option --{section}.{key} (see gpulane broker --help)"
                    )
        return loaded


class BrokerApp(Application):
    """The embedded GPU broker for this machine."""

    name = Unicode("gpulane broker")
    description = Unicode("Run the embedded GPU broker for this machine.")
    examples = Unicode(
        "gpulane broker --simulate-gpus 1 --gpu-memory 16G --slices 2\n"
        "gpulane broker --max-running-per-user 2 --gpu-groups gpu --max-time 8h"
    )

    socket = Unicode(
        help=f"Unix socket to listen on (default ${config.SOCKET_ENV} or {config.DEFAULT_SOCKET})"
    ).tag(config=True)
    state_dir = Unicode(
        help="Folder for the broker's database "
        "(default /var/lib/gpulane as root, else ~/.local/state/gpulane)"
    ).tag(config=True)
    simulate_gpus = Count(
        None, allow_none=True, help="Simulate N GPUs instead of reading NVML."
    ).tag(config=True)
    gpu_memory = Size("16G", help="Memory of each simulated GPU.").tag(config=True)
    slices = Count("1", help="Cut each GPU into K time-sliced slices.").tag(config=True)
    gpu_mem_reserve = SizeOrZero(
        "0",
        help="GPU memory kept back on each GPU for CUDA contexts, not offered to jobs: a "
        "GPU offers its total less this to --gpu-mem and slice jobs.",
    ).tag(config=True)
    max_running_per_user = Cap("0", help="Cap on running jobs per user (0: none).").tag(config=True)
    default_time = Duration("1h", help="Time limit of a job that gives none.").tag(config=True)
    max_time = Duration("24h", help="Longest time limit a job may ask for.").tag(config=True)
    half_life = Duration(
        "10m", help="Fair-share usage half-life (24h: fair over the day, not the hour)."
    ).tag(config=True)
    starvation_after = Duration(
        "1h",
        help="The job that has waited longest without its user getting GPU time, once over "
        "this, goes first and has GPUs reserved for it (others backfill around it).",
    ).tag(config=True)
    user_shares = Shares(
        "", help="Fair-share weights per user, such as alice=2,bob=0.5 (default 1 each)."
    ).tag(config=True)
    group_shares = Shares(
        "",
        help="Fair-share weights per group (of --group-source), such as physics=3,chem=1; a "
        "group's share is split among its members with jobs, by their user weights.",
    ).tag(config=True)
    gpu_groups = Groups("", help="Unix groups allowed to use GPUs (default: everyone).").tag(
        config=True
    )
    admin_groups = Groups(
        "", help="Groups whose members may cancel any job (root always may)."
    ).tag(config=True)
    admin_users = Groups(
        "", help="Users who may cancel any job, by name, over the socket or a hub token."
    ).tag(config=True)
    group_source = GroupSource(
        "hub",
        help="Where every user's groups are read, whichever way they connect: hub (as a "
        "JupyterHub service, the hub's groups, also for clients over the socket; else the "
        "system's) or unix (always the system's).",
    ).tag(config=True)
    lease_ttl = Duration("10s", help="Free a GPU whose client sent no heartbeat this long.").tag(
        config=True
    )
    kill_grace = Duration("10s", help="SIGTERM to SIGKILL grace for revoked jobs.").tag(config=True)
    max_submits_per_minute = Cap(
        "60",
        help="Submissions one user may make in any minute (0: no cap); more answer 429.",
    ).tag(config=True)
    retention = Retention(
        "30d", help="Keep ended jobs this long (at least 2d); usage totals are kept apart."
    ).tag(config=True)
    max_ended_per_user = Cap(
        "10000",
        maximum=10_000_000,
        help="Ended jobs kept per user, the oldest pruned first (0: no cap).",
    ).tag(config=True)
    dashboard_port = Count(
        None,
        maximum=65535,
        allow_none=True,
        help="Serve the JupyterHub dashboard on this port (as a hub service).",
    ).tag(config=True)
    dashboard_ip = Address(
        "127.0.0.1",
        help="The dashboard's address: loopback, or 0.0.0.0 in a hub pod on Kubernetes "
        "(the chart's proxy runs in another pod; every page asks the hub who is asking).",
    ).tag(config=True)
    api_port = Count(
        None,
        maximum=65535,
        allow_none=True,
        help="Also serve the API on this TCP port, for clients named by a JupyterHub token "
        "only (kernels in user pods on Kubernetes); needs the broker to run as a hub service.",
    ).tag(config=True)
    api_ip = Address(
        "127.0.0.1",
        help="The TCP API's address: loopback, or 0.0.0.0 in a hub pod on Kubernetes (the "
        "NetworkPolicy lets only user pods reach it).",
    ).tag(config=True)
    max_api_connections = Cap(
        "1024",
        maximum=100_000,
        help="Open connections to the TCP API from all clients together (0: no cap).",
    ).tag(config=True)
    max_api_connections_per_address = Cap(
        "64",
        maximum=100_000,
        help="Open connections to the TCP API from one client address (0: no cap).",
    ).tag(config=True)
    gpu_source = Enum(
        ["nvml", "k8s"],
        "nvml",
        help="Where the GPUs come from: nvml (this machine's) or k8s (the Kubernetes "
        "cluster's allocatable GPUs, followed as nodes come and go; see docs/admin-kubernetes.md).",
    ).tag(config=True)
    kubeconfig = Unicode(
        "", help="With --gpu-source k8s: a kubeconfig (default: the pod's service account)."
    ).tag(config=True)
    gpu_resource = Unicode(
        "nvidia.com/gpu",
        help="With --gpu-source k8s: the node resource that counts (nvidia.com/gpu.shared "
        "after time-slicing --rename-shared).",
    ).tag(config=True)
    k8s_interval = Duration(
        "30s", help="With --gpu-source k8s: how often the nodes and pods are listed again."
    ).tag(config=True)
    k8s_namespace = Unicode(
        "",
        help="With --gpu-source k8s: the hub's namespace, whose GPU servers' pods keep their "
        "leases across a hub pod restart (default: the service account's namespace).",
    ).tag(config=True)
    worker_node_selector = Unicode(
        "",
        help="With --gpu-source k8s: the nodeSelector of %%gpu cells' worker pods, as "
        "KEY=VALUE[,KEY=VALUE...] (such as nvidia.com/gpu.present=true).",
    ).tag(config=True)
    worker_start_timeout = Duration(
        "10m",
        help="With --gpu-source k8s: a %%gpu cell's worker pod that is not running this long "
        "after it was created (its image not pulled, no node for it) ends its job, the reason "
        "in the message, and gives the GPU back.",
    ).tag(config=True)
    worker_python = Unicode(
        "python3",
        help="With --gpu-source k8s: the Python of the users' images that runs a %%gpu "
        "cell's worker (gpulane must be installed for it).",
    ).tag(config=True)
    gpu_device_files = DeviceFiles(
        "",
        help="Each GPU's device files, opened to a job's user only while it holds the GPU "
        "(default: /dev/nvidiaN by NVML minor number, plus MIG capability files).",
    ).tag(config=True)
    enforce_devices = Enforcement(
        "auto",
        help="GPU device files open only to their holders: auto (where the broker is root "
        "and there are device files), on (refuse to start where it cannot hold) or off "
        "(also --no-enforce-devices).",
    ).tag(config=True)
    mps = MpsChoice(
        "auto",
        help="CUDA MPS, one control daemon per GPU, giving each job on a shared GPU a pinned "
        "memory limit the driver enforces: auto (where nvidia-cuda-mps-control is found, the "
        "broker is root and the GPU is not in MIG mode), on (refuse to start where it "
        "cannot run) or off.",
    ).tag(config=True)
    mps_dir = Unicode(
        "/run/gpulane/mps",
        help="Folder of the MPS daemons' pipe and log folders (gpuN/pipe, gpuN/log), root's.",
    ).tag(config=True)
    memory_watch_interval = Duration(
        "1s", help="How often the GPU memory watchdog reads per-process GPU memory."
    ).tag(config=True)
    memory_watch_grace = Duration(
        "5s", help="How long a job may stay over its GPU memory after the warning."
    ).tag(config=True)
    gpu_mem_slack = SizeOrZero(
        "512M",
        help="GPU memory a job may use over its grant before the watchdog warns (NVML counts "
        "each process's CUDA context, which framework caps do not).",
    ).tag(config=True)
    stray_gpu_processes = StrayChoice(
        "auto",
        help="A process using a GPU outside any grant: auto (ended where device access is "
        "enforced, else reported), end or report. Root's processes are only reported.",
    ).tag(config=True)
    gpu_readings = Unicode(
        "",
        help="Read per-process GPU memory from this JSON file instead of NVML (tests; sites "
        'that read GPUs another way): [{"gpu": 0, "pid": 123, "used": bytes}, ...].',
    ).tag(config=True)
    # Replaces Application's numeric log_level: the broker logs through the root logger.
    log_level = LogLevel("INFO", help="How much the broker logs.").tag(config=True)
    # Load limits: what one user's connections and requests may take of the shared broker.
    max_connections_per_user = Cap(
        "128",
        maximum=100_000,
        help="Connections one uid may hold at once (0: no cap; root is never capped).",
    ).tag(config=True)
    max_requests_per_second = Cap(
        "20",
        maximum=100_000,
        help="Requests per second per user past the burst (0: no limit); lease calls "
        "(heartbeat, started, finish) and root are exempt. More answer 429.",
    ).tag(config=True)
    request_burst = Count(
        "100", maximum=100_000, help="Requests a user may send at once before the rate applies."
    ).tag(config=True)
    idle_timeout = Duration(
        "60s",
        help="Close a connection that sends no request this long (event streams are not idle).",
    ).tag(config=True)
    write_timeout = Duration(
        "30s", help="Close a connection whose answer goes unread this long."
    ).tag(config=True)

    # Application declares these as instance attributes, so they cannot be ClassVars here.
    aliases: dict[Any, Any] = {  # noqa: RUF012
        _option(name)[2:]: f"BrokerApp.{name}"
        for name in (
            "socket", "state_dir", "simulate_gpus", "gpu_memory", "slices", "gpu_mem_reserve",
            "max_running_per_user", "default_time", "max_time", "half_life",
            "starvation_after", "user_shares", "group_shares",
            "gpu_groups", "admin_groups", "admin_users", "group_source",
            "lease_ttl", "kill_grace",
            "max_submits_per_minute", "retention", "max_ended_per_user",
            "dashboard_port", "dashboard_ip", "log_level",
            "api_port", "api_ip", "max_api_connections", "max_api_connections_per_address",
            "max_connections_per_user", "max_requests_per_second", "request_burst",
            "idle_timeout", "write_timeout", "gpu_device_files", "enforce_devices",
            "gpu_source", "kubeconfig", "gpu_resource", "k8s_interval", "k8s_namespace",
            "worker_node_selector", "worker_python", "worker_start_timeout",
            "memory_watch_interval", "memory_watch_grace", "gpu_mem_slack",
            "stray_gpu_processes", "gpu_readings", "mps", "mps_dir",
        )
    }  # fmt: skip
    flags: dict[Any, Any] = {  # noqa: RUF012
        "no-enforce-devices": (
            {"BrokerApp": {"enforce_devices": "off"}},
            "Leave GPU device files as they are (the same as --enforce-devices off).",
        )
    }

    @default("socket")
    def _socket_default(self) -> str:
        return str(config.socket_path())

    @default("state_dir")
    def _state_dir_default(self) -> str:
        return str(config.default_state_dir())

    def _observe_logging_change(self, change: Any) -> None:
        """Application turns the level into a number and configures its own logger here;
        the broker keeps the name and configures the root logger in :meth:`start`."""

    def _create_loader(
        self,
        argv: list[str] | None,
        aliases: Any,
        flags: Any,
        classes: Any,
    ) -> KVArgParseConfigLoader:
        return _Loader(argv, aliases, flags, classes=classes, log=self.log)

    def parse_command_line(self, argv: Any = None) -> None:
        # traitlets' wrapper logs a bad value with its config and exits 1; unwrapped, the
        # error reaches main(), which reports it in one line with exit status 2.
        Application.parse_command_line.__wrapped__(self, argv)  # type: ignore[attr-defined]

    def initialize(self, argv: Sequence[str] | None = None) -> None:
        self.parse_command_line(list(argv) if argv is not None else None)
        if self.extra_args:
            raise OptionError(
                f"unexpected argument {self.extra_args[0]!r} (see gpulane broker --help)"
            )
        cli = self.cli_config
        self.update_config(file_config())
        self.update_config(cli)  # the command line wins over the file

    def start(self) -> None:
        import asyncio
        import logging

        from gpulane.broker import devices, nvidia_driver
        from gpulane.broker.core import Broker
        from gpulane.broker.gpus import Inventory
        from gpulane.broker.memory_watch import WatchSettings
        from gpulane.broker.policy import PolicyConfig
        from gpulane.broker.server import serve
        from gpulane.broker.settings import BrokerSettings
        from gpulane.broker.shares import share_groups
        from gpulane.broker.store import Store

        self.check_api()  # before anything is opened
        logging.getLogger("tornado.access").setLevel(logging.WARNING)
        logging.basicConfig(
            level=self.log_level,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
            stream=sys.stderr,
        )
        settings = BrokerSettings(
            policy=PolicyConfig(
                slices_per_gpu=self.slices,
                max_running_per_user=self.max_running_per_user,
                default_time=self.default_time,
                max_time=self.max_time,
                half_life=float(self.half_life),
                starvation_after=float(self.starvation_after),
                user_shares=self.user_shares,
                group_shares=self.group_shares,
                user_groups=share_groups(self.group_shares),
                gpu_groups=self.gpu_groups,
                admin_groups=self.admin_groups,
                gpu_mem_reserve=int(self.gpu_mem_reserve),
            ),
            group_source=self.group_source,
            admin_users=self.admin_users,
            lease_ttl=float(self.lease_ttl),
            kill_grace=float(self.kill_grace),
            max_connections_per_user=self.max_connections_per_user,
            max_requests_per_second=self.max_requests_per_second,
            request_burst=self.request_burst,
            idle_timeout=float(self.idle_timeout),
            write_timeout=float(self.write_timeout),
            max_submits_per_minute=self.max_submits_per_minute,
            retention=float(self.retention),
            max_ended_per_user=self.max_ended_per_user,
        )
        if self.simulate_gpus is not None:
            inventory = Inventory.simulate(self.simulate_gpus, self.gpu_memory)
        elif self.gpu_source == "k8s":
            from gpulane.broker.k8s_capacity import KubeInventory, KubeReader

            inventory = KubeInventory(
                KubeReader(self.kubeconfig or None),
                int(self.slices),
                int(self.gpu_memory),
                self.gpu_resource,
                float(self.k8s_interval),
            )
        else:
            inventory = Inventory.from_nvml()  # RuntimeError where there are none
        files = self.gpu_device_files or (
            {} if inventory.simulated else devices.nvidia_device_files(inventory.count)
        )
        device_settings = devices.plan(
            self.enforce_devices,
            files,
            is_root=os.geteuid() == 0,
            driver=nvidia_driver.live_params(),
        )
        settings = replace(
            settings,
            devices=device_settings,
            mps=self._mps_plan(inventory),
            memory_watch=WatchSettings(
                interval=float(self.memory_watch_interval),
                grace=float(self.memory_watch_grace),
                slack=int(self.gpu_mem_slack),
                strays=self.stray_gpu_processes,
                readings_file=self.gpu_readings,
            ),
        )
        store = Store(Path(self.state_dir) / "broker.sqlite3")
        broker = Broker(settings, inventory, store)
        if self.gpu_source == "k8s" and self.simulate_gpus is None:
            broker.pods = self._pod_leases()
            broker.workers = self._worker_jobs(broker)
        broker.devices.close_all()  # before anyone is let in; start() reopens reattached jobs'
        broker.mps.start()  # each GPU's MPS daemon, before any job can be told of it

        async def serve_following() -> None:
            # An inventory that changes (Kubernetes nodes) wakes the queue when it does.
            follow = getattr(inventory, "follow", None)
            if follow is not None:
                loop = asyncio.get_running_loop()
                follow(lambda: loop.call_soon_threadsafe(broker.capacity_changed))
            await serve(
                broker, Path(self.socket), self.dashboard_port, self.dashboard_ip, self._api()
            )

        asyncio.run(serve_following())

    def _api(self) -> tuple[str, int, int, int] | None:
        """The TCP API's (ip, port, total cap, per-address cap); None where it is off."""
        if self.api_port is None:
            return None
        return (
            self.api_ip,
            int(self.api_port),
            int(self.max_api_connections),
            int(self.max_api_connections_per_address),
        )

    def check_api(self) -> None:
        """Refuse a TCP API outside a hub: there, no token could name its clients."""
        if self.api_port is None:
            return
        if not (os.environ.get("JUPYTERHUB_API_URL") and os.environ.get("JUPYTERHUB_API_TOKEN")):
            raise OptionError(
                "--api-port serves clients named by JupyterHub tokens only: run the broker "
                "as a JupyterHub service (JUPYTERHUB_API_URL and JUPYTERHUB_API_TOKEN unset)"
            )
        if self.dashboard_port is not None and self.dashboard_port == self.api_port:
            raise OptionError(f"--api-port {self.api_port} is also --dashboard-port; use another")

    def _mps_plan(self, inventory: Any) -> MpsSettings:
        """Which GPUs get an MPS daemon: real GPUs read through NVML only (never simulated
        ones, nor Kubernetes nodes'), not in MIG mode, where the broker is root."""
        import shutil

        from gpulane.broker import mps
        from gpulane.broker.mps_daemons import mig_modes

        nvml = inventory.nvml() if hasattr(inventory, "nvml") else None
        uuids, mig = {}, {}
        if nvml is not None:
            uuids = {r.index: r.uuid for r in inventory.read() if r.uuid}
            mig = mig_modes(nvml, inventory.count)
        return mps.plan(
            self.mps,
            control=shutil.which(mps.CONTROL),
            uuids=uuids,
            mig=mig,
            is_root=os.geteuid() == 0,
            base=self.mps_dir,
        )

    def _pod_leases(self) -> PodLeases | None:
        from gpulane.broker.k8s_capacity import core_api
        from gpulane.broker.pod_leases import PodLeases, hub_namespace

        namespace = hub_namespace(self.k8s_namespace)
        if not namespace:
            self.log.warning(
                "no --k8s-namespace (and no service account's): GPU servers' leases end "
                "when the hub pod restarts"
            )
            return None
        return PodLeases(*core_api(self.kubeconfig or None), namespace, self.kubeconfig)

    def _worker_jobs(self, broker: Broker) -> WorkerJobs | None:
        """%%gpu cells' worker pods, created in the hub's namespace."""
        from gpulane.broker.k8s_capacity import core_api
        from gpulane.broker.pod_leases import hub_namespace
        from gpulane.broker.worker_jobs import WorkerJobs, WorkerLauncher
        from gpulane.broker.worker_pods import WorkerPodSettings

        namespace = hub_namespace(self.k8s_namespace)
        if not namespace:
            self.log.warning("no --k8s-namespace (and no service account's): no %%gpu worker pods")
            return None
        selector: dict[str, str] = {}
        for term in filter(None, (t.strip() for t in self.worker_node_selector.split(","))):
            key, equals, value = term.partition("=")
            if not equals or not key.strip():
                raise OptionError(f"--worker-node-selector: {term!r} is not KEY=VALUE")
            selector[key.strip()] = value.strip()
        settings = WorkerPodSettings(
            namespace=namespace,
            gpu_resource=self.gpu_resource,
            slice_resource=self.gpu_resource,
            node_selector=selector,
            python=self.worker_python,
        )
        launcher = WorkerLauncher(*core_api(self.kubeconfig or None), settings, self.kubeconfig)
        return WorkerJobs(broker, launcher, float(self.worker_start_timeout))


def file_config(path: str | None = None) -> Config:
    """The site file's ``[broker]`` table as traitlets config, each value checked here.

    Checked now, with the file and key in the message, so a bad value does not
    surface later under a command-line option's name.
    """
    chosen = config.config_path(path)
    table = config.load_config(path).get("broker", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{chosen}: [broker] must be a table")
    traits = BrokerApp.class_traits(config=True)
    section = Config()
    for key, value in table.items():
        trait = traits.get(key)
        if trait is None:
            known = ", ".join(sorted(traits))
            raise ConfigError(f"{chosen}: [broker] has no setting {key!r}; known: {known}")
        # The clients' order: $GPULANE_SOCKET beats the file's socket.
        if key == "socket" and config.env(config.SOCKET_ENV):
            continue
        text = ",".join(value) if isinstance(value, list) else value
        if not isinstance(text, str | int) or isinstance(text, bool):
            raise ConfigError(f"{chosen}: [broker] {key} = {value!r} is not a value")
        if isinstance(trait, _Typed):
            trait.parse(str(text), f"{chosen}: [broker] {key}")
        section[key] = str(text)
    cfg = Config()
    cfg.BrokerApp = section
    return cfg


def main(argv: Sequence[str]) -> int:
    """Run ``gpulane broker ARGV...``; a bad value from any source is one line, exit 2."""
    app = BrokerApp()
    try:
        app.initialize(argv)
        app.start()
    except (GpulaneError, TraitError, ArgumentError) as error:
        print(f"gpulane: {_one_line(error)}", file=sys.stderr)
        usage = isinstance(error, OptionError | ConfigError | TraitError | ArgumentError)
        return EXIT_USAGE if usage else 1
    except RuntimeError as error:  # no GPUs to read through NVML
        print(f"gpulane: {error}", file=sys.stderr)
        return 1
    return 0


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
