"""What a `%%gpu` cell brings back and how it ends, in real kernels against a real broker
(issue 12: the last expression as Out, mutated inputs, --no-return, sessions, interrupt, --bg
notices)."""

from __future__ import annotations

import json
import re

import pytest

from tests.support.users import need_module, wait_for

pytestmark = pytest.mark.usefixtures("unix_users")

ALICE = "gpl-alice"


@pytest.fixture
def broker(make_broker):
    return make_broker("--simulate-gpus", "1", "--kill-grace", "1s")


def running(broker) -> list[dict]:
    return json.loads(broker.call(None, "status", "--json").stdout)["running"]


def printed(k, code: str) -> str:
    cell = k.execute(code)
    assert cell.status == "ok", cell.messages
    return cell.stream().strip()


def job_state(k, job_id: int) -> str:
    """The job's state and message as the broker recorded them, asked from the user's kernel."""
    return printed(
        k,
        "from gpulane.scheduler import connect as _c\n"
        f"_j = _c().job({job_id}); print(_j['state'], '|', _j.get('message'))",
    )


def card_texts(result) -> list[str]:
    return [t for t in result.texts() if t.startswith("[gpulane]")]


def test_the_last_expression_is_the_cells_result(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu\nx = 20\nx + 22")
    assert cell.status == "ok", cell.messages
    (result,) = cell.of_type("execute_result")
    (started,) = cell.of_type("execute_input")
    number = started["execution_count"]
    assert result["data"]["text/plain"] == "42" and result["execution_count"] == number
    assert printed(k, f"print(_, Out[{number}], _{number}, x)") == "42 42 42 20"
    # A trailing semicolon shows nothing, as in IPython.
    quiet = k.execute("%%gpu\n7 * 6;")
    assert quiet.status == "ok" and quiet.of_type("execute_result") == []


def test_a_result_that_cannot_come_back_is_shown_with_a_note(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu\nimport threading\nn = 3\nthreading.Lock()")
    assert cell.status == "ok", cell.messages
    assert cell.of_type("execute_result") == []
    assert any("unlocked" in t for t in cell.texts())  # its format data, as a display
    notes = [ln for ln in cell.stream("stderr").splitlines() if "result" in ln]
    assert len(notes) == 1 and "cannot come back as Out" in notes[0], cell.stream("stderr")
    assert printed(k, "print(n)") == "3"  # the names still came back


def test_inputs_the_cell_changes_come_back(broker, kernels):
    k = kernels(ALICE, broker)
    k.execute(
        "import numpy as np\n"
        "class Box:\n    pass\n"
        "cfg = {'lr': 1.0}\nhistory = [1]\nbox = Box()\ncounts = [0]\n"
        "arr = np.zeros(4)\narr_id = id(arr)\nkept = [1]\nkept_id = id(kept)\n"
    )
    cell = k.execute(
        "%%gpu --no-return kept\n"
        "cfg['lr'] = 0.1\n"
        "history.append(2)\n"
        "box.w = 5\n"
        "counts[0] += 3\n"
        "total = float(arr.sum())\n"  # a read: the array is not sent back
        "kept.append(2)\n"
    )
    assert cell.status == "ok", cell.messages
    returned = next(t for t in card_texts(cell) if "returned:" in t)
    assert "returned: box, cfg, counts, history, total" in returned, returned
    assert printed(k, "print(cfg['lr'], history, box.w, counts, total)") == "0.1 [1, 2] 5 [3] 0.0"
    assert printed(k, "print(id(arr) == arr_id, kept, id(kept) == kept_id)") == "True [1] True"


def test_model_fit_trains_the_kernels_scikit_learn_model(broker, kernels):
    need_module("sklearn")
    k = kernels(ALICE, broker)
    k.execute(
        "import numpy as np\nfrom sklearn.linear_model import LinearRegression\n"
        "X = np.arange(10.0).reshape(-1, 1)\ny = 3 * X.ravel() + 1\nmodel = LinearRegression()"
    )
    cell = k.execute("%%gpu\nmodel.fit(X, y)\nprint('fitted')", timeout=120)
    assert cell.status == "ok", cell.messages
    assert printed(
        k, "print(round(float(model.coef_[0]), 3), round(float(model.intercept_), 3))"
    ) == ("3.0 1.0")


def test_a_torch_training_loop_trains_the_kernels_model(broker, kernels):
    need_module("torch")
    k = kernels(ALICE, broker)
    k.execute(
        "import torch\ntorch.manual_seed(0)\nnet = torch.nn.Linear(1, 1)\nw0 = net.weight.item()"
    )
    cell = k.execute(
        "%%gpu\n"
        "import torch\n"
        "opt = torch.optim.SGD(net.parameters(), lr=0.1)\n"
        "x = torch.ones(8, 1)\n"
        "for _ in range(20):\n"
        "    opt.zero_grad()\n"
        "    loss = ((net(x) - 5) ** 2).mean()\n"
        "    loss.backward()\n"
        "    opt.step()\n",
        timeout=120,
    )
    assert cell.status == "ok", cell.messages
    out = printed(k, "print(round((net(torch.ones(1, 1)).item()), 2), net.weight.item() != w0)")
    assert out == "5.0 True", out


def test_cells_run_in_the_open_session_and_the_card_says_why_when_not(make_broker, kernels):
    broker = make_broker("--simulate-gpus", "1", "--slices", "2", "--kill-grace", "1s")
    k = kernels(ALICE, broker)
    assert k.execute("%gpu session start --idle 60s --slices 1").status == "ok"
    first = k.execute("%%gpu\nimport os\npid = os.getpid()")
    second = k.execute("%%gpu\nimport os\nsame = os.getpid() == pid\nsame")
    assert first.status == second.status == "ok", second.messages
    assert any("runs in your GPU session" in t for t in card_texts(first)), first.texts()
    assert second.of_type("execute_result")[0]["data"]["text/plain"] == "True"
    session_job = running(broker)[0]["id"]
    assert [j["id"] for j in running(broker)] == [session_job]  # no job of its own

    # More than the session holds: it queues on its own, behind the session, and says so.
    msg_id = k.submit("%%gpu --slices 2\nprint('own job')")
    seen = k.wait_for_output(msg_id, "waits for your own GPU session")
    text = "\n".join(str((c.get("data") or {}).get("text/plain", "")) for _, _, c in seen)
    assert "it asks 2 slice(s), the session holds 1 slice(s)" in text, text
    assert "%gpu session stop frees its GPU" in text, text
    k.km.interrupt_kernel()
    assert k.collect(msg_id).reply["ename"] == "KeyboardInterrupt"

    # --no-session: the same, by request.
    msg_id = k.submit("%%gpu --no-session --slices 2\nprint('own job')")
    seen = k.wait_for_output(msg_id, "waits for your own GPU session")
    assert "--no-session" in "\n".join(str(c.get("data", {})) for _, _, c in seen)
    k.km.interrupt_kernel()
    k.collect(msg_id)
    assert k.execute("%gpu session stop").status == "ok"


def one_line_interrupt(result) -> str:
    assert result.status == "error" and result.reply["ename"] == "KeyboardInterrupt"
    error = result.error()
    assert error is not None and len(error["traceback"]) == 1, error["traceback"]
    return str(error["traceback"][0])


def test_interrupt_while_queued_one_line_card_at_once_recorded_cancelled(broker, kernels):
    holder = broker.spawn("gpl-bob", "run", "--name", "bobs", "--", "sleep", "30")
    wait_for(lambda: running(broker), what="bob holds the GPU")
    k = kernels(ALICE, broker)
    msg_id = k.submit("%%gpu\nprint('never')")
    k.wait_for_output(msg_id, "waits for a GPU")
    k.km.interrupt_kernel()
    result = k.collect(msg_id)
    line = one_line_interrupt(result)
    found = re.fullmatch(r"KeyboardInterrupt: job (\d+) withdrawn; nothing ran", line)
    assert found, line
    withdrawn = [t for t, kind, c in result.messages if "withdrawn" in str(c.get("data", ""))]
    assert withdrawn and withdrawn[0] < 2.0, result.messages  # the card, at once
    assert job_state(k, int(found.group(1))).startswith(f"cancelled | cancelled by {ALICE}")
    holder.kill()
    holder.communicate(timeout=30)


def test_interrupt_while_running_one_line_recorded_cancelled_by_the_user(broker, kernels):
    k = kernels(ALICE, broker)
    msg_id = k.submit("%%gpu\nimport time\nprint('started', flush=True)\ntime.sleep(60)")
    k.wait_for_output(msg_id, "started")
    k.km.interrupt_kernel()
    result = k.collect(msg_id, timeout=30)
    line = one_line_interrupt(result)
    found = re.fullmatch(r"KeyboardInterrupt: job (\d+) cancelled; the GPU was freed", line)
    assert found, line
    assert any("cancelled by you" in t for t in card_texts(result)), result.texts()
    wait_for(lambda: running(broker) == [], what="the GPU to be freed")
    assert job_state(k, int(found.group(1))) == f"cancelled | cancelled by {ALICE}"


def test_the_card_names_the_cell_by_its_own_number(broker, kernels):
    k = kernels(ALICE, broker)
    cell = k.execute("%%gpu\nprint('hi')")
    (started,) = cell.of_type("execute_input")
    number = started["execution_count"]
    assert any(f"(cell-{number})" in t for t in card_texts(cell)), (number, cell.texts())


def test_a_bg_cell_says_what_did_not_come_back(broker, kernels):
    k = kernels(ALICE, broker)
    assert k.execute("%%gpu --bg\nimport threading\nlk = threading.Lock()\nok = 1").status == "ok"
    waited = k.execute("%gpu wait")
    assert waited.status == "ok", waited.messages
    assert "set ok" in waited.stream()
    err = waited.stream("stderr")
    assert "lk did not come back from the GPU worker (it cannot be pickled" in err, err


def test_a_refused_cell_shows_one_card_with_the_reason(make_broker, kernels):
    broker = make_broker("--simulate-gpus", "1", "--max-time", "1h")
    k = kernels(ALICE, broker)
    assert k.execute("kept = 5").status == "ok"
    cell = k.execute("%%gpu --time 2h\nkept = 6")
    assert cell.status == "ok", cell.messages
    last = card_texts(cell)[-1]
    assert "not submitted" in last and "over this broker's maximum" in last, card_texts(cell)
    assert "ask for less" in last  # the fix, on the card
    assert cell.stream("stderr") == ""  # no second, separate refusal line
    assert printed(k, "print(kept)") == "5"  # nothing ran, nothing changed
