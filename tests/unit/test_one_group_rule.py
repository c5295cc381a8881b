"""One rule for GPU use and admins, by hub token or over the socket (issue 15, item 2)."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd

from gpulane.broker import access
from gpulane.broker.groups import GroupReader
from gpulane.broker.identity import NO_UID, Identity, user_and_groups
from gpulane.broker.policy import PolicyConfig

ME = pwd.getpwuid(os.getuid()).pw_name


def peer(user: str, uid: int, groups: frozenset[str] = frozenset()) -> Identity:
    return Identity(uid=uid, user=user, groups=groups, pid=1)


def hub(user: str, groups: frozenset[str] = frozenset(), admin: bool = False) -> Identity:
    return Identity(uid=NO_UID, user=user, groups=groups, pid=None, source="hub", admin=admin)


def test_configures_admins_are_admins_by_token_and_by_socket() -> None:
    config = PolicyConfig(admin_groups=frozenset({"staff"}))
    names = frozenset({"alice"})
    assert access.is_admin(peer("alice", 1001), config, names)
    assert access.is_admin(hub("alice"), config, names)
    assert access.is_admin(peer("bob", 1002, frozenset({"staff"})), config, names)
    assert access.is_admin(hub("bob", frozenset({"staff"})), config, names)
    assert not access.is_admin(hub("carol"), config, names)
    assert not access.is_admin(peer("carol", 3), config, names)
    assert access.is_admin(peer("root", 0), config)  # root over the socket
    assert not access.is_admin(Identity(0, "x", frozenset(), 1, "hub", False), config)
    assert access.is_admin(hub("dave", admin=True), config)  # the hub's admin flag


def test_unix_source_reads_a_hub_users_groups_from_the_system() -> None:
    reader = GroupReader("unix")
    _, mine = user_and_groups(os.getuid())
    resolved = asyncio.run(reader.resolve(hub(ME, frozenset({"hub-only"}))))
    assert resolved.groups == mine  # the same as over the socket; hub groups do not count
    assert asyncio.run(reader.resolve(hub("gpl-no-such-user", frozenset({"gpu"})))).groups == set()
    socket_peer = peer(ME, os.getuid(), mine)
    assert asyncio.run(reader.resolve(socket_peer)) == socket_peer


def test_refusals_name_the_one_command() -> None:
    assert GroupReader("unix").how_to_add("bob", "gpu") == (
        "an admin adds them with: usermod -a -G gpu bob"
    )
    hub_reader = GroupReader("hub", object())  # type: ignore[arg-type]  # a hub to ask
    assert "hub group gpu" in hub_reader.how_to_add("bob", "gpu")
    assert GroupReader("hub", None).how_to_add("bob", "gpu").endswith("usermod -a -G gpu bob")


def test_hub_source_without_a_hub_keeps_unix_groups() -> None:
    # A broker outside a hub has no hub groups to read: the socket's groups stand.
    reader = GroupReader("hub", None)
    group = grp.getgrgid(os.getgid()).gr_name
    who = peer(ME, os.getuid(), frozenset({group}))
    assert asyncio.run(reader.resolve(who)).groups == {group}
