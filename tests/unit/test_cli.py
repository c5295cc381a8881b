"""The ``gpulane`` command line: its commands, usage errors, and what ``gpulane run`` imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpulane import cli

COMMANDS = ["broker", "run", "status", "cancel", "demo", "hub", "slurm", "doctor", "k8s"]


def subcommands(parser: object) -> dict[str, object]:
    action = next(a for a in parser._actions if a.dest == "command")  # type: ignore[attr-defined]
    return dict(action.choices)


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"\n    {name} " in out


def test_every_command_names_its_function() -> None:
    parser = cli.build_parser()
    assert list(subcommands(parser)) == COMMANDS
    for argv in (
        ["broker"],
        ["run", "--", "true"],
        ["status"],
        ["cancel", "3"],
        ["demo", "queue"],
        ["hub", "install-kernel-extension"],
        ["slurm", "config"],
        ["doctor"],
        ["k8s", "time-slicing", "--disable"],
        [
            "k8s",
            "hub-values",
            "--profiles=p",
            "--public-url=u",
            "--authorize-url=a",
            "--token-url=t",
            "--userdata-url=d",
            "--client-id=c",
        ],
    ):
        assert callable(parser.parse_args(argv).func), argv


@pytest.mark.parametrize("name", COMMANDS)
def test_defining_one_command_gives_it_the_same_options(name: str) -> None:
    # main() defines only the chosen command's options; that parser must be the same one.
    whole = subcommands(cli.build_parser())[name]
    alone = subcommands(cli.build_parser(only=name))[name]
    assert alone.format_help() == whole.format_help()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--bogus", "--", "true"],
        ["run", "--gpus", "x", "--", "true"],
        ["run"],
        ["run", "--"],
        ["nosuchcommand"],
        [],
        ["cancel", "-5"],
        ["slurm"],
    ],
)
def test_a_usage_error_is_one_line_and_exit_status_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        status = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert status == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("gpulane")


def test_run_without_a_command_says_how(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--gpus", "1"]) == 2
    assert capsys.readouterr().err == (
        "gpulane: gpulane run needs a command after --, "
        "e.g. gpulane run --gpus 1 -- python train.py\n"
    )


def test_no_broker_is_one_line_and_exit_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPULANE_CONFIG", str(tmp_path / "none.toml"))
    # No wait for a restarting broker here (tests/faults/test_restart.py covers the wait).
    monkeypatch.setattr("gpulane.scheduler.embedded.CONNECT_WINDOW", 0.0)
    (tmp_path / "none.toml").write_text("")
    socket = str(tmp_path / "nobody.sock")
    for argv in (
        ["status", "--socket", socket],
        ["cancel", "3", "--socket", socket],
        ["run", "--socket", socket, "--", "true"],
    ):
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"gpulane: no gpulane broker answers at {socket} (")
        assert len(err.strip().splitlines()) == 1


HEAVY = {"traitlets", "tornado", "IPython", "httpx", "yaml", "kubernetes", "jupyterhub"}
HEAVY_GPULANE = (
    "gpulane.broker",
    "gpulane.hub",
    "gpulane.kernel",
    "gpulane.demo",
    "gpulane.admin.doctor",
    "gpulane.admin.slurm_config",
    "gpulane.admin.k8s_time_slicing",
    "gpulane.admin.k8s_hub_values",
    "gpulane.scheduler.slurm",
)


def test_the_run_path_imports_only_what_run_uses(tmp_path: Path) -> None:
    # The whole run path up to the broker's socket (none there: it fails after connecting).
    code = (
        "import sys, json\n"
        "from gpulane.cli import main\n"
        "import gpulane.scheduler.embedded as embedded; embedded.CONNECT_WINDOW = 0.0\n"
        f"status = main(['run', '--socket', {str(tmp_path / 'nobody.sock')!r}, '--', 'true'])\n"
        "print(json.dumps([status, sorted(sys.modules)]))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "GPULANE_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    status, modules = json.loads(done.stdout)
    assert status == 1 and "no gpulane broker answers" in done.stderr
    assert "gpulane.scheduler.embedded" in modules  # the check reached the client
    assert sorted(m for m in modules if m.split(".")[0] in HEAVY) == []
    assert sorted(m for m in modules if m.startswith(HEAVY_GPULANE)) == []
