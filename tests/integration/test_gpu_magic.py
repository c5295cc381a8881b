"""`%%gpu` in real IPython kernels, as real Unix users, against a real broker."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from tests.support.users import need_module, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE, BOB = "gpl-alice", "gpl-bob"


def running(broker) -> list[dict]:
    result = broker.call(None, "status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["running"]


def plain(traceback: list[str]) -> str:
    """A traceback without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(traceback))


def queued(broker) -> list[dict]:
    return json.loads(broker.call(None, "status", "--json").stdout)["queue"]


@pytest.fixture
def broker(make_broker):
    return make_broker("--simulate-gpus", "1", "--kill-grace", "1s")


def test_variables_functions_classes_go_in_and_names_come_back(broker, kernels):
    k = kernels(ALICE, broker)
    setup = k.execute(
        "import numpy as np, threading\n"
        "n = 21\n"
        "arr = np.arange(2_000_000, dtype=np.float64)\n"
        "def double(v):\n    return v * 2\n"
        "class Point:\n    def __init__(self, x): self.x = x\n    def norm(self): return abs(self.x)\n"
        "p = Point(-3)\n"
        "lock = threading.Lock()\n"
    )
    assert setup.status == "ok"
    cell = k.execute(
        "%%gpu\n"
        "import os\n"
        "total = double(n)\n"
        "s = float(arr.sum())\n"
        "q = Point(p.norm() + 1)\n"
        "doubled = arr * 2\n"
        "try:\n    lock\nexcept NameError:\n    print('no lock on the worker')\n"
        "who = os.environ['GPULANE_JOB_ID']\n"
    )
    assert cell.status == "ok", cell.messages
    assert "lock is not sent to the GPU worker (it cannot be pickled" in cell.stream("stderr")
    assert "no lock on the worker" in cell.stream()
    check = k.execute("print(total, s, q.x, type(q).__name__, doubled[-1], who.isdigit())")
    assert check.stream().split() == [
        "42",
        str(float(sum(range(2_000_000)))),
        "4",
        "Point",
        "3999998.0",
        "True",
    ]
    # Only names the cell assigned come back; the rest of the notebook is untouched.
    assert k.execute("print(n, p.x)").stream().split() == ["21", "-3"]


