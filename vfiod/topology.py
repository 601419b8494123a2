"""The host as VFIO sees it: devices, IOMMU groups, viability and why devices share a group.

`Host.scan(reader)` takes one snapshot.  Pure domain code: it reads only
through `vfiod.sysfs` and never imports the bus or udev layers.

Isolation is recomputed from the topology and config space with the rules the
kernel's ``pci_device_group()`` applies, in its order, for each device:

1. DMA aliases: below a PCIe-to-PCI or conventional PCI bridge, requester IDs
   are the bridge's, so the device joins the nearest such bridge's group
   (`alias`).
2. Otherwise, walking up, the first bridge above whose path to the root lacks
   ACS takes the device into its group (`no-acs-port`).
3. Otherwise, functions of one multifunction slot that lack ACS share a group
   (`multifunction`).

Where the recomputed partition differs from the kernel's groups (device
quirks, explicit DMA aliases, ``pcie_acs_override``), the group is reported
as `unknown` rather than guessed at.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator

import attrs

from .address import ORDER, PciAddress
from . import sysfs as k

VFIO_DRIVERS = frozenset(k.VFIO_DRIVERS)
BRIDGE_DRIVERS = frozenset({"pcieport"}) | VFIO_DRIVERS
REQ_ACS_FLAGS = k.ACS_SV | k.ACS_RR | k.ACS_CR | k.ACS_UF

ISOLATED, ALIAS, MULTIFUNCTION, NO_ACS_PORT, UNKNOWN = (
    "isolated", "alias", "multifunction", "no-acs-port", "unknown")
CAUSE_ORDER = (ALIAS, NO_ACS_PORT, MULTIFUNCTION)


@attrs.frozen
class Device:
    """A snapshot of one PCI function, with what the host needs it for."""

    raw: k.RawDevice
    protected: str = ""          # why the host needs it; "" if it does not

    @property
    def addr(self) -> PciAddress:
        return self.raw.addr

    @property
    def driver(self) -> str | None:
        return self.raw.driver

    @property
    def group(self) -> int | None:
        return self.raw.iommu_group

    @property
    def is_bridge(self) -> bool:
        """A bridge or port (config header type 1/2); VFIO exempts these from viability."""
        ht = self.raw.config.header_type
        if ht is not None:
            return ht != 0
        cc = self.raw.class_code
        return cc is not None and (cc >> 8) in (0x0604, 0x0609)

    @property
    def is_vf(self) -> bool:
        return self.raw.physfn is not None

    @property
    def multifunction(self) -> bool:
        """As the kernel sees it: the header's bit, or any function above 0 (pci_scan_slot
        marks those multifunction whatever their header says); never a VF."""
        return (bool(self.raw.config.multifunction) or self.addr.function > 0) and not self.is_vf

    @property
    def kind(self) -> str:
        """Endpoint, root port, switch port, bridge… in words."""
        cfg = self.raw.config
        if cfg.pcie_type is not None:
            return k.PCIE_TYPE_NAMES.get(cfg.pcie_type, "PCIe function")
        if self.is_bridge:
            return "PCI bridge"
        return "PCI device" if cfg.known else "device"

    @property
    def blocker_code(self) -> str:
        """The stable code of `blocker`'s reason (docs/json.md): a bridge or an endpoint on a
        driver VFIO does not accept."""
        return "bridge-driver" if self.is_bridge else "host-driver"

    def blocker(self, alone: bool = False) -> str | None:
        """Why this device keeps its group from VFIO, with the fix; None if it does not.

        `alone`: the device is its group's only endpoint, so "lease it too" is moot."""
        drv = self.driver
        if drv is None:
            return None
        if self.is_bridge:
            if drv in BRIDGE_DRIVERS:
                return None
            return (f"bridge {self.addr} is bound to {drv}, which VFIO does not accept: "
                    f"unbind {self.addr} from {drv} (a lease does this)")
        if drv in VFIO_DRIVERS:
            return None
        if alone:
            return f"bound to {drv}: a lease unbinds {self.addr} from {drv} (or unbind it by hand)"
        return f"bound to {drv}: unbind {self.addr} from {drv} or lease it too"


@attrs.frozen
class Link:
    """One reason two devices share a group."""

    cause: str
    device: PciAddress
    via: PciAddress


@attrs.frozen
class Group:
    number: int
    members: tuple[PciAddress, ...]
    viable: bool
    blockers: tuple[tuple[PciAddress, str], ...]
    state: str                   # host | parked (leases are added by the lease manager)
    isolation: str
    isolation_text: str
    links: tuple[Link, ...] = ()
    protected: tuple[tuple[PciAddress, str], ...] = ()


