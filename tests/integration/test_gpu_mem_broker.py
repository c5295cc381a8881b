"""--gpu-mem through a real broker and real `gpulane run` clients as real Unix users:
placement on a simulated GPU of a given size, the refusal, the caps in the command's
environment (issue 14)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.users import wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"
GiB = 1024**3


def status(broker, user: str | None = None) -> dict:
    result = broker.call(user, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def test_gpu_mem_jobs_share_a_simulated_card_with_their_caps(make_broker, shared_dir):
    broker = make_broker("--simulate-gpus", "1", "--gpu-memory", "16G", "--gpu-mem-reserve", "1G")
    script = (
        'echo "$GPULANE_GPU_MEMORY_LIMIT $XLA_PYTHON_CLIENT_MEM_FRACTION" > {d}/$(id -un).caps; '
        "touch {d}/$(id -un).up; "
        "for i in $(seq 150); do [ -e {d}/{other}.up ] && exit 0; sleep 0.1; done; exit 9"
    )
    alice = broker.spawn(
        ALICE, "run", "--gpu-mem", "10G", "--", "sh", "-c", script.format(d=shared_dir, other=BOB)
    )
    bob = broker.spawn(
        BOB, "run", "--gpu-mem", "5G", "--", "sh", "-c", script.format(d=shared_dir, other=ALICE)
    )
    # Both run at once on GPU 0 (10 + 5 of the 15 GiB it offers): each waits for the other.
    assert finish(alice)[0] == 0
    assert finish(bob)[0] == 0
    assert (shared_dir / f"{ALICE}.caps").read_text().split() == [str(10 * GiB), "0.6250"]
    assert (shared_dir / f"{BOB}.caps").read_text().split() == [str(5 * GiB), "0.3125"]
    # What does not fit now waits; what can never fit is refused in one line.
    holder = broker.spawn(ALICE, "run", "--gpu-mem", "12G", "--name", "big", "--", "sleep", "3")
    wait_for(lambda: [j["name"] for j in status(broker)["running"]] == ["big"], what="big runs")
    small = broker.spawn(BOB, "run", "--gpu-mem", "4G", "--name", "small", "--", "true")
    wait_for(lambda: [j["name"] for j in status(broker)["queue"]] == ["small"], what="queued")
    holders = status(broker, BOB)["gpus"][0]["holders"]
    assert [(h["user"], h["gpu_mem"]) for h in holders] == [(ALICE, 12 * GiB)]
    refused = broker.call(BOB, "run", "--gpu-mem", "16G", "--", "true")
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "16.0 GiB" in lines[0] and "15.0 GiB" in lines[0], refused.stderr
    for proc in (holder, small):
        assert finish(proc)[0] == 0
