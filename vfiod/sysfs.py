"""The kernel edge: the only module that opens paths under the sysfs, proc and dev roots.

Every root is a parameter (`Roots`), so every layer above runs on a fake tree
in tests and on the simulated hosts of `vfiod.hosts`.  Reads never raise for a
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
"""

from __future__ import annotations

import errno
import os
import struct

import attrs

from .address import PciAddress
from .errors import InvalidAddress

# PCIe port types (PCI Express Capabilities register, bits 7:4).
PCIE_ENDPOINT = 0x0
PCIE_LEGACY_ENDPOINT = 0x1
PCIE_ROOT_PORT = 0x4
PCIE_UPSTREAM = 0x5
PCIE_DOWNSTREAM = 0x6
PCIE_PCI_BRIDGE = 0x7      # PCIe-to-PCI/PCI-X bridge
PCIE_PCIE_BRIDGE = 0x8     # PCI/PCI-X-to-PCIe bridge
PCIE_RC_ENDPOINT = 0x9
PCIE_RC_EC = 0xA

PCIE_TYPE_NAMES = {
    PCIE_ENDPOINT: "endpoint", PCIE_LEGACY_ENDPOINT: "legacy endpoint",
    PCIE_ROOT_PORT: "root port", PCIE_UPSTREAM: "upstream switch port",
    PCIE_DOWNSTREAM: "downstream switch port", PCIE_PCI_BRIDGE: "PCIe-to-PCI bridge",
    PCIE_PCIE_BRIDGE: "PCI-to-PCIe bridge", PCIE_RC_ENDPOINT: "root complex integrated endpoint",
    PCIE_RC_EC: "root complex event collector",
}

# ACS capability/control bits (PCIe extended capability 0x000D).
ACS_SV, ACS_TB, ACS_RR, ACS_CR, ACS_UF, ACS_EC, ACS_DT = (1 << i for i in range(7))
ACS_EXT_CAP_ID = 0x000D
SRIOV_EXT_CAP_ID = 0x0010
SRIOV_VF_DID = 0x1A      # VF Device ID, in the SR-IOV capability
PCI_CAP_ID_EXP = 0x10

_PCI_DEVICES_DIR = "devices"


@attrs.frozen
class Roots:
    """Where the kernel's trees are; `/sys`, `/proc`, `/dev` on a real host."""

    sysfs: str = "/sys"
    proc: str = "/proc"
    dev: str = "/dev"


@attrs.frozen
class ConfigInfo:
    """What vfiod needs from a device's configuration space; None where unreadable."""

    length: int = 0
    header_type: int | None = None
    multifunction: bool | None = None
    pcie_type: int | None = None     # None: not PCIe (or unknown, see `known`)
    is_pcie: bool | None = None
    acs_cap: int | None = None       # None: no ACS capability (or unknown, see `ext_known`)
    acs_ctrl: int | None = None
    sriov_vf_device: int | None = None   # device id of this PF's VFs
    known: bool = False              # standard capability list was readable
    ext_known: bool = False          # extended space (>= 0x100) was readable

    @classmethod
    def parse(cls, data: bytes) -> "ConfigInfo":
        n = len(data)
        if n < 0x10:
            return cls(length=n)
        raw_hdr = data[0x0E]
        header_type = raw_hdr & 0x7F
        multifunction = bool(raw_hdr & 0x80)
        status = struct.unpack_from("<H", data, 0x06)[0]
        pcie_type = None
        known = False
        if n >= 0x40:
            known = True
            if status & 0x10 and n > 0x34:
                ptr = data[0x34] & 0xFC
                seen = set()
                while ptr and ptr not in seen:
                    seen.add(ptr)
                    if ptr + 4 > n:
                        known = False     # the list runs past what we could read
                        break
                    cap_id, nxt = data[ptr], data[ptr + 1] & 0xFC
                    if cap_id == PCI_CAP_ID_EXP:
                        pcie_type = (struct.unpack_from("<H", data, ptr + 2)[0] >> 4) & 0xF
                        break
                    ptr = nxt
        acs_cap = acs_ctrl = vf_device = None
        ext_known = False
        if pcie_type is not None and n >= 0x104:
            ext_known = True
            pos, seen = 0x100, set()
            while pos and pos not in seen and pos + 8 <= n:
                seen.add(pos)
                header = struct.unpack_from("<I", data, pos)[0]
                if header in (0, 0xFFFFFFFF):
                    break
                cap_id = header & 0xFFFF
                if cap_id == ACS_EXT_CAP_ID:
                    acs_cap, acs_ctrl = struct.unpack_from("<HH", data, pos + 4)
                elif cap_id == SRIOV_EXT_CAP_ID and pos + SRIOV_VF_DID + 2 <= n:
                    vf_device = struct.unpack_from("<H", data, pos + SRIOV_VF_DID)[0]
                pos = (header >> 20) & 0xFFC
        return cls(
            length=n, header_type=header_type, multifunction=multifunction,
            pcie_type=pcie_type, is_pcie=(pcie_type is not None) if known else None,
            acs_cap=acs_cap, acs_ctrl=acs_ctrl, sriov_vf_device=vf_device, known=known, ext_known=ext_known,
        )


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


