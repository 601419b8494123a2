"""Leases of mediated devices: a new instance of ``mdev:PARENT/TYPE`` for each lease.

Granting (`MdevLeases.make`, then `LeaseManager.request`), step by step:

1. The type is there now (`NotFound`), the policy's mdev rules allow it
   (`PermissionDenied`), its parent can make one more (`Busy`).
2. vfiod chooses a UUID that is neither an instance nor defined by mdevctl, and
   journals it with the type and the boot id (the ``mdevs`` row) *before* the write.
3. ``create``: the kernel adds the instance and its emulated IOMMU group; the
   instance, its type and its group are read back from the kernel.
4. The lease is recorded (state ``granting``) with that group and no PCI device,
   and goes the way of every lease (`moves.Moves.grant`: the kernel's word that
   nobody holds the group, then the vfio backend's hand-over of ``/dev/vfio/N``
   and the container, exactly as for a PCI group); state ``granted``.

Giving back (`remove_instance`, from `Moves.undo`, after the hand-over is taken
back): the instance is removed (a journaled step) — only while the kernel shows it
under that UUID, with that type, in the boot it was made in, and mdevctl does not
define it.  Anything else is left alone: an instance whose UUID vfiod did not journal,
or that mdevctl defines, is never removed.

After a crash, the journal says which instance a grant was making: an ``mdevs``
row without a lease is a grant cut short, and `sweep` removes its instance (if the
kernel shows it as above) and the row; a ``granting`` lease is rolled back, which
removes it too; a kept lease stays while its instance is there (`instance_state`),
and ends as ``removed`` once it is not — without touching the group's node, whose
number the kernel may have given to another group since.
"""

from __future__ import annotations

import logging
import secrets
import uuid as uuidlib

import attrs

from ..errors import BackendFailed, Busy, InvalidArgument, NotFound, PermissionDenied, VfiodError
from ..hookspecs import Backend
from ..policy import Caller, Decision
from ..state import HeldMdev, LeaseRow, Record
from ..sysfs.mdev import MdevKind
from ..terms import LeaseTerms
from .core import LeaseCore

log = logging.getLogger("vfiod.leases")

OURS, GONE, OTHER = "ours", "gone", "other"


def instance_state(core: LeaseCore, held: HeldMdev, group: int | None = None) -> tuple[str, str]:
    """Is the journaled instance vfiod's now, by the kernel's word?  (`OURS`, ""), (`GONE`,
    why) or (`OTHER`, why): the UUID is there but not the instance vfiod made (another type,
    another boot, defined by mdevctl, or in another group than `group`)."""
    now = core.kernel.mdev.instance(held.uuid)
    if now is None:
        return GONE, f"mdev {held.uuid} is gone"
    if held.uuid in core.kernel.mdev.mdevctl_defined():
        return OTHER, f"mdev {held.uuid} is defined by mdevctl: the admin's"
    if now.kind is None or str(now.kind) != held.kind:
        return OTHER, f"mdev {held.uuid} is of type {now.kind or 'unknown'} now, not {held.kind}"
    boot = core.reader.boot_id()
    if held.boot and boot and boot != held.boot:
        return OTHER, f"mdev {held.uuid} is not the instance vfiod made: the host was rebooted since"
    if group is not None and now.group != group:
        return OTHER, f"mdev {held.uuid} is in IOMMU group {now.group}, not {group}"
    return OURS, ""


def handed_record(core: LeaseCore, lease: LeaseRow, record: Record) -> Record:
    """The hand-over record to take back: an mdev lease whose instance is not the one it
    holds in its group any more leaves the group's node alone (its number may be another
    group's by now); the container's ACL entry is taken back all the same."""
    held = core.journal.mdev.of(lease.id)
    if held is None or instance_state(core, held, lease.group)[0] == OURS:
        return record
    return {k: v for k, v in record.items() if k != "node"}


def remove_instance(core: LeaseCore, held: HeldMdev, journaled: bool) -> str | None:
    """Remove the instance `held` names if the kernel shows it as vfiod's (`instance_state`);
    None when it is gone now or left alone, else what went wrong.  `journaled`: the lease
    has its row, and the removal is one of its steps."""
    state, why = instance_state(core, held)
    if state == GONE:
        return None
    if state == OTHER:
        log.warning("lease %s: %s; left alone", held.lease, why)
        return None
    try:
        if journaled:
            with core.step(held.lease, "remove-mdev", None, {"uuid": held.uuid, "type": held.kind}, "remove-mdev",
                           f"remove mdev {held.uuid}"):
                _remove(core, held)
        else:
            _remove(core, held)
            core.on_step("mdev-removed")
    except VfiodError as e:
        return str(e)
    return None


