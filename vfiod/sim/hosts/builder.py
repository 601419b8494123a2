"""Fake sysfs/proc/dev trees built from a table, one line per PCI function.

The same builder serves the tests, the benchmarks and ``--simulate``.  The
tree is laid out exactly as the kernel lays out a real one (see
`vfiod.sysfs`): real nodes under ``devices/pci0000:00/<bridges>/BDF``,
relative links from ``bus/pci/devices``, ``driver`` and ``iommu_group``, the
groups under ``kernel/iommu_groups/N/devices``, and config space written as the
hardware would answer (VFs read 0xffff for their ids, ACS as an extended
capability at 0x100).

A table line::

    # addr   parent   ids        class   kind       driver     group  flags
    00:1c.0  -        8086:3a40  060400  rootport   pcieport   8      mf
    04:00.0  00:1c.0  8086:10d3  020000  endpoint   e1000e     8      net=eth1 subsys=8086:a01f

``parent`` is the bridge above (``-``: the root bus).  ``driver`` and
``group`` may be ``-`` (unbound / no IOMMU).  ``kind`` is one of `KINDS`.
Flags: ``mf`` (multifunction bit), ``acs`` (ACS capability, fully enabled),
``acs-off`` (ACS capability present but disabled), ``boot_vga``,
``net=IF`` (a network interface), ``vf-of=ADDR`` (an SR-IOV VF of that PF),
``sriov=TOTAL:VFDEVICE`` (a PF and its VFs' device id), ``subsys=VVVV:DDDD``, ``rev=NN``, ``numa=N``,
``reset=m1,m2``, ``override=DRIVER``, ``serial=HEX`` (a Device Serial Number capability),
``link=GTxW`` and ``maxlink=GTxW`` (a PCIe link now and at most, e.g. ``link=8x4
maxlink=16x16``; a PCIe function with a link has 2.5x1 unless told, and a maximum as
its current link unless told).  A PCIe function's link is in its config space and in
``current_link_speed``, ``current_link_width``, ``max_link_speed`` and ``max_link_width``
(a root complex function's show no link, as the kernel's do; a VF's, which would show
none either, are left out).
"""

from __future__ import annotations

import os
import struct
import uuid
from typing import Callable

import attrs

from ...address import PciAddress
from ... import sysfs as k

#: kind -> (header type, PCIe port type or None for conventional PCI)
KINDS = {
    "endpoint": (0, k.PCIE_ENDPOINT),
    "legacy": (0, k.PCIE_LEGACY_ENDPOINT),
    "rciep": (0, k.PCIE_RC_ENDPOINT),
    "pci": (0, None),                     # conventional PCI function
    "rootport": (1, k.PCIE_ROOT_PORT),
    "upstream": (1, k.PCIE_UPSTREAM),
    "downstream": (1, k.PCIE_DOWNSTREAM),
    "pcie-pci": (1, k.PCIE_PCI_BRIDGE),   # PCIe-to-PCI bridge
    "pci-bridge": (1, None),              # conventional PCI-to-PCI bridge
    "hostbridge": (0, None),
}

ACS_FULL = k.ACS_SV | k.ACS_TB | k.ACS_RR | k.ACS_CR | k.ACS_UF | k.ACS_DT


