#!/usr/bin/env python3
"""A cold GPU worker's start, alone: what a Slurm node pays before a ``%%gpu`` cell's first line.

Starts the worker (``RUNNER_COMMAND``) the way a Slurm job does (it dials back to a
``CallbackWorker`` in this process with a key file) and sends it
``import time; print('x', time.process_time())``. Each sample: the wall time from starting
the process to the line ``x`` arriving here, and the worker's own CPU time at that line.
Beside it, in the same run and interleaved, ``python -c "print('x')"`` (the floor) and, with
``--old-src DIR``, the same worker from another tree (e.g. ``git worktree add /tmp/old
COMMIT``; its ``src`` goes first on the worker's ``PYTHONPATH``). With ``--srun`` (root) every
process is started with ``srun --gres=gpu:1`` on a one-node Slurm started here, as
``cell_bench.py`` starts it: issue 12's Slurm target without the kernel's part. Not a test::

    .venv/bin/python benchmarks/cold_start.py --n 11 [--old-src /tmp/old/src] [--srun]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from gpulane.kernel.protocol import CellOutput, RunCell
from gpulane.kernel.transfer import pack
from gpulane.kernel.worker import RUNNER_COMMAND, CallbackWorker

CELL = "import time\nprint('x', time.process_time())"
PREFIX: list[str] = []  # srun --gres=gpu:1 with --srun
SETTLE: list[Callable[[], None]] = []  # waits for the Slurm node to be idle again
SLURM_ENV: dict[str, str] = {}


class FirstLine:
    """A Sink that notes when the line ``x`` arrives and the CPU time it reports."""

    def __init__(self) -> None:
        self.seen = threading.Event()
        self.at = 0.0
        self.cpu = 0.0

    def stream(self, name: str, text: str) -> None:
        if not self.seen.is_set() and text.startswith("x "):
            self.at = time.perf_counter()
            self.cpu = float(text.split()[1])
            self.seen.set()

    def message(self, message: CellOutput) -> None:
        pass

    def flush(self) -> None:
        pass


def cold_worker(src: str | None) -> tuple[float, float]:
    """(seconds to the first line, the worker's CPU seconds by then) for one cold worker."""
    message = RunCell(CELL, pack({}, None, 1 << 20), (), 1, "/nonexistent", 1 << 20, True)
    worker = CallbackWorker(message, host="127.0.0.1")
    sink = FirstLine()
    worker.attach(sink)
    env = {**os.environ, **SLURM_ENV, **worker.job_env}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # This tree's worker as the kernel starts it; another tree's with -m, which every tree takes.
    command = RUNNER_COMMAND if src is None else (sys.executable, "-m", "gpulane.kernel.runner")
    started = time.perf_counter()
    proc = subprocess.Popen([*PREFIX, *command], env=env)
    try:
        if not sink.seen.wait(60) or not worker.done.wait(60):
            raise RuntimeError("the worker printed no line within 60 s")
    finally:
        proc.wait(30)
        worker.close()
    return sink.at - started, sink.cpu


def plain_python() -> float:
    started = time.perf_counter()
    proc = subprocess.Popen(
        [*PREFIX, sys.executable, "-c", "print('x')"],
        stdout=subprocess.PIPE,
        env={**os.environ, **SLURM_ENV},
    )
    assert proc.stdout is not None
    proc.stdout.readline()
    took = time.perf_counter() - started
    proc.wait()
    return took


def settle() -> None:
    for wait in SETTLE:
        wait()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=11, help="samples per row (default 11)")
    ap.add_argument("--old-src", help="another tree's src folder, measured beside this one")
    ap.add_argument("--srun", action="store_true", help="each process under srun (root)")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.srun:
            import cell_bench  # benchmarks/ is on sys.path when this file runs as a script

            SLURM_ENV.update(stack.enter_context(cell_bench.slurm_cluster(6937)))
            baseline = cell_bench.bb.load_module(
                "slurm_baseline", cell_bench.bb.REPO / "benchmarks" / "slurm_baseline.py"
            )
            PREFIX[:] = ["srun", "--gres=gpu:1"]
            SETTLE.append(lambda: baseline.wait_node_idle(SLURM_ENV))
        return measure(args)


def measure(args: argparse.Namespace) -> int:
    trees = {"this tree": None, **({"old tree": args.old_src} if args.old_src else {})}
    label = " ".join([*PREFIX, "python -c print"])
    walls: dict[str, list[float]] = {label: []}
    cpus: dict[str, list[float]] = {}
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for _ in range(args.n):
        settle()
        walls[label].append(plain_python())
        for name, src in trees.items():
            settle()
            wall, cpu = cold_worker(src)
            walls.setdefault(name, []).append(wall)
            cpus.setdefault(name, []).append(cpu)
    floor = statistics.median(walls[label])
    print(f"{'row':<36}{'n':>4} | {'first line':>11} {'less python':>12} | {'worker CPU':>11}")
    for name, samples in walls.items():
        med = statistics.median(samples)
        cpu = f"{statistics.median(cpus[name]) * 1000:9.1f} ms" if name in cpus else ""
        print(
            f"{name:<36}{len(samples):>4} | {med * 1000:8.1f} ms {(med - floor) * 1000:9.1f} ms"
            f" | {cpu:>11}"
        )
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
