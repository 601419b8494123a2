"""One PCI function as sysfs shows it (`RawDevice`), and the pass that reads many (`DeviceReads`).

What a function costs to read, per kind (a whole-host scan of a large SR-IOV host
is thousands of VFs, so every system call per device counts):

- every function: the ``bus/pci/devices`` link (its node), one ``O_PATH`` open of the
  node (everything else is read relative to it, no path walks), the ``physfn``,
  ``iommu_group`` and ``driver`` links, ``reset_method``, ``numa_node`` and
  ``driver_override``;
- a function that is not a VF: its configuration space up to the capability list
  (256 bytes: ids, class, subsystem, header type, PCIe port type and link), and all of it
  (extended capabilities: ACS, SR-IOV, the serial number) only where isolation
  needs it — bridges and multifunction devices — or where the reader reads deep
  (a lease's own devices); ``sriov_totalvfs`` (and, for a PF, its VFs' links);
- a VF, in a whole-host scan: ``uevent`` instead of configuration space (a VF's
  config shows 0xffff for its ids; ``uevent`` has the kernel's ids, class and
  subsystem ids in one read); its PCIe port type is its PF's;
- ``net`` only for a network function on a driver that can have interfaces (not
  on vfio-pci, pci-stub or none), and on virtio-pci also ``virtioN/net`` (a virtio
  NIC's interface belongs to the virtio device below the function: `vfiod.sysfs.net`);
  ``boot_vga`` only for a VGA function;
- the PCIe link (speed and width, now and at most) comes with the configuration space
  read anyway; only where that showed too little (a reader that is not root sees 64
  bytes) are ``current_link_speed`` and, where it exists, ``current_link_width``,
  ``max_link_speed`` and ``max_link_width`` read.  A VF has no link of its own: none
  is read.

``driver_override`` and ``sriov_numvfs`` of a function on vfio-pci are read last,
in one patient batch (`vfiod.sysfs.patience`): the kernel shows them under the
device lock, which an unbind waiting for holders keeps.
"""

from __future__ import annotations

import os
import re
from typing import Any

import attrs

from ..address import ORDER, PciAddress
from ..errors import InvalidAddress
from .config import NO_LINK_TYPES, ConfigInfo, PcieLink
from .net import interfaces_at
from .patience import Patience, read_at

#: Drivers that leave DMA to their owner: the only ones a lease binds, and (with no
#: driver) the only ones a viable group's endpoints may be on.  Neither makes network
#: interfaces.
VFIO_DRIVERS = ("vfio-pci", "pci-stub")
#: Configuration space up to and with the capability list: what any reader may read
#: past the first 64 bytes without reaching the extended capabilities.
STANDARD_CONFIG = 256

_PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


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
    revision: int | None = None       # None also for a VF of a whole-host scan (its config is not read)
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
    link: PcieLink | None = None      # its PCIe link (None: not PCIe, no link of its own, or unknown)
    problems: tuple[str, ...] = ()
    cdev: str | None = None           # vfioX of BDF/vfio-dev: its VFIO device cdev (kernels with them)


def addr_or_none(name: str) -> PciAddress | None:
    try:
        return PciAddress.from_sysfs_name(name)
    except InvalidAddress:
        return None


def readlink_at(dfd: int | None, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=dfd)
    except OSError:
        return None


def listdir_at(dfd: int, name: str) -> tuple[str, ...]:
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=dfd)
    except OSError:
        return ()
    try:
        return tuple(sorted(os.listdir(fd)))
    except OSError:
        return ()
    finally:
        os.close(fd)


def resolve_rel(root: str, link_dir_rel: str, target: str) -> str | None:
    """Resolve a relative link target against its directory, inside `root`.

    Works on strings (no syscalls); returns the path relative to `root`, or
    None if the target is absolute or climbs out of the root."""
    if link_dir_rel == "bus/pci/devices" and target.startswith("../../../") and "/." not in target[8:]:
        return target[9:]                  # what the kernel's links look like
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