def test_output_streams_before_the_cell_ends_and_text_plain_everywhere(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute(
        "%%gpu\nimport time\nprint('first', flush=True)\ntime.sleep(1.5)\nprint('second')"
    )
    assert cell.status == "ok"
    times = {
        c["text"].strip(): t
        for t, kind, c in cell.messages
        if kind == "stream" and c["text"].strip()
    }
    assert times["second"] - times["first"] > 1.0, times
    displays = cell.of_type("display_data", "update_display_data")
    assert displays and all(
        "text/plain" in d["data"] and "text/html" in d["data"] for d in displays
    )


def test_queue_card_shows_position_holder_and_eta_while_another_user_holds_the_gpu(broker, kernels):
    holder = broker.spawn(BOB, "run", "--name", "bobs", "--time", "10m", "--", "sleep", "3")
    wait_for(lambda: [j["name"] for j in running(broker)] == ["bobs"], what="bob holds the GPU")
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu\nprint('alice got the GPU')", timeout=60)
    assert cell.status == "ok"
    texts = "\n".join(cell.texts())
    assert "position 1 in the queue" in texts
    assert f"GPU 0: {BOB}, running" in texts and "left" in texts
    assert "starts by" in texts
    updates = cell.of_type("update_display_data")
    assert len(updates) >= 2 and all("text/html" in u["data"] for u in updates)
    assert "alice got the GPU" in cell.stream()
    holder.communicate(timeout=30)


def test_interrupt_while_queued_withdraws_and_keeps_state(broker, kernels):
    holder = broker.spawn(BOB, "run", "--name", "bobs", "--", "sleep", "30")
    wait_for(lambda: running(broker), what="bob holds the GPU")
    k = kernels(ALICE, broker)
    k.execute("keep = 'intact'")
    msg_id = k.submit("%%gpu\nkeep = 'overwritten'")
    k.wait_for_output(msg_id, "waits for a GPU")
    assert [j["user"] for j in queued(broker)] == [ALICE]
    k.km.interrupt_kernel()
    result = k.collect(msg_id)
    assert result.status == "error" and result.reply["ename"] == "KeyboardInterrupt"
    assert queued(broker) == []
    assert k.execute("print(keep)").stream().strip() == "intact"
    holder.send_signal(signal.SIGINT)
    holder.communicate(timeout=30)


def test_interrupt_while_running_stops_frees_and_keeps_output(broker, kernels):
    k = kernels(ALICE, broker)
    k.execute("keep = 1")
    msg_id = k.submit("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(60)\nkeep = 2")
    k.wait_for_output(msg_id, "started")
    stopped_at = time.monotonic()
    k.km.interrupt_kernel()
    result = k.collect(msg_id, timeout=30)
    assert time.monotonic() - stopped_at < 10
    assert result.status == "error" and result.reply["ename"] == "KeyboardInterrupt"
    wait_for(lambda: running(broker) == [], what="the GPU to be freed")
    assert k.execute("print(keep)").stream().strip() == "1"


def test_time_limit_stops_the_cell_with_a_clear_message(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute(
        "%%gpu --time 2s\nimport time\nprint('working', flush=True)\ntime.sleep(60)", timeout=30
    )
    assert "working" in cell.stream()
    assert cell.status == "error" and cell.reply["ename"] == "GPUTimeLimit"
    assert "GPU time limit 00:02 reached; ask for more with --time" in cell.reply["evalue"]
    assert any("timeout" in text for text in cell.texts())
    assert running(broker) == []


def test_a_killed_kernel_frees_the_gpu(broker, kernels):
    k = kernels(ALICE, broker)
    msg_id = k.submit("%%gpu\nimport time\nprint('holding', flush=True)\ntime.sleep(300)")
    k.wait_for_output(msg_id, "holding")
    assert [j["user"] for j in running(broker)] == [ALICE]
    os.kill(k.pid, signal.SIGKILL)
    wait_for(
        lambda: running(broker) == [], timeout=10, what="the GPU to be freed after the kernel died"
    )


def test_background_cell_returns_at_once_and_names_arrive(broker, kernels):
    k = kernels(ALICE, broker)
    started = time.monotonic()
    cell = k.execute("%%gpu --bg\nimport time\ntime.sleep(1.5)\nanswer = 6 * 7\nprint('bg done')")
    assert cell.status == "ok" and time.monotonic() - started < 1.0
    # The notebook stays usable while it runs.
    assert k.execute("print('cpu work')").stream().strip() == "cpu work"
    waited = k.execute("%gpu wait")
    assert waited.status == "ok", waited.messages
    assert "set answer" in waited.stream()
    assert k.execute("print(answer)").stream().strip() == "42"

    second = k.execute("%%gpu --bg\nother = 'arrived'")
    assert second.status == "ok"
    wait_for(lambda: not running(broker) and not queued(broker), what="the background job to end")
    time.sleep(0.5)
    # Finished background results are set before the next cell runs.
    assert k.execute("print(other)").stream().strip().endswith("arrived")


def test_session_keeps_state_and_is_released_when_idle(broker, kernels):
    k = kernels(ALICE, broker)
    start = k.execute("%gpu session start --idle 3s")
    assert start.status == "ok", start.messages
    assert any("GPU session" in t and "holds GPU 0" in t for t in start.texts())
    first = k.execute("%%gpu --session --no-return\nweights = [1]\nprint('loaded')")
    assert first.status == "ok" and "loaded" in first.stream()
    second = k.execute("%%gpu --session\nweights.append(2)\ncount = len(weights)")
    assert second.status == "ok", second.messages
    assert k.execute("print(count)").stream().strip() == "2"
    assert [j["user"] for j in running(broker)] == [ALICE]
    wait_for(lambda: running(broker) == [], timeout=15, what="the idle session to be released")
    after = k.execute("%%gpu --session\nprint('x')")
    assert "no GPU session is running" in after.stream("stderr")


def test_bad_options_one_line_nothing_submitted(broker, kernels):
    k = kernels(ALICE, broker)
    for line, expected in {
        "%%gpu --gpus x": "--gpus 'x' must be a whole number from 1 to 64",
        "%%gpu time=soon": "--time 'soon' is not a time limit",
        "%%gpu --gpus 1 --slices 1": "not allowed with argument",
        "%%gpu --return 1x": "is not a Python name",
        "%%gpu --frobnicate": "unrecognized arguments: --frobnicate",
    }.items():
        result = k.execute(f"{line}\nprint('ran')")
        err = result.stream("stderr")
        assert expected in err, (line, err)
        assert len(err.strip().splitlines()) == 1, err
        assert "ran" not in result.stream()
    assert queued(broker) == [] and running(broker) == []
    help_text = k.execute("%gpu --help").stream()
    assert "--slices" in help_text and "--bg" in help_text


def test_seed_style_options_and_comments_above_the_magic(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("# a comment first\n%%gpu time=00:05:00 mem=1G\nprint('seed form works')")
    assert cell.status == "ok", cell.messages
    assert "seed form works" in cell.stream()
    assert any("time limit 05:00" in t for t in cell.texts())


def test_errors_point_at_the_users_cell(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu\nx = 1\ny = x / 0\n")
    error = cell.error()
    assert error is not None and error["ename"] == "ZeroDivisionError"
    trace = plain(error["traceback"])
    assert "y = x / 0" in trace and "line 2" in trace
    assert "gpulane" not in trace
    assert running(broker) == []


def test_rich_output_dataframe_and_figure(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute(
        "%%gpu\n"
        "import pandas as pd, matplotlib.pyplot as plt\n"
        "display(pd.DataFrame({'a': [1, 2]}))\n"
        "plt.plot([1, 2, 3])\n"
        "plt.show()\n"
        "pd.Series([7])\n",
        timeout=90,
    )
    assert cell.status == "ok", cell.messages
    datas = [c["data"] for c in cell.of_type("display_data")]
    assert any("text/html" in d and "<table" in d["text/html"] for d in datas)
    assert any("image/png" in d for d in datas)
    # The last expression is the cell's result (Out), as in a plain kernel.
    (result,) = cell.of_type("execute_result")
    assert "0    7" in result["data"]["text/plain"]


def test_torch_tensors_and_modules_come_back_on_the_cpu_with_memory_caps(make_broker, kernels):
    need_module("torch")
    broker = make_broker("--simulate-gpus", "1", "--gpu-memory", "16G", "--slices", "2")
    k = kernels(ALICE, broker)
    cell = k.execute(
        "%%gpu --slices 1\n"
        "import os, torch\n"
        "from gpulane.kernel import memory_caps\n"
        "t = torch.ones(3) * 2\n"
        "m = torch.nn.Linear(2, 1)\n"
        "caps = list(memory_caps.applied)\n"
        "xla = os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']\n"
        "limit = os.environ['GPULANE_GPU_MEMORY_LIMIT']\n",
        timeout=120,
    )
    assert cell.status == "ok", cell.messages
    out = k.execute(
        "print(t.device, t.sum().item(), next(m.parameters()).device, xla, limit); print(caps)"
    )
    first, second = out.stream().strip().splitlines()
    assert first.split() == ["cpu", "6.0", "cpu", "0.5000", str(8 * 1024**3)]
    assert "torch: no CUDA device visible, nothing to cap" in second


# The cells of seed 000's "Testing Procedures", as written. Without a GPU they must fail
# only in the user's own code, clearly.
SEED_TEST_1 = """%%gpu
import subprocess
result = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                       capture_output=True, text=True)
print(f"GPU: {result.stdout}")
# Output: NVIDIA GeForce RTX 3070 Ti
"""
SEED_TEST_2 = """%%gpu
import torch
print(f"PyTorch: {torch.__version__}")
print(f"CUDA available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}")
    x = torch.randn(100, 100).cuda()
    print(f"Tensor sum: {x.sum().item():.2f}")
"""
SEED_TEST_3_USER1 = """%%gpu time=00:02:00
import time
import torch
print(f"User1: Starting 60-second GPU job")
print(f"GPU: {torch.cuda.get_device_name(0)}")
for i in range(6):
    print(f"  [{i*10}s] Still using GPU...")
    time.sleep(10)
print("User1: Job complete!")
"""
SEED_TEST_3_USER2 = """%%gpu
import torch
print(f"User2: Got GPU access!")
print(f"GPU: {torch.cuda.get_device_name(0)}")
# This queues and shows "GPU is currently busy" message
# Runs automatically when User 1 completes
"""
SEED_TEST_4 = """# This runs immediately without %%gpu
import time
print(f"CPU work at {time.strftime('%H:%M:%S')}")
# Executes without waiting for GPU
"""
SEED_TEST_5 = """# Start a long GPU job
%%gpu time=00:05:00
import time
for i in range(100):
    print(f"Iteration {i}")
    time.sleep(1)
"""


def test_seed_000_testing_procedures_as_written(broker, kernels):
    need_module("torch")
    alice, bob = kernels(ALICE, broker), kernels(BOB, broker)
    one = alice.execute(SEED_TEST_1)
    assert one.error()["ename"] == "FileNotFoundError" and "nvidia-smi" in one.error()["evalue"]
    assert "subprocess.run" in plain(one.error()["traceback"])
    two = alice.execute(SEED_TEST_2, timeout=120)
    assert two.status == "ok" and "CUDA available: False" in two.stream()

    three_a = alice.submit(SEED_TEST_3_USER1)
    alice.wait_for_output(three_a, "User1: Starting")
    three_b = bob.submit(SEED_TEST_3_USER2)
    four = kernels(BOB, broker)  # bob's second notebook: CPU work never waits
    cpu = four.execute(SEED_TEST_4)
    assert cpu.status == "ok" and "CPU work at" in cpu.stream()
    first, second = alice.collect(three_a, 120), bob.collect(three_b, 120)
    for result in (
        first,
        second,
    ):  # torch.cuda.get_device_name fails in the user's code, without a GPU
        assert result.error() is not None and "get_device_name" in plain(
            result.error()["traceback"]
        )
    assert "User2: Got GPU access!" in second.stream()

    five = alice.submit(SEED_TEST_5)
    printed = alice.wait_for_output(five, "Iteration 2")
    alice.km.interrupt_kernel()
    stopped = alice.collect(five, 30)
    assert stopped.reply["ename"] == "KeyboardInterrupt"
    assert "Iteration 0" in "".join(c.get("text", "") for _, kind, c in printed if kind == "stream")
    wait_for(lambda: running(broker) == [], what="the GPU to be freed")


def test_status_cancel_and_transfer_limit_from_the_notebook(broker, kernels):
    alice, bob = kernels(ALICE, broker), kernels(BOB, broker)
    big = alice.execute("import numpy as np\nbig = np.zeros(1_000_000)")
    assert big.status == "ok"
    refused = alice.execute("%%gpu --max-transfer 1M\nprint(big.sum())")
    err = refused.stream("stderr").strip()
    assert (
        "over the 1.0 MiB transfer limit (biggest: big (7.6 MiB" in err and "--max-transfer" in err
    )
    assert len(err.splitlines()) == 1 and queued(broker) == [] and running(broker) == []

    started = alice.execute("%%gpu --bg --name longjob\nimport time\ntime.sleep(60)")
    assert started.status == "ok"
    wait_for(lambda: [j["name"] for j in running(broker)] == ["longjob"], what="the bg job to run")
    table = bob.execute("%gpu status").stream()
    assert (
        "longjob" not in table and "job " in table and ALICE in table
    )  # owner visible, not its code
    job_id = running(broker)[0]["id"]
    refused_cancel = bob.execute(f"%gpu cancel {job_id}").stream("stderr")
    assert f"no job {job_id}" in refused_cancel and ALICE not in refused_cancel
    cancelled = alice.execute("%gpu cancel")
    assert f"job {job_id}: being stopped" in cancelled.stream()
    wait_for(lambda: running(broker) == [], what="the cancelled job to free the GPU")
