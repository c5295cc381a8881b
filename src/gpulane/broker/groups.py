"""One place the broker reads every user's groups, whichever way the user connects.

A GPU group or an admin group means the same thing for a kernel that sends its hub
token and for ``gpulane run`` typed in a login shell: the broker reads the groups of
the *user's name* from one source, chosen once (``--group-source``, or
``GpulaneHub.group_source``):

- ``unix``: the system's groups (``/etc/group``, NSS), as PAM logins have. A hub user
  is looked up by name; a hub user without a Unix account has no groups. An admin
  adds someone with ``usermod -a -G GROUP USER``; it counts within
  :data:`~gpulane.broker.identity.GROUP_CACHE_SECONDS`.
- ``hub`` (the default): the JupyterHub's groups, as OIDC logins have. A hub token
  brings them; a client over the socket (no token) is looked up at the hub by its Unix
  name. Outside a hub there are no hub groups, and the Unix groups are read instead.
"""

from __future__ import annotations

import time
from dataclasses import replace

from gpulane.broker.hub_auth import HubTokens
from gpulane.broker.identity import Identity, unix_groups_of_name

HUB_CACHE_SECONDS = 5.0


class GroupReader:
    def __init__(self, source: str = "unix", hub: HubTokens | None = None) -> None:
        self.source = source
        self.hub = hub
        self._hub_cache: dict[str, tuple[float, frozenset[str]]] = {}

    def from_hub(self) -> bool:
        return self.source == "hub" and self.hub is not None

    async def resolve(self, who: Identity) -> Identity:
        """``who`` with the groups of the configured source."""
        if self.from_hub():
            if who.source == "hub" or (who.uid == 0 and who.source == "peercred"):
                return who  # the token's groups are the hub's; root needs none
            return replace(who, groups=await self._hub_groups(who.user))
        return self.resolve_unix(who)

    def resolve_unix(self, who: Identity) -> Identity:
        """A hub user's groups from the system, where the system's groups count."""
        if self.from_hub() or who.source != "hub":
            return who  # a socket peer's groups are read from its uid already
        return replace(who, groups=unix_groups_of_name(who.user))

    async def groups_of(self, user: str) -> frozenset[str]:
        """The hub groups of ``user`` (cached briefly); raises ``HubTokenError`` where the
        hub cannot be asked. Only with the hub as the source."""
        return await self._hub_groups(user)

    async def _hub_groups(self, user: str) -> frozenset[str]:
        cached = self._hub_cache.get(user)
        now = time.monotonic()
        if cached and now - cached[0] < HUB_CACHE_SECONDS:
            return cached[1]
        assert self.hub is not None
        groups = await self.hub.user_groups(user)
        self._hub_cache[user] = (now, groups)
        return groups

    def how_to_add(self, user: str, group: str) -> str:
        """The one thing an admin does to put ``user`` in ``group``."""
        if self.from_hub():
            return f"an admin adds them to the hub group {group} on the hub's Admin page"
        return f"an admin adds them with: usermod -a -G {group} {user}"
