"""Share groups from whichever group source the broker reads (issue 13, item 1): the pure
parts. The hub path through a real broker and a real hub is tests/integration/test_oidc.py's."""

from __future__ import annotations

from gpulane.broker.shares import effective_shares, share_group, with_share_group

SHARES = {"physics": 3.0, "chem": 1.0}


def test_a_users_share_group_is_the_first_share_group_by_name_they_are_in() -> None:
    assert share_group({"jupyter-users", "physics"}, SHARES) == "physics"
    assert share_group(["physics", "chem"], SHARES) == "chem"  # by name, as share_groups
    assert share_group({"jupyter-users"}, SHARES) is None
    assert share_group(set(), {}) is None


def test_learning_a_group_changes_only_that_user_and_says_when_nothing_changes() -> None:
    before = {"ada": "physics"}
    assert with_share_group(before, "ada", "physics") is None
    assert with_share_group(before, "ben", None) is None  # in no group, as before
    assert with_share_group(before, "ben", "chem") == {"ada": "physics", "ben": "chem"}
    assert with_share_group(before, "ada", "chem") == {"ada": "chem"}
    assert with_share_group(before, "ada", None) == {}  # left every share group
    assert before == {"ada": "physics"}  # the mapping given is not changed


def test_learned_groups_split_the_groups_share_among_its_members_with_jobs() -> None:
    groups: dict[str, str] = {}
    for user, hub_groups in (("ada", {"physics"}), ("hal", {"physics", "x"}), ("ben", set())):
        groups = with_share_group(groups, user, share_group(hub_groups, SHARES)) or groups
    shares = effective_shares(["ada", "hal", "ben"], {}, SHARES, groups)
    assert shares == {"ada": 1.5, "hal": 1.5, "ben": 1.0}
    moved = with_share_group(groups, "hal", share_group({"chem"}, SHARES))
    assert moved is not None
    assert effective_shares(["ada", "hal", "ben"], {}, SHARES, moved) == {
        "ada": 3.0,
        "hal": 1.0,
        "ben": 1.0,
    }
