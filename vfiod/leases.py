"""Leases: take a whole IOMMU group from the host, hand it over, give it back exactly.

Pure domain code (no bus, no udev).  The names used throughout: ``addr`` is a
`PciAddress` (a key), ``device`` a `topology.Device` (a snapshot), ``held``
a `state.Held` (the journal's record of a device before the lease).

Granting, step by step (each step is journaled as an intent before it runs
and as done after; an uncommitted step counts as failed):

1. Resolve the target to a group; ask the policy (`PermissionDenied`,
   `Protected`); plan: the endpoints, and the group's bridges that sit on a
   driver VFIO refuses (shpchp: the kernel then calls the group not viable),
   which are held unbound; endpoints in use on the host are `Busy` unless an
   admin passes ``force``.
2. Record the lease (state ``granting``) with every endpoint's original
   driver and driver_override.
3. ``backend.check``.
4. ``backend.bind`` each endpoint, in address order; detach each planned bridge.
5. ``backend.hand_over`` (journaled with its undo record first).
6. State ``granted``.

Any failure rolls back in reverse: ``take_back`` of a begun hand-over, then
``unbind`` (restore) of every bridge and endpoint, the failed one included
(endpoints in address order, the kernel's boot-time probe order, so network
interfaces get their old names back where no udev renames them); the error
names the device, the step and the kernel's message.  Releasing is the same
walk backwards (state ``releasing``).  On start, `reconcile` rolls back every
``granting`` lease, finishes every ``releasing`` one, and keeps ``granted``
ones that are persistent or whose owner is still there.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from typing import Callable, Iterable, Mapping

import attrs

from .address import PciAddress
from .hookspecs import Backend
from .identity import record as record_identity
from .errors import (BackendFailed, Busy, InvalidArgument, NotFound, NotViable, PermissionDenied,
                     Protected, VfiodError)
from .policy import Caller, Decision, Policy, Refusal, format_duration
from .state import Held, Journal, LeaseRow, Record
from .sysfs import Kernel, SysfsReader
from .sysfs.holders import Holder, find_holders, signal_holder
from .sysfs.write import Unbinding
from .topology import BRIDGE_DRIVERS, VFIO_DRIVERS, Host

log = logging.getLogger("vfiod.leases")


def _short(text: str | None, limit: int = 200) -> str:
    """`text` for a log line: quoted, and cut where a caller sent a lot of it."""
    return "-" if text is None else repr(text if len(text) <= limit else text[:limit] + "…")
audit_log = logging.getLogger("vfiod.audit")


@attrs.frozen
class LeaseContext:
    """What a backend hook is told about the lease it works on.

    `decision` is the policy's verdict while a lease is granted, and None when
    the lease is taken from the journal (a release, a restart, a revocation):
    hooks that run then must not need it.

    `handed_over` is this lease's hand-over record as journaled before (a kept
    lease whose hand-over is applied again after a restart), None on a first
    grant.  `container_acl_uids` are the uids for which another lease still
    holds an ACL entry on the container that vfiod added (the hand-over records
    of the other leases say so): such an entry is shared, and stays until the
    last of them ends."""

    lease: LeaseRow
    endpoints: tuple[PciAddress, ...]
    kernel: Kernel
    decision: Decision | None
    host: Host
    handed_over: Record | None = None
    container_acl_uids: frozenset[int] = frozenset()


@attrs.frozen
class Ended:
    """A lease that ended, and why (released, expired, disconnected, removed, …)."""

    lease: LeaseRow
    reason: str


@attrs.frozen
class Revoking:
    """A lease on the revoke ladder, and who still holds its group."""

    lease: LeaseRow
    holders: tuple[Holder, ...]


#: Seconds between the SIGTERM and the SIGKILL of a holder the ladder ends.
KILL_AFTER = 3.0
#: Why a lease may end; a revoke for another reason (an admin's words, "policy") ends it as "revoked".
END_REASONS = ("released", "expired", "disconnected", "owner-gone", "removed", "tampered", "shutdown",
               "interrupted")
#: How long a revoked lease whose holders are gone may wait for its unbinds to return.
_SETTLE = 2.0


class LeaseManager:
    """Owns every lease; all methods are thread-safe.

    Requests for one group are serialised; requests for different groups run
    in parallel.  `on_step(name)` is called after each journaled step (the
    crash tests kill the process there)."""

    def __init__(self, kernel: Kernel, journal: Journal, policy_source: Callable[[], Policy],
                 backends: dict[str, Backend], owner_alive: Callable[[LeaseRow], bool] | None = None,
                 on_step: Callable[[str], None] | None = None, clock: Callable[[], float] = time.time,
                 on_ended: Callable[[Ended], None] | None = None):
        self.kernel = kernel
        self.reader = SysfsReader(kernel.roots)      # one reader: it remembers what cannot change
        self.journal = journal
        self.policy_source = policy_source
        self.backends = backends
        self.owner_alive = owner_alive or (lambda lease: False)
        self.on_step = on_step or (lambda name: None)
        self.on_ended = on_ended or (lambda ended: None)
        self.clock = clock
        self._locks: dict[int, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.on_revoking: Callable[[LeaseRow], None] = lambda lease: None
        # Send a signal to every process of a transient scope (the daemon asks systemd); False if it could not.
        self.end_scope: Callable[[str, int], bool] = lambda scope, sig: False
        self.kill_after = KILL_AFTER
        self._unbinds: dict[str, list[Unbinding]] = {}     # lease id -> the unbinds the ladder began
        self._told: set[tuple[str, str]] = set()            # (lease id, what) already logged
        self._sync_locked()             # before the first scan: a restart may find unbinds under way

    # ------------------------------------------------------------ helpers

    def scan(self) -> Host:
        return Host.scan(self.reader)

    def scan_groups(self, groups: Iterable[int]) -> Host:
        return Host.scan_groups(self.reader, groups)

    def host_for(self, target: str, policy: Policy) -> Host:
        """A snapshot holding the groups `target` can stand for (not the whole host).

        The target is parsed by the policy's one grammar (`InvalidArgument` or
        `InvalidAddress` for text that is no target); what it names and is not
        on the host is left for `Policy.resolve` to refuse with its reason."""
        reader = self.reader
        groups = {g for addr in policy.addresses_named(target) if (g := reader.group_of(addr)) is not None}
        number = policy.group_named(target)
        if number is not None:
            groups.add(number)
        if not groups:
            return Host.from_raw([], reader.facts())
        return Host.scan_groups(reader, groups)

    def is_busy(self, group: int) -> bool:
        """Is a grant or release of `group` under way (its devices are moving on purpose)?"""
        with self._locks_guard:
            lock = self._locks.get(group)
        return lock is not None and lock.locked()

    def group_of(self, addr: PciAddress) -> int | None:
        return self.reader.group_of(addr)

    def _group_lock(self, group: int) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(group, threading.Lock())

    def _backend(self, name: str) -> Backend:
        try:
            return self.backends[name]
        except KeyError:
            raise InvalidArgument(f"unknown backend {name!r} (known: {', '.join(sorted(self.backends))})") from None

    def _audit(self, event: str, caller_uid: int | None, target: str | None, lease_id: str | None,
               rule: str | None, outcome: str, detail: str = "", group: int | None = None) -> None:
        # The same record three ways: a row of the journal's audit table (a repeated refusal
        # counted on its first row), a log line, and structured fields for the systemd journal
        # (``journalctl VFIOD_OUTCOME=denied``; the daemon sends them where journald runs).
        try:
            first = self.journal.audit(event, caller_uid, target, lease_id, rule, outcome, detail)
        except Exception as e:     # the audit trail must never turn a success into a failure
            log.error("cannot write the audit record: %s: %s", type(e).__name__, e)
            first = True
        if first:                  # a repeated refusal is counted on its first row, and logged once
            fields = {"VFIOD_EVENT": event, "VFIOD_UID": caller_uid, "VFIOD_TARGET": target,
                      "VFIOD_LEASE": lease_id, "VFIOD_GROUP": group, "VFIOD_RULE": rule,
                      "VFIOD_OUTCOME": outcome, "VFIOD_DETAIL": detail or None}
            audit_log.info("%s uid=%s target=%s lease=%s rule=%s outcome=%s%s", event, caller_uid, _short(target),
                           lease_id or "-", rule or "-", outcome, f" detail={_short(detail)}" if detail else "",
                           extra={"journal_fields": {k: v for k, v in fields.items() if v is not None}})

    def _step(self, name: str) -> None:
        self.on_step(name)

    def context(self, lease: LeaseRow, host: Host | None = None, decision: Decision | None = None) -> LeaseContext:
        held = self.journal.held(lease.id)
        if host is None:
            host = Host.from_raw([], self.reader.facts())
        handed = [s.record for s in self.journal.steps(lease.id) if s.action == "hand-over"]
        return LeaseContext(lease=lease, endpoints=tuple(PciAddress.parse(h.addr) for h in held
                                                         if h.role == "endpoint"),
                            kernel=self.kernel, decision=decision, host=host,
                            handed_over=handed[-1] if handed else None,
                            container_acl_uids=self._container_acl_uids(lease.id))

    def _container_acl_uids(self, lease_id: str) -> frozenset[int]:
        """The uids whose container ACL entry, added by vfiod, a lease other than
        `lease_id` holds (its hand-over record, journaled or done, says ``acl``)."""
        uids = set()
        for other in self.journal.leases():
            if other.id == lease_id:
                continue
            for st in self.journal.steps(other.id):
                acl = st.record.get("acl") if st.action == "hand-over" else None
                if isinstance(acl, int) and not isinstance(acl, bool):
                    uids.add(acl)
        return frozenset(uids)

    # ------------------------------------------------------------ queries

    def leases(self) -> list[LeaseRow]:
        return self.journal.leases()

    def get(self, lease_id: str) -> LeaseRow:
        lease = self.journal.lease(lease_id) if isinstance(lease_id, str) else None
        if lease is None:
            raise NotFound(f"no lease {lease_id!r}")
        return lease

    def lease_for_group(self, group: int) -> LeaseRow | None:
        return self.journal.lease_for_group(group)

    # ------------------------------------------------------------ grant

    def request(self, caller: Caller, target: str, backend: str = "", options: Mapping[str, object] | None = None,
                owner: str | None = None) -> LeaseRow:
        options = dict(options or {})
        for key in options:
            if key not in ("duration", "persistent", "force", "scope", "k8s_namespace"):
                raise InvalidArgument(f"unknown option {key!r} (known: duration, persistent, force, scope, k8s_namespace)")
        policy = self.policy_source()
        host = self.host_for(target, policy)
        try:
            resolved = policy.resolve(host, target)
        except VfiodError as e:
            self._audit("request", caller.uid, target, None, None, "refused", str(e))
            raise
        group = resolved.group
        with self._group_lock(group):
            existing = self.journal.lease_for_group(group)
            if existing is not None:
                self._audit("request", caller.uid, target, None, None, "busy", existing.id, group=group)
                whose = (f" (lease {existing.id}, uid {existing.uid})" if caller.is_admin or caller.uid == existing.uid
                         else " by another user")
                raise Busy(f"IOMMU group {group} is already leased{whose}")
            host = self.scan_groups([group])      # fresh, now that we hold the group
            decision = policy.decide(host, caller, group, backend, options)
            if not decision.allowed:
                self._audit("request", caller.uid, target, None, decision.rule, "denied", decision.reason,
                            group=group)
                if decision.refusal is Refusal.PROTECTED:
                    raise Protected(decision.reason)
                raise PermissionDenied(decision.reason)
            be = self._backend(decision.backend or backend)
            plan = self._plan(host, group, caller, options)
            now = self.clock()
            # A lease asked for no duration still ends at the rule's cap, if it has one.
            asked = options.get("duration") or 0          # `decide` refused anything but seconds
            duration = (asked if isinstance(asked, int) else 0) or int(decision.max_duration or 0)
            lease = LeaseRow(
                id=secrets.token_hex(8), group=group, uid=caller.uid, owner=owner, backend=be.name,
                target=target, created=now, expires=now + duration if duration else 0.0,
                persistent=bool(options.get("persistent")), state="granting", rule=decision.rule,
                memlock=decision.memlock, reset=decision.reset_on_release, grace=float(decision.revoke_grace),
                on_revoke=decision.on_revoke, revoke_others=decision.revoke_others,
                cap=now + decision.max_duration if decision.max_duration else 0.0,
                k8s_namespace=_namespace(options))
            self.journal.create(lease, plan)
            record_identity(self, lease, host, plan)      # which devices these are (vfiod.identity)
            self._step("recorded")
            ctx = LeaseContext(lease=lease, endpoints=tuple(PciAddress.parse(h.addr) for h in plan
                                                            if h.role == "endpoint"),
                               kernel=self.kernel, decision=decision, host=host,
                               container_acl_uids=self._container_acl_uids(lease.id))
            try:
                self._grant(ctx, be)
            except VfiodError as e:
                self._rollback(ctx, be)
                self._audit("grant", caller.uid, target, lease.id, decision.rule, "rolled-back", str(e), group=group)
                raise
            except Exception as e:
                log.exception("grant of group %s failed", group)
                self._rollback(ctx, be)
                self._audit("grant", caller.uid, target, lease.id, decision.rule, "rolled-back", repr(e), group=group)
                raise BackendFailed(f"granting group {group} failed: {e}") from None
            lease = attrs.evolve(lease, state="granted")
            self.journal.set_state(lease.id, "granted")
            self._step("granted")
            self._audit("grant", caller.uid, target, lease.id, decision.rule, "granted",
                        f"group {group} via {be.name}", group=group)
            return lease

    def _plan(self, host: Host, group: int, caller: Caller, options: Mapping[str, object]) -> list[Held]:
        """What the lease will hold: every endpoint, then every bridge of the group on a driver
        VFIO refuses (shpchp, say), which is held unbound for the lease."""
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
        if uses and not (caller.is_admin and options.get("force")):
            raise Busy("in use on the host: " + "; ".join(uses)
                       + (" (an admin may pass force)" if not caller.is_admin else " (pass force to override)"))
        # The override as the kernel has it now (the snapshot may not know it: see
        # SysfsReader._patient_read); no unbind of this group can be under way here.
        return ([Held(str(d.addr), d.driver, self.kernel.override_of(d.addr)) for d in endpoints]
                + [Held(str(d.addr), d.driver, self.kernel.override_of(d.addr), "bridge") for d in bridges])

    def _grant(self, ctx: LeaseContext, be: Backend) -> None:
        lid = ctx.lease.id
        be.check(ctx)
        for addr in ctx.endpoints:
            seq = self.journal.intent(lid, "bind", str(addr), {"driver": be.driver})
            self._step(f"bind-intent:{addr}")
            try:
                be.bind(ctx, addr)
            except VfiodError as e:
                self.journal.failed(lid, seq, str(e))
                raise type(e)(f"step {seq} (bind {addr} to {be.driver}): {e}") from None
            self.journal.done(lid, seq)
            self._step(f"bind-done:{addr}")
        for held in self.journal.held(lid):
            if held.role != "bridge":
                continue
            addr = PciAddress.parse(held.addr)
            seq = self.journal.intent(lid, "detach-bridge", held.addr)
            self._step(f"detach-intent:{addr}")
            try:
                self.kernel.detach(addr)
            except VfiodError as e:
                self.journal.failed(lid, seq, str(e))
                raise type(e)(f"step {seq} (detach bridge {addr} from {held.driver}): {e}") from None
            self.journal.done(lid, seq)
            self._step(f"detach-done:{addr}")
        record = be.plan_hand_over(ctx)
        seq = self.journal.intent(lid, "hand-over", None, record)
        self._step("hand-over-intent")
        try:
            record = be.hand_over(ctx) or record
        except VfiodError as e:
            self.journal.failed(lid, seq, str(e))
            raise type(e)(f"step {seq} (hand over group {ctx.lease.group}): {e}") from None
        self.journal.done(lid, seq, record)
        self._step("hand-over-done")

    def _undo(self, ctx: LeaseContext, be: Backend, reset: bool = False) -> list[str]:
        """take_back every begun hand-over, reset the endpoints if asked, then
        restore every device."""
        errors: list[str] = []
        steps = self.journal.steps(ctx.lease.id)
        for st in reversed(steps):
            if st.action == "hand-over":
                try:
                    be.take_back(ctx, st.record)
                    self._step("taken-back")
                except Exception as e:
                    errors.append(f"taking back group {ctx.lease.group}: {e}")
        held_all = self.journal.held(ctx.lease.id)
        if reset:
            self._reset_endpoints(ctx, held_all)
        # Bridges first (the reverse of the grant); then the endpoints in address order,
        # which is the kernel's probe order at boot: where no udev renames interfaces,
        # they get back the names they had (eth0 stays eth0).
        order = [h for h in reversed(held_all) if h.role == "bridge"] + \
                [h for h in held_all if h.role != "bridge"]
        for held in order:
            addr = PciAddress.parse(held.addr)
            if not self.kernel.exists(addr):
                continue        # gone (removed): nothing to give back
            try:
                if held.role == "bridge":
                    self.kernel.restore(addr, held.driver, held.override)
                else:
                    be.unbind(ctx, addr, held)
                self._step(f"restored:{addr}")
            except Exception as e:
                errors.append(f"{addr}: {e}")
        return errors

    def _reset_endpoints(self, ctx: LeaseContext, held_all: Iterable[Held]) -> None:
        """The policy's reset on release: each endpoint is reset while the lessee has
        let go and before a host driver sees it again.  A failed reset is logged and
        audited, never a reason to keep a device from its driver."""
        for held in held_all:
            addr = PciAddress.parse(held.addr)
            if held.role != "endpoint" or not self.kernel.exists(addr):
                continue
            try:
                method = self.kernel.reset(addr)
                self._step(f"reset:{addr}")
                log.info("lease %s: %s reset (%s)", ctx.lease.id, addr, method)
            except Exception as e:
                log.warning("lease %s: %s was not reset: %s", ctx.lease.id, addr, e)
                self._audit("reset", None, str(addr), ctx.lease.id, ctx.lease.rule, "failed", str(e),
                            group=ctx.lease.group)

    def _rollback(self, ctx: LeaseContext, be: Backend) -> None:
        errors = self._undo(ctx, be)
        if errors:
            # Keep the lease recorded as releasing: reconciliation tries again; no lease is lost.
            self.journal.set_state(ctx.lease.id, "releasing")
            log.error("rollback of group %s incomplete: %s", ctx.lease.group, "; ".join(errors))
            return
        self.journal.delete(ctx.lease.id)
        self._step("rolled-back")

    # ------------------------------------------------------------ release

    def release(self, lease_id: str, caller: Caller | None = None, reason: str = "released") -> Ended | None:
        """Give the lease's devices back; None when processes still hold them and the
        revoke ladder took the lease over (it ends later, with `on_ended`)."""
        lease = self.get(lease_id)
        if caller is not None and not caller.is_admin and caller.uid != lease.uid:
            self._audit("release", caller.uid, lease.target, lease.id, lease.rule, "denied", group=lease.group)
            raise PermissionDenied(f"lease {lease.id} belongs to uid {lease.uid}")
        with self._group_lock(lease.group):
            current = self.journal.lease(lease_id)
            if current is None:
                raise NotFound(f"no lease {lease_id!r}")
            return self._release_locked(current, reason, caller.uid if caller else None)

    # ------------------------------------------------------------ the memlock grant

    def grant_memlock(self, lease: LeaseRow, pid: int) -> tuple[int, int] | None:
        """Apply the lease's memlock grant to process `pid`, if it runs as the lessee
        (`PermissionDenied` if not), and record what to restore at release.  Returns
        the new (soft, hard) limits, or None if the process is gone."""
        if not lease.memlock:
            return None
        got = self.kernel.grant_memlock(pid, lease.memlock, lease.uid)
        if got is None:
            return None
        self.journal.record_grant(lease.id, got.pid, got.start, got.before)
        self._audit("memlock", lease.uid, lease.target, lease.id, lease.rule, "granted",
                    f"pid {pid}: {got.before} -> {got.after}")
        return got.after

    def _restore_memlock(self, lease: LeaseRow) -> None:
        """Give the process of the lease's memlock grant back its limits, unless another
        lease still holds a grant for it, or it is gone."""
        grant = self.journal.grant_of(lease.id)
        if grant is None:
            return
        pid, start, before, shared = grant
        if shared:
            return
        try:
            if self.kernel.restore_memlock(pid, start, before):
                log.info("lease %s: RLIMIT_MEMLOCK of pid %s is back to %s", lease.id, pid, before)
        except VfiodError as e:
            log.warning("lease %s: %s", lease.id, e)

    def _release_locked(self, lease: LeaseRow, reason: str, uid: int | None = None) -> Ended | None:
        if lease.state == "revoking":
            return None                     # the ladder has it already
        be = self._backend(lease.backend)
        holders = self.holders(lease) if be.driver == "vfio-pci" else []
        if holders:
            # Processes still hold the group or its devices: an unbind would wait for them
            # in the kernel, and a group on vfio-pci would stay theirs.  The ladder asks them.
            self._start_revoke(lease, reason, uid, holders)
            return None
        return self._give_back(lease, reason, uid, be)

    def _give_back(self, lease: LeaseRow, reason: str, uid: int | None, be: Backend) -> Ended:
        self.journal.set_state(lease.id, "releasing")
        self._step("releasing")
        ctx = self.context(lease)
        errors = self._undo(ctx, be, reset=lease.reset)
        if errors:
            self._audit("release", uid, lease.target, lease.id, lease.rule, "incomplete", "; ".join(errors),
                        group=lease.group)
            # Never left "releasing" for good: the ladder tries again every second.
            self.journal.start_revoke(lease.id, reason, self.clock() + lease.grace)
            self._sync_locked()
            raise BackendFailed(f"releasing lease {lease.id} left work undone (it stays recorded and "
                                f"will be retried): {'; '.join(errors)}")
        self._restore_memlock(lease)
        self.journal.delete(lease.id)
        self._step("released")
        self._audit("release", uid, lease.target, lease.id, lease.rule, reason, group=lease.group)
        ended = Ended(lease=lease, reason=reason)
        self.on_ended(ended)
        return ended

    # ------------------------------------------------------------ the revoke ladder

    def holders(self, lease: LeaseRow) -> list[Holder]:
        """The processes holding `lease`'s group or its devices open (vfiod excepted)."""
        endpoints = tuple(PciAddress.parse(h.addr) for h in self.journal.held(lease.id) if h.role == "endpoint")
        # A [vfio-device] fd the kernel does not name is this lease's for sure only if
        # its holder's uid holds no other lease through vfio-pci.
        vfio_uids = frozenset(o.uid for o in self.journal.leases() if o.id != lease.id
                              and (be := self.backends.get(o.backend)) is not None and be.driver == "vfio-pci")
        return find_holders(self.kernel.roots, lease.group, endpoints, unsure_uids=vfio_uids)

    def revoke(self, lease_id: str, reason: str, caller: Caller | None = None) -> Ended | Revoking:
        """Take a lease back whether or not its holders let go (root, or vfiod itself).

        1. the lease is marked ``revoking`` with its deadline (now + the policy's grace)
           and `on_revoking` is told (the bus signals ``LeaseRevoking``);
        2. the holders are asked: the node goes back to root, and each endpoint's unbind
           begins (the kernel fires the device's request eventfd: QEMU unplugs it from
           its guest, DPDK runs its removal handling);
        3. at the deadline, if the policy says ``on_revoke = "kill"``, the holders are
           ended: SIGTERM, then SIGKILL `kill_after` seconds later (only the lessee's
           processes unless the policy's ``revoke_others`` allows more);
        4. once nobody holds the group, the release completes as any release does.
        Steps 3 and 4 happen in `advance`, which the daemon calls every second; every
        step is journaled, and a restart resumes the ladder where it was."""
        if caller is not None and not caller.is_admin:
            raise PermissionDenied("only root may revoke a lease")
        if not isinstance(reason, str) or len(reason) > 200 or not reason.isprintable():
            raise InvalidArgument("a revoke reason is one line of at most 200 printable characters")
        lease = self.get(lease_id)
        with self._group_lock(lease.group):
            current = self.journal.lease(lease_id)
            if current is None:
                raise NotFound(f"no lease {lease_id!r}")
            if current.state == "granting":
                raise Busy(f"lease {lease_id} is still being granted")
            if current.state != "revoking":
                self._start_revoke(current, reason or "revoked", caller.uid if caller else None)
        return self.advance(lease_id) or Revoking(self.get(lease_id), ())

    def _start_revoke(self, lease: LeaseRow, reason: str, uid: int | None,
                      holders: list[Holder] | None = None) -> LeaseRow:
        """Steps 1 and 2 of the ladder (the group lock is held)."""
        deadline = self.clock() + lease.grace
        self.journal.start_revoke(lease.id, reason, deadline)
        self._sync_locked()
        lease = attrs.evolve(lease, state="revoking", revoke_reason=reason, deadline=deadline)
        seq = self.journal.intent(lease.id, "revoke", None, {"reason": reason, "deadline": deadline})
        self.journal.done(lease.id, seq)
        self._step("revoke")
        held = "; ".join(h.describe() for h in holders or [])
        self._audit("revoke", uid, lease.target, lease.id, lease.rule, "revoking",
                    f"{reason}; grace {lease.grace:g} s" + (f"; held by {held}" if held else ""), group=lease.group)
        log.warning("lease %s of uid %s is being revoked (%s): its holders have %g s to let go%s", lease.id,
                    lease.uid, reason, lease.grace, f" ({held})" if held else "")
        try:
            self.on_revoking(lease)
        except Exception as e:          # telling must never stop the taking
            log.error("lease %s: telling of the revoke failed: %s", lease.id, e)
        self._ask(lease)
        return lease

    def _sync_locked(self) -> None:
        """Tell the reader which devices the ladder unbinds (their device lock may be held
        for as long as their holders hold on): every endpoint of a ``revoking`` lease."""
        self.reader.locked = frozenset(PciAddress.parse(h.addr) for lease in self.journal.leases()
                                       if lease.state == "revoking"
                                       for h in self.journal.held(lease.id) if h.role == "endpoint")

    def _ask(self, lease: LeaseRow) -> None:
        """Step 2: nobody opens the group again, and each endpoint's unbind begins."""
        be = self.backends.get(lease.backend)
        if be is None:
            return
        ctx = self.context(lease)
        for st in self.journal.steps(lease.id):
            if st.action == "hand-over":
                try:
                    be.take_back(ctx, st.record)
                except Exception as e:
                    log.warning("lease %s: taking back the hand-over: %s", lease.id, e)
        if be.driver != "vfio-pci":
            return
        seq = self.journal.intent(lease.id, "ask", None, {"endpoints": [str(a) for a in ctx.endpoints]})
        self._step("ask-intent")
        begun = []
        for addr in ctx.endpoints:
            if self.kernel.exists(addr) and self.kernel.driver_of(addr) == be.driver:
                try:
                    u = self.kernel.start_unbind(addr)
                except (OSError, VfiodError) as e:
                    log.error("lease %s: cannot begin unbinding %s: %s", lease.id, addr, e)
                    continue
                if u is not None:
                    begun.append(u)
        self._unbinds[lease.id] = begun
        self.journal.done(lease.id, seq)
        self._step("ask-done")

    def advance(self, lease_id: str) -> Ended | Revoking | None:
        """One turn of the ladder for a ``revoking`` lease (None if it is not one):
        end the holders whose grace is over, finish the release once nobody holds it."""
        lease = self.journal.lease(lease_id)
        if lease is None or lease.state != "revoking":
            return None
        with self._group_lock(lease.group):
            current = self.journal.lease(lease_id)
            if current is None or current.state != "revoking":
                return None
            lease = current
            be = self.backends.get(lease.backend)
            if be is None:
                return Revoking(lease, ())
            holders = self.holders(lease) if be.driver == "vfio-pci" else []
            if not holders:
                pending = self._unbinds.get(lease.id, [])
                if all(u.wait(_SETTLE) for u in pending):
                    return self._finish_revoke(lease, be)
            elif lease.id not in self._unbinds:
                self._ask(lease)            # after a restart: ask again
            if lease.on_revoke == "kill" and self.clock() >= lease.deadline:
                self._end_holders(lease, holders)
            return Revoking(lease, tuple(holders))

    def advance_all(self) -> list[Ended]:
        """One turn of the ladder for every ``revoking`` lease; the leases that ended."""
        out = []
        for lease in self.journal.leases():
            if lease.state != "revoking":
                continue
            try:
                got = self.advance(lease.id)
            except Exception as e:          # one lease must never stop the others' ladders
                self._tell_once(lease.id, f"error:{e}", logging.ERROR, "lease %s: the revoke ladder failed: %s: %s",
                                lease.id, type(e).__name__, e)
                continue
            if isinstance(got, Ended):
                out.append(got)
        return out

    def _tell_once(self, lease_id: str, what: str, level: int, fmt: str, *args: object) -> None:
        if (lease_id, what) not in self._told:
            self._told.add((lease_id, what))
            log.log(level, fmt, *args)

    def _end_holders(self, lease: LeaseRow, holders: list[Holder]) -> None:
        """Step 3: SIGTERM each holder the policy lets vfiod end, SIGKILL it `kill_after` later."""
        sent: dict[tuple[int, int], dict[str, float]] = {}
        for st in self.journal.steps(lease.id):
            r = st.record
            pid, start, sig, at = r.get("pid"), r.get("start"), r.get("signal"), r.get("at")
            # Only signals known sent: one whose step was cut short by a crash is sent again.
            if (st.action == "end-holder" and st.status == "done" and isinstance(pid, int) and isinstance(start, int)
                    and isinstance(sig, str) and isinstance(at, (int, float))):
                sent.setdefault((pid, start), {})[sig] = float(at)
        now = self.clock()
        if lease.scope:
            self._end_scope(lease, now)
        for h in holders:
            if not h.sure:
                self._tell_once(lease.id, f"unsure:{h.pid}", logging.WARNING,
                                "lease %s: %s; this kernel does not say which device it is and uid %s holds another "
                                "VFIO lease, so vfiod does not end it", lease.id, h.describe(), h.uid)
                continue
            if h.uid != lease.uid and not lease.revoke_others:
                self._tell_once(lease.id, f"other:{h.pid}", logging.WARNING,
                                "lease %s: %s; the policy lets vfiod end only the lessee's (uid %s) processes, "
                                "so the revoke waits for it", lease.id, h.describe(), lease.uid)
                continue
            nxt = self._next_signal(sent.get((h.pid, h.start), {}), now)
            if nxt is None:
                continue
            sig, name = nxt
            seq = self.journal.intent(lease.id, "end-holder", None, {
                "pid": h.pid, "start": h.start, "uid": h.uid, "comm": h.comm, "signal": name, "at": now})
            self._step(f"end-holder-intent:{name}")
            if signal_holder(h, sig):
                self._audit("revoke", None, lease.target, lease.id, lease.rule, "ended",
                            f"SIG{name} to {h.describe()} ({lease.revoke_reason})", group=lease.group)
                log.warning("lease %s: SIG%s to %s (%s)", lease.id, name, h.describe(), lease.revoke_reason)
            self.journal.done(lease.id, seq)
            self._step(f"end-holder-done:{name}")

    def _next_signal(self, sent: Mapping[str, float], now: float) -> tuple[int, str] | None:
        """What the ladder sends next to a holder (or a scope) that got the signals `sent`
        (name -> when): SIGTERM first, SIGKILL `kill_after` seconds later, then nothing."""
        if "TERM" not in sent:
            return signal.SIGTERM, "TERM"
        if "KILL" not in sent and now - sent["TERM"] >= self.kill_after:
            return signal.SIGKILL, "KILL"
        return None

    def _end_scope(self, lease: LeaseRow, now: float) -> None:
        """The lessee's command ran in a transient scope (`vfioctl lease -- CMD`): end the
        whole tree at once, SIGTERM then SIGKILL, as the holders are ended."""
        sent = {str(st.record.get("signal")): float(at) for st in self.journal.steps(lease.id)
                if st.action == "end-scope" and st.status == "done"
                and isinstance(at := st.record.get("at"), (int, float))}
        nxt = self._next_signal(sent, now)
        if nxt is None:
            return
        sig, name = nxt
        assert lease.scope is not None
        seq = self.journal.intent(lease.id, "end-scope", None, {"scope": lease.scope, "signal": name, "at": now})
        if self.end_scope(lease.scope, sig):
            self._audit("revoke", None, lease.target, lease.id, lease.rule, "ended",
                        f"SIG{name} to every process of {lease.scope} ({lease.revoke_reason})", group=lease.group)
            log.warning("lease %s: SIG%s to every process of %s (%s)", lease.id, name, lease.scope,
                        lease.revoke_reason)
        self.journal.done(lease.id, seq)

    def _finish_revoke(self, lease: LeaseRow, be: Backend) -> Ended | Revoking:
        """Step 4: nobody holds the group: the release completes (a failure is retried)."""
        reason = lease.revoke_reason or "revoked"
        self._unbinds.pop(lease.id, None)
        try:
            ended = self._give_back(lease, reason if reason in END_REASONS else "revoked", None, be)
        except VfiodError as e:
            self._tell_once(lease.id, f"finish:{e}", logging.ERROR, "lease %s: finishing the revoke: %s", lease.id, e)
            return Revoking(lease, ())
        finally:
            self._sync_locked()
        return ended

    def revoke_disallowed(self, policy: Policy) -> list[Ended | Revoking]:
        """Revoke (reason ``policy``) every granted lease `policy` no longer allows."""
        out: list[Ended | Revoking] = []
        for lease in self.journal.leases():
            if lease.state != "granted":
                continue
            try:
                decision = policy.decide(self.scan_groups([lease.group]), Caller.from_uid(lease.uid), lease.group,
                                         lease.backend, _terms(lease))
            except VfiodError as e:
                decision = Decision(False, "", str(e))
            if decision.allowed:
                continue
            log.warning("lease %s of uid %s: the policy no longer allows it (%s)", lease.id, lease.uid,
                        decision.reason)
            try:
                out.append(self.revoke(lease.id, "policy"))
            except VfiodError as e:
                log.error("revoking lease %s: %s", lease.id, e)
        return out

    # ------------------------------------------------------------ SR-IOV

    def set_vf_count(self, caller: Caller, pf: PciAddress, count: int) -> int:
        """Root only: set an SR-IOV PF's number of VFs (``sriov_numvfs``).  Refused
        (`Busy`) while the PF or any of its VFs is leased: changing the count
        removes every VF, and would pull them from under their lessees.
        Returns the count before the change."""
        if not caller.is_admin:
            raise PermissionDenied("only root may change the number of VFs")
        reader = self.reader
        if not self.kernel.exists(pf):
            raise NotFound(f"no device {pf}")
        raw = reader.read_device(pf)
        if raw.sriov_totalvfs is None:
            raise InvalidArgument(f"{pf} is not an SR-IOV physical function")
        if not isinstance(count, int) or not 0 <= count <= raw.sriov_totalvfs:
            raise InvalidArgument(f"{pf} supports 0 to {raw.sriov_totalvfs} VFs, not {count!r}")
        group = reader.group_of(pf)
        with self._group_lock(group if group is not None else -1):
            raw = reader.read_device(pf)
            holdings = self.journal.holdings()
            busy = sorted({holdings[str(a)][0].id for a in (pf, *raw.virtfns) if str(a) in holdings})
            if busy:
                raise Busy(f"{pf} or its VFs are leased ({', '.join(busy)}); release them first")
            before = raw.sriov_numvfs or 0
            self.kernel.set_numvfs(pf, count)
            self._audit("sriov", caller.uid, str(pf), None, None, "changed", f"{before} -> {count} VFs",
                        group=group)
            return before

    def renew(self, lease_id: str, caller: Caller, seconds: int) -> LeaseRow:
        lease = self.get(lease_id)
        if not caller.is_admin and caller.uid != lease.uid:
            raise PermissionDenied(f"lease {lease.id} belongs to uid {lease.uid}")
        if not isinstance(seconds, int) or seconds <= 0:
            raise InvalidArgument("renew takes a positive number of seconds")
        decision = self.policy_source().decide(self.scan_groups([lease.group]), caller, lease.group, lease.backend,
                                               {"duration": seconds, **_terms(lease)})
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
        self._audit("renew", caller.uid, lease.target, lease.id, decision.rule, "renewed", f"{seconds} s",
                        group=lease.group)
        return attrs.evolve(lease, expires=expires)

    def expire_due(self) -> list[Ended]:
        now = self.clock()
        out = []
        for lease in self.journal.leases():
            if lease.state == "granted" and lease.expires and lease.expires <= now:
                try:
                    ended = self.release(lease.id, reason="expired")
                except VfiodError as e:
                    log.error("expiring lease %s: %s", lease.id, e)
                    continue
                if ended is not None:
                    out.append(ended)
        return out

    def end_owned_by(self, owner: str, reason: str = "disconnected") -> list[Ended]:
        out = []
        for lease in self.journal.leases():
            if lease.owner == owner and not lease.persistent and lease.state == "granted":
                try:
                    ended = self.release(lease.id, reason=reason)
                except VfiodError as e:
                    log.error("ending lease %s of %s: %s", lease.id, owner, e)
                    continue
                if ended is not None:
                    out.append(ended)
        return out

    # ------------------------------------------------------------ after a crash

    def reconcile(self) -> list[Ended]:
        """Make sysfs and the journal agree again; returns the leases that ended."""
        self._sync_locked()
        out = []
        for lease in self.journal.leases():
            try:
                out.extend(self._reconcile_one(lease))
            except Exception as e:
                # One lease that cannot be reconciled must not keep the daemon from serving the rest.
                log.error("lease %s could not be reconciled (%s: %s); it stays recorded as %s",
                          lease.id, type(e).__name__, e, lease.state)
        return out

    def _reconcile_one(self, lease: LeaseRow) -> list[Ended]:
        """Roll back, finish, keep or end one lease of the journal (see `reconcile`)."""
        with self._group_lock(lease.group):
            be = self.backends.get(lease.backend)
            if be is None:
                log.error("lease %s uses backend %s, which is not loaded; kept as is", lease.id, lease.backend)
                return []
            if lease.state == "granting":
                self._rollback(self.context(lease), be)
                self._audit("reconcile", None, lease.target, lease.id, lease.rule, "rolled-back",
                            "the grant was interrupted")
                return [Ended(lease, "interrupted")] if self.journal.lease(lease.id) is None else []
            if lease.state == "revoking":
                log.info("lease %s: the revoke ladder (%s) goes on", lease.id, lease.revoke_reason)
                return []
            if lease.state != "releasing" and (lease.persistent or self.owner_alive(lease)):
                self._verify(lease, be)
                return []
            reason = "released" if lease.state == "releasing" else "owner-gone"
            if lease.state == "releasing" and lease.revoke_reason:      # the ladder's last step
                reason = lease.revoke_reason if lease.revoke_reason in END_REASONS else "revoked"
            try:
                ended = self._release_locked(lease, reason)
                return [ended] if ended else []
            except VfiodError as e:
                log.error("%s lease %s: %s", "finishing the release of" if reason == "released" else "ending",
                          lease.id, e)
                return []

    def _verify(self, lease: LeaseRow, be: Backend) -> None:
        """A kept lease: every endpoint still on the backend's driver, the hand-over in place."""
        ctx = self.context(lease)
        for held in self.journal.held(lease.id):
            addr = PciAddress.parse(held.addr)
            if held.role == "bridge" and self.kernel.exists(addr) and self.kernel.driver_of(addr):
                log.warning("lease %s: bridge %s is on %s again; detaching it", lease.id, addr,
                            self.kernel.driver_of(addr))
                self.kernel.detach(addr)
        for addr in ctx.endpoints:
            if self.kernel.exists(addr) and self.kernel.driver_of(addr) != be.driver:
                log.warning("lease %s: %s is on %s, not %s; binding it again", lease.id, addr,
                            self.kernel.driver_of(addr), be.driver)
                be.bind(ctx, addr)
        steps = [s for s in self.journal.steps(lease.id) if s.action == "hand-over"]
        if steps and steps[-1].status != "done":
            seq = steps[-1].seq
            record = be.hand_over(ctx) or steps[-1].record
            self.journal.done(lease.id, seq, record)
        elif steps:
            record = be.hand_over(ctx) or steps[-1].record     # idempotent: re-apply ownership
            self.journal.done(lease.id, steps[-1].seq, record)


def _namespace(options: Mapping[str, object]) -> str | None:
    """The Kubernetes namespace a request was made for (`Policy.decide` checked it)."""
    ns = options.get("k8s_namespace")
    return ns if isinstance(ns, str) else None


def _terms(lease: LeaseRow) -> dict[str, object]:
    """The options a lease is judged on again (a renewal, a policy reload): as it was granted."""
    terms: dict[str, object] = {"persistent": lease.persistent}
    if lease.k8s_namespace is not None:
        terms["k8s_namespace"] = lease.k8s_namespace
    return terms
