"""The fork server on a real GPU: it never creates a CUDA context; the cell's child does.

Run on a GPU machine with: bash scripts/test.sh -m cuda
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.integration.test_cuda import _cuda_available
from tests.integration.test_fork_server import SPARE_MODULES, WHO, fork_servers, who

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.usefixtures("unix_users"),
    pytest.mark.skipif(
        not _cuda_available(), reason="no NVIDIA GPU with a CUDA build of PyTorch here"
    ),
]

ALICE = "gpl-alice"


def cuda_pids() -> set[int]:
    """Processes with a CUDA context, as NVML reports them."""
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {int(p) for p in re.findall(r"\d+", out)}


def test_the_fork_server_never_holds_a_cuda_context_and_its_child_does(make_broker, kernels):
    broker = make_broker()  # NVML
    k = kernels(ALICE, broker)
    assert k.execute("import torch").status == "ok"
    assert "'torch'" in k.execute(SPARE_MODULES, timeout=300).stream()
    (server,) = fork_servers(k.pid)
    assert server not in cuda_pids()
    msg_id = k.submit(
        "%%gpu\n" + WHO + "import time, torch\nx = torch.ones(1, device='cuda')\n"
        "print('on cuda', flush=True)\ntime.sleep(30)"
    )
    seen = k.wait_for_output(msg_id, "on cuda", timeout=120)
    text = "".join(c.get("text", "") for _, kind, c in seen if kind == "stream")
    child = int(who(text)["pid"])
    assert who(text)["torch"] == "True" and int(who(text)["parent"]) == server
    holders = cuda_pids()
    assert child in holders and server not in holders
    k.km.interrupt_kernel()
    k.collect(msg_id, timeout=60)
    assert server not in cuda_pids() and child not in cuda_pids()
