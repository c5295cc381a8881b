#!/usr/bin/env python3
"""gpulane broker latency and throughput, beside plain Slurm srun on the same machine.

Measures, against a real ``gpulane broker --simulate-gpus 1`` process:

- submit-to-start on a free GPU, two ways: the whole ``gpulane run -- true`` CLI as a
  subprocess (process start included, comparable to ``srun --gres=gpu:1 true``), and
  in-process through ``BrokerScheduler.run()`` (submit to grant seen, submit to the
  command's first instruction);
- handoff: the gap between job A's last instruction and queued job B's first one;
- submit throughput: 50 keep-alive clients POSTing jobs while one job holds the GPU.

When root (or with ``--slurm``) it also starts a one-node Slurm with a fake GPU
(tools/slurmlocal.py) and measures srun latency and handoff with
benchmarks/slurm_baseline.py. It prints one table and the targets. Not a test::

    bash scripts/bench.sh [--n 30] [--handoff-n 20] [--no-slurm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

from gpulane import __version__
from gpulane.jobs import Request
from gpulane.scheduler.base import JobUpdate
from gpulane.scheduler.embedded import BrokerScheduler

REPO = Path(__file__).resolve().parent.parent
TARGET_HANDOFF_MS = 20.0
TARGET_START_MS = 50.0
TARGET_SUBMITS_PER_S = 500.0
MAX_QUEUED_PER_USER = 1000  # BrokerSettings.max_queued_per_user: HTTP 429 beyond it
SLURM_PORT = 6917  # slurmctld; slurmd takes the next port


# --------------------------------------------------------------------------- figures


@dataclass
class Figure:
    """One row of the table: each side's samples, seconds ("ms" rows) or rates ("/s" rows)."""

    metric: str
    unit: str  # "ms" (samples are seconds, shown in ms) or "/s" (a rate)
    broker: list[float] = field(default_factory=list)
    slurm: list[float] = field(default_factory=list)
    slurm_note: str = "n/a"


def scaled(xs: list[float], unit: str) -> list[float]:
    return [x * 1000 for x in xs] if unit == "ms" else list(xs)


def median_p90(xs: list[float], slow_is_low: bool = False) -> tuple[float, float]:
    """Median and the slow-side 90th percentile (the 10th percentile for rates)."""
    if len(xs) == 1:
        return xs[0], xs[0]
    deciles = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), deciles[0] if slow_is_low else deciles[8]


def cell(xs: list[float], unit: str, note: str = "n/a") -> str:
    if not xs:
        return f"{note:>19}"
    med, p90 = median_p90(scaled(xs, unit), slow_is_low=unit == "/s")
    if len(xs) == 1:
        return f"{med:>9.0f} {'-':>9}"
    return f"{med:>9.1f} {p90:>9.1f}"


def ratio(fig: Figure) -> str:
    if not fig.broker or not fig.slurm:
        return f"{'-':>8}"
    return f"{statistics.median(fig.slurm) / statistics.median(fig.broker):>7.1f}x"


