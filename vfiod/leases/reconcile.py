"""After a crash, or a stop: make the kernel and the journal agree again, before the
daemon takes its name.  Each lease of the journal is rolled back (``granting``: the
grant was interrupted), finished (``releasing``), left to the ladder (``revoking``),
kept (persistent, or its owner is still on the bus: every endpoint is checked to be
on the backend's driver and the hand-over applied again), or ended (``owner-gone``).
An mdev lease is kept only while the kernel shows its instance (else it ends as
``removed``), and an instance journaled by a grant cut short before its lease was
recorded is removed first (`vfiod.leases.mdev.sweep`)."""

from __future__ import annotations

import logging

from ..errors import VfiodError
from ..hookspecs import Backend
from ..state import LeaseRow
from .core import END_REASONS, Ended, LeaseCore
from .ladder import Ladder
from .mdev import OURS, instance_state, sweep
from .moves import Moves

log = logging.getLogger("vfiod.leases")


def reconcile(core: LeaseCore, moves: Moves, ladder: Ladder) -> list[Ended]:
    """Make sysfs and the journal agree again; returns the leases that ended."""
    core.sync_locked()
    try:
        sweep(core)
    except Exception as e:
        log.error("the mdev instances of grants cut short could not be swept (%s: %s)", type(e).__name__, e)
    out = []
    for lease in core.journal.leases():
        try:
            out.extend(_reconcile_one(core, moves, ladder, lease))
        except Exception as e:
            # One lease that cannot be reconciled must not keep the daemon from serving the rest.
            log.error("lease %s could not be reconciled (%s: %s); it stays recorded as %s",
                      lease.id, type(e).__name__, e, lease.state)
    return out


def _reconcile_one(core: LeaseCore, moves: Moves, ladder: Ladder, lease: LeaseRow) -> list[Ended]:
    """Roll back, finish, keep or end one lease of the journal."""
    with core.group_lock(lease.group):
        be = core.backends.get(lease.backend)
        if be is None:
            log.error("lease %s uses backend %s, which is not loaded; kept as is", lease.id, lease.backend)
            return []
        if lease.state == "granting":
            moves.rollback(core.context(lease), be)
            core.audit("reconcile", None, lease.target, lease.id, lease.rule, "rolled-back",
                       "the grant was interrupted")
            return [Ended(lease, "interrupted")] if core.journal.lease(lease.id) is None else []
        if lease.state == "revoking":
            log.info("lease %s: the revoke ladder (%s) goes on", lease.id, lease.revoke_reason)
            return []
        held = core.journal.mdev.of(lease.id)
        gone = held is not None and instance_state(core, held, lease.group)[0] != OURS
        if lease.state != "releasing" and (lease.persistent or core.owner_alive(lease)) and not gone:
            _verify(core, lease, be)
            return []
        reason = "released" if lease.state == "releasing" else "removed" if gone else "owner-gone"
        if lease.state == "releasing" and lease.revoke_reason:      # the ladder's last step
            reason = lease.revoke_reason if lease.revoke_reason in END_REASONS else "revoked"
        try:
            ended = ladder.release(lease, reason)
            return [ended] if ended else []
        except VfiodError as e:
            log.error("%s lease %s: %s", "finishing the release of" if reason == "released" else "ending",
                      lease.id, e)
            return []


def _verify(core: LeaseCore, lease: LeaseRow, be: Backend) -> None:
    """A kept lease: every endpoint still on the backend's driver, the hand-over in place."""
    kernel = core.kernel
    ctx = core.context(lease)
    for held in core.journal.held(lease.id):
        addr = held.address
        if held.role == "bridge" and kernel.exists(addr) and kernel.driver_of(addr):
            log.warning("lease %s: bridge %s is on %s again; detaching it", lease.id, addr, kernel.driver_of(addr))
            kernel.detach(addr)
    for addr in ctx.endpoints:
        if kernel.exists(addr) and kernel.driver_of(addr) != be.driver:
            log.warning("lease %s: %s is on %s, not %s; binding it again", lease.id, addr,
                        kernel.driver_of(addr), be.driver)
            be.bind(ctx, addr)
    steps = [s for s in core.journal.steps(lease.id) if s.action == "hand-over"]
    if steps:
        # Unfinished, or done before the restart: applied (again; it is idempotent) and recorded done.
        record = be.hand_over(ctx) or steps[-1].record
        core.journal.done(lease.id, steps[-1].seq, record)
