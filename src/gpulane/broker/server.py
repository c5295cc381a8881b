"""HTTP+JSON on a Unix socket, in front of :class:`~gpulane.broker.core.Broker`.

Identity comes from the socket's peer credentials, never from the request.
Bodies are bounded and parsed into a fixed schema; anything else is answered
with a one-line JSON error, and the broker keeps serving. The core refuses with
:mod:`gpulane.errors`' kinds; :mod:`gpulane.broker.statuses` alone turns them into HTTP statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import resource
import signal
import stat
from pathlib import Path
from typing import Any, NoReturn

import tornado.web
from tornado.httpserver import HTTPServer
from tornado.iostream import StreamClosedError
from tornado.netutil import bind_unix_socket

from gpulane import __version__
from gpulane.broker import board
from gpulane.broker.connections import Acceptor, RequestRates, TooFast
from gpulane.broker.core import Broker
from gpulane.broker.groups import GroupReader
from gpulane.broker.hub_auth import HubTokenError, HubTokenNotForUs, HubTokens
from gpulane.broker.identity import NO_UID, Identity, peer_identity
from gpulane.broker.statuses import status_of
from gpulane.errors import (
    Forbidden,
    InvalidRequest,
    NotAuthenticated,
    NotFound,
    Refused,
    TooLarge,
)
from gpulane.jobs import OptionError, Request, is_finished
from gpulane.views import JobEvent

log = logging.getLogger("gpulane.broker")

MAX_BODY_BYTES = 256 * 1024
SHUTDOWN_GRACE = 5.0  # seconds open requests get to finish when the broker stops
# The schema is flat (an object, its command a list): more lists or objects than this,
# outside strings, is never a request, and refusing it first keeps the parser shallow.
MAX_NESTING = 32
# What a client reports: 0..255 from exit(), minus the signal's number when one killed it
# (subprocess's returncode); the shell's 128+N also fits.
EXIT_STATUS_MIN, EXIT_STATUS_MAX = -255, 255
# A JSON string, closed or cut off (possessive, so one linear pass): skipped when counting.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+"?', re.DOTALL)


def _pid_max() -> int:
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text())
    except (OSError, ValueError):
        return 2**22  # Linux's PID_MAX_LIMIT: no PID is ever larger


PID_MAX = _pid_max()


@tornado.web.stream_request_body
class _Handler(tornado.web.RequestHandler):
    broker: Broker
    identity: Identity

    def initialize(
        self, broker: Broker, hub_tokens: HubTokens | None = None, rates: RequestRates | None = None
    ) -> None:
        self.broker = broker
        self.hub_tokens = hub_tokens
        self.rates = rates or RequestRates(0, 0)
        self._body = bytearray()

    async def prepare(self) -> None:
        stream = self.request.connection.stream  # type: ignore[union-attr]
        header = self.request.headers.get("Authorization", "")
        peer = getattr(stream, "peer", None)
        if peer is None:
            # TCP (--api-port: a kernel in a user pod on Kubernetes, broker/tcp_api.py): no
            # peer credentials, so a hub token alone names the caller, with no uid or process.
            if not header or self.hub_tokens is None:
                raise NotAuthenticated(
                    "on this port send your server's JupyterHub token (Authorization: token ...)"
                )
            self.identity = Identity(uid=NO_UID, user="", groups=frozenset(), pid=None)
        else:
            # Credentials read at accept (connections.py): the client may have hung up since.
            self.identity = peer_identity(*peer)
        # Outside a hub the kernel's peer credentials alone decide; a token changes nothing.
        if header and self.hub_tokens is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() not in ("token", "bearer") or not token.strip():
                raise InvalidRequest("Authorization must be 'token <JupyterHub API token>'")
            try:
                self.identity = await self.hub_tokens.identity(token.strip(), self.identity)
            except HubTokenNotForUs as error:
                raise Forbidden(str(error)) from None
            except HubTokenError as error:
                raise NotAuthenticated(str(error)) from None
        try:  # the same groups for a token and for the socket (broker/groups.py)
            self.identity = await self.broker.groups.resolve(self.identity)
        except HubTokenError as error:
            raise NotAuthenticated(str(error)) from None
        length = self.request.headers.get("Content-Length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            raise TooLarge(f"request body over {MAX_BODY_BYTES} bytes; refused")
        self.request.connection.set_max_body_size(MAX_BODY_BYTES)  # type: ignore[union-attr]
        self._admit()

    def rate_limited(self) -> bool:
        """Whether this request counts against its sender's rate (lease calls do not)."""
        return True

    def _admit(self) -> None:
        who = self.identity
        # Root (the hub's spawner, the admin) is not limited; everyone else by identity.
        if not self.rate_limited() or (who.uid == 0 and who.source == "peercred"):
            return
        key = (who.source, who.uid, who.user)
        if not self.rates.admit(key):
            rate = self.broker.settings.max_requests_per_second
            raise TooFast(key, f"{who.user} sent over {rate} requests a second; slow down")

    def data_received(self, chunk: bytes) -> None:
        self._body.extend(chunk)

    def json_body(self, known: set[str] | None = None) -> dict[str, Any]:
        """The posted object (empty: ``{}``); with ``known``, other keys are refused."""
        data = parse_body(bytes(self._body))
        unknown = sorted(set(data) - known) if known is not None else []
        if unknown:
            raise InvalidRequest(f"unknown field(s) in request: {', '.join(map(ascii, unknown))}")
        return data

    def reply(self, data: Any) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, Refused):
            message = str(error)
        elif isinstance(error, tornado.web.HTTPError):
            message = error.log_message or self._reason
        else:
            message = self._reason
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message}))

    def send_error(self, status_code: int = 500, **kwargs: Any) -> None:
        error = kwargs.get("exc_info", (None, None))[1]
        if isinstance(error, Refused):
            status_code = status_of(error)
        super().send_error(status_code, **kwargs)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, TooFast):
            # A flood is thousands of these a second: one line a minute per sender.
            if self.rates.should_log(value.key):
                log.info("refused requests of %s: %s (logged once a minute)", value.key[2], value)
        elif isinstance(value, Refused):
            log.info(
                "refused %s %s for %s: %s",
                self.request.method,
                self.request.path,
                getattr(self, "identity", None) and self.identity.user,
                value,
            )
        else:
            super().log_exception(typ, value, tb)


