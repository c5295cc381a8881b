"""The dashboard: a page of the gpulane service under /services/gpulane/, behind JupyterHub OAuth.

It runs inside the broker process (which the hub manages) on a loopback port the
hub's proxy forwards to, and reads the broker's state directly. Everyone with
access to the service sees the GPUs, the holders, the queue, the usage and each
user's decayed fair-share standing; only owners see their commands and their ended
jobs' reasons (admins see every user's); users cancel their own jobs, admins
(``custom:gpulane:admin``) any. What a user may not touch answers 404.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any

import tornado.web
from jupyterhub.services.auth import HubOAuthCallbackHandler, HubOAuthenticated

from gpulane.broker import board
from gpulane.broker.core import Broker
from gpulane.broker.hub_auth import ADMIN_SCOPE
from gpulane.broker.identity import NO_UID, Identity
from gpulane.broker.metrics import CONTENT_TYPE
from gpulane.broker.statuses import status_of
from gpulane.errors import Forbidden, NotFound, Refused


class _Base(HubOAuthenticated, tornado.web.RequestHandler):  # type: ignore[misc]
    def initialize(self, broker: Broker) -> None:
        self.broker = broker

    def identity(self) -> Identity:
        model = self.current_user
        return self.broker.groups.resolve_unix(
            Identity(
                uid=NO_UID,  # a browser has no Unix process: it may never be matched to one
                user=str(model["name"]),
                groups=frozenset(model.get("groups") or []),
                pid=None,
                source="hub",
                admin=bool(model.get("admin")) or ADMIN_SCOPE in set(model.get("scopes") or []),
            )
        )

    def check_xsrf_cookie(self) -> None:
        # A token in the Authorization header is not sent by a browser on its own, so
        # cross-site forgery needs the cookie path only.
        if self.request.headers.get("Authorization"):
            return
        super().check_xsrf_cookie()

    def write_json(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        message = str(error) if isinstance(error, Refused) else self._reason
        self.write_json({"error": message})


class PageHandler(_Base):
    @tornado.web.authenticated
    def get(self) -> None:
        page = resources.files("gpulane.broker").joinpath("dashboard.html").read_text()
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header(
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; img-src 'self' data:",
        )
        self.finish(page.replace("{{xsrf}}", self.xsrf_token.decode()))


class StateHandler(_Base):
    @tornado.web.authenticated
    def get(self) -> None:
        who = self.identity()
        now = self.broker.clock()
        state: dict[str, Any] = dict(self.broker.status(who))
        state["usage"] = self.broker.usage_report(now)
        state["ended"] = board.ended_jobs(self.broker, who, now)
        state["standings"] = board.standings(self.broker, now)
        state["capacity_warning"] = board.capacity_warning(self.broker)
        self.write_json(state)


class CancelHandler(_Base):
    @tornado.web.authenticated
    def post(self, job_id: str) -> None:
        who = self.identity()
        try:
            self.write_json(self.broker.cancel(who, int(job_id)))
        except (Forbidden, NotFound):
            # Another user's job is none of this user's business: not found, not forbidden.
            raise tornado.web.HTTPError(404) from None
        except Refused as error:
            raise tornado.web.HTTPError(status_of(error)) from None


class MetricsHandler(_Base):
    @tornado.web.authenticated
    def get(self) -> None:
        who = self.identity()
        if not who.admin and "read:metrics" not in set(self.current_user.get("scopes") or []):
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", CONTENT_TYPE)
        self.finish(self.broker.render_metrics())


def make_dashboard(broker: Broker) -> tornado.web.Application:
    prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/gpulane/")
    args = {"broker": broker}
    return tornado.web.Application(
        [
            (prefix, PageHandler, args),
            (prefix + "api/state", StateHandler, args),
            (prefix + r"api/jobs/(\d{1,18})/cancel", CancelHandler, args),
            (prefix + "metrics", MetricsHandler, args),
            (prefix + "oauth_callback", HubOAuthCallbackHandler),
        ],
        cookie_secret=os.urandom(32),
        xsrf_cookies=True,
    )
