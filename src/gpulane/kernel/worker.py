"""The kernel's side of a GPU worker: start it early, hand it a cell at grant time, relay its output.

Three names, for three things:

- :class:`LocalWorker`: a worker process this kernel spawns on its own machine before
  the grant (its output comes through pipes);
- :class:`CallbackWorker`: a worker that a cluster starts elsewhere and that dials
  back to this kernel (its output comes over the channel);
- :class:`WarmPool`: keeps one spare :class:`LocalWorker` ready, so a cell on a free
  GPU starts at once.

Both kinds share :class:`WorkerHandle`: send a cell, read the worker's messages
(:mod:`gpulane.kernel.protocol`) into a :class:`Sink`, stop it.
"""

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
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, replace
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import IO, Any, Protocol

from gpulane.config import (
    CALLBACK_HOST_ENV,
    KEY_DIR_ENV,
    RUNNER_ADDRESS_ENV,
    RUNNER_FD_ENV,
    RUNNER_KEYFILE_ENV,
    WARM_WORKER_ENV,
)
from gpulane.jobs import OptionError
from gpulane.kernel.channel import receive_message, send_message
from gpulane.kernel.forkclient import ForkedProcess, Forks, PendingFork
from gpulane.kernel.preload import ImportWatch, PreloadSettings
from gpulane.kernel.protocol import (
    CellOutput,
    Done,
    Interrupt,
    ProtocolError,
    Ready,
    RunCell,
    Stop,
    Stream,
    decode_from_worker,
    encode,
)
from gpulane.kernel.transfer import follow_channel
from gpulane.scheduler.base import CommandProcess, Launcher
from gpulane.scheduler.spawn import spawn_command, wait_or_kill_group

# ``-c`` rather than ``-m gpulane.kernel.runner`` (which also works): ``-m`` imports runpy and
# importlib.util first, ~3 ms of a cold worker's start (a Slurm node's) before its first line;
# and the collector is off before the worker's imports, not after them (runner.main's reason).
RUNNER_COMMAND = (
    sys.executable,
    "-c",
    "import gc; gc.disable(); import sys; from gpulane.kernel.runner import cold; sys.exit(cold())",
)


class Sink(Protocol):
    """Where a cell's output goes: the running cell, or a background job's own outputs."""

    def stream(self, name: str, text: str) -> None: ...
    def message(self, message: CellOutput) -> None: ...
    def flush(self) -> None: ...  # the cell's code has ended: its text is out now


class WorkerHandle(ABC):
    """The kernel's end of one GPU worker's channel: send it cells, read what it sends back."""

    channel: Connection

    def __init__(self) -> None:
        self.sink: Sink | None = None
        self.done = threading.Event()  # set when the worker reports a cell's end, or is gone
        self.result: Done | None = None
        self._threads: list[threading.Thread] = []
        self._reader: threading.Thread | None = None  # reads the channel, once started
        self._send_lock = threading.Lock()

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    def attach(self, sink: Sink) -> None:
        """Direct the worker's output to ``sink``."""
        self.sink = sink

    def run(self, grant_env: dict[str, str], message: RunCell) -> None:
        """Send one cell; ``done`` is set when the worker reports its end."""
        self.done.clear()
        self.result = None
        with self._send_lock:
            send_message(self.channel, encode(replace(message, env=grant_env)))

    @abstractmethod
    def interrupt(self) -> None: ...

    def wait_output(self, timeout: float = 5.0) -> None:
        """After the worker exits: let the relays deliver the last of its output."""
        for thread in self._threads:
            thread.join(timeout)

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def _close_channel(self) -> None:
        """Close the channel once its reader is out of it: shut the socket down (a read
        blocked in it returns), wait for the reader, then close the descriptor. Closed under
        a reader still in ``recv``, the descriptor's number can be handed to the next
        connection this process opens (another worker's key check, a stranger on its port),
        and the old reader would read that connection's bytes, unpickling them: seen under
        load as a worker's key-check answer read by another worker's reader."""
        with contextlib.suppress(OSError, ValueError):
            end = socket.socket(fileno=os.dup(self.channel.fileno()))
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()  # the duplicate only
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(5)
        with contextlib.suppress(OSError):
            self.channel.close()

    def _send_quietly(self, message: Interrupt | Stop) -> None:
        with contextlib.suppress(OSError, ValueError), self._send_lock:
            self.channel.send(encode(message))

    def _read_channel(self) -> None:
        while True:
            try:
                wire = receive_message(self.channel)
            except (EOFError, OSError):
                self.done.set()
                return
            try:
                message = decode_from_worker(wire)
            except ProtocolError as error:
                if self.sink is not None:
                    self.sink.stream("stderr", f"gpulane: {error}\n")
                continue
            if isinstance(message, Done):
                if self.sink is not None:
                    self.sink.flush()
                self.result = message
                self.done.set()
            elif isinstance(message, Stream):
                if self.sink is not None:
                    self.sink.stream(message.name, message.text)
            elif not isinstance(message, Ready) and self.sink is not None:
                self.sink.message(message)


