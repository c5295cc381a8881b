"""The fork server: a kernel's pre-started worker parent, so that a cell's worker starts in
the time of a fork with the notebook's modules already imported.

``python -m gpulane.kernel.forkserver``, started by the kernel (never the kernel itself)
with ``CUDA_VISIBLE_DEVICES`` empty. It imports Python's, IPython's and gpulane's worker
machinery, then what the kernel asks it to preload (``torch``, ``numpy``, ...), and
forks one child per worker. It never initialises CUDA: each child is told its grant's
GPUs (``CUDA_VISIBLE_DEVICES``, memory caps) in its first message, before any user code,
and creates its own CUDA context; the GPU is free when that child ends.

It forks only while it is single-threaded. A module that leaves a thread running after
a fork (OpenBLAS's pool, which shuts itself down at fork, does not count) or that
initialised CUDA at import makes forking unsafe: the server names it and exits, and the
kernel starts a new one without it.

The control channel is a ``SOCK_SEQPACKET`` socket pair: one JSON object per record,
with file descriptors alongside (``fork`` carries the child's channel and pipes).

Kernel to server: ``{"op": "preload", "modules": [...]}``, ``{"op": "fork", "id": N}``
(+ 3 fds), ``{"op": "taken", "pid": P}`` (a cell runs in it: do not exit while it lives).
Server to kernel: ``{"op": "forked", "id": N, "pid": P, "modules": [...]}``,
``{"op": "exited", "pid": P, "status": S}`` (Popen's convention: -N for signal N),
``{"op": "note", "text": ...}``, ``{"op": "unsafe", "module": M, "text": ...}`` (then it exits).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from gpulane.config import FORKSERVER_FD_ENV, RUNNER_FD_ENV
from gpulane.jobs import format_bytes
from gpulane.kernel.preload import PreloadSettings

# What every worker needs before its first line: imported here once, shared by every child.
BASE = (
    "gpulane.kernel.runner",
    "gpulane.kernel.names",
    "gpulane.kernel.transfer",
    "IPython.core.interactiveshell",
    "IPython.core.displayhook",
    "IPython.core.displaypub",
    "IPython.core.inputtransformer2",
    "traitlets.config",
    # What a child's first run_cell imported: hashlib (the cell's code name, with OpenSSL's
    # _hashlib), bdb and IPython's logger; returns.py once the cell has run.
    "hashlib",
    "bdb",
    "IPython.core.logger",
    "gpulane.kernel.returns",
    # What each child's shell imported as it was built (profiled: ~45 of its ~80 ms of CPU).
    "IPython.core.completer",
    "IPython.core.completerlib",
    "IPython.core.oinspect",
    "IPython.core.application",
    "IPython.core.magics",
    "IPython.core.crashhandler",
    "IPython.utils.wildcard",
    "tempfile",
)


def warm_caches() -> None:
    """Fill here, once for every child, what each child's first cell would fill for itself:
    tokenize's regular expressions, compiled on first use by IPython's input transforms
    (measured: the largest part of a forked child's CPU from the cell's message to its first
    line). Pure Python: no thread, no device."""
    from IPython.core.inputtransformer2 import TransformerManager

    TransformerManager().transform_cell("x = 1\nprint(x)\n")  # type: ignore[no-untyped-call]


MAX_RECORD = 1 << 20
_PR_SET_PDEATHSIG = 1


def pss_bytes(pid: int | str = "self") -> int | None:
    """Proportional set size of a process (shared pages split among their sharers), or None."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _cuda_started(name: str) -> bool:
    """Whether an imported framework has initialised CUDA in this process."""
    if name == "torch" and "torch" in sys.modules:
        return bool(sys.modules["torch"].cuda.is_initialized())
    return False


