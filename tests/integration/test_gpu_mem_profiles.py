"""A GPU profile asking for GPU memory (gpu_mem) through a real hub and its broker: two
users' servers share one simulated 16 GiB GPU, each capped to its 6 GiB (issue 14)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hubclient import logged_in, server_ready
from tests.support.hubs import profile_spawner_config, running_demo_hub

ADA, BEN = "gpl-demo-ada", "gpl-demo-ben"
GiB = 1024**3

PROFILES = """
[gpu]
memory = "16G"

[[profile]]
slug = "cpu"
display_name = "CPU only"
default = true

[[profile]]
slug = "part"
display_name = "6 GiB of a GPU"
gpu_mem = "6G"
"""


@pytest.fixture(scope="module")
def profile_hub(unix_users) -> Iterator[tuple[str, dict[str, str], Path]]:
    with running_demo_hub(
        "gpulane-gpu-mem-", lambda state: profile_spawner_config(state, PROFILES)
    ) as hub:
        yield hub.url, hub.passwords, hub.state


def test_two_gpu_mem_servers_share_one_gpu_each_capped(profile_hub):
    url, passwords, state = profile_hub
    ada, ben = logged_in(url, passwords, ADA), logged_in(url, passwords, BEN)
    try:
        for user in (ada, ben):
            started = user.api("POST", f"/users/{user.name}/server", json={"profile": "part"})
            assert started.status_code in (201, 202), started.text
        deadline = time.monotonic() + 120
        while not (server_ready(ada) and server_ready(ben)):  # both at once: 6 + 6 of 16
            log = (state / "jupyterhub.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, f"both servers never ran together: {log}"
            time.sleep(0.5)
        kernel = ben.new_kernel()
        cell = ben.run(
            kernel,
            "import os\nprint(os.environ['CUDA_VISIBLE_DEVICES'], "
            "os.environ['GPULANE_GPU_MEMORY_LIMIT'], os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])",
        )
        assert cell.stream().split() == ["0", str(6 * GiB), "0.3750"], cell.messages
    finally:
        for user in (ada, ben):
            user.api("DELETE", f"/users/{user.name}/server")
            user.close()
