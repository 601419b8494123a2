"""The client library of org.vfiod1: calls with timeouts, errors mapped back to `VfiodError`.

`vfioctl`, `vfioctl monitor` and vfiod-dra all talk to vfiod through `Client`;
every option of RequestLease is a typed parameter of `Client.request_lease`.
The errors its calls raise are re-exported here (`errors`, `VfiodError`, …)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Callable, Iterable

from dbus_next import Message, MessageType, Variant
from dbus_next.aio import MessageBus

from . import errors
from .errors import BackendFailed, NotFound, PermissionDenied, VfiodError
from .wire import BUS_NAME, ROOT, PatientBus, bus_args, group_number, lease_id_of, lease_path

DEFAULT_TIMEOUT = 30.0
_BY_NAME = {cls.dbus_name: cls for cls in errors.ALL_ERRORS if cls.dbus_name.startswith("org.vfiod1.")}


class Client:
    def __init__(self, bus_spec: str = "system", timeout: float = DEFAULT_TIMEOUT):
        self.bus_spec = bus_spec
        self.timeout = timeout
        self.bus: MessageBus | None = None

    async def connect(self) -> "Client":
        try:
            self.bus = await asyncio.wait_for(
                PatientBus(negotiate_unix_fd=True, **bus_args(self.bus_spec)).connect(), self.timeout)
        except asyncio.TimeoutError:
            raise errors.BackendFailed(f"cannot reach the {self.bus_spec} bus: no answer within "
                                       f"{self.timeout:g} s") from None
        except Exception as e:     # a bad address, no bus, no session, refused authentication
            raise errors.BackendFailed(f"cannot reach the {self.bus_spec} bus: {_why(e)} "
                                       "(--bus system, session or a D-Bus address such as "
                                       "unix:path=/run/dbus/system_bus_socket)") from None
        return self

    def connected(self) -> MessageBus:
        """The bus connection; `BackendFailed` before `connect`."""
        if self.bus is None:
            raise errors.BackendFailed("not connected to the bus (connect first)")
        return self.bus

    def close(self) -> None:
        if self.bus:
            self.bus.disconnect()

    async def call(self, path: str, interface: str, member: str, signature: str = "",
                   body: Iterable[object] = (), timeout: float | None = None,
                   unix_fds: Iterable[int] = ()) -> Message:
        if self.bus is None:
            raise errors.BackendFailed("not connected to the bus (connect first)")
        msg = Message(destination=BUS_NAME, path=path, interface=interface, member=member,
                      signature=signature, body=list(body), unix_fds=list(unix_fds))
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), timeout or self.timeout)
        except asyncio.TimeoutError:
            raise errors.BackendFailed(f"vfiod did not answer {member} within {timeout or self.timeout:g} s") from None
        if reply is None:          # dbus-next returns none only for calls that want no reply
            raise errors.BackendFailed(f"vfiod sent no reply to {member}")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body else reply.error_name
            if reply.error_name in ("org.freedesktop.DBus.Error.ServiceUnknown",
                                    "org.freedesktop.DBus.Error.NameHasNoOwner"):
                raise errors.BackendFailed("vfiod is not running (no org.vfiod1 on the bus)")
            if reply.error_name in ("org.freedesktop.DBus.Error.UnknownObject",
                                    "org.freedesktop.DBus.Error.UnknownMethod") and path != ROOT:
                raise errors.NotFound(f"no such object: {path} (gone, or never there)")
            if reply.error_name == "org.freedesktop.DBus.Error.AccessDenied":
                raise errors.PermissionDenied(f"the bus refused the call: {text}")
            raise _BY_NAME.get(reply.error_name, errors.VfiodError)(text)
        return reply

    # Property values come as each property's D-Bus type says: they are typed per property.
    async def managed_objects(self) -> dict[str, dict[str, dict[str, Any]]]:
        reply = await self.call(ROOT, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects")
        return {path: {iface: {k: v.value for k, v in props.items()} for iface, props in ifaces.items()}
                for path, ifaces in reply.body[0].items()}

    async def groups_json(self, targets: Iterable[str] = ()) -> list[dict[str, Any]]:
        """The IOMMU groups `targets` name (every group when none), as the daemon describes
        them: `vfiod inspect --json`'s group objects plus what the daemon knows (leases)."""
        reply = await self.call(ROOT, "org.vfiod1.Manager", "GroupsJson", "as", [list(targets)])
        groups: list[dict[str, Any]] = json.loads(reply.body[0])
        return groups

    async def properties(self, path: str, interface: str) -> dict[str, Any]:
        """GetAll: every property but those read by name only (docs/dbus.md, "explicit")."""
        reply = await self.call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", [interface])
        return {k: v.value for k, v in reply.body[0].items()}

    async def property(self, path: str, interface: str, name: str) -> Any:
        """Get: one property, explicit ones too."""
        reply = await self.call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [interface, name])
        return reply.body[0].value

    async def request_lease(self, target: str, backend: str = "", duration: int | None = None,
                            persistent: bool = False, force: bool = False, scope: bool = False,
                            k8s_namespace: str | None = None, pidfd: int | None = None) -> str:
        """RequestLease; the new lease's object path.  `k8s_namespace`: the Kubernetes
        namespace a delegate leases for (the policy's ``k8s_delegates``).  `pidfd`: a pidfd
        of the process a scope or memlock grant is for (this one: `own_pidfd`), which vfiod
        checks is the caller's own; sent with the call, still the caller's to close."""
        options: dict[str, Variant] = {}
        fds = []
        if duration:
            options["duration"] = Variant("t", duration)
        if persistent:
            options["persistent"] = Variant("b", True)
        if force:
            options["force"] = Variant("b", True)
        if scope:
            options["scope"] = Variant("b", True)
        if k8s_namespace is not None:
            options["k8s_namespace"] = Variant("s", k8s_namespace)
        if pidfd is not None:
            options["pidfd"] = Variant("h", 0)        # the index of the fd the message carries
            fds.append(pidfd)
        reply = await self.call(ROOT, "org.vfiod1.Manager", "RequestLease", "ssa{sv}", [target, backend, options],
                                unix_fds=fds)
        path: str = reply.body[0]
        return path

    async def caller_rights(self) -> tuple[bool, str]:
        """CallerRights: whether this caller is an admin (root, or a member of the policy's
        ``admin_groups``) and why; (False, "") from a vfiod too old to say."""
        try:
            reply = await self.call(ROOT, "org.vfiod1.Manager", "CallerRights")
        except errors.VfiodError:
            return False, ""
        admin, why = reply.body[0]
        return bool(admin), str(why)

    async def lease_call(self, path: str, member: str, signature: str = "", body: Iterable[object] = ()) -> Message:
        return await self.call(path, "org.vfiod1.Lease", member, signature, body)

    async def bus_call(self, member: str, signature: str, body: list[Any]) -> Message:
        """A call to the bus daemon itself (AddMatch, GetNameOwner, ...)."""
        msg = Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                      interface="org.freedesktop.DBus", member=member, signature=signature, body=body)
        try:
            answer = await asyncio.wait_for(self.connected().call(msg), self.timeout)
        except asyncio.TimeoutError:
            raise errors.BackendFailed(f"the bus did not answer {member} within {self.timeout:g} s") from None
        if answer is None:
            raise errors.BackendFailed(f"the bus sent no reply to {member}")
        if answer.message_type == MessageType.ERROR:
            raise errors.VfiodError(f"{member}: {answer.body[0] if answer.body else answer.error_name}")
        return answer

    async def lease_signals(self, path: str) -> asyncio.Queue[tuple[str, list[Any]]]:
        """From now on, (member, body) of each ``LeaseRevoking`` and ``LeaseEnded`` of
        the lease at `path`, in the order they come."""
        queue: asyncio.Queue[tuple[str, list[Any]]] = asyncio.Queue()

        def collect(msg: Message) -> None:
            if (msg.message_type == MessageType.SIGNAL and msg.sender is not None
                    and msg.interface == "org.vfiod1.Manager" and msg.member in LEASE_SIGNALS
                    and msg.body and msg.body[0] == path):
                queue.put_nowait((msg.member, list(msg.body)))
            return None
        self.connected().add_message_handler(collect)
        for member in LEASE_SIGNALS:
            await self.bus_call("AddMatch", "s", [f"type='signal',sender='{BUS_NAME}',path='{ROOT}',"
                                                  f"interface='org.vfiod1.Manager',member='{member}'"])
        return queue

    async def watch(self, changed: Callable[[str], None]) -> None:
        """Call `changed(member)` for every signal vfiod sends (objects added and removed,
        properties changed, leases granted, revoking and ended, the policy reloaded), and
        with ``NameOwnerChanged`` when vfiod comes or goes on the bus."""
        def on_message(msg: Message) -> None:
            if msg.message_type != MessageType.SIGNAL:
                return
            if (msg.path or "").startswith(ROOT) or (msg.member == "NameOwnerChanged" and msg.body[:1] == [BUS_NAME]):
                changed(msg.member or "")
        self.connected().add_message_handler(on_message)
        for rule in (f"type='signal',sender='{BUS_NAME}',path_namespace='{ROOT}'",
                     f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BUS_NAME}'"):
            try:
                await self.bus_call("AddMatch", "s", [rule])
            except VfiodError:
                raise BackendFailed("the bus refused to pass on vfiod's signals (AddMatch)") from None


