"""The GPU worker: runs notebook cells on the granted GPU and sends back output and names.

Started by the kernel side (``python -c`` calling :func:`cold`, see ``worker.RUNNER_COMMAND``;
``python -m gpulane.kernel.runner`` does the same) before the GPU is
granted, so that Python, IPython and the channel are ready when the turn
comes: the grant only sends the cell. Where it cannot be started early (inside a Slurm
allocation) it starts cold, and its first cell runs before IPython is imported when the
cell is plain Python (:mod:`gpulane.kernel.plain`). It talks over a
``multiprocessing.connection`` channel (its worker end is :mod:`gpulane.kernel.link`):

- an inherited socket (``GPULANE_RUNNER_FD``), for a worker on the same machine;
- or an address and a key file (``GPULANE_RUNNER_ADDRESS``,
  ``GPULANE_RUNNER_KEYFILE``), for a worker that a cluster starts elsewhere.
  The key never travels in argv or the environment of a batch script.

The messages both ways are defined, and listed, in :mod:`gpulane.kernel.protocol`.
The worker's stdout and stderr (``print`` and subprocesses such as ``nvidia-smi``
alike) go over the same channel, in order with its displays
(:mod:`gpulane.kernel.outputs`).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import gc
import os
import signal
import sys
import threading
import types
from _queue import Empty, SimpleQueue
from collections.abc import Callable
from typing import Any

from gpulane.kernel import memory_caps, plain
from gpulane.kernel.channel import receive_message, send_message
from gpulane.kernel.link import Link, connect
from gpulane.kernel.outputs import OutputRelay
from gpulane.kernel.protocol import (
    PROTOCOL,
    CellError,
    CellWarning,
    ClearOutput,
    Display,
    Done,
    FromWorker,
    Interrupt,
    ProtocolError,
    Ready,
    Result,
    RunCell,
    Stop,
    Stream,
    decode_to_worker,
    encode,
)
from gpulane.worker_env import RUNNER_ADDRESS_ENV, RUNNER_FD_ENV, RUNNER_KEYFILE_ENV


def connect_channel() -> Link:
    fd = os.environ.pop(RUNNER_FD_ENV, None)
    if fd is not None:
        return Link(int(fd))
    address = os.environ.pop(RUNNER_ADDRESS_ENV)
    with open(os.environ.pop(RUNNER_KEYFILE_ENV), "rb") as keyfile:
        key = keyfile.read()  # raw bytes: never strip a key
    host, _, port = address.rpartition(":")
    target: tuple[str, int] | str = (host, int(port)) if host and port.isdigit() else address
    return connect(target, key)


class CellRunner:
    """Runs the kernel's cells in one IPython shell, kept for the worker's life.

    A session's state (a model on the GPU) persists across its cells. A cold worker's cells
    that are plain Python run without the shell until it is built (:mod:`gpulane.kernel.plain`),
    in the ``__main__`` the shell then adopts.
    """

    def __init__(self, connect: Callable[[], Link]) -> None:
        connecting = _InBackground(connect, "gpulane-connect")
        # _queue's SimpleQueue: what queue.Queue would give here, without importing queue
        self.inbox: SimpleQueue[RunCell | Stop] = SimpleQueue()
        self.shell: Any = None  # the IPython shell, once built
        self.module: types.ModuleType | None = None  # a cold worker's __main__, until then
        self._plain_cells: dict[str, int] = {}  # code name -> number, for the shell's tracebacks
        if "IPython" in sys.modules:
            # Forked with IPython imported: the shell (~25 ms) is built while the channel
            # connects (on a cluster node that waits on the network and the key check).
            self.shell = _make_shell(self, None)
        else:
            # A cold Python: its first cell runs before IPython is imported (kernel/plain.py;
            # the import and the shell are ~130 ms); the shell is built when a cell needs it.
            self.module = plain.main_module()
            sys.meta_path.insert(0, _ShellOnImport(self.build_shell))
        self.env_applied = False
        self.output = OutputRelay(self._send_stream)
        self.channel = connecting.result()

    def build_shell(self) -> Any:
        """The IPython shell, built now if it is not yet (it adopts the cold worker's
        ``__main__`` and the code names of the cells that ran without it)."""
        if self.shell is None:
            for finder in [f for f in sys.meta_path if isinstance(f, _ShellOnImport)]:
                sys.meta_path.remove(finder)
            self.shell = _make_shell(self, self.module)
            self.shell.compile._filename_map.update(self._plain_cells)
        return self.shell

    def send(self, message: FromWorker) -> None:
        with self.output.ordered():  # the text written before it goes first
            send_message(self.channel, encode(message))  # with any buffers that follow it

    def _send_stream(self, name: str, text: str) -> None:
        self.channel.send(encode(Stream(name, text)))

    def _read_channel(self) -> None:
        """Messages from the kernel, read beside the running cell so an interrupt gets through."""
        while True:
            try:
                message = receive_message(self.channel)
            except (EOFError, OSError):
                # The kernel is gone: no one is left to run cells for. End now, freeing the GPU.
                os._exit(0)
            try:
                decoded = decode_to_worker(message)
            except ProtocolError as error:
                self.send(CellWarning(f"{error}; ignored"))
                continue
            if isinstance(decoded, Interrupt):
                os.kill(os.getpid(), signal.SIGINT)
            else:
                self.inbox.put(decoded)

    def serve(self) -> int:
        self.output.start()
        threading.Thread(target=self._read_channel, daemon=True, name="gpulane-channel").start()
        self.send(Ready(os.getpid(), PROTOCOL))
        status = 0
        while True:
            try:
                if self.shell is None:
                    try:
                        message = self.inbox.get(timeout=SHELL_WHEN_IDLE_S)
                    except Empty:
                        self.build_shell()  # no cell waiting (a spare): build it meanwhile
                        continue
                else:
                    message = self.inbox.get()
            except KeyboardInterrupt:
                continue  # an interrupt between cells has nothing to stop
            if isinstance(message, Stop):
                break
            ok = self.run(message)
            status = 0 if ok else 1
            if message.once:
                break
            self.build_shell()  # a session's next cells: between cells, not in one
        self.output.close()
        # The process ends next: its last collection would walk every object the shell made
        # (~25 ms with IPython alone) while the kernel waits for the exit to free the GPU.
        gc.freeze()
        return status

    def run(self, message: RunCell) -> bool:
        from gpulane.kernel.transfer import shared_spill_dir, to_cpu, unpack

        if not gc.isenabled() and not self.env_applied:
            # Off since main(): what start-up made is kept for good, and the cell's own
            # objects are collected as in any Python.
            gc.freeze()
            gc.enable()
        if not self.env_applied:
            os.environ.update(message.env)
            notes = memory_caps.install(os.environ)
            for note in notes:
                self.send(CellWarning(note))
            self.env_applied = True
        values, failures = unpack(message.inputs)
        for name, reason in failures.items():
            self.send(CellWarning(f"{name} could not be restored on the GPU worker: {reason}"))
        number = message.execution_count or 1
        cell: plain.Plan | None = None
        if self.shell is None and self.module is not None:
            self.module.__dict__.update(values)
            cell = plain.plan(message.code, number, self.module.__dict__)
            if cell is None:
                self.build_shell()  # the cell needs IPython (a magic, display, ...)
        if cell is not None:
            ok, value = self._run_plain(cell, message.code, number)
            namespace: dict[str, Any] = self.module.__dict__ if self.module else {}
        else:
            self.shell.user_ns.update(values)
            self.shell.execution_count = number
            self.shell.displayhook.value = None  # this cell's last expression, if it has one
            result = self.shell.run_cell(message.code, store_history=False)
            ok, value = result.success, self.shell.displayhook.value
            namespace = self.shell.user_ns
        if not ok:
            self.send(Done(ok=False))
            return False
        # Imported after the cell's code, which waits for nothing they do.
        from gpulane.kernel.names import names_assigned
        from gpulane.kernel.returns import pack_returns

        wanted = message.returns
        if wanted is not None:
            names = list(wanted)
        else:  # a plain cell's own parse: the transformer would import IPython for nothing
            names = names_assigned(message.code, ast.parse(cell.source) if cell else None)
        outputs = {n: to_cpu(namespace[n]) for n in names if n in namespace}
        spill_dir = shared_spill_dir(message.spill_dir)  # None elsewhere: over the channel
        packed, notes, show = pack_returns(outputs, to_cpu(value), spill_dir, message.max_transfer)
        for note in notes:
            self.send(CellWarning(note))
        if show:
            self.build_shell().displayhook.show(value)
        self.send(Done(ok=True, outputs=packed))
        return True

    def _run_plain(self, cell: plain.Plan, code: str, number: int) -> tuple[bool, Any]:
        """Run a cell without the shell; (ok, its last expression's value)."""
        self._plain_cells[cell.name] = number
        stubs = {"get_ipython": self.build_shell, "display": self._display}
        for name, stub in stubs.items():
            setattr(builtins, name, stub)  # what the shell's builtins give a cell, on demand
        try:
            outcome = plain.run(cell, self.module.__dict__ if self.module else {}, self._error)
        finally:
            for name, stub in stubs.items():
                if getattr(builtins, name, None) is stub:
                    delattr(builtins, name)
        if self.shell is not None:  # built during the cell: its hooks (an inline figure) run
            _cell_ended(self.shell, code, cell, number, outcome)
        return outcome.error is None, outcome.value

    def _display(self, *objs: Any, **kwargs: Any) -> Any:
        self.build_shell()
        from IPython.display import display

        return display(*objs, **kwargs)  # type: ignore[no-untyped-call]

    def _error(self, error: BaseException) -> None:
        """Show what a plain cell raised as the shell's ``run_code`` would show it."""
        shell = self.build_shell()
        if isinstance(error, SystemExit) or type(error).__name__ == "BdbQuit":
            # Its own branches (no traceback; a hint to use exit): let run_code take it.
            shell.user_ns[_RAISED] = error
            try:
                _sync(shell.run_code(compile(f"raise {_RAISED}", "<gpulane>", "exec")))
            finally:
                shell.user_ns.pop(_RAISED, None)
            return
        # From the cell's own frame: the shell hides its run_code frame by its module, and
        # plain.run's frame is this one's equivalent.
        below = error.__traceback__.tb_next if error.__traceback__ else None
        shell.showtraceback((type(error), error, below), running_compiled_code=True)


_RAISED = "__gpulane_raised__"
SHELL_WHEN_IDLE_S = 0.05  # a cold worker with no cell this soon builds its shell meanwhile


def _sync(coroutine: Any) -> None:
    """Run a coroutine that never awaits (IPython's run_code of non-async code)."""
    with contextlib.suppress(StopIteration):
        coroutine.send(None)


def _cell_ended(shell: Any, code: str, cell: plain.Plan, number: int, outcome: Any) -> None:
    from IPython.core.interactiveshell import ExecutionInfo, ExecutionResult

    info = ExecutionInfo(code, False, False, True, None, transformed_cell=cell.source)  # type: ignore[no-untyped-call]
    result = ExecutionResult(info)  # type: ignore[no-untyped-call]
    result.execution_count = number
    result.result = outcome.value
    result.error_in_exec = outcome.error
    shell.events.trigger("post_execute")
    shell.events.trigger("post_run_cell", result)


class _ShellOnImport:
    """Builds the shell as soon as IPython is imported (by the cell, or by a module it
    imports: matplotlib's inline backend), before the importer uses it: without a shell,
    IPython's ``display`` prints the value instead of showing it."""

    def __init__(self, build: Callable[[], Any]) -> None:
        self.build = build

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "IPython":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenBuild(spec.loader, self.build)
                return spec
        return None


class _ThenBuild:
    """IPython's own loader, then the shell, with the module left as if loaded plainly."""

    def __init__(self, loader: Any, build: Callable[[], Any]) -> None:
        self.loader, self.build = loader, build

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        self.build()


def _make_shell(runner: CellRunner, module: types.ModuleType | None) -> Any:
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
            runner.send(Display(data, metadata or {}, transient or {}, update))

        def clear_output(self, wait: bool = False) -> None:
            runner.send(ClearOutput(wait))

    class ChannelDisplayHook(DisplayHook):
        """Keeps the last expression's value: it goes back with the names, to be the kernel's
        Out[n]; it is shown here (format data, a ``result``) only where it cannot go back."""

        value: Any = None

        def __call__(self, result: Any = None) -> None:
            if result is not None:
                self.value = result

        def show(self, result: Any) -> None:
            super().__call__(result)  # type: ignore[no-untyped-call]

        def write_output_prompt(self) -> None:
            pass

        def write_format_data(self, format_dict: dict[str, Any], md_dict: Any = None) -> None:
            runner.send(Result(format_dict, md_dict or {}))

    class WorkerShell(InteractiveShell):
        def _showtraceback(self, etype: Any, evalue: Any, stb: list[str]) -> None:
            hint = memory_caps.oom_hint(etype, evalue, os.environ)
            ename = getattr(etype, "__name__", str(etype))
            runner.send(CellError(ename, str(evalue), list(stb), hint))

    config = Config()
    config.HistoryManager.enabled = False  # no SQLite history file per worker
    config.InteractiveShell.colors = "Linux"
    config.InteractiveShell.xmode = "Context"
    shell = WorkerShell.instance(
        config=config,
        display_pub_class=ChannelPublisher,
        displayhook_class=ChannelDisplayHook,
        user_module=module,  # None: a fresh __main__
    )
    return shell


def main() -> int:
    # An interrupt must reach user code as KeyboardInterrupt; the kernel sends SIGINT first.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # Start-up allocates much and frees little: collections then only cost time (~10 ms
    # before a cold worker's first line). On again before the first cell's code runs.
    gc.disable()
    runner = CellRunner(connect_channel)
    return runner.serve()


class _InBackground:
    """One call on its own thread; ``result()`` waits for it and re-raises its error here.

    Not ``concurrent.futures``: its import costs ~10 ms on the cold start this saves time on.
    """

    def __init__(self, call: Callable[[], Link], name: str) -> None:
        self._call = call
        self._value: Link | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=name)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except BaseException as error:  # handed to the caller's thread, not lost in this one
            self._error = error

    def result(self) -> Link:
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._value is not None
        return self._value


