"""dbus-next 0.2.3's connection, fixed where it fails vfiod (daemon and clients alike).

- A full socket is waited out.  dbus-next's writer treats ``EAGAIN`` from
  ``send`` as a lost connection, so any burst larger than the socket buffer
  (exporting a big host, a flood of signals, many replies, a large request)
  used to drop the connection while the process lived on.  `_PatientWriter`
  keeps the message and its place in the queue and tries again when the
  socket is writable.
- A message whose body is larger than `MAX_BODY_BYTES` is read off the socket
  and dropped without being unmarshalled (`_BoundedUnmarshaller`); the daemon
  refuses it by name (`vfiod.daemon.connection`).
- ``InterfacesAdded`` and ``InterfacesRemoved`` come from the object that
  implements ``org.freedesktop.DBus.ObjectManager`` (`PatientBus.object_manager`),
  as the D-Bus specification has them.  dbus-next sends them from the added or
  removed object's own path, where clients that follow the specification (GLib's
  ``GDBusObjectManagerClient``, sd-bus) do not listen.
"""

from __future__ import annotations

import array
import io
import logging
import socket
import struct
import weakref

from dbus_next import Message
from dbus_next.service import ServiceInterface
from dbus_next._private.unmarshaller import MarshallerStreamEndError, Unmarshaller
from dbus_next.aio import MessageBus
from dbus_next.aio.message_bus import _MessageWriter
from typing import Unpack

from .names import BusArgs

#: The largest message body served (vfiod's own arguments are a few KiB at most).
MAX_BODY_BYTES = 1 << 20


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

    #: The path of the object that implements ObjectManager for the objects below it
    #: (vfiod's is ``/org/vfiod1``); None: this connection exports no object tree.
    object_manager: str | None = None

    def __init__(self, negotiate_unix_fd: bool = False, **where: Unpack[BusArgs]):
        super().__init__(negotiate_unix_fd=negotiate_unix_fd, **where)
        self._writer = _PatientWriter(self)

    def _signal_path(self, path: str) -> str:
        """Where ObjectManager's signals about the object at `path` come from."""
        om = self.object_manager
        return om if om is not None and path.startswith(om.rstrip("/") + "/") else path

    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        if self._disconnected:
            return

        def send(_iface: ServiceInterface, values: dict[str, object], _data: object, e: Exception | None) -> None:
            if e is not None:       # dbus-next sends what it could read; so does vfiod, and says so
                logging.getLogger("vfiod.bus").error(
                    "InterfacesAdded for %s %s: some properties are left out (%s: %s)",
                    path, interface.name, type(e).__name__, e)
            explicit = getattr(interface, "explicit", ())      # read by name only (vfiod.daemon.connection)
            values = {k: v for k, v in values.items() if k not in explicit}
            self.send(Message.new_signal(path=self._signal_path(path), interface=_OBJECT_MANAGER,
                                         member="InterfacesAdded", signature="oa{sa{sv}}",
                                         body=[path, {interface.name: values}]))

        ServiceInterface._get_all_property_values(interface, send)

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        if self._disconnected:
            return
        self.send(Message.new_signal(path=self._signal_path(path), interface=_OBJECT_MANAGER,
                                     member="InterfacesRemoved", signature="oas",
                                     body=[path, removed_interfaces]))


_OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
