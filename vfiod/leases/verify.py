"""What vfiod does when the kernel shows other devices than a lease holds: at start, and on hotplug.

A lease is journaled with what identifies each device it holds — vendor:device,
subsystem vendor:device, class, and the PCIe Device Serial Number where the
device has that extended capability (0x0003) — and with the members of its IOMMU
group (`vfiod.leases.identity.record`, at the grant, before the first write).  vfiod acts only on what
the kernel says now: before the journal's leases are reconciled at start, and
whenever a held device is added or changes driver, each lease is judged (`vfiod.leases.identity.judge`):

* a held device that is gone ends the lease as ``removed``;
* a held device whose identity is not the one recorded ends it as ``replaced``;
* a group whose members are not the ones recorded (or a held device now in
  another group) ends it as ``group-changed``;
* a lease journaled before identities were recorded (journal schema < 6) whose
  devices all sit on the lease's driver now (the kernel kept them: vfiod was
  restarted, the host was not) has the identity read now recorded and stays;
  one whose devices do not ends as ``unverified``: nothing says they are the
  devices that were leased.

Such a lease ends *hands off* (`end_hands_off`): only the devices verified now
and still on the lease's driver are given back; a replaced, removed or unverified
device is not touched (no unbind, no override write).

A kept lease (persistent, or its owner still on the bus) whose endpoints are not
all on its driver at start (`rebind_verdict`):

* the same boot as when vfiod last reconciled (the kernel's boot id,
  ``/proc/sys/kernel/random/boot_id``, recorded in the journal): someone moved
  them while vfiod was down.  As at run time, the lease ends as ``tampered``
  and the group goes back as it was before the lease;
* a new boot (or no boot id recorded yet): the kernel probed them at boot.
  Before they are bound again, the checks of a new grant run: the policy for the
  lessee with the lease's terms, protection, and the in-use check (``force`` is
  not remembered: a device the host uses now stays with the host).  A refusal
  ends the lease hands off as ``denied``, ``protected`` or ``in-use``.

What passes is reconciled as before (`LeaseManager.reconcile`): a persistent
lease is bound again before the daemon reports ready.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ..address import PciAddress
from .core import Ended
from .identity import Verdict, judge, on_lease_driver
from .mdev import handed_record
from .manager import LeaseManager
from ..policy import Caller, Refusal
from ..topology import VFIO_DRIVERS

if TYPE_CHECKING:
    from ..hookspecs import Backend
    from ..state import LeaseRow

log = logging.getLogger("vfiod.leases")

#: Why a lease ends at start when the checks of a new grant refuse binding it again.
REBIND_REASONS = ("denied", "protected", "in-use")


def rebind_verdict(manager: LeaseManager, lease: LeaseRow, be: Backend, same_boot: bool) -> Verdict | None:
    """A kept lease whose endpoints are not all on its driver: may they be bound again?"""
    held = manager.journal.held(lease.id)
    off = [h for h in held if h.role == "endpoint" and not on_lease_driver(manager, h, be)]
    if not off:
        return None
    where = ", ".join(f"{h.addr} on {manager.kernel.driver_of(PciAddress.parse(h.addr)) or 'no driver'}" for h in off)
    if same_boot:
        return Verdict("tampered", f"{where} while vfiod was down, and the host was not rebooted: moved behind "
                                   f"vfiod's back (the lease keeps them on {be.driver})")
    host = manager.scan_groups([lease.group])
    decision = manager.policy_source().decide(host, Caller.from_uid(lease.uid), lease.group, lease.backend,
                                              lease.terms)
    verified = frozenset(h.addr for h in held)
    if not decision.allowed:
        reason = "protected" if decision.refusal is Refusal.PROTECTED else "denied"
        return Verdict(reason, f"binding {where} again is refused: {decision.reason}", verified)
    uses = [f"{h.addr}: {u}" for h in off
            if (drv := manager.kernel.driver_of(PciAddress.parse(h.addr))) is not None and drv not in VFIO_DRIVERS
            for u in manager.kernel.usage(PciAddress.parse(h.addr))]
    if uses:
        return Verdict("in-use", "the host uses them now: " + "; ".join(uses), verified)
    return None


def end_hands_off(manager: LeaseManager, lease: LeaseRow, verdict: Verdict, event: str) -> Ended:
    """End `lease` for `verdict`: give back only the devices verified now and still where the
    lease put them; leave every other device as the kernel has it."""
    be = manager.backends.get(lease.backend)
    held = manager.journal.held(lease.id)
    ctx = manager.context(lease)
    log.warning("lease %s of uid %s ends (%s): %s", lease.id, lease.uid, verdict.reason, verdict.why)
    errors: list[str] = []
    if be is not None:
        for st in reversed(manager.journal.steps(lease.id)):
            if st.action == "hand-over":
                try:
                    be.take_back(ctx, handed_record(manager, lease, st.record))
                except Exception as e:
                    errors.append(f"taking back group {lease.group}: {e}")
    left = []
    for h in [h for h in reversed(held) if h.role == "bridge"] + [h for h in held if h.role != "bridge"]:
        addr = PciAddress.parse(h.addr)
        if h.addr not in verdict.verified or not on_lease_driver(manager, h, be):
            left.append(h.addr)
            continue
        try:
            if h.role == "bridge":
                manager.kernel.restore(addr, h.driver, h.override)
            elif be is not None:
                be.unbind(ctx, addr, h)
        except Exception as e:
            errors.append(f"{addr}: {e}")
    if left:
        log.warning("lease %s: %s left as the kernel has %s (not verified as the lease's, or not where the "
                    "lease put %s)", lease.id, ", ".join(left), "it" if len(left) == 1 else "them",
                    "it" if len(left) == 1 else "them")
    if errors:
        log.error("lease %s: giving back its verified devices: %s", lease.id, "; ".join(errors))
    manager.memlock.restore(lease)
    manager.journal.delete(lease.id)
    detail = verdict.why + (f"; left untouched: {', '.join(left)}" if left else "") + \
        (f"; errors: {'; '.join(errors)}" if errors else "")
    manager.audit(event, None, lease.target, lease.id, lease.rule, verdict.reason, detail, group=lease.group)
    ended = Ended(lease=lease, reason=verdict.reason)
    manager.on_ended(ended)
    return ended


def check(manager: LeaseManager, lease_id: str, same_boot: bool | None, event: str) -> Ended | None:
    """Judge one lease (at start: `same_boot` says whether the host was rebooted since
    vfiod last ran; None on a hotplug event, where no rebinding is judged) and end it
    when it cannot stand."""
    lease = manager.journal.lease(lease_id)
    if lease is None:
        return None
    tampered = None
    with manager.group_lock(lease.group):
        lease = manager.journal.lease(lease_id)
        if lease is None:
            return None
        verdict = judge(manager, lease)
        be = manager.backends.get(lease.backend)
        if (verdict is None and same_boot is not None and be is not None and lease.state == "granted"
                and (lease.persistent or manager.owner_alive(lease))):
            verdict = rebind_verdict(manager, lease, be, same_boot)
            if verdict is not None and verdict.reason == "tampered":
                tampered, verdict = verdict, None
        if verdict is not None:
            return end_hands_off(manager, lease, verdict, event)
    if tampered is not None:
        # The same device, moved by someone else: as at run time, the group goes back whole.
        log.warning("lease %s of uid %s ends (tampered): %s", lease.id, lease.uid, tampered.why)
        return manager.release(lease.id, None, "tampered")
    return None


def reconcile_at_start(manager: LeaseManager) -> list[Ended]:
    """Judge every journaled lease against the kernel as it is now, then reconcile the rest
    (`LeaseManager.reconcile`); record this boot's id.  Returns the leases that ended."""
    boot = manager.reader.boot_id()
    same_boot = boot is not None and boot == manager.journal.meta("boot_id")
    out: list[Ended] = []
    for lease in manager.journal.leases():
        try:
            ended = check(manager, lease.id, same_boot, "reconcile")
        except Exception as e:
            # One lease that cannot be judged must not keep the daemon from serving the rest.
            log.error("lease %s could not be checked against the kernel (%s: %s); it stays recorded", lease.id,
                      type(e).__name__, e)
            continue
        if ended is not None:
            out.append(ended)
    out.extend(manager.reconcile())
    if boot is not None:
        manager.journal.set_meta("boot_id", boot)
    return out
