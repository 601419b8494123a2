"""Pools on the simulated kernel: a lease of ``pool:NAME`` takes the first member the caller
may have that nobody holds, says which, passes over a member whose card was swapped, and
a refusal names each member's reason and changes nothing."""

import pytest

from vfiod.address import PciAddress
from vfiod.errors import Busy, InvalidArgument, NotFound, PermissionDenied
from vfiod.policy import Policy

from .leasekit import Caller, Kit

# The sriov host: four VFs 01:10.0, 01:10.4, 01:11.0, 01:11.4 (8086:1520), each its own group.
POLICY = """
[[resource]]
name = "vf-c"
devices = [{ address = "0000:01:11.0", ids = "8086:1520" }]

[[pool]]
name = "vfs"
members = [
    { address = "0000:01:10.0", ids = "8086:1515" },      # the admin saw another card here
    { address = "0000:01:10.4", ids = "8086:1520" },
    "vf-c",
    { address = "0000:01:11.4", ids = "8086:1520" },
]

[[rule]]
action = "deny"
address = "0000:01:11.0"
uids = [1001]

[[rule]]
pool = "vfs"
uids = [1000, 1001]
"""

A = PciAddress.parse
ALICE, BOB, CAROL = Caller(1000), Caller(1001), Caller(1002)


@pytest.fixture
def kit(tmp_path):
    k = Kit(tmp_path, "sriov")
    k.policy = Policy.from_sources([("p/10-pools.toml", POLICY)])
    return k


def test_a_pool_lease_takes_the_first_free_allowed_member_and_says_which(kit):
    before = kit.kernel.driver_of(A("0000:01:10.0"))
    first = kit.manager.request(ALICE, "pool:vfs", "vfio", {}, owner=":1.5")
    # 01:10.0's card was swapped: passed over, never touched.
    assert (first.target, first.member) == ("pool:vfs", "0000:01:10.4")
    assert kit.kernel.driver_of(A("0000:01:10.4")) == "vfio-pci"
    assert kit.kernel.driver_of(A("0000:01:10.0")) == before == "igbvf"
    second = kit.manager.request(ALICE, "pool:vfs", "vfio", {}, owner=":1.5")
    assert second.member == "name:vf-c" and kit.kernel.driver_of(A("0000:01:11.0")) == "vfio-pci"
    # The journal keeps the member across a restart of the manager's view.
    assert {row.id: row.member for row in kit.journal.leases()} == {first.id: "0000:01:10.4",
                                                                   second.id: "name:vf-c"}
    audit = [r for r in kit.journal.audit_rows() if r[0] == "grant" and r[5] == "granted"]
    assert any("(member name:vf-c)" in r[6] for r in audit)


def test_a_member_the_caller_is_denied_is_passed_over(kit):
    lease = kit.manager.request(BOB, "pool:vfs", "vfio", {}, owner=":1.6")
    assert lease.member == "0000:01:10.4"
    lease = kit.manager.request(BOB, "pool:vfs", "vfio", {}, owner=":1.6")
    assert lease.member == "0000:01:11.4"       # vf-c is denied to uid 1001 by the deny rule


def test_when_no_member_is_free_the_refusal_names_each_and_changes_nothing(kit):
    for _ in range(3):
        kit.manager.request(ALICE, "pool:vfs", "vfio", {}, owner=":1.5")
    before, leases = kit.snapshot(), kit.journal.leases()
    with pytest.raises(Busy) as e:
        kit.manager.request(ALICE, "pool:vfs", "vfio", {}, owner=":1.5")
    text = str(e.value)
    assert text.startswith("pool vfs: no member is free for you: 0000:01:10.0: ")
    assert "is now 8086:1520, the policy names 8086:1515 (card swapped?)" in text
    for member in ("0000:01:10.4", "name:vf-c", "0000:01:11.4"):
        assert f"{member}: IOMMU group" in text and "is already leased" in text
    assert kit.snapshot() == before and kit.journal.leases() == leases


def test_a_caller_no_rule_names_is_denied_with_every_members_reason(kit):
    before = kit.snapshot()
    with pytest.raises(PermissionDenied) as e:
        kit.manager.request(CAROL, "pool:vfs", "vfio", {}, owner=":1.7")
    assert "card swapped?" in str(e.value) and str(e.value).count("no rule matched") == 3
    assert kit.snapshot() == before and kit.journal.leases() == []


def test_a_released_member_is_taken_again(kit):
    a = kit.manager.request(ALICE, "pool:vfs", "vfio", {}, owner=":1.5")
    b = kit.manager.request(ALICE, "pool:vfs", "vfio", {}, owner=":1.5")
    kit.manager.release(a.id, ALICE)
    c = kit.manager.request(ALICE, "pool:vfs", "vfio", {}, owner=":1.5")
    assert (a.member, b.member, c.member) == ("0000:01:10.4", "name:vf-c", "0000:01:10.4")


def test_unknown_pools_and_pools_where_one_group_is_meant(kit):
    with pytest.raises(NotFound, match=r"no pool named 'gpus' \(known: vfs\)"):
        kit.manager.request(ALICE, "pool:gpus", "vfio", {}, owner=":1.5")
    host = kit.manager.host_for("pool:vfs", kit.policy)
    with pytest.raises(InvalidArgument, match="stands for any one of its members"):
        kit.policy.resolve(host, "pool:vfs")
    assert kit.journal.leases() == []
