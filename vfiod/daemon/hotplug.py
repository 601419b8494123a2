"""What a PCI uevent means for the leases (from udev, the kernel, or the simulated kernel).

A leased device that goes away ends its lease (``removed``); a leased device
that changes driver while vfiod is not moving it ends its lease (``tampered``),
which puts the group back as it was before the lease.  A device added at a held
address, or changing driver, is first judged as at start (`vfiod.leases.identity`): one
that is not the device leased ends the lease as ``replaced`` and is not touched.  The snapshot is
refreshed for the touched groups only, once per burst of events, and not for the driver
changes of a group vfiod itself is moving (the move refreshes it when it ends)."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Iterable

from ..leases import identity, verify
from ..address import PciAddress
from ..leases import LeaseManager
from ..state import HeldDevice, LeaseRow
from .snapshot import Snapshot

log = logging.getLogger("vfiod")


class Hotplug:
    #: seconds between a leased device's bind/unbind event and the verdict: a removal
    #: unbinds first, so a removed device must not be mistaken for a tampered one
    TAMPER_GRACE = 0.25

    def __init__(self, manager: LeaseManager, snapshot: Snapshot,
                 end_soon: Callable[[LeaseRow, str, str, Callable[[], object] | None], None],
                 is_ending: Callable[[str], bool],
                 refresh_soon: Callable[[Iterable[int]], None],
                 turn_ladders: Callable[[], Awaitable[None]] | None = None) -> None:
        self.manager = manager
        self.turn_ladders = turn_ladders    # one turn of every revoke ladder (the daemon's tick's)
        self._turns: set[asyncio.Future[None]] = set()
        self.snapshot = snapshot
        self.end_soon = end_soon            # end a lease in a worker (removed, tampered, replaced)
        self.is_ending = is_ending          # is that lease being ended already?
        self.refresh_soon = refresh_soon
        self._dirty: set[int] = set()
        self.stopped = False                # the daemon stopped: the journal may be closed

    def on_event(self, action: str, addr: PciAddress, driver: str | None) -> None:
        """One PCI uevent, on the loop."""
        if self.stopped:
            return
        self.snapshot.scans["events"] += 1
        if action in ("bind", "unbind") and addr not in self.manager.reader.locked:
            # A driver change in a group vfiod is moving (a grant or release holds its lock)
            # is vfiod's own: nothing to judge, and the move rescans the group when it ends.
            # (A device the revoke ladder unbinds is `locked`: its unbind turns the ladder.)
            dev = self.snapshot.host.devices.get(addr)
            if dev is not None and dev.group is not None and self.manager.is_busy(dev.group):
                return
        lease, held = self.manager.journal.holdings(str(addr)).get(str(addr), (None, None))
        group = lease.group if lease else self._group_of(addr)
        if lease is not None and lease.state == "revoking" and action == "unbind":
            # The kernel's unbind of a device the ladder asked for returned: its holders let
            # go, so the ladder may finish now rather than at its next tick (it checks again).
            self.advance_soon()
        if lease is not None and held is not None and self._watched(lease):
            if action == "remove" or not self.manager.kernel.exists(addr):
                self.end_soon(lease, "removed", f"{addr} was removed", None)
            elif action == "add":
                self._judge_identity(lease)
            elif action in ("bind", "unbind"):
                asyncio.get_running_loop().call_later(self.TAMPER_GRACE, self._judge_driver_change,
                                                      lease.id, addr, held)
        # A group vfiod is moving right now is rescanned once when the move ends (the
        # grant's or release's own refresh): the driver changes on the way are vfiod's.
        # A device added or removed meanwhile is not, and is rescanned as always.
        ours = action in ("bind", "unbind") and group is not None and self.manager.is_busy(group)
        if group is not None and not ours:
            if not self._dirty:
                asyncio.get_running_loop().call_soon(self._flush)
            self._dirty.add(group)

    def advance_soon(self) -> None:
        """A turn of the revoke ladders now, besides the tick's: an unbind a ladder began returned."""
        turn = self.turn_ladders
        if turn is None:
            return

        async def quietly() -> None:
            try:
                await turn()
            except Exception as e:          # the tick turns them again within a second
                log.error("turning the revoke ladder: %s: %s", type(e).__name__, e)
        task = asyncio.ensure_future(quietly())
        self._turns.add(task)
        task.add_done_callback(self._turns.discard)

    def _watched(self, lease: LeaseRow) -> bool:
        """A granted lease that vfiod is not itself ending or moving."""
        return lease.state == "granted" and not self.is_ending(lease.id) and not self.manager.is_busy(lease.group)

    def _judge_driver_change(self, lease_id: str, addr: PciAddress, held: HeldDevice) -> None:
        if self.stopped:
            return
        m = self.manager
        lease = m.journal.lease(lease_id)
        if lease is None or not self._watched(lease):
            return
        if not m.kernel.exists(addr):
            self.end_soon(lease, "removed", f"{addr} was removed", None)
            return
        if self._judge_identity(lease):
            return
        backend = m.backends.get(lease.backend)
        want = None if held.role == "bridge" or backend is None else backend.driver
        have = m.kernel.driver_of(addr)
        if have != want:
            self.end_soon(lease, "tampered",
                          f"{addr} moved to {have or 'no driver'} behind vfiod's back (lease keeps it on "
                          f"{want or 'no driver'})", None)

    def _judge_identity(self, lease: LeaseRow) -> bool:
        """Are the lease's devices still the ones it holds?  If not, it ends hands off (the
        new device is not touched), in a worker; True then."""
        verdict = identity.judge(self.manager, lease)
        if verdict is None:
            return False
        self.end_soon(lease, verdict.reason, verdict.why,
                      lambda: verify.check(self.manager, lease.id, None, "hotplug"))
        return True

    def _flush(self) -> None:
        if self.stopped:
            return
        groups, self._dirty = sorted(self._dirty), set()
        self.refresh_soon(groups)

    def _group_of(self, addr: PciAddress) -> int | None:
        dev = self.snapshot.host.devices.get(addr)
        if dev is not None and dev.group is not None:
            return dev.group
        return self.manager.group_of(addr)
