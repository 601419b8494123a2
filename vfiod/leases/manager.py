"""`LeaseManager`: the lifecycle of a lease, from the request to its end.

Granting, step by step:

1. Resolve the target to a group; ask the policy (`PermissionDenied`,
   `Protected`); plan: the endpoints, and the group's bridges that sit on a
   driver VFIO refuses (shpchp: the kernel then calls the group not viable),
   which are held unbound; endpoints in use on the host are `Busy` unless an
   admin passes ``force``.
2. Record the lease (state ``granting``) with every endpoint's original
   driver and driver_override.
3. Move the devices (`moves.Moves.grant`: check, bind, detach, hand over).
4. State ``granted``.

Any failure rolls back in reverse; the error names the device, the step and the
kernel's message.  A lease ends by `release` (its owner or root), `renew`'s
cap, expiry, its owner leaving the bus, a revoke, or a policy that no longer
allows it: each goes through `ladder.Ladder`, which gives the devices back at
once when nobody holds the group and asks, then ends, the holders otherwise.
`reconcile` makes the journal and the kernel agree on start."""

from __future__ import annotations

import logging
import secrets
import time
from typing import Callable, Mapping

import attrs

from ..address import PciAddress
from ..errors import BackendFailed, Busy, InvalidArgument, NotFound, NotViable, PermissionDenied, Protected, VfiodError
from ..hookspecs import Backend
from ..policy import Caller, Decision, Policy, Refusal, Resource, Target, format_duration, parse_target
from ..state import HeldDevice, Journal, LeaseRow
from ..sysfs import KERNELS_CHOICE, Holder, Kernel, claim_covers_devices, interface_address
from ..sysfs.early import early_bound
from ..terms import LeaseTerms
from ..topology import BRIDGE_DRIVERS, VFIO_DRIVERS, Device, Host
from .core import Ended, LeaseCore, Revoking
from .identity import record as record_identity
from .ladder import Ladder
from .mdev import OURS, MdevLeases, instance_state
from .memlock import MemlockGrants
from .moves import Moves
from .reconcile import reconcile
from .sriov import set_vf_count

log = logging.getLogger("vfiod.leases")

#: What keeps one group from a caller now (`LeaseManager._grant`): a pool tries its next member.
_GRANT_REFUSALS = (Busy, NotViable, PermissionDenied, Protected, NotFound)


def pool_refusal(pool: str, skipped: list[tuple[str, VfiodError]]) -> VfiodError:
    """Why no member of `pool` could be leased, each member's reason in order.  Its kind:
    busy when a member is only busy now (try again later), else denied when the policy
    refuses one, else not found (every member is gone or changed)."""
    kinds = {type(e) for _, e in skipped}
    kind: type[VfiodError] = (Busy if kinds & {Busy, NotViable} else
                              PermissionDenied if kinds & {PermissionDenied, Protected} else NotFound)
    why = "; ".join(f"{member}: {e.message}" for member, e in skipped) or "it has no members"
    return kind(f"pool {pool}: no member is free for you: {why}")