@attrs.frozen
class Fn:
    """One PCI function of a fake host."""

    addr: PciAddress
    parent: PciAddress | None
    vendor: int
    device: int
    class_code: int
    kind: str
    driver: str | None
    group: int | None
    multifunction: bool = False
    acs: str | None = None          # None, "on", "off"
    boot_vga: bool = False
    net: str | None = None
    vf_of: PciAddress | None = None
    sriov_total: int | None = None
    sriov_vf_device: int = 0
    subsys: tuple[int, int] = (0, 0)
    revision: int = 0
    numa: int = -1
    reset: tuple[str, ...] = ("bus",)
    override: str | None = None
    serial: int | None = None       # the Device Serial Number (extended capability 0x0003)
    link: tuple[float, int] = (2.5, 1)          # a PCIe link's speed (GT/s) and width now
    max_link: tuple[float, int] | None = None   # and at most (None: as now)

    @classmethod
    def from_line(cls, line: str) -> "Fn":
        f = line.split()
        if len(f) < 7:
            raise ValueError(f"fake host line needs 7 columns: {line!r}")
        addr = PciAddress.parse(f[0])
        parent = None if f[1] == "-" else PciAddress.parse(f[1])
        vendor, device = (int(x, 16) for x in f[2].split(":"))
        fn = cls(
            addr=addr, parent=parent, vendor=vendor, device=device,
            class_code=int(f[3], 16), kind=f[4],
            driver=None if f[5] == "-" else f[5],
            group=None if f[6] == "-" else int(f[6]),
        )
        for flag in f[7:]:
            name, _, value = flag.partition("=")
            if name == "mf":
                fn = attrs.evolve(fn, multifunction=True)
            elif name == "acs":
                fn = attrs.evolve(fn, acs="on")
            elif name == "acs-off":
                fn = attrs.evolve(fn, acs="off")
            elif name == "boot_vga":
                fn = attrs.evolve(fn, boot_vga=True)
            elif name == "net":
                fn = attrs.evolve(fn, net=value)
            elif name == "vf-of":
                fn = attrs.evolve(fn, vf_of=PciAddress.parse(value))
            elif name == "sriov":
                total, _, vf_device = value.partition(":")
                fn = attrs.evolve(fn, sriov_total=int(total))
                if vf_device:
                    fn = attrs.evolve(fn, sriov_vf_device=int(vf_device, 16))
            elif name == "subsys":
                sub_vendor, sub_device = (int(x, 16) for x in value.split(":"))
                fn = attrs.evolve(fn, subsys=(sub_vendor, sub_device))
            elif name == "rev":
                fn = attrs.evolve(fn, revision=int(value, 16))
            elif name == "numa":
                fn = attrs.evolve(fn, numa=int(value))
            elif name == "reset":
                fn = attrs.evolve(fn, reset=tuple(value.split(",")) if value else ())
            elif name == "override":
                fn = attrs.evolve(fn, override=value)
            elif name == "serial":
                fn = attrs.evolve(fn, serial=int(value, 16))
            elif name in ("link", "maxlink"):
                speed, _, width = value.partition("x")
                if float(speed) not in _SPEED_CODES or not width.isdigit():
                    raise ValueError(f"{name}=GTxW wants a PCIe speed ({', '.join(map(str, _SPEED_CODES))}) "
                                     f"and a width: {flag!r} in {line!r}")
                pair = (float(speed), int(width))
                fn = attrs.evolve(fn, link=pair) if name == "link" else attrs.evolve(fn, max_link=pair)
            else:
                raise ValueError(f"unknown flag {flag!r} in {line!r}")
        if f[4] not in KINDS:
            raise ValueError(f"unknown kind {f[4]!r} in {line!r}")
        return fn

    def config(self) -> bytes:
        """Configuration space as the device would answer a read (4 KiB for PCIe)."""
        hdr, ptype = KINDS[self.kind]
        size = 4096 if ptype is not None else 256
        buf = bytearray(size)
        vendor, device = (0xFFFF, 0xFFFF) if self.vf_of else (self.vendor, self.device)
        struct.pack_into("<HH", buf, 0, vendor, device)
        status = 0x10 if ptype is not None else 0
        struct.pack_into("<HH", buf, 4, 0x0007, status)
        buf[8] = self.revision
        buf[9], buf[10], buf[11] = self.class_code & 0xFF, (self.class_code >> 8) & 0xFF, self.class_code >> 16
        buf[0x0E] = hdr | (0x80 if self.multifunction else 0)
        if hdr == 0:
            struct.pack_into("<HH", buf, 0x2C, *self.subsys)
        if ptype is not None:
            buf[0x34] = 0x40
            buf[0x40], buf[0x41] = k.PCI_CAP_ID_EXP, 0
            struct.pack_into("<H", buf, 0x42, 0x2 | (ptype << 4))
            if self.has_link:
                (speed, width), (top, lanes) = self.link, self.max_link or self.link
                struct.pack_into("<I", buf, 0x40 + k.EXP_LNKCAP, _SPEED_CODES[top] | lanes << 4)
                struct.pack_into("<H", buf, 0x40 + k.EXP_LNKSTA, _SPEED_CODES[speed] | width << 4)
            caps: list[tuple[int, bytes]] = []
            if self.acs:
                ctrl = ACS_FULL if self.acs == "on" else 0
                caps.append((k.ACS_EXT_CAP_ID, struct.pack("<HH", ACS_FULL, ctrl)))
            if self.sriov_total is not None:
                sriov = bytearray(0x3C)
                struct.pack_into("<H", sriov, 0x0E - 4, self.sriov_total)          # TotalVFs
                struct.pack_into("<H", sriov, k.SRIOV_VF_DID - 4, self.sriov_vf_device)
                caps.append((k.SRIOV_EXT_CAP_ID, bytes(sriov)))
            if self.serial is not None:
                caps.append((k.DSN_EXT_CAP_ID, struct.pack("<Q", self.serial)))
            pos = 0x100
            for i, (cap_id, body) in enumerate(caps):
                nxt = pos + 0x40 if i + 1 < len(caps) else 0
                struct.pack_into("<I", buf, pos, cap_id | (1 << 16) | (nxt << 20))
                buf[pos + 4:pos + 4 + len(body)] = body
                pos = nxt
        return bytes(buf)

    @property
    def has_link(self) -> bool:
        """A PCIe function with a link of its own (not a VF, not a root complex function)."""
        ptype = KINDS[self.kind][1]
        return ptype is not None and ptype not in k.NO_LINK_TYPES and self.vf_of is None


