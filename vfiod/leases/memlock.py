"""The memlock grant: a lease's RLIMIT_MEMLOCK raise for the lessee's process, and
its return when the last lease granted to that process ends."""

from __future__ import annotations

import logging

from ..errors import VfiodError
from ..state import LeaseRow
from .core import LeaseCore

log = logging.getLogger("vfiod.leases")


class MemlockGrants:
    def __init__(self, core: LeaseCore) -> None:
        self.core = core

    def grant(self, lease: LeaseRow, pid: int, start: int | None = None) -> tuple[int, int] | None:
        """Apply the lease's memlock grant to process `pid`, if it runs as the lessee
        (`PermissionDenied` if not) and, given its `start`, is still that process, and record what to restore at release.  Returns
        the new (soft, hard) limits, or None if the process is gone."""
        if not lease.memlock:
            return None
        got = self.core.kernel.grant_memlock(pid, lease.memlock, lease.uid, start)
        if got is None:
            return None
        self.core.journal.record_grant(lease.id, got.pid, got.start, got.before)
        self.core.audit("memlock", lease.uid, lease.target, lease.id, lease.rule, "granted",
                        f"pid {pid}: {got.before} -> {got.after}")
        return got.after

    def restore(self, lease: LeaseRow) -> None:
        """Give the process of the lease's memlock grant back its limits, unless another
        lease still holds a grant for it, or it is gone."""
        grant = self.core.journal.grant_of(lease.id)
        if grant is None:
            return
        pid, start, before, shared = grant
        if shared:
            return
        try:
            if self.core.kernel.restore_memlock(pid, start, before):
                log.info("lease %s: RLIMIT_MEMLOCK of pid %s is back to %s", lease.id, pid, before)
        except VfiodError as e:
            log.warning("lease %s: %s", lease.id, e)