class ForkServer:
    def __init__(self, control: socket.socket, settings: PreloadSettings) -> None:
        self.control = control
        self.settings = settings
        self.preloaded: list[str] = []
        self.failed: set[str] = set()  # not importable here: not tried again
        self.full = False  # the limit or the memory cap was reached: nothing more is imported
        self.children: dict[int, int] = {}  # pid -> pidfd
        self.taken: set[int] = set()
        self.poller = select.poll()  # owns no fd: nothing to close in a child
        self.last_request = time.monotonic()

    # ------------------------------------------------------------------ the loop

    def serve(self) -> int:
        self.poller.register(self.control, select.POLLIN)
        while True:
            idle_left = self.settings.idle - (time.monotonic() - self.last_request)
            if idle_left <= 0 and not self.taken:
                return 0  # no cell for a while: exit (the spare child goes with us)
            for fd, _ in self.poller.poll(max(idle_left, 0.05) * 1000):
                if fd == self.control.fileno():
                    if not self._handle_request():
                        return 0  # the kernel is gone
                else:
                    self._reap(fd)

    def _handle_request(self) -> bool:
        try:
            data, fds, _, _ = socket.recv_fds(self.control, MAX_RECORD, 3)
        except OSError:
            return False
        if not data:
            return False
        self.last_request = time.monotonic()
        message = json.loads(data)
        op = message.get("op")
        if op == "preload":
            self.preload([str(m) for m in message.get("modules", [])])
        elif op == "fork":
            self.fork(int(message["id"]), fds)
        elif op == "taken":
            pid = int(message["pid"])
            if pid in self.children:
                self.taken.add(pid)
        for fd in fds if op != "fork" else ():
            os.close(fd)
        return True

    def send(self, **message: Any) -> None:
        with contextlib.suppress(OSError):
            self.control.send(json.dumps(message).encode())

    # ------------------------------------------------------------------ preloading

    def preload(self, modules: list[str], base: bool = False) -> None:
        for name in modules:
            if name in self.preloaded or name in self.failed or (self.full and not base):
                continue
            if not base and len(self.preloaded) >= self.settings.limit:
                self._stop_preloading(
                    f"it holds {self.settings.limit} packages (GPULANE_PRELOAD_LIMIT)"
                )
                return
            threads_before = thread_count()
            try:
                importlib.import_module(name)
            except BaseException:
                self.failed.add(name)
                continue
            reason = self.unsafe_reason(name, threads_before)
            if reason is not None:
                self.send(op="unsafe", module=name, text=reason)
                raise SystemExit(3)
            if not base:
                self.preloaded.append(name)
            pss = pss_bytes()
            if pss is not None and pss > self.settings.memory and not base:
                self._stop_preloading(
                    f"its memory reached {format_bytes(pss)} with {name} "
                    f"(GPULANE_PRELOAD_MEMORY={format_bytes(self.settings.memory)})"
                )
                return

    def _stop_preloading(self, why: str) -> None:
        if not self.full:
            self.full = True
            self.send(
                op="note",
                text=f"the fork server preloads nothing more: {why}; cells import the rest themselves",
            )

    def unsafe_reason(self, name: str, threads_before: int) -> str | None:
        """Why forking is no longer safe after importing ``name``, or None."""
        if _cuda_started(name):
            return f"importing {name} initialised CUDA"
        if threading.active_count() > 1:
            return f"importing {name} started a Python thread"
        if thread_count() > threads_before:
            # Some pools shut themselves down at fork (OpenBLAS): fork once and look again.
            pid = os.fork()
            if pid == 0:
                os._exit(0)
            os.waitpid(pid, 0)
            left = thread_count()
            if left > 1:
                return f"importing {name} started {left - 1} thread(s) that stay across a fork"
        return None

    # ------------------------------------------------------------------ forking

    def fork(self, request: int, fds: list[int]) -> None:
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            self.send(op="refused", id=request, text="a fork needs a channel and two pipes")
            return
        if thread_count() > 1:  # never fork a multi-threaded process
            self.send(op="unsafe", module="", text="the fork server is no longer single-threaded")
            raise SystemExit(3)
        pid = os.fork()
        if pid == 0:
            self._become_worker(fds)  # never returns
        for fd in fds:
            os.close(fd)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            pidfd = -1
        if pidfd >= 0:
            self.children[pid] = pidfd
            self.poller.register(pidfd, select.POLLIN)
        self.send(op="forked", id=request, pid=pid, modules=self.preloaded)
        if pidfd < 0:  # already gone: reap it now
            self._report(pid)

    def _reap(self, pidfd: int) -> None:
        pid = next((p for p, fd in self.children.items() if fd == pidfd), None)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        if pid is not None:
            del self.children[pid]
            self.taken.discard(pid)
            self._report(pid)

    def _report(self, pid: int) -> None:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            return
        self.send(op="exited", pid=pid, status=os.waitstatus_to_exitcode(status))

    def _become_worker(self, fds: list[int]) -> None:
        """In the child: a worker of its own, led by itself, dying with the fork server."""
        status = 1
        try:
            os.setpgid(0, 0)  # the job's command: a group the broker can signal as a whole
            server = os.getppid()
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != server:  # the server died before prctl took effect
                os._exit(1)
            for fd in (self.control.fileno(), *self.children.values()):
                with contextlib.suppress(OSError):
                    os.close(fd)
            channel, out, err = fds
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.close(out)
            os.close(err)
            for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            os.environ[RUNNER_FD_ENV] = str(channel)
            from gpulane.kernel import runner

            status = runner.run_to_exit(runner.main)
        finally:
            os._exit(status)


def main() -> int:
    # The kernel's interrupts are for cells; a worker restores the handler it needs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    control = socket.socket(fileno=int(os.environ.pop(FORKSERVER_FD_ENV)))
    settings = PreloadSettings.from_environment(os.environ)
    server = ForkServer(control, settings)
    server.preload(list(BASE), base=True)
    warm_caches()
    return server.serve()


if __name__ == "__main__":
    sys.exit(main())
