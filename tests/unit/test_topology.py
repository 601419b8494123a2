"""Groups, viability, blockers, protected devices and isolation on the example hosts."""

import os

import attrs
import pytest

from vfiod.sim import hosts
from vfiod.address import PciAddress
from vfiod.sim.hosts.builder import HostSpec

A = PciAddress.parse


def members(host, n):
    return [str(a) for a in host.groups[n].members]


@pytest.mark.parametrize("name", sorted(hosts.EXAMPLES))
def test_recomputed_partition_equals_the_kernels_groups(name, build_host, scan):
    host = scan(build_host(name))
    assert host.groups
    for g in host.groups.values():
        assert g.isolation != "unknown", (g.number, g.isolation_text)
        if len(g.members) == 1:
            assert g.isolation == "isolated"
        else:
            assert g.isolation in ("alias", "no-acs-port", "multifunction")


EXPECTED = {
    ("ich10", 8): ("no-acs-port", ["0000:00:1c.0", "0000:00:1c.4", "0000:04:00.0", "0000:05:00.0"]),
    ("ich10", 7): ("multifunction", ["0000:00:1f.0", "0000:00:1f.2", "0000:00:1f.3"]),
    ("ich10", 1): ("no-acs-port", ["0000:00:01.0", "0000:01:00.0", "0000:01:00.1"]),
    ("bridge", 2): ("alias", ["0000:01:00.0", "0000:02:01.0", "0000:02:02.0"]),
    ("gpu", 2): ("multifunction", ["0000:01:00.0", "0000:01:00.1"]),
    ("switch", 4): ("no-acs-port", ["0000:02:10.0", "0000:04:00.0"]),
    ("switch", 5): ("isolated", ["0000:03:00.0"]),
    ("sriov", 3): ("isolated", ["0000:01:10.0"]),
}


@pytest.mark.parametrize("key", sorted(EXPECTED))
def test_isolation_cause_and_members(key, build_host, scan):
    name, number = key
    host = scan(build_host(name))
    code, addrs = EXPECTED[key]
    assert members(host, number) == addrs
    assert host.groups[number].isolation == code


def test_isolation_text_names_the_devices_involved(build_host, scan):
    g = scan(build_host("ich10")).groups[8]
    for addr in ("0000:04:00.0", "0000:00:1c.0", "0000:05:00.0", "0000:00:1c.4"):
        assert addr in g.isolation_text
    assert "multifunction" in g.isolation_text and "ACS" in g.isolation_text
    alias = scan(build_host("bridge")).groups[2].isolation_text
    assert "PCIe-to-PCI bridge 0000:01:00.0" in alias and "requester ID" in alias


def test_one_host_driver_blocks_the_whole_group(build_host, scan):
    g = scan(build_host("ich10")).groups[8]
    assert not g.viable
    assert [(str(a), why) for a, why in g.blockers] == [
        ("0000:04:00.0", "bound to e1000e: unbind 0000:04:00.0 from e1000e or lease it too"),
        ("0000:05:00.0", "bound to tg3: unbind 0000:05:00.0 from tg3 or lease it too"),
    ]
    # the root ports on pcieport are exempt
    assert not any(str(a).startswith("0000:00:1c") for a, _ in g.blockers)


def _rebind(spec: HostSpec, changes: dict) -> HostSpec:
    fns = tuple(attrs.evolve(f, driver=changes[str(f.addr)]) if str(f.addr) in changes else f
                for f in spec.functions)
    return attrs.evolve(spec, functions=fns)


@pytest.mark.parametrize("drivers,viable,state", [
    ({"0000:04:00.0": "vfio-pci", "0000:05:00.0": "tg3"}, False, "host"),
    ({"0000:04:00.0": "vfio-pci", "0000:05:00.0": "vfio-pci"}, True, "parked"),
    ({"0000:04:00.0": "pci-stub", "0000:05:00.0": None}, True, "host"),
    ({"0000:04:00.0": "vfio-pci", "0000:05:00.0": "pci-stub"}, True, "parked"),
    ({"0000:04:00.0": "vfio-pci", "0000:05:00.0": "vfio-pci", "0000:00:1c.0": "shpchp"}, False, "parked"),
    ({"0000:04:00.0": "vfio-pci", "0000:05:00.0": "vfio-pci", "0000:00:1c.0": None}, True, "parked"),
])
def test_viability_follows_the_kernels_rule(drivers, viable, state, build_host, scan):
    host = scan(build_host(_rebind(hosts.ICH10, drivers)))
    g = host.groups[8]
    assert g.viable is viable
    assert g.state == state
    if not viable:
        assert g.blockers


def test_single_endpoint_blocker_says_a_lease_does_it(build_host, scan):
    g = scan(build_host("switch")).groups[5]
    assert g.blockers[0][1] == "bound to nvme: a lease unbinds 0000:03:00.0 from nvme (or unbind it by hand)"


def test_protected_devices_carry_their_reason(build_host, scan):
    host = scan(build_host("ich10"))
    prot = {str(a): d.protected for a, d in host.devices.items() if d.protected}
    assert prot == {
        "0000:01:00.0": "boot VGA: the host's console display",
        "0000:00:1f.2": "root disk: storage controller of the root filesystem (sda1)",
        "0000:00:19.0": "default route NIC: carries the host's default route (eno1)",
    }
    assert host.groups[7].protected == ((A("0000:00:1f.2"), prot["0000:00:1f.2"]),)


