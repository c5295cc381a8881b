"""The worker protocol: every message survives the channel, and a stranger is refused in one line."""

from __future__ import annotations

import re
from multiprocessing.connection import Pipe
from pathlib import Path
from typing import Any

import pytest

from gpulane.errors import GpulaneError
from gpulane.kernel import protocol
from gpulane.kernel.protocol import (
    PROTOCOL,
    CellError,
    CellOutput,
    CellWarning,
    ClearOutput,
    Display,
    Done,
    FromWorker,
    Interrupt,
    ProtocolError,
    Ready,
    Result,
    RunCell,
    Stop,
    Stream,
    ToWorker,
    decode_from_worker,
    decode_to_worker,
    encode,
)
from gpulane.kernel.returns import RESULT
from gpulane.kernel.transfer import pack, unpack
from gpulane.kernel.worker import LocalWorker


def run_cell(tmp_path: Path, code: str = "x = 1", **changes: Any) -> RunCell:
    fields: dict[str, Any] = {
        "code": code,
        "inputs": pack({"y": [1, 2]}, tmp_path, 1 << 20),
        "returns": None,
        "execution_count": 3,
        "spill_dir": str(tmp_path),
        "max_transfer": 1 << 20,
        "once": True,
    }
    fields.update(changes)
    return RunCell(**fields)


def to_worker_messages(tmp_path: Path) -> list[ToWorker]:
    return [
        run_cell(tmp_path),
        run_cell(tmp_path, returns=("a", "b"), env={"CUDA_VISIBLE_DEVICES": "0"}),
        Interrupt(),
        Stop(),
    ]


def from_worker_messages(tmp_path: Path) -> list[FromWorker]:
    return [
        Ready(pid=1234, protocol=PROTOCOL),
        Stream("stdout", "hello\n"),
        Display({"text/plain": "x"}, {}, {"display_id": "d1"}, update=True),
        Result({"text/plain": "42"}, {}),
        ClearOutput(wait=False),
        CellError("ZeroDivisionError", "division by zero", ["line 1"], hint=None),
        CellWarning("torch: capped at 8 GiB"),
        Done(ok=False),
        Done(ok=True, outputs=pack({"z": 3}, tmp_path, 1 << 20)),
    ]


def test_every_message_crosses_a_real_channel_unchanged(tmp_path: Path) -> None:
    kernel_end, worker_end = Pipe()
    for sent in to_worker_messages(tmp_path):
        kernel_end.send(encode(sent))
        assert decode_to_worker(worker_end.recv()) == sent
    for reply in from_worker_messages(tmp_path):
        worker_end.send(encode(reply))
        assert decode_from_worker(kernel_end.recv()) == reply


def test_the_wire_is_a_plain_dict_named_by_op(tmp_path: Path) -> None:
    assert encode(Stop()) == {"op": "stop"}
    assert encode(Stream("stderr", "oops")) == {"op": "stream", "name": "stderr", "text": "oops"}
    wire = encode(run_cell(tmp_path))
    assert wire["op"] == "run" and wire["env"] == {} and wire["returns"] is None
    values, failures = unpack(wire["inputs"])  # a Packed inside stays a Packed
    assert values == {"y": [1, 2]} and failures == {}


def test_the_two_directions_are_kept_apart(tmp_path: Path) -> None:
    with pytest.raises(ProtocolError, match=r"unknown op 'run' from the worker; known: "):
        decode_from_worker(encode(run_cell(tmp_path)))
    with pytest.raises(ProtocolError, match=r"unknown op 'done' to the worker"):
        decode_to_worker(encode(Done(ok=True)))


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (["op", "done"], "a message from the worker is a list"),
        ({"ok": True}, "unknown op None from the worker"),
        ({"op": "frobnicate"}, "unknown op 'frobnicate'"),
        ({"op": "done"}, "'done' lacks ok"),
        ({"op": "done", "ok": True, "colour": "red"}, "'done' has unknown fields colour"),
        ({"op": "done", "ok": "yes"}, "'done' field ok is a str"),
        ({"op": "ready", "pid": True, "protocol": 1}, "'ready' field pid is a bool"),
        ({"op": "stream", "name": "stdout", "text": b"bytes"}, "'stream' field text is a bytes"),
        ({"op": "done", "ok": True, "outputs": {"blobs": {}}}, "'done' field outputs is a dict"),
    ],
)
def test_a_malformed_message_is_one_clear_line(wire: object, expected: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_from_worker(wire)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, GpulaneError)


