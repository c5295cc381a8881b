"""The second identity source: a JupyterHub API token, checked against the hub.

Where the broker runs as a JupyterHub-managed service, the hub gives it its API
URL and token. A client (a kernel inside a single-user server) sends the token
its server carries (``Authorization: token ...``); the broker asks the hub whose
token it is, caches the answer briefly, and from then on acts for that hub user,
whichever spawner started the server (also SimpleLocalProcessSpawner, where every
server runs as one Unix user).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gpulane.broker.identity import Identity

log = logging.getLogger("gpulane.broker")

ADMIN_SCOPE = "custom:gpulane:admin"
CACHE_SECONDS = 60


class HubTokenError(Exception):
    """The token is not valid (forged, expired, revoked), or the hub cannot be asked."""


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
        return Identity(
            uid=peer.uid,  # the Unix uid still decides whose processes may be signalled
            user=str(model["name"]),
            groups=frozenset(model.get("groups") or []),
            pid=peer.pid,
            source="hub",
            admin=bool(model.get("admin")) or ADMIN_SCOPE in scopes,
        )
