"""The fork server in real kernels, as real users, against a real broker: each `%%gpu` cell runs
in a child forked from a pre-started worker parent holding the notebook's modules."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

from tests.support.users import need_module, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE = "gpl-alice"
# A plain cell that waits until the kernel's next forked worker exists and prints its modules.
SPARE_MODULES = (
    "_pool = get_ipython().magics_manager.registry['GpuMagics'].pool\n"
    "print(sorted(_pool.spare_modules(120) or []))"
)
# The first lines of a %%gpu cell: who forked it, and what was imported before its code ran.
WHO = (
    "import os, sys\n"
    "print('pid', os.getpid(), 'parent', os.getppid(), 'leader', os.getpgid(0) == os.getpid(),"
    " 'torch', 'torch' in sys.modules, flush=True)\n"
)


def running(broker) -> list[dict]:
    return json.loads(broker.call(None, "status", "--json").stdout)["running"]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def fork_servers(kernel_pid: int) -> list[int]:
    """The fork server processes whose parent is this kernel."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and "gpulane.kernel.forkserver" in cmdline(int(entry.name)):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == kernel_pid:
                found.append(int(entry.name))
    return found


def who(text: str) -> dict[str, str]:
    found = re.search(r"pid (\d+) parent (\d+) leader (\w+) torch (\w+)", text)
    assert found, text
    return dict(zip(("pid", "parent", "leader", "torch"), found.groups(), strict=True))


def assert_a_new_fork_server_forks_the_next_cell(kernel, old_server: int) -> None:
    """A fork server started on demand (the old one gone) forks the next cell."""
    again = kernel.execute("%%gpu\n" + WHO, timeout=60)
    (new_server,) = fork_servers(kernel.pid)
    assert new_server != old_server and who(again.stream())["parent"] == str(new_server)


@pytest.fixture
def broker(make_broker):
    return make_broker("--simulate-gpus", "1", "--kill-grace", "1s")


def test_a_cell_runs_in_a_child_of_the_fork_server_that_leads_its_group(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu\n" + WHO)
    assert cell.status == "ok", cell.messages
    seen = who(cell.stream())
    (server,) = fork_servers(k.pid)
    assert int(seen["parent"]) == server and seen["leader"] == "True"
    assert not Path(f"/proc/{seen['pid']}").exists()  # the cell's process has ended
    assert running(broker) == []


def test_preloaded_torch_still_gets_the_memory_cap_on_a_slice(make_broker, kernels):
    need_module("torch")
    broker = make_broker("--simulate-gpus", "1", "--gpu-memory", "16G", "--slices", "2")
    k = kernels(ALICE, broker)
    assert k.execute("import torch").status == "ok"
    # The kernel imported torch: the fork server imports it in the background, and the next
    # worker is forked after that.
    assert "'torch'" in k.execute(SPARE_MODULES, timeout=150).stream()
    cell = k.execute(
        "%%gpu --slices 1\n" + WHO + "import torch\n"
        "from gpulane.kernel import memory_caps\n"
        "caps = list(memory_caps.applied)\n"
        "limit = os.environ['GPULANE_GPU_MEMORY_LIMIT']\n",
        timeout=120,
    )
    assert cell.status == "ok", cell.messages
    assert who(cell.stream())["torch"] == "True"  # imported before the cell's first line
    out = k.execute("print(limit); print(caps)").stream().strip().splitlines()
    assert out[0] == str(8 * 1024**3)
    # The cap reached the already imported torch (without a GPU it says there is none to cap).
    assert "torch: no CUDA device visible, nothing to cap" in out[1]


def test_a_forked_cell_can_fork_and_use_threads(broker, kernels):
    need_module("numpy")
    k = kernels(ALICE, broker)
    assert k.execute("import numpy").status == "ok"
    assert "'numpy'" in k.execute(SPARE_MODULES, timeout=150).stream()
    cell = k.execute(
        "%%gpu\n" + WHO + "import numpy as np, threading, subprocess, multiprocessing\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "a = np.ones((400, 400)); print('matmul', float((a @ a)[0, 0]), flush=True)\n"
        "with ThreadPoolExecutor(4) as pool:\n"
        "    print('threads', sum(pool.map(lambda x: x * 2, range(10))), flush=True)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('in the grandchild', float((a @ a)[1, 1]), flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print(subprocess.run(['echo', 'from a subprocess'], capture_output=True, text=True).stdout,"
        " end='')\n"
        "ctx = multiprocessing.get_context('fork')\n"
        "with ctx.Pool(2) as procs:\n"
        "    print('pool', procs.map(abs, [-1, -2]), flush=True)\n",
        timeout=120,
    )
    assert cell.status == "ok", cell.messages
    text = cell.stream()
    assert who(text)["parent"] == str(fork_servers(k.pid)[0])
    for line in (
        "matmul 400.0",
        "threads 90",
        "in the grandchild 400.0",
        "from a subprocess",
        "pool [1, 2]",
    ):
        assert line in text, text


def test_interrupt_and_time_limit_stop_a_forked_child(broker, kernels):
    k = kernels(ALICE, broker)
    msg_id = k.submit("%%gpu\n" + WHO + "import time\nprint('ready', flush=True)\ntime.sleep(60)")
    seen = k.wait_for_output(msg_id, "ready")
    text = "".join(c.get("text", "") for _, kind, c in seen if kind == "stream")
    child = int(who(text)["pid"])
    assert int(who(text)["parent"]) in fork_servers(k.pid)
    k.km.interrupt_kernel()
    interrupted = k.collect(msg_id, timeout=30)
    assert interrupted.status == "error", interrupted.messages
    wait_for(lambda: not Path(f"/proc/{child}").exists(), what="the forked child to end")
    wait_for(lambda: running(broker) == [], what="the GPU to be freed")

    started = time.monotonic()
    limited = k.execute("%%gpu --time 2s\n" + WHO + "import time\ntime.sleep(30)", timeout=40)
    assert limited.status == "error" and limited.reply["ename"] == "GPUTimeLimit", limited.reply
    assert time.monotonic() - started < 20
    assert not Path(f"/proc/{who(limited.stream())['pid']}").exists()
    assert k.execute("%%gpu\nprint('next')").stream().strip() == "next"


def test_the_fork_server_killed_the_next_cell_still_runs(broker, kernels):
    k = kernels(ALICE, broker)
    first = k.execute("%%gpu\n" + WHO)
    (server,) = fork_servers(k.pid)
    assert who(first.stream())["parent"] == str(server)
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: server not in fork_servers(k.pid), what="the fork server to go")
    cell = k.execute("%%gpu\n" + WHO + "print('still runs')", timeout=60)
    assert cell.status == "ok", cell.messages
    assert "still runs" in cell.stream()
    assert_a_new_fork_server_forks_the_next_cell(k, server)


