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

Robustness at the edge (dbus-next 0.2.3 needs three fixes here, all in `VfiodBus`):

- A full socket is waited out.  dbus-next's writer treats ``EAGAIN`` from
  ``send`` as a lost connection, so any burst larger than the socket buffer
  (exporting a big host, a flood of signals, many replies) used to drop the
  connection while the process lived on, owning nothing.  `_PatientWriter`
  keeps the message and its place in the queue and tries again when the
  socket is writable.
- One client cannot starve the others.  Method calls are queued per sender and
  served round-robin, one call of each sender in turn, with the event loop free
  in between, and at most `MAX_RUNNING_CALLS` of a sender's calls running (in
  the worker threads) at once; a sender with `MAX_PENDING_CALLS` calls queued or
  running gets ``org.vfiod1.Error.LimitsExceeded`` at once for the next.
- A message whose body is larger than `MAX_BODY_BYTES` is refused with the same
  error without unmarshalling its body (it is read off the socket and dropped).
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import contextvars
import json
import functools
import inspect
import io
import logging
import os
import socket
import struct
import time
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator, Protocol, TypedDict, TypeVar, Unpack

from dbus_next import BusType, Message, MessageFlag, MessageType, Variant
from dbus_next._private.unmarshaller import MarshallerStreamEndError, Unmarshaller
from dbus_next.aio import MessageBus
from dbus_next.aio.message_bus import _MessageWriter
from dbus_next.errors import DBusError
from dbus_next.constants import PropertyAccess
from dbus_next.message_bus import BaseMessageBus
from dbus_next.service import ServiceInterface, dbus_property, method, signal

from . import __version__
from .address import PciAddress
from .errors import BackendFailed, InvalidArgument, LimitsExceeded, NotFound, VfiodError
from .policy import Caller
from .state import LeaseRow

if TYPE_CHECKING:
    from dbus_next.service import _Method, _Property, _Signal

    from .daemon.service import Service
    from .topology import Device, Group

log = logging.getLogger("vfiod.bus")

BUS_NAME = "org.vfiod1"
ROOT = "/org/vfiod1"
_current_msg: contextvars.ContextVar[Message | None] = contextvars.ContextVar("vfiod_msg", default=None)

#: Calls one sender may have queued or running at once; the next is refused.
MAX_PENDING_CALLS = 32
#: Calls of one sender running at once (the others wait in its queue): a client's
#: calls never fill the worker threads ahead of another client's.
MAX_RUNNING_CALLS = 2
#: The largest message body served (vfiod's own arguments are a few KiB at most).
MAX_BODY_BYTES = 1 << 20


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


def lease_id_of(path: str) -> str:
    """The lease id of a lease object path (`NotFound` for any other path)."""
    prefix = lease_path("")
    if not isinstance(path, str) or not path.startswith(prefix) or not path[len(prefix):]:
        raise NotFound(f"not a lease: {path!r}")
    return path[len(prefix):]


def lease_path(lease_id: str) -> str:
    return f"{ROOT}/lease/{lease_id}"


