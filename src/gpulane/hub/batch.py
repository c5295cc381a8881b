"""Each user's whole Jupyter server as a Slurm job (batchspawner), with ``%%gpu`` inside it.

    # jupyterhub_config.py
    from gpulane.hub.batch import configure_slurm_spawner
    configure_slurm_spawner(c, partition="interactive", req_runtime="8:00:00")

The server job asks Slurm for CPUs and memory only, never for a GPU: a ``%%gpu``
cell in it submits its own short Slurm job (gpulane's Slurm back end,
``GPULANE_BACKEND=slurm``) that holds a GPU only while the cell runs.

:class:`GpulaneSlurmSpawner` is batchspawner's ``SlurmSpawner`` with its sharp
edges filed off (see docs/admin-slurm-batchspawner.md):

- Slurm's commands run as argv lists, not through a shell, and every value that
  goes into the batch script or a command line is checked against a strict
  pattern first; the user name must look like a Unix login name.
- ``user_options`` (anything a user puts in the body of ``POST
  /hub/api/users/NAME/server``) never reaches the batch script: users cannot
  add ``#SBATCH`` lines, a GPU, another partition or commands.
- batchspawner's ``/hub/api/batchspawner`` handler sets *any* spawner attribute
  the server's token sends (``exec_prefix``, ``batch_cancel_cmd``, ``job_id``,
  ...), which the hub later runs. It is replaced by one that accepts only
  ``{"port": N}``, only from the starting server's own token, only while it starts.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import batchspawner.api
from batchspawner import BatchSpawnerBase, SlurmSpawner
from batchspawner.batchspawner import format_template
from jupyterhub import apihandlers
from jupyterhub.apihandlers import APIHandler
from tornado import web
from traitlets import Bool, Float, List, Unicode, default

from gpulane.config import BACKEND_ENV, SOCKET_ENV
from gpulane.hub.accounts import AccountRefused, check_unix_account

SERVER_JOB_NAME = "jupyterhub-server"

# What may appear in the batch script or on a Slurm command line. None of them
# allows whitespace, quotes or shell syntax; the user name must be a login name.
USERNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
SLURM_VALUE = re.compile(r"[A-Za-z0-9_.:,+@%/=-]{1,200}")  # partition, time, memory, account
SBATCH_OPTION = re.compile(r"--[a-z][a-z0-9-]*(=[A-Za-z0-9_.:,+@%/=-]+)?")
ABSOLUTE_PATH = re.compile(r"/[A-Za-z0-9_.@+/-]*")
VARIABLE_NAMES = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(,[A-Za-z_][A-Za-z0-9_]*)*")

SERVER_BATCH_TEMPLATE = (
    """#!/bin/bash
# A JupyterHub server, submitted by gpulane's GpulaneSlurmSpawner. No GPU here:
# %%gpu cells submit their own short jobs for that.
#SBATCH --job-name="""
    + SERVER_JOB_NAME
    + """
#SBATCH --output={{homedir}}/.jupyterhub-slurm-%j.log
#SBATCH --chdir={{homedir}}
#SBATCH --export={{keepvars}}
{% if partition %}#SBATCH --partition={{partition}}
{% endif %}{% if runtime %}#SBATCH --time={{runtime}}
{% endif %}{% if memory %}#SBATCH --mem={{memory}}
{% endif %}{% if nprocs %}#SBATCH --cpus-per-task={{nprocs}}
{% endif %}{% if account %}#SBATCH --account={{account}}
{% endif %}{% if qos %}#SBATCH --qos={{qos}}
{% endif %}{% for option in sbatch_options %}#SBATCH {{option}}
{% endfor %}
set -eu
{{prologue}}
{{cmd}}
{{epilogue}}
"""
)

# The subvars checked against SLURM_VALUE before each use (empty means "not set").
_CHECKED_SUBVARS = ("partition", "runtime", "memory", "nprocs", "account", "qos", "ngpus")


class SlurmSpawnerConfigError(ValueError):
    """A value for the batch script or a Slurm command does not pass the checks."""


def check_value(what: str, value: str, pattern: re.Pattern[str]) -> str:
    """``value`` if it matches ``pattern`` whole; else a clear error naming ``what``."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise SlurmSpawnerConfigError(
            f"{what} = {value!r} is not allowed here (it must match {pattern.pattern})"
        )
    return value


def check_sbatch_options(options: Iterable[str]) -> list[str]:
    """Extra ``#SBATCH`` lines: each one ``--name`` or ``--name=value``, nothing else."""
    if isinstance(options, str):
        raise SlurmSpawnerConfigError("extra_sbatch is a list of options, not one string")
    checked = [check_value("extra_sbatch option", option, SBATCH_OPTION) for option in options]
    for option in checked:
        if option.split("=", 1)[0] in ("--gres", "--gpus", "--gpus-per-node", "--gpus-per-task"):
            raise SlurmSpawnerConfigError(
                f"extra_sbatch {option!r}: the server job must not hold a GPU; "
                "%%gpu cells ask for one while they run"
            )
    return checked