class LocalWorker(WorkerHandle):
    """A worker process spawned on this machine before it is needed, waiting on its channel.

    It is spawned from the kernel's main thread: the worker dies with the kernel
    (PR_SET_PDEATHSIG fires when the spawning thread ends). ``started`` is a worker the
    fork server forked instead (:mod:`gpulane.kernel.forkclient`), with its channel.
    """

    def __init__(self, started: tuple[ForkedProcess, Connection] | None = None) -> None:
        super().__init__()
        self.notes: list[str] = []  # one-line notices for the cell this worker runs
        self.proc: subprocess.Popen[bytes] | ForkedProcess
        if started is not None:
            self.proc, self.channel = started
            return
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env.update(
            **{RUNNER_FD_ENV: str(child.fileno())},
            CUDA_VISIBLE_DEVICES="",  # no GPU until the grant says which
            PYTHONUNBUFFERED="1",
        )
        self.proc = spawn_command(
            RUNNER_COMMAND, env, subprocess.PIPE, subprocess.PIPE, pass_fds=[child.fileno()]
        )
        child.close()
        self.channel = Connection(parent.detach())

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def attach(self, sink: Sink) -> None:
        """Direct output to ``sink``; the relays start on first use (inside a running cell)."""
        self.sink = sink
        for note in self.notes:
            sink.stream("stderr", f"gpulane: {note}\n")
        self.notes = []
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
            self._reader = self._threads[-1]
            for thread in self._threads:
                thread.start()

    def launcher(self, message: RunCell) -> Launcher:
        """A scheduler Launcher: at grant time, send the cell and hand back the worker process."""

        def launch(grant_env: dict[str, str]) -> CommandProcess:
            self.run(grant_env, message)
            return self.proc

        return launch

    def interrupt(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGINT)

    def stop(self) -> None:
        self._send_quietly(Stop())
        wait_or_kill_group(self.proc)
        self.close()

    def close(self) -> None:
        self._close_channel()
        if not self._threads:  # relays own the pipes once started
            for pipe in (self.proc.stdout, self.proc.stderr):
                if pipe is not None:
                    pipe.close()

    def _relay(self, name: str, pipe: IO[bytes]) -> None:
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


