"""Large values out of band: pack/unpack round trips, mapped spill files, the channel's bytes.

Real pickling, real files in a private folder, a real socket pair for the channel.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import socket
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gpulane.kernel.channel import receive_message, send_message
from gpulane.kernel.transfer import (
    OUT_OF_BAND_FROM,
    Packed,
    follow_channel,
    pack,
    shared_spill_dir,
    transfer_line,
    transfer_lines,
    unpack,
)
from tests.support.users import need_module

MiB = 1 << 20
BIG = 4 * MiB  # over the inline limit: goes to a spill file


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    folder = tmp_path / "spill"
    folder.mkdir(mode=0o700)
    return folder


def packed_and_back(values: dict[str, Any], spill: Path) -> tuple[Packed, dict[str, Any]]:
    packed = pack(values, spill, max_bytes=1 << 30)
    assert not packed.skipped
    restored, failures = unpack(packed)
    assert failures == {}
    assert list(spill.iterdir()) == [], "unpack leaves no spill file behind"
    return packed, restored


def in_band_bytes(packed: Packed) -> int:
    return sum(len(blob) for blob in packed.blobs.values())


def backing(array: Any) -> Any:
    """The object at the bottom of an array's .base / memoryview.obj chain."""
    seen = array
    for _ in range(10):
        nxt = seen.obj if isinstance(seen, memoryview) else getattr(seen, "base", None)
        if nxt is None:
            return seen
        seen = nxt
    return seen