def test_optional_fields_may_be_left_out() -> None:
    assert decode_from_worker({"op": "done", "ok": False}) == Done(ok=False)
    error = decode_from_worker({"op": "error", "ename": "E", "evalue": "v", "traceback": ["t"]})
    assert error == CellError("E", "v", ["t"], hint=None)


def test_a_hint_follows_the_traceback() -> None:
    plain = CellError("OutOfMemoryError", "CUDA out of memory", ["frame"])
    hinted = CellError("OutOfMemoryError", "CUDA out of memory", ["frame"], "ask for --slices 2")
    assert plain.traceback_with_hint() == ["frame"]
    assert hinted.traceback_with_hint() == ["frame", "gpulane: ask for --slices 2"]


def test_the_docstring_names_every_op() -> None:
    doc = protocol.__doc__ or ""
    kinds = (*protocol._TO_WORKER, *protocol._FROM_WORKER)
    for kind in kinds:
        assert f"``{kind.op}`` (:class:`{kind.__name__}`)" in doc, kind
    assert {k.op for k in kinds} == {
        "run", "interrupt", "stop", "ready", "stream", "display", "result",
        "clear_output", "error", "warning", "done",
    }  # fmt: skip


class RecordingSink:
    def __init__(self) -> None:
        self.text: list[tuple[str, str]] = []
        self.messages: list[CellOutput] = []

    def stream(self, name: str, text: str) -> None:
        self.text.append((name, text))

    def message(self, message: CellOutput) -> None:
        self.messages.append(message)

    def flush(self) -> None:
        pass

    def stdout(self) -> str:
        return "".join(text for name, text in self.text if name == "stdout")


def test_a_real_runner_speaks_the_protocol(tmp_path: Path) -> None:
    """The kernel's LocalWorker and the runner process, end to end, without a scheduler."""
    worker = LocalWorker()
    sink = RecordingSink()
    worker.attach(sink)
    try:
        code = "print('out')\ndisplay({'a': 1})\nz = y + [3]\nz"
        worker.run({"GPULANE_TEST": "1"}, run_cell(tmp_path, code=code))
        assert worker.done.wait(60), sink.text
        assert isinstance(worker.result, Done) and worker.result.ok
        assert worker.result.outputs is not None
        values, failures = unpack(worker.result.outputs)
        # The last expression goes back with the names, as the kernel's Out[n].
        assert values == {"z": [1, 2, 3], RESULT: [1, 2, 3]} and failures == {}
        # stdout travels on the channel, before the messages that follow it: no waiting.
        assert sink.stdout() == "out\n"
        kinds = [type(m) for m in sink.messages if not isinstance(m, CellWarning)]
        assert kinds == [Display]
    finally:
        worker.stop()
    assert worker.proc.returncode == 0


def test_a_runner_reports_the_cells_exception(tmp_path: Path) -> None:
    worker = LocalWorker()
    sink = RecordingSink()
    worker.attach(sink)
    try:
        worker.run({}, run_cell(tmp_path, code="a = 1\nb = a / 0", once=False))
        assert worker.done.wait(60)
        assert worker.result == Done(ok=False)
        errors = [m for m in sink.messages if isinstance(m, CellError)]
        assert [e.ename for e in errors] == ["ZeroDivisionError"], sink.messages
        plain = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(errors[0].traceback))
        assert "b = a / 0" in plain
    finally:
        worker.stop()
