"""The org.vfiod1 interfaces: the Manager, and a Group, Device and Lease object each.

They only translate: each method resolves who is calling from the bus (never
from an argument, `edge`), calls into `vfiod.daemon.service.Service`, and maps
`VfiodError` to its named D-Bus error.  Any other exception is logged and
returned as ``org.vfiod1.Error.BackendFailed`` without a traceback."""

from __future__ import annotations

import functools
import inspect
import json
import logging
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol, TypeVar

from dbus_next import Message

from dbus_next import Variant
from dbus_next.constants import PropertyAccess
from dbus_next.errors import DBusError
from dbus_next.service import dbus_property, method, signal

from .. import __version__
from ..address import PciAddress
from ..errors import BackendFailed, InvalidArgument, VfiodError
from ..leases import LeaseManager
from ..pciids import PciIds
from ..policy import Caller
from ..state import LeaseRow
from ..terms import LeaseTerms
from ..sysfs import Kernel
from ..topology import Host
from ..wire.names import device_path, group_path, lease_id_of, lease_path
from .connection import ExportedInterface, current_message, current_sender
from .queries import Queries

if TYPE_CHECKING:
    from ..topology import Device, Group

log = logging.getLogger("vfiod.bus")


class Backing(Protocol):
    """What the interfaces call: the daemon's `Service` (the interfaces never import it)."""

    kernel: Kernel
    names: PciIds
    manager: LeaseManager
    queries: Queries

    @property
    def host(self) -> Host: ...
    async def caller_of(self, msg: Message | None) -> Caller: ...
    async def request(self, caller: Caller, target: str, backend: str, terms: LeaseTerms,
                      owner: str | None = None) -> LeaseRow: ...
    async def set_vf_count(self, caller: Caller, pf: str, count: int) -> int: ...
    async def reload_policy(self, caller: Caller) -> None: ...
    async def revoke(self, caller: Caller, lease_id: str, reason: str) -> None: ...
    def exported_leases(self) -> list[str]: ...
    def warnings(self, lease_id: str) -> list[str]: ...
    def keep_fd_for_send(self, fd: int) -> int: ...
    async def open_fd(self, caller: Caller, lease_id: str, which: str, address: str = "") -> int: ...
    async def hostdev_xml(self, caller: Caller, lease_id: str) -> str: ...
    async def renew(self, caller: Caller, lease_id: str, seconds: int) -> LeaseRow: ...
    async def release(self, caller: Caller, lease_id: str) -> None: ...


class _Serving(Protocol):
    """A bus interface backed by the daemon's service."""

    service: Backing


_T = TypeVar("_T")