#: What the kernel's pci_uevent() writes, in its order (``DRIVER=`` may come before).
_UEVENT = re.compile(rb"^PCI_CLASS=([0-9A-Fa-f]{1,6})\nPCI_ID=([0-9A-Fa-f]{4}):([0-9A-Fa-f]{4})\n"
                     rb"PCI_SUBSYS_ID=([0-9A-Fa-f]{4}):([0-9A-Fa-f]{4})$", re.MULTILINE)


#: (vendor, device, subsystem vendor, subsystem device, class), each None where unknown
_Ids = tuple[int | None, int | None, int | None, int | None, int | None]


def _config_ids(raw: bytes | None) -> _Ids | None:
    """The ids and class from configuration space; None where it shows none (unread, too
    short, or a VF's, whose vendor and device read 0xffff)."""
    if raw is None or len(raw) < 0x30 or raw[0:2] == b"\xff\xff":
        return None
    le = int.from_bytes
    subsys = (le(raw[0x2C:0x2E], "little"), le(raw[0x2E:0x30], "little")) if raw[0x0E] & 0x7F == 0 else (None, None)
    return le(raw[0:2], "little"), le(raw[2:4], "little"), subsys[0], subsys[1], le(raw[9:12], "little")


def _uevent_ids(data: bytes | None) -> _Ids | None:
    """(vendor, device, subsystem vendor, subsystem device, class) from a PCI ``uevent``;
    None unless all are there and well formed."""
    m = _UEVENT.search(data) if data else None
    if m is None:
        return None
    cls, vendor, device, sub_vendor, sub_device = (int(g, 16) for g in m.groups())
    return vendor, device, sub_vendor, sub_device, cls


def _needs_extended(raw: bytes, addr: PciAddress) -> bool:
    """Does explaining this function's isolation need its ACS capability: a bridge or port,
    or a function of a multifunction device (DESIGN: the kernel's pci_device_group)?"""
    return len(raw) > 0x0E and (raw[0x0E] != 0 or addr.function > 0)


