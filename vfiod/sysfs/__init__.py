"""The kernel edge: the only module that opens paths under the sysfs, proc and dev roots.

Every root is a parameter (`Roots`), so every layer above runs on a fake tree
in tests and on the simulated hosts of `vfiod.sim.hosts`.  Reads never raise for a
single missing or unreadable attribute: the field is left unknown and the
reason is recorded in the device's ``problems``, so one odd device degrades
itself and never the scan.

Layout read (as the kernel lays it out)::

    SYSFS/bus/pci/devices/BDF  -> ../../../devices/pci0000:00/<bridge>/.../BDF
    .../BDF/uevent             PCI_CLASS, PCI_ID, PCI_SUBSYS_ID (a VF's ids: its config shows 0xffff)
    .../BDF/{vendor,device,subsystem_vendor,subsystem_device,class,revision}   (where uevent is not)
    .../BDF/{config,driver_override,boot_vga,reset_method,numa_node}
    .../BDF/driver             -> ../../../bus/pci/drivers/NAME
    .../BDF/iommu_group        -> ../../../kernel/iommu_groups/N
    .../BDF/{sriov_totalvfs,sriov_numvfs,virtfnN,physfn}, .../BDF/net/IFNAME
    SYSFS/kernel/iommu_groups/N/devices/BDF
    PROC/cmdline, PROC/self/mountinfo, PROC/net/route, PROC/net/ipv6_route

What a device costs to read, and what a whole-host scan leaves out: `device`.
Attributes the kernel shows under the device lock: `patience`.

Processes (`procs`) are read from the system's /proc on every host: they are real
even where the host is simulated.

The reading half is loaded with the package; the writing half (`write`, `procs`,
`usage`) on first use of one of its names, so that `vfiod inspect` and other readers
do not pay for what they never call.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import *  # noqa: F401,F403  (PCIe and capability constants)
from .config import ConfigInfo
from .device import VFIO_DRIVERS, RawDevice
from .net import interface_address
from .read import HostFacts, Roots, SysfsReader, pci_ancestor, read_pci_ids_file

if TYPE_CHECKING:
    from .procs import USER_UIDS, Holder, MemlockGrant, Proven, Search
    from .usage import device_usage
    from .write import (KERNELS_CHOICE, MDEV_WRITABLE, NO_DRIVER, WRITABLE, GroupClaim, GroupHeld, Kernel, Unbinding,
                        Writable, claim_covers_devices, classify_mdev_write, classify_write)

_LATER = {
    **dict.fromkeys(("USER_UIDS", "Holder", "MemlockGrant", "Proven", "Search"), "procs"),
    "device_usage": "usage",
    **dict.fromkeys(("KERNELS_CHOICE", "MDEV_WRITABLE", "NO_DRIVER", "WRITABLE", "GroupClaim", "GroupHeld", "Kernel",
                     "Unbinding", "Writable", "claim_covers_devices", "classify_mdev_write", "classify_write"), "write"),
}


def __getattr__(name: str) -> Any:
    module = _LATER.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["MDEV_WRITABLE", "classify_mdev_write", "ConfigInfo", "GroupClaim", "GroupHeld", "Holder", "Proven", "Search", "USER_UIDS", "HostFacts", "KERNELS_CHOICE", "Kernel", "MemlockGrant", "NO_DRIVER", "RawDevice", "Roots", "SysfsReader", "Unbinding", "VFIO_DRIVERS",
           "WRITABLE", "Writable", "claim_covers_devices", "classify_write", "device_usage", "interface_address", "pci_ancestor", "read_pci_ids_file"]
