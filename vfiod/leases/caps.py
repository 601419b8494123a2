"""A policy reload applies its duration caps to the leases already granted.

A rule's ``max_duration`` caps a whole lease from its grant time (``leases.cap``;
`Renew` never passes it).  After a reload, each granted lease is judged again for
its lessee with the terms it was granted on: where the rule that allows it now has
a ``max_duration`` that ends the lease sooner than its recorded cap (or the lease
had none), the cap becomes grant time + that duration, and the lease's expiry
moves to it if it was later.  A lease already past its new cap goes through the
revoke ladder as ``expired`` (its holders get the policy's grace, then its
signals).  A reload never moves a cap later: a lease keeps the end it was
granted with, or an earlier one."""

from __future__ import annotations

import logging
import time

from ..errors import VfiodError
from .core import Ended, Revoking
from .manager import LeaseManager
from ..policy import Policy, format_duration

log = logging.getLogger("vfiod.leases")


def apply_caps(manager: LeaseManager, policy: Policy, uid: int | None = None) -> list[Ended | Revoking]:
    """Recompute every granted lease's cap under `policy`; revoke (``expired``) those past it.
    `uid`: who reloaded the policy (the audit records')."""
    due: list[str] = []
    for lease in manager.leases():
        if lease.state != "granted":
            continue
        try:
            decision = manager.redecide(policy, lease)
        except VfiodError:
            continue                    # the reload's own judgement (revoke_disallowed) deals with it
        if not decision.allowed or not decision.max_duration:
            continue
        cap = lease.created + decision.max_duration
        if lease.cap and cap >= lease.cap:
            continue
        with manager.group_lock(lease.group):
            current = manager.journal.lease(lease.id)
            if current is None or current.state != "granted":
                continue
            expires = min(current.expires, cap) if current.expires else cap
            manager.journal.set_cap(lease.id, cap, expires)
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cap))
        detail = (f"max_duration {format_duration(decision.max_duration)} (rule {decision.rule}) from its grant: "
                  f"it ends at {when}")
        manager.audit("reload", uid, lease.target, lease.id, decision.rule, "capped", detail, group=lease.group)
        log.warning("lease %s of uid %s: the reloaded policy caps it: %s", lease.id, lease.uid, detail)
        if cap <= manager.clock():
            due.append(lease.id)
    out: list[Ended | Revoking] = []
    for lease_id in due:
        try:
            out.append(manager.revoke(lease_id, "expired"))
        except VfiodError as e:
            log.error("revoking lease %s past its new cap: %s", lease_id, e)
    return out