@attrs.frozen
class HostFacts:
    """Host-wide facts read from sysfs and proc."""

    iommu_groups: tuple[int, ...]
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

    def _s(self, rel: str) -> str:
        return os.path.join(self.roots.sysfs, rel)

    def _p(self, rel: str) -> str:
        return os.path.join(self.roots.proc, rel)

    # ---- devices

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
        pf_ids: dict = {}
        return [self.read_device(a, pf_ids) for a in addrs]

    def node_of(self, addr: PciAddress) -> str | None:
        link = "bus/pci/devices/" + addr.sysfs_name
        target = _readlink(self._s(link))
        if target is None:
            return None
        return _resolve_rel(self.roots.sysfs, "bus/pci/devices", target)

    def read_device(self, addr: PciAddress, _pf_ids: dict | None = None) -> RawDevice:
        """Read one function.  Every attribute is optional: a missing or odd one
        leaves its field unknown and says so in ``problems``."""
        node = self.node_of(addr)
        try:
            dfd = os.open(self._s(node), _DIR_FLAGS) if node else -1
        except OSError:
            dfd = -1
        if dfd < 0:
            return RawDevice(addr=addr, node=None, parent=None,
                             problems=("sysfs link is missing or dangling",))
        try:
            return self._read_at(addr, node, dfd, _pf_ids)
        finally:
            os.close(dfd)

    def _read_at(self, addr, node, dfd, pf_ids) -> RawDevice:
        problems: list[str] = []
        parent = None
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

        def num(name, base=16):
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
        override = _read_at(dfd, "driver_override")
        override = override.strip().decode("utf-8", "replace") if override else None
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
                numvfs = num("sriov_numvfs", 10)
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
        )

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

    def scan_groups(self, groups) -> list[RawDevice]:
        """Only the members of `groups`: what a lease needs, without a whole-host scan."""
        pf_ids: dict = {}
        addrs = sorted({a for g in groups for a in self.group_members(g)})
        return [self.read_device(a, pf_ids) for a in addrs]

    # ---- host facts

    def iommu_groups(self) -> tuple[int, ...]:
        try:
            names = os.listdir(self._s("kernel/iommu_groups"))
        except OSError:
            return ()
        return tuple(sorted(int(n) for n in names if n.isdigit()))

    def cmdline(self) -> str:
        return _text(self._p("cmdline")) or ""

    def noiommu(self) -> bool:
        flag = _text(self._s("module/vfio/parameters/enable_unsafe_noiommu_mode"))
        if flag == "Y":
            return True
        try:
            return any(n.startswith("noiommu-") for n in os.listdir(os.path.join(self.roots.dev, "vfio")))
        except OSError:
            return False

    def root_block_nodes(self) -> tuple[str, ...]:
        """sysfs nodes of the block devices that back "/", following device-mapper slaves."""
        text = _text(self._p("self/mountinfo")) or ""
        majmin = None
        for line in text.splitlines():
            fields = line.split()
            if len(fields) > 4 and fields[4] == "/":
                majmin = fields[2]          # the last mount on "/" wins
        if not majmin or majmin.startswith("0:"):
            return ()
        out, todo, seen = [], [f"dev/block/{majmin}"], set()
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
            iommu_groups=self.iommu_groups(), cmdline=self.cmdline(), noiommu=self.noiommu(),
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


# ================================================================ writes
#
# Every write vfiod makes to the kernel goes through `Kernel._write`, which
# accepts only the allow-listed paths below; everything else is refused before
# a file is opened.  `vfiod.simkernel.SimKernel` overrides the primitives to
# give a fake tree the kernel's semantics, so the same binding logic runs on
# both.