class LeaseManager(LeaseCore):
    """Owns every lease; all methods are thread-safe (see `LeaseCore`)."""

    def __init__(self, kernel: Kernel, journal: Journal, policy_source: Callable[[], Policy],
                 backends: dict[str, Backend], owner_alive: Callable[[LeaseRow], bool] | None = None,
                 on_step: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
                 on_ended: Callable[[Ended], None] | None = None):
        super().__init__(kernel, journal, policy_source, backends, owner_alive, on_step, clock, on_ended)
        self.memlock = MemlockGrants(self)
        self.moves = Moves(self, self.memlock.restore)
        self.ladder = Ladder(self, self.moves)
        self.mdevs = MdevLeases(self)
        self.sync_locked()             # before the first scan: a restart may find unbinds under way

    # ------------------------------------------------------------ queries

    def leases(self) -> list[LeaseRow]:
        return self.journal.leases()

    def get(self, lease_id: str) -> LeaseRow:
        lease = self.journal.lease(lease_id) if isinstance(lease_id, str) else None
        if lease is None:
            raise NotFound(f"no lease {lease_id!r}")
        return lease

    #: what an admin of the policy's admin_groups may do to another's lease: end it, read
    #: it; never renew it or open its devices (that would be a device the rules did not give)
    ADMIN_ACTIONS = ("release", "read")

    def owned(self, lease_id: str, caller: Caller, action: str) -> LeaseRow:
        """The lease, if `caller` may `action` it (its lessee, root, or for `ADMIN_ACTIONS` a
        delegated admin): the one rights check."""
        lease = self.get(lease_id)
        if not (caller.uid == lease.uid or caller.is_root or (caller.is_admin and action in self.ADMIN_ACTIONS)):
            if action == "release":
                self.audit("release", caller.uid, lease.target, lease.id, lease.rule, "denied", group=lease.group)
            raise PermissionDenied(f"lease {lease.id} belongs to uid {lease.uid}; you may not {action} it")
        return lease

    def lease_for_group(self, group: int) -> LeaseRow | None:
        return self.journal.lease_for_group(group)

    def host_for(self, target: str, policy: Policy) -> Host:
        """A snapshot holding the groups `target` can stand for (not the whole host).

        The target is parsed by the policy's one grammar (`InvalidArgument` or
        `InvalidAddress` for text that is no target); what it names and is not
        on the host is left for `Policy.resolve` to refuse with its reason."""
        reader = self.reader
        named, groups = self._groups_named(target, policy)
        if not groups:
            # Devices that are there but in no group (the IOMMU is off) are read all the
            # same, so the answer is "in no IOMMU group", not "no such device".
            return Host.from_raw([reader.read_device(a) for a in named if reader.node_of(a)], reader.facts())
        return Host.scan_groups(reader, groups)

    def _groups_named(self, target: str, policy: Policy) -> tuple[tuple[PciAddress, ...], set[int]]:
        """The devices `target` names by address (or interface), and the groups the kernel
        puts them in now, with the group it names by number: what `host_for` scans."""
        reader = self.reader
        named = policy.addresses_named(target)
        if not named and parse_target(target)[0] == "interface":
            found = interface_address(reader.roots.sysfs, target)
            named = (found,) if found else ()
        groups = {g for addr in named if (g := reader.group_of(addr)) is not None}
        number = policy.group_named(target)
        if number is not None:
            groups.add(number)
        return named, groups

    def holders(self, lease: LeaseRow) -> list[Holder]:
        return self.ladder.holders(lease)

    def revoke_waiting(self, lease_id: str) -> str:
        """Why the revoke of `lease_id` has not ended yet ("" if nothing keeps it)."""
        return self.ladder.waiting.get(lease_id, "")

    # ------------------------------------------------------------ grant

    def request(self, caller: Caller, target: str, backend: str = "",
                options: LeaseTerms | Mapping[str, object] | None = None, owner: str | None = None) -> LeaseRow:
        terms = LeaseTerms.from_options(options)
        try:
            parsed = parse_target(target)
        except VfiodError as e:
            self.audit("request", caller.uid, target, None, None, "refused", str(e))
            raise
        if parsed[0] == "mdev":
            made = self.mdevs.make(caller, parsed[1], backend, terms)
            with self.group_lock(made.group):
                existing = self.journal.lease_for_group(made.group)
                if existing is not None:        # the kernel gave a leased number: never hand it over
                    self.mdevs.forget(made.held)
                    raise Busy(f"IOMMU group {made.group} of the new mdev {made.held.uuid} is recorded for "
                               f"lease {existing.id}")
                lease = self.new_lease(made.held.lease, caller, made.group, f"mdev:{parsed[1]}", made.backend.name,
                                       terms, made.decision, owner)
                return self.grant(lease, [], None, made.decision, made.backend, caller)
        policy = self.policy_source()
        if parsed[0] != "pool":
            granted = self._grant_one_group(caller, target, backend, terms, owner, policy)
            if granted is not None:
                return granted
        host = self.host_for(target, policy)
        try:
            if parsed[0] != "pool":
                one = policy.resolve(host, target)
            else:
                candidates = policy.pool_candidates(host, parsed[1])
        except VfiodError as e:
            self.audit("request", caller.uid, target, None, None, "refused", str(e))
            raise
        if parsed[0] != "pool":
            return self._grant(caller, target, one, backend, terms, owner, policy)
        # A pool: its first member the caller may have and nobody holds.  Each member's own
        # refusal (audited) is kept for the answer when none is free.
        skipped: list[tuple[str, VfiodError]] = []
        for member, resolved, why in candidates:
            if resolved is None:        # its hardware changed, it is gone, or it spans groups: never leased
                self.audit("request", caller.uid, target, None, None, "skipped", f"{member.target}: {why}")
                skipped.append((member.target, NotFound(why)))
                continue
            try:
                return self._grant(caller, target, resolved, backend, terms, owner, policy, member.resource)
            except _GRANT_REFUSALS as e:
                skipped.append((member.target, e))
        raise pool_refusal(parsed[1], skipped)

    def _grant_one_group(self, caller: Caller, target: str, backend: str, terms: LeaseTerms, owner: str | None,
                         policy: Policy) -> LeaseRow | None:
        """A target whose devices the kernel puts in one group: that group's lock first, then
        one scan of it, which both resolves the target and is the fresh snapshot the grant
        acts on (`_grant` scans again under the lock).  None where the target names no group
        or several, or resolves to another group than the one locked (the kernel moved a
        device meanwhile): `request` then takes the general way."""
        _named, groups = self._groups_named(target, policy)
        if len(groups) != 1:
            return None
        (group,) = groups
        with self.group_lock(group):
            host = self.scan_groups([group])      # fresh, now that we hold the group
            try:
                resolved = policy.resolve(host, target)
            except VfiodError as e:
                self.audit("request", caller.uid, target, None, None, "refused", str(e))
                raise
            if resolved.group != group:
                return None
            return self._grant_locked(caller, target, resolved, backend, terms, owner, policy, host)

    def _grant(self, caller: Caller, target: str, resolved: Target, backend: str, terms: LeaseTerms,
               owner: str | None, policy: Policy, member: Resource | None = None) -> LeaseRow:
        """Steps 1 (from the group lock on) to 4 for the group `resolved` names; `member`: the
        pool member it is, whose hardware is checked again once the group is held."""
        with self.group_lock(resolved.group):
            return self._grant_locked(caller, target, resolved, backend, terms, owner, policy, None, member)

    def _grant_locked(self, caller: Caller, target: str, resolved: Target, backend: str, terms: LeaseTerms,
                      owner: str | None, policy: Policy, host: Host | None, member: Resource | None = None
                      ) -> LeaseRow:
        """`_grant` with the group's lock held; `host`: a scan of the group taken under it."""
        group = resolved.group
        existing = self.journal.lease_for_group(group)
        if existing is not None:
            self.audit("request", caller.uid, target, None, None, "busy", existing.id, group=group)
            whose = (f" (lease {existing.id}, uid {existing.uid})" if caller.is_admin or caller.uid == existing.uid
                     else " by another user")
            raise Busy(f"IOMMU group {group} is already leased{whose}")
        if host is None:
            host = self.scan_groups([group])      # fresh, now that we hold the group
        changed = member.problems(host) if member is not None else []
        if changed:
            self.audit("request", caller.uid, target, None, None, "refused", "; ".join(changed), group=group)
            raise NotFound("; ".join(changed))
        decision = policy.decide(host, caller, group, backend, terms)
        if not decision.allowed:
            self.audit("request", caller.uid, target, None, decision.rule, "denied", decision.reason, group=group)
            if decision.refusal is Refusal.PROTECTED:
                raise Protected(decision.reason)
            raise PermissionDenied(decision.reason)
        be = self.backend(decision.backend or backend)
        plan = self._plan(host, group, caller, terms)
        lease = self.new_lease(secrets.token_hex(8), caller, group, target, be.name, terms, decision, owner,
                               member=resolved.member)
        return self.grant(lease, plan, host, decision, be, caller)

    def new_lease(self, lease_id: str, caller: Caller, group: int, target: str, backend: str, terms: LeaseTerms,
                  decision: Decision, owner: str | None, member: str | None = None) -> LeaseRow:
        """The row of a lease about to be granted (state ``granting``), with the policy's terms."""
        now = self.clock()
        # A lease asked for no duration still ends at the rule's cap, if it has one.
        duration = terms.duration or int(decision.max_duration or 0)
        return LeaseRow(
            id=lease_id, group=group, uid=caller.uid, owner=owner, backend=backend,
            target=target, created=now, expires=now + duration if duration else 0.0,
            persistent=terms.persistent, state="granting", rule=decision.rule,
            memlock=decision.memlock, reset=decision.reset_on_release, grace=float(decision.revoke_grace),
            on_revoke=decision.on_revoke, revoke_others=decision.revoke_others,
            cap=now + decision.max_duration if decision.max_duration else 0.0,
            k8s_namespace=terms.k8s_namespace, member=member)

    def grant(self, lease: LeaseRow, plan: list[HeldDevice], host: Host | None, decision: Decision, be: Backend,
              caller: Caller) -> LeaseRow:
        """Record `lease` with the devices it holds (`plan`; none for an mdev) and move them
        (`Moves.grant`); roll back on any failure.  The group lock is held."""
        group, target = lease.group, lease.target
        with self.journal.tx():     # one commit: the lease, what it holds and what identifies it
            self.journal.create(lease, plan)
            if host is not None:
                record_identity(self, lease, host, plan)
        self.on_step("recorded")
        ctx = self.context(lease, host, decision)
        try:
            self.moves.grant(ctx, be)
        except VfiodError as e:
            self.moves.rollback(ctx, be)
            self.audit("grant", caller.uid, target, lease.id, decision.rule, "rolled-back", str(e), group=group)
            raise
        except Exception as e:
            log.exception("grant of group %s failed", group)
            self.moves.rollback(ctx, be)
            self.audit("grant", caller.uid, target, lease.id, decision.rule, "rolled-back", repr(e), group=group)
            raise BackendFailed(f"granting group {group} failed: {e}") from None
        lease = attrs.evolve(lease, state="granted")
        took = f" (member {lease.member})" if lease.member else ""
        with self.journal.tx():     # one commit: the lease is granted, and the audit trail says so
            self.journal.set_state(lease.id, "granted")
            self.audit("grant", caller.uid, target, lease.id, decision.rule, "granted",
                       f"group {group} via {be.name}{took}", group=group)
        self.on_step("granted")
        return lease

    def _plan(self, host: Host, group: int, caller: Caller, terms: LeaseTerms) -> list[HeldDevice]:
        """What the lease will hold: every endpoint, then every bridge of the group on a driver
        VFIO refuses (shpchp, say), which is held unbound for the lease."""
        endpoints, bridges = self.check_free(host, group, caller, terms)
        return [self._held(d, "endpoint") for d in endpoints] + [self._held(d, "bridge") for d in bridges]

    def _held(self, dev: Device, role: str) -> HeldDevice:
        """What to give `dev` back: the driver and override as the kernel has them now (the
        snapshot may not know the override: see SysfsReader._patient_read; no unbind of this
        group can be under way here).  A device udev bound early in this boot, on the
        kernel's word (`early_bound`), had no host driver: it goes back to the kernel's choice."""
        override = self.kernel.override_of(dev.addr)
        mark = early_bound(self.kernel.roots, dev.addr) if role == "endpoint" else None
        if mark is not None and dev.driver in (None, mark.driver):
            log.info("%s was bound to %s early (%s): giving it back means the kernel's choice",
                     dev.addr, mark.driver, mark.source or "an early claim")
            return HeldDevice(str(dev.addr), KERNELS_CHOICE, None, role)
        return HeldDevice(str(dev.addr), dev.driver, override, role)

    def check_free(self, host: Host, group: int, caller: Caller,
                   terms: LeaseTerms | None = None) -> tuple[list[Device], list[Device]]:
        """What keeps `group` from being leased now, whatever the policy says: `Busy` when a
        PF's VFs are leased or the host uses an endpoint, `NotViable` for a group of bridges
        only.  Returns the endpoints and the bridges a lease would hold."""
        terms = terms or LeaseTerms()
        g = host.groups.get(group)
        if g is None:
            raise NotFound(f"no IOMMU group {group}")
        endpoints = host.endpoints(g)
        if not endpoints:
            raise NotViable(f"group {group} has no endpoint to lease (only bridges and ports)")
        bridges = [host.devices[a] for a in g.members
                   if host.devices[a].is_bridge and host.devices[a].driver not in (None, *BRIDGE_DRIVERS)]
        reader = self.reader
        for dev in endpoints:
            # A PF leaves the host only when none of its VFs is leased: its driver
            # manages them, and unbinding it would pull them from their lessees.
            vf_leases = {lease.id for vf in dev.raw.virtfns
                         if (vg := reader.group_of(vf)) is not None and vg != group
                         and (lease := self.journal.lease_for_group(vg)) is not None}
            if vf_leases:
                raise Busy(f"{dev.addr} is an SR-IOV PF whose VFs are leased ({', '.join(sorted(vf_leases))}); "
                           "release them first")
        uses: list[str] = []
        for dev in endpoints:
            if dev.driver is None or dev.driver in VFIO_DRIVERS:
                continue
            uses.extend(f"{dev.addr}: {u}" for u in self.kernel.usage(dev.addr))
        if uses and not (caller.is_root and terms.force):
            raise Busy("in use on the host: " + "; ".join(uses)
                       + (" (root may pass force)" if not caller.is_root else " (pass force to override)"))
        return endpoints, bridges

    def grant_memlock(self, lease: LeaseRow, pid: int, start: int | None = None) -> tuple[int, int] | None:
        return self.memlock.grant(lease, pid, start)

    # ------------------------------------------------------------ the end of a lease

    def release(self, lease_id: str, caller: Caller | None = None, reason: str = "released") -> Ended | None:
        """Give the lease's devices back; None when processes still hold them and the
        revoke ladder took the lease over (it ends later, with `on_ended`)."""
        lease = self.owned(lease_id, caller, "release") if caller is not None else self.get(lease_id)
        if (lease.state != "revoking" and self.backend(lease.backend).uses_vfio
                and not claim_covers_devices(self.kernel.roots, self.endpoints(lease.id))):
            self.ladder.search(lease, fresh=True)       # before the group lock: the ladder reuses it
        with self.group_lock(lease.group):
            current = self.journal.lease(lease_id)
            if current is None:
                raise NotFound(f"no lease {lease_id!r}")
            return self.ladder.release(current, reason, caller.uid if caller else None)

    def renew(self, lease_id: str, caller: Caller, seconds: int) -> LeaseRow:
        lease = self.owned(lease_id, caller, "renew")
        if not isinstance(seconds, int) or seconds <= 0:
            raise InvalidArgument("renew takes a positive number of seconds")
        decision = self.redecide(self.policy_source(), lease, caller, attrs.evolve(lease.terms, duration=seconds))
        if not decision.allowed:
            raise PermissionDenied(decision.reason)
        if lease.state != "granted":
            raise Busy(f"lease {lease.id} is {lease.state}; it cannot be renewed")
        expires = self.clock() + seconds
        if lease.cap and expires > lease.cap + 0.5:
            left = max(0, int(lease.cap - self.clock()))
            raise PermissionDenied(f"the policy caps lease {lease.id} at {format_duration(int(lease.cap - lease.created))} "
                                   f"in all (rule {lease.rule}): it ends in {left} s; renew for at most {left} s")
        self.journal.set_expires(lease.id, expires)
        self.audit("renew", caller.uid, lease.target, lease.id, decision.rule, "renewed", f"{seconds} s",
                   group=lease.group)
        return attrs.evolve(lease, expires=expires)

    def _end_each(self, leases: list[LeaseRow], reason: str, what: str) -> list[Ended]:
        out = []
        for lease in leases:
            try:
                ended = self.release(lease.id, reason=reason)
            except VfiodError as e:
                log.error("%s lease %s: %s", what, lease.id, e)
                continue
            if ended is not None:
                out.append(ended)
        return out

    def expire_due(self) -> list[Ended]:
        """End the leases whose time is up, and (the daemon calls this every second) the mdev
        leases whose instance the kernel no longer shows as theirs (``removed``)."""
        now = self.clock()
        granted = [lease for lease in self.journal.leases() if lease.state == "granted"]
        gone = [lease for lease in granted if (held := self.journal.mdev.of(lease.id)) is not None
                and instance_state(self, held, lease.group)[0] != OURS]
        return (self._end_each([lease for lease in granted if lease.expires and lease.expires <= now],
                               "expired", "expiring")
                + self._end_each(gone, "removed", "ending"))

    def end_owned_by(self, owner: str, reason: str = "disconnected") -> list[Ended]:
        return self._end_each([lease for lease in self.journal.leases()
                               if lease.owner == owner and not lease.persistent and lease.state == "granted"],
                              reason, f"ending (owner {owner})")

    def revoke(self, lease_id: str, reason: str, caller: Caller | None = None) -> Ended | Revoking:
        """Take a lease back whether or not its holders let go (root, or vfiod itself):
        the revoke ladder (`vfiod.leases.ladder`)."""
        return self.ladder.revoke(lease_id, reason, caller)

    def advance(self, lease_id: str) -> Ended | Revoking | None:
        return self.ladder.advance(lease_id)

    def advance_all(self) -> list[Ended]:
        return self.ladder.advance_all()

    def revoke_disallowed(self, policy: Policy, uid: int | None = None) -> list[Ended | Revoking]:
        return self.ladder.revoke_disallowed(policy, uid)

    def disallowed(self, policy: Policy) -> list[tuple[LeaseRow, str]]:
        return self.ladder.disallowed(policy)

    def reconcile(self) -> list[Ended]:
        """Make sysfs and the journal agree again; returns the leases that ended."""
        return reconcile(self, self.moves, self.ladder)

    # ------------------------------------------------------------ SR-IOV

    def set_vf_count(self, caller: Caller, pf: PciAddress, count: int) -> int:
        return set_vf_count(self, caller, pf, count)