class DeviceReads:
    """One pass of a reader over some functions: `read` each (in address order, so a PF
    comes before its VFs), then `finish` them all (the patient batch is read there)."""

    def __init__(self, sysfs: str, root: int, deep: bool, config_limit: int, locked: frozenset[PciAddress],
                 patience: Patience, cdevs: bool = False):
        self.sysfs = sysfs
        #: does the kernel make VFIO device cdevs (``/dev/vfio/devices`` is there)?  Kernels
        #: from 6.1 show ``BDF/vfio-dev/vfioX`` in sysfs, but only those from 6.6 with
        #: CONFIG_VFIO_DEVICE_CDEV make a node of it; elsewhere nothing is looked for.
        self.cdevs = cdevs
        self.root = root
        self.deep = deep
        self.limit = config_limit
        self.locked = locked
        #: the patient reads (`vfiod.sysfs.patience`), and for each (index of the function,
        #: its node, the attribute)
        self.batch = patience.batch()
        self.late: list[tuple[int, str, str]] = []
        self._pf_config: dict[PciAddress, ConfigInfo] = {}
        self._vf_configs: dict[PciAddress, ConfigInfo] = {}
        self._count = 0
        self._vfs_of: dict[PciAddress, list[PciAddress]] = {}

    def read(self, addr: PciAddress) -> dict[str, Any]:
        """The fields of `addr`'s `RawDevice` (its problems a list until `RawDevice` is made)."""
        index = self._count
        self._count += 1
        target = readlink_at(self.root, "bus/pci/devices/" + addr.sysfs_name)
        node = resolve_rel(self.sysfs, "bus/pci/devices", target) if target else None
        dfd = -1
        if node is not None:
            try:
                dfd = os.open(node, _PATH_FLAGS, dir_fd=self.root)
            except OSError:
                pass
        if node is None or dfd < 0:
            return {"addr": addr, "node": None, "parent": None, "problems": ["sysfs link is missing or dangling"]}
        try:
            return self._fields(index, addr, node, dfd)
        finally:
            os.close(dfd)

    def _fields(self, index: int, addr: PciAddress, node: str, dfd: int) -> dict[str, Any]:
        problems: list[str] = []
        f: dict[str, Any] = {"addr": addr, "node": node, "problems": problems}
        parent = None
        for piece in reversed(node.split("/")[:-1]):
            parent = addr_or_none(piece)
            if parent:
                break
        f["parent"] = parent

        link = readlink_at(dfd, "physfn")
        physfn = f["physfn"] = addr_or_none(link.rpartition("/")[2]) if link else None
        raw: bytes | None = None
        if self.deep or physfn is None:
            raw = self._config(dfd, addr, problems, f)
        else:
            self._vfs_of.setdefault(physfn, []).append(addr)
            f["config"] = self._vf_config(physfn)
        ids = _config_ids(raw)
        revision = raw[8] if raw is not None and len(raw) > 8 else None
        if ids is None:
            ids = _uevent_ids(read_at(dfd, "uevent"))
        if ids is None:                # no uevent (an old fake tree): the attribute files
            ids = (_number(dfd, "vendor", 16, problems), _number(dfd, "device", 16, problems),
                   _number(dfd, "subsystem_vendor", 16, problems), _number(dfd, "subsystem_device", 16, problems),
                   _number(dfd, "class", 16, problems))
            revision = _number(dfd, "revision", 16, problems) if revision is None else revision
        f["vendor"], f["device"], f["subsystem_vendor"], f["subsystem_device"], f["class_code"] = ids
        f["revision"] = revision

        link = readlink_at(dfd, "iommu_group")
        group = None
        if link:
            try:
                group = int(link.rpartition("/")[2])
            except ValueError:
                problems.append(f"iommu_group link is odd: {link!r}")
        f["iommu_group"] = group
        link = readlink_at(dfd, "driver")
        driver = f["driver"] = link.rpartition("/")[2] if link else None
        # An unbind from vfio-pci may hold the device lock for long; the kernel removes the
        # driver link first, so a device the ladder unbinds shows no driver meanwhile.
        held = addr in self.locked
        late = driver == "vfio-pci" and not held
        if late:
            self._later(index, node, "driver_override")
        f["driver_override"] = None if (late or held) else _override(read_at(dfd, "driver_override"))
        reset = read_at(dfd, "reset_method")
        f["reset_methods"] = tuple(reset.decode().split()) if reset else ()
        class_sub = (f["class_code"] or 0) >> 8
        f["boot_vga"] = class_sub == 0x0300 and read_at(dfd, "boot_vga") == b"1\n"
        f["sriov_totalvfs"] = f["sriov_numvfs"] = None
        if physfn is None:
            total = f["sriov_totalvfs"] = _number(dfd, "sriov_totalvfs", 10, problems)
            if total is not None:
                if "config" in f:
                    self._pf_config[addr] = f["config"]
                if late:
                    self._later(index, node, "sriov_numvfs")
                elif not held:
                    self._numvfs(f, read_at(dfd, "sriov_numvfs"), dfd)
        f["virtfns"] = f.get("virtfns", ())
        f["numa_node"] = _number(dfd, "numa_node", 10, problems)
        f["link"] = None if physfn else _link(dfd, f["config"])
        has_net = class_sub >> 8 == 0x02 and driver is not None and driver not in VFIO_DRIVERS
        if not has_net:
            f["net"] = ()
        else:
            f["net"] = interfaces_at(dfd) if driver == "virtio-pci" else listdir_at(dfd, "net")
        f["cdev"] = next(iter(listdir_at(dfd, "vfio-dev")), None) if self.cdevs and driver == "vfio-pci" else None
        return f

    def _vf_config(self, physfn: PciAddress) -> ConfigInfo:
        """What a whole-host scan knows of a VF's configuration space: its PF's PCIe type
        (one object shared by the PF's VFs)."""
        cfg = self._vf_configs.get(physfn)
        if cfg is None:
            pf = self._pf_config.get(physfn)
            cfg = (ConfigInfo(header_type=0, multifunction=False, pcie_type=pf.pcie_type, is_pcie=pf.is_pcie,
                              known=pf.known) if pf else ConfigInfo())
            self._vf_configs[physfn] = cfg
        return cfg

    def _later(self, index: int, node: str, name: str) -> None:
        self.batch.add(f"{self.sysfs}/{node}/{name}")
        self.late.append((index, node, name))

    def _config(self, dfd: int, addr: PciAddress, problems: list[str], f: dict[str, Any]) -> bytes | None:
        """Read and parse configuration space as deep as this pass needs (see the module)."""
        want = self.limit if self.deep else min(self.limit, STANDARD_CONFIG)
        raw = read_at(dfd, "config", want)
        needed = self.deep or (raw is not None and _needs_extended(raw, addr))
        if raw is not None and not self.deep and needed and len(raw) == want < self.limit:
            raw = read_at(dfd, "config", self.limit) or raw
        if raw is None:
            problems.append("config space unreadable")
            f["config"] = ConfigInfo()
            return None
        cfg = f["config"] = ConfigInfo.parse(raw)
        if needed and not cfg.ext_known and cfg.is_pcie is not False:
            problems.append(f"only {cfg.length} bytes of config space readable (ACS unknown; run as root)")
        return raw

    def _numvfs(self, f: dict[str, Any], text: bytes | None, dfd: int | None, node: str = "") -> None:
        """The VF count, and the VFs' links (a whole-host scan has each VF's ``physfn``
        instead: `finish`)."""
        try:
            numvfs = f["sriov_numvfs"] = int(text, 10) if text is not None else None
        except ValueError:
            f["problems"].append("sriov_numvfs unreadable")
            return
        if not self.deep:
            return
        virtfns = []
        for i in range(numvfs or 0):
            link = readlink_at(dfd, os.path.join(node, f"virtfn{i}"))
            vf = addr_or_none(link.rpartition("/")[2]) if link else None
            if vf:
                virtfns.append(vf)
        f["virtfns"] = tuple(sorted(virtfns, key=ORDER))

    def finish(self, fields: list[dict[str, Any]]) -> list[RawDevice]:
        """The devices, once the patient batch has answered (None: not in time)."""
        for (i, node, name), data in zip(self.late, self.batch.results()):
            if name == "driver_override":
                fields[i]["driver_override"] = _override(data)
            elif data is not None:
                self._numvfs(fields[i], data, None, os.path.join(self.sysfs, node))
        out = []
        for f in fields:
            if not self.deep and f.get("sriov_numvfs"):
                f["virtfns"] = tuple(sorted(self._vfs_of.get(f["addr"], ()), key=ORDER))
            f["problems"] = tuple(f["problems"])
            out.append(RawDevice(**f))
        return out

def _number(dfd: int, name: str, base: int, problems: list[str]) -> int | None:
    """An attribute's number (base 16 also takes a ``0x`` prefix); a text that is none is a problem."""
    text = read_at(dfd, name)
    if text is None:
        return None
    try:
        return int(text, 0 if base == 16 else base)
    except ValueError:
        problems.append(f"{name} unreadable")
        return None


def _link(dfd: int, cfg: ConfigInfo) -> PcieLink | None:
    """The link, from configuration space where it showed it (no system call), else from
    the kernel's attributes, which exist only on PCIe functions."""
    if cfg.is_pcie is False or (cfg.is_pcie and (cfg.link is not None or cfg.pcie_type in NO_LINK_TYPES)):
        return cfg.link
    speed = read_at(dfd, "current_link_speed")
    if speed is None:
        return None
    return PcieLink.from_sysfs(speed, read_at(dfd, "current_link_width"), read_at(dfd, "max_link_speed"),
                               read_at(dfd, "max_link_width"))


def _override(data: bytes | None) -> str | None:
    text = data.strip().decode("utf-8", "replace") if data else None
    return None if text in ("(null)", "") else text
