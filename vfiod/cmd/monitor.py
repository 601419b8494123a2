"""`vfioctl monitor`: vfiod's events as they happen, one line each (like `udisksctl monitor`).

It subscribes (bus match rules) to every signal org.vfiod1 sends under
/org/vfiod1 — `LeaseGranted`, `LeaseRevoking`, `LeaseEnded` (with its reason:
released, expired, removed, tampered, revoked, ...), `PropertiesChanged` of groups, devices and
leases, `InterfacesAdded`/`InterfacesRemoved` (devices and groups that come
and go: hotplug, SR-IOV VFs) — and to `NameOwnerChanged` of org.vfiod1, so
it knows when vfiod leaves the bus.  It starts from `GetManagedObjects`, so
each change can say what it was before.

Lease objects appearing and going, and the Manager's `Leases` property, say
nothing `LeaseGranted`/`LeaseEnded` do not: they are folded into those two.
"""

from __future__ import annotations

import asyncio
import math
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from dbus_next import Message, MessageType

from ..wire import BUS_NAME, ROOT, lease_id_of
from ..errors import BackendFailed, VfiodError
from ..client import lease_json
from .common import EXIT_OK, print_json

MATCH_RULES = (
    f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT}'",
    f"type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
    f"member='NameOwnerChanged',arg0='{BUS_NAME}'",
)

#: LeaseEnded's reasons, in words (docs/json.md lists them too).
REASONS = {
    "released": "released by its owner or root",
    "expired": "its time ran out",
    "disconnected": "its owner's bus connection went away",
    "shutdown": "vfiod stopped",
    "owner-gone": "its owner was gone when vfiod started again",
    "interrupted": "vfiod stopped while granting it; undone when it started again",
    "removed": "a device of its group was removed (hot-unplug or sysfs remove)",
    "tampered": "a device of its group was moved to another driver behind vfiod's back",
    "replaced": "another device sits at a held address; vfiod left it as it is",
    "group-changed": "its IOMMU group's members are not the ones granted",
    "unverified": "journaled before identities were recorded, and its devices were no longer where it put them",
    "denied": "after a reboot, the policy no longer allows binding it again",
    "protected": "after a reboot, a device of its group is one the host needs",
    "in-use": "after a reboot, the host uses a device of its group",
    "revoked": "root took it back, or the policy no longer allows it",
}

GROUP_IF, DEVICE_IF, LEASE_IF, MANAGER_IF = ("org.vfiod1.Group", "org.vfiod1.Device", "org.vfiod1.Lease",
                                             "org.vfiod1.Manager")
OM_IF, PROPS_IF = "org.freedesktop.DBus.ObjectManager", "org.freedesktop.DBus.Properties"

if TYPE_CHECKING:
    from ..client import Client

#: A D-Bus object's properties, unwrapped to plain values.
Props = dict[str, Any]


def object_name(path: str) -> str:
    """`device 0000:04:00.0`, `group 8`, `lease ID` or `vfiod` for an object path."""
    rest = path[len(ROOT):].strip("/")
    kind, _, name = rest.partition("/")
    if kind == "device":
        parts = name.split("_")
        if len(parts) == 4:
            return f"device {parts[0]}:{parts[1]}:{parts[2]}.{parts[3]}"
    if kind in ("group", "lease") and name:
        return f"{kind} {name}"
    return "vfiod" if not rest else rest


