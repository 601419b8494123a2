"""SR-IOV on the simulated kernel: VFs lease one by one; the VF count of a PF
changes only while neither it nor any of its VFs is leased."""

import asyncio
import os

import attrs
import pytest

from vfiod.sim import hosts
from vfiod.address import PciAddress
from vfiod.backends import load_backends
from vfiod.daemon import Service
from vfiod.errors import Busy, InvalidArgument, PermissionDenied, PolicyError, Protected
from vfiod.policy import Caller, Policy, PolicyStore
from vfiod.sim.kernel import SimKernel
from vfiod.state import Journal

from .leasekit import Kit

A = PciAddress.parse
PF = A("0000:01:00.0")
VFS = [A("0000:01:10.0"), A("0000:01:10.4"), A("0000:01:11.0"), A("0000:01:11.4")]
ADMIN, USER = Caller(0), Caller(1000)


def present(kit):
    return [vf for vf in VFS if kit.kernel.exists(vf)]


def test_the_vf_count_follows_the_kernels_rules(tmp_path):
    kit = Kit(tmp_path, "sriov")
    assert kit.kernel.numvfs(PF) == 4 and present(kit) == VFS
    assert kit.manager.set_vf_count(ADMIN, PF, 0) == 4
    assert kit.kernel.numvfs(PF) == 0 and present(kit) == []
    assert not [n for n in os.listdir(kit.kernel._dev(PF)) if n.startswith("virtfn")]
    assert kit.manager.set_vf_count(ADMIN, PF, 2) == 0
    assert present(kit) == VFS[:2]
    assert [kit.kernel.driver_of(vf) for vf in VFS[:2]] == ["igbvf", "igbvf"]     # probed natively
    kit.kernel.writes.clear()
    kit.manager.set_vf_count(ADMIN, PF, 3)                                          # 2 -> 3 goes through 0
    assert [d for r, d in kit.kernel.writes if r.endswith("sriov_numvfs")] == ["0", "3"]
    assert present(kit) == VFS[:3]
    # the new VFs are leasable, each in its own group
    lease = kit.manager.request(USER, str(VFS[2]), "vfio", {})
    assert kit.kernel.driver_of(VFS[2]) == "vfio-pci"
    kit.manager.release(lease.id, USER)


@pytest.mark.parametrize("leased", [VFS[1], PF])
def test_no_vf_count_change_while_the_pf_or_a_vf_is_leased(tmp_path, leased):
    kit = Kit(tmp_path, "sriov")
    lease = kit.manager.request(USER, str(leased), "vfio", {})
    before = kit.snapshot()
    kit.kernel.writes.clear()
    with pytest.raises(Busy, match=lease.id):
        kit.manager.set_vf_count(ADMIN, PF, 0)
    assert kit.kernel.writes == [] and kit.snapshot() == before
    kit.manager.release(lease.id, USER)
    kit.manager.set_vf_count(ADMIN, PF, 0)
    assert present(kit) == []


def test_bad_vf_count_requests_are_named_and_change_nothing(tmp_path):
    kit = Kit(tmp_path, "sriov")
    before = kit.snapshot()
    with pytest.raises(PermissionDenied, match="only root"):
        kit.manager.set_vf_count(USER, PF, 0)
    with pytest.raises(InvalidArgument, match="0 to 7 VFs, not 8"):
        kit.manager.set_vf_count(ADMIN, PF, 8)
    with pytest.raises(InvalidArgument, match="not an SR-IOV physical function"):
        kit.manager.set_vf_count(ADMIN, VFS[0], 0)
    assert kit.kernel.writes == [] and kit.snapshot() == before


def test_the_daemon_drops_and_adds_vf_objects_as_the_count_changes(tmp_path):
    async def main():
        roots = hosts.build("sriov", str(tmp_path / "host"))
        kernel = SimKernel.for_spec(hosts.SRIOV, roots)
        pdir = tmp_path / "policy"
        pdir.mkdir()
        store = PolicyStore(str(pdir))
        store.reload()
        service = Service(kernel, Journal(str(tmp_path / "state.db")), store, load_backends())
        loop = asyncio.get_running_loop()
        service.loop = loop
        kernel.event_sink = lambda *e: loop.call_soon_threadsafe(service.on_pci_event, *e)
        assert all(vf in service.host.devices for vf in VFS)
        await service.set_vf_count(ADMIN, str(PF), 0)
        for _ in range(500):
            if not any(vf in service.host.devices for vf in VFS):
                break
            await asyncio.sleep(0.01)
        assert not any(vf in service.host.devices for vf in VFS)
        await service.set_vf_count(ADMIN, str(PF), 1)
        for _ in range(500):
            if VFS[0] in service.host.devices:
                break
            await asyncio.sleep(0.01)
        assert VFS[0] in service.host.devices and VFS[1] not in service.host.devices
        assert service.host.devices[VFS[0]].raw.physfn == PF
    asyncio.run(main())


