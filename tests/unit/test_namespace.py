"""What a cell reads and binds, and moving values to the GPU worker and back: real pickling."""

from __future__ import annotations

import collections
import mmap
import os
import pickle
import stat
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from gpulane.kernel.names import names_assigned, names_used
from gpulane.kernel.transfer import (
    BufferRef,
    Packed,
    TransferTooLarge,
    cleanup,
    default_spill_dir,
    pack,
    to_cpu,
    unpack,
)
from tests.support.users import need_module

SMALL = 64  # inline_limit for tests: anything this big or bigger is spilled to a file
MiB = 1 << 20


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    folder = tmp_path / "spill"
    folder.mkdir(mode=0o700)
    return folder


def spill_files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir())


def round_trip(values: dict[str, Any], spill: Path, **kwargs: Any) -> dict[str, Any]:
    packed = pack(values, spill, max_bytes=1 << 30, **kwargs)
    assert not packed.skipped
    restored, failures = unpack(packed)
    assert failures == {}
    return restored


def main_module(source: str) -> dict[str, Any]:
    """Run source as a notebook does: in a module dict named __main__, so cloudpickle copies by value."""
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


def mapped_from_deleted_file(address: int, folder: Path) -> bool:
    """Whether this address lies in a mapping of an unlinked file of folder (Linux /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, _, *rest = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in span.split("-"))
        if start <= address < end:
            return bool(rest) and rest[0].startswith(str(folder)) and rest[0].endswith("(deleted)")
    return False


def reaches_mmap(array: Any) -> bool:
    """Whether the array's memory is a memory map (through .base and memoryview.obj), not a copy."""
    seen = array
    for _ in range(10):
        if isinstance(seen, mmap.mmap):
            return True
        if isinstance(seen, memoryview):
            seen = seen.obj
        elif hasattr(seen, "base") and seen.base is not None:
            seen = seen.base
        else:
            return False
    return False


# ---------------------------------------------------------------------------- names_used


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("y = x + 1", {"x"}),
        ("print(len(data))", {"print", "len", "data"}),  # builtins kept: a notebook may shadow them
        ("total += step", {"total", "step"}),
        ("del old", {"old"}),
        ("a.b = c", {"a", "c"}),
        ("m[k] = v", {"m", "k", "v"}),
        ("def f(p):\n    return p * scale\n", {"p", "scale"}),
        ("g = lambda q: q + offset", {"q", "offset"}),
        ("squares = [i * factor for i in items]", {"i", "factor", "items"}),
        ("class C(Base):\n    size = default_size\n", {"Base", "default_size"}),
        ("if (n := compute(seed)) > 3:\n    pass\n", {"compute", "seed"}),
        ("import numpy as np\nz = np.zeros(shape)", {"np", "shape"}),
    ],
)
def test_names_used_reads(cell: str, expected: set[str]) -> None:
    assert names_used(cell) == expected


def test_names_used_ipython_syntax() -> None:
    cell = "!ls {folder} $HOME\n%time result = model(batch)\nfiles = !ls\nweights?\n"
    assert names_used(cell) == {"folder", "HOME", "model", "batch", "weights"}


def test_names_used_magic_with_options_and_cell_magic() -> None:
    assert names_used("%timeit -n 10 -r 3 f(x)") == {"f", "x"}
    assert names_used("%%time\nout = net(inputs)\n") == {"net", "inputs"}
    assert names_used("%%timeit setup(n)\nrun(x)") == {"setup", "n", "run", "x"}


def test_names_used_ignores_magic_arguments_that_are_not_code() -> None:
    # Shipping `data` for `%%writefile data.py` could move a big array for nothing.
    assert names_used("%%writefile data.py\nimport os\n") == set()
    assert names_used("%matplotlib inline\n%pip install torch") == set()
    assert names_used("%%bash -s {arg}\necho $1 {body}") == {
        "arg"
    }  # the line expands, the body not


def test_names_used_drops_ipython_internals() -> None:
    cell = (
        "(In, Out, _, __, ___, _i, _ii, _iii, _oh, _dh, _ih, _12, _i7, exit, quit)\nget_ipython()"
    )
    assert names_used(cell) == set()
    assert names_used("_private + _1x") == {"_private", "_1x"}  # only IPython's own patterns drop


def test_names_used_syntax_error_propagates() -> None:
    with pytest.raises(SyntaxError):
        names_used("def broken(:\n")


