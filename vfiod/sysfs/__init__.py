"""The kernel edge: the only module that opens paths under the sysfs, proc and dev roots.

Every root is a parameter (`Roots`), so every layer above runs on a fake tree
in tests and on the simulated hosts of `vfiod.sim.hosts`.  Reads never raise for a
single missing or unreadable attribute: the field is left unknown and the
reason is recorded in the device's ``problems``, so one odd device degrades
itself and never the scan.

Layout read (as the kernel lays it out)::

    SYSFS/bus/pci/devices/BDF  -> ../../../devices/pci0000:00/<bridge>/.../BDF
    .../BDF/{vendor,device,subsystem_vendor,subsystem_device,class,revision}
    .../BDF/{config,driver_override,boot_vga,reset_method,numa_node}
    .../BDF/driver             -> ../../../bus/pci/drivers/NAME
    .../BDF/iommu_group        -> ../../../kernel/iommu_groups/N
    .../BDF/{sriov_totalvfs,sriov_numvfs,virtfnN,physfn}, .../BDF/net/IFNAME
    SYSFS/kernel/iommu_groups/N/devices/BDF
    PROC/cmdline, PROC/self/mountinfo, PROC/net/route, PROC/net/ipv6_route

Processes (`procs`) are read from the system's /proc on every host: they are real
even where the host is simulated.
"""
from .config import *  # noqa: F401,F403  (PCIe and capability constants)
from .config import ConfigInfo
from .net import interface_address
from .read import HostFacts, RawDevice, Roots, SysfsReader, pci_ancestor, read_pci_ids_file
from .procs import USER_UIDS, Holder, MemlockGrant, Proven, Search
from .usage import device_usage
from .write import NO_DRIVER, VFIO_DRIVERS, WRITABLE, GroupClaim, GroupHeld, Kernel, Unbinding, Writable, classify_write

__all__ = ["ConfigInfo", "GroupClaim", "GroupHeld", "Holder", "Proven", "Search", "USER_UIDS", "HostFacts", "Kernel", "MemlockGrant", "NO_DRIVER", "RawDevice", "Roots", "SysfsReader", "Unbinding", "VFIO_DRIVERS",
           "WRITABLE", "Writable", "classify_write", "device_usage", "interface_address", "pci_ancestor", "read_pci_ids_file"]
