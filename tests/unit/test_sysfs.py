"""The kernel edge reads every field, and a broken attribute degrades only that field."""

import os

from vfiod.address import PciAddress
from vfiod.sim import hosts
from vfiod.sysfs import ConfigInfo, PCIE_ROOT_PORT, PCIE_PCI_BRIDGE, SysfsReader
from vfiod.topology import Host

A = PciAddress.parse


def node(roots, addr):
    return os.path.realpath(os.path.join(roots.sysfs, "bus/pci/devices", addr))


def test_reads_every_field(build_host):
    roots = build_host("ich10")
    r = SysfsReader(roots).read_device(A("0000:04:00.0"))
    assert (r.vendor, r.device, r.subsystem_vendor, r.subsystem_device) == (0x8086, 0x10D3, 0x8086, 0xA01F)
    assert r.class_code == 0x020000 and r.revision == 0
    assert r.driver == "e1000e" and r.driver_override is None and r.iommu_group == 8
    assert r.parent == A("0000:00:1c.0")
    assert r.node == "devices/pci0000:00/0000:00:1c.0/0000:04:00.0"
    assert r.config.header_type == 0 and r.config.pcie_type == 0 and not r.config.multifunction
    assert r.reset_methods == ("bus",) and r.numa_node == -1 and r.net == ("enp4s0",)
    assert r.problems == ()
    port = SysfsReader(roots).read_device(A("0000:00:1c.0"))
    assert port.config.pcie_type == PCIE_ROOT_PORT and port.config.multifunction
    assert port.config.acs_cap is None and port.config.ext_known


def test_acs_capability_is_parsed(build_host):
    roots = build_host("switch")
    reader = SysfsReader(roots)
    on, off = reader.read_device(A("0000:02:08.0")), reader.read_device(A("0000:02:10.0"))
    assert on.config.acs_cap and on.config.acs_ctrl == on.config.acs_cap
    assert off.config.acs_cap and off.config.acs_ctrl == 0
    bridge = SysfsReader(build_host("bridge")).read_device(A("0000:01:00.0"))
    assert bridge.config.pcie_type == PCIE_PCI_BRIDGE and bridge.config.header_type == 1


def test_vf_ids_come_from_sysfs_not_config(build_host):
    r = SysfsReader(build_host("sriov")).read_device(A("0000:01:10.4"))
    assert (r.vendor, r.device) == (0x8086, 0x1520)
    assert r.physfn == A("0000:01:00.0")


def test_unprivileged_config_read_degrades_acs_only(build_host, scan):
    roots = build_host("ich10")
    host_full = scan(roots)
    host = Host.scan(SysfsReader(roots, config_limit=64))      # what a non-root reader gets
    assert set(host.groups) == set(host_full.groups)
    g = host.groups[8]
    assert g.isolation == "unknown" and "run as root" in g.isolation_text
    assert g.blockers == host_full.groups[8].blockers
    assert any(f.code == "config-unreadable" for f in host.findings)


def test_missing_and_garbage_attributes_degrade_fields(build_host, scan):
    roots = build_host("ich10")
    n = node(roots, "0000:04:00.0")
    os.unlink(os.path.join(n, "config"))
    r = SysfsReader(roots).read_device(A("0000:04:00.0"))         # uevent still has the ids
    assert (r.vendor, r.device, r.class_code) == (0x8086, 0x10D3, 0x020000) and r.revision is None
    os.unlink(os.path.join(n, "uevent"))                          # and without it, the attribute files
    os.unlink(os.path.join(n, "vendor"))
    with open(os.path.join(n, "device"), "w") as f:
        f.write("banana\n")
    r = SysfsReader(roots).read_device(A("0000:04:00.0"))
    assert r.vendor is None and r.device is None and r.driver == "e1000e"
    assert "device unreadable" in r.problems and "config space unreadable" in r.problems
    host = scan(roots)
    # the endpoint's own config space is not needed to explain its grouping...
    assert host.groups[8].isolation == "no-acs-port"
    assert host.groups[8].viable is False
    # ...but a port's is
    os.unlink(os.path.join(node(roots, "0000:00:1c.4"), "config"))
    assert scan(roots).groups[8].isolation == "unknown"


