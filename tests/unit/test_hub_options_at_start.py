"""GpulaneHub options count wherever they stand in jupyterhub_config.py (issue 15, item 3).

Inside the hub, ``configure`` applies the settings when the hub starts, after the whole
file ran: an option set after the call is used, and a bad one stops the hub at start.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

jupyterhub_app = pytest.importorskip("jupyterhub.app")


@pytest.fixture
def hub_app() -> Iterator[Any]:
    app = jupyterhub_app.JupyterHub.instance()
    try:
        yield app
    finally:
        jupyterhub_app.JupyterHub.clear_instance()


def load(app: Any, tmp_path: Path, body: str) -> None:
    config = tmp_path / "jupyterhub_config.py"
    config.write_text("from gpulane.hub import configure\n" + body)
    app.load_config_file(str(config))
    app.init_logging()  # the first thing JupyterHub does after loading the file


def culler(app: Any) -> list[str]:
    return next(s["command"] for s in app.services if s["name"] == "idle-culler")


def broker(app: Any) -> list[str]:
    return next(s["command"] for s in app.services if s["name"] == "gpulane")


def test_an_option_set_after_configure_is_used(hub_app: Any, tmp_path: Path) -> None:
    load(
        hub_app,
        tmp_path,
        "configure(c, slices=2)\n"
        "c.GpulaneHub.idle_timeout = 60\n"
        "c.GpulaneHub.gpu_groups = {'gpu'}\n"
        "c.Spawner.environment = {'LAB': '1'}\n",
    )
    assert "--timeout=60" in culler(hub_app)
    assert culler(hub_app)[1:3] == ["-m", "gpulane.hub.culler"]  # stops at SIGINT (item 5)
    command = broker(hub_app)
    assert command[command.index("--slices") + 1] == "2"
    assert command[command.index("--gpu-groups") + 1] == "gpu"
    environment = hub_app.config.Spawner.environment
    assert environment["LAB"] == "1" and environment["GPULANE_SOCKET"]
    assert [s["name"] for s in hub_app.services] == ["gpulane", "idle-culler"]  # once each


def test_the_last_assignment_wins(hub_app: Any, tmp_path: Path) -> None:
    load(hub_app, tmp_path, "configure(c, slices=2)\nc.GpulaneHub.slices = 3\n")
    command = broker(hub_app)
    assert command[command.index("--slices") + 1] == "3"


def test_a_bad_option_set_late_stops_the_hub_at_start(
    hub_app: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        load(hub_app, tmp_path, "configure(c)\nc.GpulaneHub.slices = 0\n")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == "gpulane: GpulaneHub.slices must be positive, not 0"


def test_admins_and_the_group_source_reach_the_broker(hub_app: Any, tmp_path: Path) -> None:
    load(
        hub_app,
        tmp_path,
        "configure(c, admin_users={'alice'}, admin_groups={'gpu-admin'}, group_source='unix')\n",
    )
    command = broker(hub_app)
    assert command[command.index("--admin-users") + 1] == "alice"
    assert command[command.index("--admin-groups") + 1] == "gpu-admin"
    assert command[command.index("--group-source") + 1] == "unix"
