"""Hub users never become root or a system account (the names come from the provider)."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest

from gpulane.hub.accounts import AccountRefused, check_unix_account, uid_min


def test_uid_min_from_login_defs(tmp_path: Path) -> None:
    defs = tmp_path / "login.defs"
    defs.write_text("# UID_MIN 5\nUID_MAX 60000\nUID_MIN\t\t 2000\nSYS_UID_MIN 100\n")
    assert uid_min(defs) == 2000
    defs.write_text("UID_MAX 60000\n")
    assert uid_min(defs) == 1000
    assert uid_min(tmp_path / "missing") == 1000


def test_root_and_system_accounts_are_refused(tmp_path: Path) -> None:
    defs = tmp_path / "login.defs"
    defs.write_text("UID_MIN 1000\n")
    with pytest.raises(AccountRefused, match=r"^hub user 'root' is the system account with uid 0"):
        check_unix_account("root", defs)
    system = next((e.pw_name for e in pwd.getpwall() if 0 < e.pw_uid < 1000), None)
    if system is not None:
        with pytest.raises(AccountRefused):
            check_unix_account(system, defs)
    check_unix_account("no-such-user-here", defs)  # the spawner's own lookup refuses it
    ordinary = next((e.pw_name for e in pwd.getpwall() if 1000 <= e.pw_uid < 60000), None)
    if ordinary is not None:
        check_unix_account(ordinary, defs)
