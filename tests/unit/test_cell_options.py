"""``%%gpu`` options through IPython's magic_arguments: parsing, one-line errors, ``%%gpu?``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from gpulane.errors import OptionError
from gpulane.kernel.options import (
    DEFAULT_MAX_TRANSFER,
    DEFAULT_SESSION_IDLE,
    help_text,
    parse_cell_options,
    parse_session_options,
)

OPTIONS = (
    "--gpus",
    "--slices",
    "--time",
    "--mem",
    "--name",
    "--bg",
    "--return",
    "--no-return",
    "--session",
    "--max-transfer",
    "--idle",
)


def test_defaults() -> None:
    options = parse_cell_options("", default_name="cell-7")
    assert options.request.gpus == 1 and options.request.slices == 0
    assert options.request.time_limit is None and options.request.mem is None
    assert options.request.name == "cell-7"
    assert options.returns is None and not options.background and not options.session
    assert options.max_transfer == DEFAULT_MAX_TRANSFER


def test_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPULANE_MAX_TRANSFER", raising=False)
    options = parse_cell_options(
        "--slices 2 --time 90m --mem 8G --name my-run --bg --return a,b --max-transfer 1G"
    )
    assert options.request.slices == 2
    assert options.request.time_limit == 90 * 60
    assert options.request.mem == 8 * 1024**3
    assert options.request.name == "my-run"
    assert options.background and options.returns == ("a", "b")
    assert options.max_transfer == 1024**3
    assert parse_cell_options("--no-return --session").returns == ()
    assert parse_cell_options("--session").session


def test_the_seeds_key_value_form_means_the_same() -> None:
    seed = parse_cell_options("time=02:00:00 mem=8G gpus=2 max_transfer=1M name=x")
    flags = parse_cell_options("--time 02:00:00 --mem 8G --gpus 2 --max-transfer 1M --name x")
    assert seed == flags
    # A word that only looks like key=value stays a word (and is refused as one).
    with pytest.raises(OptionError, match="unrecognized arguments: colour=red"):
        parse_cell_options("colour=red")


def test_the_transfer_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPULANE_MAX_TRANSFER", "16M")
    assert parse_cell_options("").max_transfer == 16 * 1024**2
    assert parse_cell_options("--max-transfer 1M").max_transfer == 1024**2
    monkeypatch.setenv("GPULANE_MAX_TRANSFER", "lots")
    with pytest.raises(OptionError, match="GPULANE_MAX_TRANSFER 'lots' is not a size"):
        parse_cell_options("")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("--gpus x", "%%gpu: --gpus 'x' must be a whole number from 1 to 64"),
        ("time=soon", "%%gpu: --time 'soon' is not a time limit"),
        ("--gpus 1 --slices 1", "%%gpu: argument --slices: not allowed with argument --gpus"),
        ("--return a --no-return", "not allowed with argument --return"),
        ("--return 1x", "%%gpu: --return '1x': 1x is not a Python name"),
        ("--frobnicate", "%%gpu: unrecognized arguments: --frobnicate"),
        ("--time", "%%gpu: argument --time: expected one argument"),
        ("--name 'unclosed", "%%gpu: cannot read the options: No closing quotation"),
        ("--idle 5m", "%%gpu: --idle goes with %gpu session start"),
        ("--mem 8 parsecs", "unrecognized arguments: parsecs"),
    ],
)
def test_bad_options_are_one_line(line: str, expected: str) -> None:
    with pytest.raises(OptionError) as caught:
        parse_cell_options(line)
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message


def test_session_options() -> None:
    session = parse_session_options("--idle 5m --gpus 2 --time 1h")
    assert session.idle == 300.0
    assert session.cell.request.gpus == 2 and session.cell.request.time_limit == 3600
    assert session.cell.request.name == "gpu-session"
    assert parse_session_options("").idle == DEFAULT_SESSION_IDLE
    with pytest.raises(OptionError, match=r"^%gpu session start: --idle 'never' is not a time"):
        parse_session_options("--idle never")
    with pytest.raises(OptionError, match=r"^%gpu session start: argument --idle: expected"):
        parse_session_options("--idle")


def test_help_lists_every_option_with_its_help() -> None:
    text = help_text()
    for option in OPTIONS:
        assert option in text, option
    assert "K time-sliced slices of one GPU" in text
    assert "only these names come back" in text


# --------------------------------------------------------------------------- in a real shell


@pytest.fixture(scope="module")
def shell() -> Iterator[Any]:
    """An in-process IPython shell with gpulane loaded (no warm worker, no broker needed)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GPULANE_WARM_WORKER", "0")
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "gpulane")
        yield ip
        ip.magics_manager.registry["GpuMagics"].shutdown()


def test_the_magics_docstring_lists_every_option(shell: Any) -> None:
    for doc in (shell.find_cell_magic("gpu").__doc__, shell.find_line_magic("gpu").__doc__):
        for option in OPTIONS:
            assert option in doc, option
        for command in ("%gpu status", "%gpu cancel", "%gpu wait", "%gpu result", "session stop"):
            assert command in doc, command


def test_question_mark_shows_the_options(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_cell("%%gpu?")
    shown = capsys.readouterr().out
    for option in OPTIONS:
        assert option in shown, option


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("%%gpu --gpus 1 --slices 1\nprint('ran')", "%%gpu: argument --slices: not allowed"),
        ("%%gpu --frobnicate\nprint('ran')", "%%gpu: unrecognized arguments: --frobnicate"),
        ("%gpu frobnicate", "%gpu frobnicate: unknown; use status, cancel, wait, result"),
        ("%gpu cancel", "%gpu cancel: which job? give its number"),
        ("%gpu cancel x", "%gpu cancel: JOB 'x' must be a whole number"),
        ("%gpu wait -1", "%gpu wait: JOB '-1' must be a whole number"),
        ("%gpu session", "%gpu session: start or stop?"),
        ("%gpu session start --time soon", "%gpu session start: --time 'soon' is not a time"),
    ],
)
def test_bad_magic_input_is_a_one_line_usage_error_and_the_kernel_keeps_its_state(
    shell: Any, capsys: pytest.CaptureFixture[str], cell: str, expected: str
) -> None:
    shell.run_cell("kept = 41")
    capsys.readouterr()
    result = shell.run_cell(cell)
    captured = capsys.readouterr()
    assert type(result.error_in_exec).__name__ == "UsageError"
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("UsageError: "), captured.err
    assert expected in lines[0]
    assert "ran" not in captured.out
    assert shell.run_cell("kept + 1").result == 42


def test_help_words_print_the_usage(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    for line in ("%gpu", "%gpu --help", "%gpu help"):
        shell.run_cell(line)
        shown = capsys.readouterr().out
        assert "%gpu session start" in shown and "--slices" in shown and "--bg" in shown