class CallbackWorker(WorkerHandle):
    """A worker that a cluster starts elsewhere and that connects back to this kernel.

    The kernel listens on a TCP port; the worker proves itself with a random key
    read from a private file (0600 in a 0700 folder under the user's home, which
    the compute node sees). Output comes over the channel, not through pipes.

    Any local user can find the port (``/proc/net/tcp``) and connect, so a peer that
    fails or never finishes the key check must cost the real worker nothing: each peer's
    handshake runs on its own thread under a deadline (``handshake_timeout``), at most
    ``max_handshakes`` at once (further peers wait in the listen queue, in order), and
    the kernel keeps listening until the worker with the key is in or the job ends.
    Nothing a peer sends is unpickled before it has passed the HMAC challenge.
    """

    handshake_timeout = 5.0  # seconds a peer has to pass the challenge (two round trips)
    max_handshakes = 64  # peers in the challenge at once: bounds threads and fds

    def __init__(
        self,
        message: RunCell,
        host: str | None = None,
        handshake_timeout: float | None = None,
        max_handshakes: int | None = None,
    ) -> None:
        super().__init__()
        self._message = message
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()  # guards _pending, _failures and the one winner
        self._pending: set[socket.socket] = set()
        self._failures = 0
        if handshake_timeout is not None:
            self.handshake_timeout = handshake_timeout
        if max_handshakes is not None:
            self.max_handshakes = max_handshakes
        self._slots = threading.BoundedSemaphore(self.max_handshakes)
        self._key = secrets.token_bytes(32)
        bind = (
            host or os.environ.get(CALLBACK_HOST_ENV) or socket.gethostbyname(socket.gethostname())
        )
        self.listener = socket.create_server((bind, 0), backlog=socket.SOMAXCONN)
        self.listener.settimeout(0.5)  # wake to notice close() (closing alone may not wake accept)
        folder = Path(os.environ.get(KEY_DIR_ENV) or Path.home() / ".gpulane" / "keys")
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor, name = tempfile.mkstemp(dir=folder, prefix="worker-")  # created 0600
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(self._key)
        self.keyfile = Path(name)
        address = self.listener.getsockname()
        self.job_env = {
            RUNNER_ADDRESS_ENV: f"{address[0]}:{address[1]}",
            RUNNER_KEYFILE_ENV: str(self.keyfile),
            "PYTHONUNBUFFERED": "1",
        }
        threading.Thread(target=self._accept, daemon=True, name="gpulane-accept").start()

    @property
    def alive(self) -> bool:
        return not self.done.is_set()

    def attach(self, sink: Sink) -> None:
        self.sink = sink  # the channel reader starts once the worker connects

    def _accept(self) -> None:
        while not self._closed.is_set() and not self._connected.is_set():
            # Wait for a free handshake slot first: peers beyond the bound stay queued in order.
            if not self._slots.acquire(timeout=0.5):
                continue
            try:
                peer, _ = self.listener.accept()
            except TimeoutError:
                self._slots.release()
                continue
            except OSError:
                self._slots.release()
                if self._closed.is_set():
                    return
                time.sleep(0.1)  # out of fds or the like: back off, keep listening
                continue
            peer.setblocking(True)
            with self._lock:
                self._pending.add(peer)
            threading.Thread(
                target=self._handshake, args=(peer,), daemon=True, name="gpulane-handshake"
            ).start()

    def _handshake(self, peer: socket.socket) -> None:
        # Past the deadline, shutdown() ends any read or write the challenge is blocked in.
        timer = threading.Timer(self.handshake_timeout, self._end_pending, args=(peer,))
        timer.start()
        channel: Connection | None = None
        try:
            channel = Connection(os.dup(peer.fileno()))
            deliver_challenge(channel, self._key)  # reads only raw bytes: nothing unpickled
            answer_challenge(channel, self._key)
        except (AuthenticationError, EOFError, OSError, ValueError):
            if channel is not None:
                with contextlib.suppress(OSError):
                    channel.close()
            self._settle(peer, failed=True)
            return
        finally:
            timer.cancel()
        with self._lock:
            # Still pending: neither the deadline nor close() ended it while it answered.
            won = (
                peer in self._pending and not self._connected.is_set() and not self._closed.is_set()
            )
            self._pending.discard(peer)
            if won:
                self._connected.set()
                self.channel = channel
        self._settle(peer, failed=False)  # the dup'd fd lives on in the channel
        if not won:
            with contextlib.suppress(OSError):
                channel.close()
            return
        self._worker_in()

    def _end_pending(self, peer: socket.socket) -> None:
        with self._lock:
            if peer not in self._pending:
                return  # it already passed, or failed
            self._pending.discard(peer)
        _shutdown(peer)

    def _settle(self, peer: socket.socket, failed: bool) -> None:
        with self._lock:
            self._pending.discard(peer)
            self._failures += failed
            first = failed and self._failures == 1
        with contextlib.suppress(OSError):
            peer.close()
        self._slots.release()
        if first and not self._connected.is_set() and not self._closed.is_set():
            # Said once: a stranger knocking must not flood the cell's output.
            self._notice(
                f"gpulane: a connection to this kernel's worker port {self.job_env[RUNNER_ADDRESS_ENV]} "
                "failed the key check (not your worker; ignored); still waiting for the worker\n"
            )

    def _notice(self, text: str) -> None:
        if self.sink is not None:
            self.sink.stream("stderr", text)
        else:
            sys.stderr.write(text)

    def _worker_in(self) -> None:
        self.keyfile.unlink(missing_ok=True)  # only now: until the worker is in it may need it
        self._stop_listening()
        reader = threading.Thread(target=self._read_channel, daemon=True, name="gpulane-remote")
        self._threads = [reader]
        self._reader = reader
        reader.start()
        # It may be on another machine: bytes go on the channel.
        follow_channel(self._message.inputs)
        self.run({}, self._message)  # the grant's environment is Slurm's own

    def _stop_listening(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            pending, self._pending = self._pending, set()
        for peer in pending:  # strangers still in the challenge: end them now
            _shutdown(peer)

    def interrupt(self) -> None:
        if self._connected.is_set():  # no signal reaches another machine: ask over the channel
            self._send_quietly(Interrupt())

    def stop(self) -> None:
        if self._connected.is_set():
            self._send_quietly(Stop())
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed.set()
        self._stop_listening()
        self.keyfile.unlink(missing_ok=True)
        if self._connected.is_set():
            self._close_channel()


def _shutdown(peer: socket.socket) -> None:
    with contextlib.suppress(OSError):
        peer.shutdown(socket.SHUT_RDWR)


class WarmPool:
    """Keeps one spare local worker ready, so a cell on a free GPU starts at once.

    With ``forks`` (the fork server, the default) the spare is forked with the notebook's
    modules imported, and the next one is asked for as soon as a cell takes one: it is ready
    before that cell ends. Without, the spare is a fresh Python started after each cell.
    """

    FORK_WAIT = 30.0  # seconds a cell waits for its fork (the server may be importing torch)

    def __init__(self, enabled: bool = True, forks: Forks | None = None) -> None:
        self.enabled = enabled
        self.forks = forks if enabled else None
        self.spare: LocalWorker | None = None
        self._forking: PendingFork | None = None

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> WarmPool:
        """The pool the kernel's environment asks for (``GPULANE_WARM_WORKER``,
        ``GPULANE_FORKSERVER``, ``GPULANE_PRELOAD*``), watching imports from now on."""
        try:
            settings = PreloadSettings.from_environment(env)
        except OptionError as error:
            sys.stderr.write(f"gpulane: {error}; using the defaults\n")
            settings = PreloadSettings()
        enabled = env.get(WARM_WORKER_ENV, "1") != "0"
        watch = ImportWatch(settings, list(sys.modules))
        return cls(enabled, Forks(settings, watch) if settings.enabled else None)

    def take(self, code: str = "") -> LocalWorker:
        if self.forks is not None:
            return self._take_fork(self.forks, code)
        worker, self.spare = self.spare, None
        if worker is None or not worker.alive:
            if worker is not None:
                worker.close()
            worker = LocalWorker()
        return worker

    def _take_fork(self, forks: Forks, code: str) -> LocalWorker:
        forks.watch_cell(code)
        worker = self._forked(self._forking)
        self._forking = None
        if worker is None:  # none asked for yet, or the fork server went: ask (again) now
            worker = self._forked(forks.request())
        if worker is None:
            worker = LocalWorker()  # a clean start
        else:
            forks.taken(worker.proc.pid)
        worker.notes += forks.notes()
        self._forking = forks.request()  # the next cell's, forked while this one runs
        return worker

    def _forked(self, pending: PendingFork | None) -> LocalWorker | None:
        if pending is None or not pending.answered.wait(self.FORK_WAIT):
            if pending is not None:
                pending.failed()
            return None
        if pending.process is None or pending.process.poll() is not None:
            return None
        return LocalWorker(started=(pending.process, pending.channel))

    def refill(self) -> None:
        if self.forks is not None:
            if self._forking is None:
                self._forking = self.forks.request()
        elif self.enabled and (self.spare is None or not self.spare.alive):
            self.spare = LocalWorker()

    def spare_modules(self, timeout: float = FORK_WAIT) -> list[str] | None:
        """What the next forked worker has preloaded, once it is forked; None without one."""
        pending = self._forking
        if pending is None or not pending.answered.wait(timeout) or pending.process is None:
            return None
        return list(pending.modules)

    def refresh(self, *args: Any) -> None:
        """After a cell in the kernel: a spare without the modules the notebook imported since
        is replaced by one forked after the fork server has imported them (in the background)."""
        if self.forks is not None and self.forks.refresh():
            stale, self._forking = self._forking, self.forks.request()
            if stale is not None:
                stale.failed()  # closing its channel ends it

    def shutdown(self) -> None:
        if self.spare is not None:
            self.spare.stop()
            self.spare = None
        if self._forking is not None:
            self._forking.failed()
            self._forking = None
        if self.forks is not None:
            self.forks.stop()


@dataclass(frozen=True)
class Launch:
    """A worker for one job, and what tells the scheduler how to start it."""

    worker: WorkerHandle
    launcher: Launcher | None = None  # here: at grant time, hand the cell to a warm worker
    env: dict[str, str] | None = None  # elsewhere: what the cluster's worker needs to dial back


def launch_for(message: RunCell, local_launch: bool, pool: WarmPool) -> Launch:
    """Where the back end starts jobs on this machine, a pre-started worker gets the grant at
    once; elsewhere a worker started by the cluster connects back."""
    if local_launch:
        worker = pool.take(message.code)
        return Launch(worker, launcher=worker.launcher(message))
    callback = CallbackWorker(message)
    return Launch(callback, env=callback.job_env)