#: PCIe link speeds (GT/s) by their Link Speeds value.
_SPEED_CODES = {gts: code for code, gts in k.LINK_SPEEDS.items()}


@attrs.frozen
class MdevParent:
    """A parent driver of mediated devices (the kernel's mtty sample, say): its types, each
    (sysfs name, its own words, how many instances it can make)."""

    name: str
    types: tuple[tuple[str, str, int], ...]
    device_api: str = "vfio-pci"


#: The kernel's mtty sample as it registers (its parent is a virtual device).
MTTY = MdevParent("mtty", (("mtty-1", "Single port serial", 24), ("mtty-2", "Dual port serial", 12)))


@attrs.frozen
class HostSpec:
    """A whole fake host: its PCI table and what the host itself uses."""

    name: str
    description: str
    functions: tuple[Fn, ...]
    cmdline: str = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 ro intel_iommu=on"
    root_disk: PciAddress | None = None      # storage controller holding "/"
    route_iface: str | None = None           # interface of the default route
    iommu: bool = True
    #: the filesystem of "/" on the root disk: ext4 (a real device number), or one with
    #: major 0: btrfs, zfs (pool "rpool"), overlay (upper layer on the disk)
    root_fs: str = "ext4"
    #: a USB controller with a disk whose partition is mounted on /media/usb (its node
    #: sits ten levels below the controller's)
    usb_disk: PciAddress | None = None
    #: parents of mediated devices (`vfiod.sim.kernel` creates and removes their instances)
    mdev_parents: tuple[MdevParent, ...] = ()

    @classmethod
    def from_table(cls, name: str, description: str, table: str, root_disk: PciAddress | None = None,
                   route_iface: str | None = None) -> "HostSpec":
        fns = tuple(
            Fn.from_line(line) for line in table.splitlines()
            if line.strip() and not line.lstrip().startswith("#")
        )
        return cls(name=name, description=description, functions=fns, root_disk=root_disk,
                   route_iface=route_iface)