# ---------------------------------------------------------------------------- names_assigned


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("x = 1\ny = x\nx = 2", ["x", "y"]),
        ("a, (b, *rest) = values\n[c, d] = pair", ["a", "b", "rest", "c", "d"]),
        ("p = q = 0", ["p", "q"]),
        ("n: int = 3\nm: int", ["n"]),  # an annotation alone binds nothing
        ("total += 1", ["total"]),
        ("obj.attr = 1\nitems[0] = 2", []),
        ("import numpy as np\nimport os.path\nfrom a import b as c, d", ["np", "os", "c", "d"]),
        ("from mod import *", []),
        ("def f():\n    inner = 1\n    return inner\n", ["f"]),
        ("async def g():\n    pass\n", ["g"]),
        ("class Model:\n    width = 3\n    def forward(self):\n        hidden = 1\n", ["Model"]),
        ("g = lambda v: (w := v)", ["g"]),
        ("ys = [y for y in range(3)]", ["ys"]),  # comprehension variables stay inside
        ("ys = [last := y for y in range(3)]", ["last", "ys"]),  # := escapes the comprehension
        ("if (n := 10) > 5:\n    big = True\nelse:\n    small = True", ["n", "big", "small"]),
        ("for i, v in enumerate(xs):\n    acc = v\nelse:\n    done = 1", ["i", "v", "acc", "done"]),
        ("while cond:\n    step = 1", ["step"]),
        ("with open(p) as fh, lock:\n    text = fh.read()", ["fh", "text"]),
        (
            "try:\n    r = f()\nexcept ValueError as err:\n    r2 = 0\nelse:\n    ok = 1\nfinally:\n    fin = 1",
            ["r", "err", "r2", "ok", "fin"],
        ),
        (
            "match cmd:\n    case [first, *others]:\n        one = 1\n"
            "    case {'k': val, **extra}:\n        pass\n    case Point(x=px) as pt:\n        pass",
            ["first", "others", "one", "val", "extra", "px", "pt"],
        ),
        ("def bump():\n    global counter\n    counter = 1\n", ["bump", "counter"]),
        ("_hidden = 1\n__dunder = 2\nshown = 3", ["shown"]),
    ],
)
def test_names_assigned(cell: str, expected: list[str]) -> None:
    assert names_assigned(cell) == expected


def test_names_assigned_ipython_syntax() -> None:
    cell = "!nvidia-smi\nfiles = !ls\n%time result = train(model)\nx = %timeit -o f()\n"
    assert names_assigned(cell) == ["files", "result", "x"]
    assert names_assigned("%%time\nloss = step()\n") == ["loss"]
    assert names_assigned("%%capture captured\nnoise = run()\n") == ["captured", "noise"]
    assert names_assigned("%%bash\nexport A=1\n") == []


# ---------------------------------------------------------------------------- pack / unpack


def test_round_trip_plain_values(spill: Path) -> None:
    values = {"n": 42, "s": "héllo", "nested": {"k": [1, 2.5, None, (3, "x")]}, "nothing": None}
    assert round_trip(values, spill) == values
    assert spill_files(spill) == []


def test_small_array_travels_inline_and_comes_back_writable(spill: Path) -> None:
    array = np.arange(4, dtype=np.int64)
    packed = pack({"a": array}, spill, max_bytes=MiB, inline_limit=SMALL)
    assert packed.buffers["a"] == [BufferRef(size=32, inline=array.tobytes())]
    assert packed.total_bytes == len(packed.blobs["a"]) + 32
    values, _ = unpack(packed)
    np.testing.assert_array_equal(values["a"], array)
    values["a"][0] = 7  # writable: the user can go on modifying it


def test_large_array_goes_through_a_private_file_and_maps_back(spill: Path) -> None:
    array = np.arange(10_000, dtype=np.float64).reshape(100, 100)
    packed = pack({"big": array}, spill, max_bytes=MiB, inline_limit=SMALL)
    (ref,) = packed.buffers["big"]
    assert ref.inline is None and ref.size == array.nbytes
    assert ref.path is not None
    path = Path(ref.path)
    assert path.parent == spill
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(spill.stat().st_mode) == 0o700
    assert len(packed.blobs["big"]) < 1000  # the data is not in the message

    values, failures = unpack(packed)
    assert failures == {}
    assert not path.exists()
    restored = values["big"]
    np.testing.assert_array_equal(restored, array)
    assert reaches_mmap(restored)
    assert not np.shares_memory(restored, array)
    restored[0, 0] = -1  # copy-on-write: writable, and the original is untouched
    assert array[0, 0] == 0


def test_fortran_order_and_several_arrays_in_one_value(spill: Path) -> None:
    value = {"f": np.asfortranarray(np.ones((20, 30))), "c": np.zeros(50), "tiny": np.ones(2)}
    restored = round_trip({"v": value}, spill, inline_limit=SMALL)["v"]
    assert restored["f"].flags.f_contiguous
    for key in value:
        np.testing.assert_array_equal(restored[key], value[key])
    assert spill_files(spill) == []


