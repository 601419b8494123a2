"""What other tools set up on this host for binding: driverctl's saved overrides,
``vfio-pci.ids=`` (kernel command line, modprobe.d), and the overrides sysfs shows now.

Read only, for `vfioctl overrides` and `vfioctl policy generate --from-host`:

    ETC/driverctl.d/pci-BDF        driverctl's override for BDF: its content is the driver
    PROC/cmdline                   vfio-pci.ids=VVVV:DDDD[:SVVV[:SDDD]],...
    ETC/modprobe.d/*.conf          options vfio-pci ids=... (vfio_pci is the same module)
"""

from __future__ import annotations

import os
import re

import attrs

from ..address import PciAddress
from .device import addr_or_none
from .read import Roots, _text

_ID = re.compile(r"[0-9a-fA-F]{1,4}")


@attrs.frozen
class IdsEntry:
    """One entry of ``vfio-pci.ids=``: vendor:device, and the subsystem ids where given."""

    vendor: int
    device: int
    subsystem: tuple[int, int] | None
    origin: str                     # "/proc/cmdline" or "/etc/modprobe.d/vfio.conf:3"

    @property
    def text(self) -> str:
        sub = f":{self.subsystem[0]:04x}:{self.subsystem[1]:04x}" if self.subsystem else ""
        return f"{self.vendor:04x}:{self.device:04x}{sub}"

    def matches(self, vendor: int | None, device: int | None, sub: tuple[int | None, int | None]) -> bool:
        return (vendor, device) == (self.vendor, self.device) and (self.subsystem is None or sub == self.subsystem)


def _ids(value: str, origin: str) -> list[IdsEntry]:
    """The entries of an ids= value (the kernel's PCI_ANY_ID, ffffffff, counts as "any")."""
    out = []
    for item in value.split(","):
        parts = item.strip().split(":")
        if len(parts) < 2 or not all(_ID.fullmatch(p) for p in parts[:4]):
            continue
        nums = [int(p, 16) for p in parts[:4]]
        sub = (nums[2], nums[3]) if len(nums) == 4 else None
        out.append(IdsEntry(nums[0], nums[1], sub, origin))
    return out


def vfio_pci_ids(roots: Roots, etc: str = "/etc") -> list[IdsEntry]:
    """Every ``vfio-pci.ids`` entry of the running kernel's command line and of modprobe.d."""
    out: list[IdsEntry] = []
    for word in (_text(os.path.join(roots.proc, "cmdline")) or "").split():
        key, _, value = word.partition("=")
        if key.replace("_", "-") == "vfio-pci.ids":
            out += _ids(value, "/proc/cmdline")
    confdir = os.path.join(etc, "modprobe.d")
    try:
        names = sorted(n for n in os.listdir(confdir) if n.endswith(".conf"))
    except OSError:
        names = []
    for name in names:
        for n, line in enumerate((_text(os.path.join(confdir, name)) or "").splitlines(), 1):
            words = line.split("#")[0].split()
            if len(words) >= 3 and words[0] == "options" and words[1].replace("_", "-") == "vfio-pci":
                for w in words[2:]:
                    if w.startswith("ids="):
                        out += _ids(w[4:], f"{os.path.join('/etc/modprobe.d', name)}:{n}")
    return out


def driverctl_overrides(etc: str = "/etc") -> dict[PciAddress, str]:
    """driverctl's saved PCI overrides: address -> driver."""
    confdir = os.path.join(etc, "driverctl.d")
    try:
        names = sorted(os.listdir(confdir))
    except OSError:
        return {}
    out = {}
    for name in names:
        addr = addr_or_none(name[4:]) if name.startswith("pci-") else None
        driver = _text(os.path.join(confdir, name)) if addr else None
        if addr and driver:
            out[addr] = driver
    return out


def overrides_now(roots: Roots) -> list[tuple[PciAddress, str, str | None]]:
    """(address, driver_override, driver) of every PCI device with an override set now."""
    base = os.path.join(roots.sysfs, "bus/pci/devices")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    out = []
    for name in names:
        addr = addr_or_none(name)
        override = _text(os.path.join(base, name, "driver_override")) if addr else None
        if addr is None or override in (None, "", "(null)"):
            continue
        link = os.path.join(base, name, "driver")
        driver = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
        out.append((addr, override, driver))
    return out
