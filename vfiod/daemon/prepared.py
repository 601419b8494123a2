"""GetManagedObjects from a prepared reply: each object marshalled once per change, not per call.

A 4,096-function host has 8,192 objects and about 100,000 property values; dbus-next
marshals a reply in pure Python, so building the whole reply at every call cost a
second or more, and every ObjectManager client (a web console, `busctl`, `vfioctl
monitor`) asks for it first.

The reply body ``a{oa{sa{sv}}}`` is an array of dict entries, each aligned to 8
bytes, and what one entry marshals to does not depend on where in the array it
lands.  So each object's entry is marshalled on its own and kept with a *key*: the
values its properties are computed from (the snapshot's `Group` or `Device` value,
which a rescan replaces only where something changed, and the lease of its group).
At each call only the keys are compared; an entry is marshalled again only when its
key changed, and the reply is the entries joined (`body`).  Objects whose properties
read live state on every call (leases: their warnings and what a revoke waits for)
have no key and are marshalled each time; they are few.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Hashable

from dbus_next import Message, MessageType, Variant
from dbus_next._private.marshaller import Marshaller

#: GetManagedObjects' reply: object path -> interface -> property -> value
SIGNATURE = "a{oa{sa{sv}}}"
#: What an object's properties are, made when its entry is marshalled
_Values = Callable[[], dict[str, dict[str, Variant]]]
_FIELD_REPLY_SERIAL, _FIELD_DESTINATION, _FIELD_SIGNATURE = 5, 6, 8
_PROTOCOL_VERSION = 1


def entry(path: str, interfaces: dict[str, dict[str, Variant]]) -> bytes:
    """One object's dict entry, as it stands at any 8-aligned place of the array."""
    m = Marshaller(SIGNATURE, [{path: interfaces}])
    m.marshall()
    return bytes(m.buffer[8:])          # past the array's length and the padding to its first entry


def body(entries: list[bytes]) -> bytes:
    """The reply's body: the array length, padding to 8, and the entries, each padded to 8."""
    parts, length = [], 0
    for e in entries:
        pad = -length % 8
        if pad:
            parts.append(b"\0" * pad)
            length += pad
        parts.append(e)
        length += len(e)
    return struct.pack("<I", length) + b"\0\0\0\0" + b"".join(parts)


class PreparedEntries:
    """The marshalled entry of each object, with the key it was marshalled for."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[Hashable, bytes]] = {}
        self.marshalled = 0             # entries marshalled since start (a test and the bench read it)

    def get(self, path: str, key: Hashable | None, interfaces: _Values) -> bytes:
        """The entry of `path`: the one kept if `key` is the key it was made for, else a new
        one (kept unless `key` is None)."""
        kept = self._entries.get(path)
        if key is not None and kept is not None and kept[0] == key:
            return kept[1]
        data = entry(path, interfaces())
        self.marshalled += 1
        if key is not None:
            self._entries[path] = (key, data)
        else:
            self._entries.pop(path, None)
        return data

    def forget(self, path: str) -> None:
        self._entries.pop(path, None)


class PreparedReply(Message):
    """A METHOD_RETURN whose body is already marshalled (dbus-next marshals a `Message`'s
    body when it is written; this one only writes its header)."""

    def __init__(self, call: Message, signature: str, prepared: bytes):
        super().__init__(message_type=MessageType.METHOD_RETURN, reply_serial=call.serial,
                         destination=call.sender, signature=signature)
        self.prepared = prepared

    def _marshall(self, negotiate_unix_fd: bool = False) -> bytes:
        fields = [[_FIELD_REPLY_SERIAL, Variant("u", self.reply_serial)],
                  [_FIELD_SIGNATURE, Variant("g", self.signature)]]
        if self.destination:
            fields.append([_FIELD_DESTINATION, Variant("s", self.destination)])
        header = Marshaller("yyyyuua(yv)", [ord("l"), self.message_type.value, self.flags.value,
                                            _PROTOCOL_VERSION, len(self.prepared), self.serial, fields])
        header.marshall()
        header.align(8)
        return bytes(header.buffer) + self.prepared
