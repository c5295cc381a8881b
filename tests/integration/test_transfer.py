"""Large arrays through `%%gpu` in a real kernel, as a real user, against a real broker:
intact both ways (checksums), writable, mapped rather than copied, and no spill file left."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE = "gpl-alice"
FLOATS = 32 * 2**20  # float64: 256 MiB each way


@pytest.fixture
def broker(make_broker):
    return make_broker("--simulate-gpus", "1")


def test_a_large_array_round_trips_intact_writable_and_leaves_no_spill_file(broker, kernels):
    k = kernels(ALICE, broker)
    setup = k.execute(
        "import hashlib, os, numpy as np\n"
        "def digest(a):\n    return hashlib.sha256(memoryview(np.ascontiguousarray(a))).hexdigest()\n"
        f"big = np.random.default_rng(1).random({FLOATS})\n"
        "sent = digest(big)\n"
        "expected = digest(big * 2)\n"
        "spill = get_ipython().magics_manager.registry['GpuMagics'].spill_dir\n"
        "def lent():\n    return [n for n in os.listdir(spill) if not n.startswith('pool-')]\n",
        timeout=120,
    )
    assert setup.status == "ok", setup.messages
    cell = k.execute(
        "%%gpu\n"
        "import hashlib\n"
        "seen = hashlib.sha256(memoryview(big)).hexdigest()\n"
        "writable = big.flags.writeable\n"
        "big *= 2\n"  # in place, on the worker: comes back as the cell's change
        f"made = np.arange({FLOATS}, dtype=np.float64)\n",
        timeout=180,
    )
    assert cell.status == "ok", cell.messages
    assert "could not" not in cell.stream("stderr"), cell.stream("stderr")
    check = k.execute(
        "print(seen == sent, writable, digest(big) == expected, big.flags.writeable,\n"
        f"      bool(made[-1] == {FLOATS - 1}), made.flags.writeable, lent())\n"
        "made[0] = -1\n"  # writable in the kernel too: a mapping of its own
        "print(made[0], made[1])\n",
        timeout=120,
    )
    assert check.status == "ok", check.messages
    first, second = check.stream().splitlines()
    assert first.split(maxsplit=6) == ["True", "True", "True", "True", "True", "True", "[]"]
    assert second == "-1.0 1.0"
    # The returned arrays are mapped from spill files that are already unlinked: nothing in the
    # folder, and the kernel's maps name them "(deleted)".
    maps = k.execute(
        "print(sum(1 for line in open('/proc/self/maps') if str(spill) in line and 'deleted' in line))"
    )
    assert int(maps.stream().strip()) >= 1
    # The kernel keeps the input's spill file (its pool) and writes the next input of the same
    # size into it, once the worker that mapped it is gone.
    pool = "get_ipython().magics_manager.registry['GpuMagics'].spill_pool"
    again = k.execute("%%gpu\nseen = float(big[:3].sum())", timeout=180)
    assert again.status == "ok", again.messages
    kept = k.execute(f"print(seen == float(big[:3].sum()), len({pool}._entries), lent())")
    assert kept.stream().split() == ["True", "1", "[]"]


def test_an_array_mutated_in_the_kernel_after_submit_does_not_reach_a_background_cell(
    broker, kernels
):
    """Inputs are a snapshot taken when the cell is submitted (written to the spill file)."""
    k = kernels(ALICE, broker)
    k.execute(f"import numpy as np\nbig = np.zeros({FLOATS // 8})")
    started = k.execute(
        "%%gpu --bg --name snap\nimport time\ntime.sleep(2)\ntotal = float(big.sum())"
    )
    assert started.status == "ok", started.messages
    k.execute("import time\ntime.sleep(1)\nbig += 1")  # the background cell runs meanwhile
    # The next cell's input has the same size: the kernel's spill pool must not write it into
    # the file the background cell's worker still maps (the pool's reuse test: a write lease).
    after = k.execute("%%gpu\nafter = float(big.sum())", timeout=120)
    assert after.status == "ok", after.messages
    waited = k.execute("%gpu wait", timeout=120)
    assert waited.status == "ok", waited.messages
    assert k.execute("print(total, float(big.sum()), after)").stream().split() == [
        "0.0",
        f"{float(FLOATS // 8)}",
        f"{float(FLOATS // 8)}",
    ]
