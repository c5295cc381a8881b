#!/usr/bin/env python3
"""``%%gpu`` start overhead: from executing a cell to its first printed line.

The cell is ``print('x')``, which imports nothing. Each sample is the time from
``kc.execute(code)`` (jupyter_client, on a real ipykernel) to the arrival of the
iopub ``stream`` message that holds the line ``x``. Rows, in one run and
interleaved sample by sample, so that drift on the machine hits them alike:

- the plain cell, no magic: the kernel's own floor;
- ``%%gpu`` on a real ``gpulane broker --simulate-gpus 1``, warm worker (the default);
- the same with ``GPULANE_WARM_WORKER=0`` in the kernel's environment (a cold worker);
- as root (or with ``--slurm``), on a one-node Slurm with one fake GPU
  (tools/slurmlocal.py): ``%%gpu`` with ``GPULANE_BACKEND=slurm``, and the seed
  document's way in the same cluster, the cell written to a script and run with
  ``srun --gres=gpu:1 python3 SCRIPT``, timed from the start to its first line on the pipe.

Before each sample the previous job has left the queue (broker status, squeue and an
idle node) and the kernels' process trees have gone quiet (a warm worker is started
after each cell; it must be ready, not half-imported). Not a test::

    bash scripts/bench.sh cell [--n 20] [--warmup 2] [--no-slurm]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import broker_bench as bb  # benchmarks/ is on sys.path when this file runs as a script
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpec

from gpulane.scheduler.embedded import BrokerScheduler

CELL = "print('x')"
LINE = "x"  # the first line the cell prints
TARGET_MS = 100.0  # %%gpu on the broker, warm worker: median
SLURM_PORT = 6927  # slurmctld; slurmd takes the next port
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    """One line of the table: samples in seconds, or why there are none."""

    name: str
    measure: Callable[[], float]
    settle: Callable[[], None]
    samples: list[float] = field(default_factory=list)
    note: str = "n/a"
    failures: list[str] = field(default_factory=list)  # runs that failed and were run again


# --------------------------------------------------------------------------- kernels


class BenchKernel:
    """A real ipykernel, driven through jupyter_client, with ``%load_ext gpulane`` run."""

    def __init__(self, folder: Path, name: str, env: dict[str, str]) -> None:
        home = folder / name
        home.mkdir(mode=0o700)
        full = {k: v for k, v in os.environ.items() if not k.startswith(("GPULANE_", "SLURM_"))}
        full.update(
            HOME=str(home), JUPYTER_RUNTIME_DIR=str(home), IPYTHONDIR=str(home / ".ipython")
        )
        full.update(env)
        self.km = KernelManager()
        self.km._kernel_spec = KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=name,
            language="python",
        )
        self.km.connection_file = str(home / "kernel.json")
        with open(home / "kernel.log", "ab") as log:  # its chatter stays out of the table
            self.km.start_kernel(env=full, stdout=log, stderr=log)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)
        self.first_line("%load_ext gpulane\nprint('x')")

    @property
    def pid(self) -> int:
        return int(self.km.provisioner.process.pid)  # type: ignore[union-attr]

    def first_line(self, code: str, timeout: float = 120.0) -> float:
        """Seconds from ``execute`` to the iopub stream message with the line ``x``."""
        t0 = time.perf_counter()
        msg_id = self.kc.execute(code)
        first: float | None = None
        problems: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"cell did not finish within {timeout} s: {problems}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream" and content["name"] == "stdout":
                if first is None and LINE in content["text"].splitlines():
                    first = time.perf_counter()
            elif kind == "stream":
                problems.append(content["text"])
            elif kind == "error":
                problems.append(f"{content['ename']}: {content['evalue']}")
            elif kind == "status" and content["execution_state"] == "idle":
                break
        reply = self.kc.get_shell_msg(timeout=10)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=10)
        if first is None or reply["content"]["status"] != "ok":
            last = problems[-1].strip().splitlines()[-1] if problems else "nothing on stderr"
            raise RuntimeError(f"cell {code!r} printed no {LINE!r}: {last}")
        return first - t0

    def shutdown(self) -> None:
        with contextlib.suppress(Exception):
            self.kc.stop_channels()
        with contextlib.suppress(Exception):
            self.km.shutdown_kernel(now=True)


def process_ticks(root: int) -> int:
    """CPU clock ticks used so far by ``root`` and its descendants (reaped children included)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    total = 0
    for pid, used in ticks.items():
        walk = pid
        while walk > 1 and walk != root:
            walk = parents.get(walk, 0)
        if walk == root:
            total += used
    return total