def test_dangling_link_and_stray_names_do_not_stop_the_scan(build_host, scan):
    roots = build_host("bridge")
    devs = os.path.join(roots.sysfs, "bus/pci/devices")
    os.symlink("../../../devices/pci0000:00/0000:00:09.0", os.path.join(devs, "0000:00:09.0"))
    os.symlink("../../../devices/nowhere", os.path.join(devs, "not-an-address"))
    os.symlink("/etc", os.path.join(devs, "0000:00:0a.0"))
    reader = SysfsReader(roots)
    addrs, bad = reader.list_addresses()
    assert bad == ["not-an-address"]
    host = scan(roots)
    assert host.devices[A("0000:00:09.0")].raw.problems == ("sysfs link is missing or dangling",)
    assert host.devices[A("0000:00:0a.0")].raw.node is None     # an absolute link out of the tree
    assert any(f.code == "dangling" for f in host.findings)
    assert len(host.groups[2].members) == 3


def test_config_parser_survives_loops_and_truncation():
    loop = bytearray(256)
    loop[0x06] = 0x10
    loop[0x34] = 0x40
    loop[0x40], loop[0x41] = 0x01, 0x40     # a capability that points at itself
    cfg = ConfigInfo.parse(bytes(loop))
    assert cfg.pcie_type is None and cfg.known
    assert ConfigInfo.parse(b"").header_type is None
    assert ConfigInfo.parse(b"\xff" * 4096).header_type == 0x7F


def test_cmdline_and_groups(build_host):
    reader = SysfsReader(build_host("ich10"))
    assert "intel_iommu=on" in reader.cmdline()
    assert reader.has_iommu_groups()
    assert {r.iommu_group for r in reader.scan()} == set(range(9))


def _visible(raw):
    """What a whole-host scan promises to read as a full read does (config details and a
    VF's revision aside)."""
    return (raw.addr, raw.node, raw.parent, raw.vendor, raw.device, raw.subsystem_vendor, raw.subsystem_device,
            raw.class_code, raw.driver, raw.driver_override, raw.iommu_group, raw.boot_vga, raw.reset_methods,
            raw.numa_node, raw.sriov_totalvfs, raw.sriov_numvfs, raw.physfn, raw.virtfns, raw.net, raw.problems,
            raw.config.header_type, raw.config.multifunction, raw.config.pcie_type)


def test_a_whole_host_scan_reads_less_and_finds_the_same(build_host):
    for name in ("sriov", "ich10", "switch", "gpu", "bridge"):
        reader = SysfsReader(build_host(name))
        shallow = reader.scan()
        deep = reader.scan_groups(sorted({r.iommu_group for r in shallow}))
        assert [_visible(r) for r in shallow] == [_visible(r) for r in deep], name
        for s, d in zip(shallow, deep):
            if s.physfn is None:
                assert s.revision == d.revision
            # isolation's inputs: ACS where a bridge or a multifunction device has it
            if s.physfn is None and (d.config.header_type or d.config.multifunction or s.addr.function):
                assert (s.config.acs_cap, s.config.acs_ctrl, s.config.ext_known) == (
                    d.config.acs_cap, d.config.acs_ctrl, d.config.ext_known)
    vf = next(r for r in SysfsReader(build_host("sriov")).scan() if r.physfn)
    assert (vf.vendor, vf.device) == (0x8086, 0x1520) and vf.config.length == 0     # from uevent; config unread


def test_a_read_the_kernel_holds_is_left_behind_and_the_rest_are_read(build_host):
    roots = build_host(hosts.sriov_farm(1, 3))        # VFs on vfio-pci
    reader = SysfsReader(roots)
    reader.patience.limit = 0.3
    vfs = [r.addr for r in reader.scan() if r.driver == "vfio-pci"]
    assert len(vfs) >= 2
    stuck = os.path.join(node(roots, str(vfs[0])), "driver_override")
    with open(os.path.join(node(roots, str(vfs[1])), "driver_override"), "w") as f:
        f.write("vfio-pci\n")
    os.unlink(stuck)
    os.mkfifo(stuck)                  # a read of it blocks until someone writes: a held device lock
    try:
        raws = {r.addr: r for r in reader.scan()}
        assert raws[vfs[0]].driver_override is None
        assert raws[vfs[1]].driver_override == "vfio-pci"
        # while that read is still held, the path is not read again (nor waited for)
        again = {r.addr: r for r in reader.scan()}
        assert again[vfs[1]].driver_override == "vfio-pci" and stuck in reader.patience.waiting
    finally:
        fd = os.open(stuck, os.O_WRONLY | os.O_NONBLOCK)      # let the held read finish
        os.write(fd, b"(null)\n")
        os.close(fd)