def test_root_on_device_mapper_follows_slaves(build_host, scan):
    roots = build_host("gpu")
    sysd = roots.sysfs
    dm = os.path.join(sysd, "devices/virtual/block/dm-0")
    os.makedirs(os.path.join(dm, "slaves"))
    os.symlink(os.path.relpath(os.path.realpath(os.path.join(sysd, "class/block/sda1")),
                               os.path.join(dm, "slaves")), os.path.join(dm, "slaves/sda1"))
    os.symlink(os.path.relpath(dm, os.path.join(sysd, "dev/block")), os.path.join(sysd, "dev/block/253:0"))
    with open(os.path.join(roots.proc, "self/mountinfo"), "w") as f:
        f.write("25 1 253:0 / / rw - ext4 /dev/mapper/vg-root rw\n")
    host = scan(roots)
    assert host.devices[A("0000:00:17.0")].protected.startswith("root disk")


def test_default_route_through_a_bridge_interface(build_host, scan):
    roots = build_host("switch")
    br = os.path.join(roots.sysfs, "devices/virtual/net/br0")
    os.makedirs(br)
    nic = os.path.realpath(os.path.join(roots.sysfs, "class/net/enp4s0"))
    os.symlink(os.path.relpath(nic, br), os.path.join(br, "lower_enp4s0"))
    os.symlink(os.path.relpath(br, os.path.join(roots.sysfs, "class/net")),
               os.path.join(roots.sysfs, "class/net/br0"))
    with open(os.path.join(roots.proc, "net/route"), "w") as f:
        f.write("Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
                "br0\t00000000\t0102A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n")
    host = scan(roots)
    assert host.devices[A("0000:04:00.0")].protected == (
        "default route NIC: carries the host's default route (enp4s0)")
    assert not host.devices[A("0000:00:1f.6")].protected


def test_no_iommu_is_a_finding_with_the_fix(build_host, scan):
    host = scan(build_host(attrs.evolve(hosts.ICH10, iommu=False)))
    assert host.groups == {} and not host.iommu_enabled
    (f,) = [f for f in host.findings if f.code == "no-iommu"]
    assert "intel_iommu=on" in f.text and "VT-d" in f.text


def test_acs_override_is_a_finding(build_host, scan):
    host = scan(build_host(attrs.evolve(hosts.BRIDGE, cmdline="ro pcie_acs_override=downstream,multifunction")))
    assert host.acs_override
    assert any(f.code == "acs-override" for f in host.findings)


def test_noiommu_mode_is_a_finding(build_host, scan):
    roots = build_host("bridge")
    with open(os.path.join(roots.sysfs, "module/vfio/parameters/enable_unsafe_noiommu_mode"), "w") as f:
        f.write("Y\n")
    host = scan(roots)
    assert host.noiommu and any(f.code == "noiommu" for f in host.findings)


def test_a_grouping_the_topology_cannot_explain_is_unknown(build_host, scan):
    # The kernel put the nvme into the NIC's group (as a DMA-alias quirk would): not explainable.
    fns = tuple(attrs.evolve(f, group=4) if str(f.addr) == "0000:03:00.0" else f for f in hosts.SWITCH.functions)
    host = scan(build_host(attrs.evolve(hosts.SWITCH, functions=fns)))
    g = host.groups[4]
    assert g.isolation == "unknown"
    assert "0000:03:00.0" in g.isolation_text and "quirk" in g.isolation_text


def test_acs_override_splits_groups_and_they_are_unknown(build_host, scan):
    # pcie_acs_override makes the kernel split ICH10's group 8: the topology does not explain that.
    fns = tuple(attrs.evolve(f, group=9) if str(f.addr) in ("0000:00:1c.4", "0000:05:00.0") else f
                for f in hosts.ICH10.functions)
    host = scan(build_host(attrs.evolve(hosts.ICH10, functions=fns, cmdline="pcie_acs_override=downstream")))
    assert host.groups[8].isolation == "unknown"
    assert host.groups[9].isolation == "unknown"
    assert "pcie_acs_override" in host.groups[8].isolation_text


def test_vfs_are_listed_under_their_pf(build_host, scan):
    host = scan(build_host("sriov"))
    pf = host.devices[A("0000:01:00.0")]
    assert [str(v) for v in pf.raw.virtfns] == ["0000:01:10.0", "0000:01:10.4", "0000:01:11.0", "0000:01:11.4"]
    assert pf.raw.sriov_totalvfs == 7 and pf.raw.sriov_numvfs == 4
    assert host.devices[A("0000:01:11.4")].raw.physfn == pf.addr
    assert host.devices[A("0000:01:11.4")].is_vf


def test_function_above_0_counts_as_multifunction_even_without_the_header_bit(build_host, scan):
    # QEMU (and real hardware) may set the multifunction bit on function 0 only;
    # the kernel treats every function above 0 as multifunction all the same.
    spec = HostSpec.from_table("mf0", "a two-function NIC, header bit on function 0 only", """
00:04.0  -        1b36:000c  060400  rootport   pcieport   1      acs
01:00.0  00:04.0  8086:10d3  020000  endpoint   e1000e     2      mf
01:00.1  00:04.0  8086:10d3  020000  endpoint   e1000e     2
""")
    g = scan(build_host(spec)).groups[2]
    assert g.isolation == "multifunction", g.isolation_text
