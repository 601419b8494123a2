"""The policy's boot claims: persistent leases applied at start, before READY, and the
early ones written out for udev (`vfiod.early`) whenever a policy loads."""

from __future__ import annotations

import asyncio
import logging

from .. import early
from ..errors import VfiodError
from ..leases import LeaseManager
from ..policy import Caller, PolicyStore
from ..terms import LeaseTerms
from .snapshot import Snapshot

log = logging.getLogger("vfiod")


async def apply_claims(manager: LeaseManager, policy_store: PolicyStore, snapshot: Snapshot) -> None:
    """The policy's boot claims, as persistent leases; one that fails is logged and skipped."""
    for claim in policy_store.current.claims:
        caller = Caller.from_uid(claim.uid)
        try:
            existing = [lease for lease in manager.leases()
                        if lease.target == claim.target and lease.uid == claim.uid]
            if existing:
                log.info("claim %s for uid %s: already held (lease %s)", claim.target, claim.uid,
                         existing[0].id)
                continue
            lease = await asyncio.get_running_loop().run_in_executor(
                None, manager.request, caller, claim.target, claim.backend, LeaseTerms(persistent=True), None)
            log.info("claim %s for %s applied: lease %s", claim.target, claim.user, lease.id)
        except VfiodError as e:
            log.error("claim %s for %s (%s) not applied: %s", claim.target, claim.user, claim.source, e)
        except Exception:
            # A claim must never keep the daemon from starting: log it and go on.
            log.exception("claim %s for %s (%s) not applied: internal error", claim.target, claim.user,
                          claim.source)
    await asyncio.get_running_loop().run_in_executor(None, snapshot.refresh)


def publish_early(policy_store: PolicyStore, directory: str | None) -> None:
    """Write the loaded policy's early claims for udev to `directory` (the state
    directory's early.d).  Only a policy that loaded is written: a broken one leaves the
    last good claims in place, as it leaves the last good policy in force.  A failure is
    logged: the claims still apply when vfiod starts, only later in the boot."""
    if directory is None or policy_store.error is not None or policy_store.current.directory is None:
        return
    try:
        changed = early.publish(directory, early.early_claims(policy_store.current))
    except OSError as e:
        log.error("early claims not written to %s: %s (they apply when vfiod starts, not earlier)", directory,
                  e.strerror or e)
        return
    if changed:
        log.info("early claims for udev in %s: %s", directory, ", ".join(changed))
