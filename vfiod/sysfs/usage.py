"""What on the host uses a device right now: interfaces, mounts, swap, MD/LVM holders, DRM nodes."""

from __future__ import annotations

import os


from ..address import PciAddress
from .net import interface_dirs
from .procs import open_files
from .mounts import parse_mountinfo
from .read import Roots, SysfsReader, _readlink, _text


def device_usage(roots: Roots, addr: PciAddress) -> list[str]:
    out: list[str] = []
    base = os.path.join(roots.sysfs, "bus/pci/devices", addr.sysfs_name)
    # network interfaces: up with routes, or enslaved to a bond/bridge
    routes = (_text(os.path.join(roots.proc, "net/route")) or "").splitlines()[1:]
    routed = {line.split()[0] for line in routes if line.split()}
    for iface, d in interface_dirs(base):
        master = _readlink(os.path.join(d, "master"))
        if master:
            out.append(f"network interface {iface} is a member of {os.path.basename(master)}")
        state = _text(os.path.join(d, "operstate"))
        if state == "up" and iface in routed:
            out.append(f"network interface {iface} is up with routes")
    # block devices: mounted, swap, or held by MD/LVM/dm
    out.extend(_block_usage(roots, base))
    # DRM nodes held open
    try:
        drm = [n for n in os.listdir(os.path.join(base, "drm")) if n.startswith(("card", "renderD"))]
    except OSError:
        drm = []
    if drm:
        wanted = {os.path.join("/dev/dri", n) for n in drm}
        openers = {str(pid) for pid, _fd, _link in open_files(wanted.__contains__)}
        if openers:
            out.append(f"DRM node {', '.join(drm)} is open in process(es) {', '.join(sorted(openers, key=int))}")
    return out



def _block_usage(roots: Roots, base: str) -> list[str]:
    """What uses the block devices (disks and partitions) below the PCI device at `base`.

    Each block device the kernel lists in ``class/block`` is below the device if its
    node's path is: however deep a USB disk's partition sits (controller, root hub,
    hubs, interface, SCSI host, target, LUN, disk, partition), nothing is missed."""
    out: list[str] = []
    node = os.path.realpath(base)
    blocks: dict[str, str] = {}              # kernel name -> node
    try:
        names = sorted(os.listdir(os.path.join(roots.sysfs, "class/block")))
    except OSError:
        names = []
    for name in names:
        target = os.path.realpath(os.path.join(roots.sysfs, "class/block", name))
        if target.startswith(node + os.sep):
            blocks[name] = target
    if not blocks:
        return out
    majmins: dict[str, str] = {}
    for name, target in blocks.items():
        mm = _text(os.path.join(target, "dev"))
        if mm:
            majmins[mm] = name
        try:
            holders = sorted(os.listdir(os.path.join(target, "holders")))
        except OSError:
            holders = []
        for h in holders:
            out.append(f"block device {name} is held by {h} (MD/LVM/device-mapper)")
    reader = SysfsReader(roots)
    mounts = parse_mountinfo(_text(os.path.join(roots.proc, "self/mountinfo")) or "")
    for m in mounts:
        # A major-0 filesystem (btrfs, ZFS, overlay) names its devices another way.
        for name in reader.mount_block_names(m, mounts) if m.majmin not in majmins else [majmins[m.majmin]]:
            if name in blocks:
                out.append(f"block device {name} is mounted on {m.point}"
                           + (f" ({m.fstype})" if m.majmin.startswith("0:") else ""))
    for line in (_text(os.path.join(roots.proc, "swaps")) or "").splitlines()[1:]:
        name = line.split()[0] if line.split() else ""
        if os.path.basename(name) in blocks:
            out.append(f"block device {os.path.basename(name)} is in use as swap")
    return list(dict.fromkeys(out))