def edge(fn: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    """Run a bus method: resolve the caller, map errors to named D-Bus errors."""

    @functools.wraps(fn)
    async def wrapper(self: _Serving, *args: object) -> _T:
        try:
            caller = await self.service.caller_of(current_message())
            return await fn(self, caller, *args)
        except VfiodError as e:
            raise DBusError(e.dbus_name, e.message) from None
        except DBusError:
            raise
        except Exception:
            log.exception("internal error in %s", fn.__name__)
            raise DBusError(BackendFailed.dbus_name,
                            f"internal error in {fn.__name__}; the daemon log has the details") from None

    # dbus-next reads the signature from the annotations of the original function
    wrapper.__signature__ = _strip_caller(fn)  # type: ignore[attr-defined]  # inspect.signature reads it
    return wrapper


def _strip_caller(fn: Callable[..., object]) -> inspect.Signature:
    sig = inspect.signature(fn)
    params = [p for name, p in sig.parameters.items() if name != "caller"]
    return sig.replace(parameters=params)


def _terms(options: dict[str, object], fds: list[int] | None = None) -> LeaseTerms:
    """A request's ``a{sv}`` options as `LeaseTerms`: each value must have its option's type;
    ``pidfd`` is an ``h``: one of the fds `fds` the message carried (dbus-next has put the
    fd itself in place of its index)."""
    out = {}
    for key, value in options.items():
        out[key] = value.value if isinstance(value, Variant) else value
    if "pidfd" in out:
        sent = options["pidfd"]
        if not isinstance(sent, Variant) or sent.signature != "h" or out["pidfd"] not in (fds or []):
            raise InvalidArgument("option 'pidfd' must be a file descriptor the call carries (D-Bus type h)")
    for key, value in out.items():
        want = LeaseTerms.OPTIONS.get(key)
        if want is not None and type(value) is not want[0]:
            raise InvalidArgument(f"option {key!r} must be {want[1]}, not {type(value).__name__}")
    return LeaseTerms.from_options(out)


def _seconds(t: float) -> int:
    """A time as a D-Bus ``t``: whatever a journal row holds, it marshals."""
    try:
        return min(max(int(t), 0), (1 << 64) - 1)
    except (OverflowError, ValueError):
        return 0


class ManagerInterface(ExportedInterface):
    def __init__(self, service: Backing):
        super().__init__("org.vfiod1.Manager")
        self.service = service

    @method()
    @edge
    async def RequestLease(self, caller: Caller, target: "s", backend: "s", options: "a{sv}") -> "o":
        msg = current_message()
        terms = _terms(options, list(msg.unix_fds) if msg is not None else [])
        lease = await self.service.request(caller, target, backend, terms, current_sender())
        return lease_path(lease.id)

    @method()
    @edge
    async def GroupsJson(self, caller: Caller, targets: "as") -> "s":
        return json.dumps(await self.service.queries.groups_json(caller, list(targets)))

    @method()
    @edge
    async def TreeJson(self, caller: Caller) -> "s":
        return json.dumps(self.service.queries.tree_json())

    @method()
    @edge
    async def Explain(self, caller: Caller, target: "s") -> "s":
        return await self.service.queries.explain(caller, target)

    @method()
    @edge
    async def CheckAccess(self, caller: Caller, target: "s", backend: "s") -> "(bss)":
        d = await self.service.queries.check(caller, target, backend)
        return [d.allowed, d.rule or "", d.reason]

    @method()
    @edge
    async def KubernetesAccess(self, caller: Caller, target: "s") -> "(asas)":
        namespaces, resources = await self.service.queries.kubernetes_access(caller, target)
        return [namespaces, resources]

    @method()
    @edge
    async def KubernetesAccessAll(self, caller: Caller) -> "a(uasas)":
        return [[n, namespaces, resources] for n, namespaces, resources
                in await self.service.queries.kubernetes_access_all(caller)]

    @method()
    @edge
    async def SetVfCount(self, caller: Caller, pf: "s", count: "u") -> "u":
        return await self.service.set_vf_count(caller, pf, count)

    @method()
    @edge
    async def ReloadPolicy(self, caller: Caller) -> "":
        await self.service.reload_policy(caller)

    @method()
    @edge
    async def PreviewPolicy(self, caller: Caller) -> "(asa(sus))":
        errors, revoked = await self.service.queries.preview_policy(caller)
        return [errors, [list(row) for row in revoked]]

    @method()
    @edge
    async def Revoke(self, caller: Caller, lease: "o", reason: "s") -> "":
        await self.service.revoke(caller, lease_id_of(lease), reason)

    @method()
    @edge
    async def CallerRights(self, caller: Caller) -> "(bs)":
        """Whether the caller is an admin, and why: ``root``, ``group NAME`` (a delegated
        admin), or ""."""
        if caller.is_root:
            return [True, "root"]
        return [caller.is_admin, f"group {caller.admin_group}" if caller.admin_group else ""]

    @dbus_property(access=PropertyAccess.READ)
    def Version(self) -> "s":
        return __version__

    @dbus_property(access=PropertyAccess.READ)
    def IommuEnabled(self) -> "b":
        return self.service.host.iommu_enabled

    @dbus_property(access=PropertyAccess.READ)
    def AcsOverride(self) -> "b":
        return self.service.host.acs_override

    @dbus_property(access=PropertyAccess.READ)
    def NoIommu(self) -> "b":
        return self.service.host.noiommu

    @dbus_property(access=PropertyAccess.READ)
    def Leases(self) -> "ao":
        return [lease_path(lease_id) for lease_id in sorted(self.service.exported_leases())]

    @signal()
    def LeaseGranted(self, lease: str) -> "o":
        return lease

    @signal()
    def LeaseEnded(self, lease: str, reason: str) -> "os":
        return [lease, reason]

    @signal()
    def LeaseRevoking(self, lease: str, reason: str, deadline: int) -> "ost":
        return [lease, reason, deadline]

    @signal()
    def PolicyReloaded(self, files: int, rules: int) -> "uu":
        return [files, rules]


class GroupInterface(ExportedInterface):
    #: read by name only (`ExportedInterface.explicit`): its prose, in every group's entry,
    #: was a tenth of a big host's GetManagedObjects; `Isolation` says the same in a word
    explicit = {"IsolationText": "const"}

    def __init__(self, service: Backing, number: int):
        super().__init__("org.vfiod1.Group")
        self.service = service
        self.number = number

    def _g(self) -> Group:
        return self.service.host.groups[self.number]

    @dbus_property(access=PropertyAccess.READ)
    def Number(self) -> "u":
        return self.number

    @dbus_property(access=PropertyAccess.READ)
    def Devices(self) -> "as":
        return [str(a) for a in self._g().members]

    @dbus_property(access=PropertyAccess.READ)
    def Viable(self) -> "b":
        return self._g().viable

    @dbus_property(access=PropertyAccess.READ)
    def Blockers(self) -> "a(ss)":
        return [[str(a), why] for a, why in self._g().blockers]

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.service.queries.group_state(self.number)

    @dbus_property(access=PropertyAccess.READ)
    def Lease(self) -> "o":
        lease = self.service.manager.lease_for_group(self.number)
        return lease_path(lease.id) if lease else "/"

    @dbus_property(access=PropertyAccess.READ)
    def Isolation(self) -> "s":
        return self._g().isolation

    @dbus_property(access=PropertyAccess.READ)
    def IsolationText(self) -> "s":
        return self._g().isolation_text


def _device_or_none(addr: PciAddress | None) -> str:
    """A device's object path, or ``/`` (D-Bus's "no object") for none."""
    return device_path(addr) if addr else "/"


class DeviceInterface(ExportedInterface):
    #: read by name only (`ExportedInterface.explicit`): where the function sits and how it
    #: resets, which `TreeJson` (`vfioctl show --tree`) and `GroupsJson` give whole; a link
    #: that retrains is named in PropertiesChanged without its value
    explicit = {"ResetMethods": "const", "Parent": "const", "NumaNode": "const", "Link": "invalidates"}

    def __init__(self, service: Backing, addr: PciAddress):
        super().__init__("org.vfiod1.Device")
        self.service = service
        self.addr = addr

    def _d(self) -> Device:
        return self.service.host.devices[self.addr]

    @dbus_property(access=PropertyAccess.READ)
    def Address(self) -> "s":
        return str(self.addr)

    @dbus_property(access=PropertyAccess.READ)
    def VendorId(self) -> "q":
        return self._d().raw.vendor or 0

    @dbus_property(access=PropertyAccess.READ)
    def DeviceId(self) -> "q":
        return self._d().raw.device or 0

    @dbus_property(access=PropertyAccess.READ)
    def Class(self) -> "u":
        return self._d().raw.class_code or 0

    @dbus_property(access=PropertyAccess.READ)
    def Name(self) -> "s":
        r = self._d().raw
        return self.service.names.describe(r.vendor, r.device)

    @dbus_property(access=PropertyAccess.READ)
    def Driver(self) -> "s":
        return self._d().driver or ""

    @dbus_property(access=PropertyAccess.READ)
    def OriginalDriver(self) -> "s":
        return self.service.queries.original_driver(self.addr) or ""

    @dbus_property(access=PropertyAccess.READ)
    def Group(self) -> "o":
        g = self._d().group
        return group_path(g) if g is not None else "/"

    @dbus_property(access=PropertyAccess.READ)
    def Bridge(self) -> "b":
        return self._d().is_bridge

    @dbus_property(access=PropertyAccess.READ)
    def Protected(self) -> "s":
        return self._d().protected

    @dbus_property(access=PropertyAccess.READ)
    def PhysicalFunction(self) -> "o":
        return _device_or_none(self._d().raw.physfn)

    @dbus_property(access=PropertyAccess.READ)
    def Cdev(self) -> "s":
        """Its VFIO device cdev (``/dev/vfio/devices/vfioX``) while it is on vfio-pci, on
        kernels with them; empty otherwise."""
        cdev = self._d().raw.cdev
        return f"/dev/vfio/devices/{cdev}" if cdev else ""

    @dbus_property(access=PropertyAccess.READ)
    def ResetMethods(self) -> "as":
        return list(self._d().raw.reset_methods)

    @dbus_property(access=PropertyAccess.READ)
    def Parent(self) -> "o":
        """The bridge or port above it (``/`` on a root bus)."""
        return _device_or_none(self._d().raw.parent)

    @dbus_property(access=PropertyAccess.READ)
    def NumaNode(self) -> "i":
        node = self._d().raw.numa_node
        return -1 if node is None else node

    @dbus_property(access=PropertyAccess.READ)
    def Link(self) -> "(dudu)":
        """Its PCIe link: speed (GT/s) and width now, speed and width at most; zeros where
        it has none (not PCIe, a root complex function, a VF) or they are unknown."""
        link = self._d().raw.link
        if link is None:
            return [0.0, 0, 0.0, 0]
        return [link.speed or 0.0, link.width or 0, link.max_speed or 0.0, link.max_width or 0]


class LeaseInterface(ExportedInterface):
    def __init__(self, service: Backing, lease: LeaseRow):
        super().__init__("org.vfiod1.Lease")
        self.service = service
        self.lease = lease

    @dbus_property(access=PropertyAccess.READ)
    def Id(self) -> "s":
        return self.lease.id

    @dbus_property(access=PropertyAccess.READ)
    def Group(self) -> "o":
        return group_path(self.lease.group)

    @dbus_property(access=PropertyAccess.READ)
    def Owner(self) -> "u":
        return self.lease.uid

    @dbus_property(access=PropertyAccess.READ)
    def Backend(self) -> "s":
        return self.lease.backend

    @dbus_property(access=PropertyAccess.READ)
    def Target(self) -> "s":
        """What the lessee asked for: an address, ``group:N``, ``name:RES`` or ``pool:NAME``."""
        return self.lease.target

    @dbus_property(access=PropertyAccess.READ)
    def Member(self) -> "s":
        """The member a ``pool:NAME`` lease took (``name:RES`` or an address); empty otherwise."""
        return self.lease.member or ""

    @dbus_property(access=PropertyAccess.READ)
    def Created(self) -> "t":
        return _seconds(self.lease.created)

    @dbus_property(access=PropertyAccess.READ)
    def Expires(self) -> "t":
        return _seconds(self.lease.expires)

    @dbus_property(access=PropertyAccess.READ)
    def Persistent(self) -> "b":
        return self.lease.persistent

    @dbus_property(access=PropertyAccess.READ)
    def Mdev(self) -> "s":
        """The UUID of the mediated device instance vfiod made for the lease (``mdev:PARENT/TYPE``
        leases; empty for PCI leases): VFIO_GROUP_GET_DEVICE_FD takes it as the device's name."""
        held = self.service.manager.journal.mdev.of(self.lease.id)
        return held.uuid if held else ""

    @dbus_property(access=PropertyAccess.READ)
    def MdevType(self) -> "s":
        """``PARENT/TYPE`` of that instance (empty for PCI leases)."""
        held = self.service.manager.journal.mdev.of(self.lease.id)
        return held.kind if held else ""

    @dbus_property(access=PropertyAccess.READ)
    def GroupPath(self) -> "s":
        return self.service.kernel.vfio_group_path(self.lease.group)

    @dbus_property(access=PropertyAccess.READ)
    def DeviceCdevs(self) -> "a{ss}":
        """Each endpoint's VFIO device cdev (``/dev/vfio/devices/vfioX``), where the kernel
        made one (CONFIG_VFIO_DEVICE_CDEV); empty on kernels without."""
        be = self.service.manager.backends.get(self.lease.backend)
        if be is None or not be.uses_vfio:
            return {}
        kernel = self.service.kernel
        return {str(a): path for a in self.service.manager.endpoints(self.lease.id)
                if (path := kernel.nodes.device_cdev(a))}

    @dbus_property(access=PropertyAccess.READ)
    def IommuPath(self) -> "s":
        """``/dev/iommu`` where the lease's devices have cdevs (the lessee may open it), else empty."""
        return self.service.kernel.nodes.iommu_path() if self.DeviceCdevs else ""

    @dbus_property(access=PropertyAccess.READ)
    def Memlock(self) -> "t":
        return int(self.lease.memlock or 0)

    @dbus_property(access=PropertyAccess.READ)
    def ResetOnRelease(self) -> "b":
        return self.lease.reset

    @dbus_property(access=PropertyAccess.READ)
    def Warnings(self) -> "as":
        return self.service.warnings(self.lease.id)

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.lease.state

    @dbus_property(access=PropertyAccess.READ)
    def RevokeReason(self) -> "s":
        return self.lease.revoke_reason or ""

    @dbus_property(access=PropertyAccess.READ)
    def RevokeDeadline(self) -> "t":
        return _seconds(self.lease.deadline)

    @dbus_property(access=PropertyAccess.READ)
    def RevokeWaiting(self) -> "s":
        """While ``revoking``: what the revoke waits for, as vfiod last found it (holders, and
        what it will not end; or the kernel's word on a holder it cannot find)."""
        return self.service.manager.revoke_waiting(self.lease.id) if self.lease.state == "revoking" else ""

    @method()
    @edge
    async def OpenGroup(self, caller: Caller) -> "h":
        return self.service.keep_fd_for_send(await self.service.open_fd(caller, self.lease.id, "group"))

    @method()
    @edge
    async def OpenContainer(self, caller: Caller) -> "h":
        return self.service.keep_fd_for_send(await self.service.open_fd(caller, self.lease.id, "container"))

    @method()
    @edge
    async def OpenDevice(self, caller: Caller, address: "s") -> "h":
        return self.service.keep_fd_for_send(await self.service.open_fd(caller, self.lease.id, "device", address))

    @method()
    @edge
    async def OpenIommu(self, caller: Caller) -> "h":
        return self.service.keep_fd_for_send(await self.service.open_fd(caller, self.lease.id, "iommu"))

    @method()
    @edge
    async def HostdevXml(self, caller: Caller) -> "s":
        return await self.service.hostdev_xml(caller, self.lease.id)

    @method()
    @edge
    async def Renew(self, caller: Caller, seconds: "t") -> "":
        self.lease = await self.service.renew(caller, self.lease.id, seconds)
        self.emit_properties_changed({"Expires": _seconds(self.lease.expires)})

    @method()
    @edge
    async def Release(self, caller: Caller) -> "":
        await self.service.release(caller, self.lease.id)
