"""The early-binding helper's marks, and the kernel's word on them.

``udev/vfiod-early-bind`` (run by udev on a PCI ``add``, before the host driver
is loaded) writes a device's ``driver_override`` for an early boot claim and
leaves a mark, ``RUN/early/BDF``, on the boot's tmpfs::

    boot_id=8f0c…          the kernel's id of the boot the mark was made in
    ids=8086:10d3          vendor:device of the device it claimed
    subsystem=8086:a01f    subsystem vendor:device ("" where the claim names none)
    driver=vfio-pci        the override it wrote
    source=/etc/vfiod/policy.d/40-nics.toml:12

A mark alone proves nothing: `early_bound` counts it only while the kernel
agrees now — the same boot, the override it wrote still set, and the device at
that address still the one it claimed.  Then the device never had a host driver
in this boot, and giving it back means letting the kernel choose
(`vfiod.sysfs.write.KERNELS_CHOICE`), not returning it to vfio-pci.
"""

from __future__ import annotations

import os

import attrs

from ..address import PciAddress
from .read import Roots, _text

MARKS = "early"


@attrs.frozen
class EarlyMark:
    """What the helper says it did to one device in this boot."""

    addr: PciAddress
    ids: str
    subsystem: str
    driver: str
    source: str


def device_ids(roots: Roots, addr: PciAddress) -> tuple[str, str] | None:
    """("vendor:device", "subvendor:subdevice") as sysfs shows them now (None: unreadable)."""
    base = os.path.join(roots.sysfs, "bus/pci/devices", addr.sysfs_name)
    parts = [_text(os.path.join(base, name)) for name in ("vendor", "device", "subsystem_vendor", "subsystem_device")]
    if any(p is None or not p.startswith("0x") for p in parts):
        return None
    v, d, sv, sd = (p[2:].lower() for p in parts if p)
    return f"{v}:{d}", f"{sv}:{sd}"


def read_mark(roots: Roots, addr: PciAddress) -> dict[str, str] | None:
    """The helper's mark for `addr` as written (None: there is none, or it is unreadable)."""
    text = _text(os.path.join(roots.run, MARKS, addr.sysfs_name))
    if text is None:
        return None
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def early_bound(roots: Roots, addr: PciAddress) -> EarlyMark | None:
    """The mark for `addr`, if the kernel agrees with it now; else None."""
    mark = read_mark(roots, addr)
    if not mark:
        return None
    boot = _text(os.path.join(roots.proc, "sys/kernel/random/boot_id"))
    override = _text(os.path.join(roots.sysfs, "bus/pci/devices", addr.sysfs_name, "driver_override"))
    now = device_ids(roots, addr)
    if not boot or mark.get("boot_id") != boot or not mark.get("driver") or override != mark["driver"]:
        return None
    if now is None or now[0] != mark.get("ids") or (mark.get("subsystem") and now[1] != mark["subsystem"]):
        return None
    return EarlyMark(addr, mark["ids"], mark.get("subsystem", ""), mark["driver"], mark.get("source", ""))