def test_the_gpu_is_freed_the_moment_a_forked_child_ends(broker, kernels):
    k = kernels(ALICE, broker)
    msg_id = k.submit("%%gpu\n" + WHO + "import time\nprint('ready', flush=True)\ntime.sleep(60)")
    seen = k.wait_for_output(msg_id, "ready")
    text = "".join(c.get("text", "") for _, kind, c in seen if kind == "stream")
    child = int(who(text)["pid"])
    assert len(running(broker)) == 1
    os.kill(child, signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: running(broker) == [], what="the GPU to be freed", timeout=5)
    freed_after = time.monotonic() - killed
    assert freed_after < 1.0, f"the job ended {freed_after:.2f} s after its process"
    cell = k.collect(msg_id, timeout=30)
    assert cell.status == "error" and cell.reply["ename"] == "WorkerKilled", cell.reply


def test_without_the_fork_server_a_cell_is_a_fresh_python(broker, kernels):
    k = kernels(ALICE, broker, {"GPULANE_FORKSERVER": "0"})
    cell = k.execute("%%gpu\n" + WHO)
    assert cell.status == "ok", cell.messages
    assert who(cell.stream())["parent"] == str(k.pid) and fork_servers(k.pid) == []


def test_an_idle_fork_server_exits_and_comes_back_for_the_next_cell(broker, kernels):
    k = kernels(ALICE, broker, {"GPULANE_FORKSERVER_IDLE": "2s"})
    first = k.execute("%%gpu\n" + WHO)
    assert first.status == "ok", first.messages
    (server,) = fork_servers(k.pid)
    # No cell for longer than its idle time: it exits by itself (and its spare child with it).
    wait_for(lambda: fork_servers(k.pid) == [], what="the idle fork server to exit", timeout=30)
    cell = k.execute("%%gpu\n" + WHO + "print('after idle')", timeout=60)
    assert cell.status == "ok", cell.messages
    assert "after idle" in cell.stream()
    assert_a_new_fork_server_forks_the_next_cell(k, server)


# A module that starts a thread when imported: forking a process holding it is unsafe.
THREAD_AT_IMPORT = (
    "import threading, time\n"
    "threading.Thread(target=time.sleep, args=(3600,), daemon=True).start()\n"
)


def test_a_module_unsafe_to_fork_is_named_and_the_cell_starts_clean(broker, kernels, request):
    modules = Path(tempfile.mkdtemp(prefix="gpl-modules-"))
    request.addfinalizer(lambda: shutil.rmtree(modules, ignore_errors=True))
    modules.chmod(0o755)  # the user's kernel and its fork server import from here
    (modules / "gpl_thread_at_import.py").write_text(THREAD_AT_IMPORT)
    (modules / "gpl_thread_at_import.py").chmod(0o644)
    k = kernels(ALICE, broker, {"PYTHONPATH": str(modules)})
    assert k.execute("%%gpu\n" + WHO).status == "ok"
    made = k.execute("import gpl_thread_at_import")
    assert made.status == "ok", made.messages
    # The fork server preloads what the notebook imported, finds the thread, says so and
    # exits; a cell after that says why, and runs.
    said = ""
    for _ in range(5):
        cell = k.execute("%%gpu\n" + WHO + "print('ran')", timeout=60)
        assert cell.status == "ok", cell.messages
        assert "ran" in cell.stream()
        said = cell.stream() + cell.stream("stderr")
        if "cannot fork safely" in said:
            break
        time.sleep(1)
    assert "importing gpl_thread_at_import started a Python thread" in said, said
    assert "no longer preloads it" in said
    # The next fork server leaves the module out and forks cells again.
    spare = k.execute(SPARE_MODULES, timeout=150).stream()
    assert "gpl_thread_at_import" not in spare and "[" in spare
    again = k.execute("%%gpu\n" + WHO, timeout=60)
    (server,) = fork_servers(k.pid)
    assert who(again.stream())["parent"] == str(server)