class GpulaneSlurmSpawner(SlurmSpawner):  # type: ignore[misc]
    """batchspawner's SlurmSpawner, without a shell and without user-controlled script text."""

    batch_script = Unicode(
        SERVER_BATCH_TEMPLATE,
        help="Jinja template of the batch script. Only checked values reach it: "
        "{{homedir}}, {{keepvars}}, {{partition}}, {{runtime}}, {{memory}}, {{nprocs}}, "
        "{{account}}, {{qos}}, {{sbatch_options}} (a list), {{cmd}}, and the admin's "
        "{{prologue}} and {{epilogue}}.",
    ).tag(config=True)

    extra_sbatch = List(
        Unicode(),
        help="More sbatch options for the server job, one per #SBATCH line, e.g. ['--constraint=cpu'].",
    ).tag(config=True)

    home_dir = Unicode(
        "",
        help="Each user's home on the nodes, with {username} replaced, e.g. '/shared/home/{username}'. "
        "Empty: the home the password database gives on the hub machine.",
    ).tag(config=True)

    single_machine = Bool(
        False,
        help="The hub runs on the cluster's only node: the server listens on 127.0.0.1 and "
        "the hub connects there. Off (a real cluster): the server listens on its node's "
        "interfaces and the hub connects to the node name squeue reports.",
    ).tag(config=True)

    command_timeout = Float(
        60.0, help="Seconds sbatch, squeue or scancel may take before the call counts as failed."
    ).tag(config=True)

    # A Slurm command that did not answer is "unknown" (keep waiting), not "job gone".
    state_unknown_re = Unicode(
        r"^(?:slurm_load_jobs error: (?:Socket timed out on send/recv|Unable to contact slurm controller)"
        r"|gpulane: \S+ did not answer)"
    ).tag(config=True)

    @default("exec_prefix")
    def _exec_prefix_default(self) -> str:
        # A root hub becomes the user without sudo (no secure_path rewriting PATH);
        # otherwise sudo, with rules for sbatch, squeue and scancel only.
        if os.geteuid() == 0:
            return "setpriv --reuid={username} --regid={username} --init-groups --"
        return "sudo -E -u {username} --"

    @default("req_homedir")
    def _req_homedir_default(self) -> str:
        name = check_value("user name", self.user.name, USERNAME)
        if self.home_dir:
            return self.home_dir.replace("{username}", name)
        return str(super()._req_homedir_default())

    # ------------------------------------------------------------------ values

    def get_req_subvars(self) -> dict[str, Any]:
        subvars: dict[str, Any] = super().get_req_subvars()
        check_value("user name", subvars["username"], USERNAME)
        # The script runs as the Unix user of this name (setpriv --reuid / sudo -u).
        try:
            check_unix_account(subvars["username"])
        except AccountRefused as error:
            raise web.HTTPError(403, str(error)) from None
        check_value("home folder", subvars["homedir"], ABSOLUTE_PATH)
        check_value("exported variable names", subvars["keepvars"], VARIABLE_NAMES)
        for key in _CHECKED_SUBVARS:
            if subvars.get(key):
                check_value(f"req_{key}", str(subvars[key]), SLURM_VALUE)
        subvars["sbatch_options"] = check_sbatch_options(self.extra_sbatch)
        return subvars

    def cmd_formatted_for_batch(self) -> str:
        return shlex.join([self.batchspawner_singleuser_cmd, *self.cmd, *self.get_args()])

    async def _get_batch_script(self, **subvars: Any) -> str:
        # batchspawner merges user_options into subvars: render from trusted values only.
        if self.user_options:
            self.log.warning(
                "ignoring user_options %s for %s: the batch script takes only the admin's settings",
                sorted(self.user_options),
                self.user.name,
            )
        trusted = self.get_req_subvars()
        trusted["cmd"] = self.cmd_formatted_for_batch()
        return str(format_template(self.batch_script, **trusted))

    def user_env(self, env: dict[str, str]) -> dict[str, str]:
        env = dict(super().user_env(env))
        env["HOME"] = self.req_homedir
        return env

    def get_env(self) -> dict[str, str]:
        if self.single_machine:
            self.ip = "127.0.0.1"  # read by the base class for JUPYTERHUB_SERVICE_URL
        env = dict(super().get_env())
        # %%gpu inside the server uses Slurm: GPUs on a Slurm cluster are Slurm's to give.
        env.pop(SOCKET_ENV, None)
        env[BACKEND_ENV] = "slurm"
        if os.environ.get("SLURM_CONF"):
            env.setdefault("SLURM_CONF", os.environ["SLURM_CONF"])
        return env

    def state_gethost(self) -> str | None:
        if self.single_machine:
            return "127.0.0.1"
        host = super().state_gethost()
        return str(host) if host else None

    # ------------------------------------------------------------------ commands

    async def run_command(
        self, cmd: str, input: str | None = None, env: dict[str, str] | None = None
    ) -> str:
        """Run ``cmd`` as an argv list (split like a shell would, but never run by one)."""
        argv = shlex.split(cmd)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        data = input.encode() if input else None
        try:
            out, err = await asyncio.wait_for(proc.communicate(data), self.command_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError(
                f"gpulane: {argv[0]} did not answer within {self.command_timeout:.0f} s"
            ) from None
        if proc.returncode != 0:
            message = err.decode(errors="replace").strip()
            self.log.error(
                "%s exited with status %s: %s", shlex.join(argv), proc.returncode, message
            )
            raise RuntimeError(message)
        return out.decode(errors="replace").strip()


class PortOnlyHandler(APIHandler):  # type: ignore[misc]
    """``POST /hub/api/batchspawner``: a starting server reports its port, and nothing else."""

    @web.authenticated
    def post(self) -> None:
        token = self.get_auth_token()
        spawners = getattr(self.current_user, "spawners", {}).values()
        spawner = next((s for s in spawners if token and s.api_token == token), None)
        if not isinstance(spawner, BatchSpawnerBase):
            raise web.HTTPError(403, "only a batch server's own token may report its port")
        data = self.get_json_body()
        port = data.get("port") if isinstance(data, dict) else None
        if (
            not isinstance(data, dict)
            or set(data) != {"port"}
            or not isinstance(port, int)
            or isinstance(port, bool)
            or not 0 < port < 65536
        ):
            raise web.HTTPError(400, 'only {"port": 1..65535} may be reported')
        if spawner.pending != "spawn":
            raise web.HTTPError(409, "a port is reported once, while the server starts")
        spawner.port = port
        self.set_status(201)
        self.finish(json.dumps({"message": "port recorded"}))


def _replace_batchspawner_handler() -> None:
    """Swap batchspawner's handler (which sets any attribute) for :class:`PortOnlyHandler`."""
    handlers = apihandlers.default_handlers
    for index, (pattern, handler, *rest) in enumerate(handlers):
        if handler is batchspawner.api.BatchSpawnerAPIHandler:
            handlers[index] = (pattern, PortOnlyHandler, *rest)


_replace_batchspawner_handler()


def configure_slurm_spawner(
    c: Any,
    *,
    partition: str | None = None,
    req_runtime: str = "8:00:00",
    req_memory: str | None = None,
    req_nprocs: str | None = None,
    account: str | None = None,
    extra_sbatch: Iterable[str] = (),
    home_dir: str | None = None,
    single_machine: bool = False,
    bin_dir: str | os.PathLike[str] | None = None,
    start_timeout: int = 300,
) -> None:
    """Make every user's server a Slurm job (GpulaneSlurmSpawner), with ``%%gpu`` on Slurm inside.

    ``bin_dir`` holds ``jupyterhub-singleuser`` and ``batchspawner-singleuser`` as the
    compute nodes see them (default: next to the hub's own Python). Values are checked
    now, so a bad one stops the hub at start with a message rather than at a spawn.
    """
    values = {"partition": partition, "req_runtime": req_runtime, "req_memory": req_memory,
              "req_nprocs": req_nprocs, "account": account}  # fmt: skip
    for name, value in values.items():
        if value:
            check_value(name, value, SLURM_VALUE)
    options = check_sbatch_options(extra_sbatch)
    if home_dir:
        check_value("home_dir", home_dir.replace("{username}", "user"), ABSOLUTE_PATH)
    bin_path = Path(bin_dir) if bin_dir else Path(sys.executable).parent
    check_value("bin_dir", str(bin_path), ABSOLUTE_PATH)

    c.JupyterHub.spawner_class = GpulaneSlurmSpawner
    spawner = c.GpulaneSlurmSpawner
    spawner.req_partition = partition or ""
    spawner.req_runtime = req_runtime or ""
    spawner.req_memory = req_memory or ""
    spawner.req_nprocs = req_nprocs or ""
    spawner.req_account = account or ""
    spawner.extra_sbatch = options
    spawner.home_dir = home_dir or ""
    spawner.single_machine = single_machine
    spawner.start_timeout = start_timeout
    spawner.batchspawner_singleuser_cmd = str(bin_path / "batchspawner-singleuser")
    c.Spawner.cmd = [str(bin_path / "jupyterhub-singleuser")]
    # The broker's socket (from gpulane.hub.configure) does not reach compute nodes, and
    # would win over GPULANE_BACKEND: drop it for these servers.
    environment = dict(c.Spawner.get("environment", {}))
    environment.pop(SOCKET_ENV, None)
    environment[BACKEND_ENV] = "slurm"
    c.Spawner.environment = environment
