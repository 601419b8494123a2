"""Which device a lease holds: what identifies each held device, and the judgement of a
lease against the devices the kernel shows now (`judge`).

A lease is journaled with what identifies each device it holds — vendor:device,
subsystem vendor:device, class, and the PCIe Device Serial Number where the
device has that extended capability (0x0003) — and with the members of its IOMMU
group (`record`, at the grant, before the first write).  What vfiod does with the
judgement, at start and on hotplug, is `vfiod.leases.verify`'s.
"""

from __future__ import annotations

import json
import logging

import attrs

from ..address import PciAddress
from ..hookspecs import Backend
from ..state import HeldDevice, LeaseRow
from ..sysfs import NO_DRIVER, RawDevice
from ..topology import Host
from .core import LeaseCore
from .mdev import OURS, instance_state


log = logging.getLogger("vfiod.leases")

#: Why a lease ends when the kernel shows something other than what it holds.
IDENTITY_REASONS = ("replaced", "removed", "group-changed", "unverified")


def _hex(value: int | None, width: int) -> str:
    return "?" * width if value is None else f"{value:0{width}x}"


@attrs.frozen
class Identity:
    """What identifies one PCI function (each part as text; ``?`` where sysfs did not say)."""

    ids: str            # vendor:device
    subsystem: str      # subsystem vendor:device
    class_code: str     # class, subclass, programming interface
    serial: str         # the Device Serial Number, "none" without one, "unreadable" without extended config

    @classmethod
    def of(cls, raw: RawDevice) -> "Identity":
        cfg = raw.config
        if cfg.serial is not None:
            serial = "-".join(f"{(cfg.serial >> shift) & 0xFF:02x}" for shift in range(56, -8, -8))
        else:
            serial = "none" if cfg.ext_known or cfg.is_pcie is False else "unreadable"
        return cls(ids=f"{_hex(raw.vendor, 4)}:{_hex(raw.device, 4)}",
                   subsystem=f"{_hex(raw.subsystem_vendor, 4)}:{_hex(raw.subsystem_device, 4)}",
                   class_code=_hex(raw.class_code, 6), serial=serial)

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None) -> "Identity | None":
        """The recorded identity; None where the record is not usable."""
        try:
            data = json.loads(text) if text else None
            return cls(**data) if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()) else None
        except (TypeError, ValueError):
            return None

    def differences(self, now: "Identity") -> str:
        parts = [f"{name} {getattr(self, name)} -> {getattr(now, name)}"
                 for name in ("ids", "subsystem", "class_code", "serial") if getattr(self, name) != getattr(now, name)]
        return ", ".join(parts).replace("class_code", "class")


@attrs.frozen
class Verdict:
    """Why a lease cannot stand as it is, and which of its devices are verified now."""

    reason: str
    why: str
    verified: frozenset[str] = frozenset()


def record(core: LeaseCore, lease: LeaseRow, host: Host, held: list[HeldDevice]) -> None:
    """Journal the group's members and each held device's identity, from the grant's fresh scan."""
    group = host.groups.get(lease.group)
    members = sorted(str(a) for a in (group.members if group else ()))
    devices = {h.addr: Identity.of(host.devices[PciAddress.parse(h.addr)].raw).to_json()
               for h in held if PciAddress.parse(h.addr) in host.devices}
    core.journal.record_identity(lease.id, lease.group, members, devices)


def on_lease_driver(core: LeaseCore, held: HeldDevice, be: Backend | None) -> bool:
    """Is the held device where the lease keeps it (an endpoint on the backend's driver,
    a bridge on no driver with the override that keeps it so)?"""
    addr = PciAddress.parse(held.addr)
    if not core.kernel.exists(addr):
        return False
    if held.role == "bridge":
        return core.kernel.driver_of(addr) is None and core.kernel.override_of(addr) == NO_DRIVER
    return be is not None and core.kernel.driver_of(addr) == be.driver


def judge(core: LeaseCore, lease: LeaseRow) -> Verdict | None:
    """Is every device of `lease` the one it holds, and its group the one granted?
    None: yes.  (The group lock is held, or nobody else can move the group.)"""
    mdev = core.journal.mdev.of(lease.id)
    if mdev is not None:                # an instance vfiod made: the kernel still shows it, in its group
        state, why = instance_state(core, mdev, lease.group)
        return None if state == OURS or lease.state == "granting" else Verdict("removed", why)
    reader = core.reader
    held = core.journal.held(lease.id)
    recorded = core.journal.identity_of(lease.id)
    if recorded is None:
        return _judge_unrecorded(core, lease, held)
    members, identities = recorded
    verified: set[str] = set()
    problems: list[Verdict] = []
    for h in held:
        addr = PciAddress.parse(h.addr)
        if not core.kernel.exists(addr):
            problems.append(Verdict("removed", f"{addr} is gone"))
            continue
        want = Identity.from_json(identities.get(h.addr))
        now = Identity.of(reader.read_device(addr))
        if want is None:
            problems.append(Verdict("unverified", f"no usable identity of {addr} was recorded"))
        elif now != want:
            problems.append(Verdict("replaced", f"{addr} is not the device leased ({want.differences(now)})"))
        elif reader.group_of(addr) != lease.group:
            problems.append(Verdict("group-changed", f"{addr} is now in IOMMU group {reader.group_of(addr)}, "
                                                     f"not {lease.group}"))
        else:
            verified.add(h.addr)
    if not problems:
        now_members = sorted(str(a) for a in reader.group_members(lease.group))
        if now_members != sorted(members):
            problems.append(Verdict("group-changed", f"IOMMU group {lease.group} now holds "
                                                     f"{', '.join(now_members) or 'nothing'}; at the grant it held "
                                                     f"{', '.join(sorted(members))}"))
    if not problems:
        return None
    first = problems[0]
    return Verdict(first.reason, "; ".join(p.why for p in problems), frozenset(verified))


def _judge_unrecorded(core: LeaseCore, lease: LeaseRow, held: list[HeldDevice]) -> Verdict | None:
    """A lease journaled before identities were: kept (and recorded now) only while the kernel
    still has every device where the lease put it; a lease being granted or given back is
    left to the reconciliation, which undoes it as before."""
    if lease.state != "granted":
        return None
    be = core.backends.get(lease.backend)
    off = [h.addr for h in held if not on_lease_driver(core, h, be)]
    if off:
        on = frozenset(h.addr for h in held if h.addr not in off)
        return Verdict("unverified", f"the lease was journaled without its devices' identities and "
                                     f"{', '.join(off)} {'is' if len(off) == 1 else 'are'} no longer where it "
                                     "put them: nothing says they are the devices leased", on)
    host = core.scan_groups([lease.group])
    record(core, lease, host, held)
    log.info("lease %s was journaled without its devices' identities; they are still on its driver, so "
             "their identity was recorded as the kernel shows it now", lease.id)
    return None


