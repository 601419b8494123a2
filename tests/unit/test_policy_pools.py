"""Pools and delegated admins in the policy engine: what a pool rule matches, the order and
the reasons of a pool's candidates, and who `admin_groups` makes an admin, judged now."""

import pytest

from vfiod.errors import InvalidArgument
from vfiod.policy import Caller, StaticUserDb

from .policy_corpus.kit import A, caller, host, policy

ICH10 = host("ich10")
SRIOV = host("sriov")

POOL = """
[[pool]]
name = "vfs"
members = [
    { address = "0000:01:10.0", ids = "8086:1520" },
    { address = "0000:01:10.4", ids = "8086:1520", subsystem = "8086:0002" },
    { address = "0000:01:11.0", ids = "8086:1520" },
]

[[rule]]
pool = "vfs"
users = ["alice"]
"""


def test_a_pool_rule_matches_its_members_devices_while_their_hardware_matches():
    pol = policy(POOL)
    alice = caller("alice")
    assert pol.decide_device(SRIOV.devices[A("01:10.0")], alice)[0].allowed
    assert not pol.decide_device(SRIOV.devices[A("01:11.4")], alice)[0].allowed       # not a member
    swapped = pol.decide_device(SRIOV.devices[A("01:10.4")], alice)[0]
    assert not swapped.allowed and "pool vfs: 0000:01:10.4 is now 8086:1520 subsystem" in swapped.reason
    assert pol.rules[0].describe_devices() == "pool vfs"


def test_a_pools_candidates_come_in_order_with_why_a_member_is_passed_over():
    pol = policy(POOL)
    got = [(m.target, t.group if t else None, why) for m, t, why in pol.pool_candidates(SRIOV, "vfs")]
    assert got[0] == ("0000:01:10.0", 3, "") and got[2] == ("0000:01:11.0", 5, "")
    assert got[1][:2] == ("0000:01:10.4", None) and "card swapped?" in got[1][2]
    target = pol.pool_candidates(SRIOV, "vfs")[0][1]
    assert (target.pool, target.member) == ("vfs", "0000:01:10.0")


def test_two_members_in_one_group_are_one_lease_and_the_second_is_passed_over():
    pol = policy("""
[[pool]]
name = "nics"
members = [{ address = "04:00.0", ids = "8086:10d3" }, { address = "05:00.0", ids = "14e4:167b" }]
""")
    (_, first, _), (_, second, why) = pol.pool_candidates(ICH10, "nics")
    assert first.group == 8 and second is None and why == "in IOMMU group 8 with member 0000:04:00.0"


def test_a_pool_target_names_no_single_group():
    pol = policy(POOL)
    assert set(pol.addresses_named("pool:vfs")) == {A("01:10.0"), A("01:10.4"), A("01:11.0")}
    with pytest.raises(InvalidArgument, match="pool:vfs stands for any one of its members"):
        pol.resolve(SRIOV, "pool:vfs")


USERS = StaticUserDb(users={"alice": 1000, "bob": 1001},
                     groups={"vfio-admins": (500, ("alice",)), "other": (501, ("alice", "bob"))})
ADMINS = 'admin_groups = ["vfio-admins"]\n'


def admin_policy(text=ADMINS):
    from vfiod.policy import Policy
    return Policy.from_sources([("p/10-t.toml", text)], users=USERS)


@pytest.mark.parametrize("uid, carried, group", [
    (1000, {1000, 500}, "vfio-admins"),   # the process carries it and the database lists her
    (1000, {1000}, ""),                   # a process that dropped the group: no admin
    (1001, {1001, 500}, ""),              # carries it, but the database no longer lists him
    (1001, {1001, 501}, ""),              # another group
    (0, set(), ""),                       # root needs no group: is_root
])
def test_admin_groups_need_the_process_and_the_user_database_both(uid, carried, group):
    pol = admin_policy()
    c = Caller(uid, frozenset(carried))
    assert pol.admin_group_of(c, USERS) == group


def test_a_user_removed_from_the_group_is_no_admin_at_the_next_call():
    pol = admin_policy()
    alice = Caller(1000, frozenset({1000, 500}))
    assert pol.admin_group_of(alice, USERS) == "vfio-admins"
    removed = StaticUserDb(users=dict(USERS.users), groups={"vfio-admins": (500, ()), "other": (501, ("alice",))})
    assert pol.admin_group_of(alice, removed) == ""


def test_what_a_delegated_admin_is_and_is_not():
    member = Caller(1000, frozenset({500}), admin_group="vfio-admins")
    assert member.is_admin and not member.is_root
    assert Caller(0).is_admin and Caller(0).is_root
    assert not Caller(1000).is_admin
    assert admin_policy("").admin_group_of(Caller(1000, frozenset({500})), USERS) == ""   # no admin_groups
    assert [g.source for g in admin_policy().admin_groups] == ["p/10-t.toml:1"]
