"""The kernel's activity reports to the hub: the target, the body, the interval, the thread."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from traitlets.config import Config

from gpulane.config import ACTIVITY_INTERVAL_ENV
from gpulane.hub.config import activity_interval, configure
from gpulane.kernel import activity
from gpulane.kernel.activity import (
    ActivityReporter,
    HubTarget,
    activity_body,
    interval_from,
    post_activity,
    server_holds_gpu,
)

HUB_ENV = {
    "JUPYTERHUB_API_TOKEN": "secret-token-123",
    "JUPYTERHUB_API_URL": "http://127.0.0.1:8081/hub/api",
    "JUPYTERHUB_USER": "ada",
    "JUPYTERHUB_SERVER_NAME": "",
}


def test_no_target_outside_a_hub_and_the_token_never_in_its_repr():
    assert HubTarget.from_environment({}) is None
    assert HubTarget.from_environment({"JUPYTERHUB_API_URL": "http://hub/api"}) is None
    target = HubTarget.from_environment(HUB_ENV)
    assert target is not None
    assert target.url == "http://127.0.0.1:8081/hub/api/users/ada/activity"
    assert target.server_name == ""
    assert "secret-token-123" not in repr(target)
    spawner_url = {
        **HUB_ENV,
        "JUPYTERHUB_ACTIVITY_URL": "http://hub:8081/hub/api/users/ada/activity",
    }
    named = HubTarget.from_environment({**spawner_url, "JUPYTERHUB_SERVER_NAME": "big"})
    assert named is not None and named.url.startswith("http://hub:8081/")
    assert named.server_name == "big"


def test_the_body_is_what_jupyterhub_singleuser_posts():
    when = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert json.loads(activity_body("big", when)) == {
        "servers": {"big": {"last_activity": "2025-01-02T03:04:05Z"}},
        "last_activity": "2025-01-02T03:04:05Z",
    }


def test_the_interval_and_what_the_hub_sets():
    assert interval_from({}) == 60
    assert interval_from({ACTIVITY_INTERVAL_ENV: "15"}) == 15
    for bad in ("soon", "0", "-3", "1e9"):
        assert interval_from({ACTIVITY_INTERVAL_ENV: bad}) == 60
    assert [activity_interval(t) for t in (0, 20, 3600, 86400)] == [5, 5, 300, 300]
    assert activity_interval(600) == 150

    c = Config()
    configure(c, idle_timeout=600)
    assert c.Spawner.environment[ACTIVITY_INTERVAL_ENV] == "150"
    c = Config()
    configure(c, idle_culler=False)
    assert ACTIVITY_INTERVAL_ENV not in c.Spawner.environment


def test_which_servers_hold_a_gpu_themselves():
    assert not server_holds_gpu({})
    assert server_holds_gpu({"GPULANE_JOB_ID": "12"})  # a GPU profile: the server is the job
    assert server_holds_gpu({"GPULANE_PROFILE": "a100", "NVIDIA_VISIBLE_DEVICES": "GPU-1d2f"})
    assert not server_holds_gpu({"GPULANE_PROFILE": "cpu", "NVIDIA_VISIBLE_DEVICES": "void"})
    assert not server_holds_gpu({"NVIDIA_VISIBLE_DEVICES": "all"})  # no profile: a %%gpu host


class Recorder:
    def __init__(self, fail: bool = False) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, target: HubTarget, body: bytes) -> None:
        with self.lock:
            self.bodies.append(json.loads(body))
        if self.fail:
            raise OSError("connection refused")

    def count(self) -> int:
        with self.lock:
            return len(self.bodies)


def wait_until(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_posts_at_once_every_interval_while_busy_once_at_the_end_and_then_none():
    post = Recorder()
    reporter = ActivityReporter(
        HubTarget.from_environment(HUB_ENV), interval=0.1, post=post, min_spacing=0
    )
    first = reporter.begin()
    wait_until(lambda: post.count() >= 1)
    second = reporter.begin()  # two pieces of work: one stream of posts
    wait_until(lambda: post.count() >= 4)
    first.end()
    first.end()  # again: a no-op, the second still counts
    assert reporter.busy
    before = post.count()
    wait_until(lambda: post.count() >= before + 2)
    second.end()
    time.sleep(0.3)
    after_end = post.count()
    time.sleep(0.3)
    assert post.count() == after_end  # nothing while idle
    assert not reporter.busy
    assert set(post.bodies[0]["servers"]) == {""}
    reporter.close()


def test_a_failing_hub_is_logged_once_and_never_raises(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(activity, "_warn", lines.append)
    post = Recorder(fail=True)
    reporter = ActivityReporter(
        HubTarget.from_environment(HUB_ENV), interval=0.05, post=post, min_spacing=0
    )
    with reporter.holding():
        wait_until(lambda: post.count() >= 4)
    assert len(lines) == 1 and "connection refused" in lines[0]
    assert "secret-token-123" not in lines[0]
    post.fail = False
    with reporter.holding():
        wait_until(lambda: reporter.posts >= 1)
    assert lines[-1] == "gpulane: telling the hub about GPU work again"
    reporter.close()


def test_outside_a_hub_nothing_runs():
    reporter = ActivityReporter(None, post=Recorder())
    with reporter.holding():
        assert reporter.busy
    assert reporter._thread is None


@pytest.fixture
def fake_hub():
    seen: list[tuple[str, str, dict[str, Any]]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, self.headers["Authorization"], body))
            if self.path.endswith("/moved"):
                self.send_response(307)
                self.send_header("Location", "http://127.0.0.2:1/elsewhere")
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_post_sends_the_token_in_the_header_and_follows_no_redirect(fake_hub, monkeypatch):
    base, seen = fake_hub
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # ignored: the hub only
    target = HubTarget(f"{base}/hub/api/users/ada/activity", "", "secret-token-123")
    post_activity(target, activity_body("", datetime.now(UTC)))
    path, auth, body = seen[0]
    assert path == "/hub/api/users/ada/activity" and auth == "token secret-token-123"
    assert set(body) == {"servers", "last_activity"}
    moved = HubTarget(f"{base}/moved", "", "secret-token-123")
    with pytest.raises(OSError, match="307"):
        post_activity(moved, b"{}")
    assert len(seen) == 2
