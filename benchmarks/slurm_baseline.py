#!/usr/bin/env python3
"""Baseline figures for plain Slurm srun, to compare gpulane against.

- srun_latency: wall time of ``srun --gres=gpu:1 true`` on an idle node.
- srun_handoff: gap between one job ending and the next *pending* job starting on
  the same GPUs (what a queued user waits beyond the previous job's end).

Run as a script to start a throwaway cluster (tools/slurmlocal.py), measure both,
print a table and stop the cluster::

    python3 benchmarks/slurm_baseline.py [--n 10]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

PENDING_MARK = "queued and waiting for resources"  # srun's stderr when the job pends
BENCH_PORT = 6917  # away from slurmlocal's default so a running test cluster is untouched


def wait_node_idle(env: Mapping[str, str], timeout: float = 10.0) -> None:
    # Right after a job ends the node is COMPLETING (its Epilog runs, ~20 ms) and a new
    # srun would pend briefly; "idle node" latency must not include that.
    deadline = time.monotonic() + timeout
    argv = ["sinfo", "-h", "-N", "-o", "%T"]
    while time.monotonic() < deadline:
        res = subprocess.run(argv, env=dict(env), capture_output=True, text=True, check=False)
        if res.stdout.split() and all(s == "idle" for s in res.stdout.split()):
            return
        time.sleep(0.02)
    raise RuntimeError("node did not become idle")


def srun_latency(n: int, env: Mapping[str, str]) -> list[float]:
    """Wall seconds of ``srun --gres=gpu:1 true``, n times, on an idle node."""
    out = []
    for _ in range(n):
        wait_node_idle(env)
        t0 = time.perf_counter()
        subprocess.run(
            ["srun", "--gres=gpu:1", "true"], env=dict(env), check=True, capture_output=True
        )
        out.append(time.perf_counter() - t0)
    return out


def node_gpu_count(env: Mapping[str, str]) -> int:
    # Both handoff jobs ask for every GPU so the second one is forced to wait.
    res = subprocess.run(
        ["sinfo", "-h", "-o", "%G"], env=dict(env), check=True, capture_output=True, text=True
    )
    m = re.search(r"gpu:(?:[^:,(]+:)?(\d+)", res.stdout)
    if not m:
        raise RuntimeError(f"no gpu GRES on the node: {res.stdout!r}")
    return int(m.group(1))


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    # A's "running" marker tells us B will be submitted while A holds the GPUs.
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"job A did not start: {proc.communicate()}")
        time.sleep(0.01)


def start_srun(gres: str, script: str, env: Mapping[str, str]) -> subprocess.Popen[str]:
    # Background srun with captured stderr: the pending notice is read from it later.
    argv = ["srun", f"--gres={gres}", "sh", "-c", script]
    return subprocess.Popen(
        argv, env=dict(env), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def one_handoff(work: Path, gres: str, env: Mapping[str, str]) -> float:
    """Run A then a B that must pend behind it; return B_start - A_end in seconds."""
    a_run, a_end, b_start = work / "A.run", work / "A", work / "B"
    for f in (a_run, a_end, b_start):
        f.unlink(missing_ok=True)
    a_cmd = f"date +%s.%N > {a_run}; sleep 1; date +%s.%N > {a_end}"
    b_cmd = f"date +%s.%N > {b_start}"
    a = start_srun(gres, a_cmd, env)
    wait_for_file(a_run, a)
    b = start_srun(gres, b_cmd, env)
    _, a_err = a.communicate()
    _, b_err = b.communicate()
    if a.returncode or b.returncode:
        raise RuntimeError(
            f"srun failed: A rc={a.returncode} {a_err!r} B rc={b.returncode} {b_err!r}"
        )
    gap = float(b_start.read_text()) - float(a_end.read_text())
    # Proof B really queued behind A, not ran beside it.
    if PENDING_MARK not in b_err or gap < 0:
        raise RuntimeError(f"job B did not wait for A (gap={gap:.3f}s, stderr={b_err!r})")
    return gap


def srun_handoff(n: int, env: Mapping[str, str]) -> list[float]:
    """Gap (s) between a job's end and a pending job's start on the same GPUs, n times."""
    gres = f"gpu:{node_gpu_count(env)}"
    out = []
    with tempfile.TemporaryDirectory(prefix="handoff-") as tmp:
        for i in range(n):
            # Without this stagger every A would end at the same phase of slurmctld's
            # 1 s scheduler tick (the previous B started on a tick), biasing the gap.
            time.sleep(i / n)
            out.append(one_handoff(Path(tmp), gres, env))
    return out


def summary_row(name: str, xs: list[float]) -> str:
    ms = sorted(x * 1000 for x in xs)
    p90 = statistics.quantiles(ms, n=10, method="inclusive")[8] if len(ms) > 1 else ms[0]
    return f"{name:<14}{len(ms):>4}{statistics.median(ms):>10.1f}{p90:>10.1f}{ms[0]:>10.1f}{ms[-1]:>10.1f}"


def print_table(results: dict[str, list[float]]) -> None:
    print(f"{'metric':<14}{'n':>4}{'median':>10}{'p90':>10}{'min':>10}{'max':>10}   (ms)")
    for name, xs in results.items():
        print(summary_row(name, xs))


def load_slurmlocal() -> ModuleType:
    # tools/ is not a package; load the module straight from its path.
    path = Path(__file__).resolve().parent.parent / "tools" / "slurmlocal.py"
    spec = importlib.util.spec_from_file_location("slurmlocal", path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="plain srun baseline")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--gpus", type=int, default=2)
    args = ap.parse_args(argv)
    slurmlocal = load_slurmlocal()
    with tempfile.TemporaryDirectory(prefix="slurm-baseline-") as tmp:
        d = Path(tmp)
        try:
            env = {**os.environ, **slurmlocal.start_cluster(d, gpus=args.gpus, port=BENCH_PORT)}
            srun_latency(2, env)  # warm-up: first srun loads plugins, caches users
            results = {
                "srun_latency": srun_latency(args.n, env),
                "srun_handoff": srun_handoff(args.n, env),
            }
        finally:
            slurmlocal.stop_cluster(d)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
