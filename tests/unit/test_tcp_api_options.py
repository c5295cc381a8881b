"""The options of the broker's TCP API (``--api-ip``/``--api-port`` and its caps), from the
command line and from ``gpulane.hub.configure`` on Kubernetes, and the clients' choice of it."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from traitlets.config import Config

from gpulane import config
from gpulane.broker.app import BrokerApp
from gpulane.errors import OptionError


@pytest.fixture(autouse=True)
def no_site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "gpulane.toml"
    site.write_text("")
    monkeypatch.setenv(config.CONFIG_ENV, str(site))
    for name in (config.SOCKET_ENV, config.BROKER_URL_ENV, config.BACKEND_ENV):
        monkeypatch.delenv(name, raising=False)


def app_from(*argv: str) -> BrokerApp:
    app = BrokerApp()
    app.initialize(list(argv))
    return app


def test_the_api_is_off_by_default_and_its_caps_have_bounds() -> None:
    app = app_from()
    assert app.api_port is None and app._api() is None
    app.check_api()  # off: nothing to refuse
    assert (app.max_api_connections, app.max_api_connections_per_address) == (1024, 64)
    app = app_from("--api-ip", "0.0.0.0", "--api-port", "9874", "--max-api-connections", "0")
    assert app._api() == ("0.0.0.0", 9874, 0, 64)
    assert app_from("--api-ip", "::1", "--api-port", "1")._api() == ("::1", 1, 1024, 64)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--api-port", "0"), "--api-port '0'"),
        (("--api-port", "65536"), "--api-port '65536'"),
        (("--api-port", "http"), "--api-port 'http'"),
        (("--api-ip", "hub"), "--api-ip 'hub' must be an IP address"),
        (("--api-ip", "10.0.0.1:80"), "must be an IP address"),
        (("--max-api-connections", "-1"), "--max-api-connections '-1' must be 0"),
        (("--max-api-connections-per-address", "x"), "must be 0 (no cap)"),
    ],
)
def test_bad_api_options_are_one_line(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(OptionError) as error:
        app_from(*argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_api_needs_hub_tokens_and_its_own_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JUPYTERHUB_API_URL", raising=False)
    monkeypatch.delenv("JUPYTERHUB_API_TOKEN", raising=False)
    app = app_from("--api-port", "9874")
    with pytest.raises(OptionError, match="JupyterHub tokens only: run the broker as a"):
        app.check_api()
    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "t")
    app.check_api()
    with pytest.raises(OptionError, match="is also --dashboard-port"):
        app_from("--api-port", "9873", "--dashboard-port", "9873").check_api()


def test_the_hub_on_kubernetes_starts_the_api_and_points_user_pods_at_it() -> None:
    from gpulane.hub import configure

    c = Config()
    configure(c, gpu_source="k8s", api_port=9874, dashboard_ip="0.0.0.0")
    (service,) = [s for s in c.JupyterHub.services if s["name"] == "gpulane"]
    app = app_from(*service["command"][service["command"].index("broker") + 1 :])
    assert app._api() == ("0.0.0.0", 9874, 1024, 64)
    env = c.Spawner.environment
    assert env[config.BROKER_URL_ENV] == "http://hub:9874"
    assert env[config.BACKEND_ENV] == "kubernetes"
    assert config.SOCKET_ENV not in env
    # Elsewhere (one machine), or without the port, the socket as before and no TCP API.
    for options in ({}, {"gpu_source": "k8s"}):
        plain = Config()
        configure(plain, **options)
        (service,) = [s for s in plain.JupyterHub.services if s["name"] == "gpulane"]
        assert "--api-port" not in service["command"]
        assert config.BROKER_URL_ENV not in plain.Spawner.environment
        assert config.SOCKET_ENV in plain.Spawner.environment


def test_the_api_url_reaches_pods_where_the_chart_sets_their_environment() -> None:
    # z2jh's jupyterhub_config.py sets c.KubeSpawner.environment from singleuser.extraEnv
    # before hub.extraConfig runs; a subclass's config shadows c.Spawner.environment.
    # traitlets resolves sections by class name along the MRO, as for the real classes
    # (KubeSpawner itself wants a cluster's kubeconfig to be built).
    from traitlets import Dict
    from traitlets.config import Configurable

    from gpulane.hub import configure

    class Spawner(Configurable):
        environment = Dict().tag(config=True)

    class KubeSpawner(Spawner):
        pass

    c = Config()
    c.KubeSpawner.environment = {"GPULANE_USER_DIR": "{username}", config.SOCKET_ENV: "/x"}
    configure(c, gpu_source="k8s", api_port=9874, extra_environment={"SITE": "1"})
    with warnings.catch_warnings():  # the stand-ins lack Spawner's other options
        warnings.simplefilter("ignore", UserWarning)
        env = KubeSpawner(config=c).environment
    assert env[config.BROKER_URL_ENV] == "http://hub:9874"
    assert env[config.BACKEND_ENV] == "kubernetes"
    assert env["GPULANE_USER_DIR"] == "{username}" and env["SITE"] == "1"
    assert config.SOCKET_ENV not in env


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"api_port": 70000}, "api_port must be a port up to 65535"),
        ({"api_ip": "hub"}, "GpulaneHub.api_ip 'hub' must be an IP address"),
        ({"api_url": "https://hub:9874"}, "must be an http:// URL"),
        ({"api_url": "hub:9874"}, "must be an http:// URL"),
    ],
)
def test_bad_hub_api_values_are_refused(
    options: dict[str, object], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gpulane.hub import configure

    with pytest.raises(SystemExit) as stopped:
        configure(Config(), gpu_source="k8s", **options)
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert message in line, line


def test_clients_take_the_url_unless_a_socket_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpulane.scheduler import connect
    from gpulane.scheduler.embedded import BrokerScheduler
    from gpulane.scheduler.http import ServiceJSONClient, UnixJSONClient

    monkeypatch.setenv(config.BROKER_URL_ENV, "http://hub:9874")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "server-token")
    scheduler = connect()
    assert isinstance(scheduler, BrokerScheduler) and "GPULANE_BROKER_URL" in scheduler.reason
    assert isinstance(scheduler.client, ServiceJSONClient)
    assert (scheduler.client.host, scheduler.client.port) == ("hub", 9874)
    assert scheduler.client._auth == {"Authorization": "token server-token"}
    monkeypatch.setenv(config.SOCKET_ENV, "/tmp/gpulane-test.sock")
    named = connect()
    assert type(named.client) is UnixJSONClient  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "url", ["https://hub:9874", "hub:9874", "http://:9874", "http://hub:99999", "http://hub:x"]
)
def test_a_bad_broker_url_is_one_line(url: str) -> None:
    from gpulane.scheduler.base import SchedulerError
    from gpulane.scheduler.http import ServiceJSONClient

    with pytest.raises(SchedulerError, match="the broker's URL must be http://HOST:PORT"):
        ServiceJSONClient(url, "t")
    with pytest.raises(SchedulerError, match="needs this server's JupyterHub token"):
        ServiceJSONClient("http://hub:9874", None)


def test_no_broker_at_the_url_names_the_url_and_the_variable() -> None:
    import socket

    from gpulane.scheduler.base import SchedulerUnavailable
    from gpulane.scheduler.http import ServiceJSONClient

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ServiceJSONClient(f"http://127.0.0.1:{port}", "secret-token")
    with pytest.raises(SchedulerUnavailable) as error:
        client.request("GET", "/v1/health")
    message = str(error.value)
    assert f"http://127.0.0.1:{port}" in message and "GPULANE_BROKER_URL" in message
    assert "secret-token" not in message and "\n" not in message
