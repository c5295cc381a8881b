"""The watchdog's real NVML path (issue 14): raw CUDA allocations, seen per process.

Needs an NVIDIA GPU (marker ``cuda``; deselected in CI). Raw CUDA through ctypes
(``cuMemAlloc``), not a framework, so no framework cap is in the way. The first test
checks the readings and the decisions on them; the second the broker's own watchdog
loop on NVML with real `gpulane run` jobs. Never run where these were written (no GPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from gpulane.broker.watchdog import Holder, decide, read_nvml

MiB = 1024**2

_ALLOCATE = r"""
import ctypes, sys, time
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
assert cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device) == 0
assert cuda.cuMemAlloc_v2(ctypes.byref(pointer), int(sys.argv[1]) * 1024**2) == 0
print("ready", flush=True)
time.sleep(120)
"""


def _nvml() -> object | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml if pynvml.nvmlDeviceGetCount() > 0 else None
    except Exception:
        return None


NVML = _nvml()
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(NVML is None, reason="no NVIDIA GPU through NVML here"),
]


def _allocate(mib: int) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", _ALLOCATE, str(mib)],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def test_the_job_over_its_share_is_ended_its_neighbour_runs_a_stray_is_found() -> None:
    within, over, stray = _allocate(256), _allocate(2048), _allocate(64)
    try:
        readings = []
        for _ in range(20):  # NVML may list a new context a moment late
            readings = read_nvml(NVML, 1)
            if {within.pid, over.pid, stray.pid} <= {r.pid for r in readings}:
                break
            time.sleep(0.5)
        holders = [
            Holder(1, frozenset({within.pid}), frozenset({0}), 1024 * MiB),
            Holder(2, frozenset({over.pid}), frozenset({0}), 1024 * MiB),
        ]
        first = decide(readings, holders, {}, now=0.0, grace=2.0, enforce=True)
        assert [w.job_id for w in first.warnings] == [2]
        assert "of the 1.0 GiB of GPU memory it was given" in first.warnings[0].message
        assert stray.pid in {s.pid for s in first.strays if s.end}
        later = decide(
            read_nvml(NVML, 1), holders, first.over_since, now=2.0, grace=2.0, enforce=True
        )
        assert [e.job_id for e in later.ends] == [2]
        os.killpg(over.pid, signal.SIGKILL)  # what the broker does to an ended job's group
        over.wait(timeout=30)
        time.sleep(1)
        assert within.poll() is None
        assert within.pid in {r.pid for r in read_nvml(NVML, 1)}
    finally:
        for process in (within, over, stray):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=30)


def test_a_real_broker_ends_the_job_over_its_memory_through_nvml(make_broker, tmp_path) -> None:
    """The broker's own watchdog on NVML: two `gpulane run --gpu-mem 1G` jobs allocating
    with raw CUDA; the one past its grant (plus the default 512 MiB slack for its CUDA
    context) is warned then ended, its neighbour keeps running, a process outside the
    queue is reported (ended only where device access is enforced)."""
    from gpulane.broker import nvidia_driver

    live = nvidia_driver.live_params()
    devices = ["--no-enforce-devices"] if live and nvidia_driver.resets_open(live) else []
    broker = make_broker("--memory-watch-grace", "2s", *devices)
    script = tmp_path / "allocate.py"
    script.write_text(_ALLOCATE)
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    within = broker.spawn(None, "run", "--gpu-mem", "1G", "--", sys.executable, str(script), "256")
    over = broker.spawn(None, "run", "--gpu-mem", "1G", "--", sys.executable, str(script), "2048")
    stray = _allocate(64)
    try:
        _, err = over.communicate(timeout=90)
        assert over.returncode != 0
        assert "your job uses" in err and "of the 1.0 GiB of GPU memory it was given" in err
        assert "ended by the GPU memory watchdog" in err
        assert within.poll() is None
        result = broker.call(None, "status", "--json")
        snapshot = json.loads(result.stdout)
        assert stray.pid in {s["pid"] for s in snapshot["strays"]}
        holders = snapshot["gpus"][0]["holders"]
        assert holders and all((h.get("gpu_mem_used") or 0) > 256 * MiB for h in holders)
    finally:
        for process in (within, over):
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
        if stray.poll() is None:
            os.killpg(stray.pid, signal.SIGKILL)
            stray.wait(timeout=30)
