"""Real kernels report their server's activity to a (fake) hub exactly while they have GPU work."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

ALICE = "gpl-alice"
TOKEN = "kernel-activity-token"


class FakeHub:
    """Records each activity post: (monotonic time, server names)."""

    def __init__(self) -> None:
        self.posts: list[tuple[float, list[str]]] = []
        self.lock = threading.Lock()

    def between(self, start: float, end: float) -> int:
        with self.lock:
            return sum(1 for when, _ in self.posts if start <= when <= end)


@pytest.fixture
def fake_hub() -> Iterator[tuple[str, FakeHub]]:
    hub = FakeHub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.headers["Authorization"] == f"token {TOKEN}":
                with hub.lock:
                    hub.posts.append((time.monotonic(), sorted(body["servers"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hub/api/users/{ALICE}/activity", hub
    server.shutdown()
    server.server_close()


def hub_env(url: str, **more: str) -> dict[str, str]:
    return {
        "JUPYTERHUB_API_TOKEN": TOKEN,
        "JUPYTERHUB_ACTIVITY_URL": url,
        "JUPYTERHUB_SERVER_NAME": "",
        "GPULANE_ACTIVITY_INTERVAL": "1",
        **more,
    }


def test_a_bg_job_keeps_reporting_until_it_ends_and_a_plain_cell_never_does(
    make_broker, kernels, fake_hub
):
    url, hub = fake_hub
    k = kernels(ALICE, make_broker("--simulate-gpus", "1"), hub_env(url))
    start = time.monotonic()
    assert k.execute("import time\ntime.sleep(2.5)").status == "ok"  # not GPU work
    assert hub.between(start, time.monotonic()) == 0
    submitted = time.monotonic()
    bg = k.execute("%%gpu --bg --time 1m\nimport time\ntime.sleep(4)\ndone = 1")
    assert bg.status == "ok"
    wait = k.execute("%gpu wait")  # until the job has ended
    assert wait.status == "ok", wait.messages
    ended = time.monotonic()
    assert hub.between(submitted, ended + 0.5) >= 4  # at once, then every second
    time.sleep(2.5)
    assert hub.between(ended + 0.5, time.monotonic()) == 0  # no GPU work: no reports
    assert {tuple(names) for _, names in hub.posts} == {("",)}


def test_on_a_server_that_holds_a_gpu_any_running_cell_reports(kernels, fake_hub):
    url, hub = fake_hub
    # GPULANE_JOB_ID: the server runs as a gpulane job (a GPU profile of GpulaneSpawner).
    k = kernels(ALICE, None, hub_env(url, GPULANE_JOB_ID="7"))
    start = time.monotonic()
    assert k.execute("import time\ntime.sleep(3.5)").status == "ok"
    ended = time.monotonic()
    assert hub.between(start, ended + 0.5) >= 3
    time.sleep(2.5)
    assert hub.between(ended + 0.5, time.monotonic()) == 0  # an idle GPU server stays idle
