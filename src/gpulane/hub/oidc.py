"""Log in to the hub through an OpenID Connect provider, with hub groups from a claim.

    # jupyterhub_config.py
    from gpulane.hub import configure
    from gpulane.hub.oidc import configure_oidc

    configure_oidc(
        c,
        issuer="https://auth.example.org/application/o/jupyterhub/",
        client_id="jupyterhub",
        client_secret_file="/etc/jupyterhub/oidc-client-secret",  # mode 0600, owned by the hub
        allowed_groups={"jupyter-users"},
        admin_groups={"jupyter-admins"},
    )
    configure(c, gpu_groups={"gpu-users"})

The provider's endpoints come from its discovery document, read once when the
hub loads its config. Each login replaces the user's hub groups with the
groups claim (``manage_groups``), so the broker's ``--gpu-groups`` follow the
identity provider. The client secret is read from its file by the
authenticator itself: it is never in argv, in the config, or in a log.
"""

from __future__ import annotations

import ipaddress
import json
import os
import stat
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from oauthenticator.generic import GenericOAuthenticator  # type: ignore[import-untyped]
from traitlets import Unicode

DISCOVERY_PATH = ".well-known/openid-configuration"
DISCOVERY_TIMEOUT = 10.0
DEFAULT_SCOPE = ("openid", "profile", "email", "groups")
REQUIRED_ENDPOINTS = ("authorization_endpoint", "token_endpoint", "userinfo_endpoint")


class OIDCConfigError(RuntimeError):
    """The OIDC settings cannot work; the message is one line that says why and what to check."""


class GpulaneOIDCAuthenticator(GenericOAuthenticator):  # type: ignore[misc]
    """GenericOAuthenticator that reads its client secret from a file when it starts."""

    client_secret_file = Unicode(
        help="File holding the OAuth client secret (one line; mode 0600, readable by the hub only).",
    ).tag(config=True)

    def _client_secret_default(self) -> str:
        if self.client_secret_file:
            return read_client_secret(self.client_secret_file)
        return str(super()._client_secret_default())


def read_client_secret(path: str | os.PathLike[str]) -> str:
    """The secret in ``path`` (surrounding whitespace removed); a one-line error if unusable."""
    try:
        secret = Path(path).read_text().strip()
    except OSError as error:
        raise OIDCConfigError(
            f"cannot read the OIDC client secret file {path}: {error.strerror or error}"
        ) from None
    if not secret or "\n" in secret:
        raise OIDCConfigError(
            f"the OIDC client secret file {path} must hold the secret alone on one line"
        )
    return secret


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def discovery_url(issuer: str) -> str:
    parts = urlsplit(issuer)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise OIDCConfigError(f"the OIDC issuer {issuer!r} is not an http(s) URL")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise OIDCConfigError(
            f"the OIDC issuer {issuer} must use https (plain http only for a provider on loopback)"
        )
    if parts.query or parts.fragment:
        raise OIDCConfigError(f"the OIDC issuer {issuer} must not have a query or fragment")
    return issuer.rstrip("/") + "/" + DISCOVERY_PATH


def fetch_discovery(issuer: str, timeout: float = DISCOVERY_TIMEOUT) -> dict[str, Any]:
    """The issuer's OpenID Connect discovery document, checked for what the hub needs."""
    url = discovery_url(issuer)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(1024 * 1024)
    except urllib.error.HTTPError as error:
        raise OIDCConfigError(
            f"the OIDC provider answered HTTP {error.code} for {url}; check the issuer URL"
        ) from None
    except urllib.error.URLError as error:
        raise OIDCConfigError(
            f"cannot reach the OIDC provider at {url} ({error.reason}); "
            "check the issuer URL and that the hub can reach it"
        ) from None
    except (OSError, ValueError) as error:  # timeouts, resets, malformed URLs
        raise OIDCConfigError(
            f"cannot reach the OIDC provider at {url} ({error}); "
            "check the issuer URL and that the hub can reach it"
        ) from None
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise OIDCConfigError(f"{url} is not an OpenID Connect discovery document (not JSON)")
    # OpenID Connect Discovery 1.0 section 4.3: the document must name the issuer we asked.
    named = str(document.get("issuer", ""))
    if named.rstrip("/") != issuer.rstrip("/"):
        raise OIDCConfigError(
            f"the OIDC provider at {url} names the issuer {named!r}, not {issuer!r}; "
            "use the issuer URL exactly as the provider states it"
        )
    missing = [key for key in REQUIRED_ENDPOINTS if not document.get(key)]
    if missing:
        raise OIDCConfigError(f"the OIDC discovery document {url} has no {', '.join(missing)}")
    return document


