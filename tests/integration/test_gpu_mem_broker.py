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


def _readings(path, entries: list[tuple[int, int, int]]) -> None:
    """Feed the broker's watchdog (--gpu-readings): what NVML would report."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps([{"gpu": g, "pid": p, "used": u} for g, p, u in entries]))
    tmp.replace(path)  # the broker never reads half a file


def _pid(path) -> int:
    wait_for(lambda: path.exists() and path.read_text().strip(), what=f"{path.name}")
    return int(path.read_text())


def test_the_watchdog_warns_ends_a_job_over_its_memory_and_ends_strays(make_broker, shared_dir):
    readings = shared_dir / "readings.json"
    broker = make_broker(
        "--simulate-gpus", "1", "--gpu-memory", "16G", "--gpu-readings", str(readings),
        "--memory-watch-grace", "3s", "--gpu-mem-slack", "0", "--stray-gpu-processes", "end",
    )  # fmt: skip
    # A child in each job's process group is what uses the GPU.
    job = "sleep 60 & echo $! > {d}/{n}.pid; wait"
    over = broker.spawn(
        ALICE, "run", "--gpu-mem", "8G", "--name", "over", "--", "sh", "-c",
        job.format(d=shared_dir, n="over"),
    )  # fmt: skip
    under = broker.spawn(
        BOB, "run", "--gpu-mem", "4G", "--name", "under", "--", "sh", "-c",
        job.format(d=shared_dir, n="under"),
    )  # fmt: skip
    over_pid, under_pid = _pid(shared_dir / "over.pid"), _pid(shared_dir / "under.pid")
    # Outside the queue: carol's own process, in a session of its own.
    stray = subprocess.Popen(["setpriv", "--reuid=gpl-carol", "--regid=gpl-carol",
                              "--init-groups", "--", "setsid", "sleep", "60"])  # fmt: skip
    _readings(readings, [(0, over_pid, 10 * GiB), (0, under_pid, 3 * GiB), (0, stray.pid, GiB)])
    # The warning reaches `gpulane run`'s output while the job still runs ...
    wait_for(lambda: stray.poll() is not None, what="the stray process ended")
    snapshot = status(broker, BOB)
    assert [(s["pid"], s["user"], s["ended"]) for s in snapshot["strays"]] == [
        (stray.pid, "gpl-carol", True)
    ]
    holders = {h["user"]: h for h in snapshot["gpus"][0]["holders"]}
    assert (holders[BOB]["gpu_mem_used"], holders[BOB]["gpu_mem"]) == (3 * GiB, 4 * GiB)
    assert holders[ALICE]["gpu_mem_used"] == 10 * GiB
    text = broker.call(BOB, "status").stdout
    assert "GPU memory 3.0 GiB of 4.0 GiB" in text and "outside the queue" in text, text
    # ... and after the grace the job is ended, with the same words.
    code, _, err = finish(over)
    said = "your job uses 10.0 GiB of the 8.0 GiB of GPU memory it was given"
    warned = [line for line in err.splitlines() if said in line]
    assert code != 0 and len(warned) >= 2, err  # the warning, then the end
    assert "failed: ended by the GPU memory watchdog: " + said in err, err
    assert under.poll() is None, "the neighbour under its grant was ended too"
    running = status(broker, BOB)["running"]
    assert [j["name"] for j in running] == ["under"]
    assert "job" in broker.log_text() and said in broker.log_text()
    broker.call(BOB, "cancel", str(running[0]["id"]))
    finish(under)


def test_a_gpu_mem_cell_is_capped_warned_on_its_card_and_ended(make_broker, kernels, shared_dir):
    """%%gpu --gpu-mem in a real kernel as a real user: the worker's caps come from the
    memory given; the watchdog (fed readings) warns on the card, then ends the cell."""
    readings = shared_dir / "cell-readings.json"
    broker = make_broker(
        "--simulate-gpus", "1", "--gpu-memory", "16G", "--gpu-readings", str(readings),
        "--memory-watch-grace", "2s", "--gpu-mem-slack", "0",
    )  # fmt: skip
    k = kernels(ALICE, broker)
    pid_file = shared_dir / "cell.pid"
    msg_id = k.submit(
        "%%gpu --gpu-mem 4G\n"
        "import os, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print(os.environ['GPULANE_GPU_MEMORY_LIMIT'], os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION'])\n"
        "time.sleep(60)\n"
    )
    pid = _pid(pid_file)
    _readings(readings, [(0, pid, 5 * GiB)])
    cell = k.collect(msg_id, timeout=90)
    assert cell.stream().split()[:2] == [str(4 * GiB), "0.2500"], cell.messages
    said = "your job uses 5.0 GiB of the 4.0 GiB of GPU memory it was given"
    texts = " ".join(cell.texts())
    assert f"warning: {said}" in texts, texts  # the card, while it still ran
    assert f"ended by the GPU memory watchdog: {said}" in texts, texts
    assert cell.status == "error"
