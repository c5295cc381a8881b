"""A real one-node Slurm cluster (tools/slurmlocal.py) for the Slurm back end's tests."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.users import as_user, need, user_env

SLURM_PORT = 6847  # apart from the default, so a developer's own cluster is left alone


@dataclass
class SlurmCluster:
    """A real one-node Slurm (tools/slurmlocal.py) with one simulated GPU."""

    folder: Path
    env: dict[str, str]
    homes: Path

    def user_env(self, user: str) -> dict[str, str]:
        env = user_env(user, None)
        env.update(self.env, GPULANE_BACKEND="slurm", HOME=str(self.homes / user))
        return env

    def gpulane(self, user: str, *args: str, **popen: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(
            as_user(user, [sys.executable, "-m", "gpulane", *args]),
            env=self.user_env(user),
            cwd=self.homes / user,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )

    def call(self, user: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = self.gpulane(user, *args)
        out, err = proc.communicate(timeout=timeout)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def squeue(self) -> list[list[str]]:
        out = subprocess.run(
            ["squeue", "-h", "-o", "%i|%u|%T|%j"],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
        ).stdout
        return [line.split("|") for line in out.splitlines()]


@pytest.fixture(scope="session")
def slurm_cluster(unix_users: tuple[str, ...]) -> Iterator[SlurmCluster]:
    need(os.geteuid() == 0, "the Slurm tests start slurmctld and slurmd, which needs root")
    from tools.slurmlocal import start_cluster, stop_cluster

    folder = Path(tempfile.mkdtemp(prefix="gpulane-slurm-"))
    folder.chmod(0o755)
    env = start_cluster(folder, gpus=1, users=list(unix_users), port=SLURM_PORT)
    homes = folder / "homes"
    homes.mkdir(mode=0o755)
    for user in unix_users:
        entry = pwd.getpwnam(user)
        (homes / user).mkdir(mode=0o700)
        os.chown(homes / user, entry.pw_uid, entry.pw_gid)
    yield SlurmCluster(folder, env, homes)
    stop_cluster(folder)
    shutil.rmtree(folder, ignore_errors=True)
