"""The GPU paths for real: PyTorch on CUDA through `%%gpu`, NVML readings, memory caps on slices.

These run only where an NVIDIA GPU and a CUDA build of PyTorch exist (CI machines
have neither; the CPU-side paths are covered by test_gpu_magic.py). Run them on a
GPU machine with: bash scripts/test.sh -m cuda
"""

from __future__ import annotations

import json

import pytest


def _cuda_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        if pynvml.nvmlDeviceGetCount() == 0:
            return False
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.usefixtures("unix_users"),
    pytest.mark.skipif(
        not _cuda_available(), reason="no NVIDIA GPU with a CUDA build of PyTorch here"
    ),
]

ALICE, BOB = "gpl-alice", "gpl-bob"


def _device_args() -> list[str]:
    """Enforce GPU device access where the driver lets it hold; elsewhere (the driver's
    default resets the files open) a root broker would refuse to start: turn it off."""
    from gpulane.broker import nvidia_driver

    live = nvidia_driver.live_params()
    return ["--no-enforce-devices"] if live and nvidia_driver.resets_open(live) else []


DEVICES = _device_args()


def test_status_reads_the_gpus_through_nvml(make_broker):
    broker = make_broker(*DEVICES)  # no --simulate-gpus: NVML
    snapshot = json.loads(broker.call(None, "status", "--json").stdout)
    gpu = snapshot["gpus"][0]
    assert not gpu["simulated"] and gpu["memory_total"] > 0 and gpu["utilization"] is not None


def test_a_cell_computes_on_cuda_and_tensors_come_back_on_the_cpu(make_broker, kernels):
    broker = make_broker(*DEVICES)
    k = kernels(ALICE, broker)
    cell = k.execute(
        "%%gpu\nimport torch\nx = torch.randn(1024, 1024, device='cuda')\ny = (x @ x).sum()\n"
        "name = torch.cuda.get_device_name(0)\nprint('on', name)",
        timeout=300,
    )
    assert cell.status == "ok", cell.messages
    out = k.execute("print(y.device, type(name).__name__)").stream().split()
    assert out == ["cpu", "str"]


def test_two_users_share_a_card_in_slices_with_memory_caps(make_broker, kernels):
    broker = make_broker("--slices", "2", *DEVICES)
    alice, bob = kernels(ALICE, broker), kernels(BOB, broker)
    cap_cell = (
        "%%gpu --slices 1\nimport torch, os\n"
        "limit = int(os.environ['GPULANE_GPU_MEMORY_LIMIT'])\n"
        "try:\n    big = torch.empty(int(limit * 1.2) // 4, dtype=torch.float32, device='cuda')\n"
        "    capped = False\nexcept torch.cuda.OutOfMemoryError:\n    capped = True\n"
    )
    first = alice.submit(cap_cell)
    second = bob.submit(cap_cell)
    for kernel, msg_id in ((alice, first), (bob, second)):
        result = kernel.collect(msg_id, timeout=300)
        assert result.status == "ok", result.messages
        assert kernel.execute("print(capped)").stream().strip() == "True"
