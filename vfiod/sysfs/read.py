"""Reading the host: devices, groups and facts under the sysfs and proc roots (never writes)."""

from __future__ import annotations

import errno
import os
import re
import struct
import threading
from collections.abc import Iterable

import attrs

from ..address import PciAddress
from ..errors import InvalidAddress, NotFound
from .config import ConfigInfo


_PCI_DEVICES_DIR = "devices"

# A PF's (vendor, VF device id), so its VFs need not read theirs from sysfs.
_PfIds = dict[PciAddress, tuple[int, int]]


@attrs.frozen
class Roots:
    """Where the kernel's trees are; `/sys`, `/proc`, `/dev` on a real host."""

    sysfs: str = "/sys"
    proc: str = "/proc"
    dev: str = "/dev"


@attrs.frozen
class RawDevice:
    """One PCI function as sysfs shows it.  Unknown fields are None; why is in `problems`."""

    addr: PciAddress
    node: str | None                  # real node path relative to the sysfs root
    parent: PciAddress | None         # nearest PCI ancestor (the bridge above), None on a root bus
    vendor: int | None = None
    device: int | None = None
    subsystem_vendor: int | None = None
    subsystem_device: int | None = None
    class_code: int | None = None
    revision: int | None = None
    driver: str | None = None
    driver_override: str | None = None
    iommu_group: int | None = None
    config: ConfigInfo = ConfigInfo()
    boot_vga: bool = False
    reset_methods: tuple[str, ...] = ()
    numa_node: int | None = None
    sriov_totalvfs: int | None = None
    sriov_numvfs: int | None = None
    physfn: PciAddress | None = None
    virtfns: tuple[PciAddress, ...] = ()
    net: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()
    cdev: str | None = None           # vfioX of BDF/vfio-dev: its VFIO device cdev (kernels with them)


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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _read_at(dfd: int | None, name: str, limit: int = 4096) -> bytes | None:
    """Read up to `limit` bytes of `name` (relative to the directory fd `dfd`, if given);
    None if it cannot be read."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dfd)
    except OSError:
        return None
    try:
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _readlink_at(dfd: int | None, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return None


def _listdir_at(dfd: int, name: str) -> tuple[str, ...]:
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return ()
    try:
        return tuple(sorted(os.listdir(fd)))
    except OSError:
        return ()
    finally:
        os.close(fd)


def _readlink(path: str) -> str | None:
    return _readlink_at(None, path)


def _resolve_rel(root: str, link_dir_rel: str, target: str) -> str | None:
    """Resolve a relative link target against its directory, inside `root`.

    Works on strings (no syscalls); returns the path relative to `root`, or
    None if the target is absolute or climbs out of the root."""
    if target.startswith("/"):
        if target.startswith(root.rstrip("/") + "/"):
            return target[len(root.rstrip("/")) + 1:]
        return None
    parts = [p for p in link_dir_rel.split("/") if p]
    for piece in target.split("/"):
        if piece in ("", "."):
            continue
        if piece == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(piece)
    return "/".join(parts)


def _addr_or_none(name: str) -> PciAddress | None:
    try:
        return PciAddress.from_sysfs_name(name)
    except InvalidAddress:
        return None


# ---------------------------------------------------------------- the reader

class SysfsReader:
    """Reads devices and host facts below `roots`; never writes."""

    def __init__(self, roots: Roots | None = None, config_limit: int = 4096):
        self.roots = roots or Roots()
        self.config_limit = config_limit
        self._iommu_seen = False
        self._waiting: set[str] = set()            # attribute paths whose read the kernel holds
        #: Devices whose unbind is known to wait for holders (the revoke ladder's): their
        #: attributes under the device lock are not read at all (see `_patient_read`).
        self.locked: frozenset[PciAddress] = frozenset()
        self._waiting_lock = threading.Lock()

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
        good.sort()
        return good, bad

    def scan(self) -> list[RawDevice]:
        addrs, _bad = self.list_addresses()
        pf_ids: _PfIds = {}
        return [self.read_device(a, pf_ids) for a in addrs]

    def node_of(self, addr: PciAddress) -> str | None:
        link = "bus/pci/devices/" + addr.sysfs_name
        target = _readlink(self._s(link))
        if target is None:
            return None
        return _resolve_rel(self.roots.sysfs, "bus/pci/devices", target)

    def read_device(self, addr: PciAddress, _pf_ids: _PfIds | None = None) -> RawDevice:
        """Read one function.  Every attribute is optional: a missing or odd one
        leaves its field unknown and says so in ``problems``."""
        node = self.node_of(addr)
        try:
            dfd = os.open(self._s(node), _DIR_FLAGS) if node else -1
        except OSError:
            dfd = -1
        if node is None or dfd < 0:
            return RawDevice(addr=addr, node=None, parent=None,
                             problems=("sysfs link is missing or dangling",))
        try:
            return self._read_at(addr, node, dfd, _pf_ids)
        finally:
            os.close(dfd)

    def _read_at(self, addr: PciAddress, node: str, dfd: int, pf_ids: _PfIds | None) -> RawDevice:
        problems: list[str] = []
        parent: PciAddress | None = None
        for piece in reversed(node.split("/")[:-1]):
            parent = _addr_or_none(piece)
            if parent:
                break

        raw = _read_at(dfd, "config", self.config_limit)
        if raw is None:
            problems.append("config space unreadable")
            cfg = ConfigInfo()
        else:
            cfg = ConfigInfo.parse(raw)
            if not cfg.ext_known and cfg.is_pcie is not False:
                problems.append(
                    f"only {cfg.length} bytes of config space readable (ACS unknown; run as root)")

        def num(name: str, base: int = 16) -> int | None:
            text = _read_at(dfd, name)
            if text is None:
                return None
            try:
                return int(text, 0 if base == 16 else base)
            except ValueError:
                problems.append(f"{name} unreadable")
                return None

        physfn_target = _readlink_at(dfd, "physfn")
        physfn = _addr_or_none(os.path.basename(physfn_target)) if physfn_target else None
        # The ids come from config space where it answers (one read instead of
        # six); a VF reads 0xffff for vendor and device, so those come from its
        # PF's SR-IOV capability or from sysfs.
        if raw is not None and len(raw) >= 0x30:
            vendor, device = struct.unpack_from("<HH", raw, 0)
            class_rev = struct.unpack_from("<I", raw, 8)[0]
            class_code, revision = class_rev >> 8, class_rev & 0xFF
            subsys = struct.unpack_from("<HH", raw, 0x2C) if cfg.header_type == 0 else (None, None)
        else:
            vendor = device = 0xFFFF
            class_code, revision = num("class"), num("revision")
            subsys = (num("subsystem_vendor"), num("subsystem_device"))
        if vendor == 0xFFFF:
            known = pf_ids.get(physfn) if (pf_ids is not None and physfn) else None
            vendor, device = known if known else (num("vendor"), num("device"))
        if pf_ids is not None and cfg.sriov_vf_device is not None and vendor is not None:
            pf_ids[addr] = (vendor, cfg.sriov_vf_device)

        group = None
        target = _readlink_at(dfd, "iommu_group")
        if target:
            try:
                group = int(os.path.basename(target))
            except ValueError:
                problems.append(f"iommu_group link is odd: {target!r}")
        target = _readlink_at(dfd, "driver")
        driver = os.path.basename(target) if target else None
        # An unbind from vfio-pci may hold the device lock for long; the kernel removes the
        # driver link first, so a device the ladder unbinds shows no driver meanwhile.
        locked = driver == "vfio-pci" or addr in self.locked
        override_raw = (self._patient_read(addr, "driver_override") if locked
                        else _read_at(dfd, "driver_override"))
        override = override_raw.strip().decode("utf-8", "replace") if override_raw else None
        if override in ("(null)", ""):
            override = None
        reset = _read_at(dfd, "reset_method")
        class_sub = (class_code or 0) >> 8
        boot_vga = class_sub == 0x0300 and _read_at(dfd, "boot_vga") == b"1\n"
        totalvfs = numvfs = None
        virtfns: list[PciAddress] = []
        if physfn is None:
            totalvfs = num("sriov_totalvfs", 10)
            if totalvfs is not None:
                text = self._patient_read(addr, "sriov_numvfs") if locked else _read_at(dfd, "sriov_numvfs")
                try:
                    numvfs = int(text, 10) if text is not None else None
                except ValueError:
                    problems.append("sriov_numvfs unreadable")
                for i in range(numvfs or 0):
                    t = _readlink_at(dfd, f"virtfn{i}")
                    a = _addr_or_none(os.path.basename(t)) if t else None
                    if a:
                        virtfns.append(a)
        net: tuple[str, ...] = ()
        if class_sub >> 8 == 0x02:
            net = _listdir_at(dfd, "net")
        return RawDevice(
            addr=addr, node=node, parent=parent,
            vendor=vendor, device=device, subsystem_vendor=subsys[0], subsystem_device=subsys[1],
            class_code=class_code, revision=revision,
            driver=driver, driver_override=override, iommu_group=group, config=cfg,
            boot_vga=boot_vga, reset_methods=tuple(reset.decode().split()) if reset else (),
            numa_node=num("numa_node", 10), sriov_totalvfs=totalvfs, sriov_numvfs=numvfs,
            physfn=physfn, virtfns=tuple(sorted(virtfns)), net=net, problems=tuple(problems),
            cdev=next(iter(_listdir_at(dfd, "vfio-dev")), None) if (driver or "").endswith("vfio-pci") else None)

    #: How long a read under the device lock may take before it is left to finish alone.
    PATIENCE = 1.0

    def _patient_read(self, addr: PciAddress, name: str) -> bytes | None:
        """Read an attribute the kernel shows under the device lock (``driver_override``,
        ``sriov_numvfs``) without ever waiting long for it: while an unbind from vfio-pci
        waits for the device's holders (the revoke ladder's, or one a killed vfiod left
        behind), the kernel holds the lock and such a read sleeps uninterruptibly until
        the holders let go, and a process with such a thread cannot even exit.  So the
        devices the ladder is unbinding (`locked`) are not read at all; for any other
        device on vfio-pci the read runs in a thread of its own and, past `PATIENCE`,
        is left to finish alone; until it has, the attribute reads as unknown."""
        if addr in self.locked:
            return None
        path = os.path.join(self._s("bus/pci/devices"), addr.sysfs_name, name)
        with self._waiting_lock:
            if path in self._waiting:
                return None
            self._waiting.add(path)
        box: list[bytes | None] = []

        def work() -> None:
            try:
                box.append(_read_at(None, path))
            finally:
                with self._waiting_lock:
                    self._waiting.discard(path)
        t = threading.Thread(target=work, name=f"read {addr} {name}", daemon=True)
        t.start()
        t.join(self.PATIENCE)
        return box[0] if box else None

    def group_members(self, group: int) -> list[PciAddress]:
        """The addresses the kernel lists in IOMMU group `group` (empty if there is none)."""
        try:
            names = os.listdir(self._s(f"kernel/iommu_groups/{int(group)}/devices"))
        except (OSError, ValueError):
            return []
        return sorted(a for a in map(_addr_or_none, names) if a)

    def group_of(self, addr: PciAddress) -> int | None:
        target = _readlink(self._s(f"bus/pci/devices/{addr.sysfs_name}/iommu_group"))
        try:
            return int(os.path.basename(target)) if target else None
        except ValueError:
            return None

    def scan_groups(self, groups: Iterable[int]) -> list[RawDevice]:
        """Only the members of `groups`: what a lease needs, without a whole-host scan."""
        pf_ids: _PfIds = {}
        addrs = sorted({a for g in groups for a in self.group_members(g)})
        return [self.read_device(a, pf_ids) for a in addrs]

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


@attrs.frozen
class Mount:
    """One line of /proc/PID/mountinfo: the device number, where it is mounted, the
    filesystem type, its source and its super options."""

    majmin: str
    point: str
    fstype: str
    source: str
    options: dict[str, str]


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount of a mountinfo text, in order (a line that does not parse is skipped)."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
            fstype, source, opts = fields[sep + 1], fields[sep + 2], fields[sep + 3] if len(fields) > sep + 3 else ""
        except (ValueError, IndexError):
            continue
        options = dict((o.split("=", 1) + [""])[:2] for o in opts.split(",") if o)
        out.append(Mount(majmin=fields[2], point=_unescape(fields[4]), fstype=fstype, source=_unescape(source),
                         options={k: _unescape(v) for k, v in options.items()}))
    return out


def _unescape(text: str) -> str:
    """mountinfo's octal escapes (``\\040`` for a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text) if "\\" in text else text


def _mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds `path` (the last one on the longest matching mount point)."""
    best: Mount | None = None
    for m in mounts:
        point = m.point.rstrip("/") or "/"
        if path == point or path.startswith(point.rstrip("/") + "/"):
            if best is None or len(point) >= len(best.point.rstrip("/") or "/"):
                best = m
    return best


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