def _link(path: str, target: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    os.symlink(os.path.relpath(target, os.path.dirname(path)), path)


def _write(path: str, content: str | bytes) -> None:
    with open(path, "wb") as f:
        f.write(content.encode() if isinstance(content, str) else content)


def build(spec: HostSpec, root: str) -> k.Roots:
    """Lay `spec` out below `root` (``root/sys``, ``root/proc``, ``root/dev``); return the roots."""
    sysd, procd, devd = (os.path.join(root, x) for x in ("sys", "proc", "dev"))
    for d in ("bus/pci/devices", "bus/pci/drivers", "kernel", "class/net", "class/block",
              "dev/block", "module/vfio/parameters"):
        os.makedirs(os.path.join(sysd, d), exist_ok=True)
    for f in ("bus/pci/drivers_probe", "bus/pci/rescan"):
        _write(os.path.join(sysd, f), "")
    os.makedirs(os.path.join(procd, "self"), exist_ok=True)
    os.makedirs(os.path.join(procd, "net"), exist_ok=True)
    os.makedirs(os.path.join(devd, "vfio"), exist_ok=True)
    if spec.iommu:
        os.makedirs(os.path.join(sysd, "kernel/iommu_groups"), exist_ok=True)

    nodes: dict[PciAddress, str] = {}
    by_addr = {fn.addr: fn for fn in spec.functions}
    for fn in sorted(spec.functions, key=_depth_key(by_addr)):
        nodes[fn.addr] = add_function(sysd, fn, nodes[fn.parent] if fn.parent else None, spec.iommu)
    vfs_of: dict[PciAddress, list[PciAddress]] = {}
    for fn in sorted(spec.functions, key=lambda f: f.addr):
        if fn.vf_of:
            vfs_of.setdefault(fn.vf_of, []).append(fn.addr)
    for pf_addr, vfs in vfs_of.items():
        for index, vf in enumerate(vfs):
            _link(os.path.join(nodes[vf], "physfn"), nodes[pf_addr])
            _link(os.path.join(nodes[pf_addr], f"virtfn{index}"), nodes[vf])
    for fn in spec.functions:
        if fn.sriov_total is not None:
            nvfs = len(vfs_of.get(fn.addr, ()))
            _write(os.path.join(nodes[fn.addr], "sriov_totalvfs"), f"{fn.sriov_total}\n")
            _write(os.path.join(nodes[fn.addr], "sriov_numvfs"), f"{nvfs}\n")
    for drv in k.VFIO_DRIVERS:
        _ensure_driver(os.path.join(sysd, "bus/pci/drivers", drv))
    for fn in spec.functions:        # vfio-pci made /dev/vfio/N for groups it already holds
        node = os.path.join(devd, "vfio", str(fn.group))
        if fn.driver == "vfio-pci" and fn.group is not None and spec.iommu and not os.path.exists(node):
            _write(node, "")
            os.chmod(node, 0o600)

    _write(os.path.join(procd, "cmdline"), spec.cmdline + "\n")
    os.makedirs(os.path.join(procd, "sys/kernel/random"), exist_ok=True)
    _write(os.path.join(procd, "sys/kernel/random/boot_id"), f"{uuid.uuid4()}\n")    # a new boot per layout
    mountinfo = "21 1 0:20 / /proc rw,nosuid - proc proc rw\n"
    if spec.root_disk is not None:
        mountinfo = _root_mount(spec.root_fs, sysd, devd) + mountinfo
        _make_disk(sysd, nodes[spec.root_disk])
    else:
        mountinfo = "25 1 0:31 / / rw,relatime - tmpfs rootfs rw\n" + mountinfo
    if spec.usb_disk is not None:
        mountinfo += "40 25 8:17 / /media/usb rw,nosuid,nodev - vfat /dev/sdb1 rw\n"
        _make_disk(sysd, nodes[spec.usb_disk], "usb1/1-1/1-1.2/1-1.2.4/1-1.2.4:1.0/host6/target6:0:0/6:0:0:0",
                   "sdb", 16)
    _write(os.path.join(procd, "self/mountinfo"), mountinfo)
    route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
    if spec.route_iface:
        route += f"{spec.route_iface}\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        route += f"{spec.route_iface}\t0002A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n"
    _write(os.path.join(procd, "net/route"), route)
    _write(os.path.join(procd, "net/ipv6_route"), "")
    _write(os.path.join(sysd, "module/vfio/parameters/enable_unsafe_noiommu_mode"), "N\n")
    if spec.iommu:
        _write(os.path.join(devd, "vfio/vfio"), "")
        os.chmod(os.path.join(devd, "vfio/vfio"), 0o666)
    for parent in spec.mdev_parents:
        add_mdev_parent(sysd, parent)
    return k.Roots(sysfs=sysd, proc=procd, dev=devd, run=os.path.join(root, "run/vfiod"), etc=os.path.join(root, "etc"))


def add_function(sysd: str, fn: Fn, parent_node: str | None, iommu: bool = True,
                 driver: str | None = None) -> str:
    """Lay out one function below `parent_node` (a root bus where None), as the
    kernel does when it finds the device: its node, attributes, bus link, IOMMU
    group and, where `driver` (default: its table driver) is loaded, the driver
    links.  Returns the node."""
    base = parent_node or os.path.join(sysd, "devices", f"pci{fn.addr.domain:04x}:{fn.addr.bus:02x}")
    node = os.path.join(base, fn.addr.sysfs_name)
    os.makedirs(node)
    _write_attrs(fn, node)
    _link(os.path.join(sysd, "bus/pci/devices", fn.addr.sysfs_name), node)
    if fn.group is not None and iommu:
        gdir = os.path.join(sysd, "kernel/iommu_groups", str(fn.group))
        if not os.path.isdir(gdir):
            os.makedirs(os.path.join(gdir, "devices"))
            _write(os.path.join(gdir, "type"), "DMA\n")
        _link(os.path.join(gdir, "devices", fn.addr.sysfs_name), node)
        _link(os.path.join(node, "iommu_group"), gdir)
    drv_name = fn.driver if driver is None else driver
    set_uevent_driver(node, drv_name or None)
    if drv_name:
        drv = os.path.join(sysd, "bus/pci/drivers", drv_name)
        _ensure_driver(drv)
        _link(os.path.join(drv, fn.addr.sysfs_name), node)
        _link(os.path.join(node, "driver"), drv)
    if fn.net:
        # A virtio NIC's interface belongs to the virtio device below the PCI function.
        where = node
        if drv_name == "virtio-pci":
            virtio = os.path.join(sysd, "bus/virtio/devices")
            os.makedirs(virtio, exist_ok=True)
            where = os.path.join(node, f"virtio{len(os.listdir(virtio))}")
            os.makedirs(where)
            _link(os.path.join(virtio, os.path.basename(where)), where)
        os.makedirs(os.path.join(where, "net", fn.net))
        _write(os.path.join(where, "net", fn.net, "operstate"), "up\n")
        _link(os.path.join(sysd, "class/net", fn.net), os.path.join(where, "net", fn.net))
    return node


def _depth_key(by_addr: dict[PciAddress, Fn]) -> Callable[[Fn], tuple[int, PciAddress]]:
    def depth(fn: Fn) -> tuple[int, PciAddress]:
        d, p = 0, fn.parent
        while p is not None:
            d += 1
            p = by_addr[p].parent
        return (d, fn.addr)
    return depth


def add_mdev_parent(sysd: str, parent: MdevParent) -> None:
    """Lay out a parent as the mdev core registers one: ``devices/virtual/NAME/NAME`` with
    its ``mdev_supported_types``, linked from ``class/mdev_bus/NAME``."""
    node = os.path.join(sysd, "devices/virtual", parent.name, parent.name)
    for t, words, available in parent.types:
        d = os.path.join(node, "mdev_supported_types", t)
        os.makedirs(os.path.join(d, "devices"))
        _write(os.path.join(d, "name"), words + "\n")
        _write(os.path.join(d, "device_api"), parent.device_api + "\n")
        _write(os.path.join(d, "available_instances"), f"{available}\n")
        _write(os.path.join(d, "create"), "")
    os.makedirs(os.path.join(sysd, "bus/mdev/devices"), exist_ok=True)
    _link(os.path.join(sysd, "class/mdev_bus", parent.name), node)


def _ensure_driver(drv: str) -> None:
    if os.path.isdir(drv):
        return
    os.makedirs(drv)
    for f in ("bind", "unbind", "new_id", "remove_id"):
        _write(os.path.join(drv, f), "")


def set_uevent_driver(node: str, driver: str | None) -> None:
    """The ``DRIVER=`` line of a node's ``uevent``, as the kernel shows it after a bind or unbind."""
    path = os.path.join(node, "uevent")
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if not line.startswith("DRIVER=")]
    _write(path, "".join(f"{line}\n" for line in ([f"DRIVER={driver}"] if driver else []) + lines))


