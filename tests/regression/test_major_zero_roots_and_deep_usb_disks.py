"""The root disk is protected and in use whatever its filesystem; a USB disk's
mounted partition is in use however deep it sits.

Before, the root-disk protection and the in-use checks skipped a root whose
device number has major 0 (btrfs, ZFS, overlay): its controller was neither
protected nor in use.  And the in-use walk stopped 8 levels below the PCI
device, short of a USB disk's partitions (controller, root hub, hub, port,
interface, SCSI host, target, LUN, disk, partition)."""

import attrs
import pytest

from vfiod.address import PciAddress
from vfiod.errors import Busy
from vfiod.sim import hosts
from vfiod.sysfs import SysfsReader
from vfiod.topology import Host

from tests.sim.leasekit import Caller, Kit

SATA = PciAddress.parse("0000:00:1f.2")
EHCI = PciAddress.parse("0000:00:1d.7")


@pytest.mark.parametrize("fs", ["ext4", "btrfs", "zfs", "overlay"])
def test_the_root_disk_is_protected_and_in_use(tmp_path, fs):
    kit = Kit(tmp_path, spec=attrs.evolve(hosts.ICH10, root_fs=fs))
    host = Host.scan(SysfsReader(kit.roots))
    assert host.devices[SATA].protected, f"{fs} root: the SATA controller is not protected"
    uses = kit.kernel.usage(SATA)
    assert any("sda1 is mounted on /" in u for u in uses), uses
    with pytest.raises(Busy, match="mounted on /"):
        kit.manager.request(Caller(0), "group:7", "vfio", {})


def test_a_deep_usb_partition_is_in_use(tmp_path):
    kit = Kit(tmp_path, spec=attrs.evolve(hosts.ICH10, usb_disk=EHCI))
    assert any("sdb1 is mounted on /media/usb" in u for u in kit.kernel.usage(EHCI))
    before = kit.snapshot()
    with pytest.raises(Busy, match="sdb1 is mounted on /media/usb"):
        kit.manager.request(Caller(1000), "group:5", "vfio", {})
    assert kit.snapshot() == before
