"""The D-Bus edge (dbus-next): org.vfiod1 on the system bus.

This module only translates: it resolves who is calling from the bus (never
from an argument), calls into `vfiod.daemon.Service`, and maps `VfiodError`
to its named D-Bus error.  Any other exception is logged and returned as
``org.vfiod1.Error.BackendFailed`` without a traceback.

The caller: `@method()` handlers never see the message, so a message handler
registered before any export stores each METHOD_CALL in a ContextVar that
the method reads (the async task that runs the method copies the context at
creation, in the same call chain).  ``GetConnectionCredentials`` of the
sender gives uid, pid and groups; it is cached per unique name and dropped on
``NameOwnerChanged``.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import functools
import inspect
import logging
import os
from typing import TYPE_CHECKING, Awaitable, Callable, Protocol, TypedDict, TypeVar, Unpack

from dbus_next import BusType, Message, MessageType, Variant
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError
from dbus_next.constants import PropertyAccess
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from . import __version__
from .address import PciAddress
from .errors import BackendFailed, InvalidArgument, VfiodError
from .policy import Caller
from .state import LeaseRow

if TYPE_CHECKING:
    from .daemon.service import Service
    from .topology import Device, Group

log = logging.getLogger("vfiod.bus")

BUS_NAME = "org.vfiod1"
ROOT = "/org/vfiod1"
_current_msg: contextvars.ContextVar[Message | None] = contextvars.ContextVar("vfiod_msg", default=None)


class BusArgs(TypedDict, total=False):
    """Where a MessageBus connects: a well-known bus or an address."""

    bus_type: BusType
    bus_address: str


def bus_args(spec: str) -> BusArgs:
    """MessageBus arguments for ``system``, ``session`` or a bus address."""
    if spec == "system":
        return {"bus_type": BusType.SYSTEM}
    if spec == "session":
        return {"bus_type": BusType.SESSION}
    return {"bus_address": spec}


def group_path(n: int) -> str:
    return f"{ROOT}/group/{int(n)}"


def device_path(addr: PciAddress) -> str:
    return f"{ROOT}/device/{addr.object_name}"


def lease_path(lease_id: str) -> str:
    return f"{ROOT}/lease/{lease_id}"


class VfiodBus(MessageBus):
    """A MessageBus that closes fds handed to a reply once the reply has been sent, and
    answers a refused call with its named error and nothing else in the log.

    (dbus-next 0.2.3 sends the error reply of an async method but lets the DBusError
    escape the completion callback too, so asyncio logged a traceback for every refused
    call: "Exception in callback ... done".)"""

    def __init__(self, negotiate_unix_fd: bool = False, **where: Unpack[BusArgs]):
        super().__init__(negotiate_unix_fd=negotiate_unix_fd, **where)
        self.close_after_send: set[int] = set()

    def _make_method_handler(self, interface: ServiceInterface, method: _DBusMethod) -> _Handler:
        fn = method.fn
        if asyncio.iscoroutinefunction(fn):
            def handler(msg: Message, send_reply: Callable[[Message], None]) -> None:
                def done(fut: asyncio.Future[object]) -> None:
                    try:
                        body, unix_fds = ServiceInterface._fn_result_to_body(fut.result(), method.out_signature_tree)
                        reply = Message.new_method_return(msg, method.out_signature, body, unix_fds)
                    except DBusError as e:
                        reply = e._as_message(msg)
                    except Exception:
                        log.exception("internal error in %s.%s", interface.name, method.name)
                        reply = Message.new_error(msg, BackendFailed.dbus_name,
                                                  f"internal error in {method.name}; the daemon log has the details")
                    send_reply(reply)

                args = ServiceInterface._msg_body_to_args(msg)
                asyncio.ensure_future(fn(interface, *args)).add_done_callback(done)

            return handler
        plain: _Handler = MessageBus._make_method_handler(self, interface, method)
        return plain

    # dbus-next's base class says send returns None; its asyncio bus returns the reply's Future.
    def send(self, msg: Message) -> asyncio.Future[None]:  # type: ignore[override]
        fut: asyncio.Future[None] = super().send(msg)
        for fd in msg.unix_fds or ():
            if fd in self.close_after_send:
                self.close_after_send.discard(fd)

                def close(_f: asyncio.Future[None], fd: int = fd) -> None:
                    os.close(fd)
                fut.add_done_callback(close)
        return fut


# What dbus-next calls for a method call: the message and how to send the reply.
_Handler = Callable[[Message, Callable[[Message], None]], None]


class _DBusMethod(Protocol):
    """What dbus-next tells `VfiodBus._make_method_handler` of a method."""

    name: str
    fn: Callable[..., object]
    out_signature: str
    out_signature_tree: object


class _Serving(Protocol):
    """A bus interface backed by the daemon's `Service`."""

    service: Service


