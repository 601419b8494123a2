"""The daemon's bus connection: how calls are queued, answered and attributed.

The caller: `@method()` handlers never see the message, so a message handler
registered before any export (`install_caller_tracking`) stores each
METHOD_CALL in a ContextVar that the method reads (the async task that runs the
method copies the context at creation, in the same call chain).
``GetConnectionCredentials`` of the sender gives uid, pid and groups
(`vfiod.daemon.callers`).

Robustness (on top of `vfiod.wire.transport`):

- One client cannot starve the others.  Method calls are queued per sender and
  served round-robin, one call of each sender in turn, with the event loop free
  in between, and at most `MAX_RUNNING_CALLS` of a sender's calls running (in
  the worker threads) at once; a sender with `MAX_PENDING_CALLS` calls queued or
  running gets ``org.vfiod1.Error.LimitsExceeded`` at once for the next, and so
  does a message over `MAX_BODY_BYTES`.
- Every reply is named: an error that is not a `VfiodError` reaches the client
  as ``org.vfiod1.Error.BackendFailed`` with no traceback (`_SendReply`).
- `ExportedInterface` reads each interface class's table of members once, not per
  object; GetManagedObjects is served from prepared entries (`vfiod.daemon.prepared`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import os
import time
import xml.etree.ElementTree as ET
from types import TracebackType
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Mapping, Protocol, Unpack

from dbus_next import Message, MessageFlag, MessageType, Variant
from dbus_next import introspection as intr
from dbus_next.aio import MessageBus
from dbus_next.errors import DBusError
from dbus_next.message_bus import BaseMessageBus
from dbus_next.service import ServiceInterface

from ..errors import BackendFailed, LimitsExceeded, VfiodError
from ..wire.names import BusArgs
from ..wire.transport import _OVERSIZE, MAX_BODY_BYTES, PatientBus, _BoundedUnmarshaller
from .prepared import SIGNATURE, PreparedReply, body

if TYPE_CHECKING:
    from dbus_next.service import _Method, _Property, _Signal

log = logging.getLogger("vfiod.bus")

_current_msg: contextvars.ContextVar[Message | None] = contextvars.ContextVar("vfiod_msg", default=None)

#: Calls one sender may have queued or running at once; the next is refused.
MAX_PENDING_CALLS = 32
#: Calls of one sender running at once (the others wait in its queue): a client's
#: calls never fill the worker threads ahead of another client's.
MAX_RUNNING_CALLS = 2


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
        #: GetManagedObjects' prepared entries below a path (`vfiod.daemon.prepared`), or None
        #: where this connection builds the reply itself; set by the object tree
        self.managed_entries: Callable[[str], list[bytes] | None] | None = None

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
        _close_received(msg)
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
            PatientBus._emit_interface_added(self, path, interface)

    def _default_get_managed_objects_handler(self, msg: Message, send_reply: Callable[[Message], None]) -> None:
        """GetManagedObjects from the object tree's prepared entries where it has them
        (`vfiod.daemon.prepared`: each object marshalled once per change); otherwise in one
        pass over the objects below the path (dbus-next's rechecks the whole result after
        each object: quadratic in the host's size).  An object whose properties cannot be
        read is left out and logged, once."""
        prefix = msg.path.rstrip("/") + "/"
        entries = self.managed_entries(prefix) if self.managed_entries else None
        if entries is not None:
            send_reply(PreparedReply(msg, SIGNATURE, body(entries)))
            return
        result: dict[str, dict[str, dict[str, Variant]]] = {}
        for node, interfaces in self._path_exports.items():
            if not node.startswith(prefix):
                continue
            try:
                result[node] = {iface.name: iface.property_values() for iface in interfaces
                                if isinstance(iface, ExportedInterface)}
            except Exception as e:
                self.unreadable(node, e)
        send_reply(Message.new_method_return(msg, "a{oa{sa{sv}}}", [result]))

    def _default_properties_handler(self, msg: Message, send_reply: Callable[[Message], None]) -> None:
        """GetAll of vfiod's own interfaces is `ExportedInterface.property_values` (without
        the explicit properties, as GetManagedObjects has them); the rest is dbus-next's."""
        if msg.member == "GetAll" and msg.signature == "s":
            iface = next((i for i in self._path_exports.get(msg.path, ()) if i.name == msg.body[0]), None)
            if isinstance(iface, ExportedInterface):
                send_reply(Message.new_method_return(msg, "a{sv}", [iface.property_values()]))
                return
        MessageBus._default_properties_handler(self, msg, send_reply)

    def unreadable(self, path: str, e: Exception) -> None:
        """`path` is left out of GetManagedObjects: said once in the log."""
        if path not in self._unreadable:
            self._unreadable.add(path)
            log.error("cannot read the properties of %s (%s: %s); left out of GetManagedObjects",
                      path, type(e).__name__, e)

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
                    if fut.cancelled():          # the daemon is stopping with the call unfinished
                        send_reply(Message.new_error(msg, BackendFailed.dbus_name,
                                                     f"vfiod stopped before {method.name} finished"))
                        _close_received(msg)
                        return
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
                    _close_received(msg)

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


