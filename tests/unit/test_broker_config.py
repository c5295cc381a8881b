"""The broker's options: command line, site file, GpulaneHub, and the GPULANE_* table."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from traitlets.config import Config

from gpulane import config
from gpulane.broker.app import BrokerApp, file_config, main
from gpulane.errors import ConfigError, OptionError

REFERENCE = Path(__file__).parents[2] / "docs" / "reference.md"


@pytest.fixture(autouse=True)
def no_site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test reads its own (absent until written) site file, never /etc's."""
    site = tmp_path / "gpulane.toml"
    site.write_text("")
    monkeypatch.setenv(config.CONFIG_ENV, str(site))
    monkeypatch.delenv(config.SOCKET_ENV, raising=False)
    return site


def app_from(*argv: str) -> BrokerApp:
    app = BrokerApp()
    app.initialize(list(argv))
    return app


def test_defaults_match_the_old_parser() -> None:
    app = app_from()
    assert (app.slices, app.max_running_per_user, app.simulate_gpus, app.dashboard_port) == (
        1,
        0,
        None,
        None,
    )
    assert (app.default_time, app.max_time, app.half_life, app.starvation_after) == (
        3600,
        86400,
        600,
        3600,
    )
    assert (app.lease_ttl, app.kill_grace, app.gpu_memory) == (10, 10, 16 * 1024**3)
    assert app.gpu_groups == frozenset() and app.admin_groups == frozenset()
    assert app.log_level == "INFO"
    assert app.socket == str(config.DEFAULT_SOCKET)


def test_the_forms_users_type_today() -> None:
    app = app_from(
        "--simulate-gpus", "1", "--gpu-memory", "24G", "--slices=2", "--max-time", "2h",
        "--gpu-groups", "a, b", "--admin-groups=staff", "--max-running-per-user", "3",
        "--default-time", "01:30:00", "--lease-ttl", "5s", "--kill-grace", "1s",
        "--dashboard-port", "9873", "--log-level", "debug", "--socket", "/tmp/x.sock",
    )  # fmt: skip
    assert (app.simulate_gpus, app.gpu_memory, app.slices, app.max_time) == (
        1,
        24 * 1024**3,
        2,
        7200,
    )
    assert app.gpu_groups == {"a", "b"} and app.admin_groups == {"staff"}
    assert (app.max_running_per_user, app.default_time, app.lease_ttl, app.kill_grace) == (
        3,
        5400,
        5,
        1,
    )
    assert (app.dashboard_port, app.log_level, app.socket) == (9873, "DEBUG", "/tmp/x.sock")
    assert app.dashboard_ip == "127.0.0.1"  # loopback unless told: a hub pod says 0.0.0.0
    assert app_from("--simulate-gpus", "1", "--dashboard-ip", "0.0.0.0").dashboard_ip == "0.0.0.0"


def test_the_storage_limits_and_their_defaults() -> None:
    app = app_from()
    assert (app.max_submits_per_minute, app.retention, app.max_ended_per_user) == (
        60,
        30 * 86400,
        10_000,
    )
    app = app_from("--max-submits-per-minute", "0", "--retention", "2d", "--max-ended-per-user=0")
    assert (app.max_submits_per_minute, app.retention, app.max_ended_per_user) == (0, 172800, 0)


def test_a_repeated_option_keeps_its_last_value() -> None:
    assert app_from("--gpu-groups", "a", "--gpu-groups", "b").gpu_groups == {"b"}