def test_function_class_and_instance_from_main_travel_by_value(spill: Path) -> None:
    namespace = main_module(
        "SCALE = 3\n"
        "def triple(v):\n    return v * SCALE\n"
        "class Point:\n"
        "    def __init__(self, x):\n        self.x = x\n"
        "    def moved(self):\n        return triple(self.x)\n"
        "p = Point(5)\n"
    )
    values = {name: namespace[name] for name in ("triple", "Point", "p")}
    restored = round_trip(values, spill)
    assert restored["triple"](2) == 6
    assert restored["Point"](1).moved() == 3
    assert restored["p"].moved() == 15
    assert restored["p"].x == 5


def test_modules_travel_by_reference(spill: Path) -> None:
    packed = pack({"np": np, "os": os}, spill, max_bytes=MiB)
    assert len(packed.blobs["np"]) < 100
    values, _ = unpack(packed)
    assert values["np"] is np and values["os"] is os


def test_unpicklable_value_is_skipped_with_a_reason(spill: Path) -> None:
    values = {"lock": threading.Lock(), "gen": (i for i in range(3)), "kept": [1, 2]}
    packed = pack(values, spill, max_bytes=MiB)
    assert packed.skipped["lock"] == "TypeError: cannot pickle '_thread.lock' object"
    assert packed.skipped["gen"].startswith("TypeError: cannot pickle 'generator' object")
    assert list(packed.blobs) == ["kept"]
    assert packed.total_bytes == len(packed.blobs["kept"])
    assert unpack(packed) == ({"kept": [1, 2]}, {})


def test_transfer_too_large_names_the_biggest_and_leaves_no_files(spill: Path) -> None:
    values = {
        "weights": np.zeros(300_000, dtype=np.uint8),
        "grads": np.zeros(200_000, dtype=np.uint8),
        "small": np.zeros(100, dtype=np.uint8),
        "meta": {"lr": 0.1},
    }
    with pytest.raises(TransferTooLarge) as caught:
        pack(values, spill, max_bytes=400_000, inline_limit=SMALL)
    message = str(caught.value)
    assert "\n" not in message
    assert message.index("weights (293.1 KiB)") < message.index("grads (195.")
    assert "--max-transfer SIZE" in message and "GPULANE_MAX_TRANSFER" in message
    assert "390.6 KiB" in message  # the limit
    assert spill_files(spill) == []
    assert caught.value.total > caught.value.limit == 400_000
    copied = pickle.loads(pickle.dumps(caught.value))  # it may cross a process boundary
    assert str(copied) == message


def test_write_failure_removes_what_was_written(spill: Path) -> None:
    values = {"a": np.ones(100), "b": np.ones(100)}
    missing = spill / "gone"  # every file create fails: nothing half-written stays
    with pytest.raises(FileNotFoundError):
        pack(values, missing, max_bytes=MiB, inline_limit=SMALL)
    assert spill_files(spill) == []


def test_cleanup_removes_spill_files_of_an_unused_transfer(spill: Path) -> None:
    packed = pack({"a": np.ones(100), "b": np.ones(200)}, spill, max_bytes=MiB, inline_limit=SMALL)
    assert len(spill_files(spill)) == 2
    cleanup(packed)
    assert spill_files(spill) == []
    cleanup(packed)  # twice is harmless


def test_unpack_failure_for_a_module_that_cannot_be_imported(spill: Path) -> None:
    module = types.ModuleType("gpulane_test_vanishing")
    exec("class Thing:\n    pass\n", module.__dict__)
    sys.modules[module.__name__] = module  # importable while packing: pickled by reference
    try:
        packed = pack(
            {"thing": module.Thing(), "arr": np.ones(100), "fine": 1},
            spill,
            max_bytes=MiB,
            inline_limit=SMALL,
        )
    finally:
        del sys.modules[module.__name__]
    packed.blobs["arr"] = packed.blobs["thing"]  # this name's spill file must still go away
    values, failures = unpack(packed)
    reason = "ModuleNotFoundError: No module named 'gpulane_test_vanishing'"
    assert failures == {"thing": reason, "arr": reason}
    assert values == {"fine": 1}
    assert spill_files(spill) == []


def test_unpack_reports_a_missing_spill_file(spill: Path) -> None:
    packed = pack({"a": np.ones(100), "b": 2}, spill, max_bytes=MiB, inline_limit=SMALL)
    cleanup(packed)
    values, failures = unpack(packed)
    assert values == {"b": 2}
    assert failures["a"].startswith("FileNotFoundError:")