def _vf_rules(kit, text):
    kit.policy = Policy.from_sources([("50-vfs.toml", text)])


VF_RULE = f'[[rule]]\naddress = ["{PF}"]\nuids = [1000]\nmax_vfs = 3\n'


def test_a_rule_with_max_vfs_lets_its_users_set_the_vf_count_up_to_that(tmp_path):
    kit = Kit(tmp_path, "sriov")
    _vf_rules(kit, VF_RULE)
    assert kit.manager.set_vf_count(USER, PF, 0) == 4 and present(kit) == []
    assert kit.manager.set_vf_count(USER, PF, 3) == 0 and present(kit) == VFS[:3]
    kit.kernel.writes.clear()
    with pytest.raises(PermissionDenied, match=r"50-vfs.toml:1 allows at most 3 VFs"):
        kit.manager.set_vf_count(USER, PF, 4)
    with pytest.raises(PermissionDenied, match="no rule with max_vfs"):
        kit.manager.set_vf_count(Caller(1001), PF, 0)
    assert kit.kernel.writes == [] and present(kit) == VFS[:3]
    # the audit names the user who changed it
    changes = [(r[1], r[6]) for r in kit.journal.audit_rows() if r[0] == "sriov"]
    assert changes == [(1000, "4 -> 0 VFs; allowed by rule 50-vfs.toml:1"),
                       (1000, "0 -> 3 VFs; allowed by rule 50-vfs.toml:1")], changes


def test_a_max_vfs_rule_grants_no_lease_and_a_lease_rule_no_vf_count(tmp_path):
    kit = Kit(tmp_path, "sriov")
    _vf_rules(kit, VF_RULE + f'\n[[rule]]\nvf_of = ["{PF}"]\nuids = [1000]\n')
    with pytest.raises(PermissionDenied, match="no rule matched"):
        kit.manager.request(USER, str(PF), "vfio", {})
    assert kit.kernel.driver_of(PF) == "igb"
    lease = kit.manager.request(USER, str(VFS[0]), "vfio", {})     # the VFs through the other rule
    kit.manager.release(lease.id, USER)
    _vf_rules(kit, f'[[rule]]\naddress = ["{PF}"]\nuids = [1000]\n')
    with pytest.raises(PermissionDenied, match="no rule with max_vfs"):
        kit.manager.set_vf_count(USER, PF, 0)
    _vf_rules(kit, f'[[rule]]\naction = "deny"\naddress = ["{PF}"]\nuids = [1000]\ncomment = "not this one"\n\n'
                   + VF_RULE)
    with pytest.raises(PermissionDenied, match="not this one"):
        kit.manager.set_vf_count(USER, PF, 0)
    assert present(kit) == VFS


def test_a_protected_pf_takes_a_rule_naming_it_with_allow_protected(tmp_path):
    spec = attrs.evolve(hosts.SRIOV, route_iface="enp1s0f0")      # the default route is on the PF
    kit = Kit(tmp_path, spec=spec)
    _vf_rules(kit, VF_RULE)
    with pytest.raises(PermissionDenied, match="protected"):
        kit.manager.set_vf_count(USER, PF, 2)
    assert present(kit) == VFS
    _vf_rules(kit, VF_RULE.replace("max_vfs = 3", "max_vfs = 2\nallow_protected = true"))
    assert kit.manager.set_vf_count(USER, PF, 2) == 4 and present(kit) == VFS[:2]
    # its VFs stay leasable to their users while the PF keeps the host's route
    _vf_rules(kit, f'[[rule]]\nvf_of = ["{PF}"]\nuids = [1000]\n\n[[rule]]\naddress = ["{PF}"]\nuids = [1000]\n')
    lease = kit.manager.request(USER, str(VFS[0]), "vfio", {})
    assert kit.kernel.driver_of(VFS[0]) == "vfio-pci" and kit.kernel.driver_of(PF) == "igb"
    with pytest.raises(Protected, match="default route"):
        kit.manager.request(USER, str(PF), "vfio", {})
    kit.manager.release(lease.id, USER)


@pytest.mark.parametrize("text, message", [
    ('max_vfs = -1', "expected a number of VFs"),
    ('max_vfs = true', "expected a number of VFs"),
    ('max_vfs = "4"', "expected a number of VFs"),
    ('max_vfs = 4\nmemlock = "1G"', "grants a number of VFs, not leases"),
])
def test_a_broken_max_vfs_is_a_named_policy_error(text, message):
    with pytest.raises(PolicyError, match=message):
        Policy.from_sources([("50-vfs.toml", f'[[rule]]\naddress = ["{PF}"]\nuids = [1000]\n{text}\n')])
