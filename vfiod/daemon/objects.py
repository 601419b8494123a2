"""The bus object tree: a Group object per IOMMU group, a Device object per function,
a Lease object per lease, kept in step with the snapshot.

`publish(old, new)` exports objects for devices and groups that came, drops
those that went, and sends PropertiesChanged for what changed, and only that.
The tree also sends the Manager's signals (`lease_granted`, `lease_revoking`,
`lease_ended`, `policy_reloaded`): every object path is made here; and it keeps
GetManagedObjects' reply prepared (`managed_entries`, `vfiod.daemon.prepared`)."""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterator

from ..wire import ROOT, device_path, group_path, lease_path
from .connection import ExportedInterface, VfiodBus
from .interfaces import Backing, DeviceInterface, GroupInterface, LeaseInterface, ManagerInterface
from .prepared import PreparedEntries
from ..address import PciAddress
from ..leases import Ended
from ..state import LeaseRow
from ..topology import Host



class ObjectTree:
    def __init__(self, service: Backing) -> None:
        self.service = service
        self._bus: VfiodBus | None = None
        self.prepared = PreparedEntries()
        self.manager_iface = ManagerInterface(service)
        self._groups: dict[int, GroupInterface] = {}
        self._devices: dict[PciAddress, DeviceInterface] = {}
        self._leases: dict[str, LeaseInterface] = {}
        self._published: dict[int, dict[str, object]] = {}
        self._exported = False
        self.stopped = False            # the daemon stopped: what workers still finish is not shown

    @property
    def bus(self) -> VfiodBus | None:
        return self._bus

    @bus.setter
    def bus(self, bus: VfiodBus | None) -> None:
        self._bus = bus
        if bus is not None:
            bus.managed_entries = self.managed_entries

    def managed_entries(self, prefix: str) -> list[bytes] | None:
        """GetManagedObjects' entries of every object of the tree (None for a path other
        than the tree's root): an object's entry is marshalled again only when the snapshot
        value or the lease its properties come from is another (see `vfiod.daemon.prepared`)."""
        if prefix != ROOT + "/" or not self._exported:
            return None
        out: list[bytes] = []
        for path, key, iface in self._keyed(list(self._groups.items()), list(self._devices.items())):
            self._entry(out, path, key, iface)
        for lease_id, lease in self._leases.items():
            self._entry(out, lease_path(lease_id), None, lease)      # live values: marshalled each time
        return out

    def _keyed(self, groups: list[tuple[int, GroupInterface]], devices: list[tuple[PciAddress, DeviceInterface]]
               ) -> Iterator[tuple[str, Hashable | None, ExportedInterface]]:
        """Each object with the key of its entry: its snapshot value and its group's lease
        (None where the snapshot no longer has it)."""
        host = self.service.host
        lease_of = {lease.group: lease for lease in self.service.manager.leases()}
        for n, group in groups:
            g = host.groups.get(n)
            yield group_path(n), (g, lease_of.get(n)) if g is not None else None, group
        for addr, dev in devices:
            d = host.devices.get(addr)
            key = (d, lease_of.get(d.group) if d.group is not None else None) if d is not None else None
            yield device_path(addr), key, dev

    #: Objects marshalled per turn of the loop while the tree is prepared after start.
    PREPARE_CHUNK = 128

    def prepare_soon(self) -> None:
        """Marshal every object's entry after start, a few at a time between the loop's other
        work, so that the first GetManagedObjects finds them ready (on a 4,096-function host
        marshalling them all takes about a second)."""
        loop = asyncio.get_running_loop()
        groups, devices = list(self._groups.items()), list(self._devices.items())

        def turn(start: int) -> None:
            end = start + self.PREPARE_CHUNK
            if self.stopped or start >= len(groups) + len(devices):
                return
            some_groups = groups[start:end]
            some_devices = devices[max(0, start - len(groups)):max(0, end - len(groups))]
            for path, key, iface in self._keyed(some_groups, some_devices):
                if key is not None:
                    self._entry([], path, key, iface)
            loop.call_soon(turn, end)

        loop.call_soon(turn, 0)

    def _entry(self, out: list[bytes], path: str, key: Hashable | None, iface: ExportedInterface) -> None:
        try:
            out.append(self.prepared.get(path, key, lambda: {iface.name: iface.property_values()}))
        except Exception as e:      # a getter that raised, a value that does not marshal: this object only
            self.prepared.forget(path)
            if self._bus is not None:
                self._bus.unreadable(path, e)

    def export_all(self, host: Host, leases: list[LeaseRow]) -> None:
        assert self.bus is not None
        self._exported = True
        self.bus.object_manager = ROOT      # InterfacesAdded/Removed come from it (the D-Bus spec)
        with self.bus.quiet_exports():
            self.bus.export(ROOT, self.manager_iface)
            for n in host.groups:
                self._groups[n] = iface = GroupInterface(self.service, n)
                self.bus.export(group_path(n), iface)
            for addr in host.devices:
                self._devices[addr] = dev = DeviceInterface(self.service, addr)
                self.bus.export(device_path(addr), dev)
            for lease in leases:
                self.export_lease(lease)

    def exported_leases(self) -> list[str]:
        return list(self._leases)

    def export_lease(self, lease: LeaseRow) -> None:
        if lease.id in self._leases or not self.bus:
            return
        iface = LeaseInterface(self.service, lease)
        self._leases[lease.id] = iface
        self.bus.export(lease_path(lease.id), iface)
        self.manager_iface.emit_properties_changed({"Leases": self.manager_iface.Leases})

    def update_lease(self, lease: LeaseRow) -> None:
        """The lease's row changed (the revoke ladder began): its object says so."""
        iface = self._leases.get(lease.id)
        if iface is None:
            return
        iface.lease = lease
        iface.emit_properties_changed({"State": lease.state, "RevokeReason": lease.revoke_reason or "",
                                       "RevokeDeadline": max(0, int(lease.deadline))})

    def drop_lease(self, lease_id: str) -> None:
        iface = self._leases.pop(lease_id, None)
        if iface is not None and self.bus:
            self.bus.unexport(lease_path(lease_id), iface)
            self.manager_iface.emit_properties_changed({"Leases": self.manager_iface.Leases})

    def publish(self, old: Host, new: Host, touched: list[int] | None = None) -> None:
        """On the loop: objects for what came and went, PropertiesChanged for what changed;
        after a partial refresh only the `touched` groups and their devices are compared
        (a burst of hotplug events on a big host does not walk every object each time)."""
        if self.stopped:
            return
        if touched is None:
            group_keys: set[int] = new.groups.keys() | self._groups.keys()
            device_keys: set[PciAddress] = new.devices.keys() | self._devices.keys()
        else:
            # a partial refresh changes only these groups and their members (old or new)
            group_keys = set(touched)
            device_keys = {a for n in touched for h in (old, new) if n in h.groups for a in h.groups[n].members}
        if self.bus and self._exported:
            for n in sorted(group_keys):
                if n in new.groups and n not in self._groups:
                    self._groups[n] = iface = GroupInterface(self.service, n)
                    self.bus.export(group_path(n), iface)
            for addr in sorted(device_keys):
                if addr in new.devices and addr not in self._devices:
                    self._devices[addr] = dev = DeviceInterface(self.service, addr)
                    self.bus.export(device_path(addr), dev)
                elif addr not in new.devices and addr in self._devices:
                    self.bus.unexport(device_path(addr), self._devices.pop(addr))
                    self.prepared.forget(device_path(addr))
            for n in sorted(group_keys):
                if n not in new.groups and n in self._groups:
                    self.bus.unexport(group_path(n), self._groups.pop(n))
                    self.prepared.forget(group_path(n))
        groups = [(n, self._groups[n]) for n in sorted(group_keys) if n in self._groups]
        devices = [(a, self._devices[a]) for a in sorted(device_keys) if a in self._devices]
        for n, iface in groups:
            g_old, g_new = old.groups.get(n), new.groups.get(n)
            if g_new is None:
                continue
            changed = {"State": self.service.queries.group_state(n), "Lease": iface.Lease}
            if g_old is None or g_old.viable != g_new.viable:
                changed["Viable"] = g_new.viable
            if g_old is None or g_old.blockers != g_new.blockers:
                changed["Blockers"] = [[str(a), why] for a, why in g_new.blockers]
            last = self._published.get(n)
            if last != changed or "Viable" in changed or "Blockers" in changed:
                self._published[n] = changed
                iface.emit_properties_changed(changed)
        for addr, dev in devices:
            d_old, d_new = old.devices.get(addr), new.devices.get(addr)
            if d_new is None:
                continue
            said: dict[str, object] = {}
            if d_old is None or d_old.driver != d_new.driver or d_old.raw.cdev != d_new.raw.cdev:
                said = {"Driver": d_new.driver or "",
                        "OriginalDriver": self.service.queries.original_driver(addr) or "",
                        "Cdev": f"/dev/vfio/devices/{d_new.raw.cdev}" if d_new.raw.cdev else ""}
            # retrained, or a bind changed it: named without its value (an explicit property)
            invalidated = ["Link"] if d_old is not None and d_old.raw.link != d_new.raw.link else []
            if said or invalidated:
                dev.emit_properties_changed(said, invalidated)

    # ------------------------------------------------------------ the Manager's signals

    def lease_granted(self, lease: LeaseRow) -> None:
        self.export_lease(lease)
        self.manager_iface.LeaseGranted(lease_path(lease.id))

    def lease_revoking(self, lease: LeaseRow) -> None:
        self.update_lease(lease)
        self.manager_iface.LeaseRevoking(lease_path(lease.id), lease.revoke_reason or "", max(0, int(lease.deadline)))

    def lease_ended(self, ended: Ended) -> None:
        self.drop_lease(ended.lease.id)
        self.manager_iface.LeaseEnded(lease_path(ended.lease.id), ended.reason)

    def policy_reloaded(self, files: int, rules: int) -> None:
        self.manager_iface.PolicyReloaded(files, rules)
