"""The GPU worker: runs notebook cells on the granted GPU and sends back output and names.

Started by the kernel side (``python -m gpulane.kernel.runner``) before the GPU is
granted, so that Python, IPython and the channel are ready when the turn
comes: the grant only sends the cell. It talks over a
``multiprocessing.connection`` channel:

- an inherited socket (``GPULANE_RUNNER_FD``), for a worker on the same machine;
- or an address and a key file (``GPULANE_RUNNER_ADDRESS``,
  ``GPULANE_RUNNER_KEYFILE``), for a worker that a cluster starts elsewhere.
  The key never travels in argv or the environment of a batch script.

Messages to the worker: ``run`` (env, code, inputs, names to return) and ``stop``.
Messages from it: ``ready``, ``display``, ``error``, ``warning``, ``done``.
The worker's stdout and stderr are plain pipes that the kernel relays as they
are written, so ``print`` and subprocesses (``nvidia-smi``) stream alike.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import queue
import signal
import struct
import sys
import termios
import threading
import time
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Any

from gpulane.kernel import memory_caps

PROTOCOL = 1


def connect_channel() -> Connection:
    fd = os.environ.pop("GPULANE_RUNNER_FD", None)
    if fd is not None:
        return Connection(int(fd))
    address = os.environ.pop("GPULANE_RUNNER_ADDRESS")
    key = Path(
        os.environ.pop("GPULANE_RUNNER_KEYFILE")
    ).read_bytes()  # raw bytes: never strip a key
    host, _, port = address.rpartition(":")
    target: Any = (host, int(port)) if host and port.isdigit() else address
    return Client(target, authkey=key)


class Worker:
    """One IPython shell, kept for the worker's life: a session's state persists across cells."""

    def __init__(self, channel: Connection) -> None:
        self.channel = channel
        self._send_lock = threading.Lock()
        self.inbox: queue.Queue[dict[str, Any]] = queue.Queue()
        self.shell = _make_shell(self)
        self.env_applied = False
        self._relayed: list[int] = []  # read ends of fds 1 and 2, when streaming over the channel
        self._relaying = 0

    def send(self, message: dict[str, Any]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        self._drain()
        with self._send_lock:
            self.channel.send(message)

    def _read_channel(self) -> None:
        """Messages from the kernel, read beside the running cell so an interrupt gets through."""
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                # The kernel is gone: no one is left to run cells for. End now, freeing the GPU.
                os._exit(0)
            if message.get("op") == "interrupt":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                self.inbox.put(message)

    def stream_over_channel(self) -> None:
        """Send fd 1 and 2 over the channel (a worker on another machine has no pipes to us)."""
        for fd, name in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            self._relayed.append(read_end)
            threading.Thread(target=self._relay, args=(read_end, name), daemon=True).start()

    def _relay(self, fd: int, name: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(fd, 65536):
            self._relaying += 1
            with self._send_lock:
                self.channel.send({"op": "stream", "name": name, "text": decoder.decode(chunk)})
            self._relaying -= 1

    def _drain(self, timeout: float = 1.0) -> None:
        """Let output already written reach the kernel before the message that follows it."""
        deadline = time.monotonic() + timeout
        while self._relayed and time.monotonic() < deadline:
            pending = sum(_unread(fd) for fd in self._relayed)
            if not pending and not self._relaying:
                return
            time.sleep(0.005)

    def serve(self) -> int:
        threading.Thread(target=self._read_channel, daemon=True, name="gpulane-channel").start()
        self.send({"op": "ready", "pid": os.getpid(), "protocol": PROTOCOL})
        status = 0
        while True:
            try:
                message = self.inbox.get()
            except KeyboardInterrupt:
                continue  # an interrupt between cells has nothing to stop
            if message.get("op") == "stop":
                return status
            if message.get("op") == "run":
                ok = self.run(message)
                status = 0 if ok else 1
                if message.get("once"):
                    return status

    def run(self, message: dict[str, Any]) -> bool:
        from gpulane.kernel.namespace import TransferTooLarge, names_assigned, pack, to_cpu, unpack

        if not self.env_applied:
            os.environ.update(message.get("env") or {})
            notes = memory_caps.install(os.environ)
            for note in notes:
                self.send({"op": "warning", "text": note})
            self.env_applied = True
        values, failures = unpack(message["inputs"])
        for name, reason in failures.items():
            self.send(
                {
                    "op": "warning",
                    "text": f"{name} could not be restored on the GPU worker: {reason}",
                }
            )
        self.shell.user_ns.update(values)
        self.shell.execution_count = int(message.get("execution_count") or 1)
        result = self.shell.run_cell(message["code"], store_history=False)
        if not result.success:
            self.send({"op": "done", "ok": False})
            return False
        wanted = message.get("returns")
        names = names_assigned(message["code"]) if wanted is None else list(wanted)
        outputs = {n: to_cpu(self.shell.user_ns[n]) for n in names if n in self.shell.user_ns}
        try:
            packed = pack(outputs, Path(message["spill_dir"]), int(message["max_transfer"]))
        except (TransferTooLarge, OSError) as error:
            self.send({"op": "warning", "text": f"results not returned: {error}"})
            self.send({"op": "done", "ok": True, "outputs": None})
            return True
        self.send({"op": "done", "ok": True, "outputs": packed})
        return True


def _unread(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]  # type: ignore[no-any-return]


def _make_shell(worker: Worker) -> Any:
    """An IPython shell whose displays, results and tracebacks go over the channel."""
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    class ChannelPublisher(DisplayPublisher):
        def publish(
            self,
            data: dict[str, Any],
            metadata: dict[str, Any] | None = None,
            source: str | None = None,
            *,
            transient: dict[str, Any] | None = None,
            update: bool = False,
            **kwargs: Any,
        ) -> None:
            worker.send(
                {"op": "display", "data": data, "metadata": metadata or {},
                 "transient": transient or {}, "update": update}
            )  # fmt: skip

        def clear_output(self, wait: bool = False) -> None:
            worker.send({"op": "clear_output", "wait": wait})

    class ChannelDisplayHook(DisplayHook):
        def write_output_prompt(self) -> None:
            pass

        def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
            worker.send({"op": "result", "data": format_dict, "metadata": md_dict or {}})

    class WorkerShell(InteractiveShell):
        def _showtraceback(self, etype: Any, evalue: Any, stb: list[str]) -> None:
            hint = memory_caps.oom_hint(etype, evalue, os.environ)
            worker.send(
                {"op": "error", "ename": getattr(etype, "__name__", str(etype)),
                 "evalue": str(evalue), "traceback": stb, "hint": hint}
            )  # fmt: skip

    config = Config()
    config.HistoryManager.enabled = False  # no SQLite history file per worker
    config.InteractiveShell.colors = "Linux"
    config.InteractiveShell.xmode = "Context"
    shell = WorkerShell.instance(
        config=config,
        display_pub_class=ChannelPublisher,
        displayhook_class=ChannelDisplayHook,
    )
    return shell


def main() -> int:
    # An interrupt must reach user code as KeyboardInterrupt; the kernel sends SIGINT first.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    channel = connect_channel()
    worker = Worker(channel)
    if os.environ.pop("GPULANE_RUNNER_STREAMS", "") == "channel":
        worker.stream_over_channel()
    return worker.serve()


if __name__ == "__main__":
    sys.exit(main())
