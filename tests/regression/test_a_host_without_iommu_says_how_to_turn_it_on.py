"""With the IOMMU off, devices are still there: `explain`, `check` and `lease` of one of
them said "no PCI device ... on this host" and `vfioctl groups` said only "No IOMMU
groups.", where `vfiod inspect` names `intel_iommu=on`.  Now every answer says the
device is in no IOMMU group because the IOMMU is off, and how to turn it on."""

import pytest

pytestmark = pytest.mark.bus


def test_a_device_on_a_host_without_iommu_is_found_and_the_fix_named(make_world):
    w = make_world(topology="ich10+noiommu")
    p = w.ctl("explain", "04:00.0")
    assert "0000:04:00.0 is in no IOMMU group" in p.stdout and "intel_iommu=on" in p.stdout
    for command in (["check", "04:00.0"], ["show", "04:00.0"], ["lease", "04:00.0", "--", "true"]):
        p = w.ctl(*command, check=False)
        assert p.returncode == 1, (command, p.stderr)
        assert "no PCI device" not in p.stderr and "intel_iommu=on" in p.stderr, (command, p.stderr)
    p = w.ctl("groups")
    assert "No IOMMU groups" in p.stdout and "intel_iommu=on" in p.stdout
    p = w.ctl("explain", "0000:09:00.0", check=False)        # a device that really is not there
    assert p.returncode == 1 and "no PCI device 0000:09:00.0" in p.stderr
    assert w.writes() == []
    assert "Traceback" not in w.read_log()


def test_the_no_iommu_variant_has_devices_and_no_groups(tmp_path):
    from vfiod.sim import hosts
    from vfiod.sysfs import SysfsReader
    from vfiod.topology import Host

    host = Host.scan(SysfsReader(hosts.build("gpu+noiommu", str(tmp_path))))
    assert host.devices and not host.groups and not host.iommu_enabled
    assert [f.code for f in host.findings][:1] == ["no-iommu"]
