"""Transient systemd scopes: `vfioctl lease -- CMD` runs in ``vfiod-lease-ID.scope``,
whose processes the revoke ladder ends (systemd's Manager over vfiod's own bus
connection; where no systemd answers, nothing is confined).

The process moved is the caller's own, proven (`vfiod.sysfs.procs.prove_process`)
and held through a pidfd: systemd >= 253 is given the pidfd itself (``PIDFDs``);
an older one (Debian 12 has 252) the pid, and once it has moved it, the pidfd
says whether the same process is still alive (a pid is reused only after its
process died).  If it is not, the scope is not the lease's: it is left out of
the lease, stopped if it is empty, and the request refused."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Callable

from dbus_next import Message, MessageType, Variant

from ..errors import PermissionDenied
from ..state import LeaseRow
from ..sysfs import Holder
from ..sysfs.procs import Proven, describe_process, still
from .connection import VfiodBus

log = logging.getLogger("vfiod")

SYSTEMD = "org.freedesktop.systemd1"
#: What the bus answers where nobody owns systemd's name (a host or container without systemd).
NOT_THERE = ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner")
#: The first systemd that takes processes as pidfds in StartTransientUnit.
PIDFDS_SINCE = 253


class Scopes:
    def __init__(self, bus: Callable[[], VfiodBus | None],
                 loop: Callable[[], asyncio.AbstractEventLoop | None]) -> None:
        self.bus = bus
        self.loop = loop
        self._version: int | None = None
        self._absent = False          # no systemd on the bus (said once, then not asked again)

    async def _systemd(self, member: str, signature: str, body: list[object], unix_fds: list[int] | None = None,
                       interface: str = SYSTEMD + ".Manager") -> Message | None:
        """Call systemd's Manager on vfiod's bus; its reply, or None where there is no systemd
        (or it said no)."""
        bus = self.bus()
        if bus is None or self._absent:
            return None
        msg = Message(destination=SYSTEMD, path="/org/freedesktop/systemd1", interface=interface,
                      member=member, signature=signature, body=body, unix_fds=unix_fds or [])
        try:
            reply = await asyncio.wait_for(bus.call(msg), 10)
        except (asyncio.TimeoutError, OSError) as e:
            log.info("systemd did not answer %s: %s", member, e)
            return None
        if reply is not None and reply.error_name in NOT_THERE:
            self._absent = True
            log.info("no systemd on the bus: leases run without a scope of their own (the revoke ladder "
                     "ends the holders it finds)")
            return None
        if reply is None or reply.message_type == MessageType.ERROR:
            why = (reply.body[0] if reply and reply.body else reply.error_name if reply else "no reply")
            log.info("systemd refused %s: %s", member, why)
            return None
        return reply

    async def version(self) -> int:
        """systemd's version number (0 where it does not say)."""
        if self._version is None:
            reply = await self._systemd("Get", "ss", [SYSTEMD + ".Manager", "Version"],
                                        interface="org.freedesktop.DBus.Properties")
            text = reply.body[0].value if reply is not None and reply.body else ""
            m = re.match(r"\s*v?(\d+)", text if isinstance(text, str) else "")
            self._version = int(m.group(1)) if m else 0
        return self._version

    async def confine(self, lease: LeaseRow, pidfd: int, proven: Proven) -> str | None:
        """Where systemd runs: move the caller's proven process (vfioctl lease -- CMD, before it
        starts CMD) into a transient scope of its own, so the revoke ladder can end the whole
        tree.  The scope's name, None where there is no systemd; `PermissionDenied` if the
        process that was moved is not provably the one proven."""
        scope = f"vfiod-lease-{lease.id}.scope"
        fds: list[int] = []
        if await self.version() >= PIDFDS_SINCE:
            who = ["PIDFDs", Variant("ah", [0])]
            fds = [pidfd]
        else:
            who = ["PIDs", Variant("au", [proven.pid])]
        reply = await self._systemd("StartTransientUnit", "ssa(sv)a(sa(sv))", [
            scope, "fail", [who, ["Description", Variant("s", f"vfiod lease {lease.id} of uid {lease.uid}")],
                            ["CollectMode", Variant("s", "inactive-or-failed")]], []], fds)
        if reply is None:
            return None
        if not fds and not still(pidfd, proven):
            # The pid was given to systemd while the pidfd held the process; if that process is
            # gone now, systemd may have moved another that got its pid: not the lease's.
            members = await self.pids(scope)
            if not members:
                await self._systemd("StopUnit", "ss", [scope, "fail"])
            log.error("lease %s: process %s ended while %s was made (it has %s); the scope is not the lease's",
                      lease.id, proven.pid, scope, sorted(members) or "no process")
            raise PermissionDenied(f"the calling process {proven.pid} ended while its scope was made; "
                                   "the lease is refused")
        log.info("lease %s: pid %s runs in %s", lease.id, proven.pid, scope)
        return scope

    async def pids(self, scope: str) -> frozenset[int]:
        """The processes of `scope` as systemd says (GetUnitProcesses); none where it cannot."""
        reply = await self._systemd("GetUnitProcesses", "s", [scope])
        if reply is None or not reply.body:
            return frozenset()
        return frozenset(int(row[1]) for row in reply.body[0] if len(row) >= 2 and isinstance(row[1], int))

    def members_in_thread(self, scope: str) -> list[Holder]:
        """From a worker: the processes of `scope` as they are now (none where there is no
        loop or no answer)."""
        loop = self.loop()
        if loop is None:
            return []
        fut = asyncio.run_coroutine_threadsafe(self.pids(scope), loop)
        try:
            pids = fut.result(15)
        except Exception as e:
            log.error("the processes of %s: %s", scope, e)
            return []
        return [h for pid in sorted(pids) if (h := describe_process(pid, f"a member of {scope}")) is not None]
