"""Refusals are told apart by their kind, not their words; noiommu is never leased;
a named resource leases through the lease manager with the real policy.

Before: the lease manager raised `Protected` when a device's reason text began
with "protected", the vfio backend read an `allow_noiommu` no policy key could
set, and `host_for` read `Resource.addresses`, which does not exist."""

import os

import pytest

from vfiod.address import PciAddress
from vfiod.errors import PermissionDenied, PolicyError, Protected, Unsafe
from vfiod.policy import Caller, Policy, Refusal

from tests.sim.leasekit import Kit

A = PciAddress.parse
USER = Caller(1000)


def use(kit, text):
    kit.policy = Policy.from_sources([("10.toml", text)])


def test_a_protected_device_is_refused_as_protected_by_kind(tmp_path):
    kit = Kit(tmp_path, "ich10")
    # 00:19.0 carries the default route: protected unless named with allow_protected
    use(kit, '[[rule]]\nids = "8086:*"\nuids = [1000]\ncomment = "protected NICs are fine here"\n')
    host = kit.manager.scan()
    d = kit.policy.decide(host, USER, host.group_of(A("00:19.0")).number)
    assert not d.allowed and d.refusal is Refusal.PROTECTED
    assert [v.refusal for v in d.devices] == [Refusal.PROTECTED]
    snap = kit.snapshot()
    with pytest.raises(Protected):
        kit.manager.request(USER, "0000:00:19.0", "vfio", {})
    assert kit.snapshot() == snap and kit.manager.leases() == []


def test_a_deny_rule_whose_words_say_protected_is_a_plain_denial(tmp_path):
    kit = Kit(tmp_path, "ich10")
    use(kit, '[[rule]]\naction = "deny"\ngroup = [8]\nuids = [1000]\n'
             'comment = "protected (kept for the host)"\n')
    host = kit.manager.scan()
    d = kit.policy.decide(host, USER, 8)
    assert d.refusal is Refusal.DENIED
    with pytest.raises(PermissionDenied) as e:
        kit.manager.request(USER, "group:8", "vfio", {})
    assert type(e.value) is PermissionDenied


def test_noiommu_groups_are_unsafe_and_no_policy_key_allows_them(tmp_path):
    with pytest.raises(PolicyError, match="allow_noiommu"):
        Policy.from_sources([("10.toml", '[[rule]]\ngroup = [8]\neveryone = true\nallow_noiommu = true\n')])
    kit = Kit(tmp_path, "ich10")
    param = os.path.join(kit.roots.sysfs, "module/vfio/parameters/enable_unsafe_noiommu_mode")
    os.makedirs(os.path.dirname(param), exist_ok=True)
    with open(param, "w") as f:
        f.write("Y\n")
    snap = kit.snapshot()
    with pytest.raises(Unsafe, match="no-IOMMU"):
        kit.manager.request(USER, "group:8", "vfio", {})
    assert kit.snapshot() == snap and kit.manager.leases() == []


def test_a_named_resource_is_leased_and_released_through_the_manager(tmp_path):
    kit = Kit(tmp_path, "ich10")
    use(kit, '[[resource]]\nname = "nics"\ndevices = [{ address = "0000:04:00.0", ids = "8086:10d3" },'
             ' { address = "0000:05:00.0", ids = "14e4:167b" }]\n'
             '[[rule]]\nresource = "nics"\nuids = [1000]\nbackends = ["vfio"]\n')
    lease = kit.manager.request(USER, "name:nics", "", {})
    assert lease.group == 8 and lease.target == "name:nics"
    assert kit.kernel.driver_of(A("04:00.0")) == kit.kernel.driver_of(A("05:00.0")) == "vfio-pci"
    kit.manager.release(lease.id, USER)
    assert kit.kernel.driver_of(A("04:00.0")) == "e1000e" and kit.kernel.driver_of(A("05:00.0")) == "tg3"