import re as _re
import threading as _threading
import time as _time

from .errors import KernelError as _KernelError, InvalidArgument as _InvalidArgument

_BDF = r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]"
_DRIVER = r"[A-Za-z0-9_.-]{1,64}"
WRITABLE = (
    _re.compile(rf"bus/pci/devices/{_BDF}/driver_override"),
    _re.compile(rf"bus/pci/devices/{_BDF}/reset"),
    _re.compile(rf"bus/pci/devices/{_BDF}/sriov_numvfs"),
    _re.compile(rf"bus/pci/drivers/{_DRIVER}/unbind"),
    _re.compile(r"bus/pci/drivers_probe"),
)
DEV_WRITABLE = (_re.compile(r"vfio/[0-9]{1,6}"), _re.compile(r"vfio/vfio"))

#: Drivers that leave DMA to their owner; binding to anything else is refused.
TARGET_DRIVERS = ("vfio-pci", "pci-stub")
#: The driver_override that matches no driver: a probe binds nothing.
NO_DRIVER = "none"


def _check_driver_name(name: str) -> str:
    if not isinstance(name, str) or not _re.fullmatch(_DRIVER, name) or name in (".", ".."):
        raise _InvalidArgument(f"not a driver name: {name!r}")
    return name


class Kernel:
    """Writes to the real kernel (below `roots`), with a timeout on each write.

    A write to ``unbind`` can block for as long as a process holds the device
    open, so each write runs in a worker thread and a write that has not
    returned after `write_timeout` seconds fails with the device named.
    """

    def __init__(self, roots: Roots | None = None, write_timeout: float = 10.0,
                 bind_timeout: float = 10.0):
        self.roots = roots or Roots()
        self.reader = SysfsReader(self.roots)
        self.write_timeout = write_timeout
        self.bind_timeout = bind_timeout

    # ---- primitives (the simulated kernel overrides these)

    def _write_file(self, rel: str, data: str) -> None:
        fd = os.open(os.path.join(self.roots.sysfs, rel), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    def _write(self, rel: str, data: str, what: str) -> None:
        if not any(p.fullmatch(rel) for p in WRITABLE):
            raise _KernelError(f"refusing to write {rel!r}: not a path vfiod writes")
        result: list = []

        def work():
            try:
                self._write_file(rel, data)
                result.append(None)
            except OSError as e:
                result.append(e)

        t = _threading.Thread(target=work, name=f"sysfs-write {rel}", daemon=True)
        t.start()
        t.join(self.write_timeout)
        if not result:
            raise _KernelError(f"{what}: the kernel did not answer within {self.write_timeout:g} s "
                               f"(writing {rel}; is a process holding the device?)")
        if result[0] is not None:
            e = result[0]
            raise _KernelError(f"{what}: the kernel refused (writing {rel}: {e.strerror or e})")

    def driver_of(self, addr: PciAddress) -> str | None:
        target = _readlink(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name, "driver"))
        return os.path.basename(target) if target else None

    def override_of(self, addr: PciAddress) -> str | None:
        text = _text(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name, "driver_override"))
        return None if text in (None, "", "(null)") else text

    def exists(self, addr: PciAddress) -> bool:
        return os.path.isdir(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name))

    def driver_loaded(self, driver: str) -> bool:
        return os.path.isdir(os.path.join(self.roots.sysfs, "bus/pci/drivers", _check_driver_name(driver)))

    def load_driver(self, driver: str) -> None:
        """modprobe the module behind `driver` (vfio-pci, pci-stub) if it is not there yet."""
        if self.driver_loaded(driver):
            return
        import subprocess

        module = {"vfio-pci": "vfio-pci", "pci-stub": "pci-stub"}.get(driver)
        if module is None:
            raise _KernelError(f"driver {driver} is not loaded and vfiod does not load it")
        p = subprocess.run(["modprobe", module], capture_output=True, text=True, timeout=30)
        if p.returncode != 0 or not self.driver_loaded(driver):
            raise _KernelError(f"cannot load {module}: {p.stderr.strip() or 'modprobe failed'}")

    # ---- the steps

    def set_override(self, addr: PciAddress, driver: str | None) -> None:
        value = "\n" if driver is None else _check_driver_name(driver)
        self._write(f"bus/pci/devices/{addr.sysfs_name}/driver_override", value,
                    f"{addr}: setting driver_override")

    def unbind(self, addr: PciAddress) -> None:
        drv = self.driver_of(addr)
        if drv is None:
            return
        self._write(f"bus/pci/drivers/{_check_driver_name(drv)}/unbind", addr.sysfs_name,
                    f"{addr}: unbinding from {drv}")

    def probe(self, addr: PciAddress) -> None:
        self._write("bus/pci/drivers_probe", addr.sysfs_name, f"{addr}: probing")

    def wait_driver(self, addr: PciAddress, want: str | None, timeout: float | None = None) -> str | None:
        deadline = _time.monotonic() + (self.bind_timeout if timeout is None else timeout)
        delay = 0.001
        while True:
            have = self.driver_of(addr)
            if have == want or _time.monotonic() >= deadline:
                return have
            _time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def bind(self, addr: PciAddress, driver: str) -> None:
        """Bind `addr` to `driver` through driver_override (never new_id) and verify it."""
        _check_driver_name(driver)
        if not self.exists(addr):
            raise _KernelError(f"{addr}: the device is gone")
        if self.driver_of(addr) == driver:
            return
        self.set_override(addr, driver)
        self.unbind(addr)
        self.probe(addr)
        have = self.wait_driver(addr, driver)
        if have != driver:
            raise _KernelError(f"{addr}: probing bound {have or 'no driver'}, not {driver}")

    def detach(self, addr: PciAddress) -> None:
        """Leave `addr` with no driver, and keep it so: driver_override names no
        driver ("none"), so a later probe binds nothing."""
        if not self.exists(addr):
            raise _KernelError(f"{addr}: the device is gone")
        if self.override_of(addr) != NO_DRIVER:
            self.set_override(addr, NO_DRIVER)
        self.unbind(addr)
        have = self.wait_driver(addr, None)
        if have is not None:
            raise _KernelError(f"{addr}: still on {have} after unbinding")

    def restore(self, addr: PciAddress, driver: str | None, override: str | None) -> None:
        """Give `addr` back its recorded driver and driver_override, and verify it.

        While the device is moved, driver_override names the recorded driver,
        so the probe binds exactly that one; a device that had no driver is
        unbound and not probed.  The recorded override is written last."""
        if not self.exists(addr):
            raise _KernelError(f"{addr}: the device is gone")
        if self.driver_of(addr) != driver:
            self.set_override(addr, driver if driver is not None else override)
            self.unbind(addr)
            if driver is not None:
                self.probe(addr)
            have = self.wait_driver(addr, driver)
            if have != driver:
                raise _KernelError(f"{addr}: restoring {driver or 'no driver'} failed, it is on "
                                   f"{have or 'no driver'}")
        if self.override_of(addr) != override:
            self.set_override(addr, override)

    def numvfs(self, pf: PciAddress) -> int | None:
        return _int(os.path.join(self.roots.sysfs, "bus/pci/devices", pf.sysfs_name, "sriov_numvfs"), 10)

    def set_numvfs(self, pf: PciAddress, count: int) -> None:
        """Enable `count` VFs on `pf`.  The kernel changes a non-zero count only
        through 0, which removes every VF first."""
        now = self.numvfs(pf)
        if now is None:
            raise _KernelError(f"{pf}: not an SR-IOV physical function")
        if now == count:
            return
        rel = f"bus/pci/devices/{pf.sysfs_name}/sriov_numvfs"
        if now and count:
            self._write(rel, "0", f"{pf}: disabling its {now} VFs")
        self._write(rel, str(count), f"{pf}: setting {count} VFs")

    def reset_methods(self, addr: PciAddress) -> tuple[str, ...]:
        text = _text(os.path.join(self.roots.sysfs, "bus/pci/devices", addr.sysfs_name, "reset_method"))
        return tuple(text.split()) if text else ()

    def reset(self, addr: PciAddress) -> str:
        """Reset one function (``BDF/reset``: the kernel tries the methods of
        ``reset_method`` in order, saving and restoring its config space).
        Returns the methods the kernel had to choose from."""
        if not self.exists(addr):
            raise _KernelError(f"{addr}: the device is gone")
        methods = self.reset_methods(addr)
        if not methods:
            raise _KernelError(f"{addr}: the kernel knows no way to reset it (reset_method is empty: "
                               "no FLR, PM or bus reset)")
        self._write(f"bus/pci/devices/{addr.sysfs_name}/reset", "1", f"{addr}: resetting")
        return " ".join(methods)

    # ---- /dev/vfio

    def vfio_group_path(self, group: int) -> str:
        return os.path.join(self.roots.dev, "vfio", str(int(group)))

    def vfio_container_path(self) -> str:
        return os.path.join(self.roots.dev, "vfio", "vfio")

    def wait_vfio_node(self, group: int, timeout: float = 5.0) -> os.stat_result:
        path = self.vfio_group_path(group)
        deadline = _time.monotonic() + timeout
        while True:
            try:
                return os.stat(path)
            except FileNotFoundError:
                if _time.monotonic() >= deadline:
                    raise _KernelError(f"{path} did not appear after binding group {group} to vfio-pci")
                _time.sleep(0.01)

    def node_owner(self, path: str) -> tuple[int, int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    def set_node_owner(self, path: str, uid: int, gid: int, mode: int) -> None:
        rel = os.path.relpath(path, self.roots.dev)
        if not any(p.fullmatch(rel) for p in DEV_WRITABLE):
            raise _KernelError(f"refusing to change {path!r}: not a VFIO node")
        try:
            os.chown(path, uid, gid)
            os.chmod(path, mode)
        except OSError as e:
            raise _KernelError(f"cannot hand over {path}: {e.strerror}") from None

    def open_vfio_group(self, group: int) -> int:
        return os.open(self.vfio_group_path(group), os.O_RDWR | os.O_CLOEXEC)

    def open_vfio_container(self) -> int:
        return os.open(self.vfio_container_path(), os.O_RDWR | os.O_CLOEXEC)

    def container_acl(self, uid: int, grant: bool) -> bool:
        """Add (or remove) a POSIX ACL entry rw for `uid` on /dev/vfio/vfio.

        Only where the node is not already world read-write (systemd >= 254
        makes it 0600).  Returns whether an entry was added/removed."""
        from . import acl

        path = self.vfio_container_path()
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        if grant and st.st_mode & 0o006 == 0o006:
            return False
        try:
            return acl.set_user(path, uid, 0o6 if grant else None)
        except OSError as e:
            raise _KernelError(f"cannot set an ACL on {path}: {e.strerror}") from None

    # ---- the lessee's process

    def memlock_of(self, pid: int) -> tuple[int, int] | None:
        """(soft, hard) RLIMIT_MEMLOCK of `pid` (-1: unlimited), or None if it is gone.

        From /proc/PID/limits, which anyone may read (prlimit on another user's
        process needs CAP_SYS_RESOURCE).  Processes are real even when the host
        is simulated, so this is the system's /proc, not the proc root."""
        text = _text(f"/proc/{int(pid)}/limits")
        for line in (text or "").splitlines():
            if line.startswith("Max locked memory"):
                fields = line.split()
                try:
                    return tuple(-1 if v == "unlimited" else int(v) for v in fields[3:5])
                except ValueError:
                    return None
        return None

    def grant_memlock(self, pid: int, limit: int) -> tuple[int, int] | None:
        """Raise `pid`'s RLIMIT_MEMLOCK (soft and hard) to at least `limit`; never lowers it.
        Returns the new (soft, hard), or None if the process is gone."""
        import resource
        inf = resource.RLIM_INFINITY
        try:
            cur = resource.prlimit(pid, resource.RLIMIT_MEMLOCK)
        except ProcessLookupError:
            return None
        except OSError as e:
            raise _KernelError(f"cannot read RLIMIT_MEMLOCK of process {pid}: {e.strerror} "
                               "(vfiod needs CAP_SYS_RESOURCE)") from None
        soft, hard = cur
        new = (soft if soft == inf or soft >= limit else limit, hard if hard == inf or hard >= limit else limit)
        if new != cur:
            try:
                resource.prlimit(pid, resource.RLIMIT_MEMLOCK, new)
            except ProcessLookupError:
                return None
            except OSError as e:
                raise _KernelError(f"cannot raise RLIMIT_MEMLOCK of process {pid}: {e.strerror}") from None
        return new

    # ---- in use

    def usage(self, addr: PciAddress) -> list[str]:
        """What on the host uses `addr` right now (empty: nothing we can see)."""
        return device_usage(self.roots, addr)


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
        holders = set()
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
                    holders.add(pid)
                    break
        if holders:
            out.append(f"DRM node {', '.join(drm)} is open in process(es) {', '.join(sorted(holders, key=int))}")
    return out
