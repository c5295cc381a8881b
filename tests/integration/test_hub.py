"""End to end through a real JupyterHub started from the project's own configuration."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from gpulane.scheduler.base import SchedulerError
from gpulane.scheduler.http import UnixJSONClient
from tests.support.hubclient import HubUser

ADA, BEN = "gpl-demo-ada", "gpl-demo-ben"  # ada is the gpulane admin of the demo


@pytest.fixture(scope="module")
def users(hub):
    """Both demo users logged in, each with a token, a running server and a kernel."""
    logged = {}
    for name in (ADA, BEN):
        user = HubUser(hub.url, name)
        assert user.login(hub.passwords[name]).status_code == 302
        user.make_token()
        user.start_server()
        user.kernel = user.new_kernel()
        logged[name] = user
    yield logged
    for user in logged.values():
        user.close()


def broker(hub, token: str | None, method: str, path: str):
    """One request to the hub's broker over its socket, as the holder of ``token``."""
    client = UnixJSONClient(hub.state / "run" / "broker.sock", token=token)
    try:
        return client.request(method, path)
    finally:
        client.close()


def test_two_users_queue_share_variables_and_both_finish(hub, users):
    ada, ben = users[ADA], users[BEN]
    assert ada.run(ada.kernel, "base = 10").reply["status"] == "ok"
    assert ben.run(ben.kernel, "base = 20").reply["status"] == "ok"
    results = {}

    def ada_cell() -> None:
        results[ADA] = ada.run(
            ada.kernel,
            "%%gpu\nimport time\nprint('ada on the GPU', flush=True)\ntime.sleep(3)\nout = base + 1",
        )

    first = threading.Thread(target=ada_cell)
    first.start()
    deadline = time.monotonic() + 60
    while not broker(hub, ada.token, "GET", "/v1/status")["running"]:
        assert time.monotonic() < deadline, "ada's cell never got the GPU"
        time.sleep(0.1)
    results[BEN] = ben.run(ben.kernel, "%%gpu\nprint('ben on the GPU')\nout = base + 2")
    first.join(120)
    assert results[ADA].reply["status"] == "ok" and "ada on the GPU" in results[ADA].stream()
    assert results[BEN].reply["status"] == "ok" and "ben on the GPU" in results[BEN].stream()
    ben_card = "\n".join(results[BEN].texts())
    assert "position 1 in the queue" in ben_card and f"GPU 0: {ADA}, running" in ben_card
    assert ada.run(ada.kernel, "print(out)").stream().strip() == "11"
    assert ben.run(ben.kernel, "print(out)").stream().strip() == "22"


def test_the_broker_knows_hub_users_by_their_tokens(hub, users):
    # The test runs as root; the token, checked against the hub, names the user.
    assert broker(hub, users[BEN].token, "GET", "/v1/health")["user"] == BEN
    with pytest.raises(SchedulerError, match="not valid"):
        broker(hub, "forged-token-0123456789", "GET", "/v1/health")


def test_dashboard_refuses_strangers_and_forged_tokens(hub):
    anonymous = requests.get(
        f"{hub.url}/services/gpulane/api/state", allow_redirects=False, timeout=30
    )
    assert anonymous.status_code in (302, 403)
    if anonymous.status_code == 302:
        assert "/hub/api/oauth2/authorize" in anonymous.headers["Location"]
    forged = requests.get(
        f"{hub.url}/services/gpulane/api/state",
        headers={"Authorization": "token forged-0123456789"},
        allow_redirects=False,
        timeout=30,
    )
    assert forged.status_code in (302, 403)


def test_cancel_rights_on_the_dashboard_and_the_metrics(hub, users):
    ada, ben = users[ADA], users[BEN]
    holder = threading.Thread(
        target=lambda: ada.run(ada.kernel, "%%gpu --bg --name adas\nimport time\ntime.sleep(60)")
    )
    holder.start()
    holder.join(60)
    deadline = time.monotonic() + 60
    running: list = []
    while not running:
        running = broker(hub, ada.token, "GET", "/v1/status")["running"]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    job = running[0]["id"]
    state = requests.get(
        f"{hub.url}/services/gpulane/api/state",
        headers={"Authorization": f"token {ben.token}"},
        timeout=30,
    ).json()
    seen = state["running"][0]
    assert seen["user"] == ADA and "command" not in seen  # no one sees another's code
    refused = requests.post(
        f"{hub.url}/services/gpulane/api/jobs/{job}/cancel",
        headers={"Authorization": f"token {ben.token}"},
        timeout=30,
    )
    assert refused.status_code == 404
    assert broker(hub, ada.token, "GET", "/v1/status")["running"]
    # On the socket as on the dashboard, another user's job is unseen.
    with pytest.raises(SchedulerError, match=f"^no job {job}$"):
        broker(hub, ben.token, "DELETE", f"/v1/jobs/{job}")
    metrics = requests.get(
        f"{hub.url}/services/gpulane/metrics",
        headers={"Authorization": f"token {ben.token}"},
        timeout=30,
    )
    assert metrics.status_code == 404
    admin_metrics = requests.get(
        f"{hub.url}/services/gpulane/metrics",
        headers={"Authorization": f"token {ada.token}"},
        timeout=30,
    )
    assert admin_metrics.status_code == 200 and "gpulane_grants_total" in admin_metrics.text
    cancelled = requests.post(
        f"{hub.url}/services/gpulane/api/jobs/{job}/cancel",
        headers={"Authorization": f"token {ada.token}"},
        timeout=30,
    )
    assert cancelled.status_code == 200
    deadline = time.monotonic() + 30
    while broker(hub, ada.token, "GET", "/v1/status")["running"]:
        assert time.monotonic() < deadline, "the cancelled job kept the GPU"
        time.sleep(0.2)
