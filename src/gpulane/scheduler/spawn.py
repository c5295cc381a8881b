"""Starting a job's process so that it can be stopped as a whole and dies with its client."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from gpulane.scheduler.base import CommandProcess

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: signal.Signals = signal.SIGKILL) -> None:
    # If the client is killed (even with SIGKILL), its command dies with it: no orphan
    # keeps using a GPU the broker has handed to someone else. (The signal fires when
    # the spawning *thread* ends, so spawn from a long-lived thread.)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def spawn_command(
    argv: Sequence[str],
    env: Mapping[str, str],
    stdout: IO[bytes] | int | None = None,
    stderr: IO[bytes] | int | None = None,
    pass_fds: Sequence[int] = (),
    death_signal: signal.Signals | None = signal.SIGKILL,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own process group (so the whole tree can be signalled).

    ``death_signal`` reaches it when its parent dies: SIGKILL by default; SIGTERM for a
    program that must clean up, such as ``srun`` cancelling its allocation; None for a
    detached job's command, which the broker watches once its client is gone.
    """
    return subprocess.Popen(
        list(argv),
        env=dict(env),
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        process_group=0,
        preexec_fn=None if death_signal is None else lambda: _die_with_parent(death_signal),
        pass_fds=tuple(pass_fds),
    )


def wait_or_kill_group(proc: CommandProcess, grace: float = 3.0) -> None:
    """Wait up to ``grace`` seconds for a group leader asked to end, then SIGKILL its group."""
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