def _write_attrs(fn: Fn, node: str) -> None:
    # uevent as the kernel's pci_uevent() writes it: a VF's real ids (its config shows 0xffff)
    sub = fn.subsys
    cls = fn.class_code
    _write(os.path.join(node, "uevent"), (
        f"PCI_CLASS={cls:X}\nPCI_ID={fn.vendor:04X}:{fn.device:04X}\nPCI_SUBSYS_ID={sub[0]:04X}:{sub[1]:04X}\n"
        f"PCI_SLOT_NAME={fn.addr.sysfs_name}\nMODALIAS=pci:v{fn.vendor:08X}d{fn.device:08X}sv{sub[0]:08X}"
        f"sd{sub[1]:08X}bc{cls >> 16:02X}sc{(cls >> 8) & 0xFF:02X}i{cls & 0xFF:02X}\n"))
    hexes = {
        "vendor": f"0x{fn.vendor:04x}", "device": f"0x{fn.device:04x}",
        "subsystem_vendor": f"0x{fn.subsys[0]:04x}", "subsystem_device": f"0x{fn.subsys[1]:04x}",
        "class": f"0x{fn.class_code:06x}", "revision": f"0x{fn.revision:02x}",
    }
    for name, value in hexes.items():
        _write(os.path.join(node, name), value + "\n")
    _write(os.path.join(node, "config"), fn.config())
    _write(os.path.join(node, "driver_override"), (fn.override or "(null)") + "\n")
    _write(os.path.join(node, "numa_node"), f"{fn.numa}\n")
    _write(os.path.join(node, "enable"), "1\n")
    _write(os.path.join(node, "irq"), "16\n")
    _write(os.path.join(node, "resource"), "0x0000000000000000 0x0000000000000000 0x0000000000000000\n" * 13)
    if fn.reset:
        _write(os.path.join(node, "reset_method"), " ".join(fn.reset) + "\n")
    if fn.class_code >> 8 == 0x0300:
        _write(os.path.join(node, "boot_vga"), "1\n" if fn.boot_vga else "0\n")
    if KINDS[fn.kind][1] is not None and fn.vf_of is None:
        now, top = (fn.link, fn.max_link or fn.link) if fn.has_link else ((0.0, 0), (0.0, 0))
        for name, (speed, width) in (("current", now), ("max", top)):
            _write(os.path.join(node, f"{name}_link_speed"), f"{speed:.1f} GT/s PCIe\n" if speed else "Unknown\n")
            _write(os.path.join(node, f"{name}_link_width"), f"{width}\n")


