"""Shapes for people and scripts: the JSON of DESIGN §4 and the tables built from it.

Both `vfiod inspect` (offline) and `vfioctl` (over the bus) print through
here, so a group reads the same whichever way it was fetched.
"""

from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .address import ORDER, PciAddress
from .pciids import PciIds
from .sysfs.config import PcieLink
from .sysfs.mdev import MdevType
from .topology import VFIO_DRIVERS as VFIO_FRIENDLY, Finding, Group, Host, protected_code

if TYPE_CHECKING:
    from .state import LeaseRow

# A JSON object of the shapes below, as built here or as json.loads gives it back.
Json = dict[str, Any]
# The driver a device had before its lease, by address (None: none).
OriginalDriver = Callable[[PciAddress], str | None]


#: The version of every JSON document vfiod and vfioctl print (docs/json.md).  It goes up
#: only when a field is dropped, renamed or changes meaning; new fields keep it.
JSON_VERSION = 1


def envelope(kind: str, **fields: Any) -> Json:
    """A document: ``{"version": 1, "kind": KIND, ...}`` (docs/json.md lists every kind)."""
    return {"version": JSON_VERSION, "kind": kind, **fields}


def device_json(host: Host, addr: PciAddress, names: PciIds, original_driver: OriginalDriver | None = None) -> Json:
    """One device.  `original_driver(addr)`: the driver it had before its lease (the daemon
    knows; offline it is the driver it has)."""
    d = host.devices[addr]
    r = d.raw
    return {
        "address": str(addr),
        "vendor": f"{r.vendor:04x}" if r.vendor is not None else None,
        "device": f"{r.device:04x}" if r.device is not None else None,
        "subsystem": (f"{r.subsystem_vendor:04x}:{r.subsystem_device:04x}"
                      if r.subsystem_vendor is not None and r.subsystem_device is not None else None),
        "class": f"{r.class_code:06x}" if r.class_code is not None else None,
        "class_name": names.class_name(r.class_code) if r.class_code is not None else "unknown",
        "name": names.describe(r.vendor, r.device),
        "kind": d.kind,
        "driver": r.driver,
        "original_driver": original_driver(addr) if original_driver else r.driver,
        "driver_override": r.driver_override,
        "bridge": d.is_bridge,
        "protected": reason_json(protected_code(d.protected), d.protected),
        "iommu_group": r.iommu_group,
        "cdev": f"/dev/vfio/devices/{r.cdev}" if r.cdev else None,
        "physfn": str(r.physfn) if r.physfn else None,
        "virtfns": [str(v) for v in r.virtfns],
        "reset_methods": list(r.reset_methods),
        "numa_node": r.numa_node,
        "parent": str(r.parent) if r.parent else None,
        "link": link_json(r.link),
        "net": list(r.net),
        "problems": list(r.problems),
    }


def link_json(link: PcieLink | None) -> Json | None:
    """A PCIe link: speeds in GT/s, widths in lanes (0: down), None where unknown."""
    if link is None:
        return None
    return {"speed": link.speed, "width": link.width, "max_speed": link.max_speed, "max_width": link.max_width,
            "downgraded": link.downgraded}


def tree_json(host: Host, names: PciIds, original_driver: OriginalDriver | None = None) -> list[Json]:
    """The PCI tree, as ``lspci -t`` draws it: each root bus (``pci0000:00``, from the
    devices' sysfs nodes) with the functions on it, each bridge or port with those below
    it in ``children``; every function the one device object, IOMMU group or not."""
    children: dict[PciAddress | None, list[PciAddress]] = {}
    for addr in sorted(host.devices, key=ORDER):
        parent = host.devices[addr].raw.parent
        children.setdefault(parent if parent in host.devices else None, []).append(addr)

    def node(addr: PciAddress) -> Json:
        return {**device_json(host, addr, names, original_driver),
                "children": [node(a) for a in children.get(addr, ())]}

    buses: dict[str, list[Json]] = {}
    for addr in children.get(None, ()):
        buses.setdefault(_root_bus(host.devices[addr].raw.node, addr), []).append(node(addr))
    return [{"bus": bus, "devices": devices} for bus, devices in sorted(buses.items())]


def _root_bus(node: str | None, addr: PciAddress) -> str:
    """``pci0000:00`` of a node ``devices/pci0000:00/...`` (the kernel's name of the root bus)."""
    pieces = (node or "").split("/")
    if len(pieces) > 2 and pieces[0] == "devices" and pieces[1].startswith("pci"):
        return pieces[1]
    return f"pci{addr.domain:04x}:{addr.bus:02x}"