class _PatientWriter(_MessageWriter):
    """dbus-next's queue of outgoing messages, written when the socket takes them.

    The only change from dbus-next's writer: ``EAGAIN`` (and ``EINTR``) from the
    socket means "try again when writable", not "the connection is lost".  The
    message keeps its place, a partial write resumes at its offset, and the fds of
    a message go with its first byte, so nothing is lost or reordered."""

    def __init__(self, bus: MessageBus) -> None:
        _MessageWriter.__init__(self, bus)

    def write_callback(self) -> None:
        try:
            while True:
                if self.buf is None:
                    if self.messages.qsize() == 0:
                        self.loop.remove_writer(self.fd)
                        return
                    buf, self.unix_fds, self.fut = self.messages.get_nowait()
                    self.buf, self.offset = memoryview(buf), 0
                try:
                    if self.unix_fds and self.negotiate_unix_fd:
                        fds = array.array("i", self.unix_fds)
                        sent = self.sock.sendmsg([self.buf[self.offset:]],
                                                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                        self.unix_fds = None
                    else:
                        sent = self.sock.send(self.buf[self.offset:])
                except (BlockingIOError, InterruptedError):
                    return          # the loop calls again once the socket is writable
                self.offset += sent
                if self.offset < len(self.buf):
                    return
                self.buf = None
                if self.fut is not None and not self.fut.done():
                    self.fut.set_result(None)
        except Exception as e:      # a real error: the connection is gone
            if self.fut is not None and not self.fut.done():
                self.fut.set_exception(e)
            self.bus._finalize(e)


#: The body length of each message whose body was dropped as too large.
_OVERSIZE: weakref.WeakKeyDictionary[Message, int] = weakref.WeakKeyDictionary()


# dbus-next's internals have no annotations, and mypy's untyped_calls_exclude does not
# see through super(): the classes below call their dbus-next base classes by name.
class _BoundedUnmarshaller(Unmarshaller):
    """Reads one message; a body over `MAX_BODY_BYTES` is read off the socket and
    dropped without being unmarshalled, and the message comes out with an empty
    body and its body's length in `_OVERSIZE`."""

    def __init__(self, stream: io.BufferedIOBase, sock: socket.socket | None = None):
        Unmarshaller.__init__(self, stream, sock)
        self._oversize = 0          # the real body length, once seen to be too long
        self._drain = 0             # bytes of that body still to drop
        self._held: Message | None = None

    def unmarshall(self) -> Message | None:
        try:
            if self._held is None:
                if not self._oversize:
                    Unmarshaller.read(self, 16, prefetch=True)
                    order = "<" if self.buf[0] == ord("l") else ">"
                    (length,) = struct.unpack_from(order + "I", self.buf, 4)
                    if length > MAX_BODY_BYTES:
                        # Let dbus-next read the header alone: it skips a body of length 0.
                        struct.pack_into(order + "I", self.buf, 4, 0)
                        self._oversize = self._drain = length
                msg: Message | None = Unmarshaller.unmarshall(self)
                if msg is None or not self._oversize:
                    return msg
                msg.body = []
                _OVERSIZE[msg] = self._oversize
                self._held = msg
            while self._drain:
                if self.sock is not None:
                    chunk = self.sock.recv(min(self._drain, 1 << 20))
                else:
                    chunk = self.stream.read(min(self._drain, 1 << 20))
                    if chunk is None:
                        return None
                if not chunk:
                    raise EOFError()
                self._drain -= len(chunk)
            self.message = self._held
            return self._held
        except (BlockingIOError, MarshallerStreamEndError):
            return None


class PatientBus(MessageBus):
    """dbus-next's MessageBus with a writer that waits out a full socket (vfioctl's too:
    a client sending a large message met the same ``EAGAIN``)."""

    def __init__(self, negotiate_unix_fd: bool = False, **where: Unpack[BusArgs]):
        super().__init__(negotiate_unix_fd=negotiate_unix_fd, **where)
        self._writer = _PatientWriter(self)


class VfiodBus(PatientBus):
    """The daemon's connection: a writer that waits out a full socket, per-sender fair
    queuing and limits, fds handed to a reply closed once the reply has been sent, and
    a refused call answered with its named error and nothing else in the log.

    (dbus-next 0.2.3 sends the error reply of an async method but lets the DBusError
    escape the completion callback too, so asyncio logged a traceback for every refused
    call: "Exception in callback ... done".)"""

    def __init__(self, negotiate_unix_fd: bool = False, **where: Unpack[BusArgs]):
        super().__init__(negotiate_unix_fd=negotiate_unix_fd, **where)
        self.close_after_send: set[int] = set()
        self._queues: dict[str, collections.deque[Message]] = {}
        self._turns: collections.deque[str] = collections.deque()   # senders whose turn is next
        self._in_line: set[str] = set()
        self._running: collections.Counter[str] = collections.Counter()
        self._work = asyncio.Event()
        self._server: asyncio.Task[None] | None = None
        self._refusals_logged: dict[str, float] = {}
        self._quiet = False
        self._unreadable: set[str] = set()      # objects GetManagedObjects left out (logged once)

    def _create_unmarshaller(self) -> _BoundedUnmarshaller:
        return _BoundedUnmarshaller(self._stream, self._sock if self._negotiate_unix_fd else None)

    def _on_message(self, msg: Message) -> None:
        sender = msg.sender
        if msg.message_type != MessageType.METHOD_CALL or not sender or sender == "org.freedesktop.DBus":
            BaseMessageBus._on_message(self, msg)
            return None
        oversize = _OVERSIZE.get(msg, 0)
        queue = self._queues.get(sender)
        pending = (len(queue) if queue else 0) + self._running[sender]
        if oversize or pending >= MAX_PENDING_CALLS:
            why = (f"a message of {oversize} bytes is over the limit of {MAX_BODY_BYTES}" if oversize else
                   f"{pending} calls of this connection are already waiting; the limit is {MAX_PENDING_CALLS}")
            self._refuse(msg, why)
            return None
        if queue is None:
            queue = self._queues[sender] = collections.deque()
        queue.append(msg)
        self._offer_turn(sender)
        if self._server is None:
            self._server = asyncio.ensure_future(self._serve_calls())
        return None

    def _offer_turn(self, sender: str) -> None:
        """Put `sender` in line if it has calls queued and fewer than MAX_RUNNING_CALLS running."""
        if sender in self._queues and sender not in self._in_line and self._running[sender] < MAX_RUNNING_CALLS:
            self._in_line.add(sender)
            self._turns.append(sender)
            self._work.set()

    def _refuse(self, msg: Message, why: str) -> None:
        if not msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            self.send(Message.new_error(msg, LimitsExceeded.dbus_name, why))
        now = time.monotonic()
        if now - self._refusals_logged.get(msg.sender, 0.0) > 60:     # a line a minute per client
            self._refusals_logged[msg.sender] = now
            log.warning("refused %s.%s from %s: %s", msg.interface, msg.member, msg.sender, why)

    async def _serve_calls(self) -> None:
        """Serve queued calls one sender at a time, round-robin, yielding in between."""
        while True:
            if not self._turns:
                self._work.clear()
                await self._work.wait()
                continue
            sender = self._turns.popleft()
            self._in_line.discard(sender)
            queue = self._queues[sender]
            msg = queue.popleft()
            if not queue:
                del self._queues[sender]
            BaseMessageBus._on_message(self, msg)    # an async method counts as running from here
            self._offer_turn(sender)
            await asyncio.sleep(0)

    @contextlib.contextmanager
    def quiet_exports(self) -> Iterator[None]:
        """Export without InterfacesAdded signals: for the objects exported at start,
        before vfiod owns its name (no client can have looked for them yet)."""
        self._quiet = True
        try:
            yield
        finally:
            self._quiet = False

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if not self._quiet:
            BaseMessageBus._emit_interface_added(self, path, interface)

    def _default_get_managed_objects_handler(self, msg: Message, send_reply: Callable[[Message], None]) -> None:
        """GetManagedObjects in one pass over the objects below the path (dbus-next's
        rechecks the whole result after each object: quadratic in the host's size).
        An object whose properties cannot be read is left out and logged, once."""
        prefix = msg.path.rstrip("/") + "/"
        result: dict[str, dict[str, dict[str, Variant]]] = {}
        for node, interfaces in self._path_exports.items():
            if not node.startswith(prefix):
                continue
            try:
                result[node] = {iface.name: iface.property_values() for iface in interfaces
                                if isinstance(iface, _Interface)}
            except Exception as e:
                if node not in self._unreadable:
                    self._unreadable.add(node)
                    log.error("cannot read the properties of %s (%s: %s); left out of GetManagedObjects",
                              node, type(e).__name__, e)
        send_reply(Message.new_method_return(msg, "a{oa{sa{sv}}}", [result]))

    def _send_reply(self, msg: Message) -> _SendReply:
        """How every reply of this connection is sent: an error that is not a `DBusError`
        (a property getter that raised, a value that does not marshal) reaches the
        client as ``org.vfiod1.Error.BackendFailed`` with no traceback, and is logged
        once per object and member.  (dbus-next's own sends the traceback.)"""
        return _SendReply(self, msg)

    def _finalize(self, err: Exception | None = None) -> None:
        # The connection is gone: nobody can see objects leave, and dbus-next's unexport
        # of each one scans all the others (quadratic, seconds on a big host).
        self._path_exports.clear()
        MessageBus._finalize(self, err)

    def forget_sender(self, sender: str) -> None:
        """Drop what a client that left the bus still had queued."""
        self._queues.pop(sender, None)
        if sender in self._in_line:
            self._in_line.discard(sender)
            self._turns.remove(sender)
        self._running.pop(sender, None)
        self._refusals_logged.pop(sender, None)

    def _make_method_handler(self, interface: ServiceInterface, method: _DBusMethod) -> _Handler:
        fn = method.fn
        if asyncio.iscoroutinefunction(fn):
            def handler(msg: Message, send_reply: Callable[[Message], None]) -> None:
                sender = msg.sender

                def done(fut: asyncio.Future[object]) -> None:
                    if self._running[sender] > 0:
                        self._running[sender] -= 1
                        self._offer_turn(sender)
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
                self._running[sender] += 1
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


class _SendReply:
    """dbus-next's reply sender (a context manager with ``send_error``), with named errors."""

    _logged: set[tuple[str, str, str]] = set()

    def __init__(self, bus: VfiodBus, msg: Message):
        self.bus = bus
        self.msg = msg

    def __enter__(self) -> _SendReply:
        return self

    def __call__(self, reply: Message) -> None:
        if self.msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        try:
            self.bus.send(reply)
        except Exception as e:      # the reply does not marshal: say so, by name
            self.send_error(e)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if ev is None or not isinstance(ev, Exception):
            return False
        self.send_error(ev)
        return True

    def send_error(self, exc: Exception) -> None:
        if isinstance(exc, DBusError):
            reply = exc._as_message(self.msg)
        elif isinstance(exc, VfiodError):
            reply = Message.new_error(self.msg, exc.dbus_name, exc.message)
        else:
            what = self.msg.member or "call"
            if self.msg.interface == "org.freedesktop.DBus.Properties" and self.msg.body:
                what = f"{self.msg.member} {'.'.join(str(v) for v in self.msg.body[:2])}"
            key = (self.msg.path or "", what, type(exc).__name__)
            if key not in self._logged and len(self._logged) < 4096:
                self._logged.add(key)
                log.error("internal error in %s of %s: %s: %s", what, self.msg.path, type(exc).__name__, exc)
            reply = Message.new_error(self.msg, BackendFailed.dbus_name,
                                      f"internal error in {what} of {self.msg.path}; the daemon log has the details")
        if self.msg.flags & MessageFlag.NO_REPLY_EXPECTED:
            return
        try:
            self.bus.send(reply)
        except Exception:
            log.error("cannot send the error reply to %s", self.msg.sender)


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
    expected = {"duration": int, "persistent": bool, "force": bool, "scope": bool, "k8s_namespace": str}
    words = {int: "a number of seconds", bool: "a boolean", str: "a string"}
    for key, value in out.items():
        want = expected.get(key)
        if want is not None and type(value) is not want:
            raise InvalidArgument(f"option {key!r} must be {words[want]}, not {type(value).__name__}")
    return out


class _Interface(ServiceInterface):
    """A ServiceInterface whose table of methods, properties and signals is read from
    the class once, not from every object again (a 4,096-function host has 8,193
    objects; dbus-next's per-object `inspect.getmembers` took over a second)."""

    _tables: dict[type, tuple[list[_Method], list[_Property], list[_Signal]]] = {}

    def __init__(self, name: str) -> None:
        table = _Interface._tables.get(type(self))
        if table is None:
            super().__init__(name)
            _Interface._tables[type(self)] = (ServiceInterface._get_methods(self),
                                              ServiceInterface._get_properties(self),
                                              ServiceInterface._get_signals(self))
            return
        self.name = name
        # dbus-next keeps these four per object; the first three never change after init.
        (self._ServiceInterface__methods, self._ServiceInterface__properties,
         self._ServiceInterface__signals) = table
        self._ServiceInterface__buses: set[BaseMessageBus] = set()

    def property_values(self) -> dict[str, Variant]:
        """Every readable property, as GetAll and GetManagedObjects return them."""
        return {prop.name: Variant(prop.signature, prop.prop_getter(self))
                for prop in ServiceInterface._get_properties(self)
                if prop.access.readable() and not prop.disabled}


def _seconds(t: float) -> int:
    """A time as a D-Bus ``t``: whatever a journal row holds, it marshals."""
    try:
        return min(max(int(t), 0), (1 << 64) - 1)
    except (OverflowError, ValueError):
        return 0


class ManagerInterface(_Interface):
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
    async def KubernetesAccess(self, caller: Caller, target: "s") -> "(asas)":
        namespaces, resources = await self.service.kubernetes_access(caller, target)
        return [namespaces, resources]

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
    async def Revoke(self, caller: Caller, lease: "o", reason: "s") -> "":
        await self.service.revoke(caller, lease_id_of(lease), reason)

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


class GroupInterface(_Interface):
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


class DeviceInterface(_Interface):
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


class LeaseInterface(_Interface):
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
        return _seconds(self.lease.created)

    @dbus_property(access=PropertyAccess.READ)
    def Expires(self) -> "t":
        return _seconds(self.lease.expires)

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

    @dbus_property(access=PropertyAccess.READ)
    def State(self) -> "s":
        return self.lease.state

    @dbus_property(access=PropertyAccess.READ)
    def RevokeReason(self) -> "s":
        return self.lease.revoke_reason or ""

    @dbus_property(access=PropertyAccess.READ)
    def RevokeDeadline(self) -> "t":
        return _seconds(self.lease.deadline)

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
        self.emit_properties_changed({"Expires": _seconds(self.lease.expires)})

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