def parse_request(data: Any) -> Request:
    """A posted request; a malformed one is refused with its one-line message."""
    try:
        return Request.from_json(data)
    except OptionError as error:
        raise InvalidRequest(str(error)) from None


def _refuse_constant(name: str) -> NoReturn:
    raise InvalidRequest(f"the request body is not valid JSON: {name} is not a number")


def parse_body(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; anything else is refused in one line."""
    if not body:
        return {}
    try:
        text = body.decode("utf-8")  # strictly: json.loads would also guess UTF-16 or -32
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    # Cheap first: most bodies have a bracket or two, and need no closer look.
    if body.count(b"[") + body.count(b"{") > MAX_NESTING:
        outside = _JSON_STRING.sub(b"", body)
        if outside.count(b"[") + outside.count(b"{") > MAX_NESTING:
            raise InvalidRequest(
                f"the request body is nested too deeply: at most {MAX_NESTING} lists or objects"
            )
    try:
        # NaN and Infinity are not JSON; huge integers raise ValueError (over 4300 digits).
        data = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return data


def _int_field(data: dict[str, Any], key: str, low: int, high: int) -> int:
    """An integer in its real range: SQLite and the kernel take no more (2**64 once was a 500)."""
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"'{key}' must be an integer from {low} to {high}")
    return value


class HealthHandler(_Handler):
    def get(self) -> None:
        self.reply({"ok": True, "version": __version__, "user": self.identity.user})


class StatusHandler(_Handler):
    def get(self) -> None:
        offset = _query_count(self, "offset")
        snapshot = self.broker.status(self.identity, offset or 0, _query_count(self, "limit"))
        warning = board.capacity_warning(self.broker)
        if warning:
            snapshot["capacity_warning"] = warning
        self.reply(snapshot)


def _query_count(handler: tornado.web.RequestHandler, name: str) -> int | None:
    value = handler.get_query_argument(name, None)
    if value is None:
        return None
    if not value.isdigit() or len(value) > 9:
        raise InvalidRequest(f"{name} must be a whole number")
    return int(value)


class JobsHandler(_Handler):
    def post(self) -> None:
        request = parse_request(self.json_body())  # Request.from_json names unknown keys
        self.set_status(201)
        self.reply(self.broker.submit(self.identity, request))


class JobHandler(_Handler):
    def get(self, job_id: str) -> None:
        self.reply(self.broker.lookup(self.identity, int(job_id)))

    def delete(self, job_id: str) -> None:
        self.reply(self.broker.cancel(self.identity, int(job_id)))


class JobActionHandler(_Handler):
    def rate_limited(self) -> bool:
        # A running job's own lease calls are O(1) and must never wait behind its user's flood.
        return self.path_args[1] not in ("heartbeat", "started", "finish")

    def post(self, job_id: str, action: str) -> None:
        # The route's 1-18 digits keep a job id inside SQLite's 2**63-1.
        who, job = self.identity, int(job_id)
        # Every body is checked, also where no field is taken: a malformed one changes nothing.
        if action == "heartbeat":
            self.json_body(known=set())
            self.reply(self.broker.heartbeat(who, job))
        elif action == "started":
            pid = _int_field(self.json_body(known={"pid"}), "pid", 1, PID_MAX)
            self.reply(self.broker.started(who, job, pid))
        elif action == "finish":
            data = self.json_body(known={"exit_status"})
            status = _int_field(data, "exit_status", EXIT_STATUS_MIN, EXIT_STATUS_MAX)
            self.reply(self.broker.finish(who, job, status))
        elif action == "cancel":
            self.json_body(known=set())
            self.reply(self.broker.cancel(who, job))
        else:
            raise NotFound(f"no action {action!r}")


class WorkerHandler(_Handler):
    """A running %%gpu job's worker pod on Kubernetes (broker/worker_jobs.py): the body is
    the kernel's connect-back address and the worker's one-time key, nothing else."""

    async def post(self, job_id: str) -> None:
        data = self.json_body(known={"connect", "key"})
        if self.broker.workers is None:
            raise NotFound("this broker starts no worker pods (it is not on Kubernetes)")
        self.reply(
            await self.broker.workers.start(
                self.identity, int(job_id), data.get("connect"), data.get("key")
            )
        )


class EventsHandler(_Handler):
    """A stream of JSON lines: the job's view and the GPU holders, at every change."""

    async def get(self, job_id: str) -> None:
        # Each event is the job's whole state: while a slow reader is sent one, only the
        # newest is kept, so an unread stream holds one event, never a growing queue.
        latest: list[JobEvent] = []
        ready = asyncio.Event()

        def deliver(event: JobEvent) -> None:
            latest[:] = [event]
            ready.set()

        unsubscribe = self.broker.watch(self.identity, int(job_id), deliver)
        # The broker stopping wakes the stream with no event: it ends cleanly, and the
        # client reconnects to the broker's next start.
        streams: set[asyncio.Event] = self.application.settings["event_streams"]
        streams.add(ready)
        self.set_header("Content-Type", "application/x-ndjson")
        self.set_header("Cache-Control", "no-store")
        try:
            while True:
                await ready.wait()
                ready.clear()
                if not latest:
                    break
                event = latest.pop()
                self.write(json.dumps(event) + "\n")
                await self.flush()
                if is_finished(event["job"]["state"]):
                    break
        except StreamClosedError:
            pass
        finally:
            streams.discard(ready)
            unsubscribe()
        if not self._finished:
            self.finish()


def make_app(broker: Broker, hub_tokens: HubTokens | None = None) -> tornado.web.Application:
    settings = broker.settings
    rates = RequestRates(settings.max_requests_per_second, settings.request_burst)
    args = {"broker": broker, "hub_tokens": hub_tokens, "rates": rates}
    return tornado.web.Application(
        [
            (r"/v1/health", HealthHandler, args),
            (r"/v1/status", StatusHandler, args),
            (r"/v1/jobs", JobsHandler, args),
            (r"/v1/jobs/(\d{1,18})", JobHandler, args),
            (r"/v1/jobs/(\d{1,18})/events", EventsHandler, args),
            (r"/v1/jobs/(\d{1,18})/worker", WorkerHandler, args),
            (r"/v1/jobs/(\d{1,18})/(heartbeat|started|finish|cancel)", JobActionHandler, args),
        ],
        default_handler_class=_NotFound,
        default_handler_args=args,
        event_streams=set(),  # the open event streams' wake-ups, for a clean stop
    )


class _NotFound(_Handler):
    async def prepare(self) -> None:
        await super().prepare()
        raise NotFound(f"no such endpoint: {self.request.method} {self.request.path}")


def prepare_socket_dir(path: Path) -> None:
    """Make the socket's folder, refusing one that another user could have planted."""
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o755)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (0, os.geteuid()):
        raise SystemExit(f"gpulane broker: {folder} is not a folder owned by us or root; refusing")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise SystemExit(f"gpulane broker: {folder} is writable by others; use a private folder")


