"""The broker's API on a TCP address, for clients that only a JupyterHub token names.

On Kubernetes the broker runs in the hub pod and kernels in other pods, which cannot
reach its Unix socket. ``--api-ip``/``--api-port`` serve the same handlers
(:func:`gpulane.broker.server.make_app`, through the same HTTP server, so the same
per-user request rates and idle and write timeouts) on TCP. There are no peer
credentials there: every request must carry a hub token (``Authorization: token ...``),
checked by :class:`~gpulane.broker.hub_auth.HubTokens` exactly as on the socket; a
request without one is answered 401 (server.py's ``_Handler.prepare``). Nothing the
client says names it, and it is never root: its identity has no uid and no process, so
its leases are kept by heartbeats alone.

What one client address may take: at most ``max_per_address`` open connections, and
all TCP clients together ``max_total``; past either, a connection is answered with one
line (503) and closed, and the broker goes on answering everyone else. No TLS: the
traffic stays inside the cluster, and the NetworkPolicy that ``gpulane k8s hub-values``
writes lets only user pods reach this port (docs/admin-kubernetes.md).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Callable

from tornado.httpserver import HTTPServer

from gpulane.broker.connections import MAX_WRITE_BUFFER, Acceptor, _CountedStream, refusal

BACKLOG = 128


def listen(ip: str, port: int) -> socket.socket:
    """A listening TCP socket on ``ip`` (a literal, as ``--api-ip`` checks) and ``port``."""
    family = socket.AF_INET6 if ipaddress.ip_address(ip).version == 6 else socket.AF_INET
    return socket.create_server((ip, port), family=family, backlog=BACKLOG)


class TcpAcceptor(Acceptor):
    """Accepts TCP connections for ``server``, capped in all and per client address."""

    def __init__(
        self,
        server: HTTPServer,
        sock: socket.socket,
        max_total: int,
        max_per_address: int,
        write_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(server, sock, max_per_address, write_timeout, clock)
        self.max_total = max_total  # 0: no cap

    def _admit(self, conn: socket.socket) -> None:
        try:
            address = conn.getpeername()
        except OSError:
            conn.close()
            return
        host = str(address[0])
        if self.max_total and len(self.streams) >= self.max_total:
            self._turn_away(
                conn,
                "all",
                f"the broker's API already has {self.max_total} open TCP connections, "
                "the most allowed; try again shortly",
            )
            return
        held = self.counts.get(host, 0)
        if self.max_per_user and held >= self.max_per_user:
            self._turn_away(
                conn,
                host,
                f"address {host} already holds {self.max_per_user} connections to the "
                "broker's API, the most allowed; close some",
            )
            return
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.counts[host] = held + 1
        try:
            stream = _CountedStream(
                conn,
                self,
                None,
                key=host,
                max_buffer_size=self.server.max_buffer_size,
                read_chunk_size=self.server.read_chunk_size,
                max_write_buffer_size=MAX_WRITE_BUFFER,
            )
        except Exception:
            self.counts[host] -= 1
            conn.close()
            raise
        self.streams.add(stream)
        self.server.handle_stream(stream, address)

    def _turn_away(self, conn: socket.socket, key: str, message: str) -> None:
        with contextlib.suppress(OSError):
            conn.send(refusal(503, "Service Unavailable", message), socket.MSG_DONTWAIT)
        conn.close()
        self._refused[key] = self._refused.get(key, 0) + 1
        if self._note(("cap", key), f"{message} (refused {self._refused[key]} so far)"):
            self._refused[key] = 0
