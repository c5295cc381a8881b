"""The kernel's pool of spill files: reused only when no one else can see them, bounded, freed.

Real files in a private /dev/shm folder (where the kernel puts them), real pack/unpack, and a
real second process that maps a pooled file while the kernel packs the next cell's input.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from gpulane.kernel import spillpool
from gpulane.kernel.spillpool import SpillPool
from gpulane.kernel.transfer import cleanup, follow_channel, pack, unpack

MiB = 1 << 20
SIZE = 2 * MiB  # float64 elements below: SIZE bytes each


@pytest.fixture
def spill() -> Iterator[Path]:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix="gpulane-pooltest-", dir=base))  # 0700
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def small_buffers_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spillpool, "POOL_FROM", MiB)  # test with MiBs, not the product's 16


def array(seed: float, nbytes: int = SIZE) -> np.ndarray:
    return np.full(nbytes // 8, seed)


def pooled_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("pool-*.buf"))


def lent_inode(packed: object) -> int:
    (ref,) = packed.buffers["x"]  # type: ignore[attr-defined]
    return os.stat(ref.path).st_ino


def test_a_pooled_file_is_reused_once_its_cell_let_go(spill: Path) -> None:
    pool = SpillPool(spill)
    first = pack({"x": array(1.0)}, spill, 1 << 30, pool=pool)
    inode = lent_inode(first)
    values, _ = unpack(first)  # maps and unlinks its own name, as a worker does
    assert values["x"][0] == 1.0
    del values  # the receiver lets go: the kernel alone holds the file
    second = pack({"x": array(2.0)}, spill, 1 << 30, pool=pool)
    assert lent_inode(second) == inode, "the same pages, written again"
    values, _ = unpack(second)
    assert (values["x"] == 2.0).all()
    assert len(pooled_files(spill)) == 1 and pool.held == SIZE
    del values
    pool.close()
    assert list(spill.iterdir()) == []


def test_a_pooled_file_another_process_maps_is_never_written(spill: Path) -> None:
    """The attack on the pool: a worker (here a plain process) still maps the last cell's
    array while the kernel packs the next input; its bytes must not change under it."""
    pool = SpillPool(spill)
    first = pack({"x": array(1.0)}, spill, 1 << 30, pool=pool)
    (ref,) = first.buffers["x"]
    code = (
        "import sys, numpy as np\n"
        "from gpulane.kernel.transfer import map_spill_file\n"
        f"m = map_spill_file({ref.path!r}, {ref.size})\n"
        "print('mapped', flush=True); sys.stdin.readline()\n"
        "print(float(np.frombuffer(m).min()), float(np.frombuffer(m).max()), flush=True)\n"
    )
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    with subprocess.Popen([sys.executable, "-c", code], **pipes) as holder:  # type: ignore[call-overload]
        assert holder.stdout.readline().strip() == "mapped"
        inode = os.fstat(pool._entries[0].fd).st_ino
        second = pack({"x": array(2.0)}, spill, 1 << 30, pool=pool)
        assert lent_inode(second) != inode, "a file someone maps is not reused"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().split() == ["1.0", "1.0"], "its bytes did not change"
    values, _ = unpack(second)
    assert (values["x"] == 2.0).all()
    del values
    third = pack({"x": array(3.0)}, spill, 1 << 30, pool=pool)  # the holder is gone now
    assert lent_inode(third) == inode
    cleanup(third)
    pool.close()


def test_a_file_lent_to_a_cell_that_has_not_taken_it_is_not_reused(spill: Path) -> None:
    pool = SpillPool(spill)
    first = pack({"x": array(1.0)}, spill, 1 << 30, pool=pool)
    second = pack({"x": array(2.0)}, spill, 1 << 30, pool=pool)  # first not unpacked yet
    assert lent_inode(first) != lent_inode(second)
    values, _ = unpack(first)
    assert (values["x"] == 1.0).all()
    del values
    cleanup(second)  # a cell that never ran: its lent name goes, the pooled file stays
    assert len(pooled_files(spill)) == 2 and len(list(spill.iterdir())) == 2
    third = pack({"x": array(3.0)}, spill, 1 << 30, pool=pool)
    assert lent_inode(third) in {os.fstat(e.fd).st_ino for e in pool._entries}
    assert len(pooled_files(spill)) == 2
    cleanup(third)
    pool.close()


def test_pooled_and_lent_files_are_private(spill: Path) -> None:
    pool = SpillPool(spill)
    packed = pack({"x": array(1.0)}, spill, 1 << 30, pool=pool)
    for path in spill.iterdir():
        info = os.lstat(path)
        assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_uid == os.getuid()
    cleanup(packed)
    pool.close()


def test_the_pool_holds_at_most_its_limit(spill: Path) -> None:
    pool = SpillPool(spill, limit=3 * SIZE)
    for nbytes in (SIZE, 2 * SIZE, SIZE + 8 * 1024):  # three sizes: the oldest is dropped
        cleanup(pack({"x": array(1.0, nbytes)}, spill, 1 << 30, pool=pool))
        assert pool.held <= pool.limit
    assert sorted(e.size for e in pool._entries) == [SIZE + 8 * 1024]
    too_big = pack({"x": array(1.0, 4 * SIZE)}, spill, 1 << 30, pool=pool)
    (ref,) = too_big.buffers["x"]
    assert ref.path is not None and not Path(ref.path).name.startswith("pool-")
    assert pool.held <= pool.limit, "over the limit: an ordinary spill file, not pooled"
    values, _ = unpack(too_big)
    assert (values["x"] == 1.0).all()
    del values
    pool.close()


def test_small_buffers_are_not_pooled(spill: Path) -> None:
    pool = SpillPool(spill)
    cleanup(pack({"x": array(1.0, MiB + 8 * 1024)}, spill, 1 << 30, pool=pool))
    cleanup(pack({"x": array(1.0, MiB - 8)}, spill, 1 << 30, pool=pool))  # under POOL_FROM
    assert [e.size for e in pool._entries] == [MiB + 8 * 1024]
    pool.close()


def test_an_idle_pool_frees_its_files(spill: Path) -> None:
    pool = SpillPool(spill, idle=0.3)
    cleanup(pack({"x": array(1.0)}, spill, 1 << 30, pool=pool))
    assert pooled_files(spill)
    deadline = time.monotonic() + 10
    while pooled_files(spill) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pooled_files(spill) == [] and pool.held == 0


def test_settings_from_the_environment(spill: Path, capsys: pytest.CaptureFixture[str]) -> None:
    default = SpillPool.from_environment(spill, {})
    assert (default.limit, default.idle) == (spillpool.DEFAULT_LIMIT, spillpool.DEFAULT_IDLE)
    pool = SpillPool.from_environment(
        spill, {"GPULANE_SPILL_POOL": "512M", "GPULANE_SPILL_POOL_IDLE": "30s"}
    )
    assert (pool.limit, pool.idle) == (512 * MiB, 30)
    off = SpillPool.from_environment(spill, {"GPULANE_SPILL_POOL": "0"})
    packed = pack({"x": array(1.0)}, spill, 1 << 30, pool=off)
    assert off.held == 0 and pooled_files(spill) == []
    cleanup(packed)
    bad = {"GPULANE_SPILL_POOL": "lots", "GPULANE_SPILL_POOL_IDLE": "soon"}
    fallback = SpillPool.from_environment(spill, bad)
    assert (fallback.limit, fallback.idle) == (spillpool.DEFAULT_LIMIT, spillpool.DEFAULT_IDLE)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("gpulane: GPULANE_SPILL_POOL") for line in lines)
    assert "'lots' is not a size" in lines[0] and "using the default, 2G" in lines[0]


def test_a_pooled_input_follows_the_channel_to_a_worker_elsewhere(spill: Path) -> None:
    """The Slurm path: the kernel maps the lent file to send its bytes on the channel; once
    sent, the pooled file is free again for the next input of its size."""
    from tests.unit.test_transfer import over_the_channel

    pool = SpillPool(spill)
    packed = pack({"x": array(1.0)}, spill, 1 << 30, pool=pool)
    inode = lent_inode(packed)
    follow_channel(packed)
    assert [p.name for p in spill.iterdir()] == [p.name for p in pooled_files(spill)]
    received = over_the_channel({"op": "run", "inputs": packed})
    values, failures = unpack(received["inputs"])
    assert failures == {} and (values["x"] == 1.0).all()
    again = pack({"x": array(2.0)}, spill, 1 << 30, pool=pool)
    assert lent_inode(again) == inode, "sent: the kernel's own mapping of it is gone"
    cleanup(again)
    pool.close()