def run_to_exit(main: Callable[[], int]) -> int:
    """Run the worker, then do what a Python process does as it exits that user code can
    see: wait for its non-daemon threads, run its atexit handlers, flush stdout and stderr.
    Returns the exit status; a forked worker then calls ``os._exit``, a cold one finalizes
    (:func:`cold`)."""
    import atexit

    status = 1
    try:
        status = main()
    except SystemExit as leaving:
        status = leaving.code if isinstance(leaving.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            threading._shutdown()  # type: ignore[attr-defined]
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
    return status


EXIT_LIMIT_S = 3.0  # a cold worker's finalization after its exit handlers, at most


def cold() -> int:
    """A cold worker (``python -m``): :func:`run_to_exit`, then the interpreter's own
    finalization under a watchdog. What is left to finalize is module teardown: no thread
    of the cell's, no exit handler. Should it hang all the same (a daemon thread frozen
    holding a lock the teardown needs, an object's ``__del__`` that never returns), the
    watchdog, a C thread that needs no GIL, writes every thread's stack to stderr and ends
    the process with status 1 after :data:`EXIT_LIMIT_S`: on a Slurm node nothing else
    would end it, and its allocation would keep the GPU until its time limit."""
    import faulthandler

    status = run_to_exit(main)
    faulthandler.dump_traceback_later(EXIT_LIMIT_S, exit=True)
    return status


if __name__ == "__main__":
    sys.exit(cold())