async def serve(
    broker: Broker,
    socket_path: Path,
    dashboard_port: int | None = None,
    dashboard_ip: str = "127.0.0.1",
    tcp_api: tuple[str, int, int, int] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT; ``tcp_api`` is (ip, port, total cap, per-address cap) of
    the API on TCP for hub-token clients (broker/tcp_api.py)."""
    _raise_fd_limit()
    prepare_socket_dir(socket_path)
    # Everyone on the machine may connect: the kernel tells us who they are.
    sock = bind_unix_socket(str(socket_path), mode=0o666)
    hub_tokens = HubTokens.from_environment()
    if hub_tokens is not None:
        log.info("accepting JupyterHub tokens, checked at %s", hub_tokens.auth.api_url)
    broker.groups = GroupReader(broker.settings.group_source, hub_tokens)
    log.info("users' groups are read from %s", "the hub" if broker.groups.from_hub() else "Unix")
    app = make_app(broker, hub_tokens)
    server = HTTPServer(
        app,
        max_body_size=4 * MAX_BODY_BYTES,  # handlers refuse past MAX_BODY_BYTES with a clear 413
        body_timeout=10,
        # Between requests only: an event stream being answered is not idle.
        idle_connection_timeout=broker.settings.idle_timeout,
    )
    # Our own accept loop: per-uid caps, and no log spin when descriptors run out.
    acceptor = Acceptor(
        server,
        sock,
        broker.settings.max_connections_per_user,
        broker.settings.write_timeout,
    )
    acceptor.start()
    broker.start()
    # Share groups are the hub's too: those of users with jobs now are asked for meanwhile.
    learning = asyncio.ensure_future(broker.learn_hub_share_groups(broker.use_hub_share_groups()))
    if dashboard_port:
        from gpulane.broker.dashboard import make_dashboard

        # The hub's proxy forwards /services/gpulane/ here: loopback where it runs beside the
        # hub, the pod's address on Kubernetes (every page is behind the hub's OAuth).
        make_dashboard(broker).listen(dashboard_port, address=dashboard_ip)
        log.info("dashboard on http://%s:%d", dashboard_ip, dashboard_port)
    tcp = _listen_api(server, broker, tcp_api, hub_tokens) if tcp_api else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("gpulane broker listening on %s", socket_path)
    await stop.wait()
    learning.cancel()
    acceptor.stop()
    sock.close()
    if tcp is not None:
        tcp.stop()
        tcp.sock.close()
    server.stop()
    # Finish what is open before the store closes: event streams end cleanly, requests in
    # flight are answered, kept-alive connections are closed (clients reconnect later).
    for ready in list(app.settings["event_streams"]):
        ready.set()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.close_all_connections(), SHUTDOWN_GRACE)
    broker.stop()
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()


def _listen_api(
    server: HTTPServer,
    broker: Broker,
    api: tuple[str, int, int, int],
    hub_tokens: HubTokens | None,
) -> Acceptor:
    """The API on TCP, served by ``server`` (the socket's handlers, rates and timeouts)."""
    from gpulane.broker.tcp_api import TcpAcceptor, listen

    ip, port, max_total, max_per_address = api
    if hub_tokens is None:  # app.py refuses first; never serve TCP without the hub's word
        raise SystemExit("gpulane broker: --api-port needs the broker to run as a hub service")
    try:
        sock = listen(ip, port)
    except OSError as error:
        raise SystemExit(
            f"gpulane broker: cannot listen on {ip}:{port}: {error.strerror}"
        ) from None
    acceptor = TcpAcceptor(server, sock, max_total, max_per_address, broker.settings.write_timeout)
    acceptor.start()
    log.info("API for hub-token clients on http://%s:%d", ip, port)
    return acceptor


def _raise_fd_limit() -> None:
    # One descriptor per connected client and per watched client process.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
