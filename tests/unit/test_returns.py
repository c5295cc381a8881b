"""Which names come back from a `%%gpu` cell, and how its last expression travels (issue 12)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from gpulane.jobs import Request
from gpulane.kernel.names import CHANGED, names_mutated
from gpulane.kernel.options import parse_cell_options
from gpulane.kernel.returns import RESULT, names_to_return, pack_returns
from gpulane.kernel.session import shortfall
from gpulane.kernel.transfer import unpack


def test_mutations_are_found_with_how():
    found = names_mutated(
        "cfg['lr'] = 0.1\nmodel.w = 3\nx.a += 1\nmodel.fit(X, y)\nhistory.append(1)\n"
        "del d['k']\ndf.drop('a', inplace=True)\na[0].b.append(2)\nf(x).y = 3\nprint(z)\n"
        "def train():\n    net.step()\n"
    )
    assert found == {
        "cfg": {CHANGED},
        "model": {"fit", CHANGED},
        "x": {CHANGED},
        "history": {"append"},
        "d": {CHANGED},
        "df": {CHANGED},
        "a": {"append"},
        "net": {"step"},  # inside a def of the cell: it may run
    }


def test_assigned_then_changed_inputs_less_no_return():
    sent = {"cfg": {}, "history": [], "kept": [], "model": object()}
    code = "total = 1\ncfg['a'] = 1\nhistory.append(2)\nkept.append(3)\nmodel.fit()\nother.x = 1"
    assert names_to_return(code, None, ("kept",), sent) == ("total", "cfg", "history", "model")


def test_arrays_tensors_and_modules_come_back_only_when_changed():
    sent = {"arr": np.zeros(3), "np": np, "sorted_arr": np.zeros(3), "item": np.zeros(3)}
    code = "s = arr.sum()\nnp.random.seed(0)\nsorted_arr.sort()\nitem[0] = 1"
    assert names_to_return(code, None, (), sent) == ("s", "sorted_arr", "item")


def test_explicit_return_wins_and_no_return_alone_returns_nothing():
    sent = {"cfg": {}}
    assert names_to_return("cfg['a'] = 1\nb = 2", ("b",), (), sent) == ("b",)
    bare = parse_cell_options("--no-return")
    assert bare.returns == () and names_to_return("b = 2", bare.returns, (), sent) == ()
    listed = parse_cell_options("--no-return a,b --no-return c")
    assert listed.returns is None and listed.no_return == ("a", "b", "c")


def test_the_last_expression_travels_with_the_names(tmp_path: Path):
    packed, notes, show = pack_returns({"n": 1}, [1, 2], tmp_path, 1 << 20)
    assert packed is not None and notes == [] and not show
    values, failures = unpack(packed)
    assert values == {"n": 1, RESULT: [1, 2]} and failures == {}


def test_a_result_that_cannot_travel_is_shown_and_the_names_still_come_back(tmp_path: Path):
    packed, notes, show = pack_returns({"n": 1}, threading.Lock(), tmp_path, 1 << 20)
    assert show and packed is not None and RESULT not in packed.skipped
    assert unpack(packed)[0] == {"n": 1}
    assert len(notes) == 1 and "cannot come back as Out" in notes[0]
    big = np.zeros(1 << 18)  # 2 MiB, over a 1 MiB limit
    packed, notes, show = pack_returns({"n": 1}, big, tmp_path, 1 << 20)
    assert show and packed is not None and unpack(packed)[0] == {"n": 1}
    assert "too large to come back as Out" in notes[0]


@pytest.mark.parametrize(
    ("held", "asked", "short"),
    [
        (Request(gpus=1), Request(), None),
        (Request(slices=1), Request(), None),  # a plain cell fits any session
        (Request(gpus=1), Request(slices=2), None),  # slices fit in a whole GPU
        (Request(slices=1), Request(slices=2), "it asks 2 slice(s), the session holds 1 slice(s)"),
        (Request(gpus=1), Request(gpus=2), "it asks 2 GPU(s), the session holds 1 GPU(s)"),
        (Request(mem=1 << 30), Request(mem=2 << 30), "it asks 2.0 GiB of memory"),
    ],
)
def test_what_a_session_cannot_hold(held: Request, asked: Request, short: str | None):
    said = shortfall(held, asked)
    assert (said is None) if short is None else (said is not None and short in said)
