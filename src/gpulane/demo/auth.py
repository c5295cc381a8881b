"""The demo's own login: generated passwords, and only on loopback.

For trying gpulane on one machine. Production hubs use PAM (system users) or
OAuth/OIDC; see docs/admin-single-machine.md.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from jupyterhub.auth import Authenticator
from traitlets import Unicode


def hash_password(password: str, salt: bytes) -> str:
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1).hex()


def write_password_file(path: Path, passwords: dict[str, str]) -> None:
    """Store salted scrypt hashes (mode 0600); the plain passwords are only printed."""
    records = {}
    for user, password in passwords.items():
        salt = os.urandom(16)
        records[user] = {"salt": salt.hex(), "scrypt": hash_password(password, salt)}
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump(records, handle)


class DemoAuthenticator(Authenticator):  # type: ignore[misc]
    """Checks the generated demo passwords; refuses logins from anywhere but loopback."""

    password_file = Unicode(help="JSON file of salted scrypt hashes, written by the demo.").tag(
        config=True
    )

    async def authenticate(self, handler: Any, data: dict[str, str]) -> str | None:
        remote = handler.request.remote_ip or ""
        try:
            loopback = ipaddress.ip_address(remote).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            self.log.warning(
                "demo login refused from %s: the demo login works on loopback only", remote
            )
            return None
        try:
            records = json.loads(Path(self.password_file).read_text())
        except (OSError, ValueError) as error:
            self.log.error("cannot read the demo password file: %s", error)
            return None
        user = data.get("username", "")
        record = records.get(user)
        if record is None:
            return None
        given = hash_password(data.get("password", ""), bytes.fromhex(record["salt"]))
        return user if hmac.compare_digest(given, record["scrypt"]) else None
