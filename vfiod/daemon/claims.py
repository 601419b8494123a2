"""The policy's boot claims: persistent leases applied at start, before READY."""

from __future__ import annotations

import asyncio
import logging

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
