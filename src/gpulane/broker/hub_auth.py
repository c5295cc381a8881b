"""The second identity source: a JupyterHub API token, checked against the hub.

Where the broker runs as a JupyterHub-managed service, the hub gives it its API
URL and token. A client (a kernel inside a single-user server) sends the token
its server carries (``Authorization: token ...``); the broker asks the hub whose
token it is, caches the answer briefly, and from then on acts for that hub user,
whichever spawner started the server (also SimpleLocalProcessSpawner, where every
server runs as one Unix user).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from typing import Any

from gpulane.broker.identity import Identity

log = logging.getLogger("gpulane.broker")

ADMIN_SCOPE = "custom:gpulane:admin"
SERVICE_NAME = "gpulane"  # the service name gpulane's hub configuration registers
CACHE_SECONDS = 60


class HubTokenError(Exception):
    """The token is not valid (forged, expired, revoked), or the hub cannot be asked."""


class HubTokenNotForUs(HubTokenError):
    """A valid token issued for another audience (another service, a shared server)."""


def service_name() -> str:
    """The name this broker has at the hub (the hub tells a managed service)."""
    return os.environ.get("JUPYTERHUB_SERVICE_NAME") or SERVICE_NAME


def grants_gpulane(scopes: Iterable[str], service: str = SERVICE_NAME) -> bool:
    """True if a token with these scopes was meant for gpulane: access to this service
    (or to every service), or gpulane's own admin scope. As the dashboard requires."""
    return not {
        "access:services",
        f"access:services!service={service}",
        ADMIN_SCOPE,
    }.isdisjoint(scopes)


class HubTokens:
    """Resolves hub API tokens to identities through ``jupyterhub.services.auth.HubAuth``."""

    def __init__(self, api_url: str | None = None, api_token: str | None = None) -> None:
        from jupyterhub.services.auth import HubAuth

        self.auth = HubAuth(
            api_url=api_url or os.environ["JUPYTERHUB_API_URL"],
            api_token=api_token or os.environ["JUPYTERHUB_API_TOKEN"],
            cache_max_age=CACHE_SECONDS,
        )

    @classmethod
    def from_environment(cls) -> HubTokens | None:
        """Enabled where the broker runs as a hub service (the hub sets these variables)."""
        if os.environ.get("JUPYTERHUB_API_URL") and os.environ.get("JUPYTERHUB_API_TOKEN"):
            return cls()
        return None

    async def user_groups(self, name: str) -> frozenset[str]:
        """The hub groups of user ``name`` (none where the hub does not know them), asked
        with the broker's own service token (its role reads users' names and groups)."""
        from urllib.parse import quote

        from tornado.httpclient import AsyncHTTPClient, HTTPClientError

        url = f"{self.auth.api_url.rstrip('/')}/users/{quote(name, safe='')}"
        try:
            response = await AsyncHTTPClient().fetch(
                url, headers={"Authorization": f"token {self.auth.api_token}"}, request_timeout=10
            )
        except HTTPClientError as error:
            if error.code == 404:
                return frozenset()
            log.warning("asking the hub for %s's groups failed: %s", name, error)
            raise HubTokenError(
                "the hub could not say which groups you are in; try again"
            ) from None
        except OSError as error:
            log.warning("asking the hub for %s's groups failed: %s", name, error)
            raise HubTokenError(
                "the hub could not say which groups you are in; try again"
            ) from None
        model = json.loads(response.body or b"{}")
        return frozenset(str(group) for group in model.get("groups") or [])

    async def identity(self, token: str, peer: Identity) -> Identity:
        try:
            model: dict[str, Any] | None = await self.auth.user_for_token(
                token, use_cache=True, sync=False
            )
        except Exception as error:  # the hub is down or answered oddly: refuse, say why
            log.warning("asking the hub about a token failed: %s", error)
            raise HubTokenError("the hub could not check this token; try again shortly") from None
        if not model or model.get("kind", "user") != "user" or not model.get("name"):
            raise HubTokenError("this JupyterHub token is not valid (forged, expired or revoked)")
        scopes = set(model.get("scopes") or [])
        # A token the hub made for someone else (another service, a server opened by
        # sharing) must not act here as its owner.
        service = service_name()
        if not grants_gpulane(scopes, service):
            raise HubTokenNotForUs(
                f"this JupyterHub token is not for gpulane: it lacks the "
                f"access:services!service={service} scope; use your server's own token"
            )
        return Identity(
            uid=peer.uid,  # the Unix uid still decides whose processes may be signalled
            user=str(model["name"]),
            groups=frozenset(model.get("groups") or []),
            pid=peer.pid,
            source="hub",
            admin=bool(model.get("admin")) or ADMIN_SCOPE in scopes,
        )