def own_pidfd() -> int | None:
    """A pidfd of this process, to prove to vfiod which process is its own (None where the
    kernel has no pidfds)."""
    import os
    try:
        return os.pidfd_open(os.getpid())
    except (OSError, AttributeError):
        return None


#: The Manager's signals about one lease's end (`Client.lease_signals`).
LEASE_SIGNALS = ("LeaseRevoking", "LeaseEnded")


def user_name(uid: int) -> str:
    """The user's name, or the uid as text for a uid without one."""
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def lease_json(props: dict[str, Any], devices: list[str]) -> dict[str, Any]:
    """The lease object of docs/json.md from a Lease object's properties and its group's
    endpoints: what `leases`, `lease` and `monitor` print."""
    return {
        "id": props["Id"],
        "group": group_number(props["Group"]),
        "owner": props["Owner"],
        "user": user_name(props["Owner"]),
        "backend": props["Backend"],
        "target": props.get("Target") or None,
        "member": props.get("Member") or None,
        "created": props["Created"],
        "expires": props["Expires"] or None,
        "persistent": props["Persistent"],
        "memlock": props.get("Memlock") or None,
        "reset_on_release": bool(props.get("ResetOnRelease", False)),
        "warnings": list(props.get("Warnings") or []),
        "group_path": props.get("GroupPath") or None,
        "cdevs": dict(props.get("DeviceCdevs") or {}),
        "iommu_path": props.get("IommuPath") or None,
        "mdev": props.get("Mdev") or None,
        "mdev_type": props.get("MdevType") or None,
        "devices": list(devices),
        "state": props.get("State") or "granted",
        "revoke_reason": props.get("RevokeReason") or None,
        "revoke_deadline": props.get("RevokeDeadline") or None,
        "revoke_waiting": props.get("RevokeWaiting") or None,
    }


__all__ = ["DEFAULT_TIMEOUT", "LEASE_SIGNALS", "BackendFailed", "Client", "NotFound", "PermissionDenied",
           "VfiodError", "errors", "group_number", "lease_id_of", "lease_json", "lease_path", "own_pidfd",
           "user_name"]


def _why(e: BaseException) -> str:
    """An exception's words, or its kind where it has none."""
    return str(e).strip() or type(e).__name__