def test_spill_file_is_not_followed_through_a_symlink(spill: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"\0" * 800)
    packed = Packed(blobs={}, buffers={}, skipped={}, total_bytes=0)
    real = pack({"a": np.ones(100)}, spill, max_bytes=MiB, inline_limit=SMALL)
    (ref,) = real.buffers["a"]
    assert ref.path is not None
    os.unlink(ref.path)
    os.symlink(target, ref.path)
    packed.blobs, packed.buffers = real.blobs, real.buffers
    values, failures = unpack(packed)
    assert "a" not in values and failures["a"].startswith("OSError")
    assert target.exists()


def test_default_spill_dir_is_fresh_and_private() -> None:
    first, second = default_spill_dir(), default_spill_dir()
    try:
        assert first != second
        for folder in (first, second):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700
            assert folder.stat().st_uid == os.getuid()
            if os.access("/dev/shm", os.W_OK):
                assert folder.parent == Path("/dev/shm")
    finally:
        first.rmdir()
        second.rmdir()


# ---------------------------------------------------------------------------- torch


class Pair(NamedTuple):
    left: Any
    right: Any


def test_to_cpu_leaves_everything_alone_without_torch() -> None:
    # In a fresh interpreter: another test may already have imported torch here.
    code = (
        "import sys\n"
        "from gpulane.kernel.transfer import to_cpu\n"
        "value = {'a': [1, 2], 'b': (3,)}\n"
        "assert to_cpu(value) is value\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_to_cpu_tensors_modules_and_containers() -> None:
    torch = need_module("torch")
    weight = torch.ones(3, requires_grad=True)
    derived = weight * 2
    net = torch.nn.Linear(2, 2)
    counts: collections.defaultdict[str, Any] = collections.defaultdict(list, {"t": derived})
    value = {
        "t": derived,
        "list": [derived, 1, "s"],
        "tuple": (derived, net),
        "pair": Pair(derived, 5),
        "ordered": collections.OrderedDict(t=derived),
        "counts": counts,
        "plain": [1, 2],
    }
    moved = to_cpu(value)
    assert moved["t"].device.type == "cpu" and not moved["t"].requires_grad
    assert moved["t"].grad_fn is None
    assert isinstance(moved["list"], list) and moved["list"][1:] == [1, "s"]
    assert isinstance(moved["tuple"], tuple) and moved["tuple"][1] is net
    assert isinstance(moved["pair"], Pair) and moved["pair"].right == 5
    assert not moved["pair"].left.requires_grad
    assert type(moved["ordered"]) is collections.OrderedDict
    assert moved["counts"].default_factory is list
    assert moved["plain"] is value["plain"]  # nothing to move: the very same object
    assert to_cpu(net) is net
    assert to_cpu(7) == 7


def test_to_cpu_survives_cycles() -> None:
    torch = need_module("torch")
    loop: list[Any] = [torch.zeros(1)]
    loop.append(loop)
    moved = to_cpu(loop)
    assert moved[1] is loop


def test_tensors_cross_out_of_band_and_map_back(spill: Path) -> None:
    torch = need_module("torch")
    big = torch.arange(1000, dtype=torch.float32)
    half = torch.ones(100, dtype=torch.bfloat16)
    view = big[:10]  # torch alone would pickle the whole 1000-element storage
    param = torch.nn.Parameter(torch.ones(50))
    packed = pack(
        {"big": big, "half": half, "view": view, "param": param},
        spill,
        max_bytes=MiB,
        inline_limit=SMALL,
    )
    assert len(packed.blobs["big"]) < 1000 and packed.buffers["big"][0].path is not None
    assert packed.buffers["view"][0].size == 40
    values, failures = unpack(packed)
    assert failures == {}
    assert torch.equal(values["big"], big)
    if sys.platform == "linux":  # zero copy: the tensor's memory is the mapped spill file
        assert mapped_from_deleted_file(values["big"].data_ptr(), spill)
    assert values["half"].dtype == torch.bfloat16 and torch.equal(values["half"], half)
    assert torch.equal(values["view"], view)
    assert isinstance(values["param"], torch.nn.Parameter) and values["param"].requires_grad
    assert spill_files(spill) == []


def test_module_round_trip(spill: Path) -> None:
    torch = need_module("torch")
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    net[0].weight.data.fill_(0.5)
    restored = round_trip({"net": net}, spill, inline_limit=SMALL)["net"]
    assert torch.equal(restored[0].weight, net[0].weight)
    assert torch.equal(restored[1].running_mean, net[1].running_mean)
    assert spill_files(spill) == []
