"""The kernel's side of a GPU worker: start it early, hand it a cell at grant time, relay its output."""

from __future__ import annotations

import codecs
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any, Protocol

from gpulane.scheduler.spawn import spawn_command

RUNNER_COMMAND = (sys.executable, "-m", "gpulane.kernel.runner")


class Sink(Protocol):
    """Where a cell's output goes: the running cell, or a background job's own outputs."""

    def stream(self, name: str, text: str) -> None: ...
    def message(self, message: dict[str, Any]) -> None: ...


class WarmWorker:
    """A runner process started before it is needed, waiting on its channel.

    It is spawned from the kernel's main thread: the worker dies with the kernel
    (PR_SET_PDEATHSIG fires when the spawning thread ends).
    """

    def __init__(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env.update(
            GPULANE_RUNNER_FD=str(child.fileno()),
            CUDA_VISIBLE_DEVICES="",  # no GPU until the grant says which
            PYTHONUNBUFFERED="1",
        )
        self.proc = spawn_command(
            RUNNER_COMMAND, env, subprocess.PIPE, subprocess.PIPE, pass_fds=[child.fileno()]
        )
        child.close()
        self.channel = Connection(parent.detach())
        self.sink: Sink | None = None
        self.done = threading.Event()
        self.result: dict[str, Any] | None = None
        self._threads: list[threading.Thread] = []
        self._send_lock = threading.Lock()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def attach(self, sink: Sink) -> None:
        """Direct output to ``sink``; the relays start on first use (inside a running cell)."""
        self.sink = sink
        if not self._threads:
            assert self.proc.stdout is not None and self.proc.stderr is not None
            self._threads = [
                threading.Thread(
                    target=self._relay, args=("stdout", self.proc.stdout), daemon=True
                ),
                threading.Thread(
                    target=self._relay, args=("stderr", self.proc.stderr), daemon=True
                ),
                threading.Thread(target=self._read_channel, daemon=True),
            ]
            for thread in self._threads:
                thread.start()

    def run(self, grant_env: dict[str, str], message: dict[str, Any]) -> None:
        """Send one cell; ``done`` is set when the worker reports its end."""
        self.done.clear()
        self.result = None
        with self._send_lock:
            self.channel.send({"op": "run", "env": grant_env, **message})

    def launcher(
        self, message: dict[str, Any]
    ) -> Callable[[dict[str, str]], subprocess.Popen[bytes]]:
        """A scheduler Launcher: at grant time, send the cell and hand back the worker process."""

        def launch(grant_env: dict[str, str]) -> subprocess.Popen[bytes]:
            self.run(grant_env, message)
            return self.proc

        return launch

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGINT)

    def wait_output(self, timeout: float = 5.0) -> None:
        """After the worker exits: let the relays deliver the last of its output."""
        for thread in self._threads:
            thread.join(timeout)

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError), self._send_lock:
            self.channel.send({"op": "stop"})
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.close()
        if not self._threads:  # relays own the pipes once started
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()

    def _relay(self, name: str, pipe: Any) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fd = pipe.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            text = decoder.decode(chunk, final=not chunk)
            if text and self.sink is not None:
                self.sink.stream(name, text)
            if not chunk:
                pipe.close()
                return

    def _read_channel(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                self.done.set()
                return
            op = message.get("op")
            if op == "done":
                self.result = message
                self.done.set()
            elif op == "stream" and self.sink is not None:
                self.sink.stream(str(message.get("name")), str(message.get("text")))
            elif op != "ready" and self.sink is not None:
                self.sink.message(message)


class RemoteWorker(WarmWorker):
    """A worker that a cluster starts elsewhere and that connects back to this kernel.

    The kernel listens on a TCP port; the worker proves itself with a random key
    read from a private file (0600 in a 0700 folder under the user's home, which
    the compute node sees). Output comes over the channel, not through pipes.
    """

    def __init__(self, message: dict[str, Any], host: str | None = None) -> None:
        self.sink = None
        self.done = threading.Event()
        self.result = None
        self._threads = []
        self._send_lock = threading.Lock()
        self._message = message
        self._connected = threading.Event()
        key = secrets.token_bytes(32)
        bind = (
            host
            or os.environ.get("GPULANE_CALLBACK_HOST")
            or socket.gethostbyname(socket.gethostname())
        )
        self.listener = Listener((bind, 0), authkey=key)
        folder = Path(os.environ.get("GPULANE_KEY_DIR") or Path.home() / ".gpulane" / "keys")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor, name = tempfile.mkstemp(dir=folder, prefix="worker-")  # created 0600
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(key)
        self.keyfile = Path(name)
        address = self.listener.address
        self.job_env = {
            "GPULANE_RUNNER_ADDRESS": f"{address[0]}:{address[1]}",
            "GPULANE_RUNNER_KEYFILE": str(self.keyfile),
            "GPULANE_RUNNER_STREAMS": "channel",
            "PYTHONUNBUFFERED": "1",
        }
        threading.Thread(target=self._accept, daemon=True, name="gpulane-accept").start()

    @property
    def alive(self) -> bool:
        return not self.done.is_set()

    def attach(self, sink: Sink) -> None:
        self.sink = sink  # the channel reader starts once the worker connects

    def _accept(self) -> None:
        while True:
            try:
                self.channel = self.listener.accept()
                break
            except AuthenticationError:
                continue  # not our worker: keep listening for the one with the key
            except (OSError, EOFError):
                self.keyfile.unlink(missing_ok=True)
                return  # closed before the job started
        self.keyfile.unlink(missing_ok=True)
        reader = threading.Thread(target=self._read_channel, daemon=True, name="gpulane-remote")
        self._threads = [reader]
        reader.start()
        self._connected.set()
        self.run({}, self._message)  # the grant's environment is Slurm's own

    def interrupt(self) -> None:
        if self._connected.is_set():
            with contextlib.suppress(OSError, ValueError), self._send_lock:
                self.channel.send({"op": "interrupt"})

    def stop(self) -> None:
        if self._connected.is_set():
            with contextlib.suppress(OSError, ValueError), self._send_lock:
                self.channel.send({"op": "stop"})
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()
        self.keyfile.unlink(missing_ok=True)
        if self._connected.is_set():
            with contextlib.suppress(OSError):
                self.channel.close()


class WorkerPool:
    """Keeps one warm worker ready, so a cell on a free GPU starts at once."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.spare: WarmWorker | None = None

    def take(self) -> WarmWorker:
        worker, self.spare = self.spare, None
        if worker is None or not worker.alive:
            if worker is not None:
                worker.close()
            worker = WarmWorker()
        return worker

    def refill(self) -> None:
        if self.enabled and (self.spare is None or not self.spare.alive):
            self.spare = WarmWorker()

    def shutdown(self) -> None:
        if self.spare is not None:
            self.spare.stop()
            self.spare = None
