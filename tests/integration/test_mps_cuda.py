"""CUDA MPS on a real GPU (issue 14): the broker's MPS daemon runs, and a job allocating
past its pinned device memory limit gets out of memory from the driver while its
neighbour on the same GPU keeps running.

Needs an NVIDIA GPU, ``nvidia-cuda-mps-control`` and root (the broker runs MPS only as
root; the jobs run as the real test users gpl-alice and gpl-bob, so the folders' modes
are checked as a user's client meets them): marker ``cuda``, deselected in CI. Raw CUDA through ctypes (``cuMemAlloc``), so no
framework cap is in the way: only the driver's CUDA_MPS_PINNED_DEVICE_MEM_LIMIT stops the
allocation. Written from NVIDIA's MPS documentation; never run where it was written (no
GPU there).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

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


ALICE, BOB = "gpl-alice", "gpl-bob"


@pytest.fixture
def mps_broker(make_broker):  # type: ignore[no-untyped-def]
    from gpulane.broker import nvidia_driver

    live = nvidia_driver.live_params()
    devices = ["--no-enforce-devices"] if live and nvidia_driver.resets_open(live) else []
    # Where the users' clients can pass through to the pipe folder (0711, as /run is).
    top = Path(tempfile.mkdtemp(prefix="gpulane-mps-"))
    top.chmod(0o711)
    base = top / "mps"
    broker = make_broker("--mps", "on", "--mps-dir", str(base), *devices)
    yield broker, base
    broker.reap_clients()
    broker.stop()  # first: the broker quits its daemons through their pipe folders
    shutil.rmtree(top, ignore_errors=True)


def test_a_client_past_its_pinned_limit_gets_oom_and_its_neighbour_runs(
    mps_broker, shared_dir, unix_users
) -> None:
    """Two --gpu-mem 1G jobs of one real user on GPU 0, both MPS clients of the broker's
    daemon (the folders' modes let a user's client reach it): 2 GiB fails, 256 MiB runs."""
    broker, base = mps_broker
    pipe = mps.folders(str(base), 0)[0]
    assert daemon_pid(pipe) is not None, broker.log_text()
    snapshot = json.loads(broker.call(None, "status", "--json").stdout)
    assert snapshot["mps"].startswith("MPS: on for GPU 0"), snapshot.get("mps")
    script = shared_dir / "allocate.py"
    script.write_text(_ALLOCATE)
    script.chmod(0o644)
    run = ("run", "--gpu-mem", "1G", "--", sys.executable, str(script))
    within = broker.spawn(ALICE, *run, "256", "20")
    over = broker.spawn(ALICE, *run, "2048", "0")
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


def test_another_users_job_on_the_same_gpu_runs_without_mps_and_does_not_wait(
    mps_broker, shared_dir, unix_users
) -> None:
    """One MPS server serves one user: bob's job beside alice's MPS client is not made a
    client (it would wait for her server to go); it starts at once, without the limit."""
    broker, base = mps_broker
    script = shared_dir / "allocate.py"
    script.write_text(_ALLOCATE)
    script.chmod(0o644)
    run = ("run", "--gpu-mem", "1G", "--", sys.executable, str(script))
    alice = broker.spawn(ALICE, *run, "256", "30")
    try:
        assert alice.stdout is not None
        assert alice.stdout.readline().startswith(f"env {mps.folders(str(base), 0)[0]} ")
        bob = broker.spawn(BOB, *run, "256", "0")
        out, err = bob.communicate(timeout=60)
        assert bob.returncode == 0 and "env - -" in out and "allocated" in out, (out, err)
        assert alice.poll() is None
    finally:
        if alice.poll() is None:
            alice.kill()
        alice.communicate(timeout=30)