def _root_mount(fs: str, sysd: str, devd: str) -> str:
    """The mountinfo line(s) of "/" on sda1 as filesystem `fs`, and what the kernel and
    udev show of it where its device number is 0:N."""
    if fs == "ext4":
        return "25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
    if fs == "btrfs":
        _link(os.path.join(sysd, "fs/btrfs/5e1f0c8a-1d2b-4c3d-9e4f-a5b6c7d8e9f0/devices/sda1"),
              os.path.join(sysd, "class/block/sda1"))
        return "25 1 0:25 /@ / rw,relatime shared:1 - btrfs /dev/sda1 rw,ssd,subvolid=256,subvol=/@\n"
    if fs == "zfs":
        _link(os.path.join(devd, "disk/by-label/rpool"), os.path.join(devd, "sda1"))
        return "25 1 0:25 / / rw,relatime shared:1 - zfs rpool/ROOT/debian rw,xattr,noacl\n"
    if fs == "overlay":
        return ("24 1 8:1 / /run/rw rw,relatime - ext4 /dev/sda1 rw\n"
                "25 1 0:26 / / rw,relatime shared:1 - overlay overlay "
                "rw,lowerdir=/run/rw/lower,upperdir=/run/rw/upper,workdir=/run/rw/work\n")
    raise ValueError(f"no simulated root filesystem {fs!r} (ext4, btrfs, zfs, overlay)")


def _make_disk(sysd: str, controller: str, path: str = "ata1/host0/target0:0:0/0:0:0:0",
               name: str = "sda", minor: int = 0) -> None:
    """A disk `name` with one partition below `controller` (at `path` below it)."""
    disk = os.path.join(controller, path, "block", name)
    part = os.path.join(disk, name + "1")
    os.makedirs(part)
    _write(os.path.join(disk, "dev"), f"8:{minor}\n")
    _write(os.path.join(part, "dev"), f"8:{minor + 1}\n")
    _write(os.path.join(part, "partition"), "1\n")
    for n, node, majmin in ((name, disk, f"8:{minor}"), (name + "1", part, f"8:{minor + 1}")):
        _link(os.path.join(sysd, "class/block", n), node)
        _link(os.path.join(sysd, "dev/block", majmin), node)