def _unvariant(value: Any) -> Any:
    """Plain JSON values from what dbus-next hands over (Variants, tuples)."""
    if hasattr(value, "signature") and hasattr(value, "value"):
        return _unvariant(value.value)
    if isinstance(value, dict):
        return {k: _unvariant(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unvariant(v) for v in value]
    return value


def _words(value: Any) -> str:
    """A property's value for a person."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value == "" or value == "/" or value is None:
        return "none"
    if isinstance(value, str) and value.startswith(ROOT + "/"):
        return object_name(value)
    if isinstance(value, list):
        if not value:
            return "none"
        if all(isinstance(v, list) for v in value):
            return "; ".join(" ".join(map(str, v)) for v in value)
        return ", ".join(map(str, value))
    return str(value)


def _device_words(d: Props) -> str:
    """A device object's name and ids for a person."""
    return f"{d.get('Name') or 'unknown'} [{d.get('VendorId', 0):04x}:{d.get('DeviceId', 0):04x}]"


class Monitor:
    def __init__(self, client: Client, as_json: bool, out: TextIO | None = None):
        self.client = client
        self.as_json = as_json
        self.out = out or sys.stdout
        self.objects: dict[str, dict[str, Props]] = {}     # path -> interface -> properties
        self.leases: dict[str, Props] = {}                 # lease path -> its properties, until LeaseEnded
        self.owner: str | None = None

    # ------------------------------------------------------------ start and loop

    async def run(self) -> int:
        bus = self.client.connected()
        queue: asyncio.Queue[Message] = asyncio.Queue()

        def collect(msg: Message) -> None:
            if msg.message_type == MessageType.SIGNAL:
                queue.put_nowait(msg)
            return None
        bus.add_message_handler(collect)
        for rule in MATCH_RULES:
            await self.client.bus_call("AddMatch", "s", [rule])
        try:
            self.owner = (await self.client.bus_call("GetNameOwner", "s", [BUS_NAME])).body[0]
        except VfiodError:
            raise BackendFailed("vfiod is not running (no org.vfiod1 on the bus)") from None
        self.objects = {path: {i: _unvariant(p) for i, p in ifaces.items()}
                        for path, ifaces in (await self.client.managed_objects()).items()}
        self.leases = {path: dict(ifaces[LEASE_IF]) for path, ifaces in self.objects.items() if LEASE_IF in ifaces}
        if not self.as_json:
            groups = sum(1 for i in self.objects.values() if GROUP_IF in i)
            print(f"vfioctl: monitoring vfiod ({groups} groups, {len(self.leases)} leases); "
                  "Ctrl-C ends", file=sys.stderr, flush=True)

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopping = asyncio.ensure_future(stop.wait())
        gone = asyncio.ensure_future(bus.wait_for_disconnect())
        try:
            while True:
                nxt = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({nxt, stopping, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt in done:
                    await self.handle(nxt.result())
                else:
                    nxt.cancel()
                if stopping in done:
                    return EXIT_OK
                if gone in done:
                    while not queue.empty():         # what arrived before the connection closed
                        await self.handle(queue.get_nowait())
                    self.emit("bus-gone", "/", "the bus connection closed")
                    raise BackendFailed("the bus connection closed (the bus daemon stopped?); monitor ends")
        finally:
            for fut in (stopping, gone):
                fut.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    # ------------------------------------------------------------ one signal

    async def handle(self, msg: Message) -> None:
        if msg.sender == "org.freedesktop.DBus":
            if msg.member == "NameOwnerChanged" and msg.body[0] == BUS_NAME and not msg.body[2]:
                self.emit("vfiod-gone", ROOT, "vfiod left the bus (stopped or crashed)")
                raise BackendFailed("vfiod left the bus (stopped or crashed); monitor ends")
            return
        if msg.sender != self.owner or not (msg.path or "").startswith(ROOT):
            return
        member, body = msg.member, _unvariant(msg.body)
        if msg.interface == MANAGER_IF and member == "LeaseGranted":
            await self.granted(body[0])
        elif msg.interface == MANAGER_IF and member == "LeaseEnded":
            self.ended(body[0], body[1])
        elif msg.interface == MANAGER_IF and member == "LeaseRevoking":
            self.revoking(body[0], body[1], body[2])
        elif msg.interface == PROPS_IF and member == "PropertiesChanged":
            changed = dict(body[1])
            for name in body[2]:        # an explicit property (a device's Link) comes without its value
                try:
                    changed[name] = await self.client.property(msg.path, body[0], name)
                except VfiodError:
                    pass                # the object went meanwhile: InterfacesRemoved follows
            self.changed(msg.path, body[0], changed)
        elif msg.interface == OM_IF and member == "InterfacesAdded":
            self.added(body[0], body[1])
        elif msg.interface == OM_IF and member == "InterfacesRemoved":
            self.removed(body[0], body[1])

    async def granted(self, path: str) -> None:
        props = self.leases.get(path)
        if props is None:
            try:
                props = await self.client.properties(path, LEASE_IF)
            except VfiodError:
                props = {}          # already ended: LeaseEnded follows
            self.leases[path] = props
        lease = self.lease(path, props)
        terms = [f"with {lease['backend']}"] if lease.get("backend") else []
        if lease.get("persistent"):
            terms.append("persistent")
        if lease.get("expires"):
            from ..policy import format_duration
            terms.append(f"for {format_duration(max(0, int(lease['expires'] - time.time())))}")
        who = f"{lease['user']} (uid {lease['owner']})" if "owner" in lease else "someone"
        held = " ".join(lease.get("devices", [])) or (f"mdev {lease['mdev_type']} {lease['mdev']}" if lease.get("mdev")
                                                      else "no endpoints")
        text = (f"group {lease.get('group', '?')} ({held}) "
                f"leased to {who} " + ", ".join(terms)).rstrip()
        self.emit("lease-granted", path, text, lease=lease)

    def ended(self, path: str, reason: str) -> None:
        props = self.leases.pop(path, {})
        lease = self.lease(path, props)
        why = REASONS.get(reason, reason)
        whose = f" of {lease['user']}" if "user" in lease else ""
        back = "; its devices went back to the host" if reason in ("removed", "tampered") else ""
        self.emit("lease-ended", path, f"lease{whose} on group {lease.get('group', '?')} ended, {reason}: {why}{back}",
                  lease=lease, reason=reason)

    def revoking(self, path: str, reason: str, deadline: int) -> None:
        props = self.leases.setdefault(path, {})
        props.update({"State": "revoking", "RevokeReason": reason, "RevokeDeadline": deadline})
        lease = self.lease(path, props)
        whose = f" of {lease['user']}" if "user" in lease else ""
        left = max(0, math.ceil(deadline - time.time() - 0.05))
        self.emit("lease-revoking", path, f"lease{whose} on group {lease.get('group', '?')} is being revoked "
                  f"({reason}): its holders have {left} s to let go", lease=lease, reason=reason, deadline=deadline)

    def changed(self, path: str, interface: str, changed: Props) -> None:
        before = self.objects.setdefault(path, {}).setdefault(interface, {})
        if interface == MANAGER_IF and set(changed) <= {"Leases"}:
            before.update(changed)               # said by LeaseGranted/LeaseEnded
            return
        if interface == LEASE_IF and path in self.leases:
            self.leases[path].update(changed)
            if set(changed) <= {"State", "RevokeReason", "RevokeDeadline"}:
                before.update(changed)           # said by LeaseRevoking
                return
        new = {k: v for k, v in changed.items() if k not in before or before[k] != v}
        previous = {k: before.get(k) for k in new}
        before.update(changed)
        if not new:
            return
        parts = []
        for key, value in new.items():
            label, old = key.lower(), previous.get(key)
            if key == "Blockers":            # (device, reason) pairs: the devices say enough here
                value, old = [b[0] for b in value], None if old is None else [b[0] for b in old]
            elif key == "Lease":
                value, old = value.rsplit("/", 1)[-1] if value != "/" else "", \
                    None if old is None else (old.rsplit("/", 1)[-1] if old != "/" else "")
            if key == "Expires" and value:
                from ..policy import format_duration
                parts.append(f"now ends in {format_duration(max(0, int(value - time.time())))}")
            elif old is not None:
                parts.append(f"{label} {_words(old)} -> {_words(value)}")
            else:
                parts.append(f"{label} {_words(value)}")
        self.emit("changed", path, ", ".join(parts), interface=interface, changed=new, previous=previous)

    def added(self, path: str, interfaces: dict[str, Props]) -> None:
        known = self.objects.setdefault(path, {})
        known.update(interfaces)
        if LEASE_IF in interfaces:
            self.leases[path] = dict(interfaces[LEASE_IF])
            return                               # said by LeaseGranted
        if DEVICE_IF in interfaces:
            d = interfaces[DEVICE_IF]
            text = f"device added: {_device_words(d)} in {_words(d.get('Group'))}, driver {_words(d.get('Driver'))}"
        elif GROUP_IF in interfaces:
            g = interfaces[GROUP_IF]
            text = (f"group added: {_words(g.get('Devices'))}, "
                    f"{'viable' if g.get('Viable') else 'not viable'}")
        else:
            text = "added: " + ", ".join(interfaces)
        self.emit("added", path, text, interfaces=sorted(interfaces), properties=interfaces)

    def removed(self, path: str, interfaces: list[str]) -> None:
        known = self.objects.get(path, {})
        gone = {i: known.pop(i, {}) for i in interfaces}
        if not known:
            self.objects.pop(path, None)
        if LEASE_IF in interfaces:
            return                               # said by LeaseEnded
        if DEVICE_IF in gone:
            d = gone[DEVICE_IF]
            text = f"device removed: {_device_words(d)}, driver {_words(d.get('Driver'))}"
        elif GROUP_IF in gone:
            text = "group removed"
        else:
            text = "removed: " + ", ".join(interfaces)
        self.emit("removed", path, text, interfaces=sorted(interfaces))

    # ------------------------------------------------------------ output

    def lease(self, path: str, props: Props) -> Props:
        """The lease object (docs/json.md) from what is known of it; `id` at least."""
        if "Id" not in props or "Group" not in props:
            return {"id": lease_id_of(path)}
        group_path = props.get("Group", "/")
        g = self.objects.get(group_path, {}).get(GROUP_IF, {})
        endpoints = [a for a in g.get("Devices", [])
                     if not self._device(a).get("Bridge", False)]
        return lease_json(props, endpoints)

    def _device(self, address: str) -> Props:
        from ..address import PciAddress
        try:
            path = f"{ROOT}/device/{PciAddress.parse(address).object_name}"
        except VfiodError:
            return {}
        return self.objects.get(path, {}).get(DEVICE_IF, {})

    def emit(self, event: str, path: str, text: str, **fields: Any) -> None:
        now = time.time()
        if self.as_json:
            print_json("event", one_line=True, time=round(now, 3), event=event, object=path, text=text, **fields)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            print(f"{stamp}  {event:<13} {object_name(path):<22} {text}", file=self.out, flush=True)


async def monitor(client: Client, as_json: bool) -> int:
    return await Monitor(client, as_json).run()


__all__ = ["MATCH_RULES", "Monitor", "REASONS", "monitor", "object_name"]