def test_socket_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.SOCKET_ENV, "/tmp/env.sock")
    assert app_from().socket == "/tmp/env.sock"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--max-running-per-user", "abc"],
            "--max-running-per-user 'abc' must be 0 (no cap) or a whole number from 1 to 10000",
        ),
        (["--slices", "many"], "--slices 'many' must be a whole number from 1 to 64"),
        (["--max-time", "soon"], "--max-time 'soon' is not a time limit; use HH:MM:SS"),
        (["--gpu-memory", "12X"], "--gpu-memory '12X' is not a size; use a size such as 512M"),
        (["--log-level", "LOUD"], "--log-level 'LOUD' is not a level; use DEBUG, INFO"),
        (["--dashboard-port", "70000"], "--dashboard-port '70000' must be a whole number"),
        (["--dashboard-ip", "hub.local"], "--dashboard-ip 'hub.local' must be an IP address"),
        (["--retention", "1d"], "--retention '1d' is too short: keep ended jobs at least 2d"),
        (["--retention", "later"], "--retention 'later' is not a time limit"),
        (
            ["--max-submits-per-minute", "-1"],
            "--max-submits-per-minute '-1' must be 0 (no cap) or a whole number from 1 to 10000",
        ),
        (["--max-ended-per-user", "1e9"], "--max-ended-per-user '1e9' must be 0 (no cap)"),
        (["--bogus", "1"], "unknown option --bogus"),
        (["--BrokerApp.bogus=1"], "unknown option --BrokerApp.bogus"),
        (["stray"], "unexpected argument 'stray'"),
        (["--slices"], "--slices needs a value"),
        (["--simulate-gpus", "1", "--lease-ttl"], "--lease-ttl needs a value"),
        (["--bogus"], "unknown option --bogus"),
    ],
)
def test_a_bad_command_line_is_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpulane: ") and message in err, err
    assert len(err.strip().splitlines()) == 1, err


def test_the_site_file_sets_options_and_the_command_line_wins(no_site_file: Path) -> None:
    no_site_file.write_text(
        '[broker]\nslices = 2\nmax_time = "2h"\ngpu_groups = ["gpu", "ml"]\nlease_ttl = "20s"\n'
    )
    app = app_from("--lease-ttl", "3s")
    assert (app.slices, app.max_time, app.gpu_groups, app.lease_ttl) == (
        2,
        7200,
        {"gpu", "ml"},
        3,
    )