class ExportedInterface(ServiceInterface):
    """A ServiceInterface whose table of methods, properties and signals is read from
    the class once, not from every object again (a 4,096-function host has 8,193
    objects; dbus-next's per-object `inspect.getmembers` took over a second)."""

    _tables: dict[type, tuple[list[_Method], list[_Property], list[_Signal]]] = {}

    def __init__(self, name: str) -> None:
        table = ExportedInterface._tables.get(type(self))
        if table is None:
            super().__init__(name)
            ExportedInterface._tables[type(self)] = (ServiceInterface._get_methods(self),
                                              ServiceInterface._get_properties(self),
                                              ServiceInterface._get_signals(self))
            return
        self.name = name
        # dbus-next keeps these four per object; the first three never change after init.
        (self._ServiceInterface__methods, self._ServiceInterface__properties,
         self._ServiceInterface__signals) = table
        self._ServiceInterface__buses: set[BaseMessageBus] = set()

    #: Properties read only by name (``Get``): left out of GetAll, GetManagedObjects and
    #: InterfacesAdded, and marked so in the introspection data, as sd-bus does for its
    #: ``SD_BUS_VTABLE_PROPERTY_EXPLICIT`` properties.  For what every object has and few
    #: clients read: each value in every object's entry is work for every client that
    #: reads a big host's whole tree (busctl's time grows with the number of values).
    #: Name -> what PropertiesChanged says of it (``EmitsChangedSignal``): ``const``
    #: (it never changes while the object is there) or ``invalidates`` (named, without
    #: its value).
    explicit: ClassVar[Mapping[str, str]] = {}

    def property_values(self) -> dict[str, Variant]:
        """Every readable property but the explicit ones, as GetAll and GetManagedObjects
        return them."""
        return {prop.name: Variant(prop.signature, prop.prop_getter(self))
                for prop in ServiceInterface._get_properties(self)
                if prop.access.readable() and not prop.disabled and prop.name not in self.explicit}

    def introspect(self) -> intr.Interface:
        """dbus-next's introspection data, with each explicit property annotated."""
        data = super().introspect()
        data.properties = [_Annotated(p, (("org.freedesktop.systemd1.Explicit", "true"),
                                          ("org.freedesktop.DBus.Property.EmitsChangedSignal",
                                           self.explicit[p.name])))
                           if p.name in self.explicit else p for p in data.properties]
        return data


class _Annotated(intr.Property):
    """A property's introspection data with annotations (dbus-next 0.2.3 writes none)."""

    def __init__(self, prop: intr.Property, annotations: tuple[tuple[str, str], ...]):
        super().__init__(prop.name, prop.signature, prop.access)
        self.annotations = annotations

    def to_xml(self) -> ET.Element:
        element = super().to_xml()
        for name, value in self.annotations:
            ET.SubElement(element, "annotation", {"name": name, "value": value})
        return element



def _close_received(msg: Message) -> None:
    """The fds a call carried are vfiod's to close once the call is done (a pidfd the caller
    sent, say): none is kept beyond its call."""
    for fd in msg.unix_fds or ():
        try:
            os.close(fd)
        except OSError:
            pass
    msg.unix_fds = []


def current_message() -> Message | None:
    """The METHOD_CALL being served now (None outside a method call)."""
    return _current_msg.get()


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