def _check_secret_file(path: str) -> str:
    """Fail now, not at the first login, if the secret file cannot be read."""
    full = os.path.abspath(path)
    read_client_secret(full)  # read and dropped: the authenticator reads it itself
    if os.stat(full).st_mode & stat.S_IROTH:
        print(
            f"gpulane: warning: the OIDC client secret file {full} is readable by every user; "
            f"chmod 600 {full}",
            file=sys.stderr,
        )
    return full


def configure_oidc(
    c: Any,
    *,
    issuer: str,
    client_id: str,
    client_secret_file: str,
    groups_claim: str = "groups",
    allowed_groups: set[str] | None = None,
    admin_groups: set[str] | None = None,
    scope: Iterable[str] = DEFAULT_SCOPE,
    callback_url: str | None = None,
    username_claim: str = "preferred_username",
) -> dict[str, Any]:
    """Make the hub log users in through the OIDC provider ``issuer``.

    ``allowed_groups``: members of these groups (from ``groups_claim``) may log in;
    ``admin_groups``: members are hub admins (and may log in). Without either, nobody
    is let in unless the admin allows users another way (``c.Authenticator.allow_all``
    when the provider's application already restricts who may use it).
    ``callback_url``: the redirect URI registered at the provider, where the hub
    cannot guess it from the request (behind a proxy that rewrites the host).
    ``username_claim``: the claim that becomes the hub (and Unix) user name. Use one
    users cannot edit at the provider: a spawner runs servers as the Unix user of that
    name. Root and system accounts are refused whatever the claim says.

    Returns the provider's discovery document.
    """
    if not client_id:
        raise OIDCConfigError("configure_oidc needs the client_id registered at the provider")
    if not groups_claim:
        raise OIDCConfigError("configure_oidc needs groups_claim, the claim that lists groups")
    secret_path = _check_secret_file(client_secret_file)
    document = fetch_discovery(issuer)

    c.JupyterHub.authenticator_class = GpulaneOIDCAuthenticator
    section = c.GpulaneOIDCAuthenticator
    section.client_id = client_id
    section.client_secret_file = secret_path
    section.authorize_url = document["authorization_endpoint"]
    section.token_url = document["token_endpoint"]
    section.userdata_url = document["userinfo_endpoint"]
    section.scope = scope.split() if isinstance(scope, str) else list(scope)
    if not username_claim:
        raise OIDCConfigError("configure_oidc needs username_claim, the claim that names users")
    section.username_claim = username_claim
    # Hub groups are replaced by the claim at every login: the provider is the source of truth.
    section.manage_groups = True
    # The claim is read from the userinfo answer, kept in auth_state under "oauth_user"
    # (what the deprecated GenericOAuthenticator.claim_groups_key did; dots reach nested claims).
    section.auth_state_groups_key = f"{GenericOAuthenticator.user_auth_state_key}.{groups_claim}"
    if allowed_groups:
        section.allowed_groups = set(allowed_groups)
    if admin_groups:
        section.admin_groups = set(admin_groups)
    if callback_url:
        section.oauth_callback_url = callback_url
    return document