def prune_tree(buses: list[Json], keep: set[str]) -> list[Json]:
    """Only the branches that lead to the devices `keep` names (each with all below it)."""
    def prune(devices: list[Json]) -> list[Json]:
        out = []
        for d in devices:
            if d["address"] in keep:
                out.append(d)
            else:
                below = prune(d["children"])
                if below:
                    out.append({**d, "children": below})
        return out
    return [{**b, "devices": kept} for b in buses if (kept := prune(b["devices"]))]


def link_text(link: Json | None) -> str:
    """``PCIe 8.0 GT/s x4`` (and the maximum where the link runs below it); "" for no link."""
    if link is None:
        return ""
    def one(speed: float | None, width: int | None) -> str:
        return f"{f'{speed:.1f}' if speed else '?'} GT/s x{width if width is not None else '?'}"
    if link["width"] == 0:
        return f"PCIe link down (max {one(link['max_speed'], link['max_width'])})"
    text = "PCIe " + one(link["speed"], link["width"])
    return text + (f" (downgraded, max {one(link['max_speed'], link['max_width'])})" if link["downgraded"] else "")


def render_tree(buses: list[Json]) -> str:
    """The tree a person reads: one line a function, with its group, driver, link and NUMA node."""
    lines: list[str] = []

    def walk(devices: list[Json], indent: str) -> None:
        for i, d in enumerate(devices):
            last = i == len(devices) - 1
            facts = [f"group {d['iommu_group'] if d['iommu_group'] is not None else '-'}",
                     d["driver"] or "no driver"]
            if d["link"]:
                facts.append(link_text(d["link"]))
            if d["numa_node"] is not None and d["numa_node"] >= 0:
                facts.append(f"NUMA {d['numa_node']}")
            ids = f"[{d['vendor'] or '????'}:{d['device'] or '????'}]"
            lines.append(f"{indent}{'`-- ' if last else '|-- '}{d['address']}  {d['class_name']}: {d['name']} "
                         f"{ids}  {', '.join(facts)}")
            walk(d["children"], indent + ("    " if last else "|   "))

    for bus in buses:
        lines.append(bus["bus"])
        walk(bus["devices"], "")
    return "\n".join(lines) + "\n" if lines else ""


def mdev_json(types: list[MdevType]) -> list[Json]:
    """Each mdev type of each parent (`vfiod.sysfs.mdev`), with its instances."""
    return [{"target": t.target, "parent": t.parent, "type": t.type, "name": t.name, "device_api": t.device_api,
             "available": t.available,
             "instances": [{"uuid": i.uuid, "iommu_group": i.group, "mdevctl": i.mdevctl} for i in t.instances]}
            for t in types]


def render_mdev(types: list[Json]) -> str:
    """`vfiod inspect`'s words on mediated device types ("" where there are none)."""
    lines = []
    for t in types:
        lines.append(f"mdev type {t['target']}: {t['name'] or '?'} ({t['device_api'] or '?'}), "
                     f"{t['available'] if t['available'] is not None else '?'} more available")
        for i in t["instances"]:
            lines.append(f"  {i['uuid']}  group {i['iommu_group'] if i['iommu_group'] is not None else '-'}"
                         + ("  (defined by mdevctl)" if i["mdevctl"] else ""))
    return "\n".join(lines) + "\n" if lines else ""


def group_json(host: Host, group: Group, names: PciIds, lease: str | None = None,
               state: str | None = None, lease_owner: int | None = None,
               original_driver: OriginalDriver | None = None, lease_memlock: int | None = None,
               lease_state: str | None = None) -> Json:
    """One group: the same object from `vfiod inspect --json` and from the daemon."""
    return {
        "group": group.number,
        "viable": group.viable,
        "state": state or group.state,
        "lease": lease,
        "lease_owner": lease_owner,
        "lease_state": lease_state,
        "lease_memlock": lease_memlock,
        "blockers": [{"device": str(a), **(reason_json(host.devices[a].blocker_code, why) or {})}
                     for a, why in group.blockers],
        "isolation": group.isolation,
        "isolation_text": group.isolation_text,
        "protected": [{"device": str(a), **(reason_json(protected_code(why), why) or {})}
                      for a, why in group.protected],
        "devices": [device_json(host, a, names, original_driver) for a in group.members],
    }


def reason_json(code: str | None, text: str) -> Json | None:
    """A reason as scripts read it: a stable `code` (docs/json.md) and the `text` people read."""
    return {"code": code, "text": text} if code else None