def test_the_files_socket_yields_to_the_environment(
    no_site_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_site_file.write_text('[broker]\nsocket = "/tmp/file.sock"\n')
    assert app_from().socket == "/tmp/file.sock"
    monkeypatch.setenv(config.SOCKET_ENV, "/tmp/env.sock")
    assert app_from().socket == "/tmp/env.sock"  # as the clients read it


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('slices = "x"', "[broker] slices 'x' must be a whole number from 1 to 64"),
        ('max_time = "later"', "[broker] max_time 'later' is not a time limit"),
        ("colour = 1", "[broker] has no setting 'colour'"),
        ("slices = true", "[broker] slices = True is not a value"),
    ],
)
def test_a_bad_site_file_names_the_file_and_key(
    no_site_file: Path, toml: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    no_site_file.write_text(f"[broker]\n{toml}\n")
    with pytest.raises((OptionError, ConfigError), match=re.escape(message)):
        file_config()
    assert main(["--simulate-gpus", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpulane: {no_site_file}: ") and message in err, err
    assert len(err.strip().splitlines()) == 1


def test_the_real_command_gives_one_line_and_status_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpulane", "broker", "--max-running-per-user", "abc"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "gpulane: --max-running-per-user 'abc' must be 0 (no cap) or a whole number from 1 to 10000"
    ]


def test_broker_help_lists_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpulane", "broker", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for name in BrokerApp.class_own_traits(config=True):
        assert f"--{name.replace('_', '-')}=" in result.stdout, name


# ------------------------------------------------------------------ GpulaneHub


def test_hub_typed_options_reach_the_broker_command() -> None:
    from gpulane.hub.config import GpulaneHub

    hub = GpulaneHub(
        config=Config(), max_running_per_user=2, max_time="8h", gpu_groups={"gpu", "ml"}
    )
    command = hub.broker_command()
    tail = command[command.index("broker") + 1 :]
    app = app_from(*tail)  # the broker accepts what the hub writes
    assert (app.max_running_per_user, app.max_time, app.gpu_groups) == (2, 8 * 3600, {"gpu", "ml"})
    assert "--default-time" not in tail  # defaults stay off the command line


def test_hub_dashboard_on_the_hub_pods_service() -> None:
    # On zero-to-jupyterhub the proxy runs in its own pod: the dashboard listens on the hub
    # pod's addresses and the service's URL is the hub's Service (k8s_hub_values writes both).
    from gpulane.hub import configure

    c = Config()
    configure(c, dashboard_ip="0.0.0.0", dashboard_url="http://hub:9873")
    (service,) = [s for s in c.JupyterHub.services if s["name"] == "gpulane"]
    assert service["url"] == "http://hub:9873"
    tail = service["command"][service["command"].index("broker") + 1 :]
    app = app_from(*tail)
    assert (app.dashboard_ip, app.dashboard_port) == ("0.0.0.0", 9873)
    plain = Config()
    configure(plain)
    (service,) = [s for s in plain.JupyterHub.services if s["name"] == "gpulane"]
    assert service["url"] == "http://127.0.0.1:9873" and "--dashboard-ip" not in service["command"]


def test_hub_servers_outlive_a_hub_restart_unless_the_admin_says_otherwise() -> None:
    from gpulane.hub import configure

    kept = Config()
    configure(kept)
    assert kept.JupyterHub.cleanup_servers is False
    explicit = Config()
    explicit.JupyterHub.cleanup_servers = True
    configure(explicit)
    assert explicit.JupyterHub.cleanup_servers is True


def test_hub_broker_args_still_work_but_warn(caplog: pytest.LogCaptureFixture) -> None:
    from gpulane.hub.config import GpulaneHub

    hub = GpulaneHub(config=Config())
    hub.log = logging.getLogger("test-hub")
    with caplog.at_level(logging.WARNING, logger="test-hub"):
        hub.broker_args = ["--gpu-groups", "gpu", "--max-running-per-user", "2"]
    assert hub.broker_command()[-4:] == ["--gpu-groups", "gpu", "--max-running-per-user", "2"]
    assert "GpulaneHub.broker_args is deprecated" in caplog.text
    assert "use GpulaneHub.gpu_groups instead of --gpu-groups" in caplog.text
    assert "use GpulaneHub.max_running_per_user instead" in caplog.text


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("max_time", "2x", "GpulaneHub.max_time '2x' is not a time limit; use HH:MM:SS"),
        ("max_running_per_user", -1, "GpulaneHub.max_running_per_user -1 must be 0 (no cap)"),
        ("dashboard_ip", "hub", "GpulaneHub.dashboard_ip 'hub' must be an IP address"),
        ("dashboard_url", "hub:9873", "GpulaneHub.dashboard_url 'hub:9873' must be an http(s)://"),
    ],
)
def test_a_bad_hub_value_is_one_line_and_status_2(
    option: str, value: object, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpulane.hub.config import configure

    with pytest.raises(SystemExit) as exited:
        configure(Config(), **{option: value})
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("gpulane: ") and message in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------ GPULANE_* variables


def test_every_gpulane_variable_in_the_source_is_in_config() -> None:
    source = Path(config.__file__).parent
    named = {
        name
        for path in source.rglob("*.py")
        for name in re.findall(r"GPULANE_[A-Z_]*[A-Z]", path.read_text())
    }
    assert named <= {var.name for var in config.ENVIRONMENT}, named


def test_no_module_but_config_spells_a_variable_name_in_code() -> None:
    source = Path(config.__file__).parent
    quoted = re.compile(r"""["']GPULANE_[A-Z_]+["']""")
    offenders = [
        f"{path.relative_to(source)}:{number}"
        for path in source.rglob("*.py")
        # worker_env.py: the names a cold worker reads, which config.py imports and lists
        if path.relative_to(source).as_posix() not in ("config.py", "worker_env.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if quoted.search(line)
    ]
    assert offenders == []


def test_the_reference_lists_exactly_the_variables_of_config() -> None:
    text = REFERENCE.read_text()
    documented = [line for line in text.splitlines() if line.startswith("| `GPULANE_")]
    assert documented == config.environment_rows()
