"""The kernel's end of its fork server (:mod:`gpulane.kernel.forkserver`): start it, ask it
for workers, learn how they end.

A forked worker is the fork server's child, not the kernel's: the kernel cannot
``waitpid`` it. :class:`ForkedProcess` stands in for ``Popen``: the fork server reaps
the child and sends its exit status; if the fork server itself is gone (its children
die with it, by SIGKILL), the child's pidfd says when it ended.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import IO, Any

from gpulane.config import FORKSERVER_FD_ENV
from gpulane.kernel.preload import ImportWatch, PreloadSettings
from gpulane.scheduler.spawn import spawn_command, wait_or_kill_group

SERVER_COMMAND = (sys.executable, "-m", "gpulane.kernel.forkserver")


class ForkedProcess:
    """A worker forked by the fork server, with what the scheduler asks of a ``Popen``."""

    def __init__(self, pid: int, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.pid = pid
        self.stdout: IO[bytes] | None = stdout
        self.stderr: IO[bytes] | None = stderr
        self.returncode: int | None = None
        self._ended = threading.Event()
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            self._pidfd = None  # already gone: the fork server's report follows

    def ended(self, status: int) -> None:
        if self.returncode is None:
            self.returncode = status
        self._ended.set()
        if self._pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None

    def orphaned(self) -> None:
        """The fork server is gone, and so (by its death signal) is this child, or soon."""
        pidfd = self._pidfd
        if pidfd is None:
            self.ended(-signal.SIGKILL)
            return

        def watch() -> None:
            with contextlib.suppress(OSError, ValueError):
                select.select([pidfd], [], [])
            self.ended(-signal.SIGKILL)

        threading.Thread(target=watch, daemon=True, name="gpulane-orphan").start()

    def poll(self) -> int | None:
        return self.returncode if self._ended.is_set() else None

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode


class PendingFork:
    """A worker asked of the fork server; ready once the server has forked it."""

    def __init__(self, channel: Connection, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.channel = channel
        self.stdout, self.stderr = stdout, stderr
        self.process: ForkedProcess | None = None
        self.modules: list[str] = []
        self.answered = threading.Event()

    def failed(self) -> None:
        for handle in (self.channel, self.stdout, self.stderr):
            with contextlib.suppress(OSError):
                handle.close()
        self.answered.set()


class ForkServerClient:
    """One kernel's fork server process, and the workers it forked."""

    def __init__(self, settings: PreloadSettings, exclude: set[str], notes: list[str]) -> None:
        self.settings = settings
        self.exclude = exclude  # modules that made forking unsafe: never asked for again
        self.notes = notes  # for the next cell's output (one line each)
        self.modules: list[str] = []  # asked for so far
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.update(
            **{FORKSERVER_FD_ENV: str(theirs.fileno())},
            CUDA_VISIBLE_DEVICES="",  # no GPU until a child's grant says which
            PYTHONUNBUFFERED="1",
        )
        # From the kernel's main thread, like a warm worker: it dies with the kernel.
        self.proc = spawn_command(SERVER_COMMAND, env, pass_fds=[theirs.fileno()])
        theirs.close()
        self.sock = ours
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, PendingFork] = {}
        self._processes: dict[int, ForkedProcess] = {}
        self._statuses: dict[int, int] = {}  # exits reported before their process was known
        self._gone = threading.Event()
        threading.Thread(target=self._read, daemon=True, name="gpulane-forkserver").start()

    @property
    def alive(self) -> bool:
        return not self._gone.is_set() and self.proc.poll() is None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def preload(self, modules: list[str]) -> bool:
        """Ask for modules not asked for yet; True if there were any."""
        new = [m for m in modules if m not in self.modules and m not in self.exclude]
        if new:
            self.modules += new
            self._send({"op": "preload", "modules": new})
        return bool(new)

    def fork(self) -> PendingFork | None:
        """Ask for a worker; None where the fork server is gone."""
        ours, child = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pending = PendingFork(
            Connection(ours.detach()), os.fdopen(out_r, "rb", 0), os.fdopen(err_r, "rb", 0)
        )
        request = next(self._ids)
        with self._lock:
            self._pending[request] = pending
        sent = self._send({"op": "fork", "id": request}, [child.fileno(), out_w, err_w])
        for fd in (child.detach(), out_w, err_w):
            os.close(fd)
        if not sent:
            with self._lock:
                self._pending.pop(request, None)
            pending.failed()
            return None
        return pending

    def taken(self, pid: int) -> None:
        self._send({"op": "taken", "pid": pid})

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        wait_or_kill_group(self.proc)

    def _send(self, message: dict[str, Any], fds: list[int] | None = None) -> bool:
        if self._gone.is_set():
            return False
        try:
            with self._lock:
                socket.send_fds(self.sock, [json.dumps(message).encode()], fds or [])
        except OSError:
            return False
        return True

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            self._handle(json.loads(data))

    def _handle(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        if op in ("forked", "refused"):
            with self._lock:
                pending = self._pending.pop(int(message["id"]), None)
            if pending is None:
                return
            if op == "refused":
                pending.failed()
                return
            pid = int(message["pid"])
            assert pending.stdout is not None and pending.stderr is not None
            process = ForkedProcess(pid, pending.stdout, pending.stderr)
            pending.modules = list(message.get("modules", []))
            with self._lock:
                self._processes[pid] = process
                early = self._statuses.pop(pid, None)
            if early is not None:
                process.ended(early)
            pending.process = process
            pending.answered.set()
        elif op == "exited":
            pid, status = int(message["pid"]), int(message["status"])
            with self._lock:
                known = self._processes.pop(pid, None)
                if known is None:
                    self._statuses[pid] = status
            if known is not None:
                known.ended(status)
        elif op == "unsafe":
            module = str(message.get("module") or "")
            if module:
                self.exclude.add(module)
            self.notes.append(
                f"{message.get('text')}: the fork server cannot fork safely"
                + (f" with {module}, so it no longer preloads it" if module else "")
                + "; this cell starts a fresh worker"
            )
        elif op == "note":
            self.notes.append(str(message.get("text")))

    def _lost(self) -> None:
        self._gone.set()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
            processes, self._processes = list(self._processes.values()), {}
        for waiting in pending:
            waiting.failed()
        for process in processes:
            process.orphaned()


class Forks:
    """The kernel's fork server as a source of workers: started on demand (and again after it
    exited idle, died, or named a module unsafe), kept holding the notebook's imports."""

    def __init__(self, settings: PreloadSettings, watch: ImportWatch) -> None:
        self.settings = settings
        self.watch = watch
        self.exclude: set[str] = set()
        self.server: ForkServerClient | None = None
        self._notes: list[str] = []

    def request(self) -> PendingFork | None:
        """A worker on its way (the server started first where it is not running)."""
        server = self.server
        if server is None or not server.alive:
            if server is not None:
                server.stop()
            try:
                server = self.server = ForkServerClient(self.settings, self.exclude, self._notes)
            except OSError:
                self.server = None
                return None
        server.preload(self.wanted())
        return server.fork()

    def wanted(self) -> list[str]:
        return self.watch.wanted(list(sys.modules))

    def watch_cell(self, code: str) -> None:
        self.watch.add_cell(code)

    def refresh(self) -> bool:
        """Send the server what the notebook imported since; True if that was anything new."""
        server = self.server
        return server is not None and server.alive and server.preload(self.wanted())

    def taken(self, pid: int) -> None:
        if self.server is not None:
            self.server.taken(pid)

    def notes(self) -> list[str]:
        """What the fork servers said since last asked, once each."""
        new, self._notes[:] = list(self._notes), []
        return new

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
