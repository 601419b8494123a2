"""Moving a group's devices: to the backend for a grant, back to their drivers for a
release or a rollback.  Every sysfs write is a journaled step (`LeaseCore.step`).

Granting (after `LeaseManager.request` has recorded the lease, state ``granting``):

1. ``backend.check``;
2. ``backend.bind`` each endpoint, in address order; detach each planned bridge;
3. ``backend.hand_over`` (journaled with its undo record first).

An mdev lease holds no PCI device: its instance is made before the lease is
recorded (`vfiod.leases.mdev`), and steps 1 and 3 run as for any group.

Giving back walks the other way: ``take_back`` of a begun hand-over, the policy's
reset, then every bridge and endpoint restored, then an mdev lease's instance removed (endpoints in address order, the
kernel's boot-time probe order, so network interfaces get their old names back
where no udev renames them)."""

from __future__ import annotations

import logging
from typing import Callable

from ..errors import BackendFailed, Busy
from ..hookspecs import Backend, LeaseContext
from ..state import HeldDevice, LeaseRow
from ..sysfs import GroupClaim, GroupHeld
from ..topology import Host
from .core import Ended, LeaseCore
from .mdev import handed_record, remove_instance

log = logging.getLogger("vfiod.leases")


class Moves:
    def __init__(self, core: LeaseCore, restore_memlock: Callable[[LeaseRow], None]) -> None:
        self.core = core
        self.restore_memlock = restore_memlock

    def grant(self, ctx: LeaseContext, be: Backend) -> None:
        core, lid = self.core, ctx.lease.id
        be.check(ctx)
        for addr in ctx.endpoints:
            with core.step(lid, "bind", str(addr), {"driver": be.driver}, f"bind:{addr}",
                           f"bind {addr} to {be.driver}"):
                be.bind(ctx, addr)
        for held in core.journal.held(lid):
            if held.role == "bridge":
                with core.step(lid, "detach-bridge", held.addr, None, f"detach:{held.addr}",
                               f"detach bridge {held.addr} from {held.driver}"):
                    core.kernel.detach(held.address)
        # The kernel's proof that nobody holds the group before it is given to anyone: vfiod
        # opens its single-open node (a file of it anywhere, even in flight over SCM_RIGHTS
        # or queued in another daemon's message, makes that fail), and keeps it open until
        # the hand-over is done, so no file of an earlier holder can pair with this lease.
        claim = self._claim(ctx) if be.uses_vfio else None
        try:
            record = be.plan_hand_over(ctx)
            with core.step(lid, "hand-over", None, record, "hand-over", f"hand over group {ctx.lease.group}") as step:
                step.record = be.hand_over(ctx) or record
        finally:
            if claim is not None:
                claim.close()

    def _claim(self, ctx: LeaseContext) -> GroupClaim | None:
        group = ctx.lease.group
        try:
            return self.core.kernel.claim_group(group)
        except GroupHeld as e:
            self.core.audit("grant", ctx.lease.uid, ctx.lease.target, ctx.lease.id, ctx.lease.rule, "held",
                            e.words, group=group)
            raise Busy(f"IOMMU group {group} is still held: {e.words}; a process, an fd in flight over "
                       "SCM_RIGHTS or one queued in another daemon's message has it, and vfiod gives the group "
                       "to nobody until the kernel lets vfiod open it") from None

    def undo(self, ctx: LeaseContext, be: Backend, reset: bool = False) -> list[str]:
        """take_back every begun hand-over, reset the endpoints if asked, then
        restore every device; the errors, one line each."""
        core = self.core
        errors: list[str] = []
        for st in reversed(core.journal.steps(ctx.lease.id)):
            if st.action == "hand-over":
                try:
                    be.take_back(ctx, handed_record(core, ctx.lease, st.record))
                    core.on_step("taken-back")
                except Exception as e:
                    errors.append(f"taking back group {ctx.lease.group}: {e}")
        held_all = core.journal.held(ctx.lease.id)
        if reset:
            self._reset_endpoints(ctx, held_all)
        # Bridges first (the reverse of the grant); then the endpoints in address order,
        # which is the kernel's probe order at boot: where no udev renames interfaces,
        # they get back the names they had (eth0 stays eth0).
        order = [h for h in reversed(held_all) if h.role == "bridge"] + [h for h in held_all if h.role != "bridge"]
        for held in order:
            addr = held.address
            if not core.kernel.exists(addr):
                continue        # gone (removed): nothing to give back
            try:
                if held.role == "bridge":
                    core.kernel.restore(addr, held.driver, held.override)
                else:
                    be.unbind(ctx, addr, held)
                core.on_step(f"restored:{addr}")
            except Exception as e:
                errors.append(f"{addr}: {e}")
        mdev = core.journal.mdev.of(ctx.lease.id)
        if mdev is not None:            # the lease's own instance goes, once nothing of it is handed over
            error = remove_instance(core, mdev, journaled=True)
            if error:
                errors.append(error)
        return errors

    def _reset_endpoints(self, ctx: LeaseContext, held_all: list[HeldDevice]) -> None:
        """The policy's reset on release: each endpoint is reset while the lessee has
        let go and before a host driver sees it again.  A failed reset is logged and
        audited, never a reason to keep a device from its driver."""
        core = self.core
        for held in held_all:
            addr = held.address
            if held.role != "endpoint" or not core.kernel.exists(addr):
                continue
            try:
                method = core.kernel.reset(addr)
                core.on_step(f"reset:{addr}")
                log.info("lease %s: %s reset (%s)", ctx.lease.id, addr, method)
            except Exception as e:
                log.warning("lease %s: %s was not reset: %s", ctx.lease.id, addr, e)
                core.audit("reset", None, str(addr), ctx.lease.id, ctx.lease.rule, "failed", str(e),
                           group=ctx.lease.group)

    def rollback(self, ctx: LeaseContext, be: Backend) -> None:
        errors = self.undo(ctx, be)
        if errors:
            # Keep the lease recorded as releasing: reconciliation tries again; no lease is lost.
            self.core.journal.set_state(ctx.lease.id, "releasing")
            log.error("rollback of group %s incomplete: %s", ctx.lease.group, "; ".join(errors))
            return
        self.core.journal.delete(ctx.lease.id)
        self.core.on_step("rolled-back")

    def give_back(self, lease: LeaseRow, reason: str, uid: int | None, be: Backend,
                  host: Host | None = None) -> Ended:
        """Return every device of a lease nobody holds; the lease ends (`on_ended`).
        `host`: the host's facts, where the caller read them under the same group lock
        (the rest of the lease's context, such as which other leases share an ACL entry,
        is read afresh: another release may have ended meanwhile)."""
        core = self.core
        core.journal.set_state(lease.id, "releasing")
        core.on_step("releasing")
        errors = self.undo(core.context(lease, host), be, reset=lease.reset)
        if errors:
            core.audit("release", uid, lease.target, lease.id, lease.rule, "incomplete", "; ".join(errors),
                       group=lease.group)
            # Never left "releasing" for good: the ladder tries again every second.
            core.journal.start_revoke(lease.id, reason, core.clock() + lease.grace)
            core.sync_locked()
            raise BackendFailed(f"releasing lease {lease.id} left work undone (it stays recorded and "
                                f"will be retried): {'; '.join(errors)}")
        self.restore_memlock(lease)
        with core.journal.tx():     # one commit: the lease is gone, and the audit trail says why
            core.journal.delete(lease.id)
            core.audit("release", uid, lease.target, lease.id, lease.rule, reason, group=lease.group)
        core.on_step("released")
        ended = Ended(lease=lease, reason=reason)
        core.on_ended(ended)
        return ended
