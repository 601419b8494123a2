"""Transient systemd scopes: `vfioctl lease -- CMD` runs in ``vfiod-lease-ID.scope``,
which the revoke ladder ends whole (systemd's Manager over vfiod's own bus
connection; where no systemd answers, nothing is confined)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from dbus_next import Message, MessageType, Variant

from ..state import LeaseRow
from .connection import VfiodBus

log = logging.getLogger("vfiod")

SYSTEMD = "org.freedesktop.systemd1"


class Scopes:
    def __init__(self, bus: Callable[[], VfiodBus | None],
                 loop: Callable[[], asyncio.AbstractEventLoop | None]) -> None:
        self.bus = bus
        self.loop = loop

    async def _systemd(self, member: str, signature: str, body: list[object]) -> bool:
        """Call systemd's Manager on vfiod's bus; False where there is no systemd (or it said no)."""
        bus = self.bus()
        if bus is None:
            return False
        msg = Message(destination=SYSTEMD, path="/org/freedesktop/systemd1", interface=SYSTEMD + ".Manager",
                      member=member, signature=signature, body=body)
        try:
            reply = await asyncio.wait_for(bus.call(msg), 10)
        except (asyncio.TimeoutError, OSError) as e:
            log.info("systemd did not answer %s: %s", member, e)
            return False
        if reply is None or reply.message_type == MessageType.ERROR:
            why = (reply.body[0] if reply and reply.body else reply.error_name if reply else "no reply")
            log.info("systemd refused %s: %s", member, why)
            return False
        return True

    async def confine(self, lease: LeaseRow, pid: int) -> str | None:
        """Where systemd runs: move the caller (vfioctl lease -- CMD, before it starts CMD) into
        a transient scope of its own, so the revoke ladder can end the whole tree at once."""
        scope = f"vfiod-lease-{lease.id}.scope"
        if await self._systemd("StartTransientUnit", "ssa(sv)a(sa(sv))", [
                scope, "fail", [["PIDs", Variant("au", [pid])],
                                ["Description", Variant("s", f"vfiod lease {lease.id} of uid {lease.uid}")],
                                ["CollectMode", Variant("s", "inactive-or-failed")]], []]):
            log.info("lease %s: pid %s runs in %s", lease.id, pid, scope)
            return scope
        return None

    def end_in_thread(self, scope: str, sig: int) -> bool:
        """From a worker: send `sig` to every process of `scope` (False where it could not)."""
        loop = self.loop()
        if loop is None:
            return False
        fut = asyncio.run_coroutine_threadsafe(self._systemd("KillUnit", "ssi", [scope, "all", int(sig)]), loop)
        try:
            return fut.result(15)
        except Exception as e:
            log.error("ending %s: %s", scope, e)
            return False
