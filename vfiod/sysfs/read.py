"""Reading the host: devices, groups and facts under the sysfs and proc roots (never writes)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

import attrs

from ..address import ORDER, PciAddress
from ..errors import NotFound
from .device import (DIR_FLAGS, RawDevice, DeviceReads, addr_or_none as _addr_or_none, readlink_at as _readlink_at,
                     resolve_rel as _resolve_rel)
from .mounts import Mount, _mount_of, parse_mountinfo
from .patience import Patience, read_at as _read_at




@attrs.frozen
class Roots:
    """Where the kernel's trees are; `/sys`, `/proc`, `/dev` on a real host.  `run` is
    vfiod's directory on the boot's tmpfs, where the early-binding helper leaves its
    marks (`vfiod.sysfs.early`): what was written there was written in this boot."""

    sysfs: str = "/sys"
    proc: str = "/proc"
    dev: str = "/dev"
    run: str = "/run/vfiod"
    etc: str = "/etc"               # where mdevctl keeps its definitions (``mdevctl.d``)


@attrs.frozen
class HostFacts:
    """Host-wide facts read from sysfs and proc."""

    iommu_enabled: bool             # the kernel made IOMMU groups
    cmdline: str
    noiommu: bool
    root_block_nodes: tuple[str, ...]    # sysfs node paths of the block devices under "/"
    default_route_nodes: tuple[tuple[str, str], ...]  # (interface, sysfs node path) per default route


# ---------------------------------------------------------------- low-level reads

def _read(path: str, limit: int = 4096) -> bytes | None:
    return _read_at(None, path, limit)


def _text(path: str) -> str | None:
    data = _read(path)
    if data is None:
        return None
    return data.decode("utf-8", "replace").strip()


def _int(path: str, base: int = 0) -> int | None:
    text = _text(path)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def _readlink(path: str) -> str | None:
    return _readlink_at(None, path)


# ---------------------------------------------------------------- the reader

class SysfsReader:
    """Reads devices and host facts below `roots`; never writes."""

    def __init__(self, roots: Roots | None = None, config_limit: int = 4096):
        self.roots = roots or Roots()
        self.config_limit = config_limit
        self._iommu_seen = False
        #: Devices whose unbind is known to wait for holders (the revoke ladder's): their
        #: attributes under the device lock are not read at all (`vfiod.sysfs.patience`).
        self.locked: frozenset[PciAddress] = frozenset()
        self.patience = Patience()

    def _s(self, rel: str) -> str:
        return os.path.join(self.roots.sysfs, rel)

    def _p(self, rel: str) -> str:
        return os.path.join(self.roots.proc, rel)

    # ---- devices

    def require_pci(self) -> None:
        """`NotFound` unless the sysfs root shows a PCI bus: a wrong --sysfs-root, or no sysfs."""
        if not os.path.isdir(self._s("bus/pci/devices")):
            raise NotFound(f"{self.roots.sysfs}: no PCI bus here (no bus/pci/devices): is sysfs mounted "
                           "there? (--sysfs-root)")

    def list_addresses(self) -> tuple[list[PciAddress], list[str]]:
        """Addresses under bus/pci/devices, and the names that were not addresses."""
        try:
            names = os.listdir(self._s("bus/pci/devices"))
        except OSError:
            return [], []
        good, bad = [], []
        for name in names:
            addr = _addr_or_none(name)
            (good.append(addr) if addr else bad.append(name))
        good.sort(key=ORDER)
        return good, bad

    def scan(self) -> list[RawDevice]:
        """Every function, read as a whole-host snapshot needs it: a VF's configuration
        space is not read (its ids come from ``uevent``, its PCIe type from its PF's), and
        capabilities past the capability list only where isolation needs them (bridges,
        multifunction devices); `read_device` and `scan_groups` read everything."""
        addrs, _bad = self.list_addresses()
        return self._read_all(addrs, deep=False)

    def scan_groups(self, groups: Iterable[int]) -> list[RawDevice]:
        """Only the members of `groups`, each read in full: what a lease needs, without a
        whole-host scan."""
        addrs = sorted({a for g in groups for a in self.group_members(g)}, key=ORDER)
        return self._read_all(addrs, deep=True)

    def read_device(self, addr: PciAddress) -> RawDevice:
        """Read one function in full.  Every attribute is optional: a missing or odd one
        leaves its field unknown and says so in ``problems``."""
        return self._read_all([addr], deep=True)[0]

    def node_of(self, addr: PciAddress) -> str | None:
        link = "bus/pci/devices/" + addr.sysfs_name
        target = _readlink(self._s(link))
        if target is None:
            return None
        return _resolve_rel(self.roots.sysfs, "bus/pci/devices", target)

    def _read_all(self, addrs: list[PciAddress], deep: bool) -> list[RawDevice]:
        """Read `addrs` in order; the attributes under the device lock of every device on
        vfio-pci are read afterwards, in one patient batch (`vfiod.sysfs.patience`)."""
        try:
            root = os.open(self.roots.sysfs, DIR_FLAGS)
        except OSError:
            root = -1
        try:
            parts = DeviceReads(self.roots.sysfs, root, deep, self.config_limit, self.locked, self.patience,
                                cdevs=os.path.isdir(os.path.join(self.roots.dev, "vfio/devices")))
            fields = [parts.read(a) for a in addrs]
        finally:
            if root >= 0:
                os.close(root)
        return parts.finish(fields)

    def group_members(self, group: int) -> list[PciAddress]:
        """The addresses the kernel lists in IOMMU group `group` (empty if there is none)."""
        try:
            names = os.listdir(self._s(f"kernel/iommu_groups/{int(group)}/devices"))
        except (OSError, ValueError):
            return []
        return sorted((a for a in map(_addr_or_none, names) if a), key=ORDER)

    def group_of(self, addr: PciAddress) -> int | None:
        target = _readlink(self._s(f"bus/pci/devices/{addr.sysfs_name}/iommu_group"))
        try:
            return int(os.path.basename(target)) if target else None
        except ValueError:
            return None

    # ---- host facts

    def has_iommu_groups(self) -> bool:
        """Whether there is any IOMMU group, without listing them all (a lease asks on
        every partial rescan; a server has thousands).  Once seen, the answer stays:
        the IOMMU is set up at boot and does not go away."""
        if self._iommu_seen:
            return True
        try:
            with os.scandir(self._s("kernel/iommu_groups")) as it:
                self._iommu_seen = any(e.name.isdigit() for e in it)
        except OSError:
            return False
        return self._iommu_seen

    def cmdline(self) -> str:
        return _text(self._p("cmdline")) or ""

    def boot_id(self) -> str | None:
        """The kernel's id of this boot (a new one at every boot; None where unreadable)."""
        return _text(self._p("sys/kernel/random/boot_id")) or None

    def noiommu(self) -> bool:
        flag = _text(self._s("module/vfio/parameters/enable_unsafe_noiommu_mode"))
        if flag == "Y":
            return True
        try:
            return any(n.startswith("noiommu-") for n in os.listdir(os.path.join(self.roots.dev, "vfio")))
        except OSError:
            return False

    def root_block_nodes(self) -> tuple[str, ...]:
        """sysfs nodes of the block devices that back "/", following device-mapper slaves.

        A root with a real device number is found through ``dev/block/MAJ:MIN``.  One
        with major 0 (btrfs, ZFS, overlay, …) has no block device of its own: see
        `mount_block_names`."""
        mounts = parse_mountinfo(_text(self._p("self/mountinfo")) or "")
        root = [m for m in mounts if m.point == "/"]
        if not root:
            return ()
        mount = root[-1]                    # the last mount on "/" wins
        first = ([f"dev/block/{mount.majmin}"] if not mount.majmin.startswith("0:") else
                 [f"class/block/{n}" for n in self.mount_block_names(mount, mounts)])
        out, todo, seen = [], first, set()
        while todo:
            link = todo.pop()
            if link in seen:
                continue
            seen.add(link)
            node = _resolve_rel(self.roots.sysfs, os.path.dirname(link), _readlink(self._s(link)) or "")
            if not node:
                continue
            out.append(node)
            for base in (node, os.path.dirname(node)):   # a partition's slaves live on its disk
                try:
                    slaves = os.listdir(self._s(base + "/slaves"))
                except OSError:
                    continue
                todo.extend(f"class/block/{s}" for s in slaves)
        return tuple(out)

    def block_name(self, majmin: str) -> str | None:
        """The kernel's name (``sda1``) of block device ``MAJ:MIN``, or None."""
        target = _readlink(self._s(f"dev/block/{majmin}"))
        return os.path.basename(target) if target else None

    def mount_block_names(self, mount: Mount, mounts: list[Mount], depth: int = 0) -> list[str]:
        """The block devices (kernel names) that hold `mount`'s filesystem.

        - a real device number (``8:1``): that device;
        - btrfs (major 0): the source device and every other device of the same
          filesystem (``/sys/fs/btrfs/UUID/devices/``);
        - ZFS (major 0, source ``POOL/dataset``): the pool's members, found by the
          label udev links to them (``/dev/disk/by-label/POOL``, blkid's
          ``LABEL`` of a ``zfs_member``);
        - overlay: the filesystems under its ``upperdir`` and ``lowerdir``, in turn;
        - any other major-0 filesystem whose source is a ``/dev/`` node: that node."""
        if not mount.majmin.startswith("0:"):
            name = self.block_name(mount.majmin)
            return [name] if name else []
        if depth > 4:
            return []
        names: list[str] = []
        if mount.fstype == "overlay":
            for key in ("upperdir", "lowerdir"):
                for path in (mount.options.get(key) or "").split(":"):
                    under = _mount_of(path, [m for m in mounts if m is not mount]) if path else None
                    if under is not None:
                        names.extend(self.mount_block_names(under, mounts, depth + 1))
        elif mount.fstype == "zfs":
            pool = mount.source.split("/")[0]
            target = _readlink(os.path.join(self.roots.dev, "disk/by-label", pool)) if pool else None
            if target:
                names.append(os.path.basename(target))
        elif mount.source.startswith("/dev/"):
            names.append(os.path.basename(mount.source))
        if mount.fstype == "btrfs" and names:
            try:
                fsids = os.listdir(self._s("fs/btrfs"))
            except OSError:
                fsids = []
            for fsid in fsids:
                try:
                    members = os.listdir(self._s(f"fs/btrfs/{fsid}/devices"))
                except OSError:
                    continue
                if names[0] in members:
                    names.extend(m for m in members if m not in names)
        return [n for n in dict.fromkeys(names) if "/" not in n and n not in ("", ".", "..")]

    def default_route_nodes(self) -> tuple[tuple[str, str], ...]:
        ifaces = []
        for line in (_text(self._p("net/route")) or "").splitlines()[1:]:
            f = line.split()
            if len(f) >= 8 and f[1] == "00000000" and f[7] == "00000000":
                ifaces.append(f[0])
        for line in (_text(self._p("net/ipv6_route")) or "").splitlines():
            f = line.split()
            if len(f) >= 10 and f[0] == "0" * 32 and f[1] == "00" and f[9] != "lo":
                ifaces.append(f[9])
        out, todo, seen = [], list(dict.fromkeys(ifaces)), set()
        while todo:
            iface = todo.pop(0)
            if iface in seen or "/" in iface or iface in (".", ".."):
                continue
            seen.add(iface)
            link = f"class/net/{iface}"
            node = _resolve_rel(self.roots.sysfs, "class/net", _readlink(self._s(link)) or "")
            if not node:
                continue
            out.append((iface, node))
            try:
                entries = os.listdir(self._s(node))
            except OSError:
                continue
            todo.extend(e[len("lower_"):] for e in entries if e.startswith("lower_"))
        return tuple(out)

    def facts(self) -> HostFacts:
        return HostFacts(
            iommu_enabled=self.has_iommu_groups(), cmdline=self.cmdline(), noiommu=self.noiommu(),
            root_block_nodes=self.root_block_nodes(), default_route_nodes=self.default_route_nodes(),
        )


def pci_ancestor(node: str) -> PciAddress | None:
    """The nearest PCI function on a sysfs node path (the device itself if it is one)."""
    for piece in reversed(node.split("/")):
        addr = _addr_or_none(piece)
        if addr:
            return addr
    return None


def read_pci_ids_file(paths: tuple[str, ...] = ("/usr/share/misc/pci.ids", "/usr/share/hwdata/pci.ids")) -> bytes | None:
    """The system's pci.ids, for names (not under a kernel root, but read here all the same)."""
    for p in paths:
        data = None
        try:
            with open(p, "rb") as f:
                data = f.read()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES):
                raise
        if data:
            return data
    return None