@attrs.frozen
class Finding:
    code: str
    text: str


#: What turns the IOMMU on (the `no-iommu` finding and every "in no IOMMU group" answer say it).
ENABLE_IOMMU = ("Enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware setup and boot with "
                "intel_iommu=on (Intel; AMD enables it by default, check amd_iommu= is not off).")


@attrs.frozen
class Host:
    devices: dict[PciAddress, Device]
    groups: dict[int, Group]
    findings: tuple[Finding, ...]
    iommu_enabled: bool
    acs_override: bool
    noiommu: bool

    @classmethod
    def scan(cls, reader: k.SysfsReader) -> "Host":
        raws = reader.scan()
        facts = reader.facts()
        return cls.from_raw(raws, facts)

    @classmethod
    def scan_groups(cls, reader: k.SysfsReader, groups: Iterable[int]) -> "Host":
        """A snapshot of just these groups' devices (isolation is explained within them)."""
        return cls.from_raw(reader.scan_groups(groups), reader.facts())

    @classmethod
    def from_raw(cls, raws: list[k.RawDevice], facts: k.HostFacts) -> "Host":
        protected = _protected(raws, facts)
        devices = {r.addr: Device(raw=r, protected=protected.get(r.addr, "")) for r in raws}
        members: dict[int, list[PciAddress]] = defaultdict(list)
        for d in devices.values():
            if d.group is not None:
                members[d.group].append(d.addr)
        engine = _Isolation(devices)
        groups = {}
        for number in sorted(members):
            addrs = tuple(sorted(members[number], key=ORDER))
            groups[number] = _make_group(number, addrs, devices, engine)
        acs_override = any(w.startswith("pcie_acs_override=") for w in facts.cmdline.split())
        findings = _findings(devices, groups, facts, acs_override)
        return cls(devices=devices, groups=groups, findings=findings,
                   iommu_enabled=facts.iommu_enabled or bool(groups),
                   acs_override=acs_override, noiommu=facts.noiommu)

    def no_group_reason(self) -> str:
        """Why a device that is there sits in no IOMMU group, and what to do."""
        if not self.iommu_enabled:
            return f"the IOMMU is missing or off. {ENABLE_IOMMU}"
        return "the kernel put it in none (a device the IOMMU does not translate); `vfiod inspect` lists it"

    def group_of(self, addr: PciAddress) -> Group | None:
        dev = self.devices.get(addr)
        if dev is None or dev.group is None:
            return None
        return self.groups.get(dev.group)

    def endpoints(self, group: Group) -> list[Device]:
        return [self.devices[a] for a in group.members if not self.devices[a].is_bridge]


def _make_group(number: int, addrs: tuple[PciAddress, ...], devices: dict[PciAddress, Device],
                engine: _Isolation) -> Group:
    endpoints = [devices[a] for a in addrs if not devices[a].is_bridge]
    alone = len(endpoints) == 1
    blockers = tuple((a, b) for a in addrs if (b := devices[a].blocker(alone)))
    parked = endpoints and all(d.driver in VFIO_DRIVERS for d in endpoints)
    code, text, links = engine.explain(addrs)
    return Group(
        number=number, members=addrs, viable=not blockers, blockers=blockers,
        state="parked" if parked else "host", isolation=code, isolation_text=text,
        links=links,
        protected=tuple((a, devices[a].protected) for a in addrs if devices[a].protected),
    )


# ------------------------------------------------------------------ isolation