def print_table(figures: list[Figure]) -> None:
    head = f"{'metric':<48}{'n':>5} | {'gpulane broker':^19} | {'Slurm srun':^19} | {'slurm/':>8}"
    sub = f"{'':<48}{'':>5} | {'median':>9} {'p90':>9} | {'median':>9} {'p90':>9} | {'broker':>8}"
    print(head)
    print(sub)
    print("-" * len(sub))
    for fig in figures:
        n = len(fig.broker)
        name = f"{fig.metric} ({fig.unit})"
        print(
            f"{name:<48}{n:>5} | {cell(fig.broker, fig.unit)} | "
            f"{cell(fig.slurm, fig.unit, fig.slurm_note)} | {ratio(fig)}"
        )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_targets(start_api: Figure, start_cli: Figure, handoff: Figure, rate: Figure) -> None:
    api_ms = statistics.median(start_api.broker) * 1000
    cli_ms = statistics.median(start_cli.broker) * 1000
    gap_ms = statistics.median(handoff.broker) * 1000
    per_s = statistics.median(rate.broker)
    print("\ntargets (broker medians):")
    print(
        f"  handoff <= {TARGET_HANDOFF_MS:.0f} ms: {gap_ms:7.1f} ms  "
        f"{verdict(gap_ms <= TARGET_HANDOFF_MS)}"
    )
    print(
        f"  submit-to-start <= {TARGET_START_MS:.0f} ms (API, submit to command start): "
        f"{api_ms:7.1f} ms  {verdict(api_ms <= TARGET_START_MS)}"
    )
    print(
        f"  submit-to-start <= {TARGET_START_MS:.0f} ms (whole CLI, Python start included): "
        f"{cli_ms:7.1f} ms  {verdict(cli_ms <= TARGET_START_MS)}"
    )
    print(
        f"  submits/s >= {TARGET_SUBMITS_PER_S:.0f} ({rate.metric}): "
        f"{per_s:7.0f} /s  {verdict(per_s >= TARGET_SUBMITS_PER_S)}"
    )


# --------------------------------------------------------------------------- machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def slurm_version() -> str:
    # srun --version needs a reachable config, so ask the package manager instead.
    if not shutil.which("srun"):
        return "not installed"
    argv = ["dpkg-query", "-W", "-f", "${Version}", "slurm-client"]
    with contextlib.suppress(OSError):
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        if res.returncode == 0 and res.stdout:
            return f"slurm-wlm {res.stdout}"
    return "installed (version unknown)"


def print_machine() -> None:
    print("machine:")
    print(f"  date      {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"  nproc     {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()})")
    print(f"  cpu       {cpu_model()}")
    print(f"  kernel    {platform.system()} {platform.release()}")
    print(f"  python    {platform.python_version()} ({sys.executable})")
    print(f"  gpulane   {__version__}")
    print(f"  slurm     {slurm_version()}")
    print(f"  load      {load_text()} (other work on the machine skews every figure)")
    print()


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# --------------------------------------------------------------------------- broker


