"""Linux 6.1 (Debian 12's kernel) already shows ``BDF/vfio-dev/vfioX`` in sysfs for a
device on vfio-pci, but makes no character device of it (the cdev came in 6.6, with
CONFIG_VFIO_DEVICE_CDEV).  The scan named ``/dev/vfio/devices/vfio0`` there anyway, and
vfiod-dra put that node and ``/dev/iommu`` in its CDI spec on a node that has neither:
a device has a cdev only where the kernel makes them (``/dev/vfio/devices`` exists)."""

import os

from vfiod.address import PciAddress
from vfiod.report import device_json
from vfiod.pciids import PciIds

from tests.sim.leasekit import Caller, Kit

NIC = PciAddress.parse("0000:04:00.0")


def _cdev_after_a_lease(tmp_path, with_nodes: bool):
    kit = Kit(tmp_path)
    kit.manager.request(Caller(0), "group:8", "vfio", {"force": True})
    # What 6.1 shows for a device on vfio-pci, whatever else the kernel makes.
    os.makedirs(os.path.join(kit.roots.sysfs, "bus/pci/devices", NIC.sysfs_name, "vfio-dev", "vfio0"))
    if with_nodes:
        os.makedirs(os.path.join(kit.roots.dev, "vfio/devices"), exist_ok=True)
    host = kit.manager.scan()
    assert host.devices[NIC].raw.driver == "vfio-pci"
    return host.devices[NIC].raw.cdev, device_json(host, NIC, PciIds())["cdev"]


def test_a_kernel_without_cdevs_gets_none_named(tmp_path):
    assert _cdev_after_a_lease(tmp_path, with_nodes=False) == (None, None)


def test_a_kernel_with_cdevs_gets_its_device_named(tmp_path):
    assert _cdev_after_a_lease(tmp_path, with_nodes=True) == ("vfio0", "/dev/vfio/devices/vfio0")