class _Isolation:
    """Recomputes the kernel's grouping from topology and config space."""

    def __init__(self, devices: dict[PciAddress, Device]):
        self.devices = devices
        self.parent: dict[PciAddress, PciAddress] = {a: a for a in devices}
        self._links_of: dict[PciAddress, list[Link]] = defaultdict(list)
        self.unknown: set[PciAddress] = set()
        self._components: dict[PciAddress, set[PciAddress]] | None = None
        self._slots: dict[tuple[PciAddress | None, int, int, int], list[Device]] = defaultdict(list)
        self._acs_path: dict[PciAddress, bool | None] = {}
        for d in devices.values():
            self._slots[(d.raw.parent, d.addr.domain, d.addr.bus, d.addr.slot)].append(d)
        for addr in sorted(devices, key=ORDER):
            self._place(devices[addr])

    def _find(self, a: PciAddress) -> PciAddress:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def _join(self, cause: str, dev: PciAddress, via: PciAddress) -> None:
        if via not in self.devices:
            return
        self._links_of[dev].append(Link(cause, dev, via))
        ra, rb = self._find(dev), self._find(via)
        if ra != rb:
            self.parent[ra] = rb

    def _ancestors(self, dev: Device) -> Iterator[Device]:
        seen: set[PciAddress] = set()
        p = dev.raw.parent
        while p is not None and p in self.devices and p not in seen:
            seen.add(p)
            yield self.devices[p]
            p = self.devices[p].raw.parent

    def acs_enabled(self, dev: Device) -> bool | None:
        """The kernel's pci_acs_enabled(dev, REQ_ACS_FLAGS); None where config space is unknown."""
        cfg = dev.raw.config
        if not cfg.known:
            return None
        if cfg.pcie_type is None:
            return False                         # conventional PCI never isolates
        t = cfg.pcie_type
        if t in (k.PCIE_PCIE_BRIDGE, k.PCIE_PCI_BRIDGE, k.PCIE_RC_EC):
            return False
        if t in (k.PCIE_DOWNSTREAM, k.PCIE_ROOT_PORT):
            return self._flags_enabled(dev)
        if t in (k.PCIE_ENDPOINT, k.PCIE_UPSTREAM, k.PCIE_LEGACY_ENDPOINT, k.PCIE_RC_ENDPOINT):
            if not dev.multifunction:
                return True
            return self._flags_enabled(dev)
        return True

    @staticmethod
    def _flags_enabled(dev: Device) -> bool | None:
        cfg = dev.raw.config
        if not cfg.ext_known:
            return None
        if cfg.acs_cap is None or cfg.acs_ctrl is None:      # read together: both or neither
            return False
        flags = REQ_ACS_FLAGS & (cfg.acs_cap | k.ACS_EC)
        return (cfg.acs_ctrl & flags) == flags

    def acs_path_enabled(self, dev: Device) -> bool | None:
        """ACS on `dev` and every bridge above it (asked once per bridge: the functions
        below one port share the answer)."""
        addr = dev.addr
        if addr in self._acs_path:
            return self._acs_path[addr]
        ok = self._acs_path[addr] = self.acs_enabled(dev)      # also ends a loop of parents
        if ok and dev.raw.parent is not None and dev.raw.parent in self.devices:
            ok = self.acs_path_enabled(self.devices[dev.raw.parent])
        self._acs_path[addr] = ok
        return ok

    def _place(self, dev: Device) -> None:
        # 1. DMA alias through a PCIe-to-PCI or conventional bridge.
        for b in self._ancestors(dev):
            cfg = b.raw.config
            if not cfg.known:
                self.unknown.add(dev.addr)
                return
            if cfg.pcie_type in (k.PCIE_ROOT_PORT, k.PCIE_UPSTREAM, k.PCIE_DOWNSTREAM):
                continue
            self._join(ALIAS, dev.addr, b.addr)
            return
        # 2. The first bridge above whose path to the root lacks ACS.
        for b in self._ancestors(dev):
            ok = self.acs_path_enabled(b)
            if ok is None:
                self.unknown.add(dev.addr)
                return
            if ok:
                break
            self._join(NO_ACS_PORT, dev.addr, b.addr)
            return
        # 3. Functions of one slot without ACS.
        if not dev.multifunction:
            return
        mine = self.acs_enabled(dev)
        if mine is None:
            self.unknown.add(dev.addr)
            return
        if mine:
            return
        for other in self._slots[(dev.raw.parent, dev.addr.domain, dev.addr.bus, dev.addr.slot)]:
            if other.addr != dev.addr:
                theirs = self.acs_enabled(other)
                if theirs is None:
                    self.unknown.add(dev.addr)
                elif not theirs:
                    self._join(MULTIFUNCTION, dev.addr, other.addr)

    def component(self, addr: PciAddress) -> set[PciAddress]:
        if self._components is None:
            self._components = defaultdict(set)
            for a in self.devices:
                self._components[self._find(a)].add(a)
        return self._components[self._find(addr)]

    def explain(self, members: tuple[PciAddress, ...]) -> tuple[str, str, tuple[Link, ...]]:
        mset = set(members)
        comp = self.component(members[0])
        links = tuple(l for a in members for l in self._links_of.get(a, ()) if l.via in mset)
        unknown = sorted(mset & self.unknown)
        if unknown:
            return UNKNOWN, (
                "cannot be recomputed: the configuration space of "
                + ", ".join(map(str, unknown)) + " (or a bridge above) is not readable; run as root"
            ), links
        if comp != mset:
            extra, missing = sorted(comp - mset), sorted(mset - comp)
            parts = []
            if missing:
                parts.append("the kernel groups " + ", ".join(map(str, missing))
                             + " here although the topology and ACS do not explain it "
                             "(a device quirk or an explicit DMA alias, most likely)")
            if extra:
                parts.append("the topology would also put " + ", ".join(map(str, extra))
                             + " here, but the kernel isolates them (a device-specific ACS quirk "
                             "or pcie_acs_override, most likely)")
            return UNKNOWN, "; ".join(parts), links
        if len(members) == 1:
            return ISOLATED, f"{members[0]} is alone in its group: the IOMMU can isolate it.", ()
        by_cause = defaultdict(list)
        for l in links:
            by_cause[l.cause].append(l)
        code = next(c for c in CAUSE_ORDER if c in by_cause)
        sentences = [self._sentence(c, by_cause[c]) for c in CAUSE_ORDER if c in by_cause]
        return code, " ".join(sentences), links

    def _sentence(self, cause: str, links: list[Link]) -> str:
        by_via: dict[PciAddress, list[PciAddress]] = defaultdict(list)
        for l in links:
            by_via[l.via].append(l.device)
        out = []
        if cause == MULTIFUNCTION:
            fns = sorted({l.device for l in links} | {l.via for l in links})
            return (f"{_join_words(fns)} are functions of one multifunction device without ACS, "
                    "so they may reach each other without passing the IOMMU.")
        for via, devs in sorted(by_via.items()):
            kind = self.devices[via].kind
            devs = sorted(set(devs))
            if cause == ALIAS:
                out.append(f"{_join_words(devs)} {'is' if len(devs) == 1 else 'are'} behind the {kind} "
                           f"{via}, which forwards DMA under its own requester ID, so the IOMMU "
                           "cannot tell them apart.")
            else:
                out.append(f"{_join_words(devs)} {'is' if len(devs) == 1 else 'are'} below the {kind} "
                           f"{via}, whose path to the root lacks ACS, so peer-to-peer DMA could "
                           "bypass the IOMMU there.")
        return " ".join(out)