@dataclass
class BenchBroker:
    """A real ``gpulane broker`` process with one simulated GPU in a private folder."""

    folder: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.folder / "run" / "broker.sock"

    @property
    def log(self) -> Path:
        return self.folder / "broker.log"

    def env(self) -> dict[str, str]:
        return dict(os.environ, GPULANE_SOCKET=str(self.socket))

    def start(self) -> None:
        argv = [sys.executable, "-m", "gpulane", "broker", "--simulate-gpus", "1"]
        argv += ["--socket", str(self.socket), "--state-dir", str(self.folder / "state")]
        # A benchmark submits cell after cell from one user: past the per-user rate cap.
        argv += ["--log-level", "WARNING", "--max-submits-per-minute", "0"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self._wait_listening()

    def _wait_listening(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited: {self.log.read_text(errors='replace')}")
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as probe:
                probe.connect(str(self.socket))
                return
            time.sleep(0.05)
        raise RuntimeError("broker did not listen within 15 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        shutil.rmtree(self.folder / "state", ignore_errors=True)
        self.start()

    def gpulane(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gpulane", *args]

    def spawn(self, *args: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.gpulane(*args), env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )


@contextlib.contextmanager
def running_broker() -> Iterator[BenchBroker]:
    folder = Path(tempfile.mkdtemp(prefix="gpulane-bench-"))
    folder.chmod(0o755)
    broker = BenchBroker(folder)
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


# --------------------------------------------------------------------------- (a) start


def cli_run_true(broker: BenchBroker) -> float:
    """Wall seconds of ``python -m gpulane run -- true`` on a free GPU."""
    t0 = time.perf_counter()
    subprocess.run(
        broker.gpulane("run", "--", "true"), env=broker.env(), check=True, capture_output=True
    )
    return time.perf_counter() - t0


def python_imports(broker: BenchBroker) -> float:
    """Wall seconds of a Python that only imports what ``gpulane run`` imports; no broker."""
    # cli.py imports these lazily, inside cmd_run: list them all, or the row reads short.
    code = (
        "import gpulane.cli, gpulane.jobs, gpulane.display, gpulane.scheduler, "
        "gpulane.scheduler.embedded"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=broker.env(), check=True, capture_output=True)
    return time.perf_counter() - t0


def api_start(scheduler: BrokerScheduler, work: Path) -> tuple[float, float]:
    """(submit -> grant seen, submit -> command's first instruction), seconds, in-process.

    The command is ``date +%s.%N``: its output is the wall-clock time once it runs, so the
    second figure includes the client's fork/exec of the command, as srun's does.
    """
    out = work / "api-start"
    seen: list[float] = []

    def on_update(update: JobUpdate) -> None:
        if update.state == "running" and not seen:
            seen.append(time.time())

    request = Request(name="bench", time_limit=60, command=("date", "+%s.%N"))
    with open(out, "wb") as sink:
        t0 = time.time()
        outcome = scheduler.run(request, on_update=on_update, stdout=sink)
    if outcome.exit_status != 0 or not seen:
        raise RuntimeError(f"API run failed: {outcome}")
    return seen[0] - t0, float(out.read_text()) - t0


def measure_start(broker: BenchBroker, n: int) -> tuple[Figure, Figure, Figure, Figure]:
    scheduler = BrokerScheduler(broker.socket)
    cli = Figure("CLI wall: gpulane run -- true | srun true", "ms")
    grant = Figure("submit->grant seen, API", "ms", slurm_note="not comparable")
    start = Figure("submit->command start, API", "ms", slurm_note="not comparable")
    py = Figure("  of which: Python start + run-path imports", "ms", slurm_note="-")
    with tempfile.TemporaryDirectory(prefix="gpulane-bench-api-") as tmp:
        for _ in range(3):  # warm-up: imports, page cache, the broker's first requests
            cli_run_true(broker)
            api_start(scheduler, Path(tmp))
        for _ in range(n):
            cli.broker.append(cli_run_true(broker))
            py.broker.append(python_imports(broker))
            g, s = api_start(scheduler, Path(tmp))
            grant.broker.append(g)
            start.broker.append(s)
    scheduler.client.close()
    return cli, grant, start, py


# --------------------------------------------------------------------------- (b) handoff


def queue_ids(scheduler: BrokerScheduler) -> list[int]:
    return [int(j["id"]) for j in scheduler.snapshot()["queue"]]


def one_handoff(broker: BenchBroker, scheduler: BrokerScheduler, work: Path, hold: float) -> float:
    """A runs ``hold`` s then stamps A; B, queued behind it, stamps B; return B - A."""
    a_run, a_end, b_start = work / "A.run", work / "A", work / "B"
    for f in (a_run, a_end, b_start):
        f.unlink(missing_ok=True)
    a = broker.spawn("run", "--", "sh", "-c", f"touch {a_run}; sleep {hold}; date +%s.%N > {a_end}")
    wait_until(a_run.exists, "job A to start")
    b = broker.spawn("run", "--", "sh", "-c", f"date +%s.%N > {b_start}")
    wait_until(lambda: bool(queue_ids(scheduler)), "job B to queue")
    if a_end.exists():
        raise RuntimeError(f"job A ended before B queued; raise --hold (now {hold} s)")
    for proc in (a, b):
        _, err = proc.communicate(timeout=60)
        if proc.returncode:
            raise RuntimeError(f"gpulane run failed: {err.decode(errors='replace')}")
    return float(b_start.read_text()) - float(a_end.read_text())


def measure_handoff(broker: BenchBroker, n: int, hold: float) -> Figure:
    fig = Figure("handoff gap: A's end -> queued B's start", "ms")
    scheduler = BrokerScheduler(broker.socket)
    with tempfile.TemporaryDirectory(prefix="gpulane-bench-handoff-") as tmp:
        one_handoff(broker, scheduler, Path(tmp), hold)  # warm-up
        fig.broker = [one_handoff(broker, scheduler, Path(tmp), hold) for _ in range(n)]
    scheduler.client.close()
    return fig


# --------------------------------------------------------------------------- (c) throughput


class Conn:
    """One raw HTTP/1.1 keep-alive connection to the broker's Unix socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, path: Path) -> Conn:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def call(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int({k.lower(): v for k, v in headers.items()}.get("content-length", "0"))
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def post_jobs(conn: Conn, count: int, statuses: list[int]) -> list[int]:
    body = json.dumps({"command": ["true"], "time_limit": 60, "name": "bench"}).encode()
    ids = []
    for _ in range(count):
        status, data = await conn.call("POST", "/v1/jobs", body)
        statuses.append(status)
        if status == 201:
            ids.append(int(json.loads(data)["id"]))
    return ids


async def cancel_jobs(conn: Conn, ids: list[int]) -> None:
    for job_id in ids:
        status, data = await conn.call("DELETE", f"/v1/jobs/{job_id}")
        if status != 200:
            raise RuntimeError(f"DELETE job {job_id}: HTTP {status} {data[:200]!r}")


async def submit_round(path: Path, clients: int, per_client: int) -> tuple[float, float, int]:
    """(submit seconds, cancel seconds, accepted): all connections open before the clock."""
    conns = [await Conn.open(path) for _ in range(clients)]
    statuses: list[int] = []
    t0 = time.perf_counter()
    ids = await asyncio.gather(*(post_jobs(c, per_client, statuses) for c in conns))
    t1 = time.perf_counter()
    await asyncio.gather(*(cancel_jobs(c, i) for c, i in zip(conns, ids, strict=True)))
    t2 = time.perf_counter()
    for conn in conns:
        await conn.close()
    refused = [s for s in statuses if s != 201]
    if refused:
        raise RuntimeError(f"{len(refused)} submits refused, e.g. HTTP {refused[0]}")
    return t1 - t0, t2 - t1, len(statuses)


def hold_gpu(broker: BenchBroker, scheduler: BrokerScheduler) -> subprocess.Popen[bytes]:
    """A ``gpulane run -- sleep`` that holds the only GPU, so every submit queues."""
    holder = broker.spawn("run", "--", "sleep", "3600")
    wait_until(lambda: bool(scheduler.snapshot()["running"]), "the holder job to run")
    return holder


def throughput_figures(
    broker: BenchBroker, clients: int, depth: int, rounds: int
) -> tuple[Figure, Figure]:
    """Submit and cancel rates, ``rounds`` times filling the queue from 0 to ``depth``."""
    per_client = depth // clients
    depth = per_client * clients
    submits = Figure(f"submits/s, {clients} clients, queue 0->{depth}", "/s")
    cancels = Figure(f"cancels/s, {clients} clients, queue {depth}->0", "/s")
    total, sub_s, can_s = 0, 0.0, 0.0
    for _ in range(rounds):
        s, c, n = asyncio.run(submit_round(broker.socket, clients, per_client))
        total, sub_s, can_s = total + n, sub_s + s, can_s + c
        submits.broker.append(n / s)
        cancels.broker.append(n / c)
    print(
        f"throughput: {total} jobs, queue 0->{depth} x{rounds}: submit {sub_s:.2f} s, cancel {can_s:.2f} s"
    )
    for fig in (submits, cancels):
        fig.slurm_note = "not measured"
    return submits, cancels


def measure_throughput(
    broker: BenchBroker, clients: int, depths: list[int], rounds: int
) -> list[Figure]:
    if max(depths) > MAX_QUEUED_PER_USER:
        raise SystemExit(f"queue depths must be <= {MAX_QUEUED_PER_USER} (HTTP 429 beyond)")
    scheduler = BrokerScheduler(broker.socket)
    holder = hold_gpu(broker, scheduler)
    figures: list[Figure] = []
    try:
        asyncio.run(submit_round(broker.socket, clients, 1))  # warm-up
        for depth in depths:
            figures.extend(throughput_figures(broker, clients, depth, rounds))
    finally:
        holder.send_signal(signal.SIGINT)
        holder.communicate(timeout=30)
        scheduler.client.close()
    return figures


# --------------------------------------------------------------------------- Slurm


def load_module(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pair(start: int) -> int:
    for port in range(start, start + 200, 2):
        if port_free(port) and port_free(port + 1):
            return port
    raise RuntimeError(f"no free port pair from {start}")


def slurm_unavailable(wanted: bool | None) -> str | None:
    """Why Slurm cannot be measured here, or None."""
    if wanted is False:
        return "skipped (--no-slurm)"
    if os.geteuid() != 0:
        return "needs root (slurmlocal starts daemons)"
    if not shutil.which("apt-get") and not shutil.which("srun"):
        return "slurm-wlm not installed and no apt-get"
    return None


def measure_slurm(n: int, handoff_n: int) -> tuple[list[float], list[float]]:
    """srun latency and handoff on a throwaway one-GPU cluster, stopped at the end."""
    slurmlocal = load_module("slurmlocal", REPO / "tools" / "slurmlocal.py")
    baseline = load_module("slurm_baseline", REPO / "benchmarks" / "slurm_baseline.py")
    folder = Path(tempfile.mkdtemp(prefix="gpulane-bench-slurm-", dir="/tmp"))
    try:
        port = free_port_pair(SLURM_PORT)
        env = {**os.environ, **slurmlocal.start_cluster(folder, gpus=1, port=port)}
        baseline.srun_latency(2, env)  # warm-up: first srun loads plugins, caches users
        latency: list[float] = baseline.srun_latency(n, env)
        handoff: list[float] = baseline.srun_handoff(handoff_n, env)
        return latency, handoff
    finally:
        slurmlocal.stop_cluster(folder)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=30, help="submit-to-start samples (default 30)")
    ap.add_argument("--handoff-n", type=int, default=20, help="handoff samples (default 20)")
    ap.add_argument("--hold", type=float, default=1.0, help="job A's run time in s (default 1)")
    ap.add_argument("--clients", type=int, default=50, help="concurrent submitters (default 50)")
    ap.add_argument(
        "--depths",
        default="1000,250",
        help="jobs per round, each <= 1000; the first is the headline figure (default 1000,250)",
    )
    ap.add_argument("--rounds", type=int, default=3, help="rounds per depth (default 3)")
    ap.add_argument(
        "--slurm",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure Slurm srun too (default: when root)",
    )
    return ap.parse_args(argv)


def run_broker_side(args: argparse.Namespace) -> dict[str, Figure]:
    with running_broker() as broker:
        cli, grant, start, py = measure_start(broker, args.n)
        handoff = measure_handoff(broker, args.handoff_n, args.hold)
        broker.restart()  # a fresh database, so earlier jobs do not weigh on throughput
        depths = [int(d) for d in args.depths.split(",") if d]
        rates = measure_throughput(broker, args.clients, depths, args.rounds)
    return {
        "cli": cli,
        "py": py,
        "grant": grant,
        "start": start,
        "handoff": handoff,
        **{f"rate{i}": fig for i, fig in enumerate(rates)},
    }


def add_slurm_side(figs: dict[str, Figure], args: argparse.Namespace) -> None:
    reason = slurm_unavailable(args.slurm)
    if reason is None:
        try:
            figs["cli"].slurm, figs["handoff"].slurm = measure_slurm(args.n, args.handoff_n)
            return
        except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
            detail = getattr(error, "stderr", "") or ""
            reason = f"Slurm failed: {error} {detail}".strip()[:300]
    print(f"Slurm: n/a ({reason})")
    figs["cli"].slurm_note = figs["handoff"].slurm_note = "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print_machine()
    figs = run_broker_side(args)
    add_slurm_side(figs, args)
    print()
    print_table(list(figs.values()))
    print_targets(figs["start"], figs["cli"], figs["handoff"], figs["rate0"])
    print(f"\nload average at the end: {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
