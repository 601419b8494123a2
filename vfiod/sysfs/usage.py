"""What on the host uses a device right now: interfaces, mounts, swap, MD/LVM holders, DRM nodes."""

from __future__ import annotations

import os


from ..address import PciAddress
from .read import Roots, _readlink, _text


def device_usage(roots: Roots, addr: PciAddress) -> list[str]:
    out: list[str] = []
    base = os.path.join(roots.sysfs, "bus/pci/devices", addr.sysfs_name)
    # network interfaces: up with routes, or enslaved to a bond/bridge
    routes = (_text(os.path.join(roots.proc, "net/route")) or "").splitlines()[1:]
    routed = {line.split()[0] for line in routes if line.split()}
    try:
        ifaces = sorted(os.listdir(os.path.join(base, "net")))
    except OSError:
        ifaces = []
    for iface in ifaces:
        d = os.path.join(base, "net", iface)
        master = _readlink(os.path.join(d, "master"))
        if master:
            out.append(f"network interface {iface} is a member of {os.path.basename(master)}")
        state = _text(os.path.join(d, "operstate"))
        if state == "up" and iface in routed:
            out.append(f"network interface {iface} is up with routes")
    # block devices: mounted, swap, or held by MD/LVM/dm
    majmins = {}
    for dirpath, dirnames, filenames in os.walk(base):
        if dirpath.count(os.sep) - base.count(os.sep) > 8:
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if d not in ("driver", "subsystem", "firmware_node", "iommu_group", "physfn") and not d.startswith("virtfn")]
        if "dev" in filenames and os.path.basename(os.path.dirname(dirpath)) in ("block",) or (
                "dev" in filenames and "partition" in filenames):
            mm = _text(os.path.join(dirpath, "dev"))
            if mm:
                majmins[mm] = os.path.basename(dirpath)
                try:
                    holders = os.listdir(os.path.join(dirpath, "holders"))
                except OSError:
                    holders = []
                for h in holders:
                    out.append(f"block device {os.path.basename(dirpath)} is held by {h} (MD/LVM/device-mapper)")
    if majmins:
        for line in (_text(os.path.join(roots.proc, "self/mountinfo")) or "").splitlines():
            f = line.split()
            if len(f) > 4 and f[2] in majmins:
                out.append(f"block device {majmins[f[2]]} is mounted on {f[4]}")
        for line in (_text(os.path.join(roots.proc, "swaps")) or "").splitlines()[1:]:
            name = line.split()[0] if line.split() else ""
            if os.path.basename(name) in majmins.values():
                out.append(f"block device {os.path.basename(name)} is in use as swap")
    # DRM nodes held open
    try:
        drm = [n for n in os.listdir(os.path.join(base, "drm")) if n.startswith(("card", "renderD"))]
    except OSError:
        drm = []
    if drm:
        wanted = {os.path.join("/dev/dri", n) for n in drm}
        openers: set[str] = set()
        try:
            pids = [p for p in os.listdir(roots.proc) if p.isdigit()]
        except OSError:
            pids = []
        for pid in pids:
            fddir = os.path.join(roots.proc, pid, "fd")
            try:
                fds = os.listdir(fddir)
            except OSError:
                continue
            for fd in fds:
                if _readlink(os.path.join(fddir, fd)) in wanted:
                    openers.add(pid)
                    break
        if openers:
            out.append(f"DRM node {', '.join(drm)} is open in process(es) {', '.join(sorted(openers, key=int))}")
    return out

