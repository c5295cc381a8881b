"""CUDA MPS on a real GPU (issue 14): the broker's MPS daemon runs, and a job allocating
past its pinned device memory limit gets out of memory from the driver while its
neighbour on the same GPU keeps running.

Needs an NVIDIA GPU, ``nvidia-cuda-mps-control`` and root (the broker runs MPS only as
root): marker ``cuda``, deselected in CI. Raw CUDA through ctypes (``cuMemAlloc``), so no
framework cap is in the way: only the driver's CUDA_MPS_PINNED_DEVICE_MEM_LIMIT stops the
allocation. Written from NVIDIA's MPS documentation; never run where it was written (no
GPU there).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from gpulane.broker import mps
from gpulane.broker.mps_daemons import daemon_pid


def _nvml() -> object | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml if pynvml.nvmlDeviceGetCount() > 0 else None
    except Exception:
        return None


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(_nvml() is None, reason="no NVIDIA GPU through NVML here"),
    pytest.mark.skipif(shutil.which(mps.CONTROL) is None, reason=f"no {mps.CONTROL} here"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the broker runs MPS only as root"),
]

# Prints what MPS told it, then allocates argv[1] MiB; exit 3 on CUDA_ERROR_OUT_OF_MEMORY.
_ALLOCATE = r"""
import ctypes, os, sys, time
print("env", os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "-"),
      os.environ.get("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT", "-"), flush=True)
cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0
device, context, pointer = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
assert cuda.cuCtxCreate_v2(ctypes.byref(context), 0, device) == 0
status = cuda.cuMemAlloc_v2(ctypes.byref(pointer), int(sys.argv[1]) * 1024**2)
if status == 2:
    print("out of memory", flush=True)
    sys.exit(3)
assert status == 0, status
print("allocated", flush=True)
time.sleep(int(sys.argv[2]))
print("done", flush=True)
"""


def test_a_client_past_its_pinned_limit_gets_oom_and_its_neighbour_runs(
    make_broker, tmp_path
) -> None:
    from gpulane.broker import nvidia_driver

    live = nvidia_driver.live_params()
    devices = ["--no-enforce-devices"] if live and nvidia_driver.resets_open(live) else []
    base = tmp_path / "mps"
    broker = make_broker("--mps", "on", "--mps-dir", str(base), *devices)
    pipe = mps.folders(str(base), 0)[0]
    assert daemon_pid(pipe) is not None, broker.log_text()
    snapshot = json.loads(broker.call(None, "status", "--json").stdout)
    assert snapshot["mps"].startswith("MPS: on for GPU 0"), snapshot.get("mps")

    script = tmp_path / "allocate.py"
    script.write_text(_ALLOCATE)
    script.chmod(0o644)
    tmp_path.chmod(0o755)
    run = ("run", "--gpu-mem", "1G", "--", sys.executable, str(script))
    within = broker.spawn(None, *run, "256", "20")
    over = broker.spawn(None, *run, "2048", "0")
    try:
        out, err = over.communicate(timeout=120)
        assert f"env {pipe} 0=1024M" in out, (out, err, broker.log_text())
        assert over.returncode == 3 and "out of memory" in out, (out, err)
        assert within.poll() is None  # the neighbour on the same GPU is untouched
        out, err = within.communicate(timeout=120)
        assert within.returncode == 0, (out, err)
        assert "allocated" in out and "done" in out
    finally:
        for process in (within, over):
            if process.poll() is None:
                process.kill()
                process.communicate(timeout=30)
    assert daemon_pid(pipe) is not None  # one client's OOM leaves the daemon serving
