"""Who is calling: the uid, groups and pid the bus gives for a message's sender.

`@method()` handlers never see their message: `vfiod.daemon.connection` keeps the current
METHOD_CALL in a ContextVar, and `Callers.of` asks the bus daemon
(``GetConnectionCredentials``) about its sender once, caching the answer per
unique name until ``NameOwnerChanged`` says the name is gone.

The pid is only a number: the process that opened the connection may have
exited and its pid gone to another.  So the caller also carries when vfiod
first heard from the connection (`Caller.since`) and, where the bus daemon
offers one in the same reply (``ProcessFD``: dbus >= 1.15), a pidfd for that
process (`Caller.pidfd`); `vfiod.daemon.service` proves a process with them
before acting on it.

Whether a caller is a delegated admin (the policy's ``admin_groups``) is judged
at each call, not cached: the user database is read again, so that removing a
user from the group takes effect at their next call (`Policy.admin_group_of`)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import attrs

from dbus_next import Message, MessageType

from ..errors import PermissionDenied, VfiodError
from ..policy import Caller
from ..sysfs.procs import Proven, boottime, open_pidfd, prove_process

if TYPE_CHECKING:
    from .connection import VfiodBus


class Callers:
    def __init__(self) -> None:
        self.bus: VfiodBus | None = None
        #: the admin group that makes a caller a delegated admin at this call ("" if none;
        #: `Policy.admin_group_of`); asked for each call, never cached with the caller
        self.admin_of: Callable[[Caller], str] = lambda caller: ""
        self._cache: dict[str, Caller] = {}
        self._since: dict[str, float] = {}

    async def of(self, msg: Message | None) -> Caller:
        """The caller of `msg`, with its delegated admin rights judged now (`admin_of`)."""
        caller = await self._of(msg)
        group = self.admin_of(caller)
        return attrs.evolve(caller, admin_group=group) if group else caller

    async def _of(self, msg: Message | None) -> Caller:
        if msg is None or not msg.sender:
            raise PermissionDenied("cannot tell who is calling")
        cached = self._cache.get(msg.sender)
        if cached:
            return cached
        since = self._since.setdefault(msg.sender, boottime())
        creds, pidfd = await self.credentials(msg.sender)
        uid = creds.get("UnixUserID")
        if not isinstance(uid, int):
            if pidfd is not None:
                os.close(pidfd)
            raise PermissionDenied(f"the bus does not know the uid of {msg.sender}")
        gids = creds.get("UnixGroupIDs")
        pid = creds.get("ProcessID")
        caller = Caller(uid=uid, gids=frozenset(g for g in gids if isinstance(g, int)) if isinstance(gids, list)
                        else Caller.from_uid(uid).gids,
                        pid=pid if isinstance(pid, int) else None, since=since, pidfd=pidfd)
        old = self._cache.get(msg.sender)        # another call of the same sender got here first
        if old is not None:
            if pidfd is not None:
                os.close(pidfd)
            return old
        self._cache[msg.sender] = caller
        return caller

    async def credentials(self, name: str) -> tuple[dict[str, object], int | None]:
        """What the bus says of `name` (GetConnectionCredentials), and the pidfd of its
        ``ProcessFD`` where the bus gives one (the caller closes it)."""
        assert self.bus is not None
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="GetConnectionCredentials",
            signature="s", body=[name]))
        if reply is None or reply.message_type != MessageType.METHOD_RETURN:
            raise PermissionDenied(f"cannot tell who {name} is")
        received = list(reply.unix_fds or [])
        raw = reply.body[0] if reply.body and isinstance(reply.body[0], dict) else {}
        creds = {k: v.value for k, v in raw.items()}
        pidfd = None
        index = creds.pop("ProcessFD", None)
        if isinstance(index, int) and 0 <= index < len(received):
            pidfd = received.pop(index)
        for fd in received:
            os.close(fd)
        return creds, pidfd

    def prove(self, caller: Caller, sent: int | None) -> tuple[int | None, Proven | None, str]:
        """The caller's process, proven: the bus's ``ProcessFD`` where it gives one, else the
        pidfd the caller `sent` (request option ``pidfd``), else a pidfd opened for the bus's
        pid; it must run as the caller's uid and have started before its connection first
        called.  (pidfd, the proof, "") or (pidfd or None, None, why not); a pidfd that is
        neither the caller's cached one nor `sent` was opened here, for the caller to close."""
        pidfd = caller.pidfd if caller.pidfd is not None else sent
        if pidfd is None and caller.pid:
            pidfd = open_pidfd(caller.pid)
            if pidfd is None:
                return None, None, f"process {caller.pid} is gone"
        if pidfd is None:
            return None, None, "vfiod does not know the calling process"
        try:
            return pidfd, prove_process(pidfd, caller.uid, caller.since), ""
        except VfiodError as e:
            return pidfd, None, str(e)

    async def bus_daemon_pid(self) -> int | None:
        """The bus daemon's own pid (never a holder vfiod ends: an fd may sit in a message it queues)."""
        try:
            creds, pidfd = await self.credentials("org.freedesktop.DBus")
        except VfiodError:
            return None
        if pidfd is not None:
            os.close(pidfd)
        pid = creds.get("ProcessID")
        return pid if isinstance(pid, int) else None

    async def present(self, name: str) -> bool:
        """Is the unique name `name` still on the bus?"""
        assert self.bus is not None
        reply = await self.bus.call(Message(
            destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
            interface="org.freedesktop.DBus", member="NameHasOwner", signature="s", body=[name]))
        return reply is not None and reply.message_type == MessageType.METHOD_RETURN and bool(reply.body[0])

    def still_here(self, name: str) -> bool:
        """Has vfiod not heard yet that `name`, a caller it knows, left the bus?  Every caller
        is known from its first call until ``NameOwnerChanged`` says it left (`forget`): no
        round trip to the bus daemon."""
        return name in self._cache

    def forget(self, name: str) -> None:
        """`name` left the bus: a new connection may get its name later."""
        self._since.pop(name, None)
        gone = self._cache.pop(name, None)
        if gone is not None and gone.pidfd is not None:
            os.close(gone.pidfd)