def findings_json(host: Host) -> list[Json]:
    """What is true of the whole host (no IOMMU, ACS override, ...), as code and text."""
    return [{"code": f.code, "text": f.text} for f in host.findings]


def host_json(host: Host, names: PciIds) -> list[Json]:
    return [group_json(host, g, names) for g in host.groups.values()]


def render_groups(groups: list[Json], explain: bool = False, width: int = 100) -> str:
    """The table a person reads: one block per group, devices indented under it."""
    lines = []
    for g in groups:
        head = f"IOMMU group {g['group']}"
        status = "viable" if g["viable"] else "not viable"
        extra = [status, g["state"]]
        if g.get("lease"):
            extra.append(f"lease {g['lease']}")
        if g["isolation"] != "isolated":
            extra.append(f"shared: {g['isolation']}")
        lines.append(f"{head}  ({', '.join(extra)})")
        blocked = {b["device"]: b["text"] for b in g["blockers"]}
        for d in g["devices"]:
            ids = f"[{d['vendor'] or '????'}:{d['device'] or '????'}]"
            drv = d["driver"] or "(no driver)"
            lines.append(f"  {d['address']}  {d['class_name']}: {d['name']} {ids}  driver: {drv}")
            if d["address"] in blocked:
                lines.append(f"      blocks VFIO: {blocked[d['address']]}")
            if d["protected"]:
                lines.append(f"      protected: {d['protected']['text']}")
            if d.get("cdev"):
                lines.append(f"      VFIO device cdev: {d['cdev']}")
            if explain and not d.get("bridge") and "reset_methods" in d:
                how = ", ".join(d["reset_methods"]) or "none (the kernel knows no way to reset it)"
                lines.append(f"      reset: {how}")
        if explain:
            lines.extend(textwrap.wrap("why: " + g["isolation_text"], width=width,
                                       initial_indent="  ", subsequent_indent="       "))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else ""


def explain_text(target: str, g: Group, lease: LeaseRow | None, findings: Iterable[Finding],
                 viewer: int | None = None) -> str:
    """Why group `g` (asked about as `target`) is what it is, what blocks it, who holds it.

    `viewer`: the uid asking (None or 0: an admin, told everything); anyone else is
    told who holds the lease only when it is their own."""
    lines = [f"IOMMU group {g.number}: {', '.join(map(str, g.members))}"]
    if not target.startswith("group:") and len(g.members) > 1:
        lines.append(f"{target} cannot be leased alone: VFIO hands out whole groups.")
    lines.append(f"Why these devices share a group ({g.isolation}): {g.isolation_text}")
    if g.viable:
        lines.append("Viable for VFIO now: every endpoint is on vfio-pci, pci-stub or no driver.")
    else:
        lines.append("Not viable for VFIO now:")
        lines.extend(f"  {a}: {why}" for a, why in g.blockers)
    for a, why in g.protected:
        lines.append(f"Protected: {a} — {why}.")
    if lease and viewer not in (None, 0, lease.uid):
        lines.append("Leased (by another user).")
    elif lease:
        lines.append(f"Leased to uid {lease.uid} with the {lease.backend} backend (lease {lease.id}).")
    for f in findings:
        lines.append(f"Note: {f.text}")
    return "\n".join(lines)


#: The sections of `vfioctl status`, by PCI base class, in the order people look for them.
STATUS_CLASSES = ((0x02, "Network devices"), (0x01, "Storage devices"), (0x03, "Display devices"),
                  (0x04, "Multimedia devices"), (0x0C, "Serial bus devices (USB, SMBus, ...)"),
                  (None, "Other devices"), (0x06, "Bridges and ports"))


