"""Who is calling: the uid, groups and pid the bus gives for a message's sender.

`@method()` handlers never see their message: `vfiod.daemon.connection` keeps the current
METHOD_CALL in a ContextVar, and `Callers.of` asks the bus daemon
(``GetConnectionCredentials``) about its sender once, caching the answer per
unique name until ``NameOwnerChanged`` says the name is gone."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dbus_next import Message, MessageType

from ..errors import PermissionDenied
from ..policy import Caller

if TYPE_CHECKING:
    from .connection import VfiodBus


class Callers:
    def __init__(self) -> None:
        self.bus: VfiodBus | None = None
        self._cache: dict[str, Caller] = {}

    async def of(self, msg: Message | None) -> Caller:
        if msg is None or not msg.sender:
            raise PermissionDenied("cannot tell who is calling")
        cached = self._cache.get(msg.sender)
        if cached:
            return cached
        assert self.bus is not None
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionCredentials",
            signature="s", body=[msg.sender]))
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            raise PermissionDenied(f"cannot tell who {msg.sender} is")
        creds = {k: v.value for k, v in reply.body[0].items()}
        uid = creds.get("UnixUserID")
        if uid is None:
            raise PermissionDenied(f"the bus does not know the uid of {msg.sender}")
        gids = creds.get("UnixGroupIDs")
        caller = Caller(uid=int(uid), gids=frozenset(gids) if gids is not None else Caller.from_uid(uid).gids,
                        pid=creds.get("ProcessID"))
        self._cache[msg.sender] = caller
        return caller

    async def present(self, name: str) -> bool:
        """Is the unique name `name` still on the bus?"""
        assert self.bus is not None
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="NameHasOwner", signature="s", body=[name]))
        return reply is not None and reply.message_type == MessageType.METHOD_RETURN and bool(reply.body[0])

    def forget(self, name: str) -> None:
        """`name` left the bus: a new connection may get its name later."""
        self._cache.pop(name, None)