def _remove(core: LeaseCore, held: HeldMdev) -> None:
    core.kernel.mdev.remove(held.uuid)
    if core.kernel.mdev.instance(held.uuid) is not None:
        raise BackendFailed(f"mdev {held.uuid} is still there after its removal")


def sweep(core: LeaseCore) -> None:
    """Instances journaled by grants that were cut short before their lease was recorded:
    removed (where the kernel shows them as vfiod's), and their rows go."""
    for held in core.journal.mdev.all():
        if core.journal.lease(held.lease) is not None:
            continue
        error = remove_instance(core, held, journaled=False)
        if error:
            log.error("mdev %s of a grant cut short: %s; it stays journaled", held.uuid, error)
            continue
        core.journal.mdev.forget(held.lease)
        core.audit("reconcile", None, f"mdev:{held.kind}", held.lease, None, "rolled-back",
                   f"the grant was interrupted; mdev {held.uuid} removed or gone")


@attrs.frozen
class Made:
    """An instance made for a grant: its journal row, the group the kernel gave it, and
    the policy's verdict and backend it was made under."""

    held: HeldMdev
    group: int
    decision: Decision
    backend: Backend


class MdevLeases:
    """Steps 1 to 3 of a grant (`make`), and the undoing of a grant cut short before its
    lease was recorded (`forget`); `LeaseManager.request` records and grants the lease."""

    def __init__(self, core: LeaseCore) -> None:
        self.core = core

    def make(self, caller: Caller, kind: MdevKind, backend: str, terms: LeaseTerms) -> Made:
        m = self.core
        target = f"mdev:{kind}"
        found = m.kernel.mdev.type(kind)
        if found is None:
            e = NotFound(f"no mdev type {kind} on this host (`vfiod inspect` lists the parents and their types)")
            m.audit("request", caller.uid, target, None, None, "refused", str(e))
            raise e
        decision = m.policy_source().decide_mdev(caller, kind, backend, terms)
        if not decision.allowed:
            m.audit("request", caller.uid, target, None, decision.rule, "denied", decision.reason)
            raise PermissionDenied(decision.reason)
        be = m.backend(decision.backend or backend)
        if not be.uses_vfio:
            raise InvalidArgument(f"an mdev instance is used through VFIO: the {be.name} backend cannot hand it over")
        if found.available == 0:
            m.audit("request", caller.uid, target, None, decision.rule, "busy", "no instance available")
            raise Busy(f"mdev type {kind}: its parent can make no more instances now (available_instances is 0)")
        held = HeldMdev(secrets.token_hex(8), self._fresh_uuid(), kind.parent, kind.type, m.reader.boot_id())
        m.journal.mdev.intent(held)
        m.on_step("mdev-create-intent")
        try:
            m.kernel.mdev.create(kind, held.uuid)
            m.on_step("mdev-created")
            now = m.kernel.mdev.instance(held.uuid)
            if now is None or now.kind != kind or now.group is None:
                raise BackendFailed(f"mdev {held.uuid}: after the write to create, the kernel shows "
                                    + ("no such instance" if now is None else f"type {now.kind}, group {now.group}"))
        except VfiodError as e:
            self.forget(held)
            m.audit("grant", caller.uid, target, held.lease, decision.rule, "rolled-back", str(e))
            raise
        return Made(held, now.group, decision, be)

    def forget(self, held: HeldMdev) -> None:
        """A grant that ends before its lease is recorded: the instance goes, then its row."""
        error = remove_instance(self.core, held, journaled=False)
        if error:
            log.error("mdev %s: %s; it stays journaled and is removed at the next start", held.uuid, error)
            return
        self.core.journal.mdev.forget(held.lease)

    def _fresh_uuid(self) -> str:
        """A UUID that names no instance and no mdevctl definition."""
        taken = self.core.kernel.mdev.mdevctl_defined()
        while True:
            candidate = str(uuidlib.uuid4())
            if candidate not in taken and self.core.kernel.mdev.instance(candidate) is None:
                return candidate