def _join_words(things: Iterable[object]) -> str:
    items = [str(i) for i in things]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


# ------------------------------------------------------------------ host needs

#: Why the host needs a device: the stable code (docs/json.md) and the words its reason starts with.
PROTECTED_REASONS = {"boot-vga": "boot VGA", "root-disk": "root disk", "default-route": "default route NIC"}


def protected_code(reason: str) -> str | None:
    """The code of a `Device.protected` reason; None for no reason."""
    if not reason:
        return None
    return next((code for code, words in PROTECTED_REASONS.items() if reason.startswith(words + ":")), "other")


def _protected(raws: list[k.RawDevice], facts: k.HostFacts) -> dict[PciAddress, str]:
    out: dict[PciAddress, str] = {}
    known = {r.addr for r in raws}

    def mark(addr: PciAddress, reason: str) -> None:
        if addr in known and addr not in out:
            out[addr] = reason

    for r in raws:
        if r.boot_vga:
            mark(r.addr, f"{PROTECTED_REASONS['boot-vga']}: the host's console display")
    for node in facts.root_block_nodes:
        addr = k.pci_ancestor(node)
        if addr:
            mark(addr, f"{PROTECTED_REASONS['root-disk']}: storage controller of the root filesystem "
                       f"({node.rsplit('/', 1)[-1]})")
    for iface, node in facts.default_route_nodes:
        addr = k.pci_ancestor(node)
        if addr:
            mark(addr, f"{PROTECTED_REASONS['default-route']}: carries the host's default route ({iface})")
    return out


def _findings(devices: dict[PciAddress, Device], groups: dict[int, Group], facts: k.HostFacts,
              acs_override: bool) -> tuple[Finding, ...]:
    out = []
    if not groups:
        out.append(Finding("no-iommu", "No IOMMU groups: the IOMMU is missing or off, so VFIO cannot "
                           f"isolate any device. {ENABLE_IOMMU}"))
    if acs_override:
        out.append(Finding("acs-override", (
            "pcie_acs_override= is on the kernel command line: the kernel pretends devices have ACS, "
            "so groups are smaller than the hardware really isolates and devices in different "
            "groups may still reach each other's memory.")))
    if facts.noiommu:
        out.append(Finding("noiommu", (
            "VFIO's unsafe no-IOMMU mode is on: a /dev/vfio/noiommu-N group gives its user DMA to "
            "all of memory, which is root-equivalent.")))
    unreadable = [d.addr for d in devices.values() if any("config space" in p for p in d.raw.problems)]
    if unreadable:
        out.append(Finding("config-unreadable", (
            f"The configuration space of {len(unreadable)} device(s) is not fully readable "
            "(reading it past 64 bytes needs root), so their isolation cannot be explained.")))
    broken = [d.addr for d in devices.values() if d.raw.node is None]
    if broken:
        out.append(Finding("dangling", "sysfs links are missing or dangling for "
                           + ", ".join(map(str, broken)) + "; those devices are listed without details."))
    return tuple(out)