_T = TypeVar("_T")


def edge(fn: Callable[..., Awaitable[_T]]) -> Callable[..., Awaitable[_T]]:
    """Run a bus method: resolve the caller, map errors to named D-Bus errors."""

    @functools.wraps(fn)
    async def wrapper(self: _Serving, *args: object) -> _T:
        try:
            caller = await self.service.caller_of(_current_msg.get())
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


def _unwrap_options(options: dict[str, object]) -> dict[str, object]:
    out = {}
    for key, value in options.items():
        out[key] = value.value if isinstance(value, Variant) else value
    expected = {"duration": int, "persistent": bool, "force": bool}
    for key, value in out.items():
        want = expected.get(key)
        if want is not None and type(value) is not want:
            raise InvalidArgument(f"option {key!r} must be {'a number of seconds' if want is int else 'a boolean'}, "
                                  f"not {type(value).__name__}")
    return out


class ManagerInterface(ServiceInterface):
    def __init__(self, service: Service):
        super().__init__("org.vfiod1.Manager")
        self.service = service

    @method()
    @edge
    async def RequestLease(self, caller: Caller, target: "s", backend: "s", options: "a{sv}") -> "o":
        lease = await self.service.request(caller, target, backend, _unwrap_options(options), current_sender())
        return lease_path(lease.id)

    @method()
    @edge
    async def GroupsJson(self, caller: Caller, targets: "as") -> "s":
        return json.dumps(await self.service.groups_json(caller, list(targets)))

    @method()
    @edge
    async def Explain(self, caller: Caller, target: "s") -> "s":
        return await self.service.explain(caller, target)

    @method()
    @edge
    async def CheckAccess(self, caller: Caller, target: "s", backend: "s") -> "(bss)":
        d = await self.service.check(caller, target, backend)
        return [d.allowed, d.rule or "", d.reason]

    @method()
    @edge
    async def SetVfCount(self, caller: Caller, pf: "s", count: "u") -> "u":
        return await self.service.set_vf_count(caller, pf, count)

    @method()
    @edge
    async def ReloadPolicy(self, caller: Caller) -> "":
        await self.service.reload_policy(caller)

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


class GroupInterface(ServiceInterface):
    def __init__(self, service: Service, number: int):
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
        return self.service.group_state(self.number)

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


class DeviceInterface(ServiceInterface):
    def __init__(self, service: Service, addr: PciAddress):
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
        return self.service.original_driver(self.addr) or ""

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
        pf = self._d().raw.physfn
        return device_path(pf) if pf else "/"

    @dbus_property(access=PropertyAccess.READ)
    def ResetMethods(self) -> "as":
        return list(self._d().raw.reset_methods)


class LeaseInterface(ServiceInterface):
    def __init__(self, service: Service, lease: LeaseRow):
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
    def Created(self) -> "t":
        return int(self.lease.created)

    @dbus_property(access=PropertyAccess.READ)
    def Expires(self) -> "t":
        return int(self.lease.expires)

    @dbus_property(access=PropertyAccess.READ)
    def Persistent(self) -> "b":
        return self.lease.persistent

    @dbus_property(access=PropertyAccess.READ)
    def GroupPath(self) -> "s":
        return self.service.kernel.vfio_group_path(self.lease.group)

    @dbus_property(access=PropertyAccess.READ)
    def Memlock(self) -> "t":
        return int(self.lease.memlock or 0)

    @dbus_property(access=PropertyAccess.READ)
    def ResetOnRelease(self) -> "b":
        return self.lease.reset

    @dbus_property(access=PropertyAccess.READ)
    def Warnings(self) -> "as":
        return self.service.warnings(self.lease.id)

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
    async def HostdevXml(self, caller: Caller) -> "s":
        return await self.service.hostdev_xml(caller, self.lease.id)

    @method()
    @edge
    async def Renew(self, caller: Caller, seconds: "t") -> "":
        self.lease = await self.service.renew(caller, self.lease.id, seconds)
        self.emit_properties_changed({"Expires": int(self.lease.expires)})

    @method()
    @edge
    async def Release(self, caller: Caller) -> "":
        await self.service.release(caller, self.lease.id)


def current_sender() -> str | None:
    """The unique bus name of the caller of the method running now."""
    msg = _current_msg.get()
    return msg.sender if msg else None


def install_caller_tracking(bus: MessageBus) -> None:
    def remember(msg: Message) -> None:
        if msg.message_type == MessageType.METHOD_CALL:
            _current_msg.set(msg)
        return None
    bus.add_message_handler(remember)