#: `vfioctl status --class NAME`: the PCI classes each name takes, a base class (0x02) or a
#: base class and subclass (0x0C03), with what it holds.  dpdk-devbind's --status-dev names
#: are here too, with the classes its device tables give them (its event, mempool, regex
#: and misc devices are base system peripherals, class 08, as its DMA engines are).
DEVICE_CLASSES: dict[str, tuple[tuple[int, ...], str]] = {
    "net": ((0x02,), "network controllers (Ethernet, InfiniBand, ...)"),
    "storage": ((0x01,), "mass storage controllers (NVMe, SATA, SAS, RAID)"),
    "display": ((0x03,), "display controllers (VGA, 3D: GPUs)"),
    "multimedia": ((0x04,), "multimedia (audio, video; a GPU's HDMI audio)"),
    "memory": ((0x05,), "memory controllers (CXL memory)"),
    "bridge": ((0x06,), "bridges and ports (host, ISA, PCI bridges, root and switch ports)"),
    "comm": ((0x07,), "communication controllers (serial, modem)"),
    "system": ((0x08,), "base system peripherals (DMA, timers, IOMMU, SD host)"),
    "input": ((0x09,), "input devices"),
    "processor": ((0x0B,), "processors and co-processors"),
    "serial": ((0x0C,), "serial bus controllers (USB, SMBus, FireWire, Fibre Channel)"),
    "usb": ((0x0C03,), "USB controllers"),
    "wireless": ((0x0D,), "wireless controllers"),
    "crypto": ((0x10, 0x0B40), "encryption controllers and co-processors (Intel QAT), as dpdk-devbind's crypto"),
    "signal": ((0x11,), "signal processing controllers"),
    "accel": ((0x12,), "processing accelerators (AI, FPGA, compression, baseband)"),
    "dma": ((0x08,), "DMA engines (Intel DSA and IOAT): base system peripherals, as dpdk-devbind's dma"),
    "event": ((0x08,), "dpdk-devbind's event devices (base system peripherals)"),
    "mempool": ((0x08,), "dpdk-devbind's mempool devices (base system peripherals)"),
    "regex": ((0x08,), "dpdk-devbind's regex devices (base system peripherals)"),
    "misc": ((0x08,), "dpdk-devbind's misc devices (base system peripherals)"),
    "compress": ((0x12,), "dpdk-devbind's compress devices (processing accelerators)"),
    "baseband": ((0x12,), "dpdk-devbind's baseband devices (processing accelerators)"),
}


def in_classes(class_code: int | None, wanted: Iterable[str]) -> bool:
    """Is a function of class `class_code` (24 bits) in one of the `DEVICE_CLASSES` named?"""
    if class_code is None:
        return False
    return any(code == class_code >> 16 if code <= 0xFF else code == class_code >> 8
               for name in wanted for code in DEVICE_CLASSES[name][0])


def status_json(host: Host, names: PciIds, active: Callable[[PciAddress], Iterable[str]],
                classes: Iterable[str] = ()) -> Json:
    """Every PCI device (IOMMU or not), for `vfioctl status`: `active(addr)` says what on
    the host uses it (empty when nothing does); with `classes` (`DEVICE_CLASSES` names),
    only the devices of those classes."""
    classes = tuple(classes)
    devices = []
    for addr in sorted(host.devices, key=ORDER):
        d = host.devices[addr]
        r = d.raw
        if classes and not in_classes(r.class_code, classes):
            continue
        base = (r.class_code or 0) >> 16
        section = next((title for code, title in STATUS_CLASSES if code == base),
                       "Bridges and ports" if d.is_bridge else "Other devices")
        uses = list(active(addr))
        devices.append({**device_json(host, addr, names), "section": section, "vfio": r.driver in VFIO_FRIENDLY,
                        "active": bool(uses), "in_use": uses})
    return {"iommu": host.iommu_enabled, "findings": findings_json(host), "devices": devices}


#: How `render_status` splits a section: a label and which devices it takes.
_DRIVER_KINDS: tuple[tuple[str, Callable[[Json], object]], ...] = (
    ("using a VFIO driver (vfio-pci, pci-stub)", lambda d: d["vfio"]),
    ("using a kernel driver", lambda d: d["driver"] and not d["vfio"]),
    ("with no driver", lambda d: not d["driver"]))


def render_status(status: Json) -> str:
    """Like `dpdk-devbind.py --status`: each section split by driver kind, one line a device."""
    out = []
    if not status["iommu"]:
        out.append("note: no IOMMU groups on this host: VFIO cannot isolate any device "
                   "(enable VT-d/AMD-Vi and intel_iommu=on); devices are listed all the same.\n")
    for _, title in STATUS_CLASSES:
        devs = [d for d in status["devices"] if d["section"] == title]
        if not devs:
            continue
        for label, pick in _DRIVER_KINDS:
            chosen = [d for d in devs if pick(d)]
            if not chosen:
                continue
            head = f"{title} {label}"
            out += [head, "=" * len(head)]
            for d in chosen:
                ids = d["device"] or "????"
                parts = [f"{d['address']} '{d['name']} {ids}'"]
                if d["net"]:
                    parts.append("if=" + ",".join(d["net"]))
                if d["driver"]:
                    parts.append(f"drv={d['driver']}")
                parts.append(f"group={d['iommu_group'] if d['iommu_group'] is not None else '-'}")
                if d["active"]:
                    parts.append("*Active*")
                if d["protected"]:
                    parts.append(f"(protected: {d['protected']['text']})")
                out.append(" ".join(parts))
            out.append("")
    return "\n".join(out).rstrip() + "\n"