def shared_writable_deleted_mapping(address: int) -> bool:
    """Whether the address lies in a shared, writable mapping of an unlinked file."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, perms, *_ = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in span.split("-"))
        if start <= address < end:
            return perms.startswith("rw") and perms[3] == "s" and line.endswith("(deleted)")
    return False


# ---------------------------------------------------------------------------- numpy


def test_contiguous_array_maps_back_writable_shared_and_private(spill: Path) -> None:
    array = np.arange(BIG // 8, dtype=np.float64)
    packed, restored = packed_and_back({"a": array}, spill)
    back = restored["a"]
    assert in_band_bytes(packed) < 1000 and packed.spilled_bytes() == BIG
    assert isinstance(backing(back), mmap.mmap)  # mapped, not copied
    assert shared_writable_deleted_mapping(back.ctypes.data)  # no copy-on-write on first write
    assert back.flags.writeable and np.array_equal(back, array)
    back += 1  # the cell mutates its input in place
    assert back[0] == 1.0 and array[0] == 0.0, "the sender's array is untouched"


def test_non_contiguous_array_goes_out_of_band_and_arrives_contiguous(spill: Path) -> None:
    base = np.arange(2 * BIG // 8, dtype=np.float64).reshape(-1, 64)
    view = base[:, ::2]
    assert not view.flags.c_contiguous and not view.flags.f_contiguous
    packed, restored = packed_and_back({"v": view}, spill)
    assert in_band_bytes(packed) < 1000, "numpy alone would copy the view into the message"
    assert np.array_equal(restored["v"], view) and restored["v"].flags.c_contiguous


def test_fortran_order_stays_fortran(spill: Path) -> None:
    array = np.asfortranarray(np.arange(BIG // 8, dtype=np.int64).reshape(1024, -1))
    packed, restored = packed_and_back({"f": array}, spill)
    assert in_band_bytes(packed) < 1000
    assert restored["f"].flags.f_contiguous and np.array_equal(restored["f"], array)


def test_zero_d_and_empty_arrays_travel_inline(spill: Path) -> None:
    values = {"zero_d": np.array(3.5), "empty": np.zeros((0, 4)), "one": np.ones(1)}
    packed, restored = packed_and_back(values, spill)
    assert packed.spilled_bytes() == 0
    assert restored["zero_d"].shape == () and float(restored["zero_d"]) == 3.5
    assert restored["empty"].shape == (0, 4) and restored["one"].flags.writeable


def test_object_dtype_falls_back_to_pickling_its_elements(spill: Path) -> None:
    array = np.array([{"k": 1}, "text", None, [1, 2]] * 100_000, dtype=object)
    packed, restored = packed_and_back({"o": array}, spill)
    assert packed.spilled_bytes() == 0  # no buffer: the elements are pickled in band
    assert restored["o"].dtype == object and list(restored["o"][:4]) == list(array[:4])


def test_nested_containers_keep_arrays_out_of_band_and_shared_references(spill: Path) -> None:
    shared = np.ones(BIG // 8)
    value = {"layers": [shared, np.zeros(BIG // 4, dtype=np.float32)], "same": shared, "n": 3}
    packed, restored = packed_and_back({"model": value}, spill)
    assert in_band_bytes(packed) < 2000
    assert packed.spilled_bytes() == 2 * BIG // 1, "the array used twice is sent once"
    back = restored["model"]
    assert back["same"] is back["layers"][0] and back["n"] == 3
    assert np.array_equal(back["layers"][1], value["layers"][1])


def test_mutations_do_not_leak_between_sender_receiver_and_a_second_transfer(spill: Path) -> None:
    array = np.zeros(BIG // 8)
    _, first = packed_and_back({"a": array}, spill)
    first["a"][:] = 7  # the worker mutates what it received
    _, second = packed_and_back({"a": array}, spill)
    assert array.sum() == 0 and second["a"].sum() == 0
    array[:] = 2  # the kernel mutates its own after sending
    assert first["a"][0] == 7 and second["a"][0] == 0


def test_mapped_array_survives_its_spill_folder_being_removed(spill: Path) -> None:
    array = np.arange(BIG // 8, dtype=np.float64)
    packed = pack({"a": array}, spill, max_bytes=1 << 30)
    restored, _ = unpack(packed)
    shutil.rmtree(spill)  # a kernel's shutdown, or the next kernel's stale-folder sweep
    back = restored["a"]
    back[-1] = -1.0
    assert back[:-1].sum() == array[:-1].sum() and back[-1] == -1.0


def test_spill_files_are_private_from_their_creation(spill: Path) -> None:
    packed = pack({"a": np.ones(BIG // 8)}, spill, max_bytes=1 << 30)
    (ref,) = packed.buffers["a"]
    assert ref.path is not None and (os.stat(ref.path).st_mode & 0o777) == 0o600
    unpack(packed)


# ---------------------------------------------------------------------------- torch, bytes


def test_torch_tensors_contiguous_strided_bfloat16_and_parameters() -> None:
    torch = need_module("torch")
    values = {
        "t": torch.arange(BIG // 4, dtype=torch.float32).reshape(1024, -1),
        "strided": torch.arange(BIG // 4, dtype=torch.float32).reshape(1024, -1).t(),
        "half": torch.ones(BIG // 2, dtype=torch.bfloat16),
        "param": torch.nn.Parameter(torch.ones(BIG // 4)),
    }
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpulane-test-{os.getpid()}"
    folder.mkdir(mode=0o700)
    try:
        packed, restored = packed_and_back(values, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert in_band_bytes(packed) < 10_000, "tensor data goes out of band"
    for name, tensor in values.items():
        back = restored[name]
        assert type(back) is type(tensor) and back.dtype == tensor.dtype
        assert torch.equal(back.detach(), tensor.detach()), name
    assert restored["param"].requires_grad
    restored["t"].add_(1)  # in place, on the mapping: the sender's tensor is untouched
    assert float(values["t"][0, 0]) == 0.0 and float(restored["t"][0, 0]) == 1.0


def test_large_bytes_and_bytearray_go_out_of_band(spill: Path) -> None:
    blob = os.urandom(OUT_OF_BAND_FROM * 2)
    values = {"raw": blob, "buf": bytearray(blob), "small": b"tiny"}
    packed, restored = packed_and_back(values, spill)
    assert in_band_bytes(packed) < 1000 and packed.spilled_bytes() == 2 * len(blob)
    assert type(restored["raw"]) is bytes and restored["raw"] == blob
    assert type(restored["buf"]) is bytearray and restored["buf"] == blob
    assert restored["small"] == b"tiny"


# ---------------------------------------------------------------------------- the channel


def channel_pair() -> tuple[Connection, Connection]:
    left, right = socket.socketpair()
    return Connection(left.detach()), Connection(right.detach())


def over_the_channel(wire: dict[str, Any]) -> Any:
    sender, receiver = channel_pair()
    sending = threading.Thread(target=send_message, args=(sender, wire))
    sending.start()  # a large buffer fills the socket: the receiver must read as it is sent
    try:
        return receive_message(receiver)
    finally:
        sending.join(30)
        sender.close()
        receiver.close()


def test_no_shared_folder_buffers_follow_the_message_on_the_channel(tmp_path: Path) -> None:
    array = np.arange(BIG // 8, dtype=np.float64)
    elsewhere = tmp_path / "the-kernels-folder-on-another-machine"  # not here
    assert shared_spill_dir(str(elsewhere)) is None
    packed = pack({"a": array, "b": bytearray(b"x" * BIG)}, None, max_bytes=1 << 30)
    assert all(ref.follows and ref.path is None for refs in packed.buffers.values() for ref in refs)
    packing = packed.seconds
    received = over_the_channel({"op": "done", "ok": True, "outputs": packed})
    restored, failures = unpack(received["outputs"])
    assert failures == {}
    assert np.array_equal(restored["a"], array) and restored["a"].flags.writeable
    assert restored["b"] == b"x" * BIG
    assert received["outputs"].seconds > packing, "the time on the wire is counted"


def test_spill_files_follow_the_channel_for_a_worker_elsewhere(spill: Path) -> None:
    array = np.random.default_rng(0).random(BIG // 8)
    packed = pack({"a": array, "n": 5}, spill, max_bytes=1 << 30)
    follow_channel(packed)
    assert list(spill.iterdir()) == [], "the files are unlinked once mapped for sending"
    received = over_the_channel({"op": "run", "inputs": packed})
    restored, _ = unpack(received["inputs"])
    digest = hashlib.sha256(restored["a"].tobytes()).hexdigest()
    assert digest == hashlib.sha256(array.tobytes()).hexdigest() and restored["n"] == 5


def test_a_closed_channel_mid_buffer_is_an_eof_not_a_short_array() -> None:
    packed = pack({"a": np.ones(BIG // 8)}, None, max_bytes=1 << 30)
    sender, receiver = channel_pair()
    sender.send({"op": "done", "ok": True, "outputs": packed})  # the message without its bytes
    os.write(sender.fileno(), b"\0" * 1000)
    sender.close()
    with pytest.raises(EOFError):
        receive_message(receiver)
    receiver.close()


def test_the_worker_uses_the_kernels_folder_only_where_it_is_a_private_folder_here(
    tmp_path: Path,
) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    open_to_all = tmp_path / "open"
    open_to_all.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(private)
    assert shared_spill_dir(str(private)) == private
    assert shared_spill_dir(str(open_to_all)) is None and shared_spill_dir(str(link)) is None
    assert shared_spill_dir(str(tmp_path / "on-another-machine")) is None


# ---------------------------------------------------------------------------- the card's figure


def test_transfer_line_only_when_slower_than_a_second() -> None:
    def packed(total: int, seconds: float) -> Packed:
        return Packed(blobs={}, buffers={}, skipped={}, total_bytes=total, seconds=seconds)

    assert transfer_line(packed(1 << 30, 0.4), "sent") is None
    assert transfer_line(None, "sent") is None
    assert transfer_line(packed(1 << 30, 1.42), "sent") == "sent 1.0 GiB in 1.4 s"
    assert transfer_line(packed(3 << 29, 2.0), "brought back") == "brought back 1.5 GiB in 2.0 s"
    slow, quick = packed(1 << 30, 1.5), packed(1 << 30, 0.2)
    assert transfer_lines(slow, None) == ["sent 1.0 GiB in 1.5 s"]
    assert transfer_lines(quick, slow) == ["brought back 1.0 GiB in 1.5 s"]
    assert transfer_lines(quick, quick) == []


def test_pack_records_its_own_time(spill: Path) -> None:
    packed = pack({"a": np.ones(BIG // 8)}, spill, max_bytes=1 << 30)
    assert 0 < packed.seconds < 30
    unpack(packed)
