"""Tell JupyterHub that this server is busy while its kernel has GPU work.

jupyterhub-idle-culler stops servers whose ``last_activity`` on the hub is older than
its timeout; a kernel running a silent ``%%gpu`` cell sends nothing, so without this
the culler would stop the server mid-job. While this kernel has GPU work (a queued or
running ``%%gpu`` cell, a ``--bg`` job not yet ended, a ``%gpu session``, or, on a server
that itself holds a GPU, any cell executing), a daemon thread posts the server's activity
to the hub as jupyterhub-singleuser does: at once when work starts, every
``GPULANE_ACTIVITY_INTERVAL`` seconds while it lasts, and once when the last ends.

Outside a hub (no ``JUPYTERHUB_API_TOKEN``) it does nothing. A failed post is logged
once per run of failures, on the kernel's own stderr (the server's log), never in the
notebook; the token goes only in the request's header. Only the standard library, and
``urllib`` only in the thread: kernels import this module at start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from gpulane.config import ACTIVITY_INTERVAL_ENV, JOB_ID_ENV, PROFILE_ENV

DEFAULT_INTERVAL = 60.0
MIN_SPACING = 1.0  # never two posts closer than this (many short cells in a row)
POST_TIMEOUT = 10.0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubTarget:
    """Where and as whom the kernel reports: the hub's activity endpoint for this server."""

    url: str
    server_name: str
    token: str = field(repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> HubTarget | None:
        """The target the hub's spawner described in the server's environment; None outside
        a hub (no token, or no activity URL and no API URL and user to build one from)."""
        token = environ.get("JUPYTERHUB_API_TOKEN", "")
        url = environ.get("JUPYTERHUB_ACTIVITY_URL", "")
        if not url and environ.get("JUPYTERHUB_API_URL") and environ.get("JUPYTERHUB_USER"):
            url = f"{environ['JUPYTERHUB_API_URL'].rstrip('/')}/users/{environ['JUPYTERHUB_USER']}/activity"
        if not token or not url:
            return None
        return cls(
            url=url,
            server_name=environ.get("JUPYTERHUB_SERVER_NAME", ""),
            token=token,
            ca_file=environ.get("JUPYTERHUB_SSL_CLIENT_CA") or None,
            cert_file=environ.get("JUPYTERHUB_SSL_CERTFILE") or None,
            key_file=environ.get("JUPYTERHUB_SSL_KEYFILE") or None,
        )


def activity_body(server_name: str, when: datetime) -> bytes:
    """The body jupyterhub-singleuser posts: the server's and the user's last activity."""
    stamp = when.astimezone(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps(
        {"servers": {server_name: {"last_activity": stamp}}, "last_activity": stamp}
    ).encode()


def interval_from(environ: Mapping[str, str]) -> float:
    """Seconds between posts: ``GPULANE_ACTIVITY_INTERVAL`` (the hub sets it from the idle
    culler's timeout), else 60; a value that is not a positive number is the default."""
    text = environ.get(ACTIVITY_INTERVAL_ENV, "").strip()
    try:
        value = float(text) if text else DEFAULT_INTERVAL
    except ValueError:
        value = DEFAULT_INTERVAL
    return value if 1 <= value <= 86_400 else DEFAULT_INTERVAL


def server_holds_gpu(environ: Mapping[str, str]) -> bool:
    """True where the whole server holds a GPU: it runs as a gpulane job (a GPU profile of
    GpulaneSpawner, or ``gpulane run -- jupyter ...``: ``GPULANE_JOB_ID``), or it is a
    Kubernetes GPU profile (``GPULANE_PROFILE``, with GPUs the device plugin made visible)."""
    if environ.get(JOB_ID_ENV):
        return True
    visible = environ.get("NVIDIA_VISIBLE_DEVICES", "").strip().lower()
    return bool(environ.get(PROFILE_ENV)) and visible not in ("", "void", "none")


def post_activity(target: HubTarget, body: bytes, timeout: float = POST_TIMEOUT) -> None:
    """POST ``body`` to the hub; raises OSError (``urllib.error.URLError``, HTTPError) on failure.
    No proxies from the environment and no redirects: the token goes to the hub only."""
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({}), NoRedirect()]
    if target.url.startswith("https:"):
        import ssl

        context = ssl.create_default_context(cafile=target.ca_file)
        if target.cert_file:
            context.load_cert_chain(target.cert_file, target.key_file)
        handlers.append(urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(
        target.url,
        data=body,
        method="POST",
        headers={"Authorization": f"token {target.token}", "Content-Type": "application/json"},
    )
    with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
        response.read()


def _describe(error: Exception) -> str:
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return f"HTTP {code} {getattr(error, 'reason', '')}".strip()
    reason = getattr(error, "reason", None)
    return str(reason or error) or type(error).__name__


class Hold:
    """One piece of GPU work the reporter counts; :meth:`end` it once (again is a no-op)."""

    def __init__(self, reporter: ActivityReporter) -> None:
        self._reporter: ActivityReporter | None = reporter

    def end(self) -> None:
        reporter, self._reporter = self._reporter, None
        if reporter is not None:
            reporter._release()


class ActivityReporter:
    """Reports this server's activity to the hub while any :class:`Hold` is open."""

    def __init__(
        self,
        target: HubTarget | None,
        interval: float = DEFAULT_INTERVAL,
        post: Callable[[HubTarget, bytes], None] = post_activity,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        min_spacing: float = MIN_SPACING,
    ) -> None:
        self.target = target
        self.interval = interval
        self.min_spacing = min_spacing
        self._post = post
        self._clock = clock
        self._holds = 0
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._last_post = -min_spacing
        self._failing = False
        self.posts = 0  # successful posts, for tests and debugging

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> ActivityReporter:
        return cls(HubTarget.from_environment(environ), interval_from(environ))

    @property
    def busy(self) -> bool:
        return self._holds > 0

    def begin(self) -> Hold:
        """Count one piece of GPU work from now; never blocks (the posts run in a thread)."""
        with self._changed:
            self._holds += 1
            if self.target is not None and self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, daemon=True, name="gpulane-activity"
                )
                self._thread.start()
            self._changed.notify_all()
        return Hold(self)

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """``with reporter.holding():`` the server is busy to the hub's culler meanwhile."""
        hold = self.begin()
        try:
            yield
        finally:
            hold.end()

    def _release(self) -> None:
        with self._changed:
            self._holds = max(0, self._holds - 1)
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._holds > 0 or self._closed)
                if self._closed:
                    return
            self._report()  # work started, or goes on
            with self._changed:
                self._changed.wait_for(
                    lambda: self._holds == 0 or self._closed, timeout=self.interval
                )
                ended = self._holds == 0 and not self._closed
            if ended:
                self._report()  # the last work ended: the hub's idle clock starts now

    def _report(self) -> None:
        target = self.target
        now = time.monotonic()
        if target is None or now - self._last_post < self.min_spacing:
            return
        self._last_post = now
        try:
            self._post(target, activity_body(target.server_name, self._clock()))
        except Exception as error:  # never in the notebook: one line in the server's log
            if not self._failing:
                self._failing = True
                _warn(
                    f"gpulane: could not tell the hub ({target.url}) that this server has GPU "
                    f"work: {_describe(error)}; its idle culler may stop the server"
                )
            return
        if self._failing:
            self._failing = False
            _warn("gpulane: telling the hub about GPU work again")
        self.posts += 1


def _warn(text: str) -> None:
    """A line on the kernel's own stderr (the server's log): sys.stderr in a kernel is the
    notebook's output."""
    if not log.handlers and sys.__stderr__ is not None:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False
    log.warning(text)