def wait_quiet(roots: Sequence[int], window: float = 0.1, timeout: float = 20.0) -> None:
    """Until the trees under ``roots`` use <= 1 tick per window, three windows in a row."""
    deadline = time.monotonic() + timeout
    calm = 0
    before = sum(process_ticks(r) for r in roots)
    while calm < 3:
        if time.monotonic() > deadline:
            raise RuntimeError("the kernels' processes did not go quiet")
        time.sleep(window)
        now = sum(process_ticks(r) for r in roots)
        calm = calm + 1 if now - before <= 1 else 0
        before = now


@contextlib.contextmanager
def kernel_folder() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="gpulane-cellbench-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- Slurm


def squeue_empty(env: dict[str, str]) -> bool:
    res = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True, check=False)
    return res.returncode == 0 and not res.stdout.strip()


def seed_srun(env: dict[str, str], folder: Path) -> float:
    """The seed document's way: the cell in a script, ``srun --gres=gpu:1 python3 SCRIPT``.

    ``python3`` is this benchmark's interpreter, the one the kernels and workers use.
    Timed from writing the script to the first line read from srun's stdout pipe.
    """
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile("w", suffix=".py", dir=folder, delete=False) as script:
        script.write(CELL + "\n")
    proc = subprocess.Popen(
        ["srun", "--gres=gpu:1", sys.executable, script.name],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    first = time.perf_counter()
    _, err = proc.communicate(timeout=60)
    Path(script.name).unlink()
    if line.decode().strip() != LINE or proc.returncode:
        raise RuntimeError(f"srun: rc={proc.returncode} out={line!r} err={err!r}")
    return first - t0


@contextlib.contextmanager
def slurm_cluster(port: int) -> Iterator[dict[str, str]]:
    slurmlocal = bb.load_module("slurmlocal", bb.REPO / "tools" / "slurmlocal.py")
    folder = Path(tempfile.mkdtemp(prefix="gpulane-cellbench-slurm-", dir="/tmp"))
    try:
        env = {**os.environ, **slurmlocal.start_cluster(folder, gpus=1, port=port)}
        yield env
    finally:
        slurmlocal.stop_cluster(folder)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- table


def ms_cell(xs: list[float], note: str) -> str:
    if not xs:
        return f"{note:>19}"
    med, p90 = bb.median_p90([x * 1000 for x in xs])
    return f"{med:>9.1f} {p90:>9.1f}"


def print_table(rows: list[Row], seed: Row) -> None:
    head = f"{'row':<52}{'n':>4} | {'median':>9} {'p90':>9} | {'seed/row':>9}"
    print(head + "\n" + f"{'':<52}{'':>4} | {'(ms)':>9} {'(ms)':>9} |")
    print("-" * len(head))
    for row in rows:
        ratio = "-"
        if row.samples and seed.samples:
            times = statistics.median(seed.samples) / statistics.median(row.samples)
            ratio = f"{times:.1f}x" if times >= 1 else f"{times:.2f}x"
        print(
            f"{row.name:<52}{len(row.samples):>4} | {ms_cell(row.samples, row.note)} | {ratio:>9}"
        )


def print_target(warm: Row, cold: Row) -> None:
    print("\ntarget (median):")
    for row, judged in ((warm, True), (cold, False)):
        med = statistics.median(row.samples) * 1000
        mark = bb.verdict(med <= TARGET_MS) if judged else "(not judged)"
        print(f"  {row.name} <= {TARGET_MS:.0f} ms: {med:7.1f} ms  {mark}")


# --------------------------------------------------------------------------- output rows

MIXED_CELL = "print('a')\ndisplay('b')\nprint('c')\n42"  # print, display, print, last expression
LOOP_CELL = "for i in range(100_000):\n    print(i)"
DONE_TARGET_MS = 20.0  # %%gpu: from the cell's last output to done


def cell_outputs(
    kernel: BenchKernel, code: str, timeout: float = 300.0, kinds: list[str] | None = None
) -> tuple[list[float], int]:
    """Arrival times (s after execute) of the cell's own outputs, then of its idle status
    (their message types go to ``kinds``); and how many stream messages it sent. The gpulane
    card (its display and updates) is not the cell's output."""
    t0 = time.perf_counter()
    msg_id = kernel.kc.execute(code)
    times: list[float] = []
    kinds = [] if kinds is None else kinds
    streams = 0
    while True:
        msg = kernel.kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        now = time.perf_counter() - t0
        if kind == "status" and content["execution_state"] == "idle":
            times.append(now)
            kinds.append("idle")
            break
        if kind == "error":
            raise RuntimeError(f"cell {code!r} raised {content['ename']}: {content['evalue']}")
        text = str(content.get("data", {}).get("text/plain", ""))
        if kind in ("stream", "display_data", "execute_result", "clear_output") and not (
            text.startswith("[gpulane]")
        ):
            times.append(now)
            kinds.append(kind)
            streams += kind == "stream"
    reply = kernel.kc.get_shell_msg(timeout=10)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kernel.kc.get_shell_msg(timeout=10)
    return times, streams


def done_after(kernel: BenchKernel, code: str, kinds: tuple[str, ...]) -> float:
    """Seconds from the cell's last output of ``kinds`` to its idle status."""
    seen: list[str] = []
    times, _ = cell_outputs(kernel, code, kinds=seen)
    last = [t for t, kind in zip(times, seen, strict=True) if kind in kinds]
    if not last:
        raise RuntimeError(f"cell {code!r} showed no {kinds}")
    return times[-1] - last[-1]


def output_rows(kernel: BenchKernel, settle: Callable[[], None]) -> tuple[list[Row], list[int]]:
    """The mixed cell (time to done after its last output) and the 100,000-line loop (wall
    time), each plain and under ``%%gpu``; and where the loops' stream message counts go."""
    counts: list[int] = []

    def loop(code: str) -> float:
        times, streams = cell_outputs(kernel, code)
        counts.append(streams)
        return times[-1]

    def mixed(gpu: bool, kinds: tuple[str, ...]) -> Callable[[], float]:
        return lambda: done_after(kernel, "%%gpu\n" * gpu + MIXED_CELL, kinds)

    anything = ("stream", "display_data", "execute_result", "clear_output")
    return [
        Row("mixed cell, plain: done after last output", mixed(False, anything), settle),
        Row("mixed cell, %%gpu: done after last output", mixed(True, anything), settle),
        Row("mixed cell, plain: done after its last line", mixed(False, ("stream",)), settle),
        Row("mixed cell, %%gpu: done after its last line", mixed(True, ("stream",)), settle),
        Row("100,000-line print loop, plain: wall", lambda: loop(LOOP_CELL), settle),
        Row("100,000-line print loop, %%gpu: wall", lambda: loop("%%gpu\n" + LOOP_CELL), settle),
    ], counts


def print_beside_plain(title: str, rows: list[Row]) -> None:
    """Rows in pairs (plain, then %%gpu), each %%gpu row with its ratio to the plain one."""
    print(f"\n{title:<52}{'n':>4} | {'median':>9} {'p90':>9} | {'gpu/plain':>9}")
    for plain, gpu in zip(rows[0::2], rows[1::2], strict=True):
        for row in (plain, gpu):
            ratio = ""
            if row is gpu and plain.samples and gpu.samples:
                ratio = f"{statistics.median(gpu.samples) / statistics.median(plain.samples):.2f}x"
            print(
                f"{row.name:<52}{len(row.samples):>4} | {ms_cell(row.samples, row.note)} | {ratio:>9}"
            )


def print_output_rows(rows: list[Row], counts: list[int]) -> None:
    """Each %%gpu row beside the plain row above it; the loops' stream messages per run."""
    print_beside_plain("output row", rows)
    if counts:
        plain_counts, gpu_counts = counts[0::2], counts[1::2]
        print(
            f"stream messages per loop (median): plain {statistics.median(plain_counts):.0f}, "
            f"%%gpu {statistics.median(gpu_counts):.0f}"
        )
    for row in (rows[1], rows[3]):
        if row.samples:
            med = statistics.median(row.samples) * 1000
            mark = bb.verdict(med <= DONE_TARGET_MS)
            print(f"target: {row.name} <= {DONE_TARGET_MS:.0f} ms: {med:7.1f} ms  {mark}")


# --------------------------------------------------------------------------- fork server rows

TORCH_CELL = "import torch\nt = torch.ones(64, 64) @ torch.ones(64, 64)\nprint('x')"
FORK_TARGET_MS = 50.0  # %%gpu medians: the torch cell's first line; each back-to-back cell
BACK_TO_BACK = 5
SPARE_READY = (  # a plain cell: wait until the kernel's next forked worker exists
    "_pool = get_ipython().magics_manager.registry['GpuMagics'].pool\n"
    "print('x' if _pool.spare_modules(300) is not None else 'no spare')"
)


def back_to_back(kernel: BenchKernel, code: str) -> float:
    """Five cells with no pause between them; the slowest one's first line."""
    return max(kernel.first_line(code) for _ in range(BACK_TO_BACK))


def fork_rows(
    kernel: BenchKernel, torch_kernel: BenchKernel, settle: Callable[[], None]
) -> list[Row]:
    """The torch cell in a kernel that imported torch, and five cells back to back, each plain
    and under ``%%gpu``."""
    gpu = "%%gpu\n"
    return [
        Row(
            "import torch + matmul, plain (torch in the kernel)",
            lambda: torch_kernel.first_line(TORCH_CELL),
            settle,
        ),
        Row(
            "import torch + matmul, %%gpu (fork server)",
            lambda: torch_kernel.first_line(gpu + TORCH_CELL),
            settle,
        ),
        Row("5 cells back to back, plain: slowest", lambda: back_to_back(kernel, CELL), settle),
        Row(
            "5 cells back to back, %%gpu: slowest", lambda: back_to_back(kernel, gpu + CELL), settle
        ),
    ]


def torch_kernel(folder: Path, env: dict[str, str]) -> BenchKernel:
    """A kernel that has imported torch, with its fork server holding it too."""
    kernel = BenchKernel(folder, "torch", env)
    kernel.first_line("import torch\nprint('x')")
    kernel.first_line(SPARE_READY, timeout=300)
    return kernel


def fork_server_memory(kernel: BenchKernel) -> str:
    """PSS of the kernel's fork server and of its spare worker (shared pages split)."""
    from gpulane.kernel.forkserver import pss_bytes

    children = {p: c for p, c in _children(kernel.pid).items() if "gpulane.kernel.forkserver" in c}
    parts = []
    for server in children:
        spares = list(_children(server))
        sizes = [pss_bytes(server), *(pss_bytes(p) for p in spares)]
        mib = [f"{(b or 0) / 2**20:.1f}" for b in sizes]
        parts.append(f"fork server {mib[0]} MiB, spare worker(s) {', '.join(mib[1:]) or '-'} MiB")
    return "; ".join(parts) or "no fork server"


def _children(pid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = command
    return found


def print_fork_rows(rows: list[Row], memory: list[str]) -> None:
    print_beside_plain("fork server row", rows)
    for row in (rows[1], rows[3]):
        if row.samples:
            med = statistics.median(row.samples) * 1000
            print(
                f"target: {row.name} <= {FORK_TARGET_MS:.0f} ms: {med:7.1f} ms  {bb.verdict(med <= FORK_TARGET_MS)}"
            )
    for line in memory:
        print(f"memory (PSS): {line}")


# --------------------------------------------------------------------------- transfer rows

GIB_FLOATS = 1 << 27  # float64 elements in 1 GiB
TRANSFER_TARGET_MS = 500.0  # %%gpu medians: 1 GiB in (to the first line), 1 GiB out (to done)
TRANSFER_SETUP = (
    f"import numpy as np\nbig = np.random.default_rng(0).random({GIB_FLOATS})\n"
    "small = np.ones(1)\nprint('x')"
)


def gib_in(kernel: BenchKernel, settle: Callable[[], None]) -> float:
    """The first line of a cell that reads a 1 GiB array, less the same cell reading a tiny one."""
    tiny = cell_outputs(kernel, "%%gpu\nprint('x')\nsmall.nbytes")[0][0]
    settle()
    return cell_outputs(kernel, "%%gpu\nprint('x')\nbig.nbytes")[0][0] - tiny


def gib_out(kernel: BenchKernel, settle: Callable[[], None]) -> float:
    """From the last line of a cell that made a 1 GiB array to the kernel holding it (done),
    less the same for a tiny array."""

    def last_line_to_done(elements: int) -> float:
        times, _ = cell_outputs(kernel, f"%%gpu\nout = np.ones({elements})\nprint('x')")
        return times[-1] - times[0]

    tiny = last_line_to_done(1)
    settle()
    return last_line_to_done(GIB_FLOATS) - tiny


def floor_rows(settle: Callable[[], None]) -> list[Row]:
    """What a GiB of memory costs here, in this process, beside the transfer rows: a copy into
    memory already faulted in (memory speed), np.copy into fresh memory (a copy plus first
    touch: on this VM fresh pages cost 0.3-2.3 s a GiB), and a write of it into a fresh
    /dev/shm file (the transfer's own mechanism: its pages are allocated as it is written)."""
    import numpy as np

    source = np.random.default_rng(0).random(GIB_FLOATS)
    faulted = np.zeros_like(source)  # written once: its pages stay faulted in
    view = memoryview(source).cast("B")

    def timed(action: Callable[[], object]) -> float:
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    def shm_write() -> float:
        descriptor, name = tempfile.mkstemp(dir="/dev/shm", prefix="gpulane-cellbench-")
        try:
            started = time.perf_counter()
            written = 0
            while written < view.nbytes:
                written += os.write(descriptor, view[written:])
            return time.perf_counter() - started
        finally:
            os.close(descriptor)
            os.unlink(name)

    return [
        Row(
            "memcpy of 1 GiB into faulted-in memory (floor)",
            lambda: timed(lambda: np.copyto(faulted, source)),
            settle,
        ),
        Row("np.copy of 1 GiB into fresh memory", lambda: timed(lambda: np.copy(source)), settle),
        Row("write of 1 GiB into a fresh /dev/shm file", shm_write, settle),
    ]


FLOORS = 3  # the floor rows that lead transfer_rows' list


def transfer_rows(
    kernel: BenchKernel, unpooled: BenchKernel, settle: Callable[[], None]
) -> list[Row]:
    """1 GiB in and 1 GiB out through %%gpu, beside the floors of the same run, and 1 GiB in
    from a kernel without a spill pool (every input written into fresh memory)."""
    kernel.first_line(TRANSFER_SETUP)
    unpooled.first_line(TRANSFER_SETUP)
    return [
        *floor_rows(settle),
        Row(
            "1 GiB in, %%gpu: first line less a tiny input's",
            lambda: gib_in(kernel, settle),
            settle,
        ),
        Row(
            "1 GiB out, %%gpu: done after last line, less tiny",
            lambda: gib_out(kernel, settle),
            settle,
        ),
        Row(
            "1 GiB in, GPULANE_SPILL_POOL=0 (not a target)",
            lambda: gib_in(unpooled, settle),
            settle,
        ),
    ]


def print_transfer_rows(rows: list[Row]) -> None:
    memcpy, shm = rows[0], rows[FLOORS - 1]
    print(f"\n{'transfer row':<52}{'n':>4} | {'median':>9} {'p90':>9} | {'/memcpy':>8} {'/shm':>6}")
    for row in rows:
        ratios = [
            f"{statistics.median(row.samples) / statistics.median(base.samples):.2f}x"
            if row.samples and base.samples
            else ""
            for base in (memcpy, shm)
        ]
        print(
            f"{row.name:<52}{len(row.samples):>4} | {ms_cell(row.samples, row.note)} | "
            f"{ratios[0]:>8} {ratios[1]:>6}"
        )
    for row in rows[FLOORS : FLOORS + 2]:  # the last row: the same, no pool (for the ratio)
        if row.samples:
            med = statistics.median(row.samples) * 1000
            mark = bb.verdict(med <= TRANSFER_TARGET_MS)
            print(f"target: {row.name} <= {TRANSFER_TARGET_MS:.0f} ms: {med:7.1f} ms  {mark}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=20, help="samples per row (default 20)")
    ap.add_argument("--warmup", type=int, default=2, help="unrecorded runs per row (default 2)")
    ap.add_argument("--port", type=int, default=SLURM_PORT, help="first slurmctld port to try")
    ap.add_argument(
        "--transfer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the 1 GiB in and out rows (needs ~7 GiB of memory; default: on)",
    )
    ap.add_argument(
        "--slurm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure on Slurm too (default: when root)",
    )
    return ap.parse_args(argv)


def measure_once(row: Row, tries: int = 3) -> float:
    """One sample; a failed run is noted (and printed with the table) and run again."""
    for _ in range(tries - 1):
        row.settle()
        try:
            return row.measure()
        except RuntimeError as error:
            row.failures.append(str(error)[-200:])
            print(f"  {row.name}: a run failed, running it again: {row.failures[-1]}")
    row.settle()
    return row.measure()


def print_failures(rows: list[Row]) -> None:
    for row in rows:
        if row.failures:
            print(f"\n{row.name}: {len(row.failures)} run(s) failed and were run again:")
            for text in sorted(set(row.failures)):
                print(f"  {row.failures.count(text)} x {text}")


def sample(rows: list[Row], n: int, warmup: int) -> None:
    """``warmup`` unrecorded rounds, then ``n`` recorded ones; one sample of each row a round."""
    for i in range(warmup + n):
        for row in rows:
            took = measure_once(row)
            if i >= warmup:
                row.samples.append(took)
        if i >= warmup:
            done = i - warmup + 1
            if done % 5 == 0 or done == n:
                print(f"  {done}/{n} rounds", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    bb.print_machine()
    reason = bb.slurm_unavailable(args.slurm)
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(kernel_folder())
        broker = stack.enter_context(bb.running_broker())
        status = BrokerScheduler(broker.socket)
        stack.callback(status.client.close)
        on_broker = {"GPULANE_SOCKET": str(broker.socket)}
        warm = BenchKernel(folder, "warm", on_broker)
        stack.callback(warm.shutdown)
        cold = BenchKernel(folder, "cold", {**on_broker, "GPULANE_WARM_WORKER": "0"})
        stack.callback(cold.shutdown)
        kernels = [warm, cold]

        def broker_idle() -> bool:
            snap = status.snapshot()
            return not snap["queue"] and not snap["running"]

        def settle_broker() -> None:
            bb.wait_until(broker_idle, "the broker's queue to empty")
            wait_quiet([k.pid for k in kernels])

        gpu = "%%gpu\n" + CELL
        rows = [
            Row(
                "plain cell, no magic (kernel floor)", lambda: warm.first_line(CELL), settle_broker
            ),
            Row(
                "%%gpu, broker, warm worker (default)", lambda: warm.first_line(gpu), settle_broker
            ),
            Row(
                "%%gpu, broker, GPULANE_WARM_WORKER=0", lambda: cold.first_line(gpu), settle_broker
            ),
        ]
        slurm_rows = [
            Row("%%gpu, Slurm (GPULANE_BACKEND=slurm)", lambda: 0.0, lambda: None),
            Row("seed: srun --gres=gpu:1 python3 SCRIPT", lambda: 0.0, lambda: None),
        ]
        if reason is None:
            try:
                port = bb.free_port_pair(args.port)
                env = stack.enter_context(slurm_cluster(port))
                baseline = bb.load_module(
                    "slurm_baseline", bb.REPO / "benchmarks" / "slurm_baseline.py"
                )
                print(f"Slurm: one node, 1 GPU, slurmctld on port {port}")
                on_slurm = {"GPULANE_BACKEND": "slurm", "SLURM_CONF": env["SLURM_CONF"]}
                slurm = BenchKernel(folder, "slurm", on_slurm)
                stack.callback(slurm.shutdown)
                kernels.append(slurm)

                def settle_slurm() -> None:
                    bb.wait_until(lambda: squeue_empty(env), "squeue to empty", timeout=60)
                    baseline.wait_node_idle(env)
                    wait_quiet([k.pid for k in kernels])

                slurm_rows[0].measure = lambda: slurm.first_line(gpu)
                slurm_rows[1].measure = lambda: seed_srun(env, folder)
                for row in slurm_rows:
                    row.settle = settle_slurm
                rows += slurm_rows
            except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
                detail = getattr(error, "stderr", "") or ""
                reason = f"Slurm failed: {error} {detail}".strip()[:300]
        if reason is not None:
            print(f"Slurm: n/a ({reason})")
        output, loop_counts = output_rows(warm, settle_broker)
        order_rows = list(output)  # with the rows below: sampled beside the start rows
        with_torch = torch_kernel(folder, on_broker)
        stack.callback(with_torch.shutdown)
        kernels.append(with_torch)
        forked = fork_rows(warm, with_torch, settle_broker)
        order_rows += forked  # sampled with the rest, printed in their own table
        if args.transfer:
            with_big = BenchKernel(folder, "transfer", on_broker)  # holds a 1 GiB array
            stack.callback(with_big.shutdown)
            kernels.append(with_big)
            unpooled = BenchKernel(folder, "nopool", {**on_broker, "GPULANE_SPILL_POOL": "0"})
            stack.callback(unpooled.shutdown)
            kernels.append(unpooled)
            moved = transfer_rows(with_big, unpooled, settle_broker)
            order_rows += moved
        print(f"sampling: {args.warmup} warm-up + {args.n} rounds of {len(rows)} rows")
        sample(rows + order_rows, args.n, args.warmup)
        memory = [
            f"{Path(k.km.connection_file).parent.name} kernel: {fork_server_memory(k)}"
            for k in (warm, with_torch)
        ]
    print()
    print_table(rows[:3] + slurm_rows, slurm_rows[1])
    print_target(rows[1], rows[2])
    print_output_rows(output, loop_counts[2 * args.warmup :])
    print_fork_rows(forked, memory)
    if args.transfer:
        print_transfer_rows(moved)
    print_failures(rows + order_rows)
    print(f"\nload average at the end: {bb.load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
